"""Bit packing of integer codes (widths 0..8 per code) into a little-endian uint8 bitstream.

Layout (unchanged since the first release, so payloads and tests stay valid): code 0's bits first,
least significant bit first, then code 1, ...; ceil(sum(widths) / 8) bytes per vector, width-0 codes
take no space.

Two implementations of the same layout:
  - `pack_reference` / `unpack_reference`: one tensor element per BIT (gather bits, index_add them
    back). Simple and obviously right; 8x-60x slower. Kept as the reference the tests compare to.
  - `pack_fast` / `unpack_fast`: one element per CODE. A code of width <= 8 that starts at bit offset
    o lies inside the two bytes o // 8 and o // 8 + 1, so
        code = ((byte[o // 8] | byte[o // 8 + 1] << 8) >> (o % 8)) & (2**w - 1)
    is two gathers, one shift, one or, one mask for ALL codes at once (no per-bit tensor, no
    index_add). Packing is the reverse: two index_adds of the shifted code's low and high byte (bit
    ranges of different codes never overlap, so adding is or-ing).
Both produce byte-identical streams (tests/test_packing.py checks random widths and codes).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from kvsplice.errors import CodecError

MAX_BITS = 8


@dataclass(frozen=True)
class Layout:
    """Where each code lives in the stream. All (n,) long, n = number of codes with width > 0."""

    widths: tuple[int, ...]  # all codes' widths, including zeros
    nbytes: int
    index: torch.Tensor  # which codes are stored (width > 0), ascending
    byte: torch.Tensor  # first byte of each stored code
    shift: torch.Tensor  # bit offset inside that byte, 0..7
    mask: torch.Tensor  # 2**width - 1
    spans: bool  # some code crosses a byte boundary (needs the second byte)
    next_byte: torch.Tensor  # byte + 1, clamped to the stream (a code in the last byte never spans)
    shift32: torch.Tensor  # shift and mask as int32 columns (k, 1), for the transposed unpack
    mask32: torch.Tensor

    def on(self, device: torch.device) -> "Layout":
        if self.byte.device == device:
            return self
        return _layout_on(self.widths, str(device))


def check_widths(widths: tuple[int, ...]) -> None:
    if any(b < 0 or b > MAX_BITS for b in widths):
        raise CodecError(f"bit packing: widths must be integers in [0, {MAX_BITS}], got {sorted(set(widths))}")


@functools.lru_cache(maxsize=512)
def _layout_on(widths: tuple[int, ...], device: str) -> Layout:
    check_widths(widths)
    offsets, o = [], 0
    for b in widths:
        offsets.append(o)
        o += b
    keep = [i for i, b in enumerate(widths) if b > 0]
    off = torch.tensor([offsets[i] for i in keep], dtype=torch.long)
    w = torch.tensor([widths[i] for i in keep], dtype=torch.long)
    spans = bool(((off % 8) + w > 8).any()) if keep else False
    dev = torch.device(device)
    nbytes = (o + 7) // 8
    byte, shift, mask = (off // 8).to(dev), (off % 8).to(dev), ((1 << w) - 1).to(dev)
    return Layout(widths, nbytes, torch.tensor(keep, dtype=torch.long, device=dev), byte, shift, mask, spans,
                  (byte + 1).clamp_max(max(nbytes - 1, 0)), shift.to(torch.int32)[:, None], mask.to(torch.int32)[:, None])


def layout(widths: tuple[int, ...], device: torch.device | str = "cpu") -> Layout:
    """Cached layout of a width tuple on a device."""
    return _layout_on(tuple(int(b) for b in widths), str(torch.device(device)))


def pack_fast(codes: torch.Tensor, lay: Layout) -> torch.Tensor:
    """codes (..., n) integers (already range-checked) -> uint8 (..., lay.nbytes)."""
    lay = lay.on(codes.device)
    lead = codes.shape[:-1]
    out = torch.zeros(*lead, lay.nbytes + 1, dtype=torch.int32, device=codes.device)  # +1: spill byte
    if lay.index.numel():
        v = codes.index_select(-1, lay.index).to(torch.int32) << lay.shift.to(torch.int32)  # (..., k) < 2**15
        out.index_add_(-1, lay.byte, v & 0xFF)
        out.index_add_(-1, lay.byte + 1, v >> 8)
    return out[..., : lay.nbytes].to(torch.uint8)


def unpack_fast(packed: torch.Tensor, lay: Layout, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """uint8 (..., lay.nbytes) -> codes (..., k) of the STORED codes only (width > 0), in `dtype`.
    Use `scatter_codes` to get all n codes (zeros for width 0)."""
    lay = lay.on(packed.device)
    if not lay.index.numel():
        return torch.zeros(*packed.shape[:-1], 0, dtype=dtype, device=packed.device)
    lo = packed.index_select(-1, lay.byte).to(torch.int32)  # (..., k)
    if lay.spans:
        # (a code in the last byte never spans, so its clamped "next byte" is masked off below)
        hi = packed.index_select(-1, lay.next_byte).to(torch.int32)
        lo = lo | (hi << 8)
    return ((lo >> lay.shift.to(torch.int32)) & lay.mask.to(torch.int32)).to(dtype)


@dataclass(frozen=True)
class TransposedPlan:
    """How `unpack_fast_t` reads a layout: codes inside one byte (uint8 ops) first, then codes that
    span two bytes (int16 ops). `order` (k,): which stored code each output row is."""

    order: torch.Tensor
    byte1: torch.Tensor  # (k1,) byte of each one-byte code
    shift1: torch.Tensor  # (k1, 1) uint8
    mask1: torch.Tensor  # (k1, 1) uint8
    byte2: torch.Tensor  # (k2,) first byte of each two-byte code
    next2: torch.Tensor  # (k2,) its second byte
    shift2: torch.Tensor  # (k2, 1) int16
    mask2: torch.Tensor  # (k2, 1) int16


@functools.lru_cache(maxsize=512)
def _plan_on(widths: tuple[int, ...], device: str) -> TransposedPlan:
    lay = _layout_on(widths, device)
    w = torch.tensor([widths[i] for i in lay.index.tolist()], dtype=torch.long, device=lay.byte.device)
    two = lay.shift + w > 8
    one_idx, two_idx = torch.nonzero(~two).flatten(), torch.nonzero(two).flatten()
    col = lambda t, dt: t.to(dt)[:, None]  # noqa: E731
    return TransposedPlan(
        torch.cat([one_idx, two_idx]), lay.byte[one_idx], col(lay.shift[one_idx], torch.uint8), col(lay.mask[one_idx], torch.uint8),
        lay.byte[two_idx], lay.byte[two_idx] + 1, col(lay.shift[two_idx], torch.int16), col(lay.mask[two_idx], torch.int16),
    )


def transposed_plan(lay: Layout) -> TransposedPlan:
    return _plan_on(lay.widths, str(lay.byte.device))


def unpack_fast_t(packed: torch.Tensor, lay: Layout, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stored codes TRANSPOSED and reordered: uint8 (..., P, nbytes) -> (..., k, P) in `dtype`, row r
    holding stored code `transposed_plan(lay).order[r]` (the caller permutes its weights to match).
    Why: whole rows of the transposed bytes gather as one memcpy per code (gathering along the
    last axis is element by element), codes inside one byte unpack with uint8 shifts and masks,
    only the codes that cross a byte boundary need 16-bit ops; (k, P) is what attention's matmuls
    want. Several times faster than `unpack_fast` (benchmarks/profile_layer.py)."""
    lay = lay.on(packed.device)
    plan = transposed_plan(lay)
    out = torch.empty(*packed.shape[:-2], len(plan.order), packed.shape[-2], dtype=dtype, device=packed.device)
    if not len(plan.order):
        return out
    pt = packed.transpose(-1, -2).contiguous()  # (..., nbytes, P)
    k1 = plan.byte1.numel()
    if k1:
        out[..., :k1, :] = (pt.index_select(-2, plan.byte1) >> plan.shift1) & plan.mask1
    if plan.byte2.numel():
        lo = pt.index_select(-2, plan.byte2).to(torch.int16)
        hi = pt.index_select(-2, plan.next2).to(torch.int16)
        # hi << 8 may wrap negative in int16; the sign bits land above the mask and are cleared
        out[..., k1:, :] = ((lo | (hi << 8)) >> plan.shift2) & plan.mask2
    return out


