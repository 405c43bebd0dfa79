"""robust-pca-q: pca-q with an allocation safety margin and per-token adaptive ranges (issue 10)."""

import pytest
import torch

from kvsplice.codecs import Codec, get_codec
from kvsplice.errors import CodecError

ADAPT = [1.0, 1.5, 2.25, 3.4]


def _data(n: int, D: int = 32, seed: int = 0, spike: float = 1.0) -> torch.Tensor:
    """Gaussian vectors with decaying variances; spike > 1 multiplies 10 % of the values by `spike`
    (heavier tails than the calibration text: what saturates static clips out of domain)."""
    g = torch.Generator().manual_seed(seed)
    scales = torch.logspace(1, -2, D)
    x = torch.randn(n, D, generator=g) * scales
    if spike != 1.0:
        x = x * (1 + (spike - 1) * (torch.rand(n, D, generator=g) < 0.1).float())
    return x + 0.5


def _err(c, x):
    return float(((c.decode(c.encode(x)) - x) ** 2).mean())


@pytest.mark.parametrize("kw", [{}, {"margin": 0.5}, {"adapt": ADAPT}, {"margin": 0.2, "adapt": ADAPT}])
@pytest.mark.parametrize("bits", [2.0, 4.0])
def test_round_trip_bytes_exact_and_within_budget(kw, bits):
    x = _data(600)
    c = get_codec("robust-pca-q", bits=bits, **kw).fit(x)
    xb = _data(60, seed=1).reshape(3, 20, 32)
    p = c.encode(xb)
    assert sum(t.nbytes for t in p.values()) == c.payload_bytes_per_vector() * 60
    assert c.payload_bytes_per_vector() <= bits * 32 / 8  # side info (gain, range) counted in bits
    assert ("range" in p) == ("adapt" in kw)
    y = c.decode(p)
    assert y.shape == xb.shape and torch.isfinite(y).all()
    assert torch.allclose(c.compress(xb), c._coefficients(p))


def test_without_options_it_is_pca_q():
    x = _data(500)
    a, b = get_codec("robust-pca-q", bits=3).fit(x), get_codec("pca-q", bits=3).fit(x)
    xe = _data(50, seed=2)
    assert torch.equal(a.alloc, b.alloc)
    assert torch.allclose(a.decode(a.encode(xe)), b.decode(b.encode(xe)), atol=1e-5)


def test_margin_spreads_bits_over_more_coefficients():
    x = _data(800)
    plain = get_codec("robust-pca-q", bits=2).fit(x)
    wide = get_codec("robust-pca-q", bits=2, margin=1.0).fit(x)
    assert int((wide.alloc > 0).sum()) > int((plain.alloc > 0).sum())
    assert int(wide.alloc.sum()) == int(plain.alloc.sum())  # same budget


def test_adapt_lowers_error_out_of_domain():
    """Heavier-tailed vectors than the calibration saw saturate the static clip; a per-token range
    factor (1 byte, paid from the code budget) codes them better."""
    cal, out = _data(1000), _data(300, seed=3, spike=3.0)
    static = get_codec("robust-pca-q", bits=4).fit(cal)
    adaptive = get_codec("robust-pca-q", bits=4, adapt=ADAPT).fit(cal)
    assert adaptive.payload_bytes_per_vector() == static.payload_bytes_per_vector()
    assert _err(adaptive, out) < 0.8 * _err(static, out), (_err(adaptive, out), _err(static, out))
    j = adaptive.encode(out)["range"]
    assert int(j.max()) > 0  # the wider ranges are used


def test_state_round_trip_and_bad_range_refused():
    x = _data(400)
    c = get_codec("robust-pca-q", bits=3, margin=0.3, adapt=ADAPT).fit(x)
    c2 = Codec.from_state(c.state_tensors(), c.metadata())
    xe = _data(20, seed=4)
    p = c.encode(xe)
    assert torch.equal(c.decode(p), c2.decode(c2.encode(xe)))
    assert c2.adapt == tuple(ADAPT) and c2.margin == 0.3
    p["range"] = torch.full_like(p["range"], len(ADAPT))
    with pytest.raises(CodecError, match="range"):
        c.decode(p)
    assert c.affine_form() is None


@pytest.mark.parametrize("kw", [{"margin": -1}, {"margin": True}, {"adapt": []}, {"adapt": [2.0, 1.0]},
                                {"adapt": [0.0, 1.0]}, {"adapt": "wide"}, {"adapt": [1.0], "scale": "static"}])
def test_bad_params_are_clear_errors(kw):
    with pytest.raises(CodecError, match="robust-pca-q"):
        get_codec("robust-pca-q", **kw)
