"""Geometry / codec state validation on load: every tensor exactly as its codec expects (names, shapes,
dtypes), finite and within the codec's magnitude bounds; file-level checks (header size, metadata
types, one codec per layer, declared dims); stale temporaries of killed saves; Bennett companders on
constant dimensions."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import kvsplice.geometry as geo
from kvsplice.codecs import codec_names, get_codec
from kvsplice.errors import CodecError, GeometryError
from kvsplice.geometry import Geometry, load_geometry, save_geometry

D = 8
META = {"model": "tiny", "target": "v", "num_layers": "1", "num_kv_heads": "2", "head_dim": str(D)}


def _x(seed: int = 0, n: int = 400) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed)) ** 3


def _params(name: str) -> dict:
    if name in ("pca", "spline-pca"):
        return {"k": 4, **({"epochs": 1} if name == "spline-pca" else {})}
    if "spline" in name:  # transform coders with a trained spline warp: keep it short
        return {"warp_params": {"epochs": 1}}
    return {}


def _file(name: str, tmp_path, metric: bool = False) -> bytes:
    """Bytes of a one-layer, two-head geometry of codec `name`."""
    codecs = {}
    for h in range(2):
        c = get_codec(name, **_params(name))
        codecs[(0, h)] = c.fit(_x(h), metric=torch.eye(D) * 2) if metric else c.fit(_x(h))
    return geo.serialize(Geometry(codecs, dict(META)))


def rewrite(data: bytes, edit) -> bytes:
    """A file with `edit(tensors, metadata)` applied and a VALID checksum (what a buggy tool or an
    attacker could write): only the new validation can refuse it."""
    n = struct.unpack("<Q", data[:8])[0]
    md = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = st_load(data)
    edit(tensors, md)
    md["content_sha256"] = geo._digest(md, tensors)
    return st_save(tensors, md)


def _load(tmp_path, data: bytes):
    p = tmp_path / "g.safetensors"
    p.write_bytes(data)
    return load_geometry(p)


@pytest.mark.parametrize("name", [n for n in codec_names()])
def test_every_codec_round_trips_through_validation(tmp_path, name):
    """The per-codec specs accept exactly what each codec's fit produces."""
    back = _load(tmp_path, _file(name, tmp_path))
    x = _x(5, 20)
    for h in range(2):
        c = back.codec_for(0, h)
        assert c.name == name and torch.isfinite(c.decode(c.encode(x))).all()


def test_transform_codec_with_metric_round_trips(tmp_path):
    _load(tmp_path, _file("pca-q", tmp_path, metric=True))


@pytest.mark.parametrize("name,tensor,value", [
    ("pca", "mean", 1e20), ("pca-q", "mean", 1e20), ("pca-q", "ymean", -3e21), ("pca-q", "clip", 1e25),
    ("spline-pca", "mean", 1e20), ("spline-pca", "knots_x", 1e30), ("spline-pca-q", "warp.yk", 1e22),
])
def test_absurd_finite_values_are_refused(tmp_path, name, tensor, value):
    """|x| >= 1e20 with a valid checksum: gave ppl nan / JSON null / exit 0 before."""
    def edit(t, md):
        k = f"0.1.{tensor}"
        t[k] = t[k].clone()
        t[k].view(-1)[-1] = value  # last entry: keeps knots increasing for positive values
        if value < 0:
            t[k].view(-1)[0] = value
    with pytest.raises(GeometryError, match=r"\|value\| up to"):
        _load(tmp_path, rewrite(_file(name, tmp_path), edit))


@pytest.mark.parametrize("name,tensor,bad", [
    ("pca", "mean", lambda t: t.round().to(torch.int64)),  # integer mean
    ("pca", "mean", lambda t: t[:1].reshape(())),  # scalar mean (broadcasts silently)
    ("pca-q", "mean", lambda t: t.to(torch.float64)),
    ("pca-q", "alloc", lambda t: t.float()),
    ("spline-pca", "slopes", lambda t: t[:, :1].contiguous()),  # (D, 1): broadcasts silently
    ("spline-pca-q", "warp.slopes", lambda t: t[:1].contiguous()),  # (1, K-1): broadcasts silently
    ("pca-q", "rotation", lambda t: t[:, :4].contiguous()),
])
def test_wrong_dtype_or_shape_is_refused(tmp_path, name, tensor, bad):
    def edit(t, md):
        t[f"0.0.{tensor}"] = bad(t[f"0.0.{tensor}"])
    with pytest.raises(GeometryError, match=tensor.split(".")[-1]):
        _load(tmp_path, rewrite(_file(name, tmp_path), edit))


@pytest.mark.parametrize("name,tensor", [("spline-pca-q", "warp.xk"), ("spline-pca-q", "warp.slopes"),
                                         ("spline-pca", "slopes"), ("bennett-q", "warp.xk")])
def test_inf_in_a_warp_knot_or_slope_is_a_typed_error(tmp_path, name, tensor):
    def edit(t, md):
        k = f"0.0.{tensor}"
        t[k] = t[k].clone()
        t[k][:, -1] = float("inf")
    with pytest.raises(GeometryError, match="non-finite"):
        _load(tmp_path, rewrite(_file(name, tmp_path), edit))


