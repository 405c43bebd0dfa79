"""K codecs through the cache, before the rotary embedding (RoPE) where the model has one.

Llama-family attention rotates K by its position (RoPE) BEFORE `cache.update`, so the cache sees
post-RoPE K. K's structure (outlier channels, low-rank directions) lives in the pre-RoPE basis: the
adapter captures pre-RoPE K (`k_proj` output) for calibration. `PreRopeLayerCodec` bridges the two:

    encode(k_post (B, H, T, D), positions p (B, T)) : k_pre = R(-p) k_post ; payload = codec.encode(k_pre)
    decode(payload (B, H', P, *), positions p (B, P)): k_post = R(p) codec.decode(payload)

with R(p) the model's own rotary embedding for that layer (kvsplice/rope.py: `layer_rotary`), and p
each row's TRUE position as the model passed it (`position_ids`: with left padding, generate counts
positions from each sequence's first real token). The cache stores the positions of its rows
(`CompressedCache`: `TokenIndex`) and hands them to both calls. The inverse divides by
cos^2 + sin^2, exact also with an attention scaling.

Float32: the rotation AND the inner codec run in float32 whatever the model dtype (`to()` ignores the
dtype it is given), so with a no-op codec a bf16 / fp16 model reads back exactly the K it wrote. A
float payload (identity, scales) is therefore held in float32 and counted as such.

Assumption (checked by `CompressedCache`): no pruning, so payload row r is token r of the sequence.
Models without a rotary embedding (GPT-2) get the plain LayerCodec (their K is not rotated).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from kvsplice.cache import model_layout
from kvsplice.errors import GeometryError, KVSpliceError
from kvsplice.rope import RotaryLookup, find_rotary, layer_rotary, rotate_half
from kvsplice.rows import LayerCodec

__all__ = ["PreRopeLayerCodec", "find_rotary", "k_layer_codecs"]


class PreRopeLayerCodec(LayerCodec):
    """A LayerCodec fitted on pre-RoPE K, used on the post-RoPE K a cache receives (module docstring).
    rotary: the layer's `RotaryLookup` (or a rotary module, looked up without a layer type)."""

    position_aware = True  # encode / decode need each row's position

    def __init__(self, inner: LayerCodec, rotary: RotaryLookup | nn.Module) -> None:
        super().__init__(inner.codecs, inner.joint, inner.num_heads if inner.joint else None)
        self.rotary = rotary if isinstance(rotary, RotaryLookup) else RotaryLookup(rotary)

    def to(self, device: torch.device, dtype: torch.dtype) -> "PreRopeLayerCodec":
        """A copy on `device` in float32 (not `dtype`: see the module docstring)."""
        return PreRopeLayerCodec(super().to(device, torch.float32), self.rotary)

    def _cos_sin(self, positions: torch.Tensor | None, B: int, T: int, span: tuple[int, int] | None):
        if positions is None or tuple(positions.shape) != (B, T):
            found = None if positions is None else tuple(positions.shape)
            raise KVSpliceError(f"a pre-RoPE K codec needs the rows' positions of shape {(B, T)}, got {found}")
        cos, sin = self.rotary(positions, span)  # (B, T, D) float32
        if cos.shape[-1] != self.head_dim:
            raise GeometryError(f"rotary tables have dim {cos.shape[-1]}, K heads dim {self.head_dim} (partial RoPE?)")
        return cos[:, None], sin[:, None]  # (B, 1, T, D): same rotation for every head

    def encode(self, x: torch.Tensor, positions: torch.Tensor | None = None,
               span: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """x (B, H, T, D): post-RoPE K of rows at positions (B, T) (span: their (min, max), if known)."""
        B, _, T, _ = x.shape
        c, s = self._cos_sin(positions, B, T, span)
        x = x.float()
        pre = (x * c - rotate_half(x) * s) / (c * c + s * s)
        return super().encode(pre)

    def decode(self, payload: dict[str, torch.Tensor], positions: torch.Tensor | None = None,
               span: tuple[int, int] | None = None) -> torch.Tensor:
        """-> post-RoPE K (B, H, P, D) float32 of rows at positions (B, P)."""
        pre = super().decode(payload).float()  # (B, H, P, D)
        c, s = self._cos_sin(positions, pre.shape[0], pre.shape[2], span)
        return pre * c + rotate_half(pre) * s


def k_layer_codecs(model: Any, geometry: Any) -> list[LayerCodec | None]:
    """Per-layer K codecs for `model` from a K geometry. Fitted on pre-RoPE K (meta k_rope "pre", the
    default): wrapped in `PreRopeLayerCodec` with the layer's rotary lookup where the model has RoPE.
    Fitted after RoPE (k_rope "post"): plain LayerCodecs on the rows the cache receives."""
    layers, heads, head_dim = model_layout(model)
    if geometry.meta.get("target", "k") != "k":
        raise GeometryError(f"expected a K geometry, found target {geometry.meta.get('target')!r}")
    geometry.check_compatible(layers, heads, head_dim)
    k_rope = geometry.meta.get("k_rope", "pre")
    if k_rope not in ("pre", "post"):
        raise GeometryError(f"K geometry meta k_rope must be 'pre' or 'post', found {k_rope!r}")
    if k_rope == "post":  # fitted on K as the cache receives it: store and read the rows as they are
        positions = geometry.meta.get("positions")
        if positions is not None and (not str(positions).isdigit() or int(positions) < 1):
            raise GeometryError(f"K geometry meta positions must be a positive integer, found {positions!r}")
        out = [LayerCodec.from_geometry(geometry, l) for l in range(layers)]
        for c in out:  # CompressedLayer refuses (or warns about) positions past these
            if c is not None and positions is not None:
                c.calibrated_positions = int(positions)
        return out
    shared: dict = {}  # layers of one type share one lookup (one table)
    out: list[LayerCodec | None] = []
    for l in range(layers):
        c = LayerCodec.from_geometry(geometry, l)
        rotary = layer_rotary(model, l, shared) if c is not None else None
        out.append(PreRopeLayerCodec(c, rotary) if rotary is not None else c)
    return out
