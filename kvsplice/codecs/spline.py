"""The monotone per-dimension piecewise-linear warp `g` of the seed and its exact inverse.

Pure tensor math (no nn.Module, no transformers), vectorised over the D dimensions: the only
Python loops run over the K-1 segments (K = 7 by default), never over D.

A warp over D dimensions with K knots is held in *resolved form* (`Warp`):

    xk      (D, K)      knot positions in input units, non-decreasing along K
    yk      (D, K)      g at the knots (output units), non-decreasing along K
    slopes  (D, K-1)    dy/dx on each segment, > 0

    g_d(x) = yk[d, 0] + sum_j slopes[d, j] * (clamp(x, lo_j, hi_j) - xk[d, j])

with lo_j = xk[d, j] (lo_0 = -inf) and hi_j = xk[d, j+1] (hi_{K-2} = +inf): inside the knot range
this is the piecewise-linear interpolant, outside it extends linearly with the end slopes. The
inverse has the same form in y with slopes 1 / slopes, so it is exact (up to float rounding)
everywhere, far outside the knot range included. Zero-width segments (repeated quantiles,
constant dimensions) contribute nothing in either direction.

The trainable parametrisation is the seed's (`gpt2/kvsplice.py`, class PWLSpline): per dimension,
raw segment slopes `delta_raw` (D, K-1) mapped through softplus + eps and normalised so that their
knot-range-weighted mean is 1; a positive scale softplus(scale_raw) + 1e-3 (D,); a shift (D,).
`resolve` turns those into a `Warp`; `identity_params` gives the parameters whose warp is g(x) = x.
One difference from the seed, stated here so nobody has to diff it: the seed standardises each
dimension before the spline and anchors g at 0, so its untrained warp is a per-dimension
rescaling (correlation PCA); here g is anchored at the first knot with the learned scale
initialised to 1, so the untrained warp is the identity and training starts from plain PCA.
The seed's per-dimension reference loop is kept as `warp_loop` / `unwarp_loop` (benchmarks, tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

SLOPE_EPS = 1e-4  # seed: slopes = softplus(delta_raw) + eps
SCALE_EPS = 1e-3  # seed: scale = softplus(scale_raw) + 1e-3
AVG_MIN = 1e-6  # seed: clamp of the slope normaliser
MIN_SLOPE = 1e-12  # guard when dividing by a slope read from a file
# Values per block on the inference path: 2^15 is torch's intra-op grain size, so each elementwise
# op on a block runs on one thread. Larger blocks get split across threads per op, and on a shared
# 2-core machine every op then waits for a descheduled thread (measured: 10-20x slower).
_BLOCK = 1 << 15


@dataclass
class Warp:
    """Resolved warp: xk (D, K), yk (D, K), slopes (D, K-1); see the module docstring."""

    xk: torch.Tensor
    yk: torch.Tensor
    slopes: torch.Tensor

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return warp(x, self.xk, self.yk, self.slopes)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return unwarp(y, self.xk, self.yk, self.slopes)


def quantile_knots(x: torch.Tensor, knots: int) -> torch.Tensor:
    """Knots at per-dimension quantiles 0, 1/(K-1), ..., 1 of x (N, D) -> (D, K).

    Lower order statistics as in the seed (index floor(q * (N-1)) of the sorted column), so the
    knots are data points; repeated values give zero-width segments, which every function here handles.
    """
    n = x.shape[0]
    idx = torch.floor(torch.linspace(0.0, 1.0, knots, dtype=torch.float64) * (n - 1)).long().clamp_(0, n - 1)
    xt = x.detach().T.contiguous()  # (D, N)
    if xt.device.type == "cpu" and xt.dtype in (torch.float32, torch.float64):
        # order statistics by selection, O(N) per row (a full sort is the slow part of a fit)
        part = np.partition(xt.numpy(), idx.numpy(), axis=1)[:, idx.numpy()]
        return torch.from_numpy(np.ascontiguousarray(part)).to(x.dtype)
    xs, _ = torch.sort(xt, dim=1)
    return xs[:, idx.to(x.device)].contiguous()  # (D, K)


def normalised_slopes(xk: torch.Tensor, delta_raw: torch.Tensor, eps: float = SLOPE_EPS) -> torch.Tensor:
    """softplus(delta_raw) + eps, divided per dimension by its knot-range-weighted mean. (D, K-1).

    A dimension whose knots all coincide (constant in the data) has no range to weight by; its
    slopes are divided by their plain mean instead of by the seed's clamp value (which would
    multiply them by 1e6 and blow up any value off the constant).
    """
    dx = xk[:, 1:] - xk[:, :-1]  # (D, K-1), >= 0
    s = F.softplus(delta_raw) + eps
    total = dx.sum(1, keepdim=True)  # (D, 1)
    weighted = (s * dx).sum(1, keepdim=True) / torch.where(total > 0, total, torch.ones_like(total))
    avg = torch.where(total > 0, weighted, s.mean(1, keepdim=True)).clamp_min(AVG_MIN)
    return s / avg


def resolve(
    xk: torch.Tensor,
    delta_raw: torch.Tensor,
    scale_raw: torch.Tensor,
    shift: torch.Tensor,
    eps: float = SLOPE_EPS,
) -> Warp:
    """Parameters -> Warp. xk (D, K), delta_raw (D, K-1), scale_raw (D,), shift (D,) in input units.

    g(x) = xk[:, 0] + shift + scale * spline(x), spline(xk[:, 0]) = 0, so slopes = scale * s and
    yk = xk[:, 0] + shift + scale * cumsum(s * dx). Differentiable in every parameter.
    """
    s = normalised_slopes(xk, delta_raw, eps)  # (D, K-1)
    scale = F.softplus(scale_raw) + SCALE_EPS  # (D,)
    slopes = s * scale[:, None]
    rise = torch.cumsum(slopes * (xk[:, 1:] - xk[:, :-1]), dim=1)  # (D, K-1)
    y0 = xk[:, :1] + shift[:, None]  # (D, 1)
    yk = torch.cat([y0, y0 + rise], dim=1)  # (D, K)
    return Warp(xk, yk, slopes)


def identity_params(xk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(delta_raw, scale_raw, shift) whose resolved warp is g(x) = x (to float rounding)."""
    d, k = xk.shape
    scale_raw = math.log(math.expm1(1.0 - SCALE_EPS))  # softplus^-1(1 - 1e-3)
    return (
        torch.zeros(d, k - 1, dtype=xk.dtype, device=xk.device),
        torch.full((d,), scale_raw, dtype=xk.dtype, device=xk.device),
        torch.zeros(d, dtype=xk.dtype, device=xk.device),
    )


