"""`kvsplice eval`: perplexity on the evaluation split with an uncompressed baseline (DynamicCache)
and one row per geometry (optionally with V-only pruning), under one protocol:
teacher-forced (windows, one forward each; no pruning) or prefill-continue (prefill C tokens, then
score N tokens fed through the cache chunk by chunk)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvsplice.commands.common import add_device_args, load_model_for
from kvsplice.errors import KVSpliceError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("eval", help="perplexity with compressed / pruned KV caches vs an uncompressed one", description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local HF folder, or a hub id")
    p.add_argument("--recipe", default=None, metavar="DIR_OR_HUB_ID",
                   help="recipe (kvsplice calibrate --out DIR, or a Hugging Face Hub repo id): one row with its K + V geometries and sink")
    p.add_argument("--allow-other-model", action="store_true", help="a recipe or geometry calibrated on another model is warned about; this flag silences the warning")
    p.add_argument("--geometry", nargs="*", default=[], metavar="G", help="V geometry files; one row each")
    p.add_argument("--keep-ratio", type=float, default=None,
                   help="V-only pruning keep ratio (prefill-continue only): applied to every geometry row, plus a pruning-only row")
    p.add_argument("--recency", type=int, default=64, help="pruning: newest tokens always kept")
    p.add_argument("--k-min", type=int, default=64, help="pruning: minimum tokens kept")
    p.add_argument("--strategy", choices=["A", "B"], default="A", help="pruning: A prune then compress, B compress then select")
    p.add_argument("--window", type=int, default=0, help="newest tokens kept in full precision (default 0)")
    p.add_argument("--k-geometry", default=None, metavar="G",
                   help="K geometry (calibrate --target k) applied in every geometry row (K coded before RoPE for Llama)")
    p.add_argument("--sink", type=int, default=None,
                   help="first tokens kept exact (attention sink; default: the recipe's, else 1, 0 with --keep-ratio)")
    p.add_argument("--protocol", choices=["teacher-forced", "prefill-continue"], default="teacher-forced")
    p.add_argument("--data", nargs="+", metavar="PATH", help="UTF-8 text files; default: the evaluation split of pydoc_data.topics")
    g = p.add_argument_group("teacher-forced")
    g.add_argument("--tf-window", type=int, default=1024, help="tokens per window (default 1024)")
    g.add_argument("--stride", type=int, default=None, help="window start step (default: the window)")
    g.add_argument("--max-windows", type=int, default=8, help="windows evaluated (default 8; 0: all)")
    g = p.add_argument_group("prefill-continue")
    g.add_argument("--prefill", type=int, default=768, help="tokens prefilled, not scored (default 768)")
    g.add_argument("--continue-tokens", type=int, default=128, help="tokens scored per segment (default 128)")
    g.add_argument("--chunk", type=int, default=1, help="tokens fed per step (default 1: true decoding)")
    g.add_argument("--segments", type=int, default=4, help="segments evaluated (default 4; 0: all)")
    g.add_argument("--batch-size", type=int, default=4, help="segments run together (default 4)")
    p.add_argument("--no-baseline", action="store_true", help="skip the DynamicCache row")
    p.add_argument("--json", metavar="PATH", default=None, help="write results JSON here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_device_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import DynamicCache

    from kvsplice import data
    from kvsplice.cache import CompressedCache
    from kvsplice.evaluate.perplexity import ProtocolError, evaluate
    from kvsplice.evaluate.report import format_table, require_finite, result_dict, write_json
    from kvsplice.geometry import load_geometry
    from kvsplice.api import Recipe
    from kvsplice.loading import model_id
    from kvsplice.pruning import VOnlyPruner

    from kvsplice.paths import check_outputs

    recipe_files = [args.recipe] + [str(p) for p in Path(args.recipe).glob("*") if p.is_file()] if args.recipe else []
    check_outputs({"--geometry": args.geometry, "--k-geometry": args.k_geometry, "--data": args.data,
                   "--recipe": recipe_files}, {"--json": args.json})  # before any work
    if args.keep_ratio is not None and args.protocol == "teacher-forced":
        raise ProtocolError("--keep-ratio (pruning) needs --protocol prefill-continue: under teacher forcing every query "
                            "would read a selection made with later queries")
    pruner = None
    if args.keep_ratio is not None:
        pruner = VOnlyPruner(keep_ratio=args.keep_ratio, recency=args.recency, k_min=args.k_min)
    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.recipe and args.keep_ratio is not None:
        raise KVSpliceError("--recipe codes K before RoPE, which cannot be combined with --keep-ratio (pruning)")
    recipe = Recipe.load(args.recipe, allow_other_model=args.allow_other_model) if args.recipe else None
    sink = args.sink if args.sink is not None else (0 if pruner is not None else 1)
    geometries = [(Path(g).stem, load_geometry(g)) for g in args.geometry]  # bad file -> error before the model loads
    k_geo = load_geometry(args.k_geometry) if args.k_geometry else None
    if args.protocol == "teacher-forced":
        options = dict(window=args.tf_window, stride=args.stride, max_windows=args.max_windows or None)
    else:
        options = dict(prefill=args.prefill, continue_tokens=args.continue_tokens, chunk=args.chunk,
                       segments=args.segments or None, batch_size=args.batch_size)

    model, tokenizer = load_model_for(args)
    if recipe is not None:
        recipe.check_model(model)
    for name, geo in geometries + [(args.k_geometry, k_geo)]:  # same layout, other model: warn
        if geo is not None:
            geo.check_model(model, args.allow_other_model, source=f"geometry {name}")
    ids = data.tokenize(tokenizer, data.load_texts(args.data) if args.data else data.evaluation_text())

    def compressed(geo, prn):
        def make():
            p = None if prn is None else VOnlyPruner(**vars(prn))  # fresh pruner state per cache
            return CompressedCache.from_geometry(model, v_geometry=geo, k_geometry=k_geo, pruner=p, window=args.window,
                                                 strategy=args.strategy, sink=sink)
        make()  # incompatible geometry -> GeometryError before any compute
        return make

    rows_spec = [] if args.no_baseline else [("baseline", DynamicCache)]
    if pruner is not None:
        rows_spec.append((f"prune-{args.keep_ratio:g}", compressed(None, pruner)))
    k_tag = f"+K:{Path(args.k_geometry).stem}" if k_geo is not None else ""
    if k_geo is not None and not geometries:
        geometries = [("", None)]  # one row: K coded, V stored as it is
    for name, geo in geometries:
        rows_spec.append((name + k_tag + (f"+prune-{args.keep_ratio:g}" if pruner else ""), compressed(geo, pruner)))
    if recipe is not None:
        def make_recipe():
            return recipe.cache(model, window=args.window, strategy=args.strategy,
                                sink=args.sink if args.sink is not None else recipe.sink)
        make_recipe()  # incompatible recipe -> GeometryError before any compute
        rows_spec.append(("recipe:" + Path(str(args.recipe).rstrip("/")).name, make_recipe))
    if not rows_spec:
        raise KVSpliceError("nothing to evaluate: give --geometry and/or --keep-ratio, or drop --no-baseline")
    rows = []
    config = {k: v for k, v in vars(args).items() if k != "func"}
    for name, make in rows_spec:
        # Gemma: <bos> first in every window / segment (context only); tokenizers that add none: unchanged
        period = options["window"] if args.protocol == "teacher-forced" else args.prefill + args.continue_tokens + 1
        bos = data.bos_id(tokenizer)
        if bos is not None and options.get("stride") not in (None, period):
            raise KVSpliceError(f"this tokenizer adds a BOS, which starts non-overlapping windows only; got --stride "
                                f"{options['stride']} with --tf-window {period}: drop --stride")
        stream = data.with_bos(ids, period, bos)
        r = require_finite(evaluate(args.protocol, model, stream, make, name=name, **options))
        print(f"{name}: ppl {r.ppl:.3f} ({r.seconds:.1f} s)", file=sys.stderr)
        rows.append(r)
        if args.json:  # each finished row on disk at once: Ctrl-C / a crash loses at most the row in progress
            write_json(args.json, dict(result_dict(model_id(model), args.protocol, rows, config), complete=False))
    print(format_table(rows, title=f"{model_id(model)} - {args.protocol}, {rows[0].tokens} tokens scored per row"
                       + ("" if rows_spec[0][0] == "baseline" else " (no DynamicCache baseline row)")))
    if args.json:
        write_json(args.json, dict(result_dict(model_id(model), args.protocol, rows, config), complete=True))
        print(f"JSON -> {args.json}")
    return 0
