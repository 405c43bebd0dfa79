"""`rot-uniform`: the calibration-free fallback. A fixed orthogonal rotation, then plain per-token
(per-group) integer quantisation (`uniform`), then the inverse rotation.

    y = x @ R                (..., D)   R (D, D): randomised Hadamard (D a power of two) or a seeded
                                        random orthogonal matrix (any D); depends on (D, seed) only
    codes, scales = Q(y)     per-token (per-group of `group` values) quantiser:
                               "minmax"  fp16 lo + step per group, levels over [min, max] (`uniform`)
                               "absmax"  fp16 max|y| per group, mid-rise over [-max, max] (`uniform`)
                               "rms"     fp16 r = rms(y) per group, mid-rise over [-c r, c r]; c = `clip`
                                         (default: the MSE-optimal clip of a unit Gaussian for `bits`,
                                         `GAUSSIAN_CLIP`): after a random rotation the coordinates of a
                                         vector are close to Gaussian, so a range from the RMS wastes
                                         no levels on the one extreme coordinate min-max must cover
    x_hat = Q^-1(codes) @ R^T (+ mean with center=True)

center=True subtracts a mean vector (D,) before the rotation: the ONLY statistic fitted from the
calibration vectors (K has large per-channel offsets a per-token range would otherwise spend its
levels on). Everything else depends on (D, seed, bits) only.

Why: a rotation spreads a vector's energy evenly over its coordinates (outlier channels of K, a few
large V coordinates), so a per-token range wastes far fewer levels on a few extreme values (the
QuaRot / QuIP# observation). Nothing here is fitted to text, so nothing can fail to transfer to
text unlike the calibration text; `fit(x)` only records D (x's values are ignored). The rotation is
stored in the geometry (so a file is self-contained) and checked to be orthogonal on load.

Bytes per vector: exactly those of `uniform` with the same bits / group / mode ("rms": as "absmax",
one fp16 per group): ceil(D * bits / 8) + 2 * (D / group) * (2 for minmax, 1 otherwise).
"""

from __future__ import annotations

import math

import torch

from kvsplice.codecs.base import TensorSpec, register
from kvsplice.codecs.quant import (
    FP16_MAX,
    GAUSSIAN_CLIP,
    _groups,
    midrise_codes,
    midrise_values,
    pack_codes,
    unpack_codes,
)
from kvsplice.codecs.uniform import Uniform
from kvsplice.errors import CodecError


def hadamard(n: int) -> torch.Tensor:
    """Normalised Sylvester Hadamard matrix (n, n), n a power of two, float64: H @ H.T = I."""
    if n < 1 or n & (n - 1):
        raise CodecError(f"hadamard: n must be a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def fixed_rotation(D: int, seed: int = 0) -> torch.Tensor:
    """A data-independent orthogonal (D, D) float32 matrix, deterministic in (D, seed).
    Power-of-two D: diag(random signs) @ Hadamard. Otherwise: Q of the QR of a seeded Gaussian
    matrix with the sign convention diag(R) > 0 (Haar-distributed, unique)."""
    g = torch.Generator().manual_seed(int(seed))
    if D & (D - 1) == 0:
        signs = torch.randint(0, 2, (D,), generator=g, dtype=torch.float64) * 2 - 1
        return (signs[:, None] * hadamard(D)).float()
    q, r = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))
    return (q * torch.sign(torch.diagonal(r))).float()


