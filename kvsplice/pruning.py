"""V-only pruning for a KV cache, made causal (the seed's `VOnlyPruner`, `lib/kv_pruning.py`).

Pure tensor math (no transformers). Shapes: B batch, Hq query heads, H KV heads, G selection groups
(G = H: every KV head keeps its own tokens; G = 1: one selection shared by the heads of a layer),
q queries of the current step, S cached rows (tokens still held).

Causal semantics. The seed scores a whole sequence in one forward; a cache sees queries one step at
a time, so every statistic uses the queries seen *so far*, never a later one:

    mass[j]      = sum over seen queries i, over the query heads of the GQA group, of attn[i, j]
    exposure[j]  = number of seen queries that could attend to j (causal + padding mask)
    importance   = mass / exposure    (exposure correction; the seed's sum_i attn[i, j] / (T - j))
                 = mass               (without it; the seed's mean over T differs by a constant)
    ema = m      : mass and exposure decay by m per step (m * old + step), so importance becomes an
                   exponentially weighted average attention per query (recent queries count more).

After each step the rows kept are the `budget` most important, the last `recency` rows (the most
recent tokens) always among them:  budget = min(S, max(k_min, recency, floor(keep_ratio * L))),
L = logical length (tokens seen per sequence). floor as in the seed: 0.382 * 1024 -> 391 tokens.

Attention over pruned V uses the scores of the kept keys only, softmax renormalised over the kept
tokens (the seed's corrected normalisation: attn[kept] / attn[kept].sum()). That output is exactly
what evicting the pruned keys too gives, so the cache frees K and V rows together; the kept keys
are still held (and counted in `CompressedCache.memory()`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kvsplice.errors import KVSpliceError


@dataclass
class VOnlyPruner:
    """Keep `keep_ratio` of the tokens' V (at least `k_min`; the newest `recency` always).

    keep_ratio: fraction of the logical length kept, in (0, 1]; 0.382 ~ 1 / (1 + phi) as in the seed.
    k_min: lower bound on kept tokens. recency: newest tokens always kept.
    exposure_correction: divide attention mass by the number of queries that could see the token.
    ema: optional decay in [0, 1) applied to mass and exposure at every step (None: plain sums).
    """

    keep_ratio: float = 0.382
    k_min: int = 64
    recency: int = 64
    exposure_correction: bool = True
    ema: float | None = None

    def __post_init__(self) -> None:
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) or not (
            0.0 < float(self.keep_ratio) <= 1.0
        ):
            raise KVSpliceError(f"VOnlyPruner.keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
        for name in ("k_min", "recency"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise KVSpliceError(f"VOnlyPruner.{name} must be an integer >= 0, got {v!r}")
        if not isinstance(self.exposure_correction, bool):
            raise KVSpliceError(f"VOnlyPruner.exposure_correction must be a bool, got {self.exposure_correction!r}")
        if self.ema is not None and (
            isinstance(self.ema, bool) or not isinstance(self.ema, (int, float)) or not (0.0 <= self.ema < 1.0)
        ):
            raise KVSpliceError(f"VOnlyPruner.ema must be None or a number in [0, 1), got {self.ema!r}")
        self.keep_ratio = float(self.keep_ratio)

    def budget(self, stored: int, logical: int) -> int:
        """Rows to keep when `stored` rows are held for a sequence of `logical` tokens."""
        return min(stored, max(self.k_min, self.recency, math.floor(self.keep_ratio * logical)))

    def accumulate(
        self, mass: torch.Tensor, exposure: torch.Tensor, step_mass: torch.Tensor, step_exposure: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fold one step's statistics into the running ones; all (B, G, S) float32, rows aligned."""
        if self.ema is None:
            return mass + step_mass, exposure + step_exposure
        return self.ema * mass + step_mass, self.ema * exposure + step_exposure

    def importance(self, mass: torch.Tensor, exposure: torch.Tensor) -> torch.Tensor:
        """(B, G, S) -> (B, G, S). A row never seen by any query (padding) scores 0."""
        if not self.exposure_correction:
            return mass
        return torch.where(exposure > 0, mass / exposure.clamp_min(1e-30), torch.zeros_like(mass))

    def select(self, importance: torch.Tensor, logical: int) -> torch.Tensor:
        """importance (B, G, S) -> indices (B, G, K) of the rows kept, ascending (token order)."""
        B, G, S = importance.shape
        K = self.budget(S, logical)
        if K >= S:
            return torch.arange(S, device=importance.device).expand(B, G, S)
        forced = importance.clone()
        forced[..., S - min(self.recency, S) :] = math.inf  # recency forcing
        return forced.topk(K, dim=-1).indices.sort(dim=-1).values


def attention_mass(
    probs: torch.Tensor, allowed: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's statistics.

    probs (B, Hq, q, S): attention probabilities of the step's queries over the rows it read.
    allowed (B, 1 | G | Hq, q, S) bool: which rows each query could attend to. A query row with
        nothing allowed (a left-padding query) counts for nobody.
    groups: G, the number of selection groups (Hq must be a multiple of G).
    Returns mass (B, G, S) summed over the group's query heads and queries, and exposure (B, G, S)
    = number of queries that could see the row; both float32.
    """
    B, Hq, q, S = probs.shape
    if Hq % groups:
        raise KVSpliceError(f"attention_mass: {Hq} query heads are not a multiple of {groups} groups")
    a = allowed if allowed.shape[1] in (1, Hq) else allowed.repeat_interleave(Hq // allowed.shape[1], dim=1)
    mass = (probs.float() * a).sum(2).view(B, groups, Hq // groups, S).sum(2)  # (B, G, S)
    exposure = allowed.sum(2, dtype=torch.float32)  # (B, 1 | G | Hq, S)
    if exposure.shape[1] == Hq and Hq != groups:
        exposure = exposure.view(B, groups, Hq // groups, S)[:, :, 0]
    return mass, exposure.expand(B, groups, S)
