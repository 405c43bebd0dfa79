"""The inference ablation: config validation, the shipped TOML, and an end-to-end run on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from kvsplice.errors import KVSpliceError
from kvsplice.evaluate import validate_result
from kvsplice.evaluate.ablation import AblationConfig, AblationConfigError, RowSpec, run_ablation

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "A cache stores the keys and values of every past token so that decoding reads them instead of "
    "recomputing them. Compressing the values trades memory for reconstruction error. "
)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread is faster, and far faster on a shared, busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_shipped_config_equals_builtin_defaults():
    cfg = AblationConfig.from_toml(ROOT / "configs" / "smollm2-kv-ablation.toml")
    assert cfg == AblationConfig()
    names = [r.name for r in cfg.rows]
    assert names[:4] == ["V0", "V19", "V20", "V20-pca"]
    v20 = cfg.rows[2]
    assert (v20.codec, v20.rank, v20.keep_ratio) == ("spline-pca", 16, 0.382)
    assert {(r.codec, r.rank) for r in cfg.rows if not r.prunes and r.codec} == {
        (c, k) for c in ("pca", "spline-pca") for k in (16, 32, 48)
    }


@pytest.mark.parametrize(
    "patch, match",
    [
        ({"rowz": []}, "unknown key"),
        ({"rows": [{"name": "a", "codec": "pca"}]}, "both codec and rank"),
        ({"rows": [{"name": "a", "codec": "nope", "rank": 4}]}, "unknown codec"),
        ({"rows": [{"name": "a"}, {"name": "a"}]}, "unique"),
        ({"rows": [{"name": "a", "keep_ratio": 1.5}]}, "keep_ratio"),
        ({"protocol": {"prefill": 0}}, "prefill"),
        ({"protocol": {"chunks": 2}}, "unknown key"),
        ({"calibration": {"rank": 4}}, "come from each row"),
        ({"calibration": {"sample": 4}}, "unknown calibration option"),
        ({"dtype": "float8"}, "dtype"),
    ],
)
def test_config_validation(patch, match):
    with pytest.raises(AblationConfigError, match=match):
        AblationConfig.from_dict(patch)


def test_bad_toml_is_a_typed_error(tmp_path):
    p = tmp_path / "c.toml"
    p.write_text("rows = [[[")
    with pytest.raises(AblationConfigError, match="not valid TOML"):
        AblationConfig.from_toml(p)
    with pytest.raises(AblationConfigError, match="not found"):
        AblationConfig.from_toml(tmp_path / "missing.toml")


def tiny_config(tmp_path, **over):
    (tmp_path / "cal.txt").write_text(TEXT * 6)
    (tmp_path / "ev.txt").write_text(TEXT[::-1] * 6)
    d = {
        "model": "unused",
        "eval_data": [str(tmp_path / "ev.txt")],
        "calibration_data": [str(tmp_path / "cal.txt")],
        "geometry_dir": str(tmp_path / "geo"),
        "calibration": {"samples": 600, "max_batches": 4, "seq_len": 64, "fit_samples_per_dim": 50, "epochs": 2},
        "protocol": {"prefill": 48, "continue_tokens": 6, "segments": 2, "batch_size": 2, "tf_window": 64, "tf_windows": 2},
        "rows": [
            {"name": "V0"},
            {"name": "V19", "keep_ratio": 0.4, "recency": 4, "k_min": 4},
            {"name": "V20", "codec": "spline-pca", "rank": 2, "keep_ratio": 0.4, "recency": 4, "k_min": 4},
            {"name": "pca-2", "codec": "pca", "rank": 2},
            {"name": "spline-pca-2", "codec": "spline-pca", "rank": 2},
        ],
    }
    d.update(over)
    return AblationConfig.from_dict(d)


def test_ablation_end_to_end_on_tiny_model(tmp_path, tiny_llama):
    model, tok = tiny_llama
    cfg = tiny_config(tmp_path)
    logs = []
    res = run_ablation(cfg, model=model, tokenizer=tok, log=logs.append, progress=False)
    validate_result(res.result)
    r = res.result
    assert r["protocol"] == "prefill-continue" and r["tokens"] == 12
    assert r["config"] == json.loads(json.dumps(cfg.to_dict()))
    assert [x["name"] for x in r["rows"]] == ["V0", "V19", "V20", "pca-2", "spline-pca-2"]
    extra = r["extra_protocols"][0]
    assert extra["protocol"] == "teacher-forced" and extra["tokens"] == 126
    assert [x["name"] for x in extra["rows"]] == ["V0", "pca-2", "spline-pca-2"]  # no pruning rows
    by = {x.name: x for x in res.rows}
    L, H, D = 2, 2, 8
    full = 2 * L * H * D * 4
    assert by["V0"].kv_bytes_per_token == full and by["V0"].kv_reduction_pct == 0.0
    assert by["pca-2"].v_bytes_per_token == L * H * 2 * 4
    # pruning frees rows, compression shrinks what is kept: memory strictly decreases V0 > V19 > V20
    assert by["V0"].kv_bytes_per_token > by["V19"].kv_bytes_per_token > by["V20"].kv_bytes_per_token
    assert by["V19"].v_reduction_pct > 40 and by["V20"].v_reduction_pct > by["V19"].v_reduction_pct
    # both geometries were calibrated once and saved; a second run reuses them
    assert sorted(p.name for p in (tmp_path / "geo").iterdir()) == ["pca-k2.safetensors", "spline-pca-k2.safetensors"]
    assert sum("fitted" in m for m in logs) == 2
    logs.clear()
    res2 = run_ablation(cfg, model=model, tokenizer=tok, log=logs.append, progress=False)
    assert sum("reusing geometry" in m for m in logs) == 2 and not any("fitted" in m for m in logs)
    assert [x.ppl for x in res2.rows] == pytest.approx([x.ppl for x in res.rows], rel=1e-6)


def test_reused_geometry_must_match_the_row(tmp_path, tiny_llama):
    model, tok = tiny_llama
    cfg = tiny_config(tmp_path, rows=[{"name": "pca-2", "codec": "pca", "rank": 2}])
    run_ablation(cfg, model=model, tokenizer=tok, log=lambda m: None, progress=False)
    geo = str(tmp_path / "geo" / "pca-k2.safetensors")
    bad = tiny_config(tmp_path, geometry_dir=None, rows=[{"name": "x", "codec": "pca", "rank": 3, "geometry": geo}])
    with pytest.raises(KVSpliceError, match="expected codec 'pca' rank 3"):
        run_ablation(bad, model=model, tokenizer=tok, log=lambda m: None, progress=False)


def test_ablate_cli_writes_json_and_png(tmp_path, tiny_llama):
    from kvsplice.cli import main

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    cfg = tiny_config(tmp_path, model=str(tmp_path / "m"), rows=[{"name": "V0"}, {"name": "pca-2", "codec": "pca", "rank": 2}])
    lines = [f"model = {json.dumps(cfg.model)}", f"eval_data = {json.dumps(cfg.eval_data)}",
             f"calibration_data = {json.dumps(cfg.calibration_data)}", "[calibration]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in cfg.calibration.items()]
    lines += ["[protocol]"] + [f"{k} = {json.dumps(v)}" for k, v in vars(cfg.protocol).items()]
    lines += ['[[rows]]', 'name = "V0"', '[[rows]]', 'name = "pca-2"', 'codec = "pca"', "rank = 2"]
    (tmp_path / "c.toml").write_text("\n".join(lines) + "\n")
    out, png = tmp_path / "r" / "a.json", tmp_path / "r" / "a.png"
    assert main(["ablate", "--config", str(tmp_path / "c.toml"), "--json", str(out), "--plot", str(png), "--quiet"]) == 0
    res = json.loads(out.read_text())
    validate_result(res)
    assert [x["name"] for x in res["rows"]] == ["V0", "pca-2"]
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_rowspec_geometry_needs_codec():
    with pytest.raises(AblationConfigError, match="needs codec"):
        RowSpec("x", geometry="g.safetensors")
