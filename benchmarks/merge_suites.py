"""One frontier figure from several suite runs on the SAME split, model and protocol (e.g. the quick
suite's peers beside the low-bit levers): refuses runs whose baselines differ (other tokens), merges
their summary rows (the first file wins on a duplicate (domain, method, setting)) and plots them with
kvsplice's suite plot. Writes the merged JSON (summary rows + the sources and their commits) too.

    python benchmarks/merge_suites.py docs/results/low-bits-test.json docs/results/suite-quick-test.json \
        --headline xpred pca-q kivi --json docs/results/low-bits-with-peers-test.json --plot docs/results/low-bits-with-peers-test.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("suites", nargs="+", help="suite JSON files (status complete)")
    ap.add_argument("--headline", nargs="*", default=[], help="methods whose points are labelled")
    ap.add_argument("--json", required=True)
    ap.add_argument("--plot", required=True)
    ap.add_argument("--title", default=None)
    args = ap.parse_args()

    from kvsplice.errors import KVSpliceError
    from kvsplice.evaluate.frontier_plot import plot_suite_json
    from kvsplice.evaluate.suite import check_complete
    from kvsplice.paths import atomic_write_bytes, check_outputs

    check_outputs({"suites": args.suites}, {"--json": args.json, "--plot": args.plot})
    runs = [json.loads(Path(p).read_text()) for p in args.suites]
    first = runs[0]
    for p, r in zip(args.suites, runs):
        check_complete(r)
        for k in ("split", "model"):
            if r[k] != first[k]:
                raise KVSpliceError(f"{p}: {k} {r[k]!r} differs from {args.suites[0]}'s {first[k]!r}")
        for d, dom in r["domains"].items():
            if d in first["domains"]:
                for proto, b in dom["baseline"].items():
                    a = first["domains"][d]["baseline"].get(proto)
                    if a is not None and (a["tokens"] != b["tokens"] or abs(a["ppl"] - b["ppl"]) > 1e-6 * a["ppl"]):
                        raise KVSpliceError(f"{p}: {d} {proto} baseline {b} differs from {a}: not the same tokens")
    seen, rows = set(), []
    for r in runs:
        for row in r["summary"]:
            key = (row["domain"], row["method"], row["setting"])
            if key not in seen:
                seen.add(key)
                rows.append(row)
    merged = {"kind": "kvsplice-suite-merged", "split": first["split"], "model": first["model"], "status": "complete",
              "sources": [{"file": p, "commit": r.get("commit"), "dirty": r.get("dirty")} for p, r in zip(args.suites, runs)],
              "domains": first["domains"], "config": {"headline": args.headline}, "summary": rows}
    atomic_write_bytes(args.json, (json.dumps(merged, indent=1) + "\n").encode())
    plot_suite_json(args.plot, merged, title=args.title)
    print(f"{len(rows)} rows from {len(runs)} runs -> {args.json}, {args.plot}")


if __name__ == "__main__":
    main()
