"""Bits per K/V value of the windowed peers (KIVI, transformers' QuantizedCache) against the context
length: the full-precision residual's share shrinks as the context grows (docs/PEERS.md).

Bytes do not depend on the values, only on the layout and the token count, so one layer of the
SmolLM2-135M layout (3 KV heads, head_dim 64; batch 1) is fed random K/V: a prefill of `prefill`
tokens, then chunks of `chunk` tokens (the frontier protocol's decode) up to each length; bits per
value = 8 * bytes held / (2 * tokens * heads * head_dim), exactly what the frontier reports.

    .venv/bin/python benchmarks/peer_residual_bytes.py --json docs/results/peers-residual-bytes.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

H, D = 3, 64  # SmolLM2-135M: KV heads, head_dim
LENGTHS = (128, 300, 512, 640, 700, 1024, 2048, 4096, 8192)


def kivi_bits(bits: int, length: int, dtype: torch.dtype, prefill: int, chunk: int) -> list[float]:
    from kvsplice.peers.kivi import KIVILayer

    layer = KIVILayer(bits=bits, group=32, residual=128, v_group=32)
    return _run(layer, length, dtype, prefill, chunk, lambda: sum(layer.memory()[k] for k in ("k_bytes", "v_bytes", "window_bytes")))


def quanto_bits(bits: int, length: int, dtype: torch.dtype, prefill: int, chunk: int) -> list[float]:
    from transformers.cache_utils import QuantoQuantizedLayer

    from kvsplice.peers.hf_quantized import held_nbytes

    layer = QuantoQuantizedLayer(nbits=bits)  # library defaults: group 64, residual 128, axes 0
    return _run(layer, length, dtype, prefill, chunk, lambda: held_nbytes(
        [layer._quantized_keys, layer._quantized_values, layer.keys, layer.values]))


def _run(layer, length: int, dtype: torch.dtype, prefill: int, chunk: int, nbytes) -> list[float]:
    """Bits per value after the prefill and after every chunk, up to `length` tokens."""
    g = torch.Generator().manual_seed(0)
    kv = torch.randn(2, 1, H, length, D, generator=g).to(dtype)  # (K|V, B, H, T, D)
    p = min(prefill, length)
    layer.update(kv[0, :, :, :p], kv[1, :, :, :p])
    out = [8 * nbytes() / (2 * p * H * D)]
    for j in range(p, length, chunk):
        e = min(j + chunk, length)
        layer.update(kv[0, :, :, j:e], kv[1, :, :, j:e])
        out.append(8 * nbytes() / (2 * e * H * D))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--chunk", type=int, default=16)
    ap.add_argument("--json", default=None, help="write the table here (atomic)")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for dname, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        for name, fn, b in (("kivi", kivi_bits, 2), ("kivi", kivi_bits, 4), ("hf-quanto", quanto_bits, 2), ("hf-quanto", quanto_bits, 4)):
            bits = {L: round(fn(b, L, dtype, a.prefill, a.chunk)[-1], 3) for L in LENGTHS}
            # the frontier protocol: prefill 512, then 8 chunks of 16; the bytes it reports are the last
            # entry (640 tokens); the mean over the 8 chunks is what the scored tokens actually read
            trace = fn(b, 640, dtype, 512, 16)[1:]
            cont = round(sum(trace) / len(trace), 3)
            rows.append({"peer": name, "bits": b, "dtype": dname, "bits_per_value": bits,
                         "frontier_continuation_mean": cont, "frontier_end": round(trace[-1], 3)})
            print(f"{name:10s} {b}-bit {dname:9s} " + " ".join(f"{L}:{v:.2f}" for L, v in bits.items())
                  + f" | frontier end {trace[-1]:.2f}, mean over the continuation {cont:.2f}")
    res = {"layout": {"kv_heads": H, "head_dim": D, "batch": 1}, "prefill": a.prefill, "chunk": a.chunk,
           "lengths": list(LENGTHS), "rows": rows,
           "note": "bits per K/V value held (codes + scales/zeros + full-precision residual in the model dtype)"}
    if a.json:
        d = os.path.dirname(os.path.abspath(a.json))
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
