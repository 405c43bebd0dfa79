"""Per-dimension monotone warps used as companders in front of a quantiser (pure tensor math).

A warp maps (..., D) -> (..., D) one dimension at a time with a strictly increasing function,
and has an exact inverse. Every warp here is piecewise linear: per dimension, knots xk (D, K)
and values yk (D, K), linear extrapolation beyond the end knots with the end slopes.

- "none": identity.
- "bennett": the compander that is MSE-optimal for fine scalar quantisation of that dimension
  (Bennett 1948 / Panter-Dite): slope proportional to p(x)^(1/3), p estimated by a histogram on
  the calibration data; rescaled so the warped dimension keeps its mean and standard deviation.
  A closed-form compander fitted for quantisation error (no training).
- "spline": the seed's trained spline `g` (kvsplice/codecs/spline.py), fitted for truncation.
- "qspline": the same spline parametrisation trained on the transform coder's quantisation
  round-trip error (kvsplice/codecs/qspline.py).
"""

from __future__ import annotations

import torch

from kvsplice.codecs.base import TensorSpec, check_increasing
from kvsplice.errors import CodecError


def _interp(x: torch.Tensor, xk: torch.Tensor, yk: torch.Tensor) -> torch.Tensor:
    """Per-dimension piecewise-linear interpolation. x (..., D); xk, yk (D, K) increasing."""
    shape = x.shape
    xt = x.reshape(-1, shape[-1]).T.contiguous().to(xk.dtype)  # (D, M)
    K = xk.shape[1]
    i = torch.searchsorted(xk, xt).clamp(1, K - 1)  # (D, M) right knot index
    x0, x1 = xk.gather(1, i - 1), xk.gather(1, i)
    y0, y1 = yk.gather(1, i - 1), yk.gather(1, i)
    t = (xt - x0) / (x1 - x0)
    return (y0 + t * (y1 - y0)).T.reshape(shape).to(x.dtype)


class Warp:
    """Identity warp; base class. Subclasses keep their tensors in `state_tensors()`.
    `fit(x, codec)` gets the calibration vectors (N, D) and the transform codec being fitted
    (quantisation-aware warps use its quantiser); `info` holds fit diagnostics."""

    kind = "none"

    def __init__(self) -> None:
        self.info: dict = {}

    def fit(self, x: torch.Tensor, codec=None) -> None:
        pass

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def state_spec(self, D: int) -> dict[str, TensorSpec]:
        """{name: TensorSpec} of this warp's state for dimension D (see Codec.state_spec)."""
        return {}

    def check_state(self, tensors: dict[str, torch.Tensor], owner: str) -> None:
        """Checks beyond the spec (monotone knots, positive slopes); `owner` names the codec."""


class PiecewiseLinearWarp(Warp):
    """Knots xk (D, K), values yk (D, K), both strictly increasing along K."""

    def __init__(self) -> None:
        super().__init__()
        self.xk: torch.Tensor | None = None
        self.yk: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _interp(x, self.xk, self.yk)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return _interp(y, self.yk, self.xk)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"xk": self.xk, "yk": self.yk}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        try:
            self.xk, self.yk = tensors["xk"], tensors["yk"]
        except KeyError as e:
            raise CodecError(f"{self.kind} warp state is missing tensor {e}") from e
        if self.xk.shape != self.yk.shape or self.xk.ndim != 2:
            raise CodecError(f"{self.kind} warp: knots {tuple(self.xk.shape)} and values {tuple(self.yk.shape)} must be equal (D, K)")

    def check_state(self, tensors: dict[str, torch.Tensor], owner: str) -> None:
        # interpolation divides by knot gaps: repeated knots would give NaN
        for nm in ("xk", "yk"):
            check_increasing(owner, f"{self.kind} warp {nm}", tensors[nm], strict=True)