@register
class RotatedUniform(Uniform):
    """params: bits (int 1..8), group (values per scale group; None = D), mode ("minmax" | "absmax" |
    "rms"), seed (int: which fixed rotation), clip ("rms" only: range in RMS units; None = Gaussian-
    optimal for `bits`), center (bool: subtract the calibration mean before rotating)."""

    name = "rot-uniform"
    MODES = ("minmax", "absmax", "rms")

    def __init__(self, bits: int = 4, group: int | None = None, mode: str = "minmax", seed: int = 0,
                 clip: float | None = None, center: bool = False) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise CodecError(f"rot-uniform: seed must be an integer >= 0, got {seed!r}")
        if mode not in self.MODES:
            raise CodecError(f"rot-uniform: mode must be one of {self.MODES}, got {mode!r}")
        if clip is not None and (mode != "rms" or isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not 0 < clip < 64):
            raise CodecError(f"rot-uniform: clip must be None or a number in (0, 64) with mode='rms', got {clip!r} (mode {mode!r})")
        if not isinstance(center, bool):
            raise CodecError(f"rot-uniform: center must be a bool, got {center!r}")
        # "rms" has the byte layout of "absmax" (one fp16 per group): validate as that
        super().__init__(bits=bits, group=group, mode="absmax" if mode == "rms" else mode)
        self.params.update(mode=mode, seed=seed, clip=clip, center=center)
        self.mode, self.seed, self.clip, self.center = mode, seed, clip, center
        self.rotation: torch.Tensor | None = None  # (D, D)
        self.mean: torch.Tensor | None = None  # (D,) with center=True

    @property
    def clip_rms(self) -> float:
        """Range of the "rms" quantiser in units of the group's RMS."""
        return float(GAUSSIAN_CLIP[self.bits] if self.clip is None else self.clip)

    def fit(self, x: torch.Tensor) -> "RotatedUniform":
        super().fit(x)
        self.rotation = fixed_rotation(int(self.dim), self.seed)
        self.mean = x.float().mean(0) if self.center else None
        return self

    def _rotate(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        return (x - self.mean.float() if self.center else x) @ self.rotation.float()

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., D) -> {"codes": uint8 (..., ceil(D*bits/8)), "lo"/"step" | "absmax" | "rms": fp16 (..., G)}."""
        self._check_vectors(x, self.dim, "encode")
        y = self._rotate(x)
        if self.mode != "rms":
            return super().encode(y)
        yg, _ = _groups(y.clamp(-FP16_MAX, FP16_MAX), self.group)  # (..., G, g)
        r = yg.pow(2).mean(-1).sqrt().clamp(2**-24, FP16_MAX / self.clip_rms).half()  # (..., G)
        codes = midrise_codes(yg, self.clip_rms * r.float().unsqueeze(-1), 1 << self.bits)
        return {"codes": pack_codes(codes.reshape(y.shape), self.bits), "rms": r}

    def decode(self, payload: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.mode == "rms":
            if self.dim is None:
                raise CodecError("rot-uniform codec is not fitted; call fit() or load a geometry file first")
            codes = unpack_codes(payload["codes"], self.bits, self.dim)
            cg, _ = _groups(codes, self.group)
            y = midrise_values(cg, self.clip_rms * payload["rms"].float().unsqueeze(-1), 1 << self.bits).reshape(codes.shape)
        else:
            y = super().decode(payload, torch.float32)  # (..., D) rotated domain
        x = y @ self.rotation.float().T
        return (x + self.mean.float() if self.center else x).to(dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"rotation": self.rotation, **({"mean": self.mean} if self.center else {})}

    def state_spec(self) -> dict[str, TensorSpec]:
        D = int(self.dim)
        spec = {"rotation": TensorSpec((D, D), bound=1 + 1e-3)}  # orthogonality: load_state_tensors
        if self.center:
            spec["mean"] = TensorSpec((D,))
        return spec

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
        if self.center:
            m = tensors.get("mean")
            if m is None or not isinstance(m, torch.Tensor) or not m.is_floating_point() or m.ndim != 1 \
                    or (self.dim is not None and m.shape[0] != int(self.dim)) or not bool(torch.isfinite(m).all()):
                raise CodecError(f"rot-uniform: center=True needs a finite floating 'mean' of shape ({self.dim},), "
                                 f"found {None if m is None else (m.dtype, tuple(m.shape))}")
            self.mean = m
        rot = tensors.get("rotation")
        D = int(self.dim) if self.dim is not None else None
        if rot is None or not isinstance(rot, torch.Tensor) or not rot.is_floating_point() or rot.ndim != 2 \
                or (D is not None and tuple(rot.shape) != (D, D)):
            raise CodecError(f"rot-uniform: state needs a floating 'rotation' of shape ({D}, {D}), "
                             f"found {None if rot is None else (rot.dtype, tuple(rot.shape))}")
        eye = torch.eye(rot.shape[0], dtype=torch.float64, device=rot.device)
        err = float((rot.double() @ rot.double().T - eye).abs().max()) if bool(torch.isfinite(rot).all()) else math.inf
        if err > 1e-4:
            raise CodecError(f"rot-uniform: stored rotation is not orthogonal (max |R R^T - I| = {err:.3g})")
        self.rotation = rot
