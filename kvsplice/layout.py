"""What a model's layers look like to a cache, and what a cache holds in bytes.

`model_layout(model)`: (layers, KV heads, head_dim). `layer_windows(model)`: each layer's sliding window
(None: full attention), as transformers' DynamicCache reads it. `CacheMemory`: the byte accounting of
a `CompressedCache` (and of the peers that report the same fields). Re-exported by kvsplice/cache.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from kvsplice.errors import ModelError

@dataclass
class CacheMemory:
    """Bytes actually held by a cache's tensors (all layers), and the uncompressed equivalent.

    k_bytes: K rows (raw, or K codec payload). v_bytes: V codec payload (raw V for layers without codec).
    window_bytes: full-precision window and sink rows of codec'd K/V (v_window_bytes: the V part of it).
    index_bytes: kept-row positions (pruning); the rows' token positions (pre-RoPE K codecs) and each
    sequence's sink rows (sink), held once per cache. other_bytes: pruning statistics (mass, exposure).
    total_bytes: k + v + index + window + other. uncompressed_bytes: what a DynamicCache in the model
    dtype holds for the same tokens (a hybrid one: a sliding layer holds at most its window - 1 rows).
    tokens: logical length per sequence. batch: sequences. Per-token figures divide by `tokens`, so on
    a model with sliding layers they fall as the sequence outgrows the window (for both caches).
    """

    k_bytes: int
    v_bytes: int
    index_bytes: int
    window_bytes: int
    v_window_bytes: int
    other_bytes: int
    total_bytes: int
    uncompressed_bytes: int
    tokens: int
    batch: int

    @property
    def kv_bytes_per_token(self) -> float:
        """Total bytes per token of one sequence (all layers, K + V + overheads)."""
        return self.total_bytes / max(self.tokens * self.batch, 1)

    @property
    def v_bytes_per_token(self) -> float:
        """V bytes (payload + V window) per token of one sequence, all layers."""
        return (self.v_bytes + self.v_window_bytes) / max(self.tokens * self.batch, 1)

    def as_dict(self) -> dict[str, float]:
        per_token = {"kv_bytes_per_token": self.kv_bytes_per_token, "v_bytes_per_token": self.v_bytes_per_token}
        return {**asdict(self), **per_token}


def model_layout(model: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) from a transformers model's config."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    try:
        layers, q_heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or q_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads)
    except AttributeError as e:
        raise ModelError(f"cannot read layers / heads / head_dim from {type(cfg).__name__}: {e}") from e
    return layers, kv_heads, head_dim


SLIDING_TYPES = ("sliding_attention", "chunked_attention")  # DynamicCache keeps W - 1 rows for both (masks differ)


def layer_windows(model: Any) -> list[int | None]:
    """Per decoder layer, its sliding window (None: full attention), read from the config as
    transformers' DynamicCache reads it (`get_layer_types_and_kwargs`: `layer_types`, else a
    `sliding_window` set on the config). ModelError for a layer type this cache cannot hold
    (linear attention, shared KV, ...)."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    types, kwargs = get_layer_types_and_kwargs(cfg)
    out = []
    for l, (t, kw) in enumerate(zip(types, kwargs)):
        if t in SLIDING_TYPES:
            out.append(int(kw["sliding_window"]))
        elif t == "full_attention":
            out.append(None)
        else:
            raise ModelError(f"layer {l} has attention type {t!r}; CompressedCache holds 'full_attention' and "
                             f"{' / '.join(repr(x) for x in SLIDING_TYPES)} layers only")
    return out
