"""Paired comparison of two methods of one suite run, from its per-token NLL sidecar: for every domain
and calibration draw measured for both (same protocol, so the same scored tokens), the Δ % of A's
perplexity vs B's with the paired block-bootstrap 95 % CI and a verdict for A (win / loss / tie).

    python benchmarks/paired.py docs/results/levers-dev.json --a pca-q-alloc --b pca-q --out docs/results/levers-dev-paired.json

A and B are method names; points are matched on (domain, protocol, draw, the setting's budget:
the first `bits=...` / `budget=...` token of the setting), or with --b-setting on (domain, protocol,
draw) against B's setting that contains the given text (equal-bytes pairs across budgets); a B
without calibration draws (a peer) pairs with every draw of A. With
--b-json, B's points come from ANOTHER suite run; it must have scored the same tokens (its baseline
per-token NLLs of every paired domain and protocol equal this run's exactly, else it refuses):

    python benchmarks/paired.py docs/results/suite-fast-test.json --a pca-q-fast \
        --b-json docs/results/suite-draws-test.json --b pca-q --out docs/results/fast-vs-pre-test-paired.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _budget(setting: str) -> str:
    return next((t for t in setting.split() if t.startswith(("bits=", "budget=", "int"))), setting)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suite_json")
    ap.add_argument("--a", required=True, help="method A (reported: A vs B)")
    ap.add_argument("--b", required=True, help="method B")
    ap.add_argument("--b-setting", default=None, metavar="TEXT",
                    help="pair every A point with B's point whose setting contains TEXT (e.g. 'bits=3.0': equal bytes) "
                         "instead of B's point at A's own budget")
    ap.add_argument("--b-json", default=None, metavar="SUITE_JSON", help="B's points from this other run (same tokens: checked)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--resamples", type=int, default=2000)
    args = ap.parse_args()

    from safetensors.torch import load_file

    from kvsplice.evaluate.stats import paired_block_bootstrap
    from kvsplice.paths import atomic_write_bytes, check_outputs

    src = Path(args.suite_json)
    bsrc = Path(args.b_json) if args.b_json else src
    check_outputs({"suite_json": [str(p) for q in {src, bsrc} for p in (q, q.with_suffix(".tokens.safetensors"))]}, {"--out": args.out})
    d = json.loads(src.read_text())
    tokens = load_file(str(src.with_suffix(".tokens.safetensors")))
    db, btokens = (d, tokens) if bsrc == src else (json.loads(bsrc.read_text()), load_file(str(bsrc.with_suffix(".tokens.safetensors"))))
    if bsrc != src:  # the same scored tokens, or no pairing: the baselines' per-token NLLs must match
        import torch

        base = lambda x: {(q["domain"], q["protocol"]): q["index"] for q in x["points"] if q["method"] == "baseline"}  # noqa: E731
        ba, bb = base(d), base(db)
        for k in sorted(set(ba) & set(bb)):
            if not torch.equal(tokens[f"{ba[k]}.nll"], btokens[f"{bb[k]}.nll"]):
                raise SystemExit(f"{src} and {bsrc} did not score the same tokens ({k}: baseline NLLs differ)")
    if args.b_setting is None:
        key = lambda q: (q["domain"], q["protocol"], q["draw"], _budget(q["setting"]))  # noqa: E731
        bs = {key(q): q for q in db["points"] if q["method"] == args.b}
    else:
        key = lambda q: (q["domain"], q["protocol"], q["draw"])  # noqa: E731
        bs = {key(q): q for q in db["points"] if q["method"] == args.b and args.b_setting in q["setting"]}
    rows = []
    for qa in (q for q in d["points"] if q["method"] == args.a):
        qb = bs.get(key(qa)) or bs.get(key({**qa, "draw": None}))  # an uncalibrated B (a peer) has one point for every draw
        if qb is None:
            continue
        st = paired_block_bootstrap(btokens[f"{qb['index']}.nll"], tokens[f"{qa['index']}.nll"], block=args.block, n=args.resamples, seed=0)
        rows.append({"domain": qa["domain"], "protocol": qa["protocol"], "draw": qa["draw"], "a": qa["setting"], "b": qb["setting"],
                     "a_bits": qa["bits_per_value"]["payload"], "b_bits": qb["bits_per_value"]["payload"],
                     "delta_pct_a_vs_b": st.delta_pct, "ci95": [st.ci_low, st.ci_high], "verdict_for_a": st.verdict})
        print(f"{qa['domain']:6s} draw {qa['draw']} {qa['setting']:45s} vs {qb['setting']:28s}: {st.delta_pct:+6.2f} % "
              f"[{st.ci_low:+.2f}, {st.ci_high:+.2f}] {st.verdict}")
    if not rows:
        raise SystemExit(f"no matching points of {args.a!r} and {args.b!r} in {src}")
    out = {"kind": "kvsplice-paired", "source": str(src), "source_commit": d.get("commit"), "a": args.a, "b": args.b,
           "b_source": str(bsrc), "b_source_commit": db.get("commit"),
           "block": args.block, "resamples": args.resamples, "rows": rows}
    atomic_write_bytes(args.out, (json.dumps(out, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
