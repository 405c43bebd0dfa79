"""The model's rotary embedding (RoPE) as one small lookup per layer: positions -> cos, sin in float32.

A pre-RoPE K codec (kvsplice/kcodec.py) un-rotates K by each row's true position on write and
re-rotates it on read. Both must use the very rotation the model applied, so the lookup calls the
model's own rotary module:

    rotary = layer_rotary(model, layer)          # RotaryLookup, or None (no RoPE, e.g. GPT-2)
    cos, sin = rotary(positions (B, T) int)      # each (B, T, D) float32
    cos, sin = rotary(positions, span=(lo, hi))  # same, with the positions' bounds known (no device sync)

Layer types. Llama / Qwen3 have one table for every layer (`rotary_emb(x, position_ids)`). Gemma 3
has one module computing a different table per layer type (sliding vs global attention:
`rotary_emb(x, position_ids, layer_type)`, the model passes `position_embeddings[layer_type]` to
each layer), so the lookup of layer l carries `config.layer_types[l]` whenever the module's forward
takes a `layer_type`. A model with another scheme must get its own branch in `layer_rotary`.

Float32 always: the tables are computed in float32 (the module is called with a float32 dummy) so
that un-rotate then re-rotate is the identity up to float32 rounding, also for bf16 / fp16 models.
Tables for positions 0..M-1 are cached per device and grown geometrically: model-side constants
like RoPE itself, not per-sequence state (not counted in a cache's bytes). Rotary types whose
tables depend on the sequence length ("dynamic") are refused: a cached table would go stale.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from kvsplice.errors import ModelError


def find_rotary(model: nn.Module) -> nn.Module | None:
    """The model's (first) rotary-embedding module, or None (e.g. GPT-2)."""
    for name, mod in model.named_modules():
        if name.endswith("rotary_emb"):
            return mod
    return None


class RotaryLookup:
    """cos, sin (B, T, D) float32 of one layer's rotary embedding for given positions (B, T)."""

    def __init__(self, module: nn.Module, layer_type: str | None = None) -> None:
        rope_type = getattr(module, "rope_type", "default")
        rope_type = rope_type.get(layer_type, "default") if isinstance(rope_type, dict) else rope_type
        if "dynamic" in str(rope_type):
            raise ModelError(
                f"rotary type {rope_type!r} changes with the sequence length; pre-RoPE K codecs need a fixed one"
            )
        self.module, self.layer_type = module, layer_type
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def _call(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The module itself on positions (B, T): cos, sin (B, T, D) float32."""
        dummy = torch.zeros(1, dtype=torch.float32, device=positions.device)
        args = (dummy, positions) if self.layer_type is None else (dummy, positions, self.layer_type)
        with torch.no_grad():
            cos, sin = self.module(*args)
        return cos.float(), sin.float()

    def __call__(
        self, positions: torch.Tensor, span: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) -> cos, sin (B, T, D) float32. span: (min, max) of the positions when the
        caller knows them (a cache tracks them on the host, sparing two device syncs per read)."""
        positions = positions.long()
        if positions.numel() == 0:
            return self._call(positions)
        lo, hi = span if span is not None else (int(positions.min()), int(positions.max()))
        if lo < 0:  # no table for negative positions
            return self._call(positions)
        n = hi + 1
        cos, sin = self._tables.get(positions.device, (None, None))
        if cos is None or cos.shape[0] < n:
            m = max(n, 2 * (cos.shape[0] if cos is not None else 0), 256)
            cos, sin = self._call(torch.arange(m, device=positions.device)[None])
            cos, sin = self._tables[positions.device] = cos[0], sin[0]  # (M, D)
        return cos[positions], sin[positions]


def layer_rotary(model: Any, layer: int, shared: dict | None = None) -> RotaryLookup | None:
    """The rotary lookup of decoder layer `layer` (module docstring), or None when the model has no
    rotary embedding. `shared` (a dict) lets the layers of one model share lookups and tables."""
    module = find_rotary(model)
    if module is None:
        return None
    layer_type = None
    if "layer_type" in inspect.signature(module.forward).parameters:
        cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
        types = getattr(cfg, "layer_types", None)
        if not types or layer >= len(types):
            raise ModelError(f"the rotary embedding needs a layer_type, but config.layer_types is {types!r}")
        layer_type = types[layer]
    shared = {} if shared is None else shared
    key = (id(module), layer_type)
    if key not in shared:
        shared[key] = RotaryLookup(module, layer_type)
    return shared[key]


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)
