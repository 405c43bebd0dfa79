"""Fail fast, lose nothing: every bad input is a one-line error (exit 2, no traceback) before any work;
outputs never overwrite inputs; non-finite logits stop eval / generate; finished rows survive Ctrl-C;
warnings for a geometry from another model and for too few calibration vectors.

CLI tests call `kvsplice.cli.main([...])` in-process on tiny offline models (tests/conftest.py)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from kvsplice.cli import main
from kvsplice.codecs import get_codec
from kvsplice.errors import KVSpliceWarning
from kvsplice.geometry import Geometry, load_geometry, save_geometry

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 20


def one_line_error(capsys, code: int, rc: int = 2) -> str:
    """Assert exit code `rc` and exactly one `error:` line on stderr, no traceback; return it."""
    assert code == rc
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [l for l in err.splitlines() if "error:" in l or "interrupted" in l]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def files(tmp_path, tiny_llama):
    """A saved tiny Llama folder, a text file, a V geometry for it (model id recorded in meta)."""
    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    g = torch.Generator().manual_seed(0)
    codecs = {(l, h): get_codec("pca", k=4).fit(torch.randn(200, 8, generator=g)) for l in range(2) for h in range(2)}
    geo = tmp_path / "g.safetensors"
    save_geometry(geo, Geometry(codecs, {"target": "v", "num_layers": "2", "model": str((tmp_path / "m").resolve())}))
    return tmp_path / "m", text, geo


# -- output paths ---------------------------------------------------------------------------------
def test_eval_json_onto_the_geometry_is_refused(files, capsys):
    m, text, geo = files
    before = geo.read_bytes()
    line = one_line_error(capsys, main(["eval", "--model", str(m), "--geometry", str(geo), "--json", str(geo)]))
    assert "--json" in line and "--geometry" in line
    assert geo.read_bytes() == before


def test_calibrate_out_onto_the_data_is_refused(files, capsys):
    m, text, _ = files
    before = text.read_text()
    for extra in (["--target", "v"], []):  # one geometry file; K+V recipe folder
        line = one_line_error(capsys, main(["calibrate", "--model", str(m), "--data", str(text), "--out", str(text), *extra]))
        assert "--data" in line
    assert text.read_text() == before


def test_two_outputs_on_one_file_are_refused(files, capsys):
    m, text, _ = files
    out = text.parent / "x.safetensors"
    line = one_line_error(capsys, main(["calibrate", "--model", str(m), "--data", str(text), "--target", "v",
                                        "--out", str(out), "--dump-vectors", str(text.parent / "." / "x.safetensors")]))
    assert "same file" in line and not out.exists()


def test_unwritable_output_fails_before_the_model_loads(files, capsys, monkeypatch):
    m, text, geo = files
    import kvsplice.loading

    monkeypatch.setattr(kvsplice.loading, "load_model", lambda *a, **k: pytest.fail("model loaded before the path check"))
    blocked = text / "sub" / "r.json"  # a folder under a regular file can never be created
    line = one_line_error(capsys, main(["eval", "--model", str(m), "--geometry", str(geo), "--json", str(blocked)]))
    assert "--json" in line
    line = one_line_error(capsys, main(["eval", "--model", str(m), "--geometry", str(geo), "--json", str(text.parent)]))
    assert "directory" in line


def test_validate_and_ablate_check_their_outputs(tmp_path, capsys, monkeypatch):
    from safetensors.torch import save_file

    import kvsplice.loading

    vec = tmp_path / "v.safetensors"
    save_file({"vectors": torch.randn(200, 8)}, str(vec))
    before = vec.read_bytes()
    argv = ["validate", "--data", str(vec), "--ranks", "2", "--epochs", "1"]  # a valid run (it used to overwrite)
    assert "--data" in one_line_error(capsys, main(argv + ["--json", str(vec)]))
    assert vec.read_bytes() == before
    monkeypatch.setattr(kvsplice.loading, "load_model", lambda *a, **k: pytest.fail("model loaded before the path check"))
    cfg = tmp_path / "c.toml"
    cfg.write_text('model = "unused"\n')
    assert "--config" in one_line_error(capsys, main(["ablate", "--config", str(cfg), "--json", str(cfg)]))
    line = one_line_error(capsys, main(["ablate", "--config", str(cfg), "--json", str(tmp_path / "a"), "--plot", str(tmp_path / "a")]))
    assert "same file" in line


# -- fail fast on flags ---------------------------------------------------------------------------
def test_bad_codec_parameters_fail_before_the_model_loads(files, capsys, monkeypatch):
    m, text, _ = files
    import kvsplice.loading

    monkeypatch.setattr(kvsplice.loading, "load_model", lambda *a, **k: pytest.fail("model loaded before the codec check"))
    base = ["calibrate", "--model", str(m), "--data", str(text), "--target", "v", "--out", str(text.parent / "o.safetensors")]
    assert "bits" in one_line_error(capsys, main(base + ["--codec", "pca-q", "--param", "bits=99"]))
    assert "JSON" in one_line_error(capsys, main(base + ["--codec", "pca-q", "--param", 'warp_params={"epochs": 2']))
    assert "JSON" in one_line_error(capsys, main(base + ["--codec", "pca-q", "--param", "bits=4.5.1"]))
    assert "rank" in one_line_error(capsys, main(base + ["--codec", "pca-q", "--rank", "8"]))


# -- one-line errors for bad inputs ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["./no/such/model", "models_typo/sub/dir", "/definitely/not/here/", "~/nope-kvsplice"])
def test_a_path_typo_as_model_is_a_one_line_error(files, capsys, name):
    _, text, geo = files
    line = one_line_error(capsys, main(["eval", "--model", name, "--geometry", str(geo), "--data", str(text)]))
    assert "no model folder" in line


def test_a_hub_id_while_offline_fails_in_seconds_without_downloading(files, capsys, monkeypatch):
    _, text, geo = files
    import kvsplice.loading

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    line = one_line_error(capsys, main(["eval", "--model", "kvsplice-test/no-such-model", "--geometry", str(geo), "--data", str(text)]))
    assert "HF_HUB_OFFLINE" in line
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(kvsplice.loading, "_hub_reachable", lambda timeout=3.0: False)  # no network
    line = one_line_error(capsys, main(["eval", "--model", "kvsplice-test/no-such-model", "--geometry", str(geo), "--data", str(text)]))
    assert "no network" in line


def test_empty_prompt_is_a_one_line_error(files, capsys):
    m, _, geo = files
    assert "--prompt" in one_line_error(capsys, main(["generate", "--model", str(m), "--geometry", str(geo), "--prompt", ""]))


def test_inf_in_a_slope_and_absurd_values_are_one_line_errors(files, capsys, tmp_path):
    from test_validation import rewrite  # a valid checksum over bad values

    m, text, _ = files
    g = torch.Generator().manual_seed(1)
    codecs = {(l, h): get_codec("spline-pca", k=4, epochs=1).fit(torch.randn(200, 8, generator=g)) for l in range(2) for h in range(2)}
    good = __import__("kvsplice.geometry", fromlist=["serialize"]).serialize(Geometry(codecs, {"target": "v", "num_layers": "2"}))

    def inf_slope(t, md):
        t["1.0.slopes"] = t["1.0.slopes"].clone()
        t["1.0.slopes"][3, 2] = float("inf")

    def absurd_mean(t, md):
        t["0.1.mean"] = t["0.1.mean"] + 1e20

    for edit, msg in ((inf_slope, "non-finite"), (absurd_mean, "|value| up to")):
        bad = tmp_path / "bad.safetensors"
        bad.write_bytes(rewrite(good, edit))
        for argv in (["eval", "--model", str(m), "--geometry", str(bad), "--data", str(text)],
                     ["generate", "--model", str(m), "--geometry", str(bad), "--prompt", "hi"]):
            assert msg in one_line_error(capsys, main(argv))


def test_keyboard_interrupt_is_one_line_exit_130(files, capsys, monkeypatch):
    m, text, geo = files
    import kvsplice.evaluate.perplexity as perplexity

    calls = []
    real = perplexity.evaluate

    def first_row_then_ctrl_c(*a, **k):
        calls.append(k.get("name"))
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(perplexity, "evaluate", first_row_then_ctrl_c)
    out = text.parent / "e.json"
    argv = ["eval", "--model", str(m), "--geometry", str(geo), "--data", str(text), "--tf-window", "64",
            "--max-windows", "1", "--sink", "0", "--json", str(out)]
    line = one_line_error(capsys, main(argv), rc=130)
    assert line.endswith("interrupted")
    saved = json.loads(out.read_text())  # the finished baseline row survived
    assert [r["name"] for r in saved["rows"]] == ["baseline"] and saved["complete"] is False


# -- non-finite logits ----------------------------------------------------------------------------
@pytest.fixture
def nan_model(tmp_path, tiny_llama):
    model, tok = tiny_llama
    with torch.no_grad():
        model.model.norm.weight.fill_(float("nan"))  # every logit NaN
    model.save_pretrained(tmp_path / "nan")
    tok.save_pretrained(tmp_path / "nan")
    return tmp_path / "nan"


def test_eval_with_nan_logits_exits_non_zero(nan_model, files, capsys):
    _, text, geo = files
    out = text.parent / "nan.json"
    rc = main(["eval", "--model", str(nan_model), "--geometry", str(geo), "--data", str(text), "--tf-window", "64",
               "--max-windows", "1", "--sink", "0", "--json", str(out), "--allow-other-model"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and not out.exists()
    assert [l for l in err.splitlines() if "error:" in l and "not finite" in l] and "ppl nan" not in err


def test_generate_with_nan_logits_exits_non_zero(nan_model, files, capsys):
    _, _, geo = files
    line = one_line_error(capsys, main(["generate", "--model", str(nan_model), "--geometry", str(geo), "--prompt", "hello",
                                        "--max-new-tokens", "3", "--no-compare", "--sink", "0", "--allow-other-model"]))
    assert "NaN" in line


# -- warnings -------------------------------------------------------------------------------------
def test_geometry_from_another_model_warns_and_the_flag_silences(files, capsys, tmp_path):
    m, _, geo = files
    g = load_geometry(geo)
    other = tmp_path / "other.safetensors"
    save_geometry(other, Geometry(g.codecs, dict(g.meta, model="HuggingFaceTB/SmolLM2-360M")))
    argv = ["generate", "--model", str(m), "--geometry", str(other), "--prompt", "hello", "--max-new-tokens", "2",
            "--no-compare", "--sink", "0"]
    assert main(argv) == 0
    warn = [l for l in capsys.readouterr().err.splitlines() if "warning:" in l]
    assert len(warn) == 1 and "SmolLM2-360M" in warn[0]
    assert main(argv + ["--allow-other-model"]) == 0
    assert "warning:" not in capsys.readouterr().err
    assert main(argv[:4] + [str(geo)] + argv[5:]) == 0  # same model: silent
    assert "warning:" not in capsys.readouterr().err
    with pytest.warns(KVSpliceWarning, match="SmolLM2-360M"):  # Python API
        load_geometry(other, model=str(m.resolve()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_geometry(other, model=str(m.resolve()), allow_other_model=True)


def test_few_calibration_vectors_warn():
    from kvsplice.calibrate import CalibrationConfig, fit_geometry

    cfg = CalibrationConfig(codec="pca-q", rank=4, fit_samples_per_dim=None)
    g = torch.Generator().manual_seed(0)
    with pytest.warns(KVSpliceWarning, match="only 10 vectors"):
        fit_geometry({(0, 0): torch.randn(10, 8, generator=g)}, cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit_geometry({(0, 0): torch.randn(400, 8, generator=g)}, cfg)


def test_no_baseline_delta_column_names_its_reference(files, capsys):
    m, text, geo = files
    argv = ["eval", "--model", str(m), "--geometry", str(geo), "--data", str(text), "--tf-window", "64",
            "--max-windows", "1", "--sink", "0", "--no-baseline"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Δppl % vs g" in out and "no DynamicCache baseline" in out


def test_ablate_keeps_finished_rows_when_interrupted(files, tmp_path, monkeypatch):
    from test_ablate import tiny_config

    import kvsplice.evaluate.ablation as ablation
    from kvsplice.commands.ablate import execute

    m, _, _ = files
    cfg = tiny_config(tmp_path, model=str(m), rows=[{"name": "V0"}, {"name": "pca-2", "codec": "pca", "rank": 2}])
    real, calls = ablation.perplexity_prefill_continue, []

    def second_row_ctrl_c(*a, **k):
        calls.append(k["name"])
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(ablation, "perplexity_prefill_continue", second_row_ctrl_c)
    out = tmp_path / "a.json"
    with pytest.raises(KeyboardInterrupt):
        execute(cfg, out, None, progress=False)
    saved = json.loads(out.read_text())
    assert [r["name"] for r in saved["rows"]] == ["V0"] and saved["complete"] is False
    assert [r["name"] for r in saved["extra_protocols"][0]["rows"]] == ["V0"]


@pytest.mark.parametrize("argv", [
    ["frontier", "--suite", "quick", "--json", "{x}", "--plot", "{x}"],
    ["frontier", "--quick", "--json", "{x}", "--plot", "{x}"],
    ["longctx", "--json", "{x}", "--plot", "{x}"],
    ["ablate-train", "--config", "configs/train-smoke.toml", "--json", "{x}", "--plot", "{x}"],
])
def test_remaining_verbs_refuse_one_file_for_two_outputs_before_work(argv, tmp_path, capsys):
    """Issue 8 §3: every verb checks its outputs before the model loads (frontier, longctx, ablate-train)."""
    from kvsplice.cli import main

    x = str(tmp_path / "same.json")
    rc = main([a.replace("{x}", x) for a in argv])
    err = [line for line in capsys.readouterr().err.splitlines() if ": error:" in line]  # library warnings aside
    assert rc == 2 and len(err) == 1 and "same.json" in err[0], err
    assert not (tmp_path / "same.json").exists()


def test_demo_refuses_an_existing_file_as_its_output_folder(tmp_path, capsys):
    from kvsplice.cli import main

    f = tmp_path / "a-file"
    f.write_text("keep me")
    rc = main(["demo", "--out", str(f)])
    err = [line for line in capsys.readouterr().err.splitlines() if ": error:" in line]
    assert rc == 2 and len(err) == 1, err
    assert f.read_text() == "keep me"
