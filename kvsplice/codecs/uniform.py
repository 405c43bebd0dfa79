"""`uniform`: plain per-token (per-group) integer quantisation, the peer every transform coder
must beat. Each vector's D values are split into groups of `group` (default: the whole vector);
each group stores fp16 min and fp16 step ("minmax", asymmetric) or fp16 absmax ("absmax",
symmetric mid-rise), and `bits`-bit codes packed into uint8.

Bytes per vector: ceil(D * bits / 8) + 2 * (D / group) * (2 for minmax, 1 for absmax).
Nothing is learned: `fit` only records D.
"""

from __future__ import annotations

import torch

from kvsplice.codecs.base import Codec, register
from kvsplice.codecs.quant import (
    MAX_BITS,
    dequantize_absmax,
    dequantize_minmax,
    pack_codes,
    packed_nbytes,
    quantize_absmax,
    quantize_minmax,
    unpack_codes,
)
from kvsplice.errors import CodecError

MODES = ("minmax", "absmax")


@register
class Uniform(Codec):
    """params: bits (code width, int 1..8), group (values per scale group; None = D), mode."""

    name = "uniform"

    def __init__(self, bits: int = 4, group: int | None = None, mode: str = "minmax") -> None:
        if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
            raise CodecError(f"uniform: bits must be an integer in [1, {MAX_BITS}], got {bits!r}")
        if group is not None and (isinstance(group, bool) or not isinstance(group, int) or group < 1):
            raise CodecError(f"uniform: group must be a positive integer or None, got {group!r}")
        if mode not in MODES:
            raise CodecError(f"uniform: mode must be one of {MODES}, got {mode!r}")
        super().__init__(bits=bits, group=group, mode=mode)
        self.bits, self.group, self.mode = bits, group, mode

    def _check_group(self, D: int) -> None:
        if self.group is not None and D % self.group:
            raise CodecError(f"uniform: group={self.group} must divide the vector dimension D={D}")

    def fit(self, x: torch.Tensor) -> "Uniform":
        D = self._check_fit_input(x, min_rows=1).shape[1]
        self._check_group(D)
        self.dim = D
        return self

    @property
    def n_groups(self) -> int:
        return 1 if self.group is None else int(self.dim) // self.group

    # -- payload -------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., D) -> {"codes": uint8 (..., ceil(D*bits/8)), "lo"/"step" or "absmax": fp16 (..., G)}."""
        self._check_vectors(x, self.dim, "encode")
        if self.mode == "minmax":
            codes, lo, step = quantize_minmax(x, self.bits, self.group)
            return {"codes": pack_codes(codes, self.bits), "lo": lo, "step": step}
        codes, a = quantize_absmax(x, self.bits, self.group)
        return {"codes": pack_codes(codes, self.bits), "absmax": a}

    def decode(self, payload: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """payload -> (..., D) in `dtype` (float32 unless told)."""
        if self.dim is None:
            raise CodecError("uniform codec is not fitted; call fit() or load a geometry file first")
        codes = unpack_codes(payload["codes"], self.bits, self.dim)
        if self.mode == "minmax":
            return dequantize_minmax(codes, payload["lo"], payload["step"], self.group).to(dtype)
        return dequantize_absmax(codes, payload["absmax"], self.bits, self.group).to(dtype)

    def payload_bytes_per_vector(self, dtype: torch.dtype = torch.float32) -> float:
        """Exact: packed codes + fp16 scales (independent of the cache dtype)."""
        scales = 2 if self.mode == "minmax" else 1
        return float(packed_nbytes(self.bits, int(self.dim)) + 2 * scales * self.n_groups)

    # -- latent view: the dequantised vector itself ----------------------------------------------
    def compress(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x), x.dtype)

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        self._check_vectors(z, self.dim, "decompress")
        return z

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if self.dim is not None:
            self._check_group(int(self.dim))

    @property
    def latent_dim(self) -> int:
        return int(self.dim)
