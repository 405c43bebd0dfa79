"""`kvsplice frontier`: config validation, Pareto flags, and a --quick run on a tiny random Llama
(every method family) that must give valid JSON with a Pareto point per family and a PNG."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import make_byte_tokenizer, make_tiny_llama

from kvsplice.errors import KVSpliceError
from kvsplice.cli import main
from kvsplice.evaluate.frontier import (
    POINT_KEYS,
    FrontierConfig,
    FrontierConfigError,
    MethodSpec,
    pareto_flags,
    validate_frontier,
)

ROOT = Path(__file__).resolve().parents[1]

TINY_TOML = """
model = "{model}"
[calibration]
samples = 2000
max_batches = 2
seq_len = 128
epochs = 1
[protocol]
prefill = 200
continue_tokens = 50
segments = 2
batch_size = 2
tf_window = 128
tf_windows = 1

[[methods]]
name = "never-run-without-quick"
kind = "prune"
sweep = {{ keep_ratio = [0.5] }}

[quick]
protocol = {{ prefill = 48, continue_tokens = 16, chunk = 4 }}

[[quick.methods]]
name = "spline-pca-q"
kind = "codec"
sweep = {{ bits = [2.0, 4.0] }}
params = {{ codec = "spline-pca-q", target = "kv", joint_heads = true }}

[[quick.methods]]
name = "pca-q:K"
kind = "codec"
sweep = {{ bits = [3.0] }}
params = {{ codec = "pca-q", target = "k" }}

[[quick.methods]]
name = "uniform-int"
kind = "peer"
sweep = {{ bits = [8, 2] }}
params = {{ peer = "uniform-int" }}

[[quick.methods]]
name = "kivi"
kind = "peer"
sweep = {{ bits = [2, 4] }}
params = {{ peer = "kivi", group = 4, residual = 4, v_group = 4 }}

[[quick.methods]]
name = "hf-hqq"
kind = "peer"
sweep = {{ bits = [2] }}
params = {{ peer = "hf-quantized", backend = "hqq", group = 8, residual = 4 }}

[[quick.methods]]
name = "h2o"
kind = "peer"
sweep = {{ budget = [0.25, 0.5] }}
params = {{ peer = "h2o" }}

[[quick.methods]]
name = "streamingllm"
kind = "peer"
sweep = {{ budget = [0.25] }}
params = {{ peer = "streamingllm", sinks = 2 }}

[[quick.methods]]
name = "seed-vonly"
kind = "prune"
sweep = {{ keep_ratio = [0.382] }}

