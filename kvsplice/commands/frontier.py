"""`kvsplice frontier`: sweep every method (our quantising codecs on V / K / K+V, the seed's pca /
spline-pca / V-only pruning, and the peers: KIVI, H2O, StreamingLLM, transformers' QuantizedCache,
plain per-token ints) over a grid of budgets; print the table, write the JSON and the PNG
(perplexity vs KV bytes per token)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from kvsplice.commands.common import add_device_args, load_model_for
from kvsplice.errors import KVSpliceError

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "frontier.toml"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("frontier", help="quality-per-byte frontier of every method and peer", description=__doc__)
    p.add_argument("--model", default=None, help="model name or folder (overrides the config; default smollm2-135m)")
    p.add_argument("--config", default=None,
                   help="frontier config (TOML); default configs/frontier.toml when present, else the built-in grid")
    p.add_argument("--quick", action="store_true", help="the quick grid (the config's [quick] table, else the built-in one)")
    p.add_argument("--json", metavar="PATH", default=None, help="write the frontier JSON here")
    p.add_argument("--plot", metavar="PATH.png", default=None, help="write the PNG here")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (overrides the config)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_args(p, dtype_default=None)
    p.add_argument("--suite", choices=("quick", "full"), default=None,
                   help="the evidence suite (configs/suite-<name>.toml): every domain, CIs, KL, top-1, honest bytes")
    p.add_argument("--suite-config", metavar="PATH", default=None, help="a suite config TOML instead of --suite's")
    p.add_argument("--split", choices=("dev", "test"), default="dev",
                   help="suite split: dev for design choices, test for reported numbers (default dev)")
    p.set_defaults(func=run)
    return p


def format_points(result: dict) -> str:
    """Fixed-width table of the points: method, setting, bits/value, bytes/token, ppl, Δppl %, Pareto."""
    base = result["baseline_ppl"]
    glob = {(g["method"], g["setting"]) for g in result.get("global_pareto", [])}
    rows = [("method", "setting", "bits/val", "B/token", "ppl", "Δppl %", "pareto")]
    for q in result["points"]:
        ppl = q["ppl"] if q["ppl"] is not None else float("nan")
        mark = ("*" if q["pareto"] else "") + ("G" if (q["method"], q["setting"]) in glob else "")
        rows.append((q["method"], q["setting"], f"{q['kv_bits_per_value']:.2f}", f"{q['kv_bytes_per_token']:.0f}",
                     f"{ppl:.3f}", f"{100 * (ppl / base - 1):+.2f}" if math.isfinite(ppl) else "nan", mark))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(r)) for r in rows)


def run_suite_command(args: argparse.Namespace) -> int:
    """--suite / --suite-config: run the evidence suite; JSON (+ per-token sidecar) and PNG default to
    docs/results/suite-<name>-<split>.{json,png} under the current directory."""
    from kvsplice.evaluate.frontier_plot import plot_suite_json
    from kvsplice.evaluate.suite import format_summary, run_suite
    from kvsplice.evaluate.suite_config import SuiteConfig

    if args.quick or args.config:
        raise KVSpliceError("--suite / --suite-config cannot be combined with --quick or --config (the frontier grid)")
    cfg = SuiteConfig.from_toml(args.suite_config) if args.suite_config else SuiteConfig.named(args.suite)
    if args.model is not None:
        cfg.model = args.model
    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        cfg.threads = args.threads
    stem = Path("docs") / "results" / f"suite-{cfg.name}-{args.split}"
    out_json = Path(args.json) if args.json else stem.with_suffix(".json")
    out_png = Path(args.plot) if args.plot else out_json.with_suffix(".png")
    out_lc = out_png.with_name(f"{out_png.stem}-longctx.png") if cfg.longctx is not None else None
    from kvsplice.paths import check_outputs

    check_outputs({"--suite-config": args.suite_config}, {"--json": out_json, "--plot": out_png, "the longctx plot": out_lc})  # before any work
    print(f"suite {cfg.name!r}, split {args.split}: JSON -> {out_json} (rewritten after every point), plot -> {out_png}", file=sys.stderr)
    result = run_suite(cfg, args.split, out_json, log=lambda m: print(m, file=sys.stderr, flush=True))
    print(format_summary(result))
    print(f"\nwall time {result['run']['seconds']:.0f} s; JSON -> {out_json}")
    plot_suite_json(out_png, result)
    print(f"plot -> {out_png}")
    if out_lc is not None:
        from kvsplice.commands.longctx import format_table
        from kvsplice.evaluate.longctx_plot import plot_longctx

        print(f"\nlong context ({cfg.longctx.domain} {args.split} text):\n{format_table(result['longctx'])}")
        plot_longctx(out_lc, result["longctx"])
        print(f"plot -> {out_lc}")
    return 0


def run(args: argparse.Namespace) -> int:
    from kvsplice.evaluate.frontier import FrontierConfig, run_frontier, write_frontier_json

    if getattr(args, "suite", None) or getattr(args, "suite_config", None):
        return run_suite_command(args)

    if args.config is not None:
        cfg = FrontierConfig.from_toml(args.config, quick=args.quick)
    elif DEFAULT_CONFIG.is_file():
        cfg = FrontierConfig.from_toml(DEFAULT_CONFIG, quick=args.quick)
    else:
        cfg = FrontierConfig.quick() if args.quick else FrontierConfig()
    if args.model is not None:
        cfg.model = args.model
    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        cfg.threads = args.threads

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    if args.dtype is not None:
        cfg.dtype = args.dtype
    from kvsplice.paths import check_outputs

    check_outputs({"--config": args.config}, {"--json": args.json, "--plot": args.plot})  # before the model loads
    model, tokenizer = load_model_for(argparse.Namespace(model=cfg.model, device=args.device, dtype=cfg.dtype))
    on_point = (lambda partial: write_frontier_json(args.json, partial)) if args.json else None  # lose at most one setting
    result = run_frontier(cfg, model=model, tokenizer=tokenizer, log=log, progress=not args.quiet, on_point=on_point)
    p = cfg.protocol
    print(f"{result['model']}: prefill-continue, prefill {p.prefill} + {p.continue_tokens} scored tokens x {p.segments} segments; "
          f"baseline ppl {result['baseline_ppl']:.3f}  (* = Pareto within its method, G = Pareto over all methods)")
    print(format_points(result))
    if "teacher_forced" in result:
        print(f"\nteacher-forced ({p.tf_windows} windows of {p.tf_window}; exact settings only), baseline ppl "
              f"{result['teacher_forced']['baseline_ppl']:.3f}")
        print(format_points({**result["teacher_forced"], "global_pareto": []}))
    print(f"\nwall time {result['run']['seconds']:.0f} s")
    if args.json:
        write_frontier_json(args.json, result)
        print(f"JSON -> {args.json}")
    if args.plot:
        from kvsplice.evaluate.frontier_plot import plot_frontier_json

        plot_frontier_json(args.plot, result)
        print(f"plot -> {args.plot}")
    return 0