def test_semantic_checks(tmp_path):
    """Shapes right, values finite, meaning wrong: not orthonormal, non-monotone knots, metric factors."""
    def scale_basis(t, md):
        t["0.0.basis"] = (t["0.0.basis"] * 0.9).contiguous()  # columns of norm 0.9
    def unsorted_knots(t, md):
        t["0.0.warp.xk"] = t["0.0.warp.xk"].flip(1).contiguous()
    def metric_mismatch(t, md):
        t["0.0.post"] = t["0.0.post"] * 2
    cases = [("pca", scale_basis, "orthonormal"), ("bennett-pca-q", unsorted_knots, "increasing")]
    for name, edit, msg in cases:
        with pytest.raises(GeometryError, match=msg):
            _load(tmp_path, rewrite(_file(name, tmp_path), edit))
    with pytest.raises(GeometryError, match="pre @ post"):
        _load(tmp_path, rewrite(_file("pca-q", tmp_path, metric=True), metric_mismatch))


def test_mixed_codecs_within_a_layer_are_refused(tmp_path):
    codecs = {(0, 0): get_codec("pca", k=4).fit(_x(0)), (0, 1): get_codec("identity").fit(_x(1))}
    with pytest.raises(GeometryError, match="mixes codecs"):
        Geometry(codecs, dict(META))
    same_name = {(0, 0): get_codec("pca", k=4).fit(_x(0)), (0, 1): get_codec("pca", k=2).fit(_x(1))}
    with pytest.raises(GeometryError, match="mixes codecs"):
        Geometry(same_name, dict(META))
    good = _file("pca", tmp_path)

    def to_identity(t, md):  # a file whose layer mixes codecs: refused on load too
        del t["0.1.mean"], t["0.1.basis"]
        md["codec/0.1"] = json.dumps(get_codec("identity").fit(_x(1)).metadata(), sort_keys=True)
        md["rank"] = str(D)
    with pytest.raises(GeometryError, match="mixes codecs"):
        _load(tmp_path, rewrite(good, to_identity))


@pytest.mark.parametrize("field,value", [("meta", "[1, 2]"), ("meta", '{"a": 1}'), ("meta", '"text"'),
                                         ("codec/0.0", "[]"), ("keys", "[[0, 0, 1]]")])
def test_metadata_of_the_wrong_json_type_is_a_geometry_error(tmp_path, field, value):
    def edit(t, md):
        md[field] = value
    with pytest.raises(GeometryError):
        _load(tmp_path, rewrite(_file("pca", tmp_path), edit))


def test_declared_dim_is_bounded_before_anything_allocates(tmp_path):
    """A ~3 KB file declaring an identity codec of dim 1e8 made the loader allocate ~800 MB."""
    def huge(t, md):
        for h in (0, 1):
            del t[f"0.{h}.mean"], t[f"0.{h}.basis"]
            m = get_codec("identity").fit(_x(h)).metadata()
            md[f"codec/0.{h}"] = json.dumps(dict(m, dim="100000000", latent_dim="100000000"), sort_keys=True)
        md["rank"], md["head_dim"] = "100000000", ""
    data = rewrite(_file("pca", tmp_path), huge)
    assert len(data) < 4096
    with pytest.raises(GeometryError, match="dim must be in"):
        _load(tmp_path, data)


def test_header_size_is_checked_before_the_body_is_read(tmp_path, monkeypatch):
    p = tmp_path / "g.safetensors"
    p.write_bytes(struct.pack("<Q", 1 << 40) + b"{}" + b" " * 100)
    with pytest.raises(GeometryError, match="header claims"):
        load_geometry(p)
    big = geo.MAX_HEADER_BYTES + 1
    p.write_bytes(struct.pack("<Q", big) + b" " * 16)
    with pytest.raises(GeometryError, match="header claims"):
        load_geometry(p)
    with pytest.raises(GeometryError, match="directory"):
        load_geometry(tmp_path)


def test_stale_temporaries_of_a_killed_save_are_removed_by_the_next_save(tmp_path):
    path = tmp_path / "g.safetensors"
    dead = tmp_path / ".g.safetensors.999999999.abcd.tmp"  # pid 999999999: not running
    live = tmp_path / f".g.safetensors.{os.getpid()}.efgh.tmp"  # a save in progress: kept
    old = tmp_path / ".g.safetensors.xyz.tmp"  # older naming without a pid, hours old
    other = tmp_path / ".other.safetensors.999999999.abcd.tmp"  # another file's: not ours to touch
    for p in (dead, live, old, other):
        p.write_bytes(b"half a file")
    os.utime(old, (0, 0))
    save_geometry(path, Geometry({(0, h): get_codec("pca", k=4).fit(_x(h)) for h in range(2)}, dict(META)))
    assert not dead.exists() and not old.exists()
    assert live.exists() and other.exists()
    load_geometry(path)


@pytest.mark.parametrize("name", ["bennett-q", "bennett-pca-q"])
def test_bennett_on_a_constant_dimension_is_a_codec_error(name):
    x = _x(0)
    x[:, 3] = 0.25  # a constant dimension (was: torch LinAlgError from the rotation fit)
    with pytest.raises(CodecError, match=r"dimension\(s\) \[3\]"):
        get_codec(name).fit(x)


def test_validate_state_is_a_codec_method(tmp_path):
    """The expectations live next to each codec: a fitted codec accepts its own state."""
    c = get_codec("pca-q").fit(_x(0))
    c.validate_state(c.state_tensors())
    bad = dict(c.state_tensors(), mean=c.mean[None])
    with pytest.raises(CodecError, match="mean"):
        c.validate_state(bad)
