"""StreamingLLM (Xiao et al. 2024, "Efficient streaming language models with attention sinks"):
keep the first `sinks` tokens (attention sinks; paper and reference github.com/mit-han-lab/
streaming-llm, streaming_llm/kv_cache.py `StartRecentKVCache`: start_size = 4) and a window of the
newest `window` tokens (`recent_size`); evict everything in between. Kept = min(held, sinks + window).

The cache runs through the same `CompressedCache` + pruner path as H2O and V-only pruning, so masks
are handled identically; rows are held in token order and the sinks are never evicted, so the held
rows 0..sinks-1 are always the first `sinks` tokens: `SinkWindowPruner.importance` scores them 1,
every other row 0, and the pruner's recency forcing keeps the newest `window`.
Bytes charged: the kept K/V rows only (model dtype). The harness's kept-row positions and attention
statistics are NOT charged: StreamingLLM needs neither (which rows survive is fixed), see
peers/eviction.py.
RoPE positions are the original ones (no re-indexing into the cache, unlike the paper's
"positions within the cache", which matters only beyond the model's trained context); documented
as a departure in docs/PEERS.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvsplice.cache import model_layout
from kvsplice.peers.base import Peer, check_int, register_peer
from kvsplice.peers.eviction import EvictionCache
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

    def cache_factory(self, model: Any) -> Callable[[], EvictionCache]:
        layers = model_layout(model)[0]
        return lambda: EvictionCache(layers, self.pruner(), charged_stats=())