class BennettWarp(PiecewiseLinearWarp):
    """Slope ~ p(x)^(1/3) between the `tail` and 1-`tail` quantiles, `knots` knots per dim."""

    kind = "bennett"

    def __init__(self, knots: int = 33, tail: float = 1e-3, floor: float = 0.05) -> None:
        super().__init__()
        if not isinstance(knots, int) or knots < 3:
            raise CodecError(f"bennett warp needs an integer >= 3 knots, got {knots!r}")
        self.knots, self.tail, self.floor = knots, tail, floor

    def fit(self, x: torch.Tensor, codec=None) -> None:
        x = x.double()  # (N, D)
        N, D = x.shape
        q = torch.tensor([self.tail, 1 - self.tail], dtype=x.dtype)
        lo, hi = torch.quantile(x[: min(N, 200_000)], q, dim=0)  # (D,), (D,)
        width = (hi - lo).clamp_min(1e-12)
        K = self.knots
        xk = lo[:, None] + width[:, None] * torch.linspace(0, 1, K, dtype=x.dtype)[None]  # (D, K)
        bins = ((x - lo) / width * (K - 1)).floor().clamp(0, K - 2).long()  # (N, D)
        counts = torch.zeros(D, K - 1, dtype=x.dtype).scatter_add_(1, bins.T, torch.ones_like(bins.T, dtype=x.dtype))
        dens = counts / counts.sum(1, keepdim=True)
        # density^(1/3), floored so no segment is flat (keeps the warp strictly increasing)
        slope = dens.pow(1 / 3)
        slope = slope.clamp_min(self.floor * slope.mean(1, keepdim=True))
        yk = torch.cat([torch.zeros(D, 1, dtype=x.dtype), slope.cumsum(1)], 1)  # (D, K)
        # keep each dimension's mean and std: affine map fitted on the calibration data
        w = _interp(x, xk, yk)
        a = x.std(0) / w.std(0).clamp_min(1e-12)
        b = x.mean(0) - a * w.mean(0)
        yk = a[:, None] * yk + b[:, None]
        # extend with end segments of slope 1 so out-of-range values map (nearly) linearly
        span = 8 * width[:, None]
        self.xk = torch.cat([xk[:, :1] - span, xk, xk[:, -1:] + span], 1).float()
        self.yk = torch.cat([yk[:, :1] - span, yk, yk[:, -1:] + span], 1).float()
        # a (nearly) constant dimension has no density to follow: its knots collapse in float32 and
        # the warp would divide by zero (NaN, then a LinAlgError in the rotation fit)
        flat = torch.nonzero(((self.xk.diff(dim=1) <= 0) | (self.yk.diff(dim=1) <= 0)).any(1)).flatten().tolist()
        if flat:
            raise CodecError(
                f"bennett warp: dimension(s) {flat[:10]}{' ...' if len(flat) > 10 else ''} of {D} are constant on the "
                f"calibration data (quantile range {float(width[flat[0]]):.3g}); a compander needs spread: "
                "use a codec without a warp (e.g. pca-q) or more varied calibration data"
            )

    def state_spec(self, D: int) -> dict[str, TensorSpec]:
        K = self.knots + 2  # fit adds one linear end segment on each side
        return {"xk": TensorSpec((D, K)), "yk": TensorSpec((D, K))}


class SplineWarp(Warp):
    """The seed's warp g (kvsplice/codecs/spline.py), trained as the seed says: for PCA
    truncation at rank k (default D // 4), via the `spline-pca` codec, which falls back to the
    identity unless the trained g beats plain PCA on held-out vectors."""

    kind = "spline"

    def __init__(self, k: int | None = None, knots: int = 7, epochs: int = 8, **train) -> None:
        super().__init__()
        self.k, self.knots, self.epochs, self.train = k, knots, epochs, train
        self.g = None  # spline.Warp

    def fit(self, x: torch.Tensor, codec=None) -> None:
        from kvsplice.codecs.spline_pca import SplinePCA

        k = self.k or max(1, x.shape[1] // 4)
        sp = SplinePCA(k=k, knots=self.knots, epochs=self.epochs, **self.train).fit(x)
        self.g = sp.warp
        self.info = {"warp": sp.info.get("warp"), "warp_rank": k,
                     "truncation_holdout_mse_pca": sp.info.get("holdout_mse_pca"),
                     "truncation_holdout_mse_spline": sp.info.get("holdout_mse_spline")}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.g(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.g.inverse(y)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"xk": self.g.xk, "yk": self.g.yk, "slopes": self.g.slopes}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        from kvsplice.codecs.spline import Warp as Resolved

        try:
            self.g = Resolved(tensors["xk"], tensors["yk"], tensors["slopes"])
        except KeyError as e:
            raise CodecError(f"{self.kind} warp state is missing tensor {e}") from e
        if not bool((self.g.slopes > 0).all()):
            raise CodecError(f"{self.kind} warp: slopes must be > 0 (monotone warp)")

    def state_spec(self, D: int) -> dict[str, TensorSpec]:
        K = self.knots
        return {"xk": TensorSpec((D, K)), "yk": TensorSpec((D, K)), "slopes": TensorSpec((D, K - 1))}

    def check_state(self, tensors: dict[str, torch.Tensor], owner: str) -> None:
        if not bool((tensors["slopes"] > 0).all()):
            raise CodecError(f"{owner} state: {self.kind} warp slopes must be > 0 (monotone warp)")
        for nm in ("xk", "yk"):
            check_increasing(owner, f"{self.kind} warp {nm}", tensors[nm], strict=False)


class QSplineWarp(SplineWarp):
    """The seed's spline parametrisation trained for the transform coder's own round-trip error
    (quantisation, not truncation): see kvsplice/codecs/qspline.py."""

    kind = "qspline"

    def __init__(self, knots: int = 7, epochs: int = 4, **train) -> None:
        Warp.__init__(self)
        self.knots, self.epochs, self.train = knots, epochs, train
        self.g = None

    def fit(self, x: torch.Tensor, codec=None) -> None:
        from kvsplice.codecs.qspline import train_spline_for_quantisation

        if codec is None:
            raise CodecError("qspline warp is fitted by a transform codec (it needs the quantiser)")
        self.g, self.info = train_spline_for_quantisation(codec, x, knots=self.knots, epochs=self.epochs, **self.train)


WARPS = {"none": Warp, "bennett": BennettWarp, "spline": SplineWarp, "qspline": QSplineWarp}


def make_warp(kind: str, **params) -> Warp:
    if kind not in WARPS:
        raise CodecError(f"unknown warp {kind!r}; expected one of {sorted(WARPS)}")
    return WARPS[kind](**params)
