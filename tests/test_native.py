"""The native C kernels (kvsplice/native) equal the pure-torch reference (packing.unpack_fast_t + matmul)
on random bit layouts: widths 0..8 with codes spanning bytes, partial row blocks, batches, views into a
wider payload (the H' slot axis), 1..13 query rows (past one register block), 1 and 2 threads."""

from __future__ import annotations

import shutil

import pytest
import torch

from kvsplice import native
from kvsplice.codecs.packing import layout, pack_fast, transposed_plan, unpack_fast_t

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None, reason="no C compiler on this machine")


@needs_cc
def test_kernels_build_and_load_where_a_compiler_exists():
    assert native.available(), "a C compiler is present but the kernels did not build (see the warning)"


def _payload(widths, B, P, slots=1, seed=0):
    """(packed codes (B, slots, P, nbytes) uint8 of random codes, their layout)."""
    g = torch.Generator().manual_seed(seed)
    lay = layout(tuple(widths))
    hi = torch.tensor([1 << w for w in widths])
    codes = (torch.rand(B, slots, P, len(widths), generator=g) * hi).long()
    return pack_fast(codes, lay), lay


WIDTHS = [
    [8, 7, 6, 5, 4, 3, 2, 1, 0, 3, 5, 7, 1, 1, 2, 0, 6, 4],  # spans byte boundaries everywhere
    [4] * 24,  # byte aligned
    [2, 2, 1, 0, 0, 8, 8, 3],
]


@needs_cc
@pytest.mark.parametrize("widths", WIDTHS)
@pytest.mark.parametrize("B,P", [(1, 1), (1, 8), (2, 37), (3, 129)])
@pytest.mark.parametrize("threads", [1, 2])
def test_kernels_equal_the_torch_reference(widths, B, P, threads):
    packed, lay = _payload(widths, B, P, slots=2)
    order = transposed_plan(lay).order
    co = native.code_order(lay, order)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for slot in range(2):  # a strided view of the payload, as the cache hands it over
            view = packed[:, slot]
            ref = unpack_fast_t(view, lay).transpose(-1, -2)  # (B, P, k) in plan order
            assert torch.equal(native.unpack(view, co), ref)
            for R in (1, 9, 13):
                g = torch.Generator().manual_seed(R)
                qa, p = torch.randn(B, R, co.k + 2, generator=g), torch.rand(B, R, P, generator=g)
                for gain in (None, torch.rand(B, P, generator=g).half()):  # fp16 as the payload stores it
                    gf = torch.ones(B, P) if gain is None else gain.float()
                    s = (qa[..., : co.k] @ ref.transpose(1, 2) + qa[..., co.k : co.k + 1]) * gf[:, None] + qa[..., co.k + 1 :]
                    torch.testing.assert_close(native.scores(view, co, qa, gain), s, rtol=1e-5, atol=1e-4)
                    w = p * gf[:, None]
                    o = torch.cat([w @ ref, w.sum(-1, keepdim=True), p.sum(-1, keepdim=True)], dim=-1)
                    torch.testing.assert_close(native.weighted(view, co, p, gain), o, rtol=1e-5, atol=1e-4)
    finally:
        torch.set_num_threads(before)


@needs_cc
def test_last_rows_of_the_tensor_are_read_without_overrun():
    """The vector unpack reads 4 bytes per code; the rows at the end of the codes tensor must take the
    exact path (checked on a tensor whose storage ends right after its last row)."""
    packed, lay = _payload([8, 8, 8], 1, 64)
    exact = packed[0, 0].clone()[None]  # (1, 64, 3): storage ends at the last row's last byte
    co = native.code_order(lay, transposed_plan(lay).order)
    assert torch.equal(native.unpack(exact, co), unpack_fast_t(exact, lay).transpose(-1, -2))


