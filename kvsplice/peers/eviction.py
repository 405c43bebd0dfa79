"""Byte accounting shared by the token-eviction peers (H2O, StreamingLLM).

They run through kvsplice's `CompressedCache` + pruner path, which holds, besides the kept K/V
rows, bookkeeping the harness needs for any pruner: kept-row positions (int32) and two running
statistics (attention mass, exposure; float32). The published methods keep less:

  * positions: not needed. K is stored after RoPE and every kept row is in the past, so attention
    over the kept rows needs no position (the reference H2O / StreamingLLM caches hold none).
  * StreamingLLM keeps no statistics at all (which rows survive is fixed: sinks + window).
  * H2O keeps ONE accumulated attention score per kept row and head (reference: `hh_score`).
    Counted as held here: float32 (the reference holds it in the fp16 attention dtype), per KV head.

`EvictionCache.memory()` therefore charges K/V rows plus the statistics the method names in
`charged_stats` ("mass" for H2O, none for StreamingLLM); the rest is simulation overhead, not a
cost of the method, and is left out (documented in docs/PEERS.md).
"""

from __future__ import annotations

from typing import Any

from kvsplice.cache import CacheMemory, CompressedCache


class EvictionCache(CompressedCache):
    """A `CompressedCache` with a pruner whose `memory()` charges K/V rows + `charged_stats` only.

    charged_stats: names among ("mass", "exposure") of the per-row statistics the method needs."""

    def __init__(self, num_layers: int, pruner: Any, charged_stats: tuple[str, ...] = ()) -> None:
        super().__init__(num_layers, pruner=pruner)
        self.charged_stats = tuple(charged_stats)

    def memory(self) -> CacheMemory:
        full = super().memory()
        stats = sum(int(getattr(layer, s).nbytes) for layer in self.layers for s in self.charged_stats
                    if getattr(layer, s, None) is not None)
        total = full.k_bytes + full.v_bytes + full.window_bytes + stats
        return CacheMemory(k_bytes=full.k_bytes, v_bytes=full.v_bytes, index_bytes=0, window_bytes=full.window_bytes,
                           v_window_bytes=full.v_window_bytes, other_bytes=stats, total_bytes=total,
                           uncompressed_bytes=full.uncompressed_bytes, tokens=full.tokens, batch=full.batch)
