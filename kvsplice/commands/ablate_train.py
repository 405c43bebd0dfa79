"""`kvsplice ablate-train`: train the ablation's variants (V0, V19, V20, V21, L20, V20-pca, C1, C3 by
default) in turn from the same seed, data and budget; print one table, write JSON and a PNG of the
validation-loss curves."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ablate-train", help="run the training ablation (RA / V-only pruning / Spline->PCA / learned)",
                              description=__doc__)
    p.add_argument("--config", default="configs/gpt2-kv-pruning-ablation.toml", help="ablation TOML")
    p.add_argument("--json", default=None, metavar="PATH", help="result JSON (default <out_dir>/ablation.json)")
    p.add_argument("--plot", default=None, metavar="PATH.png", help="validation-loss plot (default <out_dir>/val_loss.png)")
    p.add_argument("--out-dir", default=None, help="override [ablation].out_dir")
    p.add_argument("--only", nargs="+", default=None, metavar="VARIANT", help="run only these variants (in config order)")
    p.add_argument("--max-steps", type=int, default=None, help="override the base step budget (quick checks)")
    p.add_argument("--threads", type=int, default=None, help="override torch CPU threads")
    p.add_argument("--seed", type=int, default=None, help="override the base seed (repeat the ablation for seed noise)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from kvsplice.paths import check_outputs
    from kvsplice.train.ablation import load_ablation, run_ablation

    check_outputs({"--config": args.config}, {"--json": args.json, "--plot": args.plot})  # before training starts

    over = {k: v for k, v in (("max_steps", args.max_steps), ("threads", args.threads), ("seed", args.seed)) if v is not None}
    if args.no_progress:
        over["progress"] = False
    acfg = load_ablation(args.config, over)
    if args.out_dir:
        acfg.out_dir = args.out_dir
    run_ablation(acfg, only=args.only, json_path=args.json, plot_path=args.plot)
    return 0
