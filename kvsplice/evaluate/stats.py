"""Paired statistics on per-token NLL: block-bootstrap confidence intervals for perplexity ratios.

Every frontier point keeps its per-token NLL (natural log, one value per scored token, in stream
order). Two rows measured on the same tokens under the same protocol are PAIRED: token i of A and
token i of B predict the same target from the same context. The quantity reported is

    Δ% = 100 * (ppl_B / ppl_A - 1) = 100 * (exp(mean(nll_B) - mean(nll_A)) - 1)

(A: the reference, e.g. the uncompressed baseline; B: the method). Token losses are strongly
correlated over a few dozen tokens (one hard passage raises every method's loss), so the interval
comes from a moving-block bootstrap over contiguous tokens: draw ceil(N / block) block starts
uniformly from 0 .. N - block, concatenate the blocks of the paired differences, truncate to N,
and take the 2.5 / 97.5 percentiles of Δ% over `n` resamples. Rows made of several windows or
segments are flattened in order first (a block may straddle two windows; with block << window
that changes little, and it keeps the procedure one simple rule).

`verdict` turns an interval into a claim: "win" (B better: the whole CI below 0), "loss" (whole CI
above 0) or "tie" (the CI contains 0). numpy only: `import kvsplice` must stay free of torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvsplice.errors import KVSpliceError

DEFAULT_BLOCK = 64
DEFAULT_RESAMPLES = 2000


class StatsError(KVSpliceError):
    """Inputs a paired bootstrap cannot use honestly (unequal lengths, NaN mismatch, too few tokens)."""


@dataclass(frozen=True)
class PairedDelta:
    """Δ% of perplexity (B vs A) with its 95 % bootstrap CI. tokens: paired tokens used; block,
    resamples, seed: the bootstrap's parameters (recorded so a reader can reproduce it)."""

    delta_pct: float
    ci_low: float
    ci_high: float
    tokens: int
    block: int
    resamples: int
    seed: int

    @property
    def verdict(self) -> str:
        return verdict(self.ci_low, self.ci_high)

    def as_json(self) -> dict[str, Any]:
        return {"delta_pct": self.delta_pct, "ci95": [self.ci_low, self.ci_high], "verdict": self.verdict,
                "tokens": self.tokens, "bootstrap": {"block": self.block, "resamples": self.resamples, "seed": self.seed}}


def _flat(x: Any, name: str) -> np.ndarray:
    """Any array-like (torch tensor, numpy, list) of per-token NLL -> flat float64 array (N,)."""
    if hasattr(x, "detach"):  # a torch tensor, without importing torch here
        x = x.detach().cpu().numpy()
    a = np.asarray(x, dtype=np.float64).reshape(-1)
    if a.size == 0:
        raise StatsError(f"{name}: expected per-token NLL values, got an empty array")
    return a


def paired_tokens(nll_a: Any, nll_b: Any) -> tuple[np.ndarray, np.ndarray]:
    """Flatten both rows and drop padding (NaN) positions; the NaN pattern must be identical, else
    the rows did not score the same tokens and pairing them would be wrong."""
    a, b = _flat(nll_a, "nll_a"), _flat(nll_b, "nll_b")
    if a.shape != b.shape:
        raise StatsError(f"paired rows must score the same tokens: nll_a has {a.size} values, nll_b has {b.size}")
    na, nb = np.isnan(a), np.isnan(b)
    if not np.array_equal(na, nb):
        raise StatsError(f"paired rows must score the same tokens: NaN (padding) at {int(na.sum())} vs {int(nb.sum())} positions, not the same ones")
    a, b = a[~na], b[~nb]
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise StatsError("per-token NLL must be finite (found inf)")
    return a, b


def paired_block_bootstrap(nll_a: Any, nll_b: Any, block: int = DEFAULT_BLOCK, n: int = DEFAULT_RESAMPLES, seed: int = 0) -> PairedDelta:
    """Δ% of ppl(B) / ppl(A) with a 95 % moving-block-bootstrap CI (module docstring).

    nll_a, nll_b: per-token NLL of the same scored tokens, any shape (flattened in order; NaN =
    padding, must coincide). block: tokens per bootstrap block (>= 1; capped at N); n: resamples.
    """
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise StatsError(f"block must be a positive int, got {block!r}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 100:
        raise StatsError(f"n (resamples) must be an int >= 100 for a 95 % interval, got {n!r}")
    a, b = paired_tokens(nll_a, nll_b)
    N = a.size
    if N < 2:
        raise StatsError(f"a bootstrap needs at least 2 paired tokens, got {N}")
    d = b - a  # (N,) paired log-ratio per token
    L = min(block, N)
    n_blocks = math.ceil(N / L)
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, N - L + 1, size=(n, n_blocks))  # (n, nb)
    # mean of each resample from prefix sums: sum of whole blocks, minus the overhang of the last one
    c = np.concatenate([[0.0], np.cumsum(d)])  # (N + 1,)
    sums = (c[starts + L] - c[starts]).sum(axis=1)  # (n,) over n_blocks * L tokens
    over = n_blocks * L - N  # tokens past N in the concatenation: drop the tail of the last block
    if over:
        last = starts[:, -1]
        sums -= c[last + L] - c[last + L - over]
    means = sums / N
    delta = 100.0 * math.expm1(float(d.mean()))
    lo, hi = np.percentile(100.0 * np.expm1(means), [2.5, 97.5])
    return PairedDelta(delta, float(lo), float(hi), N, L, n, seed)


def verdict(ci_low: float, ci_high: float) -> str:
    """A claim about B vs A from the CI of Δ% (B relative to A; lower is better for B):
    "win" when the whole CI is below 0, "loss" when it is above 0, else "tie"."""
    if not (math.isfinite(ci_low) and math.isfinite(ci_high)) or ci_low > ci_high:
        raise StatsError(f"a CI must be two finite numbers low <= high, got [{ci_low}, {ci_high}]")
    if ci_high < 0:
        return "win"
    if ci_low > 0:
        return "loss"
    return "tie"


def compare(nll_a: Any, nll_b: Any, **bootstrap: Any) -> dict[str, Any]:
    """"Does B beat A?" on the same tokens: the paired Δ% (B vs A), its CI and the verdict for B
    ("win" / "loss" / "tie"); bootstrap options as `paired_block_bootstrap`."""
    return paired_block_bootstrap(nll_a, nll_b, **bootstrap).as_json()


def spread(values: list[float]) -> dict[str, float]:
    """Mean, sample standard deviation (0 for one value), min and max of per-draw results."""
    v = [float(x) for x in values]
    if not v or not all(math.isfinite(x) for x in v):
        raise StatsError(f"spread needs finite values, got {values!r}")
    m = sum(v) / len(v)
    sd = math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1)) if len(v) > 1 else 0.0
    return {"mean": m, "sd": sd, "min": min(v), "max": max(v), "n": len(v)}
