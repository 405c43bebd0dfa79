"""Paired block bootstrap: known-answer cases on synthetic per-token NLL."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kvsplice.evaluate.stats import StatsError, compare, paired_block_bootstrap, spread, verdict


def _ar1(n: int, seed: int, rho: float = 0.8) -> np.ndarray:
    """Correlated per-token losses (AR(1) around 2.0), like real NLL streams."""
    rng = np.random.default_rng(seed)
    e = rng.normal(size=n)
    x = np.empty(n)
    x[0] = e[0]
    for i in range(1, n):
        x[i] = rho * x[i - 1] + e[i]
    return 2.0 + 0.5 * x


def test_identical_rows_give_zero_and_a_tight_ci():
    a = _ar1(4096, 0)
    r = paired_block_bootstrap(a, a.copy(), block=64, n=500, seed=1)
    assert r.delta_pct == 0.0 and r.ci_low == 0.0 and r.ci_high == 0.0
    assert r.verdict == "tie" and r.tokens == 4096


def test_small_noise_ci_contains_zero():
    a = _ar1(4096, 0)
    noise = np.random.default_rng(5).normal(0, 0.05, size=a.size)
    b = a + (noise - noise.mean())  # noise with exactly zero mean: no real change
    r = paired_block_bootstrap(a, b, block=64, n=1000, seed=0)
    assert r.ci_low < 0 < r.ci_high and r.verdict == "tie"
    assert r.ci_high - r.ci_low < 1.0  # tight: the noise is small and paired


def test_shift_is_recovered_and_excludes_zero():
    a = _ar1(4096, 0)
    shift = 0.02  # +0.02 nats per token -> ppl ratio exp(0.02): +2.02 %
    b = a + shift + np.random.default_rng(3).normal(0, 0.01, size=a.size)
    r = paired_block_bootstrap(a, b, block=32, n=1000, seed=0)
    expected = 100 * math.expm1(shift)
    assert abs(r.delta_pct - expected) < 0.2
    assert r.ci_low > 0 and r.verdict == "loss"
    assert r.ci_low <= r.delta_pct <= r.ci_high
    assert paired_block_bootstrap(b, a, block=32, n=1000, seed=0).verdict == "win"


def test_blocks_widen_the_ci_for_correlated_differences():
    a = _ar1(4096, 1)
    b = a + 0.3 * (_ar1(4096, 2, rho=0.95) - 2.0)  # correlated differences
    narrow = paired_block_bootstrap(a, b, block=1, n=1000, seed=0)
    wide = paired_block_bootstrap(a, b, block=128, n=1000, seed=0)
    assert (wide.ci_high - wide.ci_low) > 2 * (narrow.ci_high - narrow.ci_low)


def test_deterministic_for_a_seed_and_padding_is_dropped():
    a = _ar1(1000, 0).reshape(4, 250)
    b = a + 0.01
    a[3, 200:] = np.nan  # padding of a short last window
    b[3, 200:] = np.nan
    r1 = paired_block_bootstrap(a, b, block=16, n=200, seed=7)
    r2 = paired_block_bootstrap(a, b, block=16, n=200, seed=7)
    assert r1 == r2 and r1.tokens == 950


def test_refusals():
    a = _ar1(100, 0)
    with pytest.raises(StatsError, match="same tokens"):
        paired_block_bootstrap(a, a[:-1])
    b = a.copy()
    b[5] = np.nan
    with pytest.raises(StatsError, match="NaN"):
        paired_block_bootstrap(a, b)
    with pytest.raises(StatsError, match="block"):
        paired_block_bootstrap(a, a, block=0)
    with pytest.raises(StatsError, match="resamples"):
        paired_block_bootstrap(a, a, n=10)
    with pytest.raises(StatsError, match="empty"):
        paired_block_bootstrap([], [])


def test_verdict_compare_and_spread():
    assert verdict(-2.0, -0.1) == "win" and verdict(0.1, 3.0) == "loss" and verdict(-1.0, 1.0) == "tie"
    with pytest.raises(StatsError):
        verdict(1.0, -1.0)
    a = _ar1(2048, 0)
    c = compare(a, a + 0.05, block=32, n=300, seed=0)
    assert c["verdict"] == "loss" and c["ci95"][0] > 0 and c["bootstrap"]["block"] == 32
    s = spread([1.0, 2.0, 3.0])
    assert s["mean"] == 2.0 and s["sd"] == 1.0 and s["min"] == 1.0 and s["max"] == 3.0 and s["n"] == 3
    assert spread([4.0])["sd"] == 0.0
