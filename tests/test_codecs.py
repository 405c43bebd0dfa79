"""identity / pca / spline-pca: reconstruction, the never-worse-than-PCA guard, degenerate inputs."""

from __future__ import annotations

import pytest
import torch

from kvsplice.codecs import Codec, get_codec
from kvsplice.errors import CodecError
from kvsplice.synthetic import make_synthetic

RANKS = (8, 16, 64)


def mse(codec: Codec, x: torch.Tensor) -> float:
    return float(((codec.decompress(codec.compress(x)).double() - x.double()) ** 2).mean())


@pytest.fixture(scope="module")
def synthetic():
    # reduced size for test speed (the CLI default is 100k / 20k): 8k vectors, 7.2k used for training
    return make_synthetic(n_train=8_000, n_test=4_000, seed=0)


@pytest.fixture(scope="module")
def fitted(synthetic):
    train, _ = synthetic
    return {k: (get_codec("pca", k=k).fit(train), get_codec("spline-pca", k=k).fit(train)) for k in RANKS}


def test_synthetic_set_is_v_like_and_deterministic():
    a_tr, a_te = make_synthetic(n_train=2000, n_test=500, seed=0)
    b_tr, _ = make_synthetic(n_train=2000, n_test=500, seed=0)
    assert a_tr.shape == (2000, 64) and a_te.shape == (500, 64) and a_tr.dtype == torch.float32
    assert torch.equal(a_tr, b_tr)
    assert not torch.equal(a_tr[:500], a_te), "test vectors must be separate draws"
    z = (a_tr - a_tr.mean(0)) / a_tr.std(0)
    assert float((z**4).mean(0).max()) > 6, "expected heavy tails (kurtosis well above a Gaussian's 3)"
    corr = torch.corrcoef(a_tr.T).abs().fill_diagonal_(0)
    assert float(corr.max()) > 0.5, "expected correlated dimensions"


def test_spline_pca_never_worse_than_pca_and_error_falls_with_rank(synthetic, fitted):
    _, test = synthetic
    p_mse = [mse(fitted[k][0], test) for k in RANKS]
    s_mse = [mse(fitted[k][1], test) for k in RANKS]
    for k, pm, sm in zip(RANKS, p_mse, s_mse):
        assert sm <= pm, f"k={k}: spline-pca {sm} > pca {pm}"
    assert p_mse[0] > p_mse[1] > p_mse[2] and s_mse[0] > s_mse[1] > s_mse[2]
    # on this curved data the trained warp must actually win at low rank, not only tie via the guard
    for k in (8, 16):
        info = fitted[k][1].info
        assert info["warp"] == "trained", info
        assert info["holdout_mse_spline"] < info["holdout_mse_pca"]
        assert s_mse[RANKS.index(k)] < 0.98 * p_mse[RANKS.index(k)]  # measured: -4.8 % / -12.8 %


def test_full_rank_reconstructs(synthetic, fitted):
    _, test = synthetic
    scale = float((test.double() ** 2).mean())
    for codec in fitted[64]:
        assert mse(codec, test) <= 1e-10 * scale, codec
    x = torch.randn(300, 6) * torch.tensor([1e-3, 1.0, 10.0, 100.0, 1.0, 5.0])
    for codec in (get_codec("pca", k=6).fit(x), get_codec("spline-pca", k=6, epochs=2).fit(x)):
        torch.testing.assert_close(codec.decompress(codec.compress(x)), x, rtol=1e-5, atol=1e-4)


def test_identity_is_exact():
    x = torch.randn(2, 3, 5, 16)
    codec = get_codec("identity").fit(x.reshape(-1, 16))
    assert torch.equal(codec.decode(codec.encode(x)), x)
    assert torch.equal(codec.decompress(codec.compress(x)), x)


def test_guard_keeps_identity_when_the_warp_does_not_help():
    # a wildly large learning rate wrecks the warp: the held-out check must fall back to plain PCA
    x = make_synthetic(n_train=4000, n_test=10, seed=1)[0]
    bad = get_codec("spline-pca", k=8, lr=50.0, epochs=3).fit(x)
    info = bad.info
    assert info["warp"] == "identity"
    assert info["holdout_mse_spline"] >= info["holdout_mse_pca"] > 0
    assert "identity" in info["decision"]
    pca = get_codec("pca", k=8).fit(x)
    assert torch.equal(bad.compress(x), pca.compress(x))  # exactly plain PCA
    assert torch.equal(bad.decompress(bad.compress(x)), pca.decompress(pca.compress(x)))


