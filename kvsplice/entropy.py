"""Lossless coders for columns of small integer codes (the storage format, kvsplice/storage.py).

Input: sym (N, K) uint8, column j holding N codes of width widths[j] bits (1..8; values < 2**w).
A column is one transform coefficient of one layer's K or V over all stored rows (B x P): a
coefficient's codes share one distribution, so each column gets its own model.

Coders (`CODERS`), each encode(sym, widths) -> {name: np.ndarray} and decode(arrays, N, widths) -> sym:
  "rans"  static-frequency rANS, one model per column: frequency table (2**w entries, 14-bit
          precision, counted on the data, stored zlib-compressed in the file), 32-bit state,
          16-bit renormalisation words. All K columns are coded as K interleaved lanes with one
          numpy step per row (N steps, each vectorised over the columns). Cost: ~ the columns'
          empirical entropy + 32 bits of final state per column + the tables.
  "zlib" / "lzma"  the stdlib compressors on the coefficient-major byte stream (one byte per code,
          column 0's N codes first): the baselines the rANS coder is measured against.
`entropy_bits(sym, widths)`: sum over columns of N x empirical entropy: what an ideal static
per-column arithmetic coder would spend on the codes (tables not counted).

Decoding checks itself: every lane must consume exactly its words and end in the initial state,
else `EntropyError` (a corrupted or truncated file never decodes to wrong codes silently).
"""

from __future__ import annotations

import lzma
import zlib

import numpy as np

from kvsplice.errors import KVSpliceError

SCALE_BITS = 14  # frequency precision: tables sum to 2**14
M = 1 << SCALE_BITS
L = 1 << 16  # state lower bound; the state lives in [L, 2**32)
WORD = 16  # bits per renormalisation word


class EntropyError(KVSpliceError):
    """A coded stream does not decode (corrupted, truncated, or written for other widths)."""


def _check(sym: np.ndarray, widths: np.ndarray) -> None:
    if sym.ndim != 2 or sym.dtype != np.uint8 or widths.shape != (sym.shape[1],):
        raise EntropyError(f"expected codes uint8 (N, K) and widths (K,), got {sym.dtype} {sym.shape}, widths {widths.shape}")
    if widths.size and (widths.min() < 1 or widths.max() > 8):
        raise EntropyError(f"code widths must be 1..8 bits, got {int(widths.min())}..{int(widths.max())}")
    if sym.size and bool((sym >= (1 << widths.astype(np.int64))[None, :]).any()):
        raise EntropyError("a code is out of range for its column's width")


