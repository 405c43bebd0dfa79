"""H2O token eviction (Zhang et al. 2023, "H2O: heavy-hitter oracle"), configured as the authors'
code (github.com/FMInference/H2O, h2o_hf/utils_real_drop/modify_llama.py `H2OKVCache_LayerWise`,
and h2o_hf/utils_hh/modify_llama.py; read, not copied):

  * a FIXED cache of `heavy` + `recent` rows per head (reference: hh_size + recent_size; the
    published runs use heavy_ratio = recent_ratio, i.e. half heavy hitters, half recent);
  * score = attention probability ACCUMULATED over every query seen so far (no normalisation by
    how many queries could see a row); evicted rows drop their score;
  * after every forward: keep the newest `recent` rows, plus the `heavy` rows with the highest
    score among the older ones; K and V rows are evicted together.

Runs through kvsplice's `CompressedCache` + pruner path, fed attention probabilities by the
"kvsplice" attention function (kvsplice/attention.py). Selection per KV head, the score summed over
the GQA group's query heads (the reference is multi-head only; a KV row shared by a group of query
heads can only be kept or evicted for the whole group). Bytes: kept K/V rows (model dtype) + one
float32 score per kept row and KV head (peers/eviction.py).

`keep_ratio` (legacy, NOT the reference rule): budget max(recent, floor(keep_ratio * L)) growing with
the tokens seen L; kept only so configs written for it still load. Give `heavy` for the reference.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from kvsplice.cache import model_layout
from kvsplice.peers.base import Peer, PeerError, check_int, register_peer
from kvsplice.peers.eviction import EvictionCache
from kvsplice.pruning import VOnlyPruner


@dataclass
class HeavyRecentPruner(VOnlyPruner):
    """Keep `heavy` + `recent` rows: the newest `recent` and the `heavy` older rows of highest
    accumulated attention. (VOnlyPruner's keep_ratio / k_min / ema are unused.)"""

    heavy: int = 64

    def __post_init__(self) -> None:
        check_int("HeavyRecentPruner", "heavy", self.heavy, 0)
        self.keep_ratio, self.k_min, self.exposure_correction = 1.0, 0, False
        super().__post_init__()

    def budget(self, stored: int, logical: int) -> int:
        return min(stored, self.heavy + self.recency)


@register_peer
@dataclass
class H2O(Peer):
    """heavy: heavy-hitter rows kept (reference hh_size); recent: newest rows kept (recent_size);
    keep_ratio: legacy growing budget (see module docstring) - give exactly one of heavy / keep_ratio."""

    name = "h2o"
    heavy: int | None = None
    recent: int = 32
    keep_ratio: float | None = None

    def __post_init__(self) -> None:
        check_int("H2O", "recent", self.recent, 0)
        if (self.heavy is None) == (self.keep_ratio is None):
            raise PeerError(f"H2O: give exactly one of heavy (the reference's fixed heavy-hitter count) or "
                            f"keep_ratio (legacy growing budget), got heavy={self.heavy!r}, keep_ratio={self.keep_ratio!r}")
        if self.heavy is not None:
            check_int("H2O", "heavy", self.heavy, 0)
            if self.heavy + self.recent < 1:
                raise PeerError("H2O: heavy + recent must be >= 1")
        else:
            k = self.keep_ratio
            if isinstance(k, bool) or not isinstance(k, (int, float)) or not 0 < k <= 1:
                raise PeerError(f"H2O.keep_ratio must be a number in (0, 1], got {k!r}")
            self.keep_ratio = float(k)

    def pruner(self) -> VOnlyPruner:
        if self.heavy is not None:
            return HeavyRecentPruner(heavy=self.heavy, recency=self.recent)
        return VOnlyPruner(keep_ratio=self.keep_ratio, k_min=0, recency=self.recent, exposure_correction=False)

    def setting(self) -> str:
        if self.heavy is not None:
            return f"heavy={self.heavy} recent={self.recent}"
        return f"keep={self.keep_ratio:g} recent={self.recent} (legacy growing budget)"

    def cache_factory(self, model: Any) -> Callable[[], EvictionCache]:
        layers = model_layout(model)[0]
        return lambda: EvictionCache(layers, self.pruner(), charged_stats=("mass",))


def split_budget(kept: int) -> tuple[int, int]:
    """A total of `kept` rows as the published split: (heavy, recent) = (floor(kept/2), ceil(kept/2))."""
    check_int("split_budget", "kept", kept, 1)
    return kept // 2, kept - kept // 2