def test_guard_off_and_too_small_for_a_holdout():
    x = make_synthetic(n_train=400, n_test=1, seed=5)[0][:, :8].contiguous()
    off = get_codec("spline-pca", k=4, epochs=2, holdout=0.0).fit(x)
    assert off.info["warp"] == "trained" and off.info["n_holdout"] == 0 and "disables" in off.info["decision"]
    tiny = get_codec("spline-pca", k=4, epochs=2).fit(x[:7])  # 7 = max(k, knots): nothing left to hold out
    assert tiny.info["warp"] == "identity" and tiny.info["n_holdout"] == 0 and "too few" in tiny.info["decision"]


def test_deterministic_given_seed_and_shapes():
    x = make_synthetic(n_train=3000, n_test=10, seed=2)[0]
    a = get_codec("spline-pca", k=4, epochs=2, seed=7).fit(x)
    b = get_codec("spline-pca", k=4, epochs=2, seed=7).fit(x)
    for name, t in a.state_tensors().items():
        assert torch.equal(t, b.state_tensors()[name]), name
    assert a.info == b.info
    v = torch.randn(2, 3, 11, 64)  # (B, H, T, D)
    z = a.compress(v)
    assert z.shape == (2, 3, 11, 4) and a.decompress(z).shape == v.shape
    assert a.payload_bytes_per_vector(torch.float16) == 8
    rebuilt = Codec.from_state(a.state_tensors(), a.metadata())
    assert torch.equal(rebuilt.decompress(rebuilt.compress(v)), a.decompress(a.compress(v)))


@pytest.mark.parametrize("name", ["pca", "spline-pca"])
def test_bad_rank_and_too_few_vectors(name):
    x = torch.randn(50, 8)
    for k in (0, -1, 9):
        with pytest.raises(CodecError, match="rank k must be an integer in"):
            get_codec(name, k=k).fit(x)
    with pytest.raises(CodecError, match="N=5"):
        get_codec(name, k=6).fit(torch.randn(5, 8))


def test_fewer_vectors_than_knots():
    with pytest.raises(CodecError, match=r"max\(k=2, knots=7\).*N=6"):
        get_codec("spline-pca", k=2).fit(torch.randn(6, 4))


@pytest.mark.parametrize("name", ["pca", "spline-pca"])
def test_non_finite_values_are_counted(name):
    x = torch.randn(100, 8)
    x[3, 1], x[7, 2], x[9, 0] = float("nan"), float("inf"), float("-inf")
    with pytest.raises(CodecError, match="3 non-finite values"):
        get_codec(name, k=2).fit(x)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_input(dtype):
    x = make_synthetic(n_train=3000, n_test=100, seed=3)
    train, test = x[0].to(dtype), x[1].to(dtype)
    codec = get_codec("spline-pca", k=16, epochs=2).fit(train)
    assert codec.basis.dtype == torch.float32  # fitted in float32
    z = codec.compress(test)
    out = codec.decompress(z)
    assert z.dtype == dtype and out.dtype == dtype and torch.isfinite(out).all()
    ref = get_codec("spline-pca", k=16, epochs=2).fit(train.float())
    assert mse(codec, test.float()) < 1.5 * mse(ref, test.float())


def test_constant_dimensions_and_repeated_quantiles():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 6, generator=g)
    x[:, 1] = 4.5  # constant dimension: every knot interval has zero width
    x[:, 2] = (torch.rand(2000, generator=g) < 0.1).float()  # 90 % zeros: repeated quantiles
    x[:, 3] = torch.randint(0, 3, (2000,), generator=g).float()
    codec = get_codec("spline-pca", k=6, epochs=3).fit(x)
    assert all(torch.isfinite(t).all() for t in codec.state_tensors().values())
    y = codec.decompress(codec.compress(x))
    torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-4)  # full rank: reconstructs
    low = get_codec("spline-pca", k=3, epochs=3).fit(x)
    out = low.decompress(low.compress(x))
    assert torch.isfinite(out).all()
    assert mse(low, x) <= mse(get_codec("pca", k=3).fit(x), x) * 1.05


def test_bad_parameters():
    for kw in ({"knots": 1}, {"epochs": -1}, {"holdout": 1.0}, {"lr": -1.0}, {"batch_size": 0}):
        with pytest.raises(CodecError):
            get_codec("spline-pca", k=2, **kw)
    codec = get_codec("spline-pca", k=2, epochs=1).fit(torch.randn(100, 4))
    with pytest.raises(CodecError, match="last dimension 4"):
        codec.compress(torch.randn(3, 5))
    with pytest.raises(CodecError, match="not fitted"):
        get_codec("spline-pca", k=2).compress(torch.randn(3, 4))
