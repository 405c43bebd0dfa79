"""`pca`: mean + top-k principal directions. Compress = project, decompress = back-project.

Covariance is accumulated in float64 (V has large-magnitude outlier dims; float32 sums lose the
small eigenvalues), the basis is stored in float32.
"""

from __future__ import annotations

import torch

from kvsplice.codecs.base import Codec, TensorSpec, check_orthonormal_columns, register
from kvsplice.errors import CodecError


def fit_pca(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (N, D) -> mean (D,), basis (D, k) with orthonormal columns sorted by variance,
    variances (D,) of all principal directions (descending). Computed in float64."""
    x64 = x.double()
    mean = x64.mean(0)
    xc = x64 - mean
    cov = xc.T @ xc / max(x.shape[0] - 1, 1)  # (D, D)
    evals, evecs = torch.linalg.eigh(cov)  # ascending
    evals, evecs = evals.flip(0).clamp_min(0), evecs.flip(1)
    # Deterministic sign: make the largest-magnitude entry of each direction positive.
    idx = evecs.abs().argmax(0)
    signs = torch.sign(evecs[idx, torch.arange(evecs.shape[1])])
    evecs = evecs * torch.where(signs == 0, torch.ones_like(signs), signs)
    return mean.float(), evecs[:, :k].float().contiguous(), evals.float()


def check_rank(k: int, d: int, name: str) -> None:
    if not isinstance(k, int) or k < 1 or k > d:
        raise CodecError(f"{name}: rank k must be an integer in [1, D={d}], got {k!r}")


@register
class PCA(Codec):
    """params: k (latent dims)."""

    name = "pca"

    def __init__(self, k: int = 16) -> None:
        super().__init__(k=k)
        self.k = k
        self.mean: torch.Tensor | None = None  # (D,)
        self.basis: torch.Tensor | None = None  # (D, k)

    def fit(self, x: torch.Tensor) -> "PCA":
        x = self._check_fit_input(x)
        N, D = x.shape
        check_rank(self.k, D, self.name)
        if N < self.k:
            raise CodecError(f"pca: need at least k={self.k} calibration vectors, got N={N}")
        self.mean, self.basis, var = fit_pca(x, self.k)
        self.dim = D
        self.info = {"explained_variance": float(var[: self.k].sum() / var.sum().clamp_min(1e-30))}
        return self

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        self._check_vectors(x, self.dim, "compress")
        return ((x.to(self.basis.dtype) - self.mean) @ self.basis).to(x.dtype)

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        self._check_vectors(z, self.k, "decompress")
        return (z.to(self.basis.dtype) @ self.basis.T + self.mean).to(z.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"mean": self.mean, "basis": self.basis}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.mean, self.basis = tensors["mean"], tensors["basis"]

    def state_spec(self) -> dict[str, TensorSpec]:
        D = int(self.dim)
        return {"mean": TensorSpec((D,)), "basis": TensorSpec((D, self.k), bound=1 + 1e-3)}

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        check_orthonormal_columns(self.name, "basis", tensors["basis"])

    @property
    def latent_dim(self) -> int:
        return self.k
