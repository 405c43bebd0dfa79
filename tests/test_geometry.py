"""Geometry files: round trip, deterministic bytes, typed errors on bad files, atomic save."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import kvsplice.geometry as geo
from kvsplice.codecs import get_codec
from kvsplice.errors import GeometryError
from kvsplice.geometry import FORMAT_VERSION, Geometry, load_geometry, save_geometry


def make_bank(seed: int = 0) -> Geometry:
    g = torch.Generator().manual_seed(seed)
    x8 = torch.randn(600, 8, generator=g) ** 3  # per-head vectors, head_dim 8
    x16 = torch.randn(600, 16, generator=g)  # joint over 2 heads
    codecs = {
        (0, 0): get_codec("pca", k=4).fit(x8),
        (0, 1): get_codec("pca", k=4).fit(x8 * 2),
        (1, -1): get_codec("spline-pca", k=4, epochs=2, seed=seed).fit(x16),
        (2, 0): get_codec("identity").fit(x8),
        (2, 1): get_codec("identity").fit(x8),  # one codec per layer (mixed codecs are refused)
    }
    meta = {"model": "tiny", "target": "v", "calibration": "600 random vectors", "num_layers": "3",
            "num_kv_heads": "2", "head_dim": "8"}
    return Geometry(codecs, meta)


@pytest.fixture(scope="module")
def bank() -> Geometry:
    return make_bank()


def test_save_load_round_trip(tmp_path, bank):
    path = tmp_path / "g.safetensors"
    save_geometry(path, bank)
    back = load_geometry(path)
    assert back.meta == bank.meta and sorted(back.codecs) == sorted(bank.codecs)
    assert back.layers == [0, 1, 2] and back.rank == 8 and back.codec_name == "identity,pca,spline-pca"
    probe8, probe16 = torch.randn(3, 5, 8) * 4, torch.randn(3, 5, 16) * 4
    for key, codec in bank.codecs.items():
        other = back.codec_for(*key)
        assert type(other) is type(codec) and other.params == codec.params and other.info == codec.info
        assert other.metadata() == codec.metadata()
        a, b = codec.state_tensors(), other.state_tensors()
        assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) and a[n].dtype == b[n].dtype for n in a)
        v = probe16 if key[1] == -1 else probe8
        assert torch.equal(other.decompress(other.compress(v)), codec.decompress(codec.compress(v)))
    back.check_compatible(num_layers=3, num_kv_heads=2, head_dim=8)


def test_file_is_plain_safetensors_with_string_metadata(tmp_path, bank):
    from safetensors import safe_open

    path = tmp_path / "g.safetensors"
    save_geometry(path, bank)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        assert "0.0.basis" in f.keys() and "1.-1.knots_x" in f.keys()
    assert md["format_version"] == FORMAT_VERSION and md["head_dim"] == "8" and md["rank"] == "8"  # identity codec: k = D
    assert md["calibration"] == "600 random vectors" and json.loads(md["keys"])[2] == [1, -1]
    assert json.loads(md["codec/1.-1"])["codec"] == "spline-pca" and "key_layout" in md


def test_same_seed_and_data_give_the_same_bytes(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_geometry(a, make_bank(0))
    save_geometry(b, make_bank(0))
    assert a.read_bytes() == b.read_bytes()
    save_geometry(b, make_bank(1))
    assert a.read_bytes() != b.read_bytes()


def corrupt(data: bytes, where: int) -> bytes:
    buf = bytearray(data)
    buf[where] ^= 0x5A
    return bytes(buf)


def rewrite(data: bytes, edit) -> bytes:
    """Re-serialise a valid file after `edit(tensors, metadata)`, with a recomputed checksum."""
    n = struct.unpack("<Q", data[:8])[0]
    md = json.loads(data[8 : 8 + n])["__metadata__"]
    tensors = st_load(data)
    edit(tensors, md)
    md["content_sha256"] = geo._digest(md, tensors)
    return st_save(tensors, md)


def test_bad_files_raise_geometry_error(tmp_path, bank):
    good = geo.serialize(bank)
    header_len = struct.unpack("<Q", good[:8])[0]
    path = tmp_path / "bad.safetensors"

    def wv(md):
        md["format_version"] = "999"

    def wrong_shape(t, md):
        t["0.1.basis"] = t["0.1.basis"][:, :3].contiguous()  # (8, 3) where k=4

    def wrong_dtype(t, md):
        t["1.-1.slopes"] = t["1.-1.slopes"].to(torch.int32)

    def missing(t, md):
        del t["1.-1.mean"]

    def extra(t, md):
        t["9.9.basis"] = torch.zeros(2)

    def bad_keys(t, md):
        md["keys"] = "[[0, 0], [7, 7]]"

    def head_dim(t, md):
        md["head_dim"] = "16"

    cases = {
        "truncated": good[: len(good) // 2],
        "header only": good[: 8 + header_len],
        "empty": b"",
        "not safetensors": b"hello world, this is no geometry file at all",
        "flipped data byte": corrupt(good, len(good) - 3),
        "flipped header byte": corrupt(good, 8 + header_len // 2),
        "wrong version": rewrite(good, lambda t, md: wv(md)),
        "not a geometry": st_save({"x": torch.zeros(3)}, {"format": "other"}),
        "wrong shape": rewrite(good, wrong_shape),
        "wrong dtype": rewrite(good, wrong_dtype),
        "missing tensor": rewrite(good, missing),
        "extra tensor": rewrite(good, extra),
        "unknown key": rewrite(good, bad_keys),
        "head_dim mismatch": rewrite(good, head_dim),
    }
    for name, data in cases.items():
        path.write_bytes(data)
        with pytest.raises(GeometryError) as e:
            load_geometry(path)
        assert str(path) in str(e.value), name
    path.write_bytes(cases["wrong version"])
    with pytest.raises(GeometryError, match="version '999'"):
        load_geometry(path)
    with pytest.raises(GeometryError, match="cannot read"):
        load_geometry(tmp_path / "missing.safetensors")


def test_check_compatible_mismatches(bank):
    with pytest.raises(GeometryError, match="head_dim=8"):
        bank.check_compatible(num_layers=3, num_kv_heads=2, head_dim=16)
    with pytest.raises(GeometryError, match="num_layers=3"):
        bank.check_compatible(num_layers=2, num_kv_heads=2, head_dim=8)
    loose = Geometry(dict(bank.codecs), {})  # no model description: checks the codecs themselves
    with pytest.raises(GeometryError, match="layer 2"):
        loose.check_compatible(num_layers=2, num_kv_heads=2, head_dim=8)
    with pytest.raises(GeometryError, match="heads 0..2"):
        loose.check_compatible(num_layers=3, num_kv_heads=3, head_dim=8)
    with pytest.raises(GeometryError, match="dimension 8"):
        loose.check_compatible(num_layers=3, num_kv_heads=2, head_dim=4)
    with pytest.raises(GeometryError):
        Geometry({(0, -2): bank.codecs[(0, 0)]}, {})
    with pytest.raises(GeometryError):
        Geometry({(0, 0): get_codec("pca", k=2)}, {})  # unfitted
    with pytest.raises(GeometryError, match="no codec"):
        bank.codec_for(5, 0)


def test_interrupted_save_leaves_the_old_file_intact(tmp_path, bank, monkeypatch):
    path = tmp_path / "g.safetensors"
    save_geometry(path, bank)
    before = path.read_bytes()

    def half_then_fail(f, data):
        f.write(data[: len(data) // 2])
        raise KeyboardInterrupt("simulated crash mid-write")

    import kvsplice.paths

    monkeypatch.setattr(kvsplice.paths, "_write_all", half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        save_geometry(path, make_bank(1))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["g.safetensors"], "temporary file left behind"
    load_geometry(path)  # still valid
