"""Text domains for the evidence suite: documentation, source code, narrative prose.

Every domain is read at run time from something installed on the machine (never vendored), cut into
named documents, and split by a fixed rule into three disjoint parts:

    calibration   fitting geometries (rotations, ranges, allocations)
    dev           every design choice (sink count, bit splits, clipping, grids)
    test          the numbers the README reports

Domains (`DOMAINS`):

docs   CPython's ``pydoc_data.topics`` (PSF-2.0), the project's default corpus. calibration = the
       existing default calibration split (kvsplice/data.py: topics with sha256(name) % 10 >= 3,
       paragraphs deduplicated) UNCHANGED; the evaluation topics are dealt into dev / test in
       sha256("dev-test:" + name) order, each to the half with fewer characters so far (halves of
       ~41 K chars each). Parts keep sorted topic order.
code   The running interpreter's standard library: top-level ``*.py`` modules of
       ``sysconfig.get_paths()["stdlib"]`` (PSF-2.0). Documents: file names.
prose  Jane Austen's six novels (public domain; Project Gutenberg transcriptions) from Debian's
       ``r-cran-janeaustenr`` (package MIT), read with kvsplice/rdata.py. Documents: chapters
       ("emma/ch012"; front matter before the first chapter dropped). Install: ``make texts``
       (``apt-get download`` + ``dpkg-deb -x`` into ~/.cache/kvsplice/texts, no R needed) or
       ``apt-get install r-cran-janeaustenr``. Absent -> `DomainUnavailable` (tests skip).

code and prose: bucket = sha256(domain + ":" + document) % 10; 0-1 -> test, 2-3 -> dev, 4-9 ->
calibration. Within a part, documents are ordered by that hash (a mix of files / novels rather
than alphabetical runs) and joined by a blank line.

`provenance(domain)` records the source, package and version, the number of source files, a
sha256 over the sorted (file name, file sha256) list, and the licence; `part_info` the documents
and sha256 of one part. Both go into every suite result JSON.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from kvsplice.errors import KVSpliceError

PARTS = ("calibration", "dev", "test")
TEXTS_DIR_ENV = "KVSPLICE_TEXTS"
JANEAUSTENR_DEB = "r-cran-janeaustenr"


class DomainUnavailable(KVSpliceError):
    """A text domain whose source is not installed on this machine (the message says how to install it)."""


@dataclass(frozen=True)
class Domain:
    """name; description; licence; load: () -> (documents {name: text}, provenance dict)."""

    name: str
    description: str
    licence: str
    load: Callable[[], tuple[dict[str, str], dict[str, str]]]


def _sha(s: str | bytes) -> str:
    return hashlib.sha256(s.encode("utf-8") if isinstance(s, str) else s).hexdigest()


def _files_digest(files: dict[str, bytes]) -> str:
    """sha256 over the sorted 'name<TAB>sha256(content)' lines: one number naming the exact inputs."""
    return _sha("\n".join(f"{n}\t{_sha(b)}" for n, b in sorted(files.items())))


def _bucket(domain: str, doc: str) -> int:
    return int(_sha(f"{domain}:{doc}"), 16) % 10


def _part_of(domain: str, doc: str) -> str:
    b = _bucket(domain, doc)
    return "test" if b < 2 else "dev" if b < 4 else "calibration"


# ---- docs: pydoc_data.topics ---------------------------------------------------------------------


def _load_docs() -> tuple[dict[str, str], dict[str, str]]:
    from pydoc_data import topics as mod

    from kvsplice.data import split_topics

    cal, ev = split_topics()
    v = sys.version_info
    prov = {"source": "pydoc_data.topics", "package": "CPython standard library", "version": f"{v.major}.{v.minor}.{v.micro}",
            "files": "1", "files_sha256": _files_digest({Path(mod.__file__).name: Path(mod.__file__).read_bytes()})}
    return {**cal, **ev}, prov


def _docs_parts() -> dict[str, list[str]]:
    from kvsplice.data import split_topics

    cal, ev = split_topics()
    # a coin per topic leaves the halves very unequal (22 topics of very different sizes): deal the
    # topics in sha256("dev-test:" + name) order, each to the half with fewer characters so far
    size = {"dev": 0, "test": 0}
    side: dict[str, str] = {}
    for n in sorted(ev, key=lambda n: _sha("dev-test:" + n)):
        side[n] = "dev" if size["dev"] <= size["test"] else "test"
        size[side[n]] += len(ev[n])
    return {"calibration": list(cal), "dev": [n for n in ev if side[n] == "dev"], "test": [n for n in ev if side[n] == "test"]}


# ---- code: the interpreter's standard library ----------------------------------------------------


def _load_code() -> tuple[dict[str, str], dict[str, str]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = {p.name: p.read_bytes() for p in sorted(root.glob("*.py")) if p.is_file()}
    if len(files) < 50:
        raise DomainUnavailable(f"domain 'code' expects the interpreter's stdlib *.py files in {root}, found {len(files)}")
    docs = {n: b.decode("utf-8", errors="replace") for n, b in files.items()}
    v = sys.version_info
    prov = {"source": f"{root}/*.py", "package": "CPython standard library", "version": f"{v.major}.{v.minor}.{v.micro}",
            "files": str(len(files)), "files_sha256": _files_digest(files)}
    return docs, prov


# ---- prose: Jane Austen (Debian r-cran-janeaustenr) ----------------------------------------------


def janeaustenr_dirs() -> list[Path]:
    """Where the package's data/ folder is looked for, in order."""
    extracted = Path("usr/lib/R/site-library/janeaustenr")
    out = []
    if os.environ.get(TEXTS_DIR_ENV):
        out.append(Path(os.environ[TEXTS_DIR_ENV]) / JANEAUSTENR_DEB / extracted)
    out.append(Path.home() / ".cache" / "kvsplice" / "texts" / JANEAUSTENR_DEB / extracted)
    out.append(Path("/") / extracted)
    return out


