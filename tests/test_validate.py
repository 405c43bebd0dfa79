"""`kvsplice validate`: the JSON schema of issue 2 and the --data input forms (small sizes for speed)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from kvsplice.cli import main
from kvsplice.synthetic import make_synthetic


def check_schema(result: dict, ranks: list[int]) -> None:
    assert set(result) == {"rows", "n_train", "n_test", "seconds"}
    assert isinstance(result["n_train"], int) and isinstance(result["n_test"], int)
    assert isinstance(result["seconds"], float) and result["seconds"] > 0
    assert [r["k"] for r in result["rows"]] == ranks
    for r in result["rows"]:
        assert set(r) == {"k", "pca_mse", "spline_pca_mse", "delta_pct"}
        assert isinstance(r["k"], int) and all(isinstance(r[f], float) for f in ("pca_mse", "spline_pca_mse", "delta_pct"))
        assert r["delta_pct"] == pytest.approx(100 * (r["spline_pca_mse"] - r["pca_mse"]) / r["pca_mse"])


def test_synthetic_json(tmp_path, capsys):
    out = tmp_path / "res" / "v.json"
    rc = main(["validate", "--synthetic", "--ranks", "4,12", "--n-train", "3000", "--n-test", "600",
               "--epochs", "3", "--json", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    check_schema(result, [4, 12])
    assert result["n_train"] == 3000 and result["n_test"] == 600
    rows = result["rows"]
    assert rows[0]["pca_mse"] > rows[1]["pca_mse"] and rows[0]["spline_pca_mse"] > rows[1]["spline_pca_mse"]
    assert all(r["spline_pca_mse"] <= r["pca_mse"] for r in rows)
    text = capsys.readouterr().out
    assert "spline_pca_mse" in text and "3000 train / 600 test" in text


def test_data_file_forms(tmp_path, capsys):
    x = make_synthetic(n_train=1500, n_test=1, seed=4)[0][:, :16].contiguous()
    single = tmp_path / "one.safetensors"
    save_file({"vectors": x}, str(single))
    out = tmp_path / "one.json"
    assert main(["validate", "--data", str(single), "--ranks", "2,4", "--epochs", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    check_schema(result, [2, 4])
    assert result["n_train"] + result["n_test"] == 1500 and result["n_test"] == 300

    dump = tmp_path / "dump.safetensors"  # the calibrator's --dump-vectors layout: "v.<layer>.<head>"
    save_file({"v.0.0": x, "v.0.1": x * 2, "v.1.0": x[:800].clone()}, str(dump))
    out2 = tmp_path / "dump.json"
    assert main(["validate", "--data", str(dump), "--key", "v.0.*", "--ranks", "3", "--epochs", "1",
                 "--json", str(out2)]) == 0
    res2 = json.loads(out2.read_text())
    check_schema(res2, [3])
    assert res2["n_train"] == 2 * 1200
    text = capsys.readouterr().out
    assert "v.0.0:" in text and "v.0.1:" in text and "v.1.0" not in text and "mean over 2 tensors" in text


def test_data_file_errors(tmp_path, capsys):
    x = torch.randn(200, 8)
    dump = tmp_path / "dump.safetensors"
    save_file({"v.0.0": x, "v.0.1": x.clone()}, str(dump))
    assert main(["validate", "--data", str(dump)]) == 2  # several tensors, none named "vectors"
    assert "--key" in capsys.readouterr().err
    assert main(["validate", "--data", str(dump), "--key", "v.9.*"]) == 2
    assert "no tensor matches" in capsys.readouterr().err
    flat = tmp_path / "flat.safetensors"
    save_file({"vectors": torch.randn(10)}, str(flat))
    assert main(["validate", "--data", str(flat)]) == 2
    assert "(N, D)" in capsys.readouterr().err
    assert main(["validate", "--data", str(tmp_path / "nope.safetensors")]) == 2
    assert "cannot read" in capsys.readouterr().err
