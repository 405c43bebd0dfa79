"""H2O token eviction (Zhang et al. 2023, "H2O: heavy-hitter oracle"): keep the tokens with the most
ACCUMULATED attention (summed over every query seen so far, no exposure correction) plus the most
recent tokens; everything else is evicted (K and V rows freed together).

It runs through the same machinery as the seed's V-only pruning: a `CompressedCache` with a
`VOnlyPruner(exposure_correction=False)`, fed attention probabilities by the "kvsplice" attention
function (kvsplice/attention.py), selection per KV head (mass summed over the GQA group's query
heads). Budget after every step, L = tokens seen:

    kept = min(held, max(recent, floor(keep_ratio * L)))       (the newest `recent` always kept)

so bytes per token fall to ~keep_ratio of an uncompressed cache, as in H2O's "x % KV cache budget"
(heavy hitters = kept - recent). The kept rows' positions (int32) and running attention statistics
(float32) are held and counted by `CompressedCache.memory()`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kvsplice.cache import CompressedCache, model_layout
from kvsplice.peers.base import Peer, PeerError, check_int, register_peer
from kvsplice.pruning import VOnlyPruner


@register_peer
@dataclass
class H2O(Peer):
    """keep_ratio: fraction of the tokens kept, in (0, 1]; recent: newest tokens always kept."""

    name = "h2o"
    keep_ratio: float = 0.2
    recent: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.keep_ratio, bool) or not isinstance(self.keep_ratio, (int, float)) or not 0 < self.keep_ratio <= 1:
            raise PeerError(f"H2O.keep_ratio must be a number in (0, 1], got {self.keep_ratio!r}")
        check_int("H2O", "recent", self.recent, 0)
        self.keep_ratio = float(self.keep_ratio)

    def pruner(self) -> VOnlyPruner:
        return VOnlyPruner(keep_ratio=self.keep_ratio, k_min=0, recency=self.recent, exposure_correction=False)

    def setting(self) -> str:
        return f"keep={self.keep_ratio:g} recent={self.recent}"

    def cache_factory(self, model: Any) -> Callable[[], CompressedCache]:
        layers = model_layout(model)[0]
        return lambda: CompressedCache(layers, pruner=self.pruner())
