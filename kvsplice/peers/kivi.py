"""KIVI (Liu et al. 2024, "KIVI: a tuning-free asymmetric 2bit quantization for KV cache"),
re-implemented on kvsplice's quantiser primitives (codecs/quant.py) with the semantics of the
authors' code (github.com/jy-yuan/KIVI, models/llama_kivi.py + quant/new_pack.py; read, not copied).

Per layer, shapes B batch, H KV heads, D head_dim, L tokens seen, g = `group`, R = `residual`,
vg = `v_group`:

    K : per-CHANNEL min-max quantisation in groups of g consecutive tokens: for each (head, channel,
        group) one fp16 minimum and one fp16 step. K is quantised a whole block of R tokens at a
        time: the full-precision K residual holds exactly the last (L mod R) tokens (the reference's
        prefill keeps key_states[-(T % R):] and its decode flushes key_states_full when it reaches R).
          codes (B, H, L - L mod R, ceil(D*b/8)) uint8 ; lo/step (B, H, (L - L mod R)/g, D) fp16
    V : per-TOKEN min-max quantisation, one fp16 min/step per vg channels of a token (the reference
        uses its one `group_size` for both: g tokens for K, g channels for V). The V residual holds
        the newest min(L, R) tokens (prefill keeps value_states[-R:], decode quantises the oldest
        one once R + 1 are held).
          codes (B, H, L - min(L, R), ceil(D*b/8)) uint8 ; lo/step (B, H, L - min(L, R), D/vg) fp16
    residual: K (L mod R rows) and V (min(L, R) rows) in the MODEL dtype (the reference: fp16 model).

Scales and zero points are fp16, as in the reference (its models, kernels and scales are fp16: the
scale tensors take the dtype of the fp16 K/V they are computed from). Bytes counted by `memory()` are
the nbytes of exactly these tensors (codes + fp16 lo/step + residual rows in the model dtype).

As in KIVI, a step's own new tokens are read in full precision (prefill attention is exact; decode
tokens enter the residual anyway); everything stored before the step is read dequantised. The
reference decodes one token per step; with a chunk of q > 1 tokens the same invariants are kept
(after the step: K residual = L mod R rows, V residual = min(L, R) rows).
The dequantised copy is transient (rebuilt per step, dropped after attention), never held.
Teacher-forced evaluation is NOT exact for this cache (a window's queries would read K groups whose
scales include later tokens and no residual): use prefill-continue.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvsplice.cache import BatchMapMixin, CacheMemory, model_layout
from kvsplice.codecs.quant import dequantize_minmax, pack_codes, quantize_minmax, unpack_codes
from kvsplice.peers.base import Peer, PeerError, check_int, register_peer


def _cat(a: torch.Tensor | None, b: torch.Tensor) -> torch.Tensor:
    return b if a is None else torch.cat([a, b], dim=2)


class KIVILayer(BatchMapMixin, CacheLayerMixin):
    """One layer of a `KIVICache` (see module docstring). bits in 1..8; group: K tokens per scale;
    residual: R, a positive multiple of group; v_group: V channels per scale (None: whole head)."""

    is_sliding = False

    def __init__(self, bits: int, group: int, residual: int, v_group: int | None = 32) -> None:
        super().__init__()
        self.bits, self.group, self.residual, self.v_group = bits, group, residual, v_group
        self.reset()

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None  # unused: storage below
        self.k_codes = self.k_lo = self.k_step = None  # (B, H, Tq, nb) uint8 ; (B, H, Tq/g, D) fp16
        self.v_codes = self.v_lo = self.v_step = None  # (B, H, Tv, nb) uint8 ; (B, H, Tv, D/vg) fp16
        self.k_raw = self.v_raw = None  # (B, H, L mod R, D) ; (B, H, min(L, R), D), model dtype
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        if self.v_group is not None and self.head_dim % self.v_group:
            raise PeerError(f"KIVI v_group={self.v_group} must divide head_dim={self.head_dim}")
        self.k_raw, self.v_raw = key_states[:, :, :0], value_states[:, :, :0]
        self.is_initialized = True

    # -- storage ---------------------------------------------------------------------------------
    def _read_k(self) -> torch.Tensor:
        """(B, H, S, D): dequantised K groups, then the raw K residual."""
        if self.k_codes is None:
            return self.k_raw
        B, H, Tq, _ = self.k_codes.shape
        D, g = self.head_dim, self.group
        codes = unpack_codes(self.k_codes, self.bits, D).view(B, H, Tq // g, g, D).transpose(3, 4)  # (B,H,G,D,g)
        k = dequantize_minmax(codes, self.k_lo.unsqueeze(-1), self.k_step.unsqueeze(-1))  # (B, H, G, D, g)
        return torch.cat([k.transpose(3, 4).reshape(B, H, Tq, D).to(self.dtype), self.k_raw], dim=2)

    def _read_v(self) -> torch.Tensor:
        """(B, H, S, D): dequantised V tokens, then the raw V residual."""
        if self.v_codes is None:
            return self.v_raw
        codes = unpack_codes(self.v_codes, self.bits, self.head_dim)
        v = dequantize_minmax(codes, self.v_lo, self.v_step, self.v_group)
        return torch.cat([v.to(self.dtype), self.v_raw], dim=2)

    def _spill(self) -> None:
        """Quantise whole R-token K blocks (leaving L mod R raw) and the V tokens older than the newest R."""
        B, H, Tk, D = self.k_raw.shape
        n = (Tk // self.residual) * self.residual
        if n:
            G = n // self.group
            x = self.k_raw[:, :, :n].reshape(B, H, G, self.group, D).transpose(3, 4)  # (B, H, G, D, g)
            codes, lo, step = quantize_minmax(x, self.bits)  # lo/step (B, H, G, D, 1)
            packed = pack_codes(codes.transpose(3, 4).reshape(B, H, n, D), self.bits)
            self.k_codes = _cat(self.k_codes, packed)
            self.k_lo, self.k_step = _cat(self.k_lo, lo.squeeze(-1)), _cat(self.k_step, step.squeeze(-1))
            self.k_raw = self.k_raw[:, :, n:].contiguous()
        n = self.v_raw.shape[2] - self.residual
        if n > 0:
            codes, lo, step = quantize_minmax(self.v_raw[:, :, :n], self.bits, self.v_group)
            self.v_codes = _cat(self.v_codes, pack_codes(codes, self.bits))
            self.v_lo, self.v_step = _cat(self.v_lo, lo), _cat(self.v_step, step)
            self.v_raw = self.v_raw[:, :, n:].contiguous()

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's K/V (B, H, q, D); return every row (B, H, S + q, D), the step's own exact."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        k_out = torch.cat([self._read_k(), key_states], dim=2)
        v_out = torch.cat([self._read_v(), value_states], dim=2)
        self.k_raw = torch.cat([self.k_raw, key_states], dim=2)
        self.v_raw = torch.cat([self.v_raw, value_states], dim=2)
        self.length += key_states.shape[2]
        self._spill()
        return k_out, v_out

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def _tensors(self) -> dict[str, torch.Tensor | None]:
        return {"k_codes": self.k_codes, "k_lo": self.k_lo, "k_step": self.k_step, "k_raw": self.k_raw,
                "v_codes": self.v_codes, "v_lo": self.v_lo, "v_step": self.v_step, "v_raw": self.v_raw}

    def _map_batch(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        for name, t in self._tensors().items():
            if t is not None:
                setattr(self, name, fn(t))
        if self.is_initialized:
            self.batch_size = self.k_raw.shape[0]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("KIVICache cannot be cropped (rows are quantised in groups)")

    def memory(self) -> dict[str, int]:
        t = {k: (int(v.nbytes) if v is not None else 0) for k, v in self._tensors().items()}
        elem = torch.empty((), dtype=self.dtype).element_size() if self.is_initialized else 0
        return {
            "k_bytes": t["k_codes"] + t["k_lo"] + t["k_step"],
            "v_bytes": t["v_codes"] + t["v_lo"] + t["v_step"],
            "index_bytes": 0,
            "window_bytes": t["k_raw"] + t["v_raw"],
            "v_window_bytes": t["v_raw"],
            "other_bytes": 0,
            "uncompressed_bytes": 2 * self.length * elem * self.num_heads * self.head_dim * self.batch_size
            if self.is_initialized else 0,
        }


class KIVICache(Cache):
    """transformers Cache of `KIVILayer`s; `memory()` -> CacheMemory (bytes of every held tensor)."""

    teacher_forced_exact = False  # a first forward reads its own rows before they are quantised

    def __init__(self, num_layers: int, bits: int = 2, group: int = 32, residual: int = 128, v_group: int | None = 32) -> None:
        KIVI(bits=bits, group=group, residual=residual, v_group=v_group)  # validates
        self.pruner = None
        super().__init__(layers=[KIVILayer(bits, group, residual, v_group) for _ in range(num_layers)])

    def memory(self) -> CacheMemory:
        per = [layer.memory() for layer in self.layers]
        tot = {k: sum(p[k] for p in per) for k in per[0]}
        total = tot["k_bytes"] + tot["v_bytes"] + tot["index_bytes"] + tot["window_bytes"] + tot["other_bytes"]
        first = self.layers[0]
        return CacheMemory(total_bytes=total, tokens=first.length,
                           batch=first.batch_size if first.is_initialized else 0, **tot)


@register_peer
@dataclass
class KIVI(Peer):
    """bits: code width (KIVI: 2 and 4); group: K tokens per per-channel scale (reference
    `group_size`, paper: 32); residual: R, the K flush block and V full-precision window (paper: 128;
    must be a multiple of group, as the reference asserts); v_group: V channels per per-token scale
    (reference: the same `group_size`, 32; None: one scale per head vector)."""

    name = "kivi"
    bits: int = 2
    group: int = 32
    residual: int = 128
    v_group: int | None = 32

    def __post_init__(self) -> None:
        check_int("KIVI", "bits", self.bits, 1)
        if self.bits > 8:
            raise PeerError(f"KIVI.bits must be in 1..8, got {self.bits}")
        check_int("KIVI", "group", self.group, 1)
        check_int("KIVI", "residual", self.residual, 1)
        if self.residual % self.group:
            raise PeerError(f"KIVI.residual must be a multiple of group (the reference asserts it), "
                            f"got residual={self.residual}, group={self.group}")
        if self.v_group is not None:
            check_int("KIVI", "v_group", self.v_group, 1)

    def setting(self) -> str:
        return f"{self.bits}-bit g={self.group} R={self.residual} vg={self.v_group or 'D'}"

    def cache_factory(self, model: Any) -> Callable[[], KIVICache]:
        layers = model_layout(model)[0]
        return lambda: KIVICache(layers, self.bits, self.group, self.residual, self.v_group)
