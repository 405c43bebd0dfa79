"""`spline-pca`: the seed's Spline->PCA codec. compress = PCA_k(g(x)), decompress = g^-1(PCA_k^T z).

g is the monotone per-dimension piecewise-linear warp of `spline.py` (K knots at per-dimension
quantiles). Training follows the seed (`gpt2/kvsplice.py`, KVGeometryV.fit):

    for each of `epochs` epochs:
        refit PCA (mean, top-k basis) on g(x) of all training vectors       (constants this epoch)
        for each shuffled batch (size min(4096, max(256, N // 8)), last partial batch dropped):
            loss = MSE(g^-1(PCA_k round trip of g(x_b)), x_b)              (input units)
            AdamW step on (delta_raw, scale_raw, shift)     lr 2e-3, weight decay 1e-4

Never worse than PCA by construction: `fit` first holds out a random `holdout` fraction
(default 10 %) of the vectors, trains on the rest, and compares the held-out MSE of the trained
warp with that of plain PCA at the same k (both fitted on the same training part). Unless the warp
is strictly better it is replaced by the identity, and the codec is then exactly `pca`. The
decision and both MSEs go to `info` (saved in geometry files). holdout=0 switches the guard off
(trained warp kept unchecked); a holdout too small to hold one vector keeps the identity. Finally the PCA is refitted on
g(x) of all N vectors.

Deterministic given `seed` (own torch.Generator; the global RNG is untouched). Fits in float32
(PCA moments in float64); compress/decompress return the input's dtype.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from kvsplice.codecs.base import Codec, TensorSpec, check_increasing, check_orthonormal_columns, register
from kvsplice.codecs.pca import check_rank, fit_pca
from kvsplice.codecs.spline import Warp, identity_params, quantile_knots, resolve
from kvsplice.errors import CodecError


@contextlib.contextmanager
def _one_thread():
    """Run the training loop on one intra-op thread (restored after). Its ops are small (a batch of
    4096 x 64), and split over threads on a shared 2-core machine each op waits for a descheduled
    thread: measured 97 s instead of ~3 s for a 20k-vector fit."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _recon_mse(x: torch.Tensor, w: Warp | None, mean: torch.Tensor, basis: torch.Tensor) -> float:
    """Mean squared error of x (N, D) through (g ->) PCA_k -> (g^-1), in float64 accumulation."""
    z = x if w is None else w(x)
    zr = (z - mean) @ basis @ basis.T + mean
    xr = zr if w is None else w.inverse(zr)
    return float(((xr.double() - x.double()) ** 2).mean())


