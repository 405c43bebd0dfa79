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


def test_model_id_mismatch_refused_unless_allowed(recipe, tiny_llama, tmp_path):
    model, _ = tiny_llama
    folder = recipe.save(tmp_path / "r")
    doc = json.loads((folder / "recipe.json").read_text())
    doc["model"] = "someone/other-model"
    (folder / "recipe.json").write_text(json.dumps(doc))
    with pytest.raises(GeometryError, match="other-model"):
        Recipe.load(folder, model=model)
    other = Recipe.load(folder)  # no model given: nothing to check yet ...
    with pytest.raises(GeometryError, match="allow_other_model"):
        other.cache(model)  # ... but the cache checks
    with pytest.warns(UserWarning, match="other-model"):
        allowed = Recipe.load(folder, model=model, allow_other_model=True)
    with pytest.warns(UserWarning):
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
    assert m.total_bytes < m.uncompressed_bytes / 6  # ~4 bits per value vs float32 (32 bits)
    ref = model.generate(**inputs, max_new_tokens=20, do_sample=False)
    # at 4 bits the greedy continuation starts as the uncompressed one does
    assert torch.equal(out[0, : inputs["input_ids"].shape[1] + 3], ref[0, : inputs["input_ids"].shape[1] + 3])
