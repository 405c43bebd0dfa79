"""Quantising codecs (issue 5, section 1): bit packing, water-filling, exact byte accounting,
error falling with bits, state round trip, typed errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kvsplice.codecs import Codec, get_codec
from kvsplice.codecs.quant import (
    dequantize_absmax,
    dequantize_minmax,
    pack_codes,
    packed_nbytes,
    quantize_absmax,
    quantize_minmax,
    unpack_codes,
    water_fill,
)
from kvsplice.errors import CodecError

D = 16
FAST_SPLINE = {"epochs": 1}


def _data(n: int, d: int = D, seed: int = 0) -> torch.Tensor:
    """Correlated, heavy-tailed vectors (N, d) with a non-zero mean and unequal variances."""
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(1234)) * torch.logspace(0, -1.5, d)  # fixed mixing
    g = torch.Generator().manual_seed(seed)
    return torch.sinh(torch.randn(n, d, generator=g)) @ a.T * 2.0 + 0.5


QUANT_CODECS = [
    ("uniform", {"bits": 2}),
    ("uniform", {"bits": 3, "group": 8}),
    ("uniform", {"bits": 4, "mode": "absmax", "group": 4}),
    ("uniform", {"bits": 8}),
    ("pca-q", {"bits": 2.0}),
    ("pca-q", {"bits": 3.3, "scale": "static", "clip": 3.0}),
    ("pca-q", {"bits": 4.0, "clip": "gauss"}),
    ("spline-pca-q", {"bits": 2.0, "warp_params": FAST_SPLINE}),
    ("spline-q", {"bits": 4.0, "warp_params": FAST_SPLINE}),
    ("qspline-pca-q", {"bits": 2.0, "warp_params": FAST_SPLINE}),
    ("qspline-q", {"bits": 2.5, "warp_params": FAST_SPLINE}),
    ("bennett-pca-q", {"bits": 2.0}),
    ("bennett-q", {"bits": 3.0, "scale": "static"}),
]


@pytest.fixture(scope="module")
def fitted():
    x = _data(800)
    return {(n, repr(p)): get_codec(n, **p).fit(x) for n, p in QUANT_CODECS}


# -- packing --------------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_pack_unpack_exact_round_trip(bits):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (2, 5, 37), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (2, 5, (37 * bits + 7) // 8)
    assert torch.equal(unpack_codes(packed, bits, 37), codes)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 8), min_size=1, max_size=40), st.integers(0, 2**31 - 1))
def test_pack_unpack_mixed_widths(widths, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.stack([torch.randint(0, 1 << b, (3,), generator=g) for b in widths], -1)  # (3, n)
    packed = pack_codes(codes, widths)
    assert packed.shape == (3, packed_nbytes(widths)) and packed_nbytes(widths) == (sum(widths) + 7) // 8
    assert torch.equal(unpack_codes(packed, widths), codes)


def test_pack_rejects_out_of_range_codes_and_widths():
    with pytest.raises(CodecError, match="outside"):
        pack_codes(torch.tensor([[4, 0]]), 2)
    with pytest.raises(CodecError, match="widths"):
        pack_codes(torch.tensor([[1, 0]]), [9, 1])
    with pytest.raises(CodecError, match="bytes per vector"):
        unpack_codes(torch.zeros(1, 3, dtype=torch.uint8), 4, 8)


def test_group_quantisers_error_bounded_by_half_step():
    x = _data(50, 32)
    codes, lo, step = quantize_minmax(x, 4, 8)
    assert lo.dtype == step.dtype == torch.float16 and lo.shape == (50, 4)
    err = (dequantize_minmax(codes, lo, step, 8) - x).abs().reshape(50, 4, 8)
    assert bool((err <= step.float().unsqueeze(-1) * 0.5 + 1e-3).all())
    codes, a = quantize_absmax(x, 3, 16)
    err = (dequantize_absmax(codes, a, 3, 16) - x).abs().reshape(50, 2, 16)
    half_step = (2 * a.float() / 8).unsqueeze(-1) * 0.5
    assert bool((err <= half_step + 1e-3 * a.float().unsqueeze(-1)).all())  # + fp16 rounding of a


# -- water-filling ----------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(0.0, 1e4, allow_nan=False), min_size=1, max_size=64), st.floats(0, 1))
def test_water_fill_sums_to_budget_and_is_monotone(variances, frac):
    v = torch.tensor(variances)
    budget = int(frac * 8 * len(variances))
    b = water_fill(v, budget)
    assert int(b.sum()) == budget
    assert bool((b >= 0).all()) and bool((b <= 8).all())
    order = torch.argsort(v, descending=True, stable=True)
    assert bool((b[order][1:] <= b[order][:-1]).all()), "bits must not increase as variance falls"


def test_water_fill_gives_more_bits_to_higher_variance_and_drops_small_ones():
    v = torch.tensor([1.0, 100.0, 0.01, 10.0, 1e-6])
    b = water_fill(v, 10)
    assert b.tolist() == [2, 5, 0, 3, 0]  # greedy on var * 4**-bits, worked by hand
    # a factor 4 in variance is worth exactly one bit (6.02 dB); ties go to the lower index
    assert water_fill(torch.tensor([4.0, 1.0]), 3).tolist() == [2, 1]


def test_water_fill_rejects_impossible_budgets():
    with pytest.raises(CodecError, match="total_bits"):
        water_fill(torch.ones(4), 33)
    with pytest.raises(CodecError, match="non-negative"):
        water_fill(torch.tensor([1.0, -1.0]), 2)


# -- codecs ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params", QUANT_CODECS, ids=[f"{n}-{p}" for n, p in QUANT_CODECS])
def test_payload_bytes_exact_and_shapes_kept(fitted, name, params):
    c = fitted[(name, repr(params))]
    x = _data(2 * 3 * 7, seed=1).reshape(2, 3, 7, D)  # (B, H, T, D)
    payload = c.encode(x)
    for t in payload.values():
        assert t.shape[:3] == (2, 3, 7), f"{name}: payload entry {tuple(t.shape)} lost x's leading dims"
    nbytes = sum(t.nbytes for t in payload.values())
    assert nbytes == c.payload_bytes_per_vector() * 2 * 3 * 7
    assert c.payload_bytes_per_vector(torch.float16) == c.payload_bytes_per_vector(torch.float32)
    if name != "uniform":  # transform coders: budget includes side info and is never exceeded
        assert c.payload_bytes_per_vector() * 8 <= params["bits"] * D
        assert int(c.alloc.sum()) == c.code_bits(D)
    y = c.decode(payload)
    assert y.shape == x.shape and bool(torch.isfinite(y).all())


@pytest.mark.parametrize("name,params", QUANT_CODECS, ids=[f"{n}-{p}" for n, p in QUANT_CODECS])
def test_state_round_trip_decodes_identically(fitted, name, params):
    c = fitted[(name, repr(params))]
    c2 = Codec.from_state(c.state_tensors(), c.metadata())
    x = _data(20, seed=2)
    p1, p2 = c.encode(x), c2.encode(x)
    assert all(torch.equal(p1[k], p2[k]) for k in p1)
    assert torch.equal(c.decode(p1), c2.decode(p2))
    assert torch.allclose(c.decompress(c.compress(x)), c.decode(p1), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "name,bits_list,extra",
    [
        ("uniform", [1, 2, 3, 4, 8], {}),
        ("pca-q", [1.5, 2.0, 3.0, 4.0, 6.0], {}),
        ("pca-q", [1.0, 2.0, 4.0, 8.0], {"scale": "static"}),
        ("qspline-pca-q", [1.5, 3.0, 6.0], {"warp_params": FAST_SPLINE}),
        ("bennett-q", [2.0, 4.0, 8.0], {}),
    ],
)
def test_round_trip_error_falls_as_bits_rise(name, bits_list, extra):
    x, xt = _data(1500), _data(400, seed=3)
    errs = []
    for b in bits_list:
        c = get_codec(name, bits=b, **extra).fit(x)
        errs.append(float(((c.decode(c.encode(xt)) - xt) ** 2).mean()))
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), f"{name}: errors {errs} for bits {bits_list}"
    assert errs[-1] < 0.05 * errs[0]


def test_pca_q_low_budget_drops_coefficients_as_rank_truncation():
    c = get_codec("pca-q", bits=1.0, scale="static").fit(_data(800))
    assert int((c.alloc == 0).sum()) > 0 and c.alloc[0] == c.alloc.max()
    assert c.info["kept_coefficients"] == int((c.alloc > 0).sum())


def test_transform_beats_uniform_on_correlated_data_at_equal_bytes():
    """The reason the transform coder exists: decorrelation + allocation beats per-token int2
    at the same payload (uniform int2 on D=16: 4 code bytes + 4 scale bytes = 4 bits/value)."""
    x, xt = _data(2000), _data(500, seed=4)
    u = get_codec("uniform", bits=2).fit(x)
    t = get_codec("pca-q", bits=u.payload_bytes_per_vector() * 8 / D).fit(x)
    assert t.payload_bytes_per_vector() <= u.payload_bytes_per_vector()
    err_u = float(((u.decode(u.encode(xt)) - xt) ** 2).mean())
    err_t = float(((t.decode(t.encode(xt)) - xt) ** 2).mean())
    assert err_t < err_u


@pytest.mark.parametrize(
    "name,params,match",
    [
        ("uniform", {"bits": 0}, "bits"),
        ("uniform", {"bits": 9}, "bits"),
        ("uniform", {"bits": 2, "mode": "log"}, "mode"),
        ("pca-q", {"bits": 0.0}, "bits"),
        ("pca-q", {"bits": 4, "scale": "tensor"}, "scale"),
        ("pca-q", {"bits": 4, "clip": -1.0}, "clip"),
        ("pca-q", {"bits": 4, "warp": "cubic"}, "warp"),
    ],
)
def test_bad_params_raise_typed_errors(name, params, match):
    with pytest.raises(CodecError, match=match):
        get_codec(name, **params)


def test_bad_inputs_raise_typed_errors():
    with pytest.raises(CodecError, match="group"):
        get_codec("uniform", bits=4, group=5).fit(_data(10))
    with pytest.raises(CodecError, match="no code bits"):
        get_codec("pca-q", bits=0.5).fit(_data(100, d=4))  # 0.5 * 4 = 2 bits < 16-bit gain
    c = get_codec("pca-q", bits=2.0).fit(_data(200))
    with pytest.raises(CodecError, match="last dimension"):
        c.encode(torch.zeros(3, D + 1))
    with pytest.raises(CodecError, match="not fitted"):
        get_codec("pca-q", bits=2.0).encode(torch.zeros(3, D))
    with pytest.raises(CodecError, match="non-finite"):
        get_codec("pca-q").fit(torch.full((20, D), float("nan")))


def test_metric_fit_lowers_weighted_error_and_round_trips():
    """With an output metric M the coder minimises e^T M e: it must beat the plain fit there."""
    x, xt = _data(2000), _data(500, seed=5)
    g = torch.Generator().manual_seed(7)
    a = torch.randn(3 * D, D, generator=g) * torch.linspace(3.0, 0.1, D)  # stands in for W_o: (out, D)
    m = a.T @ a
    plain = get_codec("pca-q", bits=2.0).fit(x)
    aware = get_codec("pca-q", bits=2.0).fit(x, metric=m)

    def weighted(c):
        e = c.decode(c.encode(xt)) - xt
        return float(((e @ a.T) ** 2).sum(-1).mean())

    assert weighted(aware) < weighted(plain)
    assert aware.info["metric"] is True and aware.payload_bytes_per_vector() == plain.payload_bytes_per_vector()
    back = Codec.from_state(aware.state_tensors(), aware.metadata())
    assert torch.equal(back.decode(back.encode(xt)), aware.decode(aware.encode(xt)))


def test_output_metric_matches_grouped_query_expansion():
    from kvsplice.codecs.transform import output_metric

    hkv, group, hd = 2, 3, 4
    w = torch.randn(10, hkv * group * hd)  # (hidden, H_q * hd)
    e = torch.zeros(hkv * group * hd, hkv * hd)
    for q in range(hkv * group):  # query head q reads KV head q // group (transformers' repeat_kv)
        e[q * hd:(q + 1) * hd, (q // group) * hd:(q // group + 1) * hd] = torch.eye(hd)
    a = w @ e
    assert torch.allclose(output_metric(w, hkv, hd), a.T @ a, atol=1e-4)
    with pytest.raises(CodecError, match="multiple"):
        output_metric(torch.randn(10, 20), 3, 4)


def test_bad_metric_raises():
    with pytest.raises(CodecError, match="metric"):
        get_codec("pca-q", bits=2.0).fit(_data(100), metric=torch.ones(D + 1, D + 1))
    with pytest.raises(CodecError, match="symmetric"):
        get_codec("pca-q", bits=2.0).fit(_data(100), metric=torch.triu(torch.ones(D, D)))


@pytest.mark.parametrize("name", ["spline-pca-q", "spline-q", "qspline-pca-q", "qspline-q"])
def test_spline_warps_report_the_held_out_decision(fitted, name):
    c = next(v for (n, _), v in fitted.items() if n == name)
    assert c.info["warp"] in ("trained", "identity")
    if c.info["warp"] == "identity":  # the fallback really is the identity map
        x = _data(30, seed=6)
        assert torch.allclose(c.warp.forward(x), x, atol=1e-4)
