"""`kvsplice calibrate`: collect K and/or V from a model over calibration text, fit a codec per
layer (joint over KV heads) or per (layer, KV head), write a recipe folder or a geometry file.

Defaults = the best measured recipe (--preset best): pca-q at 4 bits, one codec per layer joint
over the KV heads, K and V, 1 exact sink token -> --out is a recipe folder (k.safetensors,
v.safetensors, recipe.json) that `eval` / `generate --recipe` and `kvsplice.Recipe.load` read.
The seed's Spline->PCA (V only, rank 16, per head) is `--preset seed` -> --out is one geometry
file, as is any single --target. Explicit flags override the preset."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from kvsplice.commands.common import add_device_args, load_model_for
from kvsplice.errors import KVSpliceError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate",
        help="fit a geometry (one codec per layer and KV head) on a model's V or K vectors",
        description=__doc__,
    )
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local HF folder, or a hub id")
    p.add_argument("--data", nargs="+", metavar="PATH",
                   help="UTF-8 text files (or hf:DATASET[:CONFIG][@SPLIT]); default: --corpus")
    p.add_argument("--corpus", choices=["mix", "docs"], default="mix",
                   help="calibration text when no --data: mix (default) = the calibration parts of docs, code and prose "
                        "interleaved (kvsplice/texts.py; prose needs `make texts`); docs = pydoc_data.topics only")
    p.add_argument("--preset", choices=["best", "fast", "low-bit", "low-bit-alloc", "seed"], default="best",
                   help="best (default): pca-q 4-bit, joint heads, K+V, sink 1; fast: best with K coded after RoPE "
                        "(decode reads K and V from their codes: faster, some quality lost); low-bit: xpred-pca-q 2-bit "
                        "(cross-layer prediction), K+V, sink 1; seed: spline-pca rank 16, per head, V only")
    p.add_argument("--k-rope", choices=["pre", "post"], default=None,
                   help="code K before RoPE (pre: the quality default) or after it (post: the fast decode path); "
                        "default: the preset's")
    p.add_argument("--codec", default=None, help="codec registry name (default: the preset's, pca-q / spline-pca)")
    p.add_argument("--rank", type=int, default=None,
                   help="latent dimensions k per vector, for codecs that have a rank (seed preset: 16); an error for pca-q")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra codec constructor parameter, VALUE parsed as JSON (e.g. --param bits=4 for pca-q); repeatable")
    p.add_argument("--knots", type=int, default=7)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--samples", type=int, default=120000, help="head-vectors kept per layer by reservoir sampling")
    p.add_argument("--fit-samples-per-dim", type=int, default=2000,
                   help="fit each codec on at most this * rank vectors (0: all kept vectors)")
    p.add_argument("--max-batches", type=int, default=None,
                   help="stop after this many forward batches (default: the preset's, best: 8 as measured; seed: the whole text)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward batch")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per window (default: the preset's, 1024; fast: 4096 - K after RoPE is valid only up to it)")
    p.add_argument("--target", choices=["v", "k", "kv"], default=None,
                   help="what to calibrate (default: the preset's, best: kv -> a recipe folder; seed: v)")
    p.add_argument("--joint-heads", action=argparse.BooleanOptionalAction, default=None,
                   help="one codec per layer over all KV heads concatenated (default: the preset's, best: yes)")
    p.add_argument("--sink", type=int, default=None, help="recipe: first tokens kept exact (default: the preset's, best: 1)")
    p.add_argument("--allocate", choices=["sensitivity"], default=None,
                   help="K+V recipe: bits (--param bits=B) become the average; each layer's K and V get their own width "
                        "from --levels by a probe of their effect on the output (kvsplice/allocation.py; minutes)")
    p.add_argument("--levels", type=float, nargs="+", default=None, help="--allocate: the widths to choose from "
                   "(default 1 1.5 2 3 4 6)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="only these layers (quick runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", required=True,
                   help="K+V: recipe folder to write (k.safetensors, v.safetensors, recipe.json); one target: geometry file (.safetensors)")
    add_device_args(p)
    p.add_argument("--dump-vectors", metavar="PATH", default=None,
                   help="also write the collected vectors (safetensors, '{target}.{layer}.{head}' -> (N, head_dim))")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def parse_params(items: list[str]) -> dict:
    """["bits=4", "scale=\"gain\""] -> {"bits": 4, "scale": "gain"} (values JSON, else plain strings; a
    value that starts like JSON (a digit, sign, quote, bracket or brace) must parse)."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KVSpliceError(f"--param expects KEY=VALUE, got {item!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError as e:
            if value[:1] in '{["-.0123456789' or value in ("True", "False", "None"):  # meant as JSON, malformed
                raise KVSpliceError(f"--param {key}: value {value!r} is not valid JSON ({e.msg} at column {e.colno}); "
                                    "strings may be given bare (scale=gain), objects as JSON (warp_params='{\"epochs\": 2}')") from None
            out[key] = value  # a bare string, e.g. scale=gain
    return out


def run(args: argparse.Namespace) -> int:
    import torch

    from kvsplice import data
    from kvsplice.api import PRESETS, calibrate_with, recipe_configs
    from kvsplice.calibrate import run_calibration
    from kvsplice.geometry import save_geometry

    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    targets = preset.targets if args.target is None else (("k", "v") if args.target == "kv" else (args.target,))
    cfgs = recipe_configs(  # unknown codec, a --rank the codec ignores, ... -> error before loading anything
        args.preset, codec=args.codec, rank=args.rank, params=parse_params(args.param), targets=targets,
        joint_heads=args.joint_heads, knots=args.knots, epochs=args.epochs, samples=args.samples,
        fit_samples_per_dim=args.fit_samples_per_dim or None,
        max_batches=args.max_batches if args.max_batches is not None else preset.max_batches,
        seq_len=args.seq_len if args.seq_len is not None else preset.seq_len, batch_size=args.batch_size, seed=args.seed,
        layers=tuple(args.layers) if args.layers else None,
        **({"k_rope": args.k_rope} if args.k_rope else {}),
    )
    from kvsplice.codecs import get_codec
    from kvsplice.paths import check_outputs

    for c in cfgs.values():
        get_codec(c.codec, **c.codec_kwargs())  # bad codec parameters -> error before the model loads
    outs = [str(Path(args.out) / n) for n in ("k.safetensors", "v.safetensors", "recipe.json")] if len(cfgs) == 2 else args.out
    check_outputs({"--data": [d for d in args.data or [] if not d.startswith("hf:")]},
                  {"--out": outs, "--dump-vectors": args.dump_vectors},
                  folders={"--out": args.out if len(cfgs) == 2 else None})  # before any work
    sink = preset.sink if args.sink is None else args.sink
    if len(cfgs) == 2:  # K and V -> one recipe folder
        if args.out.endswith(".safetensors"):
            raise KVSpliceError(f"--out {args.out}: K+V calibration writes a recipe FOLDER (k.safetensors, v.safetensors, "
                                "recipe.json); give a folder name, or --target v / k for one geometry file")
        if args.dump_vectors:
            raise KVSpliceError("--dump-vectors needs one --target (v or k)")
    elif args.sink is not None:
        raise KVSpliceError("--sink is stored in a recipe (K+V); a single geometry file has none: pass --sink to eval / generate")
    allocate = args.allocate or preset.allocate  # --preset low-bit-alloc allocates by itself
    if allocate or args.levels:
        from kvsplice.allocation import DEFAULT_LEVELS, check_allocation_params

        c = next(iter(cfgs.values()))
        if len(cfgs) != 2 or not allocate:
            raise KVSpliceError("--allocate / --levels write a K+V recipe: give --allocate sensitivity with --target kv (the default)")
        check_allocation_params({"allocate": allocate, "levels": args.levels or list(DEFAULT_LEVELS), **c.codec_params},
                                "calibrate --allocate")
    probe_text = None  # the sensitivity probe's text (its first 512 tokens), when not the calibration text's start
    if args.data:
        text, description = data.load_texts(args.data), "files: " + ", ".join(args.data)
    elif args.corpus == "mix":  # the default: it transfers to other text (docs/CROSS_DOMAIN.md)
        from kvsplice.texts import PROBE_MIX_CHARS, mix_text

        text, description = mix_text()
        probe_text = mix_text(chunk_chars=PROBE_MIX_CHARS)[0] if allocate else None
    else:
        text, description = data.calibration_text(), data.describe_default("calibration")

    model, tokenizer = load_model_for(args)
    if args.seq_len is None:  # the preset's window, capped at the model's positions
        from kvsplice.api import preset_seq_len

        for c in cfgs.values():
            c.seq_len = preset_seq_len(args.preset, model)
    if len(cfgs) == 2:
        t0 = time.perf_counter()
        if allocate:
            from kvsplice.api import calibrate_allocated

            recipe = calibrate_allocated(model, tokenizer, text, cfgs, sink=sink, allocate=allocate, levels=args.levels,
                                         progress=not args.quiet, description=description, probe_text=probe_text)
        else:
            recipe = calibrate_with(model, tokenizer, text, cfgs, sink=sink, progress=not args.quiet, description=description)
        recipe.save(args.out)
        print(f"{recipe.describe()}; {recipe.v.meta['tokens']} tokens per target; {time.perf_counter() - t0:.1f} s "
              f"-> {args.out}/ (use: kvsplice eval --recipe {args.out}; kvsplice.Recipe.load({args.out!r}))")
        return 0
    cfg = next(iter(cfgs.values()))
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
        f"collect {res.collect_seconds:.1f} s; fit {cfg.codec}{f' k={cfg.rank}' if 'k' in cfg.codec_kwargs() else ''} on {m['fit_vectors_per_codec']} "
        f"vectors/codec: {res.total_fit_seconds:.1f} s for {len(res.fit_seconds)} codecs (slowest {slowest:.2f} s) "
        f"-> {args.out}"
    )
    if args.dump_vectors:
        print(f"vectors -> {args.dump_vectors}")
    return 0
