"""`rot-uniform`: the calibration-free fallback. A fixed orthogonal rotation, then plain per-token
(per-group) integer quantisation (`uniform`), then the inverse rotation.

    y = x @ R                (..., D)   R (D, D): randomised Hadamard (D a power of two) or a seeded
                                        random orthogonal matrix (any D); depends on (D, seed) only
    codes, scales = Q(y)     per-token min-max (or absmax) quantiser of `uniform`, groups of `group`
    x_hat = Q^-1(codes) @ R^T

Why: a rotation spreads a vector's energy evenly over its coordinates (outlier channels of K, a few
large V coordinates), so a per-token range wastes far fewer levels on a few extreme values (the
QuaRot / QuIP# observation). Nothing here is fitted to text, so nothing can fail to transfer to
text unlike the calibration text; `fit(x)` only records D (x's values are ignored). The rotation is
stored in the geometry (so a file is self-contained) and checked to be orthogonal on load.

Bytes per vector: exactly those of `uniform` with the same bits / group / mode.
"""

from __future__ import annotations

import math

import torch

from kvsplice.codecs.base import TensorSpec, register
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
    """params: bits (int 1..8), group (values per scale group; None = D), mode ("minmax" | "absmax"),
    seed (int: which fixed rotation)."""

    name = "rot-uniform"

    def __init__(self, bits: int = 4, group: int | None = None, mode: str = "minmax", seed: int = 0) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise CodecError(f"rot-uniform: seed must be an integer >= 0, got {seed!r}")
        super().__init__(bits=bits, group=group, mode=mode)
        self.params["seed"] = seed
        self.seed = seed
        self.rotation: torch.Tensor | None = None  # (D, D)

    def fit(self, x: torch.Tensor) -> "RotatedUniform":
        super().fit(x)
        self.rotation = fixed_rotation(int(self.dim), self.seed)
        return self

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._check_vectors(x, self.dim, "encode")
        return super().encode(x.float() @ self.rotation.float())

    def decode(self, payload: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
        y = super().decode(payload, torch.float32)  # (..., D) rotated domain
        return (y @ self.rotation.float().T).to(dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"rotation": self.rotation}

    def state_spec(self) -> dict[str, TensorSpec]:
        D = int(self.dim)
        return {"rotation": TensorSpec((D, D), bound=1 + 1e-3)}  # orthogonality: load_state_tensors

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors(tensors)
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
