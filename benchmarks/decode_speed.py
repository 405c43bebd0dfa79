"""Decode speed: tokens per second of greedy `generate()` for DynamicCache and each compressed cache,
at contexts 512 / 1024 / 2048, measured in the same run and printed as ratios to DynamicCache.

    .venv/bin/python benchmarks/decode_speed.py [--model smollm2-135m] [--new-tokens 16]
        [--contexts 512 1024 2048] [--new-tokens 8] [--threads N] [--json results/decode_speed.json]

Timing: a LogitsProcessor stamps the clock at every generation step; decode tokens/s =
(new_tokens - 1) / (last stamp - first stamp), so the prefill forward (identical work for every
cache, and dominant on CPU) is excluded. Each cache is measured once per context after one
untimed warm-up generate at the smallest context. Ratios < 1 mean slower than DynamicCache.
Default run: 8 new tokens per context (far fewer than a serving benchmark would use: the run is
dominated by 10 caches x 3 prefills and must stay near 10 min on a 2-core CPU; with 16 new tokens it
took 21 min on a machine shared with other jobs). Ratios from so few steps are noisy (+-30 % seen
between neighbouring contexts); they are CPU numbers of a Python cache that decodes every stored
row at every step, not kernel numbers.

Caches: ours (pca-q / spline-pca-q joint over KV heads on K and V, calibrated here on a small
sample), per-token int4, KIVI 2-bit, transformers QuantizedCache (quanto 2-bit, when installed),
H2O and StreamingLLM at 20 % of the context, the seed's V-only pruning (0.382).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch


class _Stamps:
    """LogitsProcessor that records the wall time of every generation step."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.t.append(time.perf_counter())
        return scores


def decode_tokens_per_s(model, ids: torch.Tensor, make_cache, new_tokens: int, prunes: bool) -> float:
    from transformers import LogitsProcessorList

    from kvsplice.attention import prepare_model

    stamps = _Stamps()
    switch = prepare_model(model) if prunes else None
    try:
        with torch.no_grad():
            model.generate(ids, cache=make_cache(), max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           logits_processor=LogitsProcessorList([stamps]), pad_token_id=0)
    finally:
        if switch is not None:
            switch.restore()
    return (len(stamps.t) - 1) / (stamps.t[-1] - stamps.t[0])


def build_caches(model, tokenizer, context: int, quick_calibration: dict) -> dict[str, tuple]:
    """name -> (factory, prunes). Eviction budgets are 20 % of the context."""
    from transformers import DynamicCache

    from kvsplice.cache import CompressedCache, model_layout
    from kvsplice.evaluate.frontier import FrontierConfig
    from kvsplice.evaluate.frontier import _Calibration, _codec_factory
    from kvsplice.peers import get_peer
    from kvsplice.pruning import VOnlyPruner

    layers = model_layout(model)[0]
    cal = quick_calibration.setdefault("cal", _Calibration(FrontierConfig(calibration=quick_calibration["cfg"]), model,
                                                            tokenizer, lambda m: print(m, file=sys.stderr), False))
    caches = {"DynamicCache": (DynamicCache, False)}
    for codec, bits in (("pca-q", 4.0), ("pca-q", 2.0), ("spline-pca-q", 2.0)):
        s = {"codec": codec, "target": "kv", "joint_heads": True, "bits": bits}
        caches[f"{codec} {bits:g}-bit K+V joint"] = (_codec_factory(model, s, cal), False)
    caches["uniform int4 K+V"] = (get_peer("uniform-int", bits=4).cache_factory(model), False)
    caches["kivi 2-bit g32 R32"] = (get_peer("kivi", bits=2).cache_factory(model), False)
    try:
        caches["hf quanto 2-bit"] = (get_peer("hf-quantized", backend="quanto", bits=2, residual=32).cache_factory(model), False)
    except Exception as e:  # backend missing
        print(f"skipping transformers QuantizedCache: {type(e).__name__}: {e}", file=sys.stderr)
    keep = max(1, context // 5)
    caches["h2o 20%"] = (get_peer("h2o", keep_ratio=0.2, recent=keep // 2).cache_factory(model), True)
    caches["streamingllm 20%"] = (get_peer("streamingllm", sinks=4, window=keep - 4).cache_factory(model), True)
    caches["seed V-only pruning 0.382"] = (lambda: CompressedCache(layers, pruner=VOnlyPruner()), True)
    return caches


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--new-tokens", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default="results/decode_speed.json")
    args = ap.parse_args(argv)
    if args.new_tokens < 2 or any(c < 8 for c in args.contexts):
        ap.error("--new-tokens must be >= 2 and contexts >= 8")
    if args.threads:
        torch.set_num_threads(args.threads)
    from kvsplice.data import evaluation_text, tokenize
    from kvsplice.loading import load_model, model_id

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    ids_all = tokenize(tokenizer, evaluation_text())
    calib = {"cfg": {"samples": 6000, "max_batches": 2, "seq_len": 1024, "epochs": 2}}
    table: dict[str, dict[str, float]] = {}
    for ctx in args.contexts:
        ids = ids_all[:ctx][None]
        caches = build_caches(model, tokenizer, ctx, calib)
        if not table:  # warm-up (allocator, lazy imports, quanto extension)
            for make, prunes in caches.values():
                decode_tokens_per_s(model, ids[:, :64], make, 2, prunes)
        for name, (make, prunes) in caches.items():
            tps = decode_tokens_per_s(model, ids, make, args.new_tokens, prunes)
            table.setdefault(name, {})[str(ctx)] = tps
            print(f"context {ctx}: {name}: {tps:.2f} tokens/s", file=sys.stderr, flush=True)
    ratios = {n: {c: v / table["DynamicCache"][c] for c, v in row.items()} for n, row in table.items()}
    head = f"{'cache':34s}" + "".join(f"{'ctx ' + str(c):>12s}" for c in args.contexts)
    print(f"decode tokens/s relative to DynamicCache ({model_id(model)}, {args.new_tokens} new tokens, "
          f"{torch.get_num_threads()} threads; DynamicCache absolute: "
          + ", ".join(f"{table['DynamicCache'][str(c)]:.1f} tok/s @ {c}" for c in args.contexts) + ")")
    print(head)
    for n, row in ratios.items():
        print(f"{n:34s}" + "".join(f"{row[str(c)]:12.2f}" for c in args.contexts))
    out = {"model": model_id(model), "tokens_per_s": table, "ratio_to_dynamic": ratios,
           "config": {"contexts": args.contexts, "new_tokens": args.new_tokens, "threads": torch.get_num_threads(),
                      "calibration": calib["cfg"], "timing": "decode steps only (prefill excluded)"},
           "seconds": round(time.perf_counter() - t0, 1)}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, path)
    print(f"JSON -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
