"""Cross-layer prediction (kvsplice/codecs/xpred.py, issue 13 lever 2) on a tiny random Llama: the
closed-loop fit lowers the coding error; a cache fed token by token gives the logits of one forward
(each row's code depends only on its own token); near-lossless bits approach DynamicCache; state
round-trips through a geometry file; every unsafe use is refused (window, pruner, a layer without
the predicted codec, rows that do not line up, coded attention falls back to decoding)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama, run_two_method_frontier
from test_model_types import _feed
from transformers import DynamicCache

from kvsplice.cache import CompressedCache
from kvsplice.codecs import get_codec
from kvsplice.codecs.xpred import capture_all_layers, fit_xpred_geometry
from kvsplice.errors import KVSpliceError
from kvsplice.geometry import load_geometry, save_geometry

TEXT = "The quick brown fox jumps over the lazy dog. A cache holds keys and values for later queries. " * 40


@pytest.fixture(scope="module")
def fitted():
    torch.manual_seed(0)
    model, tok = make_tiny_llama().eval(), make_byte_tokenizer()
    geos = {(t, b): fit_xpred_geometry(model, tok, TEXT, t, {"bits": b}, windows=3, seq_len=128) for t in ("k", "v") for b in (3.0, 8.0)}
    return model, tok, geos


def _ids(tok, n=48):
    return tok(TEXT[200:], return_tensors="pt").input_ids[:, :n]


_chunked = _feed  # (model, ids, cache, chunk sizes) -> logits of the chunks fed in order


def test_prediction_lowers_the_coding_error_of_a_held_out_window(fitted):
    model, tok, geos = fitted
    X = capture_all_layers(model, tok, TEXT[3000:], "v", 1, 128)
    geo = geos[("v", 3.0)]
    plain_err = pred_err = 0.0
    prev = None
    for l in range(2):
        x, c = X[l], geo.codecs[(l, -1)]
        pred = torch.zeros_like(x) if prev is None else c.predict(prev)
        dec = pred + c.decode(c.encode(x - pred))
        pred_err += float((dec - x).pow(2).sum())
        p = get_codec("pca-q", bits=3.0).fit(capture_all_layers(model, tok, TEXT, "v", 3, 128)[l])
        plain_err += float((p.decode(p.encode(x)) - x).pow(2).sum())
        prev = dec
    assert pred_err < plain_err


def test_token_by_token_equals_one_forward_and_high_bits_approach_dynamic_cache(fitted):
    model, tok, geos = fitted
    ids = _ids(tok)
    for bits in (3.0, 8.0):
        make = lambda: CompressedCache.from_geometry(model, geos[("v", bits)], geos[("k", bits)], sink=1)  # noqa: E731
        one = _chunked(model, ids, make(), [48])
        steps = _chunked(model, ids, make(), [20, 1, 1, 5, 1, 20])
        torch.testing.assert_close(steps, one, atol=2e-4, rtol=0)
    ref = _chunked(model, ids, DynamicCache(), [48])
    assert float((one - ref).abs().max()) < 0.05  # 8 bits: near lossless


def test_geometry_round_trip_and_generate(fitted, tmp_path):
    model, tok, geos = fitted
    for t in ("k", "v"):
        save_geometry(tmp_path / f"{t}.safetensors", geos[(t, 3.0)])
    v, k = (load_geometry(tmp_path / f"{t}.safetensors") for t in ("v", "k"))
    assert torch.equal(v.codecs[(1, -1)].pred, geos[("v", 3.0)].codecs[(1, -1)].pred)
    ids = _ids(tok, 16)
    a = _chunked(model, ids, CompressedCache.from_geometry(model, v, k, sink=1), [16])
    b = _chunked(model, ids, CompressedCache.from_geometry(model, geos[("v", 3.0)], geos[("k", 3.0)], sink=1), [16])
    torch.testing.assert_close(a, b)
    out = model.generate(ids, cache=CompressedCache.from_geometry(model, v, k, sink=1), max_new_tokens=4, do_sample=False)
    assert out.shape[1] == 20


def test_unsafe_uses_are_refused(fitted):
    model, tok, geos = fitted
    v = geos[("v", 3.0)]
    with pytest.raises(KVSpliceError, match="same rows"):
        CompressedCache.from_geometry(model, v, window=4)
    from kvsplice.cache import LayerCodec

    lcs = [LayerCodec.from_geometry(v, 0), None]
    with pytest.raises(KVSpliceError, match="every layer"):
        CompressedCache(2, v_codecs=lcs)
    lc = LayerCodec.from_geometry(v, 1)  # a layer-1 codec alone has no previous layer to read
    with pytest.raises(KVSpliceError, match="chain"):
        lc.encode(torch.randn(1, 2, 3, 8))
    lc.chain = {0: torch.randn(1, 5, 16)}
    with pytest.raises(KVSpliceError, match="rows"):
        lc.decode(lc.encode(torch.randn(1, 2, 3, 8)))  # decode needs exactly the payload's 3 rows, chain has 5
    from kvsplice.coded_attention import affine_groups

    assert affine_groups(LayerCodec.from_geometry(v, 1)) is None  # coded attention decodes instead


def test_frontier_runs_xpred_at_the_same_payload_and_counts_its_maps(tmp_path):
    pts = run_two_method_frontier(tmp_path, "xpred", 'codec = "xpred-pca-q", target = "kv", joint_heads = true, sink = 1')
    assert pts["xpred"]["kv_bits_per_value"] == pts["pca-q"]["kv_bits_per_value"]  # same payload per token
    assert pts["xpred"]["ppl"] > 1.0


def test_levers_combined_allocation_refits_the_maps_at_the_allocated_bits(tmp_path):
    """Levers 1 + 2: the probe's pca-q damage rescaled by the coding-error ratio, the maps refitted
    closed loop at each layer's allocated width, spending at most uniform pca-q's payload."""
    import json

    import kvsplice

    torch.manual_seed(0)
    model, tok = make_tiny_llama().eval(), make_byte_tokenizer()
    recipe = kvsplice.calibrate_recipe(model, tok, TEXT, codec="xpred-pca-q", bits=3.0, allocate="sensitivity",
                                       levels=[2.0, 3.0, 6.0], max_batches=3, seq_len=128, samples=1500)
    alloc = json.loads(recipe.v.meta["allocation"])
    assert alloc["damage"] == "pca-q probe x mse ratio" and set(alloc["mse_ratio"]) == {"k", "v"}
    bits = {t: json.loads(geo.meta["allocation"])["bits"] for t, geo in (("k", recipe.k), ("v", recipe.v))}
    for t, geo in (("k", recipe.k), ("v", recipe.v)):
        cs = [geo.codecs[(l, -1)] for l in range(2)]
        assert all(c.name == "xpred-pca-q" for c in cs) and [c.bits for c in cs] == bits[t]
        assert bool(cs[1].pred.abs().sum() > 0)  # refitted maps, not the probe's pca-q
    spent = sum(geo.codecs[(l, -1)].payload_bytes_per_vector() for geo in (recipe.k, recipe.v) for l in range(2))
    assert spent <= 3.0 * 2 * 2 * 16 / 8  # <= uniform 3-bit payload: 2 targets x 2 layers x 16 values
    assert len(set(bits["k"] + bits["v"])) > 1  # the widths differ (else nothing was allocated)
    ids = _ids(tok, 24)
    one = _chunked(model, ids, recipe.cache(model), [24])
    torch.testing.assert_close(_chunked(model, ids, recipe.cache(model), [10, 1, 13]), one, atol=2e-4, rtol=0)


def _gemma4():
    """A tiny Gemma 3 with layers sliding, global, sliding, global (window 6): predecessors -1, -1, 0, 1."""
    from test_model_types import WINDOW, _build

    return _build("Gemma3TextConfig", "Gemma3ForCausalLM", num_hidden_layers=4, num_key_value_heads=1, head_dim=8,
                  query_pre_attn_scalar=8, sliding_window=WINDOW,
                  layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]).eval()


def test_hybrid_model_predicts_within_each_attention_type():
    from kvsplice.codecs.xpred import predecessors

    model, tok = _gemma4(), make_byte_tokenizer()
    assert predecessors(model) == [-1, -1, 0, 1] and predecessors(make_tiny_llama()) == [-1, 0]
    torch.manual_seed(0)
    geos = {t: fit_xpred_geometry(model, tok, TEXT, t, {"bits": 8.0}, windows=3, seq_len=128) for t in ("k", "v")}
    assert [geos["v"].codecs[(l, -1)].prev for l in range(4)] == [-1, -1, 0, 1]
    ids = _ids(tok, 20)
    make = lambda: CompressedCache.from_geometry(model, geos["v"], geos["k"], sink=1)  # noqa: E731
    one = _chunked(model, ids, make(), [20])
    torch.testing.assert_close(_chunked(model, ids, make(), [9, 1, 1, 3, 1, 5]), one, atol=2e-4, rtol=0)  # past the window
    ref = _chunked(model, ids, DynamicCache(config=model.config), [20])
    assert float((one - ref).abs().max()) < 0.05  # 8 bits: near lossless on every layer type
    out = model.generate(ids[:, :10], cache=make(), max_new_tokens=6, do_sample=False)
    assert out.shape[1] == 16
    cache = make()
    _chunked(model, ids, cache, [12, 1])
    assert {w: dict(ch) for w, ch in cache.tokens.chains.items()} == {"K": {}, "V": {}}  # every kept row was read and freed
    assert cache.tokens.chains["V"].needed == {0, 1}
    c = geos["v"].codecs[(3, -1)]
    assert "prev" in c.params and "prev" not in geos["v"].codecs[(0, -1)].params  # default l - 1: files hash as before
    geos["v"].codecs[(2, -1)].prev = 1  # a sliding layer predicted from a global one: different rows held
    with pytest.raises(KVSpliceError, match="another sliding window"):
        CompressedCache.from_geometry(model, geos["v"], geos["k"], sink=1)


def test_recipe_api_and_cli_fit_xpred_on_aligned_rows(tmp_path):
    import json

    import kvsplice
    from kvsplice.cli import main

    torch.manual_seed(0)
    model, tok = make_tiny_llama().eval(), make_byte_tokenizer()
    recipe = kvsplice.calibrate_recipe(model, tok, TEXT, codec="xpred-pca-q", bits=3.0, max_batches=3, seq_len=128)
    assert recipe.v.codecs[(1, -1)].name == "xpred-pca-q" and bool(recipe.v.codecs[(1, -1)].pred.abs().sum() > 0)
    ids = _ids(tok, 16)
    out = model.generate(ids, cache=recipe.cache(model), max_new_tokens=3, do_sample=False)
    assert out.shape[1] == 19
    m = tmp_path / "m"
    model.save_pretrained(m)
    tok.save_pretrained(m)
    (tmp_path / "t.txt").write_text(TEXT)
    base = ["calibrate", "--model", str(m), "--data", str(tmp_path / "t.txt"), "--codec", "xpred-pca-q", "--param", "bits=3",
            "--max-batches", "2", "--seq-len", "128", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert main([*base, "--no-joint-heads", "--out", str(tmp_path / "r2")]) == 2  # one-line error: joint heads needed


def test_low_bit_preset_is_xpred_two_bits_and_one_flag_away(tmp_path):
    from kvsplice.api import PRESETS, recipe_configs
    from kvsplice.cli import main

    cfgs = recipe_configs("low-bit")
    assert set(cfgs) == {"k", "v"} and all(c.codec == "xpred-pca-q" and c.codec_params == {"bits": 2} and c.joint_heads for c in cfgs.values())
    assert PRESETS["low-bit"].sink == 1
    m = tmp_path / "m"
    make_tiny_llama().save_pretrained(m)
    make_byte_tokenizer().save_pretrained(m)
    (tmp_path / "t.txt").write_text(TEXT)
    rc = main(["calibrate", "--model", str(m), "--data", str(tmp_path / "t.txt"), "--preset", "low-bit", "--param", "bits=3",
               "--max-batches", "2", "--seq-len", "128", "--quiet", "--out", str(tmp_path / "r")])
    assert rc == 0 and (tmp_path / "r" / "v.safetensors").exists()


def test_exact_on_four_layers_batch_two_and_rows_decode_from_payloads_alone():
    """Three prediction links, GQA, batch 2: token by token == one forward (to float noise), and a
    fresh cache given only the stored payloads decodes exactly the rows attention read."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=260, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=512, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model, tok = LlamaForCausalLM(cfg).eval(), make_byte_tokenizer()
    geo = {t: fit_xpred_geometry(model, tok, TEXT, t, {"bits": 2.0}, windows=4, seq_len=128) for t in ("k", "v")}
    assert bool(geo["v"].codecs[(3, -1)].pred.abs().sum() > 0)
    make = lambda: CompressedCache.from_geometry(model, geo["v"], geo["k"], sink=1)  # noqa: E731
    ids = torch.cat([_ids(tok, 40), tok(TEXT[900:], return_tensors="pt").input_ids[:, :40]])  # (2, 40)
    one = _chunked(model, ids, make(), [40])
    steps = _chunked(model, ids, make(), [1] * 40)
    torch.testing.assert_close(steps, one, atol=1e-5, rtol=0)
    assert float((one - _chunked(model, ids, DynamicCache(), [40])).abs().max()) > 1e-3  # 2 bits does change the logits
    c = make()
    _chunked(model, ids, c, [40])
    read = [(layer.k_rows.read(), layer.v_rows.read()) for layer in c.layers]
    d = make()
    _chunked(model, ids[:, :1], d, [1])  # initialise, then give it only the payloads, sink rows and positions
    for src, dst in zip(c.layers, d.layers):
        for r in ("k_rows", "v_rows"):
            a, b = getattr(src, r), getattr(dst, r)
            b.payload, b.raw, b.head = {k: v.clone() for k, v in a.payload.items()}, a.raw.clone(), a.head.clone()
        dst.length = src.length
    d.tokens.positions, d.tokens.sink_rows = c.tokens.positions.clone(), c.tokens.sink_rows.clone()
    d.tokens.length, d.tokens.span = c.tokens.length, c.tokens.span
    for layer, (k, v) in zip(d.layers, read):
        assert torch.equal(layer.k_rows.read(), k) and torch.equal(layer.v_rows.read(), v)


def test_layer_zero_without_a_cache_is_a_clear_error(fitted):
    from kvsplice.cache import LayerCodec

    lc = LayerCodec.from_geometry(fitted[2][("v", 3.0)], 0)
    with pytest.raises(KVSpliceError, match="inside a CompressedCache"):
        lc.decode(lc.encode(torch.randn(1, 2, 3, 8)))