def _segments(knots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, K) knots -> lower/upper clamp bounds (D, K-1), outermost ones open (-inf / +inf)."""
    lo = knots[:, :-1].clone()
    hi = knots[:, 1:].clone()
    lo[:, 0] = -math.inf
    hi[:, -1] = math.inf
    return lo, hi


def _piecewise(x: torch.Tensor, k0: torch.Tensor, v0: torch.Tensor, knots: torch.Tensor, rates: torch.Tensor) -> torch.Tensor:
    """v0 + sum_j rates_j * (clamp(x, lo_j, hi_j) - knots_j); x (..., D), tables (D, K) / (D, K-1)."""
    lo, hi = _segments(knots)
    n_seg = rates.shape[1]
    if torch.is_grad_enabled() and (x.requires_grad or rates.requires_grad or knots.requires_grad):
        out = v0 + rates[:, 0] * (torch.clamp(x, max=hi[:, 0]) - k0)  # first segment: open below
        for j in range(1, n_seg):  # K-2 more segments; vectorised over D and the batch
            out = out + rates[:, j] * (torch.clamp(x, min=lo[:, j], max=hi[:, j]) - knots[:, j])
        return out
    # Inference path: the same sum in place, on row blocks of ~2^15 values so that the 4(K-1)
    # elementwise passes run in cache instead of streaming the whole tensor from memory each time.
    dtype = torch.result_type(x, rates)
    d = x.shape[-1]
    flat = x.reshape(-1, d)
    out = torch.empty(flat.shape, dtype=dtype, device=x.device)
    step = max(1, _BLOCK // max(d, 1))
    for r in range(0, flat.shape[0], step):
        xb, ob = flat[r : r + step], out[r : r + step]
        torch.clamp(xb, max=hi[:, 0], out=ob).sub_(k0).mul_(rates[:, 0]).add_(v0)
        for j in range(1, n_seg):
            t = torch.clamp(xb, min=lo[:, j])
            if j < n_seg - 1:
                t.clamp_(max=hi[:, j])
            ob.addcmul_(t.sub_(knots[:, j]), rates[:, j])
    return out.reshape(x.shape)


def warp(x: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """g(x): x (..., D) -> (..., D), computed in the tables' dtype broadcast with x's."""
    return _piecewise(x, xk[:, 0], yk[:, 0], xk, slopes)


def unwarp(y: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """g^-1(y): y (..., D) -> (..., D). Exact analytic inverse of `warp`, extrapolation included."""
    return _piecewise(y, yk[:, 0], xk[:, 0], yk, 1.0 / slopes.clamp_min(MIN_SLOPE))


# -- the seed's reference shape: one Python iteration per dimension (benchmarks and tests only) --
def _piecewise_loop(v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """One Python iteration per dimension: dst + slope * (v - src) on v's knot interval. v (N, D)."""
    d, k = src.shape
    cols = []
    for j in range(d):
        vj = v[..., j].contiguous()
        i0 = torch.searchsorted(src[j].contiguous(), vj).clamp(1, k - 1) - 1
        cols.append(dst[j, i0] + slopes[j, i0] * (vj - src[j, i0]))
    return torch.stack(cols, dim=-1)


def warp_loop(x: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Reference g: searchsorted per dimension, as in the seed's PWLSpline.forward. x (N, D)."""
    return _piecewise_loop(x, xk, yk, slopes)


def unwarp_loop(y: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """Reference g^-1: searchsorted per dimension, as in the seed's PWLSpline.inverse. y (N, D)."""
    return _piecewise_loop(y, yk, xk, 1.0 / slopes.clamp_min(MIN_SLOPE))
