"""Uniform-quantiser primitives shared by the quantising codecs (pure tensor math).

- Bit packing: integer codes of any width 0..8 (one width per coefficient, or one for all)
  <-> a uint8 bitstream of exactly ceil(sum(widths) / 8) bytes per vector.
- Per-group min-max (asymmetric) and absmax (symmetric) quantisers with fp16 scales; codes are
  computed with the fp16-rounded scales, so decode(encode(x)) is exactly what a cache returns.
- Static mid-rise quantisers with per-coefficient ranges (transform coding).
- Reverse water-filling: integer bits per coefficient from variances for an exact total budget.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence

import torch

from kvsplice.codecs.packing import layout, pack_fast, scatter_codes, unpack_fast
from kvsplice.errors import CodecError

MAX_BITS = 8
FP16_MAX = 65504.0

# Mean-squared-error-optimal clipping of a uniform mid-rise quantiser with 2**b levels for a
# unit Gaussian, in sigma (Max 1960, optimum step sizes x 2**b / 2). Index = bits.
GAUSSIAN_CLIP: tuple[float, ...] = (0.0, 1.596, 1.991, 2.344, 2.682, 3.010, 3.331, 3.642, 3.942)


def _widths_tuple(widths: int | Sequence[int], n: int) -> tuple[int, ...]:
    if isinstance(widths, int):
        widths = (widths,) * n
    w = tuple(int(b) for b in widths)
    if len(w) != n:
        raise CodecError(f"bit packing: expected {n} widths (one per code), got {len(w)}")
    if any(b < 0 or b > MAX_BITS for b in w):
        raise CodecError(f"bit packing: widths must be integers in [0, {MAX_BITS}], got {sorted(set(w))}")
    return w


def packed_nbytes(widths: int | Sequence[int], n: int | None = None) -> int:
    """Bytes one vector's codes occupy: ceil(sum(widths) / 8)."""
    total = widths * n if isinstance(widths, int) else sum(int(b) for b in widths)
    return (total + 7) // 8


def pack_codes(codes: torch.Tensor, widths: int | Sequence[int]) -> torch.Tensor:
    """codes: (..., n) integers, code i in [0, 2**widths[i]) -> uint8 (..., ceil(sum(widths)/8)).

    Little-endian bitstream: code 0's bits first, least significant bit first. Width-0 codes take
    no space (their value must be 0). Implementation: kvsplice/codecs/packing.py (one element per
    code; `pack_reference` there is the bit-by-bit original, byte-identical)."""
    n = codes.shape[-1]
    w = _widths_tuple(widths, n)
    c = codes.long()
    hi = torch.tensor([(1 << b) - 1 for b in w], dtype=torch.long, device=codes.device)
    if c.numel() and (bool((c < 0).any()) or bool((c > hi).any())):
        raise CodecError("pack_codes: a code is outside [0, 2**width)")
    return pack_fast(c, layout(w, codes.device))


def unpack_codes(packed: torch.Tensor, widths: int | Sequence[int], n: int | None = None) -> torch.Tensor:
    """Inverse of `pack_codes`: uint8 (..., nbytes) -> long (..., n)."""
    if isinstance(widths, int):
        if n is None:
            raise CodecError("unpack_codes: n is required when widths is a single int")
        w = _widths_tuple(widths, n)
    else:
        w = _widths_tuple(widths, len(widths))
    if packed.dtype != torch.uint8:
        raise CodecError(f"unpack_codes expects uint8 bytes, got {packed.dtype}")
    nbytes = packed_nbytes(list(w))
    if packed.shape[-1] != nbytes:
        raise CodecError(f"unpack_codes: expected {nbytes} bytes per vector, got {packed.shape[-1]}")
    lay = layout(w, packed.device)
    stored = unpack_fast(packed, lay)
    return stored if len(lay.index) == len(w) else scatter_codes(stored, lay)


# -- per-group quantisers with fp16 scales ------------------------------------------------------


