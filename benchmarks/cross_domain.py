"""Cross-domain matrix (issue 10): calibrate on one text domain, evaluate on every domain.

For each calibration corpus (the calibration part of docs / code / prose, and "mix": the three
interleaved in ~1,000-token chunks so that the first `max_batches` windows see every domain) and
each method setting, every evaluation domain's `--split` part (dev for design decisions, test for
the final numbers) is scored teacher-forced (exact for per-token codecs) in `--windows` windows of
1,024 tokens against the uncompressed baseline (DynamicCache, float32) on the same tokens; Δ% of
perplexity with a paired moving-block bootstrap 95 % CI (kvsplice/evaluate/stats.py).

Calibration-free methods (rot-uniform, uniform) are measured once per evaluation domain (cal = "-").
The model is loaded once; collected K / V of each corpus are kept and every geometry is fitted
once (frontier's `Calibration`). The JSON is rewritten atomically after every cell and a rerun
skips cells already present, so a killed run resumes. Per-token NLL of every cell goes to
`<json>.tokens.safetensors` ("<cell key>": float32 (N,)) for later paired comparisons.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/cross_domain.py \
        --out docs/results/cross-domain-dev.json --split dev --windows 2 --preset matrix
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

CAL = {"samples": 12000, "max_batches": 4, "seq_len": 1024, "seed": 0}
DOMAINS = ("docs", "code", "prose")


def mix_text(chunk_chars: int = 4000) -> str:
    """The three calibration parts interleaved chunk by chunk (docs, code, prose, docs, ...): the
    project's default calibration text (kvsplice.texts.mix_text)."""
    from kvsplice.texts import mix_text as _mix

    return _mix(DOMAINS, chunk_chars)[0]


def corpus_text(name: str) -> str:
    from kvsplice.texts import part_text

    return mix_text() if name == "mix" else part_text(name, "calibration")


def make_calibration(name: str, model: Any, tok: Any, log) -> Any:
    """frontier's `Calibration` on corpus `name` (K and V collected in one pass, samples as two)."""
    from kvsplice.evaluate.frontier import Calibration

    c = Calibration(SimpleNamespace(calibration=dict(CAL), calibration_data=[name]), model, tok, log, progress=False)
    c.text = corpus_text(name)
    return c


# label -> (calibrated?, setting). Setting keys as in configs/*.toml codec methods.
def _pq(bits: float, target: str = "kv", **kw: Any) -> dict[str, Any]:
    return {"codec": "pca-q", "bits": bits, "target": target, "joint_heads": True, "sink": 1, **kw}


PRESETS: dict[str, list[tuple[str, bool, dict[str, Any]]]] = {
    "matrix": [("pca-q 4", True, _pq(4.0)), ("pca-q 2", True, _pq(2.0))],
    "xpred": [("xpred 4", True, {**_pq(4.0), "codec": "xpred-pca-q"}), ("xpred 2", True, {**_pq(2.0), "codec": "xpred-pca-q"})],
    "kv-split": [("pca-q 4 K", True, _pq(4.0, "k")), ("pca-q 4 V", True, _pq(4.0, "v")),
                 ("pca-q 2 K", True, _pq(2.0, "k")), ("pca-q 2 V", True, _pq(2.0, "v"))],
}


def table(res: dict[str, Any]) -> str:
    """Markdown: one row per (method, calibration corpus), one column per evaluation domain:
    Δ% [95 % CI] (in-domain cells in bold), and the payload bits/value."""
    doms = list(res["domains"])
    rows: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for c in res["cells"].values():
        if c["method"] != "baseline":
            rows.setdefault((c["method"], c["cal"] or "-"), {})[c["eval"]] = c
    base = " | ".join(f"{d} ({res['cells'][f'baseline|{d}']['ppl']:.2f})" for d in doms if f"baseline|{d}" in res["cells"])
    out = [f"| method | calibrated on | bits/value | {base} |", "|---|---|---|" + "---|" * len(doms)]
    for (m, cal), cells in rows.items():
        bits = next(iter(cells.values()))["bits_per_value"]
        f = lambda d: "" if d not in cells else (  # noqa: E731
            ("**{:+.2f}** [{:+.2f}, {:+.2f}]" if d == cal else "{:+.2f} [{:+.2f}, {:+.2f}]").format(cells[d]["delta_pct"], *cells[d]["ci95"]))
        out.append(f"| {m} | {cal} | {bits:.2f} | " + " | ".join(f(d) for d in doms) + " |")
    return "\n".join(out)


