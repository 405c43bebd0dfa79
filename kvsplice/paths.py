"""Output paths: one check every command runs before its work starts, and one atomic writer.

`check_outputs(inputs, outputs)` refuses, before any model loads:
  * an output that resolves to an input (`eval --geometry G --json G` would replace the geometry);
  * two outputs that resolve to the same file (`--out X --dump-vectors X` would lose one of them);
  * an output whose folder cannot be created or written, or that is an existing directory.
Nothing is written by the check.
Paths are compared after `expanduser` + `resolve` (symlinks and `..` followed), so `./g` and
`sub/../g` are the same file.

`atomic_write_bytes(path, data)` writes through a hidden temporary file in the same folder
(`.<name>.<pid>.<random>.tmp`), fsyncs and renames it into place: readers see the old file or the
new one, never half of one. A save killed mid-write (SIGKILL, power loss) leaves its temporary
file behind; the next save of the same path removes temporaries whose writer process is gone.

No torch import here: commands call this before loading anything heavy.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path
from typing import Iterable

from kvsplice.errors import KVSpliceError

_CHUNK = 1 << 20
STALE_SECONDS = 3600  # temporaries without a writer pid (older naming) count as stale after this


class OutputPathError(KVSpliceError):
    """An output path would overwrite an input or another output, or cannot be written."""


def _resolved(p: str | os.PathLike) -> Path:
    return Path(p).expanduser().resolve()


def check_outputs(inputs: dict[str, object], outputs: dict[str, object], folders: dict[str, object] | None = None) -> None:
    """OutputPathError unless every output is writable and distinct from every input and output.

    inputs / outputs: {flag name: path, list of paths, or None (absent)}, e.g.
    check_outputs({"--geometry": ["a", "b"]}, {"--json": "r.json", "--plot": None}).
    folders: outputs that are folders (e.g. a recipe): not an input, another output or an existing
    file; the files written inside them belong in `outputs`.
    """
    def flat(d: dict[str, object]) -> list[tuple[str, Path]]:
        out = []
        for flag, v in d.items():
            for p in (v if isinstance(v, (list, tuple)) else [v]):
                if p is not None and str(p) != "":
                    out.append((flag, _resolved(p)))
        return out

    ins, outs = flat(inputs), flat(outputs)
    for flag, d in flat(folders or {}):
        for iflag, q in ins + outs:
            if d == q:
                raise OutputPathError(f"{flag} {d} is also {iflag}: writing the folder would overwrite it")
        if d.exists() and not d.is_dir():
            raise OutputPathError(f"{flag} {d} is an existing file; expected a folder path")
    seen: dict[Path, str] = {}
    for flag, p in outs:
        for iflag, q in ins:
            if p == q:
                raise OutputPathError(f"{flag} {p} is also the input {iflag}: writing it would overwrite the input; "
                                      "choose another output path")
        if p in seen:
            raise OutputPathError(f"{flag} and {seen[p]} are the same file {p}: one output would overwrite the other")
        seen[p] = flag
        check_writable(p, flag)


def check_writable(path: str | os.PathLike, flag: str = "output") -> None:
    """OutputPathError unless `path` can be created or replaced: not a directory, and its nearest
    existing ancestor folder is a writable directory (missing folders are made at write time).
    Touches nothing on disk."""
    p = _resolved(path)
    if p.is_dir():
        raise OutputPathError(f"{flag} {p} is a directory; expected a file path")
    anc = p.parent
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        raise OutputPathError(f"{flag} {p}: {anc} is a file, so the folder {p.parent} cannot be created")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {p}: folder {anc} is not writable")


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def clean_stale_temporaries(path: Path) -> list[Path]:
    """Remove `.<name>.<pid>.*.tmp` files next to `path` whose writer pid no longer runs (and
    pid-less `.<name>.*.tmp` older than STALE_SECONDS). Returns what was removed."""
    removed = []
    prefix = f".{path.name}."
    with contextlib.suppress(OSError):
        for q in path.parent.iterdir():
            n = q.name
            if not (n.startswith(prefix) and n.endswith(".tmp")) or not q.is_file():
                continue
            pid_part = n[len(prefix):].split(".", 1)[0]
            if pid_part.isdigit():
                stale = not _pid_alive(int(pid_part))
            else:
                stale = time.time() - q.stat().st_mtime > STALE_SECONDS
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    q.unlink()
                    removed.append(q)
    return removed


def _write_all(f, data: bytes) -> None:
    view = memoryview(data)
    for i in range(0, len(view), _CHUNK):
        f.write(view[i : i + _CHUNK])


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (temp file in the same folder, fsync, os.replace), mode
    0666 minus the umask; stale temporaries of earlier killed saves of `path` are removed first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            _write_all(f, data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
