"""Is `matmul = "fp32-accumulate"` (kvsplice/evaluate/bf16.py) the bf16 model? SmolLM2 in bfloat16 on
the docs TEST part: per-token NLL of the same windows with torch's own bf16 GEMM and with float32
GEMMs on the bf16 operands, plus the float32 model for scale; seconds per forward of each (one thread).

    OMP_NUM_THREADS=1 python benchmarks/bf16_check.py --windows 2 --out docs/results/bf16-check.json

Writes {ppl, mean |Δ NLL| per token, max |Δ logit|, seconds} for each pair; prints a summary.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def nll_of(model, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    t0 = time.perf_counter()
    with torch.no_grad():
        logits = model(ids[None]).logits[0].float()  # (T, vocab)
    dt = time.perf_counter() - t0
    return F.cross_entropy(logits[:-1], ids[1:], reduction="none"), logits, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=2)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--out", default="docs/results/bf16-check.json")
    args = ap.parse_args()
    from kvsplice.data import tokenize
    from kvsplice.evaluate.bf16 import float32_accumulate
    from kvsplice.evaluate.suite import git_commit
    from kvsplice.loading import load_model
    from kvsplice.texts import part_text

    torch.set_num_threads(1)
    m32, tok = load_model(args.model, dtype=torch.float32)
    m16, _ = load_model(args.model, dtype=torch.bfloat16)
    ids = tokenize(tok, part_text("docs", "test"))
    rows: dict[str, list] = {"float32": [], "bf16 native": [], "bf16 fp32-accumulate": []}
    secs: dict[str, list] = {k: [] for k in rows}
    logits: dict[str, list] = {k: [] for k in rows}
    for w in range(args.windows):
        x = ids[w * args.window:(w + 1) * args.window]
        for name, run in (("float32", lambda: nll_of(m32, x)), ("bf16 native", lambda: nll_of(m16, x))):
            n, lg, dt = run()
            rows[name].append(n), logits[name].append(lg), secs[name].append(dt)
        with float32_accumulate(m16):
            n, lg, dt = nll_of(m16, x)
        rows["bf16 fp32-accumulate"].append(n), logits["bf16 fp32-accumulate"].append(lg), secs["bf16 fp32-accumulate"].append(dt)
    nll = {k: torch.cat(v).double() for k, v in rows.items()}
    lg = {k: torch.cat(v) for k, v in logits.items()}
    out = {"kind": "kvsplice-bf16-check", "model": args.model, **git_commit(), "tokens": int(nll["float32"].numel()),
           "windows": args.windows, "window": args.window, "threads": 1,
           "ppl": {k: float(v.mean().exp()) for k, v in nll.items()},
           "seconds_per_forward": {k: [round(s, 2) for s in v] for k, v in secs.items()}, "pairs": {}}
    for a, b in (("bf16 fp32-accumulate", "bf16 native"), ("bf16 native", "float32"), ("bf16 fp32-accumulate", "float32")):
        out["pairs"][f"{a} vs {b}"] = {"mean_abs_dnll": float((nll[a] - nll[b]).abs().mean()),
                                       "ppl_ratio": float((nll[a].mean() - nll[b].mean()).exp()),
                                       "max_abs_dlogit": float((lg[a] - lg[b]).abs().max()),
                                       "top1_agreement": float((lg[a].argmax(-1) == lg[b].argmax(-1)).float().mean())}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: out[k] for k in ("ppl", "seconds_per_forward", "pairs")}, indent=1))


if __name__ == "__main__":
    main()
