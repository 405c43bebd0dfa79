"""transformers' own `QuantizedCache` (quanto or HQQ backend), measured in the same harness.

`MeasuredQuantizedCache` is transformers' class unchanged plus a `memory()` that counts the bytes
of the tensors each layer actually holds:
  * quantised K and V: for optimum-quanto, every plain tensor inside the `WeightQBitsTensor`
    (packed uint8 data, scale, shift), found by recursive `__tensor_flatten__`; for HQQ, the packed
    tensor plus every tensor in its meta dict (scale, zero);
  * the full-precision residual (`layer.keys` / `layer.values`, model dtype).
Honest caveats (also in docs/PEERS.md): transformers' layer quantises the whole prefill at its
first call (reading that step in full precision), then appends decoded tokens to a full-precision
residual; when residual + new tokens reach `residual_length` it re-quantises ALL tokens from their
dequantised values (error can compound) and empties the residual, so the residual holds 0 ..
residual_length - 1 tokens and the bytes depend on where in that cycle they are measured.
Groups run along the axis the backend picks (`axis_key` / `axis_value`, see `HFQuantized`).
Scale / shift (quanto) and scale / zero (hqq) are held in the dtype the backend gives them (quanto:
the model dtype). What is counted is what is held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.cache_utils import QuantizedCache

from kvsplice.cache import CacheMemory
from kvsplice.peers.base import Peer, PeerError, check_choice, check_int, register_peer

BACKENDS = ("quanto", "hqq")
BACKEND_MODULES = {"quanto": "optimum.quanto", "hqq": "hqq"}  # optional: pip install 'kvsplice[peers]'


def require_backend(backend: str) -> None:
    """PeerError (one line, naming the extra) when the backend's package is not installed."""
    import importlib.util

    module = BACKEND_MODULES[backend]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # find_spec("optimum.quanto") raises when "optimum" itself is absent
        found = False
    if not found:
        raise PeerError(f"the {backend} backend of transformers' QuantizedCache needs the optional extra "
                        f"[peers]: pip install 'kvsplice[peers]' (module {module!r} not found)")


def held_nbytes(obj: Any) -> int:
    """Bytes of every plain tensor reachable from obj (tensor subclasses are flattened)."""
    if obj is None:
        return 0
    if isinstance(obj, torch.Tensor):
        if type(obj) in (torch.Tensor, torch.nn.Parameter) or not hasattr(obj, "__tensor_flatten__"):
            return int(obj.nbytes)
        names, _ = obj.__tensor_flatten__()
        return sum(held_nbytes(getattr(obj, n)) for n in names)
    if isinstance(obj, (tuple, list)):
        return sum(held_nbytes(o) for o in obj)
    if isinstance(obj, dict):
        return sum(held_nbytes(v) for v in obj.values() if isinstance(v, (torch.Tensor, tuple, list, dict)))
    return 0


class MeasuredQuantizedCache(QuantizedCache):
    """transformers.QuantizedCache + `memory()` (bytes held). Records the batch size, KV heads,
    head_dim and dtype of the states it is given (the quantised layers do not keep them)."""

    teacher_forced_exact = False  # a first forward reads its own rows before they are quantised

    pruner = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        self._layout = (key_states.shape[0], key_states.shape[1], key_states.shape[3], key_states.element_size())
        return super().update(key_states, value_states, *args, **kwargs)

    def memory(self) -> CacheMemory:
        k = v = kw = vw = unc = tokens = 0
        B, H, D, elem = getattr(self, "_layout", (0, 0, 0, 0))
        for layer in self.layers:
            if not layer.is_initialized:
                continue
            k += held_nbytes(layer._quantized_keys)
            v += held_nbytes(layer._quantized_values)
            kw += int(layer.keys.nbytes)
            vw += int(layer.values.nbytes)
            tokens = int(layer.cumulative_length)
            unc += 2 * tokens * B * elem * H * D
        return CacheMemory(k_bytes=k, v_bytes=v, index_bytes=0, window_bytes=kw + vw, v_window_bytes=vw,
                           other_bytes=0, total_bytes=k + v + kw + vw, uncompressed_bytes=unc, tokens=tokens, batch=B)


@register_peer
@dataclass
class HFQuantized(Peer):
    """transformers' defaults (transformers 5.24 cache_utils.QuantizedLayer / QuantoQuantizedLayer /
    HQQQuantizedLayer, identical for both backends): nbits 4, axis_key 0, axis_value 0,
    q_group_size 64, residual_length 128; `generate(cache_implementation="quantized")` picks quanto.
    backend: "quanto" (bits 2 or 4) | "hqq" (1, 2, 3, 4, 8); group: q_group_size; residual:
    residual_length; axis_key / axis_value: the backend's quantisation axis (quanto: 0 | -1,
    hqq: 0 | 1). With axis 0 and group 64 = head_dim, quanto's groups are the 64 contiguous values of
    one token's head vector (optimum.quanto.tensor.grouped.group reshapes to (-1, group)): one scale +
    shift per token and head, for K and for V."""

    name = "hf-quantized"
    backend: str = "quanto"
    bits: int = 4
    group: int = 64
    residual: int = 128
    axis_key: int = 0
    axis_value: int = 0

    def __post_init__(self) -> None:
        check_choice("HFQuantized", "backend", self.backend, BACKENDS)
        allowed = (2, 4) if self.backend == "quanto" else (1, 2, 3, 4, 8)
        if self.bits not in allowed:
            raise PeerError(f"HFQuantized: backend {self.backend} takes bits in {allowed}, got {self.bits!r}")
        check_int("HFQuantized", "group", self.group, 1)
        check_int("HFQuantized", "residual", self.residual, 1)
        axes = (0, -1) if self.backend == "quanto" else (0, 1)
        check_choice("HFQuantized", "axis_key", self.axis_key, axes)
        check_choice("HFQuantized", "axis_value", self.axis_value, axes)

    def setting(self) -> str:
        axes = "" if (self.axis_key, self.axis_value) == (0, 0) else f" axes={self.axis_key},{self.axis_value}"
        return f"{self.backend} {self.bits}-bit g={self.group} R={self.residual}{axes}"

    def cache_factory(self, model: Any) -> Callable[[], MeasuredQuantizedCache]:
        require_backend(self.backend)
        cfg = model.config
        kw = dict(nbits=self.bits, q_group_size=self.group, residual_length=self.residual,
                  axis_key=self.axis_key, axis_value=self.axis_value)
        make = lambda: MeasuredQuantizedCache(self.backend, cfg, **kw)  # noqa: E731
        make()  # fail early (missing backend package, bad layout)
        return make
