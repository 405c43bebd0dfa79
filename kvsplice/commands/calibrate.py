"""`kvsplice calibrate`: collect V (or K) from a model over calibration text, fit a codec per
(layer, KV head), write a geometry file."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kvsplice.errors import KVSpliceError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate",
        help="fit a geometry (one codec per layer and KV head) on a model's V or K vectors",
        description=__doc__,
    )
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local HF folder, or a hub id")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="UTF-8 text files (or hf:DATASET[:CONFIG][@SPLIT]); default: the calibration split of pydoc_data.topics")
    p.add_argument("--codec", default="spline-pca", help="codec registry name (default spline-pca)")
    p.add_argument("--rank", type=int, default=16, help="latent dimensions k per vector (default 16)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra codec constructor parameter, VALUE parsed as JSON (e.g. --param bits=4 for pca-q); repeatable")
    p.add_argument("--knots", type=int, default=7)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--samples", type=int, default=120000, help="head-vectors kept per layer by reservoir sampling")
    p.add_argument("--fit-samples-per-dim", type=int, default=2000,
                   help="fit each codec on at most this * rank vectors (0: all kept vectors)")
    p.add_argument("--max-batches", type=int, default=None, help="stop after this many forward batches")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward batch")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per window")
    p.add_argument("--target", choices=["v", "k"], default="v")
    p.add_argument("--joint-heads", action="store_true", help="one codec per layer over all KV heads concatenated")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="only these layers (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True, help="geometry file to write (.safetensors)")
    p.add_argument("--dump-vectors", metavar="PATH", default=None,
                   help="also write the collected vectors (safetensors, '{target}.{layer}.{head}' -> (N, head_dim))")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def parse_params(items: list[str]) -> dict:
    """["bits=4", "scale=\"gain\""] -> {"bits": 4, "scale": "gain"} (values JSON, else plain strings)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KVSpliceError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from kvsplice import data
    from kvsplice.calibrate import CalibrationConfig, run_calibration
    from kvsplice.geometry import save_geometry
    from kvsplice.loading import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    cfg = CalibrationConfig(
        codec=args.codec, rank=args.rank, knots=args.knots, epochs=args.epochs, samples=args.samples,
        fit_samples_per_dim=args.fit_samples_per_dim or None, max_batches=args.max_batches,
        seq_len=args.seq_len, batch_size=args.batch_size, target=args.target,
        joint_heads=args.joint_heads, seed=args.seed, layers=tuple(args.layers) if args.layers else None,
        codec_params=parse_params(args.param),
    )
    cfg.codec_kwargs()  # unknown codec -> error before loading anything
    if args.data:
        text, description = data.load_texts(args.data), "files: " + ", ".join(args.data)
    else:
        text, description = data.calibration_text(), data.describe_default("calibration")

    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    res = run_calibration(model, tokenizer, text, cfg, description=description,
                          dump_vectors=args.dump_vectors, progress=not args.quiet)
    geometry = res.geometry
    save_geometry(args.out, geometry)
    m = geometry.meta
    slowest = max(res.fit_seconds.values())
    print(
        f"{m['model']}: {m['target'].upper()} of {len(geometry.layers)} layer(s) x "
        f"{'1 joint codec' if cfg.joint_heads else m['num_kv_heads'] + ' heads'}; "
        f"{m['tokens']} tokens in {m['windows']} window(s), {m['vectors_per_head']} vectors kept per head; "
        f"collect {res.collect_seconds:.1f} s; fit {cfg.codec} k={cfg.rank} on {m['fit_vectors_per_codec']} "
        f"vectors/codec: {res.total_fit_seconds:.1f} s for {len(res.fit_seconds)} codecs (slowest {slowest:.2f} s) "
        f"-> {args.out}"
    )
    if args.dump_vectors:
        print(f"vectors -> {args.dump_vectors}")
    return 0
