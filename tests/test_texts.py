"""Text domains (kvsplice/texts.py): disjoint fixed parts, provenance, the docs default unchanged, and
the R lazy-load reader (kvsplice/rdata.py) on a data base written here byte by byte."""

from __future__ import annotations

import gzip
import struct
import zlib

import pytest

from kvsplice import texts
from kvsplice.data import calibration_text, evaluation_text
from kvsplice.errors import KVSpliceError
from kvsplice.rdata import RDataError, read_lazyload, unserialize

PROSE = pytest.mark.skipif(not texts.available("prose"),
                           reason="Debian r-cran-janeaustenr not installed (run `make texts`)")


def _paras(text: str) -> set[str]:
    return {p.strip() for p in text.split("\n\n") if p.strip()}


@pytest.mark.parametrize("name", ["docs", "code", pytest.param("prose", marks=PROSE)])
def test_parts_are_disjoint_and_documented(name):
    parts = {p: texts.part_documents(name, p) for p in texts.PARTS}
    assert all(parts.values())
    assert set(parts["dev"]).isdisjoint(parts["test"])
    assert set(parts["calibration"]).isdisjoint(set(parts["dev"]) | set(parts["test"]))
    prov = texts.provenance(name)
    for key in ("source", "package", "version", "files", "files_sha256", "licence"):
        assert prov[key], key
    assert len(prov["files_sha256"]) == 64
    info = texts.part_info(name, "test")
    assert info["documents"] == parts["test"] and info["chars"] == len(texts.part_text(name, "test"))
    assert len(texts.part_text(name, "test")) > 30_000  # >= ~8k tokens: room for 4,096 scored tokens
    assert len(texts.part_text(name, "dev")) > 30_000


def test_docs_keeps_the_default_split():
    assert texts.part_text("docs", "calibration") == calibration_text()  # calibration unchanged
    dev, test = texts.part_text("docs", "dev"), texts.part_text("docs", "test")
    assert _paras(dev) | _paras(test) == _paras(evaluation_text())
    assert _paras(dev).isdisjoint(_paras(test))
    assert 0.8 < len(dev) / len(test) < 1.25  # balanced halves


def test_split_is_deterministic_and_rotation_wraps():
    a = texts.part_text("code", "dev")
    texts._loaded.cache_clear()
    assert texts.part_text("code", "dev") == a
    names = texts.part_documents("code", "calibration")
    r = texts.part_text("code", "calibration", rotate=3)
    assert r != texts.part_text("code", "calibration") and len(r) == len(texts.part_text("code", "calibration"))
    assert texts.part_text("code", "calibration", rotate=3 + len(names)) == r
    with pytest.raises(KVSpliceError, match="part"):
        texts.part_documents("code", "train")
    with pytest.raises(KVSpliceError, match="unknown text domain"):
        texts.provenance("poetry")


@PROSE
def test_prose_chapters():
    docs = texts.part_documents("prose", "test")
    assert all("/ch" in d for d in docs)
    assert "CHAPTER" in texts.part_text("prose", "test")[:200].upper()
    assert texts.provenance("prose")["package"].endswith("r-cran-janeaustenr")


def test_missing_prose_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setattr(texts, "janeaustenr_dirs", lambda: [tmp_path / "nowhere"])
    with pytest.raises(texts.DomainUnavailable, match="make texts"):
        texts._load_prose()


# ---- R serialization, written by hand (XDR, version 3) -----------------------------------------


def _i(v: int) -> bytes:
    return struct.pack(">i", v)


def _char(s: str) -> bytes:
    b = s.encode("utf-8")
    return _i(9 | (8 << 12)) + _i(len(b)) + b  # CHARSXP, UTF-8


def _strsxp(items: list[str]) -> bytes:
    return _i(16) + _i(len(items)) + b"".join(_char(s) for s in items)


def _named_vecsxp(named: dict[str, bytes]) -> bytes:
    body = _i(19 | (1 << 9)) + _i(len(named)) + b"".join(named.values())
    attr = _i(2 | (1 << 10)) + _i(1) + _char("names") + _strsxp(list(named)) + _i(254)  # pairlist(names = ...)
    return body + attr


def _ser(obj: bytes) -> bytes:
    return b"X\n" + _i(3) + _i(0x040201) + _i(0x030500) + _i(5) + b"UTF-8" + obj


def test_rdata_reader_round_trip(tmp_path):
    novels = {"alpha": ["CHAPTER I", "", "It was a dark night.", "Très calme."], "beta": ["Chapter 1", "Hello."]}
    rdb, offsets = b"", {}
    for name, lines in novels.items():
        raw = _ser(_strsxp(lines))
        chunk = struct.pack(">I", len(raw)) + zlib.compress(raw)
        offsets[name] = (len(rdb), len(chunk))
        rdb += chunk
    variables = _named_vecsxp({n: _i(13) + _i(2) + _i(o) + _i(l) for n, (o, l) in offsets.items()})
    index = _named_vecsxp({"variables": variables, "compressed": _i(10) + _i(1) + _i(1)})
    (tmp_path / "Rdata.rdb").write_bytes(rdb)
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(_ser(index)))
    assert read_lazyload(tmp_path) == novels
    with pytest.raises(RDataError, match="XDR"):
        unserialize(b"A\n0000")
    with pytest.raises(RDataError, match="not found"):
        read_lazyload(tmp_path / "missing")
    (tmp_path / "Rdata.rdb").write_bytes(rdb[:10])
    with pytest.raises(RDataError, match="outside the file"):
        read_lazyload(tmp_path)


def test_default_calibration_mix_interleaves_every_installed_domain():
    """Issue 10: the default calibration text is the domains mix, chunk by chunk, so the first windows see each."""
    import warnings

    from kvsplice.texts import MIX_CHUNK_CHARS, available, mix_text, part_text

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text, desc = mix_text()
    domains = [d for d in ("docs", "code", "prose") if available(d)]
    assert "+".join(domains) in desc
    for d in domains:
        assert part_text(d, "calibration")[:MIX_CHUNK_CHARS] in text[: (MIX_CHUNK_CHARS + 2) * len(domains)]
    a, _ = mix_text(("docs", "code"), chunk_chars=500)
    doc0, code0 = part_text("docs", "calibration")[:500], part_text("code", "calibration")[:500]
    assert a.startswith(doc0 + "\n\n" + code0)