@needs_cc
def test_bad_inputs_are_refused_with_the_shapes_named():
    packed, lay = _payload([4] * 8, 2, 5)
    co = native.code_order(lay, transposed_plan(lay).order)
    with pytest.raises(ValueError, match="uint8"):
        native.scores(packed[:, 0].float(), co, torch.zeros(2, 1, co.k + 2))
    with pytest.raises(ValueError, match=r"qa must be \(B=2, R, k\+2=10\)"):
        native.scores(packed[:, 0], co, torch.zeros(2, 1, 8))
    with pytest.raises(ValueError, match=r"p must be \(B=2, R, P=5\)"):
        native.weighted(packed[:, 0], co, torch.zeros(2, 1, 4))
    with pytest.raises(ValueError, match=r"gains must be \(B=2, P=5\)"):
        native.weighted(packed[:, 0], co, torch.zeros(2, 1, 5), torch.ones(2, 4))


def test_switched_off_by_the_environment(monkeypatch):
    monkeypatch.setenv("KVSPLICE_NATIVE", "0")
    native.available.cache_clear()
    try:
        assert native.available() is False
    finally:
        native.available.cache_clear()


@needs_cc
@pytest.mark.parametrize("bits,scale", [(4.0, "gain"), (2.0, "gain"), (3.0, "static"), (1.0, "gain")])
def test_encode_through_the_c_kernel_gives_the_same_bytes(bits, scale, monkeypatch):
    """TransformQ.encode's C quantise-and-pack equals midrise_codes + pack_fast byte for byte, on rows
    with coefficients far outside the clip ranges (both saturation ends)."""
    from kvsplice.codecs import get_codec

    g = torch.Generator().manual_seed(int(bits * 10))
    spectrum = torch.logspace(0, -2, 48)
    codec = get_codec("pca-q", bits=bits, scale=scale).fit(torch.randn(2000, 48, generator=g) * spectrum.sqrt())
    x = torch.randn(3, 57, 48, generator=g) * spectrum.sqrt() * torch.tensor([1.0, 4.0, 50.0])[:, None, None]
    assert native.available()
    fast = codec.encode(x)
    monkeypatch.setattr(native, "available", lambda: False)
    slow = codec.encode(x)
    assert fast.keys() == slow.keys()
    for name in fast:
        assert torch.equal(fast[name], slow[name]), name


@needs_cc
def test_empty_payload_and_two_threads_do_not_crash():
    """A sliding layer can hold 0 payload rows (every row raw): P = 0 with 2 threads used to divide by 0."""
    packed, lay = _payload([4] * 8, 1, 1)
    co = native.code_order(lay, transposed_plan(lay).order)
    empty = packed[:, 0, :0]  # (1, 0, 4)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert torch.equal(native.weighted(empty, co, torch.zeros(1, 3, 0)), torch.zeros(1, 3, co.k + 2))
        assert native.scores(empty, co, torch.zeros(1, 3, co.k + 2)).shape == (1, 3, 0)
        assert native.unpack(empty, co).shape == (1, 0, co.k)
    finally:
        torch.set_num_threads(before)


@needs_cc
def test_strided_bytes_and_foreign_devices():
    """Bytes of a row at a stride (or stride 0) are copied before the kernel reads them; non-CPU
    operands are refused, never read as pointers."""
    packed, lay = _payload([4] * 8, 2, 3)
    co = native.code_order(lay, transposed_plan(lay).order)
    wide = torch.stack([packed[:, 0], torch.zeros_like(packed[:, 0])], dim=-1).flatten(-2)  # (2, 3, 8): bytes at stride 2
    view = wide[..., ::2]
    assert view.stride(-1) == 2
    assert torch.equal(native.unpack(view, co), unpack_fast_t(view.contiguous(), lay).transpose(-1, -2))
    qa = torch.randn(2, 1, co.k + 2)
    with pytest.raises(ValueError, match="qa must be a CPU tensor"):
        native.scores(view, co, qa.to("meta"))
    with pytest.raises(ValueError, match="gain must be a CPU tensor"):
        native.scores(view, co, qa, torch.ones(2, 3, device="meta"))