_CHAPTER = re.compile(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$")


def _load_prose() -> tuple[dict[str, str], dict[str, str]]:
    from kvsplice.rdata import read_lazyload

    pkg = next((d for d in janeaustenr_dirs() if (d / "data" / "Rdata.rdb").is_file()), None)
    if pkg is None:
        raise DomainUnavailable(
            f"domain 'prose' needs Debian's {JANEAUSTENR_DEB} (Jane Austen's novels): run `make texts` "
            f"(or `apt-get install {JANEAUSTENR_DEB}`); looked in {[str(d) for d in janeaustenr_dirs()]}")
    novels = read_lazyload(pkg / "data")
    docs: dict[str, str] = {}
    for novel, lines in sorted(novels.items()):
        chapter, buf = 0, None
        for line in list(lines) + ["CHAPTER END"]:
            if _CHAPTER.match(line or "") or line == "CHAPTER END":
                if buf is not None:
                    docs[f"{novel}/ch{chapter:03d}"] = "\n".join(buf).strip("\n")
                chapter, buf = chapter + 1, [line]
            elif buf is not None:
                buf.append(line or "")
    desc = (pkg / "DESCRIPTION").read_text(encoding="utf-8") if (pkg / "DESCRIPTION").is_file() else ""
    version = next((l.split(":", 1)[1].strip() for l in desc.splitlines() if l.startswith("Version:")), "unknown")
    deb_version = pkg.parents[4] / "DEBIAN_VERSION"  # written by `make texts` next to the extracted tree
    files = {p.name: p.read_bytes() for p in sorted((pkg / "data").glob("Rdata.*"))}
    prov = {"source": str(pkg / "data"), "package": f"Debian {JANEAUSTENR_DEB}",
            "version": deb_version.read_text().strip() if deb_version.is_file() else f"janeaustenr {version}",
            "files": str(len(files)), "files_sha256": _files_digest(files)}
    return docs, prov


DOMAINS: dict[str, Domain] = {
    "docs": Domain("docs", "CPython pydoc topics (English technical documentation)", "PSF-2.0", _load_docs),
    "code": Domain("code", "CPython standard library top-level *.py modules (Python source code)", "PSF-2.0", _load_code),
    "prose": Domain("prose", "Jane Austen's six novels, by chapter (English narrative prose, 1811-1818)",
                    "texts public domain (Project Gutenberg transcriptions); r-cran-janeaustenr package MIT", _load_prose),
}


def domain_names() -> list[str]:
    return list(DOMAINS)


def get_domain(name: str) -> Domain:
    if name not in DOMAINS:
        raise KVSpliceError(f"unknown text domain {name!r}; expected one of {domain_names()}")
    return DOMAINS[name]


@functools.lru_cache(maxsize=None)
def _loaded(name: str) -> tuple[dict[str, str], dict[str, str], dict[str, list[str]]]:
    docs, prov = get_domain(name).load()
    if name == "docs":
        parts = _docs_parts()
    else:
        parts = {p: [] for p in PARTS}
        for doc in sorted(docs, key=lambda d: _sha(f"{name}:{d}")):
            if docs[doc].strip():
                parts[_part_of(name, doc)].append(doc)
    for p in PARTS:
        if not parts[p]:
            raise KVSpliceError(f"domain {name!r}: part {p!r} is empty ({len(docs)} documents)")
    return docs, prov, parts


def available(name: str) -> bool:
    """True when the domain's source is installed here."""
    try:
        _loaded(name)
    except DomainUnavailable:
        return False
    return True


def part_documents(name: str, part: str) -> list[str]:
    """Document names of one part, in the order they are joined."""
    if part not in PARTS:
        raise KVSpliceError(f"part must be one of {PARTS}, got {part!r}")
    return list(_loaded(name)[2][part])


def part_text(name: str, part: str, rotate: int = 0) -> str:
    """The part's documents joined by a blank line; `rotate` starts at document `rotate` (mod the
    count) and wraps around: calibration draws use it to read different windows of the same part."""
    docs = _loaded(name)[0]
    names = part_documents(name, part)
    r = rotate % len(names)
    return "\n\n".join(docs[n] for n in names[r:] + names[:r])


def provenance(name: str) -> dict[str, str]:
    """Source, package, version, file count and digest, licence and description of a domain."""
    d = get_domain(name)
    return {"domain": name, **_loaded(name)[1], "licence": d.licence, "description": d.description}


def part_info(name: str, part: str) -> dict[str, object]:
    """Documents, character count and sha256 of one part's text (rotation 0), plus the split rule."""
    text = part_text(name, part)
    rule = ("calibration: the default calibration split of kvsplice/data.py; dev/test: evaluation topics dealt in "
            "sha256('dev-test:' + name) order to the shorter half") if name == "docs" else \
        f"sha256('{name}:' + document) % 10: 0-1 test, 2-3 dev, 4-9 calibration; ordered by that hash"
    return {"part": part, "documents": part_documents(name, part), "chars": len(text), "sha256": _sha(text), "rule": rule}


MIX_DOMAINS = ("docs", "code", "prose")
MIX_CHUNK_CHARS = 4000
# the sensitivity probe (kvsplice/allocation.py) reads the first 512 tokens: chunks this short put
# every mixed domain in them (a 4,000-character chunk is ~1,000 tokens of one domain)
PROBE_MIX_CHARS = 500


def mix_text(domains: tuple[str, ...] | None = None, chunk_chars: int = MIX_CHUNK_CHARS, rotate: float = 0.0) -> tuple[str, str]:
    """The default calibration text: the calibration parts of `domains` (default: every one of
    MIX_DOMAINS installed here) interleaved chunk by chunk (docs, code, prose, docs, ...), so that the
    first few calibration windows already see every domain. Returns (text, one-line description).

    Why a mix: calibrated on pydoc alone, pca-q 4-bit lost +4.4 % on prose (test split) against +0.9 %
    with this mix, with in-domain ties (docs/CROSS_DOMAIN.md). Without the prose package (`make
    texts`) the mix is docs + code, with a warning: the recipe then transfers less well to prose.
    rotate in [0, 1): each part starts at document int(rotate x its documents) (calibration draws)."""
    import warnings

    from kvsplice.errors import KVSpliceWarning

    if domains is None:
        domains = tuple(d for d in MIX_DOMAINS if available(d))
        missing = [d for d in MIX_DOMAINS if d not in domains]
        if missing:
            warnings.warn(f"calibration mix without {missing} (not installed here; `make texts` installs prose): "
                          f"calibrating on {list(domains)}", KVSpliceWarning, stacklevel=2)
    if not domains:
        raise KVSpliceError("mix_text needs at least one domain")
    if not 0.0 <= rotate < 1.0:
        raise KVSpliceError(f"mix_text: rotate must be a fraction in [0, 1), got {rotate!r}")
    parts = [part_text(d, "calibration", rotate=int(rotate * len(part_documents(d, "calibration")))) for d in domains]
    n = min(len(p) for p in parts) // chunk_chars
    if n < 1:
        raise KVSpliceError(f"a calibration part is shorter than one chunk of {chunk_chars} characters")
    text = "\n\n".join(p[i * chunk_chars:(i + 1) * chunk_chars] for i in range(n) for p in parts)
    return text, (f"mix of the calibration parts of {'+'.join(domains)} (kvsplice/texts.py{f', rotated {rotate:g}' if rotate else ''}), interleaved in "
                  f"{chunk_chars}-character chunks: {len(text)} chars, sha256 {_sha(text)[:16]}")
