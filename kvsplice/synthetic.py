"""A synthetic V-like data set for the seed's standalone validation (`kvsplice validate --synthetic`).

64-dimensional vectors built in four steps, all from one seeded torch.Generator (float64, returned
as float32), so the same arguments always give the same tensors:

1. Heavy-tailed latent factors: 16 independent Student-t variables with 4 degrees of freedom
   (a normal divided by the root of a chi-square/4), factor j scaled by (1 + j)^-0.8 so the
   spectrum decays like a real value cache's.
2. Correlation: the factors are mixed into 64 dimensions by a fixed Gaussian matrix (16, 64),
   plus independent Gaussian noise of 0.05 (per unit-variance dimension); each dimension is then
   standardised with the statistics of a fixed-seed pilot draw.
3. Non-linear per-dimension warp (monotone, so a per-dimension spline can undo it): dimension d
   gets one of three families, in turn: u + a u|u| (tails stretched, a in [0.1, 0.3]),
   asinh(a u) / a (tails compressed, a in [0.7, 2]), u + a relu(u)^2 (one-sided skew, a in [0.1, 0.3]).
4. V-like scales: a per-dimension log-normal scale (sigma 0.5) and offset (N(0, 0.3)); two
   dimensions are outliers with 6x the scale, as the large-magnitude channels of real V caches.

Train and test sets are separate draws from the same distribution (different generator streams).
`make_synthetic()` defaults to 100 000 train and 20 000 test vectors.
"""

from __future__ import annotations

import torch

DIM = 64
FACTORS = 16
DOF = 4


def _structure(dim: int, seed: int) -> dict[str, torch.Tensor]:
    """The fixed part of the distribution (mixing matrix, warps, scales), from `seed`."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(FACTORS, dim, generator=g, dtype=torch.float64) / FACTORS**0.5
    family = torch.arange(dim) % 3
    a_stretch = 0.1 + 0.2 * torch.rand(dim, generator=g, dtype=torch.float64)
    a_squash = 0.7 + 1.3 * torch.rand(dim, generator=g, dtype=torch.float64)
    scale = torch.exp(0.5 * torch.randn(dim, generator=g, dtype=torch.float64))
    scale[torch.randperm(dim, generator=g)[:2]] *= 6.0
    offset = 0.3 * torch.randn(dim, generator=g, dtype=torch.float64)
    return {"mix": mix, "family": family, "a_stretch": a_stretch, "a_squash": a_squash, "scale": scale, "offset": offset}


def _draw(n: int, s: dict[str, torch.Tensor], g: torch.Generator) -> torch.Tensor:
    """Unwarped correlated heavy-tailed vectors (n, dim), float64."""
    dim = s["mix"].shape[1]
    normal = torch.randn(n, FACTORS, generator=g, dtype=torch.float64)
    chi2 = (torch.randn(n, FACTORS, DOF, generator=g, dtype=torch.float64) ** 2).sum(-1)
    t = normal / torch.sqrt(chi2 / DOF)  # (n, FACTORS) Student-t, dof 4
    t = t * (1.0 + torch.arange(FACTORS, dtype=torch.float64)) ** -0.8
    return t @ s["mix"] + 0.05 * torch.randn(n, dim, generator=g, dtype=torch.float64)  # (n, dim)


def _warp(u: torch.Tensor, s: dict[str, torch.Tensor]) -> torch.Tensor:
    stretch = u + s["a_stretch"] * u * u.abs()
    squash = torch.asinh(s["a_squash"] * u) / s["a_squash"]
    skew = u + s["a_stretch"] * torch.relu(u) ** 2
    fam = s["family"]
    out = torch.where(fam == 0, stretch, torch.where(fam == 1, squash, skew))
    return out * s["scale"] + s["offset"]


def make_synthetic(
    n_train: int = 100_000, n_test: int = 20_000, dim: int = DIM, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (train (n_train, dim), test (n_test, dim)) float32, deterministic in all arguments."""
    s = _structure(dim, seed)
    pilot = _draw(20_000, s, torch.Generator().manual_seed(seed + 1))
    mu, sd = pilot.mean(0), pilot.std(0)
    out = []
    for stream, n in ((seed + 2, n_train), (seed + 3, n_test)):
        u = (_draw(n, s, torch.Generator().manual_seed(stream)) - mu) / sd
        out.append(_warp(u, s).float())
    return out[0], out[1]
