"""The per-code packer (kvsplice/codecs/packing.py) writes the same bytes as the bit-by-bit reference."""

from __future__ import annotations

import pytest
import torch

from kvsplice.codecs.packing import layout, pack_fast, pack_reference, unpack_fast, transposed_plan, unpack_fast_t, unpack_reference
from kvsplice.codecs.quant import pack_codes, packed_nbytes, unpack_codes


def _random_case(seed: int):
    g = torch.Generator().manual_seed(seed)
    n = int(torch.randint(1, 70, (1,), generator=g))
    widths = tuple(int(b) for b in torch.randint(0, 9, (n,), generator=g))
    if seed % 3 == 0:  # water-filled shape: many zeros, a few wide codes
        widths = tuple(b if b > 4 else 0 for b in widths)
    hi = torch.tensor([1 << b for b in widths])
    codes = (torch.rand(5, 3, n, generator=g) * hi).long()  # code i in [0, 2**w_i)
    return widths, codes


@pytest.mark.parametrize("seed", range(40))
def test_fast_packing_is_byte_identical_to_reference(seed):
    widths, codes = _random_case(seed)
    ref = pack_reference(codes, widths)
    lay = layout(widths)
    fast = pack_fast(codes, lay)
    assert fast.dtype == torch.uint8 and fast.shape[-1] == packed_nbytes(list(widths))
    assert torch.equal(fast, ref)
    assert torch.equal(unpack_reference(ref, widths), codes)
    stored = unpack_fast(ref, lay)
    assert torch.equal(stored, codes[..., lay.index])
    order = transposed_plan(lay).order
    assert sorted(order.tolist()) == list(range(len(lay.index)))
    assert torch.equal(unpack_fast_t(ref, lay, torch.long), stored[..., order].transpose(-1, -2))
    assert torch.equal(unpack_codes(ref, list(widths)), codes)  # public API, zeros at width 0
    assert torch.equal(pack_codes(codes, list(widths)), ref)


@pytest.mark.parametrize("bits", range(1, 9))
def test_uniform_widths_round_trip(bits):
    codes = torch.randint(0, 1 << bits, (4, 64))
    packed = pack_codes(codes, bits)
    assert torch.equal(packed, pack_reference(codes, (bits,) * 64))
    assert torch.equal(unpack_codes(packed, bits, 64), codes)


def test_unpack_fast_other_dtype_and_empty():
    lay = layout((0, 0, 0))
    assert lay.nbytes == 0 and unpack_fast(torch.zeros(2, 0, dtype=torch.uint8), lay).shape == (2, 0)
    lay = layout((3, 5, 8))
    codes = torch.tensor([[7, 31, 255], [1, 0, 128]])
    assert torch.equal(unpack_fast(pack_fast(codes, lay), lay, torch.float32), codes.float())
