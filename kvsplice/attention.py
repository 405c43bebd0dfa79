"""The "kvsplice" attention implementation: eager attention that hands its probabilities to the cache.

V-only pruning scores tokens by the attention they receive, which fused kernels (sdpa, flash) do not
return. `prepare_model(model)` registers this function with transformers' `AttentionInterface` (and a
mask function with `AttentionMaskInterface`) and switches the model to it; it restores the previous
implementation on `.restore()` or when used as a context manager:

    cache = CompressedCache.from_geometry(model, geometry, pruner=VOnlyPruner())
    with prepare_model(model):
        out = model.generate(ids, past_key_values=cache, max_new_tokens=32)

How the probabilities reach the cache: transformers' attention modules call
`cache.update(k, v, layer_idx, kwargs=kwargs)` and then `attention_interface(..., **kwargs)` with the
same dict; a pruning `CompressedLayer` puts itself into it as `kvsplice_layer`.

Masks: the mask is built over logical positions (the cache reports its logical length). When rows
were pruned, the columns of the rows actually held are gathered by their positions, so left padding
and causality inside a multi-token chunk stay exact.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from kvsplice.errors import ModelError

NAME = "kvsplice"


def _repeat_heads(x: torch.Tensor, n: int) -> torch.Tensor:
    """(B, H, ...) -> (B, H * n, ...), each head repeated n times in place (transformers' repeat_kv)."""
    return x if n == 1 else x.repeat_interleave(n, dim=1)


def _allowed(mask: torch.Tensor | None, layer: Any, q: int, kv: int, device: torch.device) -> torch.Tensor:
    """Boolean (B | 1, 1 | G, q, kv): which rows each query may attend to."""
    if mask is None:  # plain causal over logical positions
        L = layer.length if layer is not None else kv
        qpos = torch.arange(L - q, L, device=device)
        mask = (torch.arange(L, device=device)[None, :] <= qpos[:, None])[None, None]
    elif mask.dtype != torch.bool:  # additive float mask: 0 where allowed, dtype min where not
        mask = mask > torch.finfo(mask.dtype).min / 2
    mask = mask.to(device)
    if layer is not None and layer.key_positions is not None:  # pick the columns of the rows held
        pos = layer.key_positions.to(device=device, dtype=torch.long)  # (B, G, kv)
        B, G = pos.shape[:2]
        mask = mask.expand(B, G, q, mask.shape[-1]).gather(3, pos[:, :, None, :].expand(B, G, q, kv))
    if mask.shape[-1] != kv:
        raise ModelError(f"kvsplice attention: mask has {mask.shape[-1]} key columns, keys have {kv}")
    return mask


def kvsplice_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    kvsplice_layer: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention. query (B, Hq, q, D); key, value (B, H, S, D) with Hq a multiple of H (GQA).
    Returns output (B, q, Hq, D) and probabilities (B, Hq, q, S); gives the latter to the cache layer.
    Logit soft-capping / attention-sink logits are not implemented: refused, never ignored."""
    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ModelError(f"kvsplice attention does not implement {name!r} (this model passes one)")
    B, Hq, q, D = query.shape
    groups = Hq // key.shape[1]
    if kvsplice_layer is not None and getattr(module, "layer_idx", None) not in (None, kvsplice_layer.layer_idx):
        raise ModelError(f"kvsplice attention of layer {module.layer_idx} got cache layer {kvsplice_layer.layer_idx}")
    allowed = _allowed(attention_mask, kvsplice_layer, q, key.shape[2], query.device)
    scores = query @ _repeat_heads(key, groups).transpose(2, 3) * (D**-0.5 if scaling is None else scaling)
    a = allowed if allowed.shape[1] == 1 else _repeat_heads(allowed, Hq // allowed.shape[1])
    scores = scores.masked_fill(~a, torch.finfo(scores.dtype).min)
    probs = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    probs = nn.functional.dropout(probs, p=dropout, training=module.training)
    out = (probs @ _repeat_heads(value, groups)).transpose(1, 2).contiguous()
    if kvsplice_layer is not None:
        kvsplice_layer.observe(probs, allowed)
    return out, probs


def kvsplice_mask(*args: Any, **kwargs: Any) -> torch.Tensor | None:
    """Boolean mask (B, 1, q, kv) over logical positions; never skipped (sdpa's is_causal shortcut
    would leave the attention function without padding information)."""
    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_attention() -> None:
    """Register "kvsplice" with transformers (idempotent)."""
    AttentionInterface.register(NAME, kvsplice_attention_forward)
    AttentionMaskInterface.register(NAME, kvsplice_mask)


class AttentionSwitch:
    """Switches a model to the kvsplice attention; `restore()` (or leaving the `with`) switches back."""

    def __init__(self, model: Any) -> None:
        register_attention()
        self.model, self.previous = model, model.config._attn_implementation
        model.set_attn_implementation(NAME)

    def restore(self) -> None:
        self.model.set_attn_implementation(self.previous)

    def __enter__(self) -> Any:
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.restore()


def prepare_model(model: Any) -> AttentionSwitch:
    """Switch `model` to the kvsplice attention (needed by a pruning CompressedCache). Use as
    `with prepare_model(model): ...` or call `.restore()` on the result."""
    return AttentionSwitch(model)
