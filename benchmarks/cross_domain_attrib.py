"""Attribution of a cross-domain loss (issue 10): why a pca-q geometry fitted on corpus A codes
text of domain B worse than text of A.

For the geometry of `--cal` (pca-q, joint heads, `--bits`, the calibration of benchmarks/cross_domain.py,
so the same geometry as the matrix) and for K and V of every layer, on vectors collected from the
dev part of the calibration domain ("in") and of `--eval` ("out"), `--max-batches` windows each:

  sat      share of kept coefficients that hit their static clip (|y_i| > clip_i), mean over coefficients
  sat_max  the largest per-coefficient saturation rate
  e_ratio  mean over kept coefficients of E[y_i^2] / sigma_i^2 (sigma_i^2: the calibration variance
           the bit allocation and the clip were computed from; 1 = as assumed)
  e_drop   share of the (gain-normalised, centred) energy that falls in coefficients given 0 bits
  rel_mse  |x - x_hat|^2 / |x - mean_cal|^2 of the decoded vectors (the coding error, relative)

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/cross_domain_attrib.py --cal docs --eval prose \
        --bits 4 --out docs/results/cross-domain-attribution-dev.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cross_domain import CAL, make_calibration  # noqa: E402


def coefficient_stats(codec, x: torch.Tensor) -> dict[str, float]:
    """x: (N, D) vectors -> the statistics of the module docstring for one pca-q codec."""
    z = codec.warp.forward(x.float())
    u, _ = codec._normalise(z - codec.mean.float())
    y = u @ codec.rotation.float() - codec.ymean.float()  # (N, D) centred coefficients
    kept = codec.alloc > 0
    sat = (y.abs() > codec.clip_abs.float()).float().mean(0)[kept]  # (k,)
    e = y.pow(2).mean(0)  # (D,)
    xh = codec.decode(codec.encode(x))
    rel = float((x - xh).pow(2).sum() / (x - codec.mean.float()).pow(2).sum().clamp_min(1e-30))
    return {"sat": float(sat.mean()), "sat_max": float(sat.max()), "e": e, "e_drop": float(e[~kept].sum() / e.sum()),
            "rel_mse": rel}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cal", default="docs")
    ap.add_argument("--eval", default="prose")
    ap.add_argument("--bits", type=float, default=4.0)
    ap.add_argument("--max-batches", type=int, default=2)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from kvsplice.calibrate import CalibrationConfig, collect_layer_vectors, split_heads
    from kvsplice.evaluate.report import _atomic_write_bytes
    from kvsplice.loading import load_model
    from kvsplice.texts import part_text

    t0 = time.perf_counter()
    log = lambda s: print(f"[{time.perf_counter() - t0:6.0f} s] {s}", flush=True)  # noqa: E731
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    model.eval()
    cal = make_calibration(args.cal, model, tok, log)
    in_domain = "docs" if args.cal == "mix" else args.cal
    rows = []
    for target in ("k", "v"):
        geo = cal.geometry({"codec": "pca-q", "bits": args.bits, "target": target, "joint_heads": True, "sink": 1}, target)
        calx = split_heads(cal._collect(target), True)
        ev = {}
        for name, dom in (("in", in_domain), ("out", args.eval)):
            ccfg = CalibrationConfig.from_dict({**CAL, "max_batches": args.max_batches, "target": target})
            ev[name] = split_heads(collect_layer_vectors(model, tok, part_text(dom, "dev"), ccfg, progress=False), True)
        log(f"collected {target.upper()}")
        for (layer, h), codec in sorted(geo.codecs.items()):
            # sigma_i^2 as the fit computed it: variances of the calibration coefficients
            c = coefficient_stats(codec, calx[(layer, h)])
            row = {"target": target, "layer": layer}
            for name in ("in", "out"):
                s = coefficient_stats(codec, ev[name][(layer, h)])
                kept = codec.alloc > 0
                row[name] = {"sat": s["sat"], "sat_max": s["sat_max"], "e_drop": s["e_drop"], "rel_mse": s["rel_mse"],
                             "e_ratio": float((s["e"][kept] / c["e"][kept].clamp_min(1e-30)).mean()),
                             "e_ratio_max": float((s["e"][kept] / c["e"][kept].clamp_min(1e-30)).max())}
            row["cal"] = {"sat": c["sat"], "e_drop": c["e_drop"], "rel_mse": c["rel_mse"]}
            rows.append(row)
    doc = {"kind": "kvsplice-cross-domain-attribution", "cal": args.cal, "in_domain_eval": in_domain, "out_domain_eval": args.eval,
           "bits": args.bits, "split": "dev", "max_batches": args.max_batches, "calibration": CAL, "rows": rows}
    _atomic_write_bytes(Path(args.out), (json.dumps(doc, indent=1) + "\n").encode())
    print("target layer | sat in/out/cal | e_ratio in/out (max out) | e_drop in/out | rel_mse in/out")
    for r in rows:
        print(f"{r['target']} {r['layer']:2d} | {r['in']['sat']:.4f} {r['out']['sat']:.4f} {r['cal']['sat']:.4f} | "
              f"{r['in']['e_ratio']:.2f} {r['out']['e_ratio']:.2f} ({r['out']['e_ratio_max']:.1f}) | "
              f"{r['in']['e_drop']:.3f} {r['out']['e_drop']:.3f} | {r['in']['rel_mse']:.4f} {r['out']['rel_mse']:.4f}")
    log("done")


if __name__ == "__main__":
    main()
