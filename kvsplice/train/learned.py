"""Learned low-rank V compression (the seed's comparison target), trained end to end with the LM loss.

Per layer, shared by the layer's heads, on each V vector (D = head_dim):
    u = v * scale + shift            (optional learned per-dimension affine; scale 1, shift 0 at init)
    z = u @ compress                 # (..., k)   what a cache would store
    v_hat = (z @ expand - shift) / scale
compress (D, k) starts with orthonormal columns (torch.nn.init.orthogonal_), expand = compress^T,
so at init v_hat is the orthogonal projection of v on a random k-dim subspace.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from kvsplice.errors import KVSpliceError


class LearnedVCompressor(nn.Module):
    """D -> k -> D linear bottleneck. Parameters: compress (D, k), expand (k, D), and with
    `affine`: scale (D,), shift (D,)."""

    def __init__(self, dim: int, k: int, affine: bool = False, generator: torch.Generator | None = None) -> None:
        super().__init__()
        if not isinstance(k, int) or not 1 <= k <= dim:
            raise KVSpliceError(f"learned compression rank must be an integer in [1, {dim}], got {k!r}")
        w = torch.empty(dim, k)
        nn.init.orthogonal_(w, generator=generator)
        self.compress = nn.Parameter(w)  # (D, k)
        self.expand = nn.Parameter(w.T.clone())  # (k, D)
        self.affine = affine
        if affine:
            self.scale = nn.Parameter(torch.ones(dim))
            self.shift = nn.Parameter(torch.zeros(dim))

    @property
    def latent_dim(self) -> int:
        return self.compress.shape[1]

    def _scale(self) -> torch.Tensor:
        # keep |scale| >= 1e-3 so the inverse affine stays finite
        s = self.scale
        return torch.where(s.abs() < 1e-3, torch.full_like(s, 1e-3) * torch.sign(s + 1e-12), s)

    def encode(self, v: torch.Tensor) -> torch.Tensor:
        """v: (..., D) -> z (..., k)."""
        if self.affine:
            v = v * self._scale() + self.shift
        return v @ self.compress

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """z: (..., k) -> (..., D)."""
        u = z @ self.expand
        if self.affine:
            u = (u - self.shift) / self._scale()
        return u

    def forward(self, v: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(v))

    def payload_nbytes(self, v: torch.Tensor) -> int:
        """Bytes a cache holding these vectors would store (the latents)."""
        return self.encode(v).nbytes
