"""`kvsplice ablate`: the seed's inference ablation (V0 baseline, V19 V-only pruning, V20 pruning +
spline-pca, V20-pca, and the pca / spline-pca rank sweep) from a TOML config; prints one table,
writes the JSON (with the config) and a PNG (perplexity vs total KV bytes per token)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kvsplice.errors import KVSpliceError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ablate", help="run the seed's inference ablation from a TOML config", description=__doc__)
    p.add_argument("--config", required=True, help="ablation config (TOML), e.g. configs/smollm2-kv-ablation.toml")
    p.add_argument("--json", metavar="PATH", default=None, help="write the results JSON here")
    p.add_argument("--plot", metavar="PATH.png", default=None, help="write the ppl-vs-bytes plot here")
    p.add_argument("--geometry-dir", default=None,
                   help="reuse geometries from / save them to this folder (overrides the config's geometry_dir)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (overrides the config)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def execute(cfg, json_path: str | Path | None, plot_path: str | Path | None, progress: bool = True) -> int:
    """Run the ablation described by `cfg` (AblationConfig), print the tables, write JSON / PNG."""
    from kvsplice.evaluate.ablation import run_ablation
    from kvsplice.evaluate.report import format_table, plot_frontier, write_json

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def save_partial(partial) -> None:  # every finished row is on disk: Ctrl-C loses at most one row
        if json_path:
            write_json(json_path, partial.result)

    t0 = time.perf_counter()
    res = run_ablation(cfg, log=log, progress=progress, on_row=save_partial)
    wall = time.perf_counter() - t0
    p = cfg.protocol
    base = res.rows[0].name
    print(format_table(res.rows, baseline=base, title=(
        f"{res.result['model']} - prefill-continue: prefill {p.prefill}, then {p.continue_tokens} tokens scored "
        f"(fed {p.chunk} per step with pruning, {p.unpruned_chunk} without) x {p.segments} segments = "
        f"{res.result['tokens']} tokens per row; Δppl vs {base}")))
    if res.tf_rows:
        extra = res.result["extra_protocols"][0]
        print()
        print(format_table(res.tf_rows, baseline=base if res.tf_rows[0].name == base else None, title=(
            f"teacher-forced (rows without pruning): {p.tf_windows} windows of {p.tf_window} = {extra['tokens']} tokens scored")))
    res.result["wall_seconds"] = round(wall, 1)
    print(f"\nwall time {wall:.0f} s (calibration {res.result['calibration_seconds']:.0f} s)")
    if json_path:
        write_json(json_path, res.result)
        print(f"JSON -> {json_path}")
    if plot_path:
        plot_frontier(plot_path, res.rows, title=f"{res.result['model']}: prefill-continue, {res.result['tokens']} tokens/row")
        print(f"plot -> {plot_path}")
    return 0


def run(args: argparse.Namespace) -> int:
    from kvsplice.evaluate.ablation import AblationConfig, geometry_filename
    from kvsplice.paths import check_outputs

    cfg = AblationConfig.from_toml(args.config)
    if args.geometry_dir is not None:
        cfg.geometry_dir = args.geometry_dir
    geometries = [r.geometry for r in cfg.rows if r.geometry]
    if cfg.geometry_dir:  # geometries the run may write (or read) there
        geometries += [str(Path(cfg.geometry_dir) / geometry_filename(*r.geometry_key)) for r in cfg.rows if r.geometry_key]
    check_outputs({"--config": args.config, "eval_data": cfg.eval_data, "calibration_data": cfg.calibration_data,
                   "geometry": geometries}, {"--json": args.json, "--plot": args.plot})
    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        cfg.threads = args.threads
    return execute(cfg, args.json, args.plot, progress=not args.quiet)