# -- static rANS, one lane per column -----------------------------------------------------------------
def _tables(sym: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Frequencies (K, A) int64, A = 2**max(width), each row summing to M; every symbol that occurs
    gets >= 1, the rounding remainder goes to the row's most frequent symbol."""
    N, K = sym.shape
    A = 1 << int(widths.max())
    counts = np.bincount((np.arange(K) * A + sym).ravel(), minlength=K * A).reshape(K, A)
    present = counts > 0
    n_present = present.sum(1, keepdims=True)
    freq = counts * (M - n_present) // max(N, 1) + present
    freq[np.arange(K), counts.argmax(1)] += M - freq.sum(1)
    return freq


def _table_bytes(freq: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Each row's first 2**w entries as uint16, concatenated, zlib level 9 -> uint8 array."""
    used = np.arange(freq.shape[1])[None, :] < (1 << widths.astype(np.int64))[:, None]
    flat = freq[used].astype(np.uint16)  # values <= M = 2**14 fit
    return np.frombuffer(zlib.compress(flat.tobytes(), 9), dtype=np.uint8)


def _read_tables(blob: np.ndarray, widths: np.ndarray) -> np.ndarray:
    A = 1 << int(widths.max())
    used = np.arange(A)[None, :] < (1 << widths.astype(np.int64))[:, None]
    try:
        flat = np.frombuffer(zlib.decompress(blob.tobytes()), dtype=np.uint16)
    except (zlib.error, ValueError) as e:
        raise EntropyError(f"rANS frequency tables do not decompress: {e}") from e
    if flat.size != int(used.sum()):
        raise EntropyError(f"rANS tables hold {flat.size} entries, the widths need {int(used.sum())}")
    freq = np.zeros(used.shape, dtype=np.int64)
    freq[used] = flat
    if bool((freq.sum(1) != M).any()):
        raise EntropyError(f"rANS tables must each sum to {M}")
    return freq


def rans_encode(sym: np.ndarray, widths: np.ndarray) -> dict[str, np.ndarray]:
    """-> {"words": uint16 (all lanes' words, lane-major), "counts": int64 (K,) words per lane,
    "state": uint32 (K,) final states, "tables": uint8 (zlib'd frequency tables)}."""
    _check(sym, widths)
    N, K = sym.shape
    freq = _tables(sym, widths)
    cum = np.cumsum(freq, 1) - freq
    lane = np.arange(K)
    x = np.full(K, L, dtype=np.uint64)
    words = np.zeros((N, K), dtype=np.uint16)
    emitted = np.zeros((N, K), dtype=bool)
    f_all = freq[lane[None, :], sym].astype(np.uint64)  # (N, K)
    c_all = cum[lane[None, :], sym].astype(np.uint64)
    shift = np.uint64(32 - SCALE_BITS)
    for t in range(N - 1, -1, -1):  # rANS is last-in first-out: encode backwards, decode forwards
        f, c = f_all[t], c_all[t]
        out = x >= (f << shift)  # renormalise so that the state stays < 2**32 after coding
        words[t] = np.where(out, x & np.uint64(0xFFFF), 0)
        emitted[t] = out
        x = np.where(out, x >> np.uint64(WORD), x)
        x = (x // f << np.uint64(SCALE_BITS)) + x % f + c
    # lane-major, row t ascending: the order the decoder reads them
    return {"words": words.T[emitted.T], "counts": emitted.sum(0).astype(np.int64),
            "state": x.astype(np.uint32), "tables": _table_bytes(freq, widths)}


def rans_decode(arrays: dict[str, np.ndarray], N: int, widths: np.ndarray) -> np.ndarray:
    K = widths.shape[0]
    try:
        words, counts, state, blob = (arrays[k] for k in ("words", "counts", "state", "tables"))
    except KeyError as e:
        raise EntropyError(f"rANS stream is missing {e}") from e
    if counts.shape != (K,) or state.shape != (K,) or int(counts.sum()) != words.size or bool((counts < 0).any()):
        raise EntropyError(f"rANS stream of {K} lanes: counts {counts.shape}, state {state.shape}, {words.size} words disagree")
    freq = _read_tables(blob, widths)
    A = freq.shape[1]
    cum = np.cumsum(freq, 1) - freq
    lane = np.arange(K)
    keys = (lane[:, None] * M + cum).ravel()  # globally non-decreasing: one searchsorted for all lanes
    start = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    used = np.zeros(K, dtype=np.int64)
    w64 = np.concatenate([words.astype(np.uint64), np.zeros(1, np.uint64)])  # +1: safe index when nothing is read
    x = state.astype(np.uint64)
    if bool((x < L).any()):
        raise EntropyError("rANS final state below its lower bound (corrupted stream)")
    out = np.empty((N, K), dtype=np.uint8)
    mask = np.uint64(M - 1)
    for t in range(N):
        slot = (x & mask).astype(np.int64)
        s = np.searchsorted(keys, lane * M + slot, side="right") - 1 - lane * A
        out[t] = s
        f, c = freq[lane, s].astype(np.uint64), cum[lane, s].astype(np.uint64)
        x = f * (x >> np.uint64(SCALE_BITS)) + slot.astype(np.uint64) - c
        need = x < L
        idx = np.where(need & (used < counts), start + used, words.size)
        x = np.where(need, (x << np.uint64(WORD)) | w64[idx], x)
        used += need
    if bool((used != counts).any()) or bool((x != L).any()):
        raise EntropyError("rANS stream did not end where it was written (corrupted, or other code widths)")
    return out


# -- stdlib baselines on the coefficient-major byte stream ----------------------------------------------
def _bytes_codec(compress, decompress):
    def encode(sym: np.ndarray, widths: np.ndarray) -> dict[str, np.ndarray]:
        _check(sym, widths)
        return {"blob": np.frombuffer(compress(np.ascontiguousarray(sym.T).tobytes()), dtype=np.uint8)}

    def decode(arrays: dict[str, np.ndarray], N: int, widths: np.ndarray) -> np.ndarray:
        try:
            raw = decompress(arrays["blob"].tobytes())
        except Exception as e:  # zlib.error / lzma.LZMAError / KeyError: one typed error
            raise EntropyError(f"code stream does not decompress: {type(e).__name__}: {e}") from e
        if len(raw) != N * widths.shape[0]:
            raise EntropyError(f"code stream holds {len(raw)} codes, expected {N} x {widths.shape[0]}")
        sym = np.frombuffer(raw, dtype=np.uint8).reshape(widths.shape[0], N).T.copy()
        _check(sym, widths)
        return sym

    return encode, decode


CODERS = {
    "rans": (rans_encode, rans_decode),
    "zlib": _bytes_codec(lambda b: zlib.compress(b, 9), zlib.decompress),
    "lzma": _bytes_codec(lambda b: lzma.compress(b, preset=9), lzma.decompress),
}


def encode(coder: str, sym: np.ndarray, widths: np.ndarray) -> dict[str, np.ndarray]:
    if coder not in CODERS:
        raise KVSpliceError(f"unknown entropy coder {coder!r}; expected one of {sorted(CODERS)}")
    return CODERS[coder][0](sym, widths)


def decode(coder: str, arrays: dict[str, np.ndarray], N: int, widths: np.ndarray) -> np.ndarray:
    if coder not in CODERS:
        raise EntropyError(f"unknown entropy coder {coder!r}; expected one of {sorted(CODERS)}")
    return CODERS[coder][1](arrays, N, widths)


def entropy_bits(sym: np.ndarray, widths: np.ndarray) -> float:
    """Sum over columns of N x the column's empirical entropy (bits): the ideal static per-column cost."""
    N, K = sym.shape
    if not N or not K:
        return 0.0
    A = 1 << int(widths.max())
    counts = np.bincount((np.arange(K) * A + sym).ravel(), minlength=K * A).astype(np.float64)
    p = counts[counts > 0] / N
    return float(-(counts[counts > 0] * np.log2(p)).sum())
