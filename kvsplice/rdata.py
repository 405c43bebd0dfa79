"""Read character vectors out of an R package's lazy-load data base (data/Rdata.rdb + .rdx), without R.

Used for the narrative-prose domain (kvsplice/texts.py): Debian's r-cran-janeaustenr ships Jane
Austen's six novels as R character vectors (one element per line of the Project Gutenberg text).

Format (R's serialize(), XDR big-endian, versions 2 and 3):
    Rdata.rdx: gzip of a serialized list(variables = list(NAME = c(offset, length), ...), ...)
    Rdata.rdb: at each offset, a 4-byte big-endian uncompressed length, then one zlib stream of
               the serialized object.
Only the types those files use are decoded (NULL, symbols, pairlists, character / integer /
logical / double / generic vectors, references); anything else is refused with RDataError.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path
from typing import Any

from kvsplice.errors import KVSpliceError

NILVALUE, SYMSXP, LISTSXP, CHARSXP, LGLSXP, INTSXP, REALSXP, STRSXP, VECSXP, REFSXP = 254, 1, 2, 9, 10, 13, 14, 16, 19, 255
IS_OBJECT, HAS_ATTR, HAS_TAG = 1 << 8, 1 << 9, 1 << 10
UTF8_MASK, LATIN1_MASK = 1 << 3, 1 << 2


class RDataError(KVSpliceError):
    """An R data file this reader cannot decode (wrong format or an unsupported type)."""


class _Reader:
    def __init__(self, data: bytes, source: str) -> None:
        self.b, self.i, self.source, self.refs = data, 0, source, []

    def int(self) -> int:
        if self.i + 4 > len(self.b):
            raise RDataError(f"{self.source}: truncated serialized R data at byte {self.i}")
        (v,) = struct.unpack_from(">i", self.b, self.i)
        self.i += 4
        return v

    def header(self) -> None:
        if self.b[:2] != b"X\n":
            raise RDataError(f"{self.source}: expected R XDR serialization ('X\\n'), found {self.b[:2]!r}")
        self.i = 2
        version = self.int()
        self.int(), self.int()  # writer version, minimal reader version
        if version == 3:
            n = self.int()
            self.i += n  # native encoding name
        elif version != 2:
            raise RDataError(f"{self.source}: serialization version 2 or 3 expected, found {version}")

    def item(self) -> Any:
        flags = self.int()
        t = flags & 0xFF
        if t == NILVALUE:
            return None
        if t == REFSXP:
            idx = flags >> 8 or self.int()
            return self.refs[idx - 1]
        if t == SYMSXP:
            name = self.item()
            self.refs.append(name)
            return name
        if t == LISTSXP:  # pairlist: [attr] [tag] car cdr
            out = []
            while True:
                if flags & HAS_ATTR:
                    self.item()
                tag = self.item() if flags & HAS_TAG else None
                out.append((tag, self.item()))
                flags = self.int()
                if flags & 0xFF == NILVALUE:
                    return out
                if flags & 0xFF != LISTSXP:  # a cdr that is not a pairlist: not used by these files
                    raise RDataError(f"{self.source}: unsupported pairlist tail of type {flags & 0xFF}")
        if t == CHARSXP:
            n = self.int()
            if n == -1:
                return None  # NA_character_
            raw = self.b[self.i : self.i + n]
            self.i += n
            return raw.decode("latin-1" if (flags >> 12) & LATIN1_MASK else "utf-8")
        if t in (LGLSXP, INTSXP):
            n = self.int()
            v = list(struct.unpack_from(f">{n}i", self.b, self.i))
            self.i += 4 * n
        elif t == REALSXP:
            n = self.int()
            v = list(struct.unpack_from(f">{n}d", self.b, self.i))
            self.i += 8 * n
        elif t in (STRSXP, VECSXP):
            n = self.int()
            v = [self.item() for _ in range(n)]
        else:
            raise RDataError(f"{self.source}: unsupported R type {t} at byte {self.i - 4}")
        if flags & HAS_ATTR:
            attrs = dict(self.item() or [])
            if "names" in attrs and isinstance(v, list):
                return dict(zip(attrs["names"], v))
        return v


def unserialize(data: bytes, source: str = "<bytes>") -> Any:
    """One serialized R object -> Python (str / list / dict for named vectors / None)."""
    r = _Reader(data, source)
    r.header()
    return r.item()


def read_lazyload(data_dir: str | Path, stem: str = "Rdata") -> dict[str, Any]:
    """All variables of a lazy-load data base `data_dir`/{stem}.rdx + .rdb -> {name: object}."""
    d = Path(data_dir)
    rdx, rdb = d / f"{stem}.rdx", d / f"{stem}.rdb"
    for p in (rdx, rdb):
        if not p.is_file():
            raise RDataError(f"R lazy-load data base file {str(p)!r} not found")
    index = unserialize(gzip.decompress(rdx.read_bytes()), str(rdx))
    if not isinstance(index, dict) or not isinstance(index.get("variables"), dict):
        raise RDataError(f"{rdx}: expected a list with a 'variables' entry, found {type(index).__name__}")
    blob = rdb.read_bytes()
    out = {}
    for name, (offset, length) in index["variables"].items():
        chunk = blob[offset : offset + length]
        if len(chunk) != length or length < 5:
            raise RDataError(f"{rdb}: variable {name!r} at {offset}+{length} lies outside the file ({len(blob)} bytes)")
        try:
            raw = zlib.decompress(chunk[4:])
        except zlib.error as e:
            raise RDataError(f"{rdb}: variable {name!r} is not a zlib stream ({e}); only zlib-compressed data bases are read") from e
        (n,) = struct.unpack(">I", chunk[:4])
        if len(raw) != n:
            raise RDataError(f"{rdb}: variable {name!r} decompressed to {len(raw)} bytes, header says {n}")
        out[name] = unserialize(raw, f"{rdb}:{name}")
    return out