def scatter_codes(stored: torch.Tensor, lay: Layout) -> torch.Tensor:
    """(..., k) stored codes -> (..., n) with zeros at width-0 positions."""
    out = torch.zeros(*stored.shape[:-1], len(lay.widths), dtype=stored.dtype, device=stored.device)
    return out.index_copy_(-1, lay.index.to(stored.device), stored)


# -- the reference (bit-by-bit) implementation of the same layout ----------------------------------


@functools.lru_cache(maxsize=256)
def _bit_layout(widths: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """For each bit of the stream: which code it belongs to and its shift. (B,), (B,)."""
    coef = [i for i, b in enumerate(widths) for _ in range(b)]
    shift = [s for b in widths for s in range(b)]
    return torch.tensor(coef, dtype=torch.long), torch.tensor(shift, dtype=torch.long)


def pack_reference(codes: torch.Tensor, widths: tuple[int, ...]) -> torch.Tensor:
    """Bit-by-bit packing: codes (..., n) -> uint8 (..., ceil(sum(widths) / 8))."""
    coef, shift = (t.to(codes.device) for t in _bit_layout(widths))
    c = codes.long()
    total = coef.numel()
    nbytes = (total + 7) // 8
    bits = (c[..., coef] >> shift) & 1  # (..., B)
    pad = nbytes * 8 - total
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    bits = bits.reshape(*c.shape[:-1], nbytes, 8)
    weights = 1 << torch.arange(8, device=codes.device)
    return (bits * weights).sum(-1).to(torch.uint8)


def unpack_reference(packed: torch.Tensor, widths: tuple[int, ...]) -> torch.Tensor:
    """Bit-by-bit unpacking: uint8 (..., nbytes) -> long (..., n)."""
    coef, shift = (t.to(packed.device) for t in _bit_layout(widths))
    bits = (packed.long().unsqueeze(-1) >> torch.arange(8, device=packed.device)) & 1  # (..., nbytes, 8)
    bits = bits.flatten(-2)[..., : coef.numel()]  # (..., B)
    out = torch.zeros(*packed.shape[:-1], len(widths), dtype=torch.long, device=packed.device)
    return out.index_add_(-1, coef, bits << shift)
