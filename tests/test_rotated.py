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


# -- mode="rms" (Gaussian-optimal range from the per-group RMS) and center=True --------------------------------

def _offset_data(n: int, D: int = 64, seed: int = 0) -> torch.Tensor:
    """Outlier channels plus a large shared per-channel offset (what K looks like)."""
    g = torch.Generator().manual_seed(seed)
    return _outlier_data(n, D, seed) + 8 * torch.randn(D, generator=g)


@pytest.mark.parametrize("bits,group", [(2, None), (3, 32), (4, None), (8, 16)])
def test_rms_mode_round_trip_bytes_exact(bits, group):
    x = _outlier_data(200, seed=11).reshape(2, 100, 64)
    c = get_codec("rot-uniform", bits=bits, group=group, mode="rms").fit(x.reshape(-1, 64))
    p = c.encode(x)
    assert set(p) == {"codes", "rms"} and p["rms"].dtype == torch.float16
    assert sum(t.nbytes for t in p.values()) == c.payload_bytes_per_vector() * 200
    assert c.payload_bytes_per_vector() == get_codec("uniform", bits=bits, group=group, mode="absmax").fit(x.reshape(-1, 64)).payload_bytes_per_vector()
    y = c.decode(p)
    assert y.shape == x.shape
    assert torch.equal(c.compress(x), y)  # latent view = what the cache reads


@pytest.mark.parametrize("bits", [2, 3])
def test_rms_mode_beats_minmax_on_rotated_gaussian_coordinates(bits):
    """Fewer bytes (one fp16 per group, not two) and lower error at low bits: min-max spends its few
    levels on the extremes (at 4 bits the two are about even on this data)."""
    x = _outlier_data(500, D=192, seed=12)
    mm = get_codec("rot-uniform", bits=bits).fit(x)
    rms = get_codec("rot-uniform", bits=bits, mode="rms").fit(x)
    assert rms.payload_bytes_per_vector() < mm.payload_bytes_per_vector()
    err = lambda c: float(((c.decode(c.encode(x)) - x) ** 2).mean())  # noqa: E731
    assert err(rms) < err(mm), (err(rms), err(mm))


def test_center_removes_a_shared_offset_and_round_trips_state():
    x = _offset_data(400, seed=13)
    plain = get_codec("rot-uniform", bits=3, mode="rms").fit(x)
    cen = get_codec("rot-uniform", bits=3, mode="rms", center=True).fit(x)
    assert torch.allclose(cen.mean, x.mean(0))
    assert cen.payload_bytes_per_vector() == plain.payload_bytes_per_vector()
    err = lambda c: float(((c.decode(c.encode(x)) - x) ** 2).mean())  # noqa: E731
    assert err(cen) < 0.5 * err(plain), (err(cen), err(plain))
    c2 = Codec.from_state(cen.state_tensors(), cen.metadata())
    assert torch.equal(c2.decode(c2.encode(x)), cen.decode(cen.encode(x)))
    with pytest.raises(CodecError, match="mean"):
        Codec.from_state({"rotation": cen.rotation}, cen.metadata())


def test_clip_changes_the_rms_range():
    x = _outlier_data(300, seed=14)
    a = get_codec("rot-uniform", bits=4, mode="rms").fit(x)
    b = get_codec("rot-uniform", bits=4, mode="rms", clip=5.0).fit(x)
    assert a.clip_rms == pytest.approx(2.682) and b.clip_rms == 5.0
    assert not torch.equal(a.decode(a.encode(x)), b.decode(b.encode(x)))


@pytest.mark.parametrize("kw", [{"mode": "rmss"}, {"clip": 3.0}, {"mode": "rms", "clip": -1.0},
                                {"mode": "rms", "clip": True}, {"center": 1}])
def test_bad_rms_params_are_clear_errors(kw):
    with pytest.raises(CodecError, match="rot-uniform"):
        get_codec("rot-uniform", **kw)
