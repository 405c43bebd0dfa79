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
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp", "-shared", "-fPIC", "-std=c11")  # contraction: FMAs in the dot loops
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
    try:
        lib = ctypes.CDLL(str(build()))
    except OSError:  # a truncated / foreign file at the hashed path: rebuild it once
        lib = ctypes.CDLL(str(build(force=True)))
    for name in ("kv_scores", "kv_weighted"):
        getattr(lib, name).argtypes = [*_ROWS, _F32P, _I64, _F32P, _F32P, ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    lib.kv_unpack.argtypes = [*_ROWS, _F32P, ctypes.c_int]
    lib.kv_unpack.restype = ctypes.c_int
    lib.kv_step_scores.argtypes = [*_ROWS, _F32P, _I64, _F32P, _F32P, ctypes.c_void_p, _I64, ctypes.c_void_p,
                                   ctypes.c_float, _F32P, ctypes.c_int]
    lib.kv_step_scores.restype = ctypes.c_int
    lib.kv_step_values.argtypes = [*_ROWS, _F32P, _I64, _F32P, ctypes.c_void_p, _I64, _F32P, _F32P, _I64, _I64, _F32P, ctypes.c_int]
    lib.kv_step_values.restype = ctypes.c_int
    lib.kv_quant_pack.argtypes = [_F32P, _I64, _I64, _F32P, _F32P, _F32P, _I32P, _I32P, _I64, _U8P]
    lib.kv_quant_pack.restype = None
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
    """codes (B, P, nbytes) uint8 CPU -> the kernels' first arguments (bytes of a row adjacent: a
    copy otherwise; rows and sequences at any non-negative strides)."""
    import torch

    if codes.dtype != torch.uint8 or codes.dim() != 3 or codes.shape[-1] != co.nbytes or codes.device.type != "cpu":
        raise ValueError(f"native kernels: codes must be uint8 CPU (B, P, {co.nbytes}), got {codes.dtype} {tuple(codes.shape)} on {codes.device}")
    if (codes.shape[2] > 1 and codes.stride(2) != 1) or codes.stride(0) < 0 or codes.stride(1) < 0:
        codes = codes.contiguous()
    B, P, nb = codes.shape
    return [codes.data_ptr(), B, P, codes.stride(0), codes.stride(1), nb,
            co.byte.data_ptr(), co.next.data_ptr(), co.shift.data_ptr(), co.mask.data_ptr(), co.k], codes


_PID = os.getpid()


def _threads() -> int:
    """torch's thread count; 1 in a forked child (the OpenMP runtime is not fork-safe)."""
    import torch

    return 1 if os.getpid() != _PID else max(1, torch.get_num_threads())


def _cpu_float(name: str, t: Any) -> Any:
    import torch

    if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
        raise ValueError(f"native kernels: {name} must be a CPU tensor, got {getattr(t, 'device', type(t).__name__)}")
    return t.float().contiguous()


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise MemoryError(f"native {what}: the kernel could not allocate its scratch buffers")


def unpack(codes: Any, co: CodeOrder) -> Any:
    """codes (..., P, nbytes) uint8 -> (..., P, k) float32."""
    import torch

    lead = codes.shape[:-2]
    if codes.numel() == 0:
        return torch.zeros(*lead, codes.shape[-2], co.k, dtype=torch.float32)
    flat = codes.reshape(-1, *codes.shape[-2:])
    args, flat = _rows_args(flat, co)
    out = torch.empty(flat.shape[0], flat.shape[1], co.k, dtype=torch.float32)
    _check(_lib().kv_unpack(*args, out.data_ptr(), _threads()), "unpack")
    return out.view(*lead, flat.shape[1], co.k)


def _gains(gain: Any, B: int, P: int) -> tuple[int | None, Any]:
    if gain is None:
        return None, None
    gain = _cpu_float("gain", gain)
    if gain.shape != (B, P):
        raise ValueError(f"native kernels: gains must be (B={B}, P={P}), got {tuple(gain.shape)}")
    return gain.data_ptr(), gain


def scores(codes: Any, co: CodeOrder, qa: Any, gain: Any = None) -> Any:
    """codes (B, P, nbytes) uint8, qa (B, R, k + 2), gain (B, P) or None -> (B, R, P) float32:
    (qa[..., :k] @ codes^T + qa[..., k]) * gain + qa[..., k + 1]."""
    import torch

    args, codes = _rows_args(codes, co)
    qa = _cpu_float("qa", qa)
    B, P = codes.shape[:2]
    if qa.dim() != 3 or qa.shape[0] != B or qa.shape[2] != co.k + 2:
        raise ValueError(f"native scores: qa must be (B={B}, R, k+2={co.k + 2}), got {tuple(qa.shape)}")
    g, _alive = _gains(gain, B, P)  # _alive: the float gains outlive the call
    out = torch.empty(B, qa.shape[1], P, dtype=torch.float32)
    if out.numel():
        _check(_lib().kv_scores(*args, qa.data_ptr(), qa.shape[1], g, out.data_ptr(), _threads()), "scores")
    return out


def weighted(codes: Any, co: CodeOrder, p: Any, gain: Any = None) -> Any:
    """codes (B, P, nbytes) uint8, p (B, R, P), gain (B, P) or None -> (B, R, k + 2) float32:
    [(p * gain) @ codes, (p * gain).sum(-1), p.sum(-1)]."""
    import torch

    args, codes = _rows_args(codes, co)
    p = _cpu_float("p", p)
    B, P = codes.shape[:2]
    if p.dim() != 3 or p.shape[0] != B or p.shape[2] != P:
        raise ValueError(f"native weighted: p must be (B={B}, R, P={P}), got {tuple(p.shape)}")
    g, _alive = _gains(gain, B, P)  # _alive: the float gains outlive the call
    out = torch.zeros(B, p.shape[1], co.k + 2, dtype=torch.float32)
    if out.numel() and P:
        _check(_lib().kv_weighted(*args, p.data_ptr(), p.shape[1], g, out.data_ptr(), _threads()), "weighted")
    return out


@dataclass(frozen=True)
class QuantTables:
    """Mid-rise quantiser and packing of k coefficients in stored order: clip, step (= 2 clip / levels),
    top (= levels - 1), all (k,) float32; byte, shift (k,) int32; nbytes per row."""

    clip: Any
    step: Any
    top: Any
    byte: Any
    shift: Any
    nbytes: int


def quant_tables(clip: Any, levels: Any, lay: Any) -> QuantTables:
    """From a codec's clip (k,) and levels (k,) (float32, stored order) and its packing Layout."""
    import torch

    f32 = lambda t: t.float().cpu().contiguous()  # noqa: E731
    i32 = lambda t: t.to(torch.int32).cpu().contiguous()  # noqa: E731
    clip = f32(clip)
    return QuantTables(clip, f32(2 * clip / levels.float()), f32(levels.float() - 1), i32(lay.byte), i32(lay.shift), lay.nbytes)


def quant_pack(y: Any, qt: QuantTables) -> Any:
    """y (..., k) float32 coefficients -> packed codes (..., nbytes) uint8 (= pack_fast(midrise_codes(y)))."""
    import torch

    k = qt.clip.numel()
    if y.dtype != torch.float32 or y.shape[-1] != k or y.device.type != "cpu":
        raise ValueError(f"native quant_pack: y must be float32 CPU (..., {k}), got {y.dtype} {tuple(y.shape)} on {y.device}")
    flat = y.reshape(-1, k).contiguous()
    out = torch.empty(*y.shape[:-1], qt.nbytes, dtype=torch.uint8)
    _lib().kv_quant_pack(flat.data_ptr(), flat.shape[0], k, qt.clip.data_ptr(), qt.step.data_ptr(), qt.top.data_ptr(),
                         qt.byte.data_ptr(), qt.shift.data_ptr(), qt.nbytes, out.data_ptr())
    return out


def _sink_args(sink_col: Any, B: int) -> tuple[int | None, int, Any]:
    import torch

    if sink_col is None:
        return None, 0, None
    if sink_col.dtype != torch.long or sink_col.dim() != 2 or sink_col.shape[0] != B or sink_col.device.type != "cpu":
        raise ValueError(f"native step: sink columns must be int64 CPU (B={B}, n), got {sink_col.dtype} {tuple(sink_col.shape)}")
    sink_col = sink_col.contiguous()
    return sink_col.data_ptr(), sink_col.shape[1], sink_col


def step_scores(codes: Any, co: CodeOrder, qa: Any, gain: Any, sink_s: Any, sink_col: Any, allowed: Any, scaling: float) -> Any:
    """Scaled, masked scores of one group for one decode step: codes (B, P, nbytes), qa (B, R, k + 2),
    gain (B, P) | None, sink_s (B, R, ns) exact (unscaled) sink scores | None, sink_col (B, ns) int64
    (-1: empty) | None, allowed (B, P) bool | None -> (B, R, P) float32 (-FLT_MAX where not allowed)."""
    import torch

    args, codes = _rows_args(codes, co)
    qa = _cpu_float("qa", qa)
    B, P = codes.shape[:2]
    R = qa.shape[1]
    if qa.dim() != 3 or qa.shape[0] != B or qa.shape[2] != co.k + 2:
        raise ValueError(f"native step_scores: qa must be (B={B}, R, k+2={co.k + 2}), got {tuple(qa.shape)}")
    g, _g = _gains(gain, B, P)
    sc, ns, _c = _sink_args(sink_col, B)
    ss = None if sink_s is None else _cpu_float("sink_s", sink_s)
    if ss is not None and ss.shape != (B, R, ns):
        raise ValueError(f"native step_scores: sink scores must be (B={B}, R={R}, ns={ns}), got {tuple(ss.shape)}")
    al = None if allowed is None else allowed.to(torch.uint8).contiguous()
    if al is not None and (al.shape != (B, P) or al.device.type != "cpu"):
        raise ValueError(f"native step_scores: allowed must be CPU (B={B}, P={P}), got {tuple(al.shape)} on {al.device}")
    out = torch.empty(B, R, P, dtype=torch.float32)
    if out.numel():
        _check(_lib().kv_step_scores(*args, qa.data_ptr(), R, g, None if ss is None else ss.data_ptr(), sc, ns,
                                     None if al is None else al.data_ptr(), float(scaling), out.data_ptr(), _threads()), "step_scores")
    return out


def step_values(codes: Any, co: CodeOrder, p: Any, gain: Any, sink_col: Any, sink_v: Any, Aext: Any) -> Any:
    """Attention output of one group for one decode step: codes (B, P, nbytes), p (B, R, P) float32
    contiguous (MODIFIED: sink columns zeroed), gain (B, P) | None, sink_col (B, ns) | None, sink_v
    (B, n, ns, hd) exact sink rows | None, Aext (n, k + 2, hd) -> (B, R, hd) float32."""
    import torch

    args, codes = _rows_args(codes, co)
    B, P = codes.shape[:2]
    if not (isinstance(p, torch.Tensor) and p.dtype == torch.float32 and p.is_contiguous() and p.device.type == "cpu"
            and p.dim() == 3 and p.shape[0] == B and p.shape[2] == P):
        raise ValueError(f"native step_values: p must be contiguous float32 CPU (B={B}, R, P={P}), got {getattr(p, 'shape', None)}")
    Aext = _cpu_float("Aext", Aext)
    n, ko, hd = Aext.shape
    R = p.shape[1]
    if ko != co.k + 2 or R % n:
        raise ValueError(f"native step_values: Aext must be (n, k+2={co.k + 2}, hd) with n dividing R={R}, got {tuple(Aext.shape)}")
    g, _g = _gains(gain, B, P)
    sc, ns, _c = _sink_args(sink_col, B)
    sv = None if sink_v is None else _cpu_float("sink_v", sink_v)
    if sv is not None and sv.shape != (B, n, ns, hd):
        raise ValueError(f"native step_values: sink rows must be (B={B}, n={n}, ns={ns}, hd={hd}), got {tuple(sv.shape)}")
    out = torch.zeros(B, R, hd, dtype=torch.float32)
    if out.numel():
        _check(_lib().kv_step_values(*args, p.data_ptr(), R, g, sc, ns, None if sv is None else sv.data_ptr(),
                                     Aext.data_ptr(), n, hd, out.data_ptr(), _threads()), "step_values")
    return out
