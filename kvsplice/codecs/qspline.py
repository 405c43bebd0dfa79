"""Train the seed's spline warp g for QUANTISATION error instead of truncation error.

Same parametrisation as `spline-pca` (spline.py: knots at per-dimension quantiles, softplus
slopes, scale, shift, identity start) and the same optimiser (AdamW), but the loss is the
transform coder's own round trip, with a straight-through estimator for the rounding:

    for each epoch:
        refit the codec's quantiser (mean, rotation, bit allocation, clips) on g(train)  (constants)
        for each shuffled batch x_b (N_b, D):
            y = rotate(normalise(g(x_b) - mean))            coefficients (N_b, D)
            y_q = y + (Q(y) - y).detach()                   straight-through quantiser
            loss = MSE(g^-1(denormalise(unrotate(y_q)) + mean), x_b)      input units

Guard as in `spline-pca`: a random `holdout` fraction is kept aside; the trained g is used only
if its held-out round-trip MSE (quantiser refitted on the training part) is below the identity
warp's; otherwise g is the identity and the codec equals its no-warp ablation.
"""

from __future__ import annotations

import torch

from kvsplice.codecs.quant import midrise_codes, midrise_values
from kvsplice.codecs.spline import Warp, identity_params, quantile_knots, resolve
from kvsplice.errors import CodecError


def _roundtrip(codec, w, x: torch.Tensor, ste: bool) -> torch.Tensor:
    """x (N, D) -> reconstruction (N, D) through warp w (None = identity) and codec's quantiser."""
    z = codec._premix(x if w is None else w(x))
    u, g = codec._normalise(z - codec.mean)
    y = u @ codec.rotation - codec.ymean  # (N, D)
    kept = codec.kept
    b = codec.alloc[kept]
    L = (1 << b).float()
    yk = y[:, kept]
    q = midrise_values(midrise_codes(yk.detach(), codec.clip_abs[kept], L), codec.clip_abs[kept], L)
    yq = yk + (q - yk).detach() if ste else q
    full = torch.zeros_like(y).index_copy(1, kept, yq) + codec.ymean
    zc = full @ codec.rotation.T
    if g is not None:
        zc = zc * g.float()
    zr = codec._postmix(zc + codec.mean)
    return zr if w is None else w.inverse(zr)


def _heldout_mse(codec, w, train: torch.Tensor, hold: torch.Tensor) -> float:
    with torch.no_grad():
        codec._fit_quantiser(codec._premix(train if w is None else w(train)))
        return float(((_roundtrip(codec, w, hold, ste=False) - hold).double() ** 2).mean())


def train_spline_for_quantisation(
    codec, x: torch.Tensor, knots: int = 7, epochs: int = 4, lr: float = 2e-3, weight_decay: float = 1e-4,
    holdout: float = 0.1, seed: int = 0, batch_size: int | None = None,
) -> tuple[Warp, dict]:
    """x (N, D) calibration vectors -> (resolved warp, info). `codec` is a TransformQ whose
    `_fit_quantiser` is called repeatedly (its final state is refitted by the caller)."""
    if not isinstance(knots, int) or knots < 2 or not isinstance(epochs, int) or epochs < 0:
        raise CodecError(f"qspline: knots must be an integer >= 2 and epochs >= 0, got knots={knots!r} epochs={epochs!r}")
    if not 0.0 < holdout < 1.0:
        raise CodecError(f"qspline: holdout must be a fraction in (0, 1), got {holdout!r}")
    n, d = x.shape
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=gen).to(x.device)
    n_hold = max(1, int(round(holdout * n)))
    hold, train = x[perm[:n_hold]], x[perm[n_hold:]]
    if train.shape[0] < max(knots, 8):
        raise CodecError(f"qspline: too few calibration vectors ({n}) for {knots} knots and a hold-out")
    xk = quantile_knots(train, knots)  # (D, K)
    params = [t.requires_grad_() for t in identity_params(xk)]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    bs = min(batch_size or min(4096, max(256, train.shape[0] // 8)), train.shape[0])
    last = None
    for _ in range(epochs):
        with torch.no_grad():
            codec._fit_quantiser(codec._premix(resolve(xk, *params)(train)))
        order = torch.randperm(train.shape[0], generator=gen).to(x.device)
        for s in range(train.shape[0] // bs):
            xb = train[order[s * bs : (s + 1) * bs]]
            loss = ((_roundtrip(codec, resolve(xk, *params), xb, ste=True) - xb) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            last = float(loss.detach())
    with torch.no_grad():
        trained = resolve(xk, *(t.detach() for t in params))
        trained = Warp(*(t.contiguous() for t in (trained.xk, trained.yk, trained.slopes)))
        mse_warp = _heldout_mse(codec, trained, train, hold)
        mse_id = _heldout_mse(codec, None, train, hold)
    keep = mse_warp < mse_id
    info = {"warp": "trained" if keep else "identity", "warp_holdout_mse": mse_warp, "identity_holdout_mse": mse_id,
            "warp_final_batch_loss": last}
    if keep:
        return trained, info
    return Warp(xk, xk.clone(), torch.ones(d, knots - 1, dtype=xk.dtype, device=xk.device)), info
