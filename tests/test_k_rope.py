"""K coded AFTER RoPE (k_rope="post", the "fast" preset): calibration samples the keys the cache
receives, the geometry says so, the cache stores those rows as they are (no RoPE undone or redone),
and the coded-domain attention scores K from its codes and equals the decode path."""

from __future__ import annotations

import pytest
import torch

from kvsplice.api import PRESETS, calibrate_recipe, recipe_configs
from kvsplice.cache import CompressedCache
from kvsplice.calibrate import CalibrationConfig, collect_targets
from kvsplice.coded_attention import affine_groups, coded_attention, coded_supported
from kvsplice.errors import GeometryError, KVSpliceError
from kvsplice.kcodec import k_layer_codecs

TEXT = "The quick brown fox jumps over the lazy dog; pack my box with five dozen liquor jugs. " * 30


def test_post_rope_samples_are_the_keys_the_cache_receives(tiny_llama):
    from transformers import DynamicCache

    model, tok = tiny_llama
    cfg = CalibrationConfig(codec="pca-q", target="k", seq_len=64, max_batches=1, samples=10_000, k_rope="post")
    post = collect_targets(model, tok, TEXT, cfg, ("k",), progress=False)["k"]
    pre = collect_targets(model, tok, TEXT, CalibrationConfig(**{**cfg.to_dict(), "k_rope": "pre", "layers": None}),
                          ("k",), progress=False)["k"]
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :64]
    cache = DynamicCache()
    with torch.no_grad():
        model(ids, past_key_values=cache)
    for l in range(2):
        keys = cache.layers[l].keys[0].transpose(0, 1)  # (T, H, D)
        rows = {tuple(r.flatten().tolist()) for r in keys.round(decimals=5)}
        got = post.layers[l].round(decimals=5)  # (N, H, D) sampled rows
        assert all(tuple(r.flatten().tolist()) in rows for r in got)
        assert not torch.allclose(pre.layers[l], post.layers[l])  # RoPE makes them differ


def test_fast_preset_recipe_reads_k_from_its_codes_and_equals_the_decode_path(tiny_llama):
    model, tok = tiny_llama
    assert PRESETS["fast"].k_rope == "post" and recipe_configs("fast")["k"].k_rope == "post"
    recipe = calibrate_recipe(model, tok, TEXT, preset="fast", max_batches=2, seq_len=128)  # covers prompt + new tokens
    assert recipe.k.meta["k_rope"] == "post" and "k_rope" not in recipe.v.meta
    cache = recipe.cache(model)
    assert not any(getattr(l.k_codec, "position_aware", False) for l in cache.layers)  # stored as received
    assert all(affine_groups(l.k_codec) is not None for l in cache.layers)  # scored from the codes
    assert coded_supported(cache) is None
    ids = tok(TEXT[:100], return_tensors="pt").input_ids
    kw = dict(max_new_tokens=6, do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        ref = model.generate(ids, cache=recipe.cache(model), **kw)
        c = recipe.cache(model)
        with coded_attention(model, c):
            fast = model.generate(ids, cache=c, **kw)
    torch.testing.assert_close(torch.stack(fast.logits), torch.stack(ref.logits), rtol=1e-4, atol=1e-4)
    assert torch.equal(fast.sequences, ref.sequences)


def test_recipe_round_trip_keeps_k_rope(tiny_llama, tmp_path):
    from kvsplice.api import Recipe

    model, tok = tiny_llama
    recipe = calibrate_recipe(model, tok, TEXT, preset="fast", max_batches=1, seq_len=64)
    recipe.save(tmp_path / "r")
    again = Recipe.load(tmp_path / "r")
    assert again.k.meta["k_rope"] == "post"
    assert not any(getattr(c, "position_aware", False) for c in k_layer_codecs(model, again.k))


def test_bad_k_rope_values_are_refused(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(KVSpliceError, match="k_rope must be 'pre' or 'post'"):
        CalibrationConfig(k_rope="after")
    recipe = calibrate_recipe(model, tok, TEXT, max_batches=1, seq_len=64)
    assert recipe.k.meta.get("k_rope", "pre") == "pre"
    assert any(getattr(c, "position_aware", False) for c in k_layer_codecs(model, recipe.k))  # the default stays pre-RoPE
    recipe.k.meta["k_rope"] = "sideways"
    with pytest.raises(GeometryError, match="k_rope must be 'pre' or 'post'"):
        k_layer_codecs(model, recipe.k)
    with pytest.raises(KVSpliceError, match="xpred-pca-q codes K before RoPE"):
        calibrate_recipe(model, tok, TEXT, preset="low-bit", k_rope="post", max_batches=1, seq_len=64)


def test_suite_calibration_fits_post_rope_k_on_its_own_samples(tiny_llama):
    """The frontier / suite `Calibration`: params.k_rope = "post" gets a geometry fitted on post-RoPE K
    (meta says so), distinct from the pre-RoPE one; V is shared."""
    from types import SimpleNamespace

    from kvsplice.evaluate.frontier import Calibration

    model, tok = tiny_llama
    cal = Calibration(SimpleNamespace(calibration={"samples": 4000, "max_batches": 1, "seq_len": 64}, calibration_data=None),
                      model, tok, log=lambda m: None, progress=False)
    cal.text = TEXT
    s = {"codec": "pca-q", "bits": 4.0, "joint_heads": True}
    pre, post = cal.geometry(s, "k"), cal.geometry({**s, "k_rope": "post"}, "k")
    assert pre.meta.get("k_rope") == "pre" and post.meta["k_rope"] == "post"
    key = min(pre.codecs)
    assert key in post.codecs and not torch.equal(pre.codecs[key].mean, post.codecs[key].mean)
    assert cal.geometry({**s, "k_rope": "post"}, "v") is cal.geometry(s, "v")


def test_positions_past_the_calibration_are_refused_or_warned(tiny_llama):
    """K after RoPE calibrated on 64-token windows: a cache refuses position 64 and beyond (measured on
    SmolLM2: retrieval collapses past the calibrated positions), or warns once when asked to."""
    import warnings

    from kvsplice.errors import KVSpliceWarning

    model, tok = tiny_llama
    recipe = calibrate_recipe(model, tok, TEXT, preset="fast", max_batches=1, seq_len=64)
    assert recipe.k.meta["positions"] == "64"
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        model(ids[:, :64], cache=recipe.cache(model))  # positions 0..63: fine
        with pytest.raises(KVSpliceError, match="calibrated on positions < 64"):
            model(ids[:, :65], cache=recipe.cache(model))
        cache = CompressedCache.from_geometry(model, v_geometry=recipe.v, k_geometry=recipe.k, sink=1, beyond_calibration="warn")
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            model(ids[:, :65], cache=cache)
            model(ids[:, 65:66], cache=cache)
        assert sum(issubclass(w.category, KVSpliceWarning) and "positions < 64" in str(w.message) for w in got) == 2  # once per layer
    default = calibrate_recipe(model, tok, TEXT, max_batches=1, seq_len=64)  # K before RoPE: any position
    with torch.no_grad():
        model(ids[:, :100], cache=default.cache(model))


def test_fast_preset_calibrates_long_windows_capped_at_the_model_positions(tiny_llama):
    from kvsplice.api import preset_seq_len

    model, _ = tiny_llama
    assert PRESETS["fast"].seq_len == 4096 and PRESETS["best"].seq_len == 1024
    assert preset_seq_len("fast", model) == min(4096, model.config.max_position_embeddings)
    model.config.max_position_embeddings = 100_000
    assert preset_seq_len("fast", model) == 4096
