"""The one-call API (kvsplice/api.py): calibrate_recipe -> Recipe, Recipe.save / load (folder or Hub
repo id through a mocked snapshot_download: nothing is downloaded), model id check, cache factory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import kvsplice
from kvsplice.api import PRESETS, Recipe, recipe_configs
from kvsplice.errors import GeometryError, KVSpliceError

TEXT = "The quick brown fox jumps over the lazy dog. A cache holds keys and values. " * 30


@pytest.fixture
def recipe(tiny_llama):
    model, tok = tiny_llama
    return kvsplice.calibrate_recipe(model, tok, TEXT, bits=3, seq_len=64, max_batches=3)


def test_calibrate_recipe_best_is_k_and_v_joint_pca_q_with_sink(recipe, tiny_llama):
    model, tok = tiny_llama
    assert recipe.sink == PRESETS["best"].sink == 1
    for target, geo in (("k", recipe.k), ("v", recipe.v)):
        assert geo.meta["target"] == target and geo.codec_name == "pca-q" and geo.meta["joint_heads"] == "true"
        assert json.loads(geo.meta["codec_params"])["bits"] == 3
    assert "pca-q 3-bit, joint heads, K+V, sink 1" in recipe.describe()
    # a factory: every call a fresh, empty cache that codes K and V
    ids = tok("hello cache world", return_tensors="pt")["input_ids"]
    caches = [recipe.cache(model), recipe.cache(model)]
    assert caches[0] is not caches[1]
    with torch.no_grad():
        out = model.generate(input_ids=ids, cache=caches[0], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape[1] == ids.shape[1] + 4
    m = caches[0].memory()
    assert 0 < m.total_bytes < m.uncompressed_bytes and caches[1].memory().tokens == 0


def test_seed_preset_is_spline_pca_rank_16_v_only():
    cfgs = recipe_configs("seed")
    assert set(cfgs) == {"v"} and cfgs["v"].codec == "spline-pca" and cfgs["v"].rank == 16
    assert not cfgs["v"].joint_heads and PRESETS["seed"].sink == 0


def test_rank_or_bits_for_a_codec_without_them_is_an_error():
    with pytest.raises(KVSpliceError, match="no rank"):
        recipe_configs("best", rank=16)  # pca-q codes every dimension: a rank would be ignored
    with pytest.raises(KVSpliceError, match="no bits"):
        recipe_configs("seed", bits=4)
    with pytest.raises(KVSpliceError, match="unknown preset"):
        recipe_configs("fastest")
    with pytest.raises(KVSpliceError, match="targets"):
        recipe_configs("best", targets=("q",))


def test_save_load_round_trip_is_one_folder(recipe, tiny_llama, tmp_path):
    model, _ = tiny_llama
    folder = recipe.save(tmp_path / "r")
    assert sorted(p.name for p in folder.iterdir()) == ["k.safetensors", "recipe.json", "v.safetensors"]
    back = Recipe.load(folder, model=model)
    assert back.sink == 1 and back.model == recipe.model
    x = torch.randn(5, recipe.v.codecs[(0, -1)].dim, generator=torch.Generator().manual_seed(0))
    for a, b in ((recipe.v, back.v), (recipe.k, back.k)):
        ca, cb = a.codecs[(0, -1)], b.codecs[(0, -1)]
        assert torch.equal(ca.decompress(ca.compress(x)), cb.decompress(cb.compress(x)))


def test_load_refuses_tampered_or_foreign_folders(recipe, tmp_path):
    folder = recipe.save(tmp_path / "r")
    shutil.copy(folder / "v.safetensors", folder / "k.safetensors")  # a V geometry in the K slot
    with pytest.raises(GeometryError, match="SHA-256"):
        Recipe.load(folder)
    with pytest.raises(GeometryError, match="not a recipe folder"):
        Recipe.load(tmp_path)
    (tmp_path / "f.json").write_text("{}")
    with pytest.raises(GeometryError, match="is a file"):
        Recipe.load(tmp_path / "f.json")
    with pytest.raises(GeometryError, match="neither"):
        Recipe.load(str(tmp_path / "missing"))
    doc = json.loads((folder / "recipe.json").read_text())
    doc["sink"] = -1
    (folder / "recipe.json").write_text(json.dumps(doc))
    with pytest.raises(GeometryError, match="sink"):
        Recipe.load(folder)


def test_model_id_mismatch_warns_unless_allowed(recipe, tiny_llama, tmp_path):
    """Issue 8: a recipe (like a geometry) calibrated on another model is used with a warning; the flag silences it."""
    import warnings

    from kvsplice.errors import KVSpliceWarning

    model, _ = tiny_llama
    folder = recipe.save(tmp_path / "r")
    doc = json.loads((folder / "recipe.json").read_text())
    doc["model"] = "someone/other-model"
    (folder / "recipe.json").write_text(json.dumps(doc))
    with pytest.warns(KVSpliceWarning, match="other-model"):
        Recipe.load(folder, model=model)
    other = Recipe.load(folder)  # no model given: nothing to check yet ...
    with pytest.warns(KVSpliceWarning, match="allow_other_model"):
        other.cache(model)  # ... but the cache checks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        allowed = Recipe.load(folder, model=model, allow_other_model=True)
        assert allowed.cache(model) is not None


def test_load_from_hub_id_uses_snapshot_download(recipe, tmp_path, monkeypatch):
    """A repo id goes through huggingface_hub.snapshot_download (mocked: returns a local folder)."""
    import huggingface_hub

    folder = recipe.save(tmp_path / "snap")
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, **kw):
        calls.append((repo_id, revision, sorted(allow_patterns)))
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    back = Recipe.load("someone/smollm2-kv-recipe", revision="abc123")
    assert calls == [("someone/smollm2-kv-recipe", "abc123", ["k.safetensors", "recipe.json", "v.safetensors"])]
    assert back.sink == recipe.sink and back.k is not None and back.v is not None

    def offline(repo_id, **kw):
        raise OSError("We couldn't connect to the Hub\nmore lines")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(GeometryError, match="couldn't connect") as e:
        Recipe.load("someone/missing")
    assert "\n" not in str(e.value)


def test_recipe_refuses_swapped_geometries(recipe):
    with pytest.raises(GeometryError, match="target"):
        Recipe(v=recipe.k, k=recipe.v)
    with pytest.raises(KVSpliceError, match="neither"):
        Recipe()


def _saved_model(tiny_llama, tmp_path):
    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    return ["--model", str(tmp_path / "m"), "--data", str(tmp_path / "t.txt"), "--device", "cpu"]


def test_cli_default_calibrate_writes_one_recipe_that_eval_and_generate_read(tiny_llama, tmp_path, capsys):
    from kvsplice.cli import main

    common = _saved_model(tiny_llama, tmp_path)
    out = tmp_path / "recipe"
    assert main(["calibrate", *common, "--seq-len", "64", "--max-batches", "3", "--quiet", "--out", str(out)]) == 0
    back = Recipe.load(out)
    assert back.sink == 1 and back.k.codec_name == back.v.codec_name == "pca-q"
    assert json.loads(back.v.meta["codec_params"])["bits"] == 4 and back.v.meta["joint_heads"] == "true"
    capsys.readouterr()
    res = tmp_path / "e.json"
    assert main(["eval", *common[:2], "--recipe", str(out), "--protocol", "teacher-forced", "--tf-window", "64",
                 "--max-windows", "2", "--data", str(tmp_path / "t.txt"), "--json", str(res)]) == 0
    rows = {r["name"]: r for r in json.loads(res.read_text())["rows"]}
    assert set(rows) == {"baseline", "recipe:recipe"}
    assert rows["recipe:recipe"]["kv_bytes_per_token"] < rows["baseline"]["kv_bytes_per_token"] / 4
    capsys.readouterr()
    assert main(["generate", *common[:2], "--recipe", str(out), "--prompt", "hello cache " * 4, "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err
    speed = next(line for line in err.splitlines() if line.startswith("[speed]"))
    assert "tokens/s" in speed and "DynamicCache" in speed and "identical" in speed
    assert "vs 16-bit" in next(line for line in err.splitlines() if line.startswith("[cache]"))
    assert main(["generate", *common[:2], "--recipe", str(out), "--prompt", "hi there", "--max-new-tokens", "3",
                 "--no-compare"]) == 0
    assert "DynamicCache" not in capsys.readouterr().err
    # nothing given: the best recipe is calibrated first (the default path is the best recipe)
    assert main(["generate", *common[:2], "--prompt", "hi there", "--max-new-tokens", "2", "--calib-batches", "1",
                 "--no-compare"]) == 0
    assert "calibrated pca-q 4-bit, joint heads, K+V, sink 1" in capsys.readouterr().err


def test_cli_calibrate_refusals_before_the_model_loads(tiny_llama, tmp_path, capsys):
    from kvsplice.cli import main

    common = _saved_model(tiny_llama, tmp_path)
    common[1] = str(tmp_path / "no-such-model")  # any refusal below must come before the load
    assert main(["calibrate", *common, "--rank", "16", "--out", str(tmp_path / "r")]) == 2  # pca-q has no rank
    assert "no rank" in capsys.readouterr().err
    assert main(["calibrate", *common, "--out", str(tmp_path / "r.safetensors")]) == 2  # K+V is a folder
    assert "FOLDER" in capsys.readouterr().err
    assert main(["calibrate", *common, "--target", "v", "--sink", "1", "--out", str(tmp_path / "g.safetensors")]) == 2
    assert main(["generate", *common[:2], "--device", "cuda:7" if not torch.cuda.is_available() else "nosuchdevice",
                 "--prompt", "x"]) == 2
    assert "--device" in capsys.readouterr().err


def test_cli_seed_preset_is_one_flag_away(tiny_llama, tmp_path):
    from kvsplice.cli import main
    from kvsplice.geometry import load_geometry

    common = _saved_model(tiny_llama, tmp_path)
    out = tmp_path / "seed.safetensors"  # rank 4: the tiny model's head_dim is 8 (the preset's 16 is tested above)
    assert main(["calibrate", *common, "--preset", "seed", "--rank", "4", "--epochs", "1", "--layers", "0", "--seq-len", "64",
                 "--max-batches", "2", "--quiet", "--out", str(out)]) == 0
    geo = load_geometry(out)
    assert geo.codec_name == "spline-pca" and geo.rank == 4 and geo.meta["target"] == "v"
    assert geo.meta["joint_heads"] == "false"


def test_demo_cli_tiny(tiny_llama, tmp_path, capsys):
    """`kvsplice demo` end to end on a tiny model: table with Δppl and its CI, bytes, tokens/s, a
    sample, demo.json and a loadable recipe folder."""
    from kvsplice.cli import main

    common = _saved_model(tiny_llama, tmp_path)
    out = tmp_path / "demo"
    assert main(["demo", *common[:2], "--device", "cpu", "--calib-batches", "1", "--windows", "2", "--window", "128",
                 "--new-tokens", "3", "--no-seed", "--quiet", "--out", str(out)]) == 0
    res = json.loads((out / "demo.json").read_text())
    base, ours = res["rows"]
    assert base["delta_pct"] is None and ours["ci95"][0] <= ours["delta_pct"] <= ours["ci95"][1]
    assert ours["kv_bytes_per_token"] < base["kv_bytes_per_token"] / 4 and ours["tokens_per_s"] > 0
    assert abs(base["vs_16bit_pct"] - 200.0) < 1e-6  # float32 is twice a 16-bit cache
    assert Recipe.load(out / "recipe").sink == 1
    printed = capsys.readouterr().out
    assert "95 % CI" in printed and "sample through the best recipe" in printed


@pytest.mark.real
def test_readme_library_snippet_real_model():
    """The README's library snippet, as printed there (small calibration: ~20 s on 2 cores)."""
    import kvsplice
    from kvsplice.loading import load_model

    model, tok = load_model("smollm2-135m")
    recipe = kvsplice.calibrate_recipe(model, tok, max_batches=2)  # pca-q 4-bit, joint heads, K+V, sink 1
    print(recipe.describe())
    inputs = tok("The KV cache", return_tensors="pt")
    cache = recipe.cache(model)  # a fresh cache per generate() call
    out = model.generate(**inputs, cache=cache, max_new_tokens=20, do_sample=False)
    print(tok.decode(out[0], skip_special_tokens=True))
    print(cache.memory())  # bytes held (K + V, all overheads) vs an uncompressed cache

    m = cache.memory()
    assert m.total_bytes < m.uncompressed_bytes / 4  # ~4 bits per value vs float32, plus the exact sink row
    ref = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    # at 4 bits the greedy continuation starts as the uncompressed one does
    assert torch.equal(out[0, : inputs["input_ids"].shape[1] + 3], ref[0, : inputs["input_ids"].shape[1] + 3])