@register
class SplinePCA(Codec):
    """params: k, knots=7, epochs=8, lr=2e-3, weight_decay=1e-4, holdout=0.1, seed=0, batch_size=None."""

    name = "spline-pca"

    def __init__(
        self,
        k: int = 16,
        knots: int = 7,
        epochs: int = 8,
        lr: float = 2e-3,
        weight_decay: float = 1e-4,
        holdout: float = 0.1,
        seed: int = 0,
        batch_size: int | None = None,
    ) -> None:
        for nm, v, lo in (("knots", knots, 2), ("epochs", epochs, 0), ("seed", seed, 0)):
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise CodecError(f"spline-pca: {nm} must be an integer >= {lo}, got {v!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise CodecError(f"spline-pca: batch_size must be None or an integer >= 1, got {batch_size!r}")
        if not (isinstance(holdout, (int, float)) and 0.0 <= holdout < 1.0):
            raise CodecError(f"spline-pca: holdout must be a fraction in [0, 1), got {holdout!r}")
        if not (isinstance(lr, (int, float)) and lr >= 0 and isinstance(weight_decay, (int, float)) and weight_decay >= 0):
            raise CodecError(f"spline-pca: lr and weight_decay must be >= 0, got lr={lr!r} weight_decay={weight_decay!r}")
        super().__init__(
            k=k, knots=knots, epochs=epochs, lr=float(lr), weight_decay=float(weight_decay),
            holdout=float(holdout), seed=seed, batch_size=batch_size,
        )
        self.k, self.knots = k, knots
        self.warp: Warp | None = None  # resolved g; identity when info["warp"] == "identity"
        self.mean: torch.Tensor | None = None  # (D,) mean of g(x)
        self.basis: torch.Tensor | None = None  # (D, k)

    # -- fitting ---------------------------------------------------------------------------------
    def fit(self, x: torch.Tensor) -> "SplinePCA":
        x = self._check_fit_input(x, min_rows=1)  # (N, D) float32; raises on non-finite values
        n, d = x.shape
        check_rank(self.k, d, self.name)
        if n < self.k or n < self.knots:
            raise CodecError(
                f"spline-pca: need at least max(k={self.k}, knots={self.knots}) calibration vectors, got N={n}"
            )
        p = self.params
        gen = torch.Generator().manual_seed(p["seed"])
        n_hold = min(int(round(p["holdout"] * n)), n - max(self.k, self.knots))
        perm = torch.randperm(n, generator=gen).to(x.device)
        hold, train = x[perm[: max(n_hold, 0)]], x[perm[max(n_hold, 0) :]]

        xk = quantile_knots(train, self.knots)  # (D, K)
        params = [t.requires_grad_() for t in identity_params(xk)]  # delta_raw, scale_raw, shift
        with _one_thread():
            loss = self._train(train, xk, params, gen)
        with torch.no_grad():
            trained = resolve(xk, *params)
        info: dict[str, Any] = {"n_train": int(train.shape[0]), "n_holdout": int(max(n_hold, 0)), "final_batch_loss": loss}
        with torch.no_grad():
            if n_hold >= 1:
                mean_x, basis_x, _ = fit_pca(train, self.k)
                pca_mse = _recon_mse(hold, None, mean_x, basis_x)
                mean_z, basis_z, _ = fit_pca(trained(train), self.k)
                spline_mse = _recon_mse(hold, trained, mean_z, basis_z)
                keep = math.isfinite(spline_mse) and spline_mse < pca_mse
                info.update(holdout_mse_pca=pca_mse, holdout_mse_spline=spline_mse)
                info["decision"] = (
                    "trained warp kept: held-out MSE below plain PCA's" if keep
                    else "identity warp: trained warp's held-out MSE not below plain PCA's"
                )
            else:
                keep = p["holdout"] == 0  # the caller switched the guard off
                info.update(holdout_mse_pca=None, holdout_mse_spline=None)
                info["decision"] = (
                    "trained warp kept unchecked: holdout=0 disables the guard" if keep
                    else "identity warp: too few vectors for a hold-out, so no evidence the warp helps"
                )
            if keep:
                self.warp = trained
            else:
                self.warp = Warp(xk, xk.clone(), torch.ones(d, self.knots - 1, dtype=xk.dtype, device=xk.device))
            info["warp"] = "trained" if keep else "identity"
            self.info = info
            self.dim = d
            z = self._g(x)
            self.mean, self.basis, var = fit_pca(z, self.k)
            self.info["explained_variance"] = float(var[: self.k].sum() / var.sum().clamp_min(1e-30))
        self.warp = Warp(*(t.detach().contiguous() for t in (self.warp.xk, self.warp.yk, self.warp.slopes)))
        return self

    def _train(self, train: torch.Tensor, xk: torch.Tensor, params: list[torch.Tensor], gen: torch.Generator) -> float | None:
        """The seed's loop; returns the last batch loss (None when no step ran)."""
        p = self.params
        n = train.shape[0]
        bs = min(p["batch_size"] or min(4096, max(256, n // 8)), n)
        opt = torch.optim.AdamW(params, lr=p["lr"], weight_decay=p["weight_decay"])
        last = None
        for _ in range(p["epochs"]):
            with torch.no_grad():
                mean, basis, _ = fit_pca(resolve(xk, *params)(train), self.k)  # (D,), (D, k)
                proj = basis @ basis.T  # (D, D)
            order = torch.randperm(n, generator=gen).to(train.device)
            for b in range(n // bs):  # drop_last, as the seed's DataLoader
                xb = train[order[b * bs : (b + 1) * bs]]  # (B, D)
                w = resolve(xk, *params)
                zr = (w(xb) - mean) @ proj + mean
                loss = torch.mean((w.inverse(zr) - xb) ** 2)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                last = float(loss.detach())
        for t in params:
            t.requires_grad_(False)
        return last

    # -- codec contract -------------------------------------------------------------------------------
    @property
    def identity_warp(self) -> bool:
        return self.info.get("warp") == "identity"

    def _g(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.identity_warp else self.warp(x)

    def _g_inv(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.identity_warp else self.warp.inverse(y)

    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., D) -> latents (..., k) in x's dtype (computed in the codec's dtype)."""
        self._check_vectors(x, self.dim, "compress")
        with torch.no_grad():
            return ((self._g(x.to(self.basis.dtype)) - self.mean) @ self.basis).to(x.dtype)

    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        """latents (..., k) -> (..., D) in z's dtype."""
        self._check_vectors(z, self.k, "decompress")
        with torch.no_grad():
            return self._g_inv(z.to(self.basis.dtype) @ self.basis.T + self.mean).to(z.dtype)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {
            "knots_x": self.warp.xk, "knots_y": self.warp.yk, "slopes": self.warp.slopes,
            "mean": self.mean, "basis": self.basis,
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        d, k, kn = self.dim, self.k, self.knots
        want = {"knots_x": (d, kn), "knots_y": (d, kn), "slopes": (d, kn - 1), "mean": (d,), "basis": (d, k)}
        if set(tensors) != set(want):
            raise CodecError(f"spline-pca state: expected tensors {sorted(want)}, found {sorted(tensors)}")
        for nm, shape in want.items():
            t = tensors[nm]
            if tuple(t.shape) != shape or not t.is_floating_point():
                raise CodecError(f"spline-pca state: {nm} should be floating {shape}, found {t.dtype} {tuple(t.shape)}")
            if not bool(torch.isfinite(t).all()):
                raise CodecError(f"spline-pca state: {nm} has non-finite values")
        if not bool((tensors["slopes"] > 0).all()):
            raise CodecError("spline-pca state: slopes must be > 0 (monotone warp)")
        for nm in ("knots_x", "knots_y"):
            if not bool((tensors[nm][:, 1:] >= tensors[nm][:, :-1]).all()):
                raise CodecError(f"spline-pca state: {nm} must be non-decreasing along the knot axis")
        self.warp = Warp(tensors["knots_x"], tensors["knots_y"], tensors["slopes"])
        self.mean, self.basis = tensors["mean"], tensors["basis"]

    def state_spec(self) -> dict[str, TensorSpec]:
        d, k, kn = int(self.dim), self.k, self.knots
        return {"knots_x": TensorSpec((d, kn)), "knots_y": TensorSpec((d, kn)), "slopes": TensorSpec((d, kn - 1)),
                "mean": TensorSpec((d,)), "basis": TensorSpec((d, k), bound=1 + 1e-3)}

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        if not bool((tensors["slopes"] > 0).all()):
            raise CodecError(f"{self.name} state: slopes must be > 0 (monotone warp)")
        for nm in ("knots_x", "knots_y"):
            check_increasing(self.name, nm, tensors[nm], strict=False)
        check_orthonormal_columns(self.name, "basis", tensors["basis"])

    @property
    def latent_dim(self) -> int:
        return self.k
