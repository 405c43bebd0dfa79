"""Codec throughput on a tensor shaped like a full SmolLM2-135M V cache at 1024 tokens.

    .venv/bin/python benchmarks/codec_throughput.py [--repeats 5] [--threads N] [--json PATH]

Times, on one float32 tensor (30 layers, 3 KV heads, 1024 tokens, 64) = 23.6 MB, all in one run:
  memcpy                 dst.copy_(src) into a preallocated tensor (the floor for touching the data)
  pca k=16               compress + decompress
  spline-pca k=16        compress + decompress (warp, PCA, PCA^T, inverse warp)
  spline g+g^-1 (vec)    the vectorised warp and its inverse alone (kvsplice.codecs.spline)
  spline g+g^-1 (loop)   the same warp written as the seed wrote it: one searchsorted per dimension
Throughput is input bytes / median wall time. Ratios: time relative to memcpy, and loop / vectorised.
Codecs are fitted on 20 000 synthetic V-like vectors (fit time printed, not part of the table).
Not a test: numbers depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch

from kvsplice.codecs import get_codec
from kvsplice.codecs.spline import unwarp, unwarp_loop, warp, warp_loop
from kvsplice.synthetic import make_synthetic

SHAPE = (30, 3, 1024, 64)  # (layers, KV heads, tokens, head_dim)


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    n = SHAPE[0] * SHAPE[1] * SHAPE[2]
    train, test = make_synthetic(n_train=20_000, n_test=n, seed=0)
    v = test.reshape(SHAPE).contiguous()  # (L, H, T, D)
    nbytes = v.numel() * v.element_size()
    t0 = time.perf_counter()
    pca = get_codec("pca", k=16).fit(train)
    t1 = time.perf_counter()
    spl = get_codec("spline-pca", k=16).fit(train)
    t2 = time.perf_counter()
    print(f"fit on {tuple(train.shape)}: pca {t1 - t0:.2f} s, spline-pca {t2 - t1:.2f} s (warp: {spl.info['warp']})")
    w = spl.warp
    flat = v.reshape(-1, SHAPE[-1])
    dst = torch.empty_like(v)

    with torch.no_grad():
        rows = {
            "memcpy": timed(lambda: dst.copy_(v), args.repeats),
            "pca k=16 compress+decompress": timed(lambda: pca.decompress(pca.compress(v)), args.repeats),
            "spline-pca k=16 compress+decompress": timed(lambda: spl.decompress(spl.compress(v)), args.repeats),
            "spline g+g^-1 vectorised": timed(lambda: unwarp(warp(flat, w.xk, w.yk, w.slopes), w.xk, w.yk, w.slopes), args.repeats),
            "spline g+g^-1 per-dim loop (seed)": timed(
                lambda: unwarp_loop(warp_loop(flat, w.xk, w.yk, w.slopes), w.xk, w.yk, w.slopes), args.repeats
            ),
        }
        same = torch.allclose(unwarp(warp(flat, w.xk, w.yk, w.slopes), w.xk, w.yk, w.slopes), flat, rtol=1e-4, atol=1e-3)
    mem = rows["memcpy"]
    machine = (f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} CPUs, torch {torch.__version__}, "
               f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}")
    print(f"tensor {SHAPE} float32 = {nbytes / 1e6:.1f} MB; {machine}; median of {args.repeats}")
    print(f"{'operation':<38} {'ms':>9} {'GB/s':>8} {'x memcpy time':>14}")
    for name, sec in rows.items():
        print(f"{name:<38} {sec * 1e3:>9.1f} {nbytes / sec / 1e9:>8.3f} {sec / mem:>14.1f}")
    speedup = rows["spline g+g^-1 per-dim loop (seed)"] / rows["spline g+g^-1 vectorised"]
    print(f"vectorised spline vs per-dimension loop: {speedup:.2f}x faster (round trip exact: {same})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": {"shape": SHAPE, "dtype": "float32", "k": 16, "repeats": args.repeats,
                                  "threads": torch.get_num_threads(), "machine": machine},
                       "seconds": rows, "bytes": nbytes, "vectorised_vs_loop": speedup}, f, indent=2)


if __name__ == "__main__":
    main()
