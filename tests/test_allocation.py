"""Sensitivity-driven bit allocation (kvsplice/allocation.py): the knapsack solver against brute force,
refusals, the probe on a tiny random Llama (an exact codec does no damage, a 2-bit one does), and a
frontier run whose allocated setting spends no more payload than uniform pca-q at the same bits."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama, run_two_method_frontier

from kvsplice.allocation import check_allocation_params, probe_damage, solve
from kvsplice.cli import main
from kvsplice.errors import KVSpliceError

TEXT = "The quick brown fox jumps over the lazy dog. A cache holds keys and values. " * 30


def _brute(damage, cost, budget):
    items = sorted(damage)
    best = None
    for combo in itertools.product(*[sorted(damage[i]) for i in items]):
        c = sum(cost[i][b] for i, b in zip(items, combo))
        d = sum(damage[i][b] for i, b in zip(items, combo))
        if c <= budget + 1e-9 and (best is None or d < best):
            best = d
    return best


@pytest.mark.parametrize("seed", range(20))
def test_solver_is_near_the_brute_force_optimum_and_within_budget(seed):
    rng = random.Random(seed)
    levels = [1.0, 2.0, 3.0, 4.0]
    damage, cost = {}, {}
    for i in range(4):  # convex, decreasing damage per item, different sensitivities
        s = rng.uniform(0.1, 10.0)
        damage[i] = {b: s * 2.0 ** (-2 * b) for b in levels}
        cost[i] = {b: 8.0 * b for b in levels}
    budget = 8.0 * rng.choice([6, 8, 10, 12])
    choice = solve(damage, cost, budget)
    spent = sum(cost[i][choice[i]] for i in damage)
    got = sum(damage[i][choice[i]] for i in damage)
    assert spent <= budget + 1e-9
    assert got <= 1.05 * _brute(damage, cost, budget) + 1e-12  # Lagrangian + greedy: optimal on convex items


def test_solver_gives_the_sensitive_item_more_bits():
    levels = [1.0, 2.0, 3.0]
    damage = {"quiet": {b: 0.01 * 2.0 ** (-2 * b) for b in levels}, "loud": {b: 1.0 * 2.0 ** (-2 * b) for b in levels}}
    cost = {i: {b: b for b in levels} for i in damage}
    choice = solve(damage, cost, 4.0)
    assert choice == {"quiet": 1.0, "loud": 3.0}


def test_solver_refuses_a_budget_below_the_cheapest_choice():
    with pytest.raises(KVSpliceError, match="below the cheapest"):
        solve({0: {1.0: 1.0, 2.0: 0.5}}, {0: {1.0: 8.0, 2.0: 16.0}}, 4.0)


@pytest.mark.parametrize("bad, match", [
    ({"allocate": "magic"}, "allocate must be one of"),
    ({"levels": [2.0]}, "levels must be"),
    ({"levels": [1.0, "x"]}, "levels must be"),
    ({"probe_tokens": 3}, "probe_tokens"),
    ({"k_bits": 1.5}, "k_bits cannot"),
    ({"bits": 8.0}, "within levels"),
])
def test_bad_allocation_params_are_one_line_errors(bad, match):
    s = {"allocate": "sensitivity", "bits": 2.0, "levels": [1.0, 2.0, 4.0], **bad}
    with pytest.raises(KVSpliceError, match=match):
        check_allocation_params(s, "methods.x")


def test_probe_exact_codec_does_no_damage_and_a_two_bit_codec_does():
    from kvsplice.allocation import per_layer_codecs
    from kvsplice.calibrate import CalibrationConfig, calibrate
    torch.manual_seed(0)
    model, tok = make_tiny_llama().eval(), make_byte_tokenizer()
    ids = tok(TEXT, return_tensors="pt").input_ids[:, :64]
    geos = {}
    for name, params in (("identity", {}), ("pca-q", {"bits": 2.0})):
        cfg = CalibrationConfig(codec=name, rank=1, target="v", seq_len=64, max_batches=2, samples=400, joint_heads=True,
                                codec_params=params)
        geos[name] = calibrate(model, tok, TEXT, cfg, progress=False)
    cands = {"v": {8.0: per_layer_codecs(model, geos["identity"], "v"), 2.0: per_layer_codecs(model, geos["pca-q"], "v")}}
    dmg = probe_damage(model, ids, cands, sink=1)
    for layer in dmg["v"]:
        assert abs(layer[8.0]) < 1e-6
        assert layer[2.0] > 1e-5


def test_frontier_allocated_setting_spends_at_most_the_uniform_payload(tmp_path):
    pts = run_two_method_frontier(tmp_path, "pca-q-alloc", 'codec = "pca-q", target = "kv", joint_heads = true, sink = 1, '
                                  'allocate = "sensitivity", levels = [2.0, 3.0, 4.0], probe_tokens = 64')
    assert "alloc=sensitivity" in pts["pca-q-alloc"]["setting"]
    assert pts["pca-q-alloc"]["kv_bits_per_value"] <= pts["pca-q"]["kv_bits_per_value"] + 1e-9
    assert pts["pca-q-alloc"]["ppl"] > 1.0


def test_calibrate_recipe_with_allocation_round_trips_and_generates(tmp_path):
    import kvsplice
    from kvsplice.loading import model_id  # noqa: F401  (the recipe records the model id)

    torch.manual_seed(0)
    model, tok = make_tiny_llama().eval(), make_byte_tokenizer()
    recipe = kvsplice.calibrate_recipe(model, tok, TEXT, bits=3.0, allocate="sensitivity", levels=[2.0, 3.0, 4.0],
                                       max_batches=2, seq_len=128, samples=1500)
    alloc = json.loads(recipe.v.meta["allocation"])
    assert set(alloc["bits"]) <= {2.0, 3.0, 4.0}
    per_layer = {t: [geo.codecs[(l, -1)].bits for l in range(2)] for t, geo in (("k", recipe.k), ("v", recipe.v))}
    assert per_layer["v"] == alloc["bits"]
    spent = sum(geo.codecs[(l, -1)].payload_bytes_per_vector() for geo in (recipe.k, recipe.v) for l in range(2))
    assert spent <= 3.0 * 2 * 2 * 16 / 8  # <= uniform 3-bit payload: 2 targets x 2 layers x 16 values
    recipe.save(tmp_path / "r")
    again = kvsplice.Recipe.load(tmp_path / "r", model=model)
    assert [again.v.codecs[(l, -1)].bits for l in range(2)] == per_layer["v"]
    ids = tok("The cache", return_tensors="pt")
    out = model.generate(**ids, cache=again.cache(model), max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.input_ids.shape[1] + 5
    with pytest.raises(KVSpliceError, match="within levels"):
        kvsplice.calibrate_recipe(model, tok, TEXT, bits=5.0, allocate="sensitivity", levels=[2.0, 3.0, 4.0])


def test_calibrate_cli_allocate_writes_a_recipe_and_refuses_misuse(tmp_path, capsys):
    from test_cli_errors import one_line_error

    m = tmp_path / "m"
    make_tiny_llama().save_pretrained(m)
    make_byte_tokenizer().save_pretrained(m)
    text = tmp_path / "t.txt"
    text.write_text(TEXT)
    base = ["calibrate", "--model", str(m), "--data", str(text), "--max-batches", "2", "--seq-len", "128", "--quiet"]
    line = one_line_error(capsys, main([*base, "--allocate", "sensitivity", "--target", "v", "--out", str(tmp_path / "g.safetensors")]))
    assert "K+V recipe" in line
    line = one_line_error(capsys, main([*base, "--levels", "2", "3", "--out", str(tmp_path / "r0")]))
    assert "--allocate" in line
    line = one_line_error(capsys, main([*base, "--allocate", "sensitivity", "--param", "bits=7", "--out", str(tmp_path / "r0")]))
    assert "within levels" in line
    assert not (tmp_path / "r0").exists()  # refused before any work
    rc = main([*base, "--allocate", "sensitivity", "--param", "bits=3", "--levels", "2", "3", "4", "--out", str(tmp_path / "r")])
    assert rc == 0
    meta = json.loads((tmp_path / "r" / "recipe.json").read_text())
    assert meta and (tmp_path / "r" / "k.safetensors").exists()


@pytest.mark.parametrize("flags", [["--preset", "low-bit", "--allocate", "sensitivity"], ["--preset", "low-bit-alloc"]],
                         ids=["two-flags", "one-preset"])
def test_cli_low_bit_preset_with_allocation(tmp_path, flags):
    """The best live recipe at <= 2 bits, levers 1 + 2: `--preset low-bit-alloc` (= low-bit + --allocate)."""
    from kvsplice.geometry import load_geometry

    m = tmp_path / "m"
    make_tiny_llama().save_pretrained(m)
    make_byte_tokenizer().save_pretrained(m)
    (tmp_path / "t.txt").write_text(TEXT)
    rc = main(["calibrate", "--model", str(m), "--data", str(tmp_path / "t.txt"), *flags,
               "--param", "bits=3", "--levels", "2", "3", "6", "--max-batches", "3", "--seq-len", "128", "--quiet", "--out", str(tmp_path / "r")])
    assert rc == 0
    v = load_geometry(tmp_path / "r" / "v.safetensors")
    bits = json.loads(v.meta["allocation"])["bits"]
    assert [v.codecs[(l, -1)].name for l in range(2)] == ["xpred-pca-q"] * 2 and [v.codecs[(l, -1)].bits for l in range(2)] == bits


def test_calibrate_recipe_low_bit_alloc_preset_allocates(monkeypatch):
    """One call in Python: calibrate_recipe(preset="low-bit-alloc") routes to the allocated calibration."""
    import kvsplice
    from kvsplice import api

    seen = {}
    monkeypatch.setattr(api, "calibrate_allocated", lambda *a, **k: seen.update(k) or "recipe")
    model, tok = make_tiny_llama().eval(), make_byte_tokenizer()
    assert kvsplice.calibrate_recipe(model, tok, TEXT, preset="low-bit-alloc") == "recipe"
    assert seen["allocate"] == "sensitivity"
    assert api.PRESETS["low-bit-alloc"].codec == "xpred-pca-q" and api.PRESETS["low-bit"].allocate is None
