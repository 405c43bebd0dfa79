"""Native (C, OpenMP) kernels that read bit-packed codes without materialising them (issue 12).

`coded.c` is compiled on first use with the system C compiler (`cc -O3 -march=native -fopenmp`) into
$KVSPLICE_CACHE/native/ (~/.cache/kvsplice/native), keyed by a hash of the source, the flags, the
compiler and the CPU, and loaded with ctypes (no torch headers, ~1 s to build; `make setup` builds
it). Three kernels, all float32, codes in the caller's order (`CodeOrder`):

    unpack(codes (..., P, nbytes) uint8)           -> (..., P, k)    the decode path
    scores(codes (B, P, nbytes), qa (B, R, k))     -> (B, R, P)      s = qa @ codes^T
    weighted(codes (B, P, nbytes), w (B, R, P))    -> (B, R, k)      o = w @ codes

The pure-torch path (kvsplice/codecs/packing.unpack_fast_t + matmuls) stays the reference; tests
assert both agree. Without a compiler, or with KVSPLICE_NATIVE=0, `available()` is False and callers
use the reference (a one-time warning says why when a build fails).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SOURCE = Path(__file__).with_name("coded.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11")
_I64, _I32P, _U8P, _F32P = ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p
_ROWS = [_U8P, _I64, _I64, _I64, _I64, _I64, _I32P, _I32P, _I32P, _I32P, _I64]


class NativeBuildError(RuntimeError):
    """The C kernels could not be compiled or loaded."""


def _cpu_id() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
        return "\n".join(ln for ln in text.splitlines() if ln.startswith(("model name", "flags")))[:4000]
    except OSError:
        return platform.processor()


def _compiler() -> str | None:
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def library_path() -> Path:
    """Where the built library lives (its name hashes source, flags, compiler and CPU)."""
    from kvsplice.loading import cache_root

    cc = _compiler() or "none"
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    h = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), cc, version, _cpu_id()]).encode()).hexdigest()[:16]
    return cache_root() / "native" / f"kvsplice_coded_{h}.so"


def build(force: bool = False) -> Path:
    """Compile coded.c (atomically: into a temporary file, then renamed). Returns the library path."""
    out = library_path()
    if out.is_file() and not force:
        return out
    cc = _compiler()
    if cc is None:
        raise NativeBuildError("no C compiler found (looked for $CC, cc, gcc)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        r = subprocess.run([cc, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
        if r.returncode != 0:
            raise NativeBuildError(f"{cc} failed on {SOURCE.name}: {(r.stderr or r.stdout).strip()[:500]}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.lru_cache(maxsize=1)
def _lib() -> Any:
    lib = ctypes.CDLL(str(build()))
    for name in ("kv_scores", "kv_weighted"):
        getattr(lib, name).argtypes = [*_ROWS, _F32P, _I64, _F32P, ctypes.c_int]
        getattr(lib, name).restype = None
    lib.kv_unpack.argtypes = [*_ROWS, _F32P, ctypes.c_int]
    lib.kv_unpack.restype = None
    return lib


@functools.lru_cache(maxsize=1)
def available() -> bool:
    """True when the kernels are built and loaded (KVSPLICE_NATIVE=0 turns them off)."""
    if os.environ.get("KVSPLICE_NATIVE", "1") == "0":
        return False
    try:
        _lib()
        return True
    except (NativeBuildError, OSError, subprocess.SubprocessError) as e:
        warnings.warn(f"kvsplice: native kernels unavailable, using the pure-torch path ({e})", stacklevel=2)
        return False


@dataclass(frozen=True)
class CodeOrder:
    """Where each code of a row lives, in the order the caller wants the codes: byte, next byte (clamped
    inside the row), shift and mask, each (k,) int32 contiguous; nbytes per row."""

    byte: Any
    next: Any
    shift: Any
    mask: Any
    nbytes: int

    @property
    def k(self) -> int:
        return int(self.byte.numel())


def code_order(lay: Any, order: Any) -> CodeOrder:
    """The codes of Layout `lay` (kvsplice/codecs/packing.py) in the order `order` (k,) of its stored codes
    (e.g. transposed_plan(lay).order, the order affine_groups / the decode matmul use). Cached on lay."""
    import torch

    cache = lay.__dict__.setdefault("_native_orders", {})  # frozen dataclass: the cache lives in __dict__
    key = order.data_ptr()
    if key not in cache:
        i32 = lambda t: t.index_select(0, order.to(t.device)).to(torch.int32).cpu().contiguous()  # noqa: E731
        cache[key] = (order, CodeOrder(i32(lay.byte), i32(lay.next_byte), i32(lay.shift), i32(lay.mask), lay.nbytes))
    return cache[key][1]


def _rows_args(codes: Any, co: CodeOrder) -> list:
    """codes (B, P, nbytes) uint8 CPU with unit last stride -> the kernels' first arguments."""
    import torch

    if codes.dtype != torch.uint8 or codes.dim() != 3 or codes.shape[-1] != co.nbytes or codes.device.type != "cpu":
        raise ValueError(f"native kernels: codes must be uint8 CPU (B, P, {co.nbytes}), got {codes.dtype} {tuple(codes.shape)} on {codes.device}")
    if codes.shape[1] > 1 and codes.stride(2) != 1:
        codes = codes.contiguous()
    B, P, nb = codes.shape
    return [codes.data_ptr(), B, P, codes.stride(0), codes.stride(1), nb,
            co.byte.data_ptr(), co.next.data_ptr(), co.shift.data_ptr(), co.mask.data_ptr(), co.k], codes


def _threads() -> int:
    import torch

    return max(1, torch.get_num_threads())


def unpack(codes: Any, co: CodeOrder) -> Any:
    """codes (..., P, nbytes) uint8 -> (..., P, k) float32."""
    import torch

    lead = codes.shape[:-2]
    flat = codes.reshape(-1, *codes.shape[-2:])
    args, flat = _rows_args(flat, co)
    out = torch.empty(flat.shape[0], flat.shape[1], co.k, dtype=torch.float32)
    _lib().kv_unpack(*args, out.data_ptr(), _threads())
    return out.view(*lead, flat.shape[1], co.k)


def scores(codes: Any, co: CodeOrder, qa: Any) -> Any:
    """codes (B, P, nbytes) uint8, qa (B, R, k) float32 -> (B, R, P) float32: qa @ codes^T."""
    import torch

    args, codes = _rows_args(codes, co)
    qa = qa.float().contiguous()
    B, P = codes.shape[:2]
    if qa.shape != (B, qa.shape[1], co.k):
        raise ValueError(f"native scores: qa must be (B={B}, R, k={co.k}), got {tuple(qa.shape)}")
    out = torch.empty(B, qa.shape[1], P, dtype=torch.float32)
    _lib().kv_scores(*args, qa.data_ptr(), qa.shape[1], out.data_ptr(), _threads())
    return out


def weighted(codes: Any, co: CodeOrder, w: Any) -> Any:
    """codes (B, P, nbytes) uint8, w (B, R, P) float32 -> (B, R, k) float32: w @ codes."""
    import torch

    args, codes = _rows_args(codes, co)
    w = w.float().contiguous()
    B, P = codes.shape[:2]
    if w.shape != (B, w.shape[1], P):
        raise ValueError(f"native weighted: w must be (B={B}, R, P={P}), got {tuple(w.shape)}")
    out = torch.empty(B, w.shape[1], co.k, dtype=torch.float32)
    _lib().kv_weighted(*args, w.data_ptr(), w.shape[1], out.data_ptr(), _threads())
    return out
