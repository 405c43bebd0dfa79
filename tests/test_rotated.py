"""rot-uniform: the calibration-free fallback codec (fixed rotation + per-token quantisation)."""

import pytest
import torch

from kvsplice.codecs import Codec, get_codec
from kvsplice.codecs.rotated import fixed_rotation, hadamard
from kvsplice.errors import CodecError


def _outlier_data(n: int, D: int = 64, seed: int = 0) -> torch.Tensor:
    """Gaussian vectors with two 20x outlier channels: what per-token ranges handle badly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    x[:, 3] *= 20
    x[:, 40] *= 20
    return x


@pytest.mark.parametrize("D", [64, 192, 7])
def test_fixed_rotation_is_orthogonal_and_deterministic(D):
    r = fixed_rotation(D, seed=3)
    assert r.shape == (D, D)
    assert torch.allclose(r @ r.T, torch.eye(D), atol=1e-5)
    assert torch.equal(r, fixed_rotation(D, seed=3))
    assert not torch.equal(r, fixed_rotation(D, seed=4))


def test_hadamard_rejects_non_power_of_two():
    with pytest.raises(CodecError, match="power of two"):
        hadamard(12)


def test_fit_ignores_the_calibration_values():
    """Nothing is learned from text, so nothing can fail to transfer."""
    a = get_codec("rot-uniform", bits=3).fit(_outlier_data(10, seed=1))
    b = get_codec("rot-uniform", bits=3).fit(100 * torch.rand(50, 64))
    x = _outlier_data(30, seed=2)
    pa, pb = a.encode(x), b.encode(x)
    assert all(torch.equal(pa[k], pb[k]) for k in pa)


@pytest.mark.parametrize("bits,group", [(2, None), (4, None), (4, 32), (8, 16)])
def test_same_bytes_as_uniform_and_lower_error_with_outliers(bits, group):
    x = _outlier_data(400, seed=5)
    u = get_codec("uniform", bits=bits, group=group).fit(x)
    r = get_codec("rot-uniform", bits=bits, group=group).fit(x)
    assert r.payload_bytes_per_vector() == u.payload_bytes_per_vector()
    pr = r.encode(x.reshape(4, 100, 64))
    assert sum(t.nbytes for t in pr.values()) == r.payload_bytes_per_vector() * 400
    err_u = float(((u.decode(u.encode(x)) - x) ** 2).mean())
    err_r = float(((r.decode(pr).reshape(400, 64) - x) ** 2).mean())
    assert err_r < err_u, f"rotation did not help: {err_r} vs {err_u}"


def test_error_falls_as_bits_rise():
    x = _outlier_data(300, seed=6)
    errs = [float(((c.decode(c.encode(x)) - x) ** 2).mean())
            for c in (get_codec("rot-uniform", bits=b).fit(x) for b in (2, 3, 4, 8))]
    assert all(e1 < e0 for e0, e1 in zip(errs, errs[1:])), errs


def test_state_round_trip_and_non_orthogonal_rotation_refused():
    c = get_codec("rot-uniform", bits=4, seed=7).fit(_outlier_data(20))
    c2 = Codec.from_state(c.state_tensors(), c.metadata())
    x = _outlier_data(16, seed=8)
    assert torch.equal(c.decode(c.encode(x)), c2.decode(c2.encode(x)))
    bad = {"rotation": c.rotation * 1.5}
    with pytest.raises(CodecError, match="not orthogonal"):
        Codec.from_state(bad, c.metadata())
    with pytest.raises(CodecError, match="rotation"):
        Codec.from_state({"rotation": c.rotation[:8]}, c.metadata())


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed_is_a_clear_error(seed):
    with pytest.raises(CodecError, match="seed"):
        get_codec("rot-uniform", seed=seed)
