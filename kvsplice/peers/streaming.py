"""StreamingLLM (Xiao et al. 2024, "Efficient streaming language models with attention sinks"):
keep the first `sinks` tokens (attention sinks) and a window of the newest `window` tokens; evict
everything in between. No attention statistics are needed for the choice, but the cache runs
through the same `CompressedCache` + pruner path as H2O and V-only pruning, so positions, masks
and byte counts are handled (and counted: kept positions, running statistics) identically.

Rows are held in token order and the sinks are never evicted, so the held rows 0..sinks-1 are
always the first `sinks` tokens: `SinkWindowPruner.importance` scores them 1, every other row 0,
and the pruner's recency forcing keeps the newest `window`. Kept = min(held, sinks + window).
RoPE positions are the original ones (no re-indexing into the cache, unlike the paper's
"positions within the cache"); documented as a deviation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvsplice.cache import CompressedCache, model_layout
from kvsplice.peers.base import Peer, check_int, register_peer
from kvsplice.pruning import VOnlyPruner


@dataclass
class SinkWindowPruner(VOnlyPruner):
    """Keep rows 0..sinks-1 and the newest `window` rows. (VOnlyPruner's keep_ratio / k_min /
    exposure_correction / ema are unused; recency is set to `window`.)"""

    sinks: int = 4
    window: int = 252

    def __post_init__(self) -> None:
        check_int("SinkWindowPruner", "sinks", self.sinks, 0)
        check_int("SinkWindowPruner", "window", self.window, 0)
        self.recency = self.window
        super().__post_init__()

    def budget(self, stored: int, logical: int) -> int:
        return min(stored, self.sinks + self.window)

    def importance(self, mass: torch.Tensor, exposure: torch.Tensor) -> torch.Tensor:
        """(B, G, S) -> 1 for the sink rows, 0 elsewhere."""
        score = torch.zeros_like(mass)
        score[..., : self.sinks] = 1.0
        return score


@register_peer
@dataclass
class StreamingLLM(Peer):
    """sinks: first tokens always kept (paper: 4); window: newest tokens kept."""

    name = "streamingllm"
    sinks: int = 4
    window: int = 252

    def __post_init__(self) -> None:
        check_int("StreamingLLM", "sinks", self.sinks, 0)
        check_int("StreamingLLM", "window", self.window, 1)

    def setting(self) -> str:
        return f"sinks={self.sinks} window={self.window}"

    def pruner(self) -> SinkWindowPruner:
        return SinkWindowPruner(sinks=self.sinks, window=self.window)

    def cache_factory(self, model: Any) -> Callable[[], CompressedCache]:
        layers = model_layout(model)[0]
        return lambda: CompressedCache(layers, pruner=self.pruner())
