"""Where one decode step's time goes (issue 12): SmolLM2, one context / batch, one thread count;
DynamicCache beside the pca-q 4-bit caches of decode_speed.py, median step (ms) over reps, plus a
cProfile of one coded step summarised by component (linear layers, coded attention and its C calls,
cache update and its encode).

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/profile_step.py [--context 2048] [--batch 1]
        [--threads 1] [--reps 7] [--json docs/results/profile_step.json]

Before the C kernels the same components were read from torch's profiler (docs/RESULTS.md §6).
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import decode_speed as ds  # noqa: E402

COMPONENTS = {  # cProfile function (file suffix, name) -> component
    "linear (weights)": ("torch/nn/modules/linear.py", "forward"),
    "coded attention": ("kvsplice/coded_attention.py", "coded_attention_forward"),
    "  C: step scores": ("kvsplice/native/__init__.py", "step_scores"),
    "  C: step values": ("kvsplice/native/__init__.py", "step_values"),
    "cache update": ("kvsplice/cache.py", "update"),
    "  encode": ("kvsplice/codecs/transform.py", "encode"),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    from kvsplice.coded_attention import coded_attention
    from kvsplice.loading import load_model

    torch.set_num_threads(args.threads)
    model, tok = load_model("smollm2-135m")
    codecs, scale = ds.fit_codecs(model, tok, [4.0])
    makers = {n: m for n, m in ds.cache_makers(model, codecs, quick=True).items() if n == "DynamicCache" or "coded" in n}
    caches = {}
    for n, (make, _) in makers.items():
        caches[n] = make()
        ds.fill(model, caches[n], args.context, args.batch, scale)
    tokens = torch.full((args.batch, 1), 42)

    def step(n: str, i: int) -> float:
        switch = coded_attention(model, caches[n]) if makers[n][1] else None
        plain = ds._without_native() if "(torch ops)" in n else contextlib.nullcontext()
        try:
            with plain:
                t0 = time.perf_counter()
                model(tokens, past_key_values=caches[n], position_ids=torch.full((args.batch, 1), args.context + i), use_cache=True)
                return time.perf_counter() - t0
        finally:
            if switch is not None:
                switch.restore()

    times: dict[str, list[float]] = {n: [] for n in makers}
    with torch.no_grad():
        for i in range(args.reps + 1):  # interleaved; the first round is a warm-up
            for n in makers:
                t = step(n, i)
                if i:
                    times[n].append(t * 1e3)
        coded = next(n for n in makers if n.startswith("pca-q 4-bit sink=1 coded, K after RoPE") and "torch" not in n)
        prof = cProfile.Profile()
        prof.enable()
        step(coded, args.reps + 1)
        prof.disable()
    stats = pstats.Stats(prof).stats  # {(file, line, name): (cc, nc, tt, ct, callers)}
    parts = {}
    for label, (suffix, name) in COMPONENTS.items():
        parts[label] = round(sum(v[3] for (f, _, fn), v in stats.items() if f.endswith(suffix) and fn == name) * 1e3, 2)
    result = {"model": "smollm2-135m", "context": args.context, "batch": args.batch, "threads": args.threads,
              "native_kernels": ds.native_status(),
              "step_ms": {n: {"median": round(statistics.median(t), 2), "min": round(min(t), 2), "max": round(max(t), 2)} for n, t in times.items()},
              "coded_step_components_ms (cProfile, one step, cumulative)": parts}
    print(json.dumps(result, indent=1))
    if args.json:
        from kvsplice.paths import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
