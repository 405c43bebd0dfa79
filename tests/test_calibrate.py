"""Calibration: reservoir sampling, vector collection, codec fit -> Geometry, hooks, CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from kvsplice.calibrate import (
    CalibrationConfig,
    _Reservoir,
    calibrate,
    collect_layer_vectors,
    collect_vectors,
    save_vectors,
)
from kvsplice.errors import KVSpliceError
from kvsplice.models import get_adapter

TEXT = "The quick brown fox jumps over the lazy dog. " * 12  # 540 bytes = 540 tokens (byte tokenizer)


def _hook_count(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# ---- reservoir ------------------------------------------------------------------------------------


def _reference_reservoir(chunks: list[torch.Tensor], capacity: int, seed: int) -> torch.Tensor:
    """Sequential Algorithm R consuming the same random numbers as _Reservoir."""
    g = torch.Generator().manual_seed(seed)
    buf, seen = [], 0
    for x in chunks:
        start = min(max(capacity - seen, 0), x.shape[0])
        buf.extend(x[:start])
        seen += start
        m = x.shape[0] - start
        if m == 0:
            continue
        idx = torch.arange(seen, seen + m, dtype=torch.float64)
        r = torch.floor(torch.rand(idx.shape, dtype=torch.float64, generator=g) * (idx + 1)).long()
        for j in range(m):
            if r[j] < capacity:
                buf[r[j]] = x[start + j]
        seen += m
    return torch.stack(buf)


def test_reservoir_matches_sequential_algorithm_r_and_keeps_budget():
    stream = torch.arange(1000, dtype=torch.float32).view(-1, 1, 1).expand(-1, 2, 3)  # (1000, H=2, D=3)
    chunks = list(stream.split([7, 50, 1, 300, 642]))
    res = _Reservoir(64, seed=5)
    for c in chunks:
        res.add(c)
    out = res.result()
    assert out.shape == (64, 2, 3) and res.seen == 1000
    torch.testing.assert_close(out, _reference_reservoir(chunks, 64, 5), atol=0, rtol=0)
    assert len(set(out[:, 0, 0].tolist())) == 64  # no vector kept twice
    # deterministic; another seed gives another sample
    again = _Reservoir(64, seed=5)
    for c in chunks:
        again.add(c)
    assert torch.equal(again.result(), out)
    other = _Reservoir(64, seed=6)
    other.add(stream)
    assert not torch.equal(other.result(), out)


def test_reservoir_short_stream_keeps_everything_in_order():
    res = _Reservoir(100, seed=0)
    x = torch.randn(30, 1, 4)
    res.add(x[:10])
    res.add(x[10:])
    torch.testing.assert_close(res.result(), x, atol=0, rtol=0)


def test_reservoir_is_uniform():
    N, cap, runs = 400, 40, 300
    counts = torch.zeros(N)
    stream = torch.arange(N, dtype=torch.float32).view(-1, 1, 1)
    for seed in range(runs):
        res = _Reservoir(cap, seed=seed)
        for c in stream.split(37):
            res.add(c)
        counts[res.result().view(-1).long()] += 1
    # each item is kept with probability cap/N = 0.1 -> 30 times expected in 300 runs
    per_quarter = counts.view(4, -1).sum(1)  # 100 items each: expected 3000, sd ~ 52
    assert ((per_quarter - 3000).abs() < 300).all(), per_quarter
    assert counts.sum() == cap * runs


# ---- collection -----------------------------------------------------------------------------------


def test_collect_keeps_every_token_in_order_when_budget_allows(tiny_llama):
    model, tok = tiny_llama
    cfg = CalibrationConfig(codec="pca", rank=4, samples=10_000, seq_len=128)
    col = collect_layer_vectors(model, tok, TEXT, cfg, progress=False)
    assert col.tokens == 4 * 128 and col.windows == 4 and sorted(col.layers) == [0, 1]
    ad = get_adapter(model)
    ids = torch.tensor(tok(TEXT, add_special_tokens=False)["input_ids"][: 4 * 128]).view(4, 128)
    with ad.capture("v") as cap, torch.no_grad():
        model(ids)
    for layer in (0, 1):
        want = cap.records[layer][0].permute(0, 2, 1, 3).reshape(-1, 2, 8)  # (B*T, H, D)
        torch.testing.assert_close(col.layers[layer], want, atol=0, rtol=0)
    vec = collect_vectors(model, tok, TEXT, cfg, progress=False)
    assert sorted(vec) == [(0, 0), (0, 1), (1, 0), (1, 1)] and vec[(1, 1)].shape == (512, 8)
    joint = collect_vectors(model, tok, TEXT, CalibrationConfig(codec="pca", seq_len=128, joint_heads=True), progress=False)
    assert sorted(joint) == [(0, -1), (1, -1)]
    torch.testing.assert_close(joint[(1, -1)], torch.cat([vec[(1, 0)], vec[(1, 1)]], dim=1), atol=0, rtol=0)


def test_collect_budget_max_batches_layers_and_k(tiny_gpt2):
    model, tok = tiny_gpt2
    cfg = CalibrationConfig(codec="pca", samples=400, seq_len=64, max_batches=3, batch_size=2, layers=(1,), target="k")
    col = collect_layer_vectors(model, tok, TEXT, cfg, progress=False)
    assert col.tokens == 3 * 2 * 64 and col.windows == 3
    assert list(col.layers) == [1] and col.layers[1].shape == (100, 4, 8)  # 400 head-vectors / 4 heads
    assert _hook_count(model) == 0
    with pytest.raises(KVSpliceError, match="samples"):
        collect_layer_vectors(model, tok, TEXT, CalibrationConfig(samples=3), progress=False)


def test_hooks_removed_when_calibration_raises(tiny_gpt2, monkeypatch):
    model, tok = tiny_gpt2

    def boom(*a, **k):
        raise RuntimeError("mlp exploded")

    monkeypatch.setattr(model.transformer.h[0].mlp, "forward", boom)  # after layer 0's hook fired
    with pytest.raises(RuntimeError, match="mlp exploded"):
        calibrate(model, tok, TEXT, CalibrationConfig(codec="pca", rank=2, seq_len=64), progress=False)
    assert _hook_count(model) == 0
    monkeypatch.undo()
    with pytest.raises(KVSpliceError, match="unknown codec"):
        calibrate(model, tok, TEXT, CalibrationConfig(codec="nope", seq_len=64), progress=False)
    assert _hook_count(model) == 0
    model(torch.tensor([[5, 6]]))  # still a working model


# ---- fit + geometry ------------------------------------------------------------------------------


def test_calibrate_returns_geometry_with_meta(tiny_llama):
    from kvsplice.geometry import Geometry

    model, tok = tiny_llama
    cfg = CalibrationConfig(codec="pca", rank=3, samples=1000, fit_samples_per_dim=50, seq_len=128)
    geo = calibrate(model, tok, TEXT, cfg, description="test text", progress=False)
    assert isinstance(geo, Geometry)
    assert sorted(geo.codecs) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert all(c.latent_dim == 3 and c.dim == 8 for c in geo.codecs.values())
    m = geo.meta
    assert m["model"] == "llama-unnamed" and m["target"] == "v" and m["calibration"] == "test text"
    assert (m["num_layers"], m["num_kv_heads"], m["head_dim"], m["tokens"]) == ("2", "2", "8", "512")
    assert m["vectors_per_head"] == "500" and m["fit_vectors_per_codec"] == "150"  # 50 per latent dim * 3
    assert json.loads(m["codec_params"]) == {"k": 3}
    assert json.loads(m["calibration_config"])["samples"] == 1000
    geo.check_compatible(2, 2, 8)
    # the fitted PCA reconstructs its layer's V better than the mean alone
    x = collect_vectors(model, tok, TEXT, cfg, progress=False)[(1, 0)]
    c = geo.codec_for(1, 0)
    err = (c.decompress(c.compress(x)) - x).pow(2).mean()
    assert err < (x - x.mean(0)).pow(2).mean()


def test_joint_geometry_and_spline_pca_params(tiny_gpt2):
    model, tok = tiny_gpt2
    geo = calibrate(model, tok, TEXT, CalibrationConfig(codec="pca", rank=5, seq_len=128, joint_heads=True), progress=False)
    assert sorted(geo.codecs) == [(0, -1), (1, -1)] and geo.codec_for(0, -1).dim == 32
    kw = CalibrationConfig(codec="spline-pca", rank=4, knots=5, epochs=2, seed=3).codec_kwargs()
    assert kw == {"k": 4, "knots": 5, "epochs": 2, "seed": 3}


def test_calibration_is_deterministic_to_the_byte(tiny_gpt2):
    from kvsplice.calibrate import run_calibration
    from kvsplice.geometry import serialize

    model, tok = tiny_gpt2
    cfg = CalibrationConfig(codec="spline-pca", rank=3, epochs=2, samples=600, fit_samples_per_dim=40,
                            seq_len=64, layers=(1,))
    a = run_calibration(model, tok, TEXT, cfg, progress=False)
    b = run_calibration(model, tok, TEXT, cfg, progress=False)
    assert serialize(a.geometry) == serialize(b.geometry)
    assert sorted(a.fit_seconds) == [(1, 0), (1, 1), (1, 2), (1, 3)] and a.collect_seconds > 0
    c = run_calibration(model, tok, TEXT, CalibrationConfig(**{**cfg.to_dict(), "seed": 1}), progress=False)
    assert serialize(c.geometry) != serialize(a.geometry)


def test_config_validation():
    with pytest.raises(KVSpliceError, match="rank"):
        CalibrationConfig(rank=0)
    with pytest.raises(KVSpliceError, match="target"):
        CalibrationConfig(target="q")
    with pytest.raises(KVSpliceError, match="max_batches"):
        CalibrationConfig(max_batches=0)
    with pytest.raises(KVSpliceError, match="layers"):
        CalibrationConfig(layers=(-1,))
    with pytest.raises(KVSpliceError, match="unknown calibration option"):
        CalibrationConfig.from_dict({"rank": 4, "ranks": 5})
    assert CalibrationConfig.from_dict({"rank": 4, "layers": [3, 1, 3]}).layers == (1, 3)


def test_dump_vectors_roundtrip(tiny_llama, tmp_path):
    from safetensors import safe_open

    model, tok = tiny_llama
    cfg = CalibrationConfig(codec="pca", rank=2, samples=300, seq_len=64)
    col = collect_layer_vectors(model, tok, TEXT, cfg, progress=False)
    path = tmp_path / "sub" / "vectors.safetensors"
    save_vectors(path, col, meta={"model": "tiny"})
    with safe_open(str(path), "pt") as f:
        assert sorted(f.keys()) == ["v.0.0", "v.0.1", "v.1.0", "v.1.1"]
        assert f.metadata()["model"] == "tiny" and f.metadata()["tokens"] == str(col.tokens)
        torch.testing.assert_close(f.get_tensor("v.1.1"), col.layers[1][:, 1], atol=0, rtol=0)
        assert f.get_tensor("v.0.0").dtype == torch.float32 and f.get_tensor("v.0.0").shape == (150, 8)
    assert [p.name for p in path.parent.iterdir()] == ["vectors.safetensors"]  # no temp file left


def test_cli_calibrate_on_local_model(tiny_llama, tmp_path, capsys):
    from kvsplice.commands import calibrate as cmd
    from kvsplice.geometry import load_geometry

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    parser = argparse.ArgumentParser()
    cmd.add_parser(parser.add_subparsers())
    out, vec = tmp_path / "g.safetensors", tmp_path / "v.safetensors"
    args = parser.parse_args(
        ["calibrate", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--codec", "pca",
         "--rank", "2", "--target", "v", "--seq-len", "64", "--max-batches", "2", "--layers", "1", "--quiet",
         "--out", str(out), "--dump-vectors", str(vec)]
    )
    assert args.func(args) == 0
    geo = load_geometry(out)
    assert geo.layers == [1] and geo.meta["tokens"] == "128" and "t.txt" in geo.meta["calibration"]
    assert vec.is_file() and "pca" in capsys.readouterr().out


@pytest.mark.real
def test_real_smollm2_calibrates_two_layers():
    from kvsplice.loading import load_model

    model, tok = load_model("smollm2-135m")
    from kvsplice import data

    cfg = CalibrationConfig(codec="spline-pca", rank=8, epochs=1, samples=1500, fit_samples_per_dim=50,
                            seq_len=256, max_batches=2, layers=(0, 15))
    geo = calibrate(model, tok, data.calibration_text(), cfg, description="pydoc test", progress=False)
    assert sorted(geo.codecs) == [(0, 0), (0, 1), (0, 2), (15, 0), (15, 1), (15, 2)]
    assert geo.meta["model"] == "smollm2-135m" and geo.meta["tokens"] == "512"
    assert geo.meta["vectors_per_head"] == "500" and geo.meta["fit_vectors_per_codec"] == "400"
    assert all(c.dim == 64 and c.latent_dim == 8 for c in geo.codecs.values())
    assert _hook_count(model) == 0


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_one_pass_for_k_and_v_equals_one_pass_each(fixture, request):
    """collect_targets(("k", "v")) runs the text once; the samples equal two single-target passes
    (same reservoir seeds, same stream), with a budget that forces replacement."""
    from kvsplice.calibrate import collect_targets

    model, tok = request.getfixturevalue(fixture)
    cfg = CalibrationConfig(samples=60, seq_len=32, max_batches=3, batch_size=2, seed=3)
    both = collect_targets(model, tok, TEXT, cfg, ("k", "v"), progress=False)
    for t in ("k", "v"):
        single = collect_layer_vectors(model, tok, TEXT, CalibrationConfig(**{**cfg.to_dict(), "target": t, "layers": None}), progress=False)
        assert both[t].target == t and both[t].tokens == single.tokens
        for l, x in single.layers.items():
            assert torch.equal(both[t].layers[l], x)
    with pytest.raises(KVSpliceError, match="targets"):
        collect_targets(model, tok, TEXT, cfg, ("k", "k"), progress=False)