def _groups(x: torch.Tensor, group: int | None) -> tuple[torch.Tensor, int]:
    """(..., D) -> (..., G, g) view with g = group (D when None)."""
    D = x.shape[-1]
    g = D if group is None else int(group)
    if g < 1 or D % g:
        raise CodecError(f"group size must divide the vector dimension D={D}, got {group}")
    return x.reshape(*x.shape[:-1], D // g, g), g


def quantize_minmax(x: torch.Tensor, bits: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric per-group quantiser. x: (..., D) -> codes long (..., D) in [0, 2**bits - 1],
    lo fp16 (..., G), step fp16 (..., G) with G = D / group. Recon = lo + code * step."""
    if not 1 <= bits <= MAX_BITS:
        raise CodecError(f"quantize_minmax: bits must be in [1, {MAX_BITS}], got {bits}")
    xg, _ = _groups(x.float().clamp(-FP16_MAX, FP16_MAX), group)  # (..., G, g)
    lo = xg.amin(-1).half()  # (..., G)
    hi = xg.amax(-1)
    step = ((hi - lo.float()) / ((1 << bits) - 1)).clamp_min(1e-7).half()  # fp16 subnormal floor
    step = torch.where(step.float() > 0, step, torch.full_like(step, 2**-24))
    codes = torch.round((xg - lo.float().unsqueeze(-1)) / step.float().unsqueeze(-1)).clamp(0, (1 << bits) - 1)
    return codes.long().reshape(x.shape), lo, step


def dequantize_minmax(codes: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, group: int | None = None) -> torch.Tensor:
    """Inverse of `quantize_minmax`: float32 (..., D)."""
    cg, _ = _groups(codes.float(), group)
    return (lo.float().unsqueeze(-1) + cg * step.float().unsqueeze(-1)).reshape(codes.shape)


def quantize_absmax(x: torch.Tensor, bits: int, group: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric mid-rise per-group quantiser over [-a, a], a = max |x| of the group (fp16).
    x: (..., D) -> codes long (..., D) in [0, 2**bits), absmax fp16 (..., G)."""
    if not 1 <= bits <= MAX_BITS:
        raise CodecError(f"quantize_absmax: bits must be in [1, {MAX_BITS}], got {bits}")
    xg, _ = _groups(x.float().clamp(-FP16_MAX, FP16_MAX), group)
    a = xg.abs().amax(-1).half()
    a = torch.where(a.float() > 0, a, torch.full_like(a, 2**-24))
    L = 1 << bits
    codes = midrise_codes(xg, a.float().unsqueeze(-1), L)
    return codes.reshape(x.shape), a


def dequantize_absmax(codes: torch.Tensor, absmax: torch.Tensor, bits: int, group: int | None = None) -> torch.Tensor:
    cg, _ = _groups(codes, group)
    return midrise_values(cg, absmax.float().unsqueeze(-1), 1 << bits).reshape(codes.shape)


def midrise_codes(y: torch.Tensor, clip: torch.Tensor, levels: torch.Tensor | int) -> torch.Tensor:
    """Mid-rise uniform quantiser of [-clip, clip] into `levels` cells (broadcasting) -> long codes."""
    L = torch.as_tensor(levels, dtype=torch.float32, device=y.device)
    step = 2 * clip / L
    return torch.minimum(torch.floor((y + clip) / step).clamp_min(0), L - 1).long()


def midrise_values(codes: torch.Tensor, clip: torch.Tensor, levels: torch.Tensor | int) -> torch.Tensor:
    """Reconstruction points (cell centres) of `midrise_codes`: float32."""
    L = torch.as_tensor(levels, dtype=torch.float32, device=codes.device)
    step = 2 * clip / L
    return -clip + (codes.float() + 0.5) * step


# -- bit allocation --------------------------------------------------------------------------------


def water_fill(variances: torch.Tensor, total_bits: int, max_bits: int = MAX_BITS) -> torch.Tensor:
    """Reverse water-filling with integer bits: (n,) variances -> (n,) long bits in [0, max_bits]
    summing to exactly `total_bits`.

    Greedy on the high-resolution distortion model var_i * 4**(-b_i): each bit goes to the
    coefficient whose current distortion is largest (ties: lower index). Optimal for that model,
    and bits are non-increasing in variance. 0 bits = coefficient dropped."""
    v = torch.as_tensor(variances).double().flatten()
    n = v.numel()
    if not isinstance(total_bits, int) or total_bits < 0 or total_bits > max_bits * n:
        raise CodecError(f"water_fill: total_bits must be an integer in [0, {max_bits * n}] for {n} coefficients, got {total_bits!r}")
    if not bool(torch.isfinite(v).all()) or bool((v < 0).any()):
        raise CodecError("water_fill: variances must be finite and non-negative")
    bits = [0] * n
    heap = [(-float(v[i]), i) for i in range(n)]
    heapq.heapify(heap)
    for _ in range(total_bits):
        d, i = heapq.heappop(heap)
        bits[i] += 1
        if bits[i] < max_bits:
            heapq.heappush(heap, (d / 4.0, i))
    return torch.tensor(bits, dtype=torch.long)


def gaussian_clip(bits: torch.Tensor) -> torch.Tensor:
    """MSE-optimal clip (in sigma) for each coefficient's bit width; 0 for dropped ones."""
    table = torch.tensor(GAUSSIAN_CLIP, dtype=torch.float32)
    return table[bits.long().clamp(0, MAX_BITS).cpu()].to(bits.device)


def fit_clip(y: torch.Tensor, bits: torch.Tensor, sigma: torch.Tensor, grid: Sequence[float] | None = None) -> torch.Tensor:
    """Per-coefficient clip minimising the calibration MSE of the static mid-rise quantiser.
    y: (N, n) coefficients, bits (n,), sigma (n,) -> clip (n,) in y's units (0 where bits == 0)."""
    grid = grid if grid is not None else [0.5 + 0.25 * i for i in range(27)]  # 0.5 .. 7.0 sigma
    best = torch.full_like(sigma, float("inf"))
    clip = gaussian_clip(bits) * sigma
    L = (1 << bits.clamp_min(0)).float()
    for m in grid:
        c = (m * sigma).clamp_min(1e-12)
        err = ((midrise_values(midrise_codes(y, c, L), c, L) - y) ** 2).mean(0)
        better = err < best
        best = torch.where(better, err, best)
        clip = torch.where(better, c, clip)
    return torch.where(bits > 0, clip, torch.zeros_like(clip))


def check_bits_param(bits: float, name: str) -> float:
    if isinstance(bits, bool) or not isinstance(bits, (int, float)) or not math.isfinite(bits) or not 0 < bits <= MAX_BITS:
        raise CodecError(f"{name}: bits (average bits per value) must be a number in (0, {MAX_BITS}], got {bits!r}")
    return float(bits)
