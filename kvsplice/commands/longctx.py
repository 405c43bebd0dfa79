"""`kvsplice longctx`: passkey and multi-key needle-in-a-haystack retrieval (and perplexity after a
long prefill) through each method's compressed KV cache; the baseline gates which (task, length)
cells the methods run (kvsplice/evaluate/longctx.py, longctx_run.py). Writes the JSON after every
cell (atomic) and a PNG of accuracy vs bits per cached value."""

from __future__ import annotations

import argparse
import sys

from kvsplice.errors import KVSpliceError


def _ints(s: str) -> list[int]:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from e


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {s!r}") from e


def _names(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


# = kvsplice.evaluate.longctx.TASKS (tests/test_import_speed.py checks); not imported from there:
# that module imports torch, and `kvsplice --help` must not
TASKS = ("passkey", "multikey")


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("longctx", help="long-context retrieval and perplexity through compressed caches", description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="model name or folder (default smollm2-135m)")
    p.add_argument("--lengths", type=_ints, default=[1024, 2048, 4096, 8192], help="tokens per sequence (default 1024,2048,4096,8192)")
    p.add_argument("--tasks", type=_names, default=list(TASKS), help=f"subset of {','.join(TASKS)}")
    p.add_argument("--depths", type=_floats, default=[0.1, 0.5, 0.9], help="needle depths in [0, 1] (default 0.1,0.5,0.9)")
    p.add_argument("--trials", type=int, default=10, help="contexts per (task, length) (multikey: one answer per depth each)")
    p.add_argument("--methods", type=_names, default=None,
                   help="comma-separated method names (default: all of kvsplice/evaluate/longctx_run.py METHODS)")
    p.add_argument("--prompt", choices=("plain", "chat", "auto"), default="auto",
                   help="prompt format; auto: chosen on dev trials of the baseline (default)")
    p.add_argument("--dev-trials", type=int, default=4, help="dev trials per (task, length, format) for --prompt auto")
    p.add_argument("--dev-lengths", type=_ints, default=None, help="lengths of the dev trials (default: the shortest length)")
    p.add_argument("--keep", type=float, default=0.8, help="baseline accuracy a cell needs to be run for the methods (default 0.8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk in tokens (default 512)")
    p.add_argument("--ppl-prefill", type=int, default=4096, help="perplexity after this prefill (0: skip; default 4096)")
    p.add_argument("--ppl-tokens", type=int, default=256, help="tokens scored after the prefill (default 256)")
    p.add_argument("--no-tasks", action="store_true", help="only the perplexity part")
    p.add_argument("--calibration", default=None, help="JSON object of CalibrationConfig options (default: the frontier's)")
    p.add_argument("--resume", action="store_true", help="keep the cells already in --json when its spec matches")
    p.add_argument("--json", metavar="PATH", default=None, help="results JSON (rewritten after every cell)")
    p.add_argument("--plot", metavar="PATH.png", default=None, help="accuracy vs bits/value PNG")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import json

    import torch

    from kvsplice.evaluate.longctx import TaskSpec
    from kvsplice.evaluate.longctx_run import METHODS, run_longctx
    from kvsplice.loading import load_model

    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if not 0.0 <= args.keep <= 1.0:
        raise KVSpliceError(f"--keep must be in [0, 1], got {args.keep}")
    if args.ppl_prefill < 0 or args.ppl_tokens < 1:
        raise KVSpliceError(f"--ppl-prefill must be >= 0 and --ppl-tokens >= 1, got {args.ppl_prefill}, {args.ppl_tokens}")
    calibration = None
    if args.calibration:
        try:
            calibration = json.loads(args.calibration)
        except json.JSONDecodeError as e:
            raise KVSpliceError(f"--calibration must be a JSON object, got {args.calibration!r}: {e}") from e
        if not isinstance(calibration, dict):
            raise KVSpliceError(f"--calibration must be a JSON object, got {type(calibration).__name__}")
    from kvsplice.paths import check_outputs

    check_outputs({}, {"--json": args.json, "--plot": args.plot})  # before the model loads (--resume reads --json: same path by design)
    spec = TaskSpec(tasks=args.tasks, lengths=args.lengths, depths=args.depths, trials=args.trials, seed=args.seed,
                    prompt="plain" if args.prompt == "auto" else args.prompt, chunk=args.chunk)
    model, tokenizer = load_model(args.model)
    model.eval()

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    result = run_longctx(model, tokenizer, spec, args.methods or list(METHODS), out=args.json, keep=args.keep,
                         calibration=calibration, ppl_prefill=args.ppl_prefill, ppl_tokens=args.ppl_tokens,
                         dev_trials=args.dev_trials if args.prompt == "auto" else 0, dev_lengths=args.dev_lengths,
                         tasks=not args.no_tasks, resume=args.resume, log=log)
    print(format_table(result))
    if args.json:
        print(f"JSON -> {args.json}")
    if args.plot:
        from kvsplice.evaluate.longctx_plot import plot_longctx

        plot_longctx(args.plot, result)
        print(f"plot -> {args.plot}")
    return 0


def format_table(result: dict) -> str:
    """One row per method: bits/value, accuracy [95 % CI] per (task, length) cell, ppl after the prefill."""
    cells = result["cells"]
    cols = sorted({(c["task"], c["length"]) for c in cells}, key=lambda t: (t[0], t[1]))
    ppl = {p["method"]: p for p in ((result.get("ppl") or {}).get("points") or [])}
    methods = list(dict.fromkeys([c["method"] for c in cells] + list(ppl)))
    head = ["method", "bits/val (payload)"] + [f"{t}@{n}" for t, n in cols] + ([f"ppl after {result['ppl']['prefill']} (Δ% vs baseline [95% CI])"] if ppl else [])
    rows = [head]
    for m in methods:
        mine = {(c["task"], c["length"]): c for c in cells if c["method"] == m}
        bits = [c["kv_bits_per_value"] for c in mine.values()] + ([ppl[m]["kv_bits_per_value"]] if m in ppl else [])
        row = [m, f"{sum(bits) / len(bits):.2f}" if bits else "-"]
        for col in cols:
            c = mine.get(col)
            row.append(f"{c['correct']}/{c['answers']} [{c['ci95'][0]:.2f},{c['ci95'][1]:.2f}]" if c else "-")
        if ppl:
            q = ppl.get(m) or {}
            d = f" ({q['delta_pct']:+.1f}% [{q['delta_ci95'][0]:+.1f},{q['delta_ci95'][1]:+.1f}])" if "delta_pct" in q else ""
            row.append(f"{q['ppl']:.3f}{d}" if q.get("ppl") is not None else "-")
        rows.append(row)
    w = [max(len(r[i]) for r in rows) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows)
