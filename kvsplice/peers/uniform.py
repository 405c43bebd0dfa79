"""Plain per-token integer quantisation of K and V (int8 / int4 / int2 ...): the "uniform" codec
(kvsplice/codecs/uniform.py) on every KV head vector, through `CompressedCache`.

Per token and KV head, per group of `group` channels (None: the whole head vector): fp16 min and fp16
step + `bits`-bit codes packed into uint8. Bytes per head vector = ceil(D * bits / 8) + 4 * D / group.
No calibration; per-token, so teacher-forced evaluation is exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from kvsplice.cache import CompressedCache, LayerCodec, model_layout
from kvsplice.codecs import get_codec
from kvsplice.peers.base import Peer, PeerError, check_choice, check_int, register_peer


def uniform_layer_codecs(model: Any, bits: int, group: int | None = None) -> list[LayerCodec]:
    """One LayerCodec of per-head "uniform" codecs per layer of `model`."""
    layers, heads, head_dim = model_layout(model)
    codec = get_codec("uniform", bits=bits, group=group).fit(torch.zeros(1, head_dim))
    return [LayerCodec([codec] * heads) for _ in range(layers)]


@register_peer
@dataclass
class UniformInt(Peer):
    """bits: code width 1..8; group: channels per scale (None: whole head vector);
    target: "kv" (both), "k" or "v" (the other stored raw)."""

    name = "uniform-int"
    teacher_forced_exact = True
    bits: int = 4
    group: int | None = None
    target: str = "kv"

    def __post_init__(self) -> None:
        check_int("UniformInt", "bits", self.bits, 1)
        if self.bits > 8:
            raise PeerError(f"UniformInt.bits must be in 1..8, got {self.bits}")
        if self.group is not None:
            check_int("UniformInt", "group", self.group, 1)
        check_choice("UniformInt", "target", self.target, ("kv", "k", "v"))

    def setting(self) -> str:
        return f"int{self.bits}" + (f" g={self.group}" if self.group else "") + ("" if self.target == "kv" else f" {self.target.upper()} only")

    def cache_factory(self, model: Any) -> Callable[[], CompressedCache]:
        layers = model_layout(model)[0]
        codecs = uniform_layer_codecs(model, self.bits, self.group)
        v = codecs if "v" in self.target else None
        k = codecs if "k" in self.target else None
        return lambda: CompressedCache(layers, v_codecs=v, k_codecs=k)
