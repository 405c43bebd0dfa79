"""K codecs through the cache, before the rotary embedding (RoPE) where the model has one.

Llama-family attention rotates K by its position (RoPE) BEFORE `cache.update`, so the cache sees
post-RoPE K. K's structure (outlier channels, low-rank directions) lives in the pre-RoPE basis: the
adapter captures pre-RoPE K (`k_proj` output) for calibration. `PreRopeLayerCodec` bridges the two:

    encode(k_post rows at positions p)  : k_pre = R(-p) k_post ; payload = codec.encode(k_pre)
    decode(payload of rows 0..P-1)      : k_post = R(p) codec.decode(payload),  p = 0..P-1

with R(p) the model's own rotary embedding (`rotary_emb(x, position_ids)` -> cos, sin; the inverse
divides by cos^2 + sin^2, which is exact also with an attention scaling). Exact inverse up to float
rounding; costs one rotation per row read.

Assumptions (checked where possible): rows arrive in token order and none is removed (no pruning:
`CompressedCache` with a pruner would reorder/drop payload rows; the frontier never combines them),
and a row's position is its index in the sequence (position_ids = 0..T-1: no left padding).
Models without a rotary embedding (GPT-2) get the plain LayerCodec (their K is not rotated).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvsplice.cache import LayerCodec, model_layout
from kvsplice.errors import GeometryError


_TABLES: dict[tuple, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}  # (rotary id, device, dtype) -> (module, cos, sin)


def find_rotary(model: nn.Module) -> nn.Module | None:
    """The model's (first) rotary-embedding module, or None (e.g. GPT-2)."""
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb"):
            return mod
    return None


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


class PreRopeLayerCodec(LayerCodec):
    """A LayerCodec fitted on pre-RoPE K, used on the post-RoPE K a cache receives (module docstring).
    Stateful: counts the rows it has encoded (their positions); `to()` returns a fresh copy, which is
    what every `CompressedCache` layer makes when it initialises."""

    position_aware = True  # payload row p is position first + p: no pruning (CompressedCache refuses it)

    def __init__(self, inner: LayerCodec, rotary: nn.Module) -> None:
        super().__init__(inner.codecs, inner.joint, inner.num_heads if inner.joint else None)
        self.rotary = rotary
        self.encoded = 0  # rows encoded so far = position of the next row
        self.first = 0  # position of the first payload row (rows before it are the cache's sink)

    def to(self, device: torch.device, dtype: torch.dtype) -> "PreRopeLayerCodec":
        return PreRopeLayerCodec(super().to(device, dtype), self.rotary)

    def _tables(self, n: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (n, D) for positions 0..n-1, from one table per (rotary module, device, dtype)
        shared by every layer and cache (grown geometrically). Model-side constants like RoPE itself,
        not per-sequence state: not counted in the cache's bytes."""
        key = (id(self.rotary), like.device, like.dtype)
        entry = _TABLES.get(key)
        if entry is None or entry[1].shape[0] < n:
            m = max(n, 2 * (entry[1].shape[0] if entry is not None else 0), 256)
            pos = torch.arange(m, device=like.device)[None]
            with torch.no_grad():
                cos, sin = self.rotary(like.new_zeros(1, m, like.shape[-1]), pos)
            entry = _TABLES[key] = (self.rotary, cos[0].to(like.dtype), sin[0].to(like.dtype))
        return entry[1][:n], entry[2][:n]

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """x (B, H, T, D): post-RoPE K of the next T positions."""
        T = x.shape[2]
        cos, sin = self._tables(self.encoded + T, x)
        c, s = cos[self.encoded :], sin[self.encoded :]  # (T, D)
        pre = (x * c - _rotate_half(x) * s) / (c * c + s * s)
        self.encoded += T
        return super().encode(pre)

    def skip(self, n: int) -> None:
        """n leading rows are kept exact by the cache (sink): the payload starts at position `first`."""
        if self.encoded != self.first:
            raise GeometryError("internal: sink rows must come before any encoded row")
        self.encoded += n
        self.first += n

    def decode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        pre = super().decode(payload)  # (B, H, P, D)
        cos, sin = self._tables(self.first + pre.shape[2], pre)
        cos, sin = cos[self.first :], sin[self.first :]
        return pre * cos + _rotate_half(pre) * sin


def k_layer_codecs(model: Any, geometry: Any) -> list[LayerCodec | None]:
    """Per-layer K codecs for `model` from a K geometry (fitted on pre-RoPE K, as the adapter
    captures it): wrapped in `PreRopeLayerCodec` when the model has a rotary embedding."""
    layers, heads, head_dim = model_layout(model)
    if geometry.meta.get("target", "k") != "k":
        raise GeometryError(f"expected a K geometry, found target {geometry.meta.get('target')!r}")
    geometry.check_compatible(layers, heads, head_dim)
    rotary = find_rotary(model)
    out: list[LayerCodec | None] = []
    for l in range(layers):
        c = LayerCodec.from_geometry(geometry, l)
        out.append(PreRopeLayerCodec(c, rotary) if (c is not None and rotary is not None) else c)
    return out
