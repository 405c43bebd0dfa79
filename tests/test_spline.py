"""The warp g of spline.py: exact inverse, monotone, linear extrapolation, degenerate knots."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsplice.codecs.spline import (
    identity_params,
    normalised_slopes,
    quantile_knots,
    resolve,
    unwarp,
    unwarp_loop,
    warp,
    warp_loop,
)


def random_warp(seed: int, d: int, k: int, span: float, offset: float, repeat: bool):
    """Random knots (some repeated when `repeat`), slopes, scales and shifts within trained-like ranges."""
    g = torch.Generator().manual_seed(seed)
    xk = torch.sort(torch.rand(d, k, generator=g) * span + offset, dim=1).values
    if repeat and k > 2:
        xk[:, 1] = xk[:, 2]  # zero-width segment inside
        xk[0, :] = xk[0, 0]  # a constant dimension: every segment zero-width
    delta_raw = torch.rand(d, k - 1, generator=g) * 4 - 2  # slope ratio up to ~17 within a dim
    scale_raw = torch.rand(d, generator=g) * 3 - 1  # scale in [0.31, 2.1]
    shift = (torch.rand(d, generator=g) * 2 - 1) * span
    w = resolve(xk, delta_raw, scale_raw, shift)
    # inputs: inside the knot range, at the knots, and far outside it (up to 1000 spans away)
    lo = xk[:, 0]  # (d,)
    inside = lo + torch.rand(200, d, generator=g) * span  # (200, d)
    far = lo + (torch.rand(200, d, generator=g) * 2 - 1) * 1000 * span
    x = torch.cat([inside, xk.T, far], dim=0).contiguous()  # (N, d)
    return w, x


def rel_err(a: torch.Tensor, b: torch.Tensor, xk: torch.Tensor, span: float) -> float:
    """Elementwise |a - b| relative to the magnitude of the numbers involved (|b|, the knots, the span)."""
    ref = torch.maximum(b.abs(), torch.full_like(b, max(float(xk.abs().max()), span)))
    return float(((a - b).abs() / ref).max())


@settings(max_examples=150, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    d=st.integers(1, 6),
    k=st.integers(2, 9),
    log_span=st.floats(-2, 3),
    offset_spans=st.floats(-50, 50),
    repeat=st.booleans(),
)
def test_round_trip_is_exact_in_float32(seed, d, k, log_span, offset_spans, repeat):
    span = 10.0**log_span
    w, x = random_warp(seed, d, k, span, offset_spans * span, repeat)
    assert x.dtype == torch.float32
    y = warp(x, w.xk, w.yk, w.slopes)
    assert torch.isfinite(y).all()
    assert rel_err(unwarp(y, w.xk, w.yk, w.slopes), x, w.xk, span) <= 1e-5


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), d=st.integers(1, 5), k=st.integers(2, 9), repeat=st.booleans())
def test_monotone_and_matches_the_seed_loop(seed, d, k, repeat):
    w, x = random_warp(seed, d, k, 3.0, -1.0, repeat)
    y = warp(x, w.xk, w.yk, w.slopes)
    ref = warp_loop(x, w.xk, w.yk, w.slopes)
    assert rel_err(y, ref, w.yk, 3.0) <= 1e-5
    assert rel_err(unwarp(y, w.xk, w.yk, w.slopes), unwarp_loop(ref, w.xk, w.yk, w.slopes), w.xk, 3.0) <= 1e-5
    xs, order = torch.sort(x, dim=0)
    ys = torch.gather(y, 0, order)
    assert (ys[1:] >= ys[:-1]).all(), "g must be non-decreasing in every dimension"


def test_extrapolates_linearly_with_the_end_slopes():
    w, _ = random_warp(3, 4, 7, 2.0, 0.0, False)
    far_right = w.xk[:, -1] + torch.tensor([[1.0], [10.0], [1e4]])  # (3, D)
    far_left = w.xk[:, 0] - torch.tensor([[1.0], [10.0], [1e4]])
    y_r = warp(far_right, w.xk, w.yk, w.slopes)
    y_l = warp(far_left, w.xk, w.yk, w.slopes)
    torch.testing.assert_close(y_r, w.yk[:, -1] + w.slopes[:, -1] * (far_right - w.xk[:, -1]), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(y_l, w.yk[:, 0] + w.slopes[:, 0] * (far_left - w.xk[:, 0]), rtol=1e-5, atol=1e-4)


def test_hits_the_knots_and_slopes_are_normalised():
    w, _ = random_warp(5, 3, 6, 4.0, 1.0, False)
    torch.testing.assert_close(warp(w.xk.T.contiguous(), w.xk, w.yk, w.slopes), w.yk.T, rtol=1e-5, atol=1e-5)
    s = normalised_slopes(w.xk, torch.randn(3, 5))
    dx = w.xk[:, 1:] - w.xk[:, :-1]
    torch.testing.assert_close((s * dx).sum(1) / dx.sum(1), torch.ones(3))  # knot-range-weighted mean 1
    assert (s > 0).all()


def test_identity_params_give_the_identity():
    x = torch.randn(500, 8) * torch.logspace(-2, 2, 8)
    xk = quantile_knots(x, 7)
    w = resolve(xk, *identity_params(xk))
    torch.testing.assert_close(w(x), x, rtol=1e-5, atol=1e-5 * float(x.abs().max()))
    torch.testing.assert_close(w.slopes, torch.ones(8, 6), rtol=1e-4, atol=0)


def test_quantile_knots_and_degenerate_columns():
    x = torch.stack([torch.arange(101.0), torch.full((101,), 3.0), (torch.arange(101) % 2).float()], dim=1)
    xk = quantile_knots(x, 5)
    assert xk.shape == (3, 5)
    torch.testing.assert_close(xk[0], torch.tensor([0.0, 25.0, 50.0, 75.0, 100.0]))
    assert (xk[1] == 3.0).all()  # constant dimension: all knots coincide
    assert xk[2].tolist() == [0.0, 0.0, 0.0, 1.0, 1.0]  # repeated quantiles
    s = normalised_slopes(xk, torch.randn(3, 4))
    assert torch.isfinite(s).all() and (s < 100).all(), "zero-width knot ranges must not blow up the slopes"
    w = resolve(xk, torch.randn(3, 4), torch.randn(3), torch.randn(3))
    probe = torch.tensor([[-5.0, 3.0, 0.0], [50.0, 3.0, 1.0], [500.0, 2.0, 0.5], [1e4, 7.0, -3.0]])
    y = w(probe)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(w.inverse(y), probe, rtol=1e-5, atol=1e-4)


def test_training_path_and_inference_path_agree_and_have_gradients():
    x = torch.randn(300, 5) * 3
    xk = quantile_knots(x, 7)
    params = [torch.randn(5, 6), torch.randn(5), torch.randn(5)]
    with torch.no_grad():
        w = resolve(xk, *params)
        y_fast, x_fast = w(x), w.inverse(w(x))
    req = [p.clone().requires_grad_() for p in params]
    wg = resolve(xk, *req)
    y = wg(x)
    loss = ((wg.inverse(y * 0.9) - x) ** 2).mean()
    loss.backward()
    torch.testing.assert_close(y.detach(), y_fast, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_fast, x, rtol=1e-5, atol=1e-4)
    for p in req:
        assert p.grad is not None and torch.isfinite(p.grad).all()
    assert req[0].grad.abs().sum() > 0 and req[1].grad.abs().sum() > 0
