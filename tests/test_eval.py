"""Perplexity protocols, result JSON and the `kvsplice eval` verb, on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama
from transformers import DynamicCache

from kvsplice.cache import CompressedCache, LayerCodec
from kvsplice.codecs import get_codec
from kvsplice.errors import KVSpliceError
from kvsplice.evaluate import (
    ROW_FIELDS,
    ProtocolError,
    format_table,
    perplexity_prefill_continue,
    perplexity_teacher_forced,
    plot_frontier,
    result_dict,
    validate_result,
    write_json,
)
from kvsplice.pruning import VOnlyPruner

MAKERS = {"gpt2": make_tiny_gpt2, "llama": make_tiny_llama}
F32 = 4


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread is faster, and far faster on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def layout(model):
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, cfg.hidden_size // cfg.num_attention_heads


def stream(n, seed=0, vocab=260):
    return torch.randint(3, vocab, (n,), generator=torch.Generator().manual_seed(seed))


def codec_cache(model, name, k=None, pruner_kw=None, seed=0):
    """() -> CompressedCache with `name` codecs per KV head (fitted on random vectors)."""
    L, H, D = layout(model)
    g = torch.Generator().manual_seed(seed)
    params = {} if k is None else {"k": k}
    layers = [LayerCodec([get_codec(name, **params).fit(torch.randn(300, D, generator=g)) for _ in range(H)]) for _ in range(L)]
    return lambda: CompressedCache(L, v_codecs=layers, pruner=VOnlyPruner(**pruner_kw) if pruner_kw else None)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_identity_codec_equals_dynamic_cache_both_protocols(arch):
    model = MAKERS[arch]()
    ids = stream(200)
    ident = codec_cache(model, "identity")
    base = perplexity_teacher_forced(model, ids, DynamicCache, window=64, name="base")
    row = perplexity_teacher_forced(model, ids, ident, window=64, name="identity")
    assert base.tokens == row.tokens == 3 * 63
    assert row.ppl == pytest.approx(base.ppl, rel=1e-6)
    assert torch.allclose(row.token_nll, base.token_nll, atol=1e-5)
    # teacher-forced baseline = the model's own loss on each window
    with torch.no_grad():
        ref = [model(ids[s : s + 64][None], labels=ids[s : s + 64][None]).loss for s in (0, 64, 128)]
    assert base.nll == pytest.approx(float(torch.stack(ref).mean()), rel=1e-5)

    for chunk in (1, 3):
        kw = dict(prefill=24, continue_tokens=10, chunk=chunk, segments=3, batch_size=2)
        b = perplexity_prefill_continue(model, ids, DynamicCache, **kw)
        r = perplexity_prefill_continue(model, ids, ident, **kw)
        assert b.tokens == r.tokens == 30 and r.token_nll.shape == (3, 10)
        assert r.ppl == pytest.approx(b.ppl, rel=1e-6)
        assert torch.allclose(r.token_nll, b.token_nll, atol=1e-5)
    # the scored tokens are the ones a plain full forward predicts from the same context
    with torch.no_grad():
        seg = ids[:35][None]
        full = torch.nn.functional.cross_entropy(model(seg).logits[0, 24:34], seg[0, 25:35], reduction="none")
    assert torch.allclose(b.token_nll[0], full, atol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_keep_ratio_one_matches_baseline_under_prefill_continue(arch):
    model = MAKERS[arch]()
    ids = stream(120, seed=1)
    kw = dict(prefill=30, continue_tokens=8, segments=2, batch_size=2)
    base = perplexity_prefill_continue(model, ids, DynamicCache, **kw)
    keep_all = codec_cache(model, "identity", pruner_kw=dict(keep_ratio=1.0, k_min=1, recency=1))
    row = perplexity_prefill_continue(model, ids, keep_all, **kw)
    assert torch.allclose(row.token_nll, base.token_nll, atol=1e-4)
    assert model.config._attn_implementation != "kvsplice"  # switched back after the row


@pytest.mark.parametrize("chunk", [1, 4])
def test_prefill_continue_is_causal(chunk):
    """Losses up to t are identical whether or not the tokens after t exist at all."""
    model = make_tiny_llama()
    ids = stream(200, seed=2)
    make = codec_cache(model, "pca", k=4, pruner_kw=dict(keep_ratio=0.3, k_min=4, recency=4))
    C, N, n = 40, 24, 10
    long = perplexity_prefill_continue(model, ids[: C + N + 1], make, prefill=C, continue_tokens=N, chunk=chunk)
    short = perplexity_prefill_continue(model, ids[: C + n + 1], make, prefill=C, continue_tokens=n, chunk=chunk)
    assert long.token_nll.shape == (1, N) and short.token_nll.shape == (1, n)
    torch.testing.assert_close(short.token_nll, long.token_nll[:, :n], rtol=0, atol=1e-6)
    # pruning really happened: the cache held fewer V rows than tokens, so the check above is not vacuous
    L, H, D = layout(model)
    assert long.v_bytes_per_token < 0.5 * 4 * F32 * H * L


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_chunk_size_does_not_change_rows_without_pruning(arch):
    """What the ablation relies on to feed unpruned rows in larger chunks."""
    model = MAKERS[arch]()
    ids = stream(120, seed=3)
    for make in (DynamicCache, codec_cache(model, "pca", k=3)):
        kw = dict(prefill=20, continue_tokens=15, segments=2, batch_size=2)
        one = perplexity_prefill_continue(model, ids, make, chunk=1, **kw)
        five = perplexity_prefill_continue(model, ids, make, chunk=5, **kw)
        torch.testing.assert_close(five.token_nll, one.token_nll, rtol=0, atol=2e-5)


def test_teacher_forced_refuses_pruning():
    model = make_tiny_llama()
    make = codec_cache(model, "identity", pruner_kw=dict(keep_ratio=0.5))
    with pytest.raises(ProtocolError, match="prefill-continue") as e:
        perplexity_teacher_forced(model, stream(100), make, window=32)
    assert isinstance(e.value, KVSpliceError)


def test_bad_protocol_inputs_raise_typed_errors():
    model = make_tiny_llama()
    with pytest.raises(ProtocolError, match="at least 64 tokens, got 10"):
        perplexity_teacher_forced(model, stream(10), DynamicCache, window=64)
    with pytest.raises(ProtocolError, match="stride"):
        perplexity_teacher_forced(model, stream(100), DynamicCache, window=32, stride=40)
    with pytest.raises(ProtocolError, match="1-D integer"):
        perplexity_prefill_continue(model, torch.zeros(2, 50, dtype=torch.long), DynamicCache, prefill=8, continue_tokens=4)
    with pytest.raises(ProtocolError, match="chunk must be a positive int"):
        perplexity_prefill_continue(model, stream(100), DynamicCache, prefill=8, continue_tokens=4, chunk=0)


def test_strided_windows_score_every_token_once():
    model = make_tiny_gpt2()
    ids = stream(40)
    row = perplexity_teacher_forced(model, ids, DynamicCache, window=16, stride=8)
    assert row.tokens == 39  # windows at 0, 8, 16, 24: 15 + 3 * 8 targets = every token after the first


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_byte_figures_come_from_the_cache(arch):
    model = MAKERS[arch]()
    L, H, D = layout(model)
    ids = stream(100)
    base = perplexity_teacher_forced(model, ids, DynamicCache, window=32, max_windows=1)
    assert base.kv_bytes_per_token == 2 * L * H * D * F32 and base.kv_reduction_pct == 0.0
    assert base.measured_cache_bytes == 32 * 2 * L * H * D * F32
    k = 2
    row = perplexity_teacher_forced(model, ids, codec_cache(model, "pca", k=k), window=32, max_windows=1)
    assert row.v_bytes_per_token == L * H * k * F32
    assert row.kv_bytes_per_token == L * H * (D + k) * F32
    assert row.v_reduction_pct == pytest.approx(100 * (1 - k / D))
    assert row.kv_reduction_pct == pytest.approx(100 * (1 - (D + k) / (2 * D)))


def test_result_json_schema(tmp_path):
    model = make_tiny_llama()
    ids = stream(100)
    rows = [perplexity_teacher_forced(model, ids, DynamicCache, window=32, name="baseline"),
            perplexity_teacher_forced(model, ids, codec_cache(model, "pca", k=2), window=32, name="pca-2")]
    res = result_dict("tiny", "teacher-forced", rows, {"window": 32})
    path = tmp_path / "out" / "r.json"
    write_json(path, res)
    back = json.loads(path.read_text())
    assert set(back) == {"model", "protocol", "tokens", "rows", "config"}
    assert back["tokens"] == 93 and back["config"] == {"window": 32}
    assert [list(r) for r in back["rows"]] == [list(ROW_FIELDS)] * 2
    assert back["rows"][1]["name"] == "pca-2" and math.isclose(back["rows"][0]["ppl"], rows[0].ppl)
    validate_result(back)
    for bad in (
        {k: v for k, v in back.items() if k != "config"},
        {**back, "protocol": "other"},
        {**back, "rows": [{**back["rows"][0], "extra": 1.0}]},
        {**back, "rows": [{**back["rows"][0], "measured_cache_bytes": 1.5}]},
        {**back, "rows": [{k: v for k, v in back["rows"][0].items() if k != "ppl"}]},
    ):
        with pytest.raises(KVSpliceError):
            validate_result(bad)
    table = format_table(rows)
    assert "pca-2" in table and "Δppl" in table
    plot_frontier(tmp_path / "p.png", rows)
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_cli_end_to_end(tmp_path, tiny_llama, capsys):
    from kvsplice.cli import main

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "e.json"
    argv = ["eval", "--model", str(tmp_path / "m"), "--data", str(text), "--protocol", "teacher-forced",
            "--tf-window", "64", "--max-windows", "2", "--json", str(out)]
    assert main(argv) == 0
    res = json.loads(out.read_text())
    validate_result(res)
    assert [r["name"] for r in res["rows"]] == ["baseline"] and res["tokens"] == 126
    assert res["config"]["protocol"] == "teacher-forced"
    # pruning under teacher forcing: a typed error (exit 2), before any model is loaded
    assert main(argv[:-2] + ["--keep-ratio", "0.5"]) == 2
    assert "prefill-continue" in capsys.readouterr().err


def _saved_with_v_geometry(tmp_path, tiny_llama, make_codec, n: int):
    """The tiny llama saved to tmp_path/m and a V geometry of make_codec() fitted per (layer, head) on
    n random vectors at tmp_path/g.safetensors -> (model, model folder, geometry path)."""
    from kvsplice.geometry import Geometry, save_geometry

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    L, H, D = layout(model)
    g = torch.Generator().manual_seed(0)
    codecs = {(l, h): make_codec().fit(torch.randn(n, D, generator=g)) for l in range(L) for h in range(H)}
    save_geometry(tmp_path / "g.safetensors", Geometry(codecs, {"target": "v", "num_layers": str(L)}))
    return model, tmp_path / "m", tmp_path / "g.safetensors"


def test_generate_cli_prints_continuation_and_measured_bytes(tmp_path, tiny_llama, capsys):
    from kvsplice.cli import main
    from kvsplice.geometry import Geometry, save_geometry

    model, folder, geo = _saved_with_v_geometry(tmp_path, tiny_llama, lambda: get_codec("pca", k=2), 100)
    L, H, D = layout(model)
    g = torch.Generator().manual_seed(1)
    argv = ["generate", "--model", str(folder), "--geometry", str(geo),
            "--prompt", "hello there, cache " * 8, "--max-new-tokens", "6", "--keep-ratio", "0.5", "--recency", "8", "--k-min", "8"]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert out.strip()  # the continuation
    line = next(l for l in err.splitlines() if l.startswith("[cache]"))
    held, unc = (int(s) for s in __import__("re").findall(r"(\d+) bytes", line)[:2])
    assert 0 < held < unc / 2  # pruned to half of the tokens, V at 2 of 8 dims
    # a geometry for another layout is refused before generating
    bad = {(l, h): get_codec("pca", k=2).fit(torch.randn(100, D + 1, generator=g)) for l in range(L) for h in range(H)}
    save_geometry(tmp_path / "bad.safetensors", Geometry(bad, {"target": "v"}))
    assert main(argv[:4] + [str(tmp_path / "bad.safetensors")] + argv[5:]) == 2
    assert "dimension" in capsys.readouterr().err


def test_eval_cli_k_geometry_and_sink(tmp_path, tiny_llama):
    """Our best recipe from the CLI: calibrate a transform coder for K and V (--param bits=...),
    then eval with --k-geometry and --sink; the coded row holds fewer bytes than the baseline."""
    from kvsplice.cli import main

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    common = ["--model", str(tmp_path / "m"), "--data", str(text)]
    for target in ("v", "k"):
        argv = ["calibrate", *common, "--codec", "pca-q", "--param", "bits=3", "--joint-heads", "--target", target,
                "--seq-len", "64", "--max-batches", "4", "--quiet", "--out", str(tmp_path / f"{target}.safetensors")]
        assert main(argv) == 0
    from kvsplice.geometry import load_geometry

    assert json.loads(load_geometry(tmp_path / "k.safetensors").codec_for(0, -1).metadata()["params"])["bits"] == 3
    out = tmp_path / "e.json"
    argv = ["eval", *common, "--geometry", str(tmp_path / "v.safetensors"), "--k-geometry", str(tmp_path / "k.safetensors"),
            "--sink", "1", "--protocol", "teacher-forced", "--tf-window", "64", "--max-windows", "2", "--json", str(out)]
    assert main(argv) == 0
    rows = {r["name"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"baseline", "v+K:k"}
    assert rows["v+K:k"]["kv_bytes_per_token"] < rows["baseline"]["kv_bytes_per_token"] / 4
    assert main(["calibrate", *common, "--param", "bits", "--out", str(tmp_path / "x.safetensors")]) == 2


def test_teacher_forced_refuses_inexact_caches(tiny_llama):
    """A full-precision window (or a quantiser's residual) makes one forward read rows that decoding
    would read coded: teacher forcing must refuse rather than report baseline-like numbers."""
    from kvsplice.cache import CompressedCache

    model, _ = tiny_llama
    L = model.config.num_hidden_layers
    ids = torch.randint(3, 100, (64,), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ProtocolError, match="not exact"):
        perplexity_teacher_forced(model, ids, lambda: CompressedCache(L, window=4), window=32)


def test_a_model_that_ignores_the_cache_is_refused(tiny_llama):
    from transformers import DynamicCache

    model, _ = tiny_llama
    ids = torch.randint(3, 100, (64,), generator=torch.Generator().manual_seed(0))
    forward = model.forward
    model.forward = lambda *a, cache=None, **k: forward(*a, **k)  # drops the cache, as an older transformers would
    with pytest.raises(ProtocolError, match="did not write to the cache"):
        perplexity_teacher_forced(model, ids, DynamicCache, window=32)


def test_generate_cli_uses_coded_attention_where_it_can_and_gives_the_reference_text(tmp_path, tiny_llama, capsys):
    """--attention auto reads V from its codes (pca-q: affine) and generates the text the reference
    path (decode rows) generates; --attention coded refuses a pruning cache with the reason."""
    from kvsplice.cli import main

    _, folder, geo = _saved_with_v_geometry(tmp_path, tiny_llama, lambda: get_codec("pca-q", bits=4.0), 300)
    argv = ["generate", "--model", str(folder), "--geometry", str(geo),
            "--prompt", "hello there, cache " * 8, "--max-new-tokens", "8", "--no-compare"]
    texts = {}
    for mode in ("auto", "reference"):
        assert main(argv + ["--attention", mode]) == 0
        out, err = capsys.readouterr()
        line = next(l for l in err.splitlines() if l.startswith("[attention]"))
        assert ("coded domain" in line) == (mode == "auto"), line
        texts[mode] = out
    assert texts["auto"] == texts["reference"]
    assert main(argv + ["--attention", "coded", "--keep-ratio", "0.5"]) == 2
    assert "pruning" in capsys.readouterr().err