[[quick.methods]]
name = "seed-pca"
kind = "codec"
sweep = {{ k = [4] }}
params = {{ codec = "pca", target = "v" }}
"""


def test_pareto_flags_hand_example():
    pts = [(10.0, 5.0), (20.0, 4.0), (20.0, 6.0), (5.0, 9.0), (30.0, 4.0), (8.0, float("nan"))]
    assert pareto_flags(pts) == [True, True, False, True, False, False]


def test_toml_matches_builtin_grids():
    assert FrontierConfig.from_toml(ROOT / "configs" / "frontier.toml").to_dict() == FrontierConfig().to_dict()
    assert FrontierConfig.from_toml(ROOT / "configs" / "frontier.toml", quick=True).to_dict() == FrontierConfig.quick().to_dict()


@pytest.mark.parametrize(
    "table,match",
    [
        ({"name": "a", "kind": "zip", "sweep": {"bits": [2]}}, "kind"),
        ({"name": "a", "kind": "codec", "sweep": {"bits": [2], "k": [3]}, "params": {"codec": "pca-q"}}, "exactly one"),
        ({"name": "a", "kind": "codec", "sweep": {"bits": [2]}, "params": {"codec": "nope"}}, "params.codec"),
        ({"name": "a", "kind": "peer", "sweep": {"bits": [2]}, "params": {"peer": "kivi", "zz": 1}}, "unknown parameter"),
        ({"name": "a", "kind": "prune", "sweep": {"bits": [2]}}, "keep_ratio"),
    ],
)
def test_bad_method_tables(table, match):
    with pytest.raises(KVSpliceError, match=match):
        MethodSpec(**table)


def test_bad_config_keys():
    with pytest.raises(FrontierConfigError, match="unknown key"):
        FrontierConfig.from_dict({"modle": "x"})
    with pytest.raises(FrontierConfigError, match="must not set"):
        FrontierConfig.from_dict({"calibration": {"codec": "pca"}})
    with pytest.raises(FrontierConfigError, match="positive int"):
        FrontierConfig.from_dict({"protocol": {"chunk": 0}})


def test_frontier_quick_on_tiny_model(tmp_path, capsys):
    pytest.importorskip("hqq")
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    cfg = tmp_path / "frontier.toml"
    cfg.write_text(TINY_TOML.format(model=folder), encoding="utf-8")
    out_json, out_png = tmp_path / "f.json", tmp_path / "f.png"
    rc = main(["frontier", "--config", str(cfg), "--quick", "--json", str(out_json), "--plot", str(out_png), "--quiet", "--threads", "1"])
    assert rc == 0
    d = json.loads(out_json.read_text())
    validate_frontier(d)
    assert d["config"]["protocol"]["prefill"] == 48  # the [quick] table was applied
    methods = {q["method"] for q in d["points"]}
    expected = {"baseline", "spline-pca-q", "pca-q:K", "uniform-int", "kivi", "hf-hqq", "h2o", "streamingllm", "seed-vonly", "seed-pca"}
    assert methods == expected
    for m in expected:
        assert any(q["pareto"] for q in d["points"] if q["method"] == m), m
    for q in d["points"]:
        assert set(q) == set(POINT_KEYS) and q["ppl"] > 1.0 and q["kv_bytes_per_token"] > 0
        assert abs(q["kv_bits_per_value"] - 8 * q["kv_bytes_per_token"] / (2 * 2 * 2 * 8)) < 1e-9
    base = next(q for q in d["points"] if q["method"] == "baseline")
    assert base["kv_bits_per_value"] == 32.0  # float32 DynamicCache
    ours = {q["setting"]: q for q in d["points"] if q["method"] == "spline-pca-q"}
    # codes at exactly the budget, plus the per-token positions a pre-RoPE K codec needs (int32, once per
    # cache, not per layer: 4 B / 64 values = 0.5 bits/value on this tiny model, 0.003 on SmolLM2)
    positions = 8 * 4 / (2 * 2 * 2 * 8)
    assert ours["bits=2.0 KV joint"]["kv_bits_per_value"] == 2.0 + positions
    assert ours["bits=4.0 KV joint"]["kv_bits_per_value"] == 4.0 + positions
    tf_methods = {q["method"] for q in d["teacher_forced"]["points"]}
    assert tf_methods == {"baseline", "spline-pca-q", "pca-q:K", "uniform-int", "seed-pca"}  # exact settings only
    assert d["global_pareto"] and out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Pareto" in capsys.readouterr().out


def test_warp_sharing_equals_a_fresh_fit():
    import torch

    from kvsplice.calibrate import CalibrationConfig, fit_geometry
    from kvsplice.evaluate.frontier import fit_geometry_sharing_warp

    g = torch.Generator().manual_seed(0)
    vectors = {(0, -1): torch.randn(600, 16, generator=g) ** 3, (1, -1): torch.randn(600, 16, generator=g).exp()}

    def cfg(bits):
        return CalibrationConfig(codec="spline-pca-q", rank=1, fit_samples_per_dim=None, joint_heads=True,
                                 codec_params={"bits": bits, "warp_params": {"epochs": 1}})

    donor = fit_geometry(vectors, cfg(2.0), {"num_kv_heads": "1"})
    fresh = fit_geometry(vectors, cfg(4.0), {"num_kv_heads": "1"})
    shared = fit_geometry_sharing_warp(vectors, cfg(4.0), {"num_kv_heads": "1"}, donor)
    for key in vectors:
        a, b = fresh.codecs[key].state_tensors(), shared.codecs[key].state_tensors()
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
        x = vectors[key][:5]
        assert torch.equal(fresh.codecs[key].encode(x)["codes"], shared.codecs[key].encode(x)["codes"])


def test_bad_settings_fail_before_any_compute():
    with pytest.raises(KVSpliceError, match="budget"):
        MethodSpec("a", "peer", {"budget": [1.5]}, {"peer": "h2o"})
    with pytest.raises(KVSpliceError, match="budget is only defined"):
        MethodSpec("a", "peer", {"budget": [0.5]}, {"peer": "kivi"})
    with pytest.raises(KVSpliceError, match="unknown key"):
        MethodSpec("a", "prune", {"keep_ratio": [0.5]}, {"recent": 3})
    with pytest.raises(KVSpliceError, match="bits"):
        MethodSpec("a", "codec", {"bits": [0.0]}, {"codec": "pca-q"})


@pytest.mark.parametrize("path", sorted(Path(__file__).resolve().parents[1].glob("configs/frontier*.toml")))
def test_every_frontier_config_in_the_repo_is_valid(path):
    """The supplement configs quoted in docs/RESULTS.md must keep loading (validated up front)."""
    cfg = FrontierConfig.from_toml(path)
    assert cfg.methods and all(m.settings() for m in cfg.methods)


def test_frontier_grid_writes_every_finished_setting_and_keeps_them_on_interrupt(tmp_path, monkeypatch):
    """Issue 8 §3: a crash or Ctrl-C in the grid loses at most the setting in progress."""
    import kvsplice.evaluate.frontier as fr

    pytest.importorskip("hqq")
    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    cfg = tmp_path / "frontier.toml"
    cfg.write_text(TINY_TOML.format(model=folder), encoding="utf-8")
    out_json = tmp_path / "f.json"
    calls = {"n": 0}
    real = fr.perplexity_prefill_continue

    def flaky(*a, **k):  # the baseline + 3 settings finish, then Ctrl-C
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(fr, "perplexity_prefill_continue", flaky)
    rc = main(["frontier", "--config", str(cfg), "--quick", "--json", str(out_json), "--quiet", "--threads", "1"])
    assert rc == 130
    d = json.loads(out_json.read_text())
    validate_frontier(d)
    assert d["complete"] is False and len(d["points"]) == 4  # baseline + the 3 finished settings