def compare(args: Any, res: dict[str, Any]) -> None:
    """Paired Δ% of method A vs B on the same tokens for every (calibration, domain) both have; the
    baselines of the files must agree (same tokens), else refused."""
    from safetensors.torch import load_file

    from kvsplice.evaluate.stats import paired_block_bootstrap
    from kvsplice.paths import atomic_write_bytes

    toks: dict[str, torch.Tensor] = {}
    for f in [args.out, *args.table]:
        side = load_file(str(Path(f).with_suffix(".tokens.safetensors")))
        for k, v in side.items():
            if k.startswith("baseline|") and k in toks and not torch.equal(toks[k], v):
                raise SystemExit(f"{f}: {k} differs from an earlier file's: not the same tokens")
            toks.setdefault(k, v)
    a, b = args.compare
    rows = []
    for key in sorted(toks):
        m, cal, dom = key.split("|") if key.count("|") == 2 else (None, None, None)
        if m == a and f"{b}|{cal}|{dom}" in toks:
            st = paired_block_bootstrap(toks[f"{b}|{cal}|{dom}"], toks[key], block=64, n=2000, seed=0)
            rows.append({"cal": cal, "eval": dom, "delta_pct_a_vs_b": st.delta_pct, "ci95": [st.ci_low, st.ci_high], "verdict_for_a": st.verdict})
            print(f"{a} vs {b} | cal {cal} | {dom}: {st.delta_pct:+.2f} % [{st.ci_low:+.2f}, {st.ci_high:+.2f}] {st.verdict}")
    if not rows:
        raise SystemExit(f"no (calibration, domain) cell has both {a!r} and {b!r}")
    if args.compare_out:
        atomic_write_bytes(Path(args.compare_out), (json.dumps({"a": a, "b": b, "sources": [args.out, *args.table], "rows": rows}, indent=1) + "\n").encode())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="result JSON (resumed when it exists)")
    ap.add_argument("--write-mix", metavar="TXT", help="write the 'mix' calibration text (for `kvsplice calibrate --data`) and exit")
    ap.add_argument("--split", default="dev", choices=("dev", "test"))
    ap.add_argument("--windows", type=int, default=2, help="teacher-forced windows of 1024 tokens per domain")
    ap.add_argument("--preset", action="append", default=[], help=f"method sets: {sorted(PRESETS)}")
    ap.add_argument("--method", action="append", default=[],
                    help='extra method as JSON: ["label", calibrated(bool), {setting}]')
    ap.add_argument("--cal", nargs="+", default=["docs", "code", "prose", "mix"])
    ap.add_argument("--eval", nargs="+", default=list(DOMAINS))
    ap.add_argument("--table", nargs="*", metavar="JSON",
                    help="print the markdown table of --out (plus these result files, same split) and exit")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), default=None,
                    help="with --table: paired Δ of method A vs method B (labels) per (calibration, domain) on the same "
                         "tokens, from the per-token sidecars; written to --compare-out")
    ap.add_argument("--compare-out", default=None, help="JSON for --compare")
    args = ap.parse_args(argv)
    if args.write_mix:
        from kvsplice.paths import atomic_write_bytes

        atomic_write_bytes(Path(args.write_mix), mix_text().encode("utf-8"))
        return
    if not args.out:
        ap.error("--out is required")
    if args.table is not None:
        res = json.loads(Path(args.out).read_text())
        for extra in args.table:
            more = json.loads(Path(extra).read_text())
            if more["split"] != res["split"] or more["protocol"] != res["protocol"]:
                raise SystemExit(f"{extra}: split/protocol differ from {args.out}; not merged")
            res["domains"].update(more["domains"])
            res["cells"].update(more["cells"])
        if args.compare:
            compare(args, res)
            return
        print(table(res))
        return

    from safetensors.torch import load_file, save
    from transformers import DynamicCache

    from kvsplice.data import tokenize
    from kvsplice.evaluate.frontier import codec_factory
    from kvsplice.evaluate.perplexity import perplexity_teacher_forced
    from kvsplice.evaluate.report import _atomic_write_bytes
    from kvsplice.evaluate.stats import paired_block_bootstrap
    from kvsplice.loading import load_model
    from kvsplice.texts import part_info

    methods = [m for p in args.preset for m in PRESETS[p]] + [tuple(json.loads(m)) for m in args.method]
    out = Path(args.out)
    side = out.with_suffix(".tokens.safetensors")
    res = json.loads(out.read_text()) if out.exists() else {
        "kind": "kvsplice-cross-domain", "split": args.split, "model": "smollm2-135m", "dtype": "float32",
        "protocol": {"name": "teacher-forced", "window": 1024, "windows": args.windows},
        "calibration": {**CAL, "corpora": "calibration part of each domain; mix = docs/code/prose interleaved in 4000-char chunks"},
        "bootstrap": {"block": 64, "resamples": 2000}, "domains": {}, "cells": {}}
    toks: dict[str, torch.Tensor] = load_file(side) if side.exists() else {}

    def write() -> None:
        _atomic_write_bytes(out, (json.dumps(res, indent=1) + "\n").encode())
        _atomic_write_bytes(side, save({k: v.contiguous() for k, v in toks.items()}))

    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True)  # noqa: E731
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    model.eval()
    from kvsplice.cache import model_layout

    L, H, Dh = model_layout(model)
    vpt = 2 * L * H * Dh  # values per token (K + V)
    res["values_per_token"] = vpt
    log("model loaded")
    ids = {d: tokenize(tok, __import__("kvsplice.texts", fromlist=["x"]).part_text(d, args.split)) for d in args.eval}

    def run(key: str, d: str, make: Any, extra: dict[str, Any]) -> None:
        if key in res["cells"]:
            return
        r = perplexity_teacher_forced(model, ids[d], make, window=1024, max_windows=args.windows, name=key)
        nll = r.token_nll.reshape(-1)
        nll = nll[~torch.isnan(nll)].float()
        toks[key] = nll
        cell = {"eval": d, "ppl": float(r.ppl), "tokens": int(r.tokens), "kv_bytes_per_token": float(r.kv_bytes_per_token),
                "bits_per_value": 8 * float(r.kv_bytes_per_token) / vpt, "seconds": round(r.seconds, 1), **extra}
        if extra.get("method") != "baseline":
            st = paired_block_bootstrap(toks[f"baseline|{d}"], nll, block=64, n=2000, seed=0)
            cell.update(delta_pct=st.delta_pct, ci95=[st.ci_low, st.ci_high])
        res["cells"][key] = cell
        write()
        log(f"{key}: ppl {r.ppl:.3f}" + (f"  Δ {cell['delta_pct']:+.2f} % [{cell['ci95'][0]:+.2f}, {cell['ci95'][1]:+.2f}]"
                                         if "delta_pct" in cell else "") + f"  {8 * r.kv_bytes_per_token / vpt:.3f} bits/value")

    for d in args.eval:
        res["domains"][d] = {k: v for k, v in part_info(d, args.split).items() if k != "documents"}
        run(f"baseline|{d}", d, DynamicCache, {"method": "baseline", "cal": None})
    cals: dict[str, Any] = {}
    # corpus-major order: one corpus's K / V are collected once and serve every method and bit width
    todo = [(c, label, calibrated, s) for c in args.cal for label, calibrated, s in methods if calibrated or c == args.cal[0]]
    for c, label, calibrated, s in todo:
        for d in args.eval:
            key = f"{label}|{c if calibrated else '-'}|{d}"
            if key in res["cells"]:
                continue
            if c not in cals:
                cals[c] = make_calibration(c, model, tok, log)
            make = codec_factory(model, s, cals[c])
            run(key, d, make, {"method": label, "cal": c if calibrated else None, "setting": s})
    res["seconds"] = round(time.perf_counter() - t0, 1)
    write()
    log("done")


if __name__ == "__main__":
    main()
