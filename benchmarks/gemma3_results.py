"""Gemma 3 270M (issue 11 item 5, small run): teacher-forced perplexity of compressed caches vs the
uncompressed DynamicCache on the docs domain's test part, with paired block-bootstrap 95 % CIs.

One process, the model loaded once (float32). Every window starts with <bos> (Gemma's tokenizer adds
one by default: kvsplice.data.bos_id / with_bos; the BOS is context only, never a target). Rows:
  baseline  DynamicCache
  pca-q 4-bit K+V joint heads sink 1, pca-q 2-bit K+V sink 1 and sink 0 (same geometry, sink toggled)
  seed V20-type: spline-pca rank 64 of 256 on V only (the seed's 64->16 ratio), sink 0
Calibration: kvsplice.api.calibrate_recipe on the default calibration split (= the docs domain's
calibration part), --max-batches batches of 1024 tokens. bits/value: 8 * measured cache bytes per
token / (2 * layers * KV heads * head_dim) (everything the cache holds; sliding layers hold <= window).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/gemma3_results.py --out docs/results/gemma3-tf-docs-test.json
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path


def _write(path: Path, res: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(res, f, indent=2)
    os.replace(tmp, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="gemma3-270m")
    ap.add_argument("--tokens", type=int, default=2048, help="evaluation tokens (windows of --window)")
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--max-batches", type=int, default=4)
    ap.add_argument("--rows", default="q4,q2,q2s0,v20", help="comma list of q4,q2,q2s0,v20")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from transformers import DynamicCache

    from kvsplice import texts
    from kvsplice.api import calibrate_recipe
    from kvsplice.cache import model_layout
    from kvsplice.data import bos_id, tokenize, with_bos
    from kvsplice.evaluate.perplexity import perplexity_teacher_forced
    from kvsplice.evaluate.stats import compare
    from kvsplice.evaluate.suite import git_commit
    from kvsplice.loading import load_model

    t0 = time.time()
    model, tok = load_model(args.model)
    L, H, D = model_layout(model)
    bos = bos_id(tok)
    n_win = args.tokens // args.window
    ids = with_bos(tokenize(tok, texts.part_text("docs", "test")), args.window, bos)[: n_win * args.window]
    out = Path(args.out)
    res = {"kind": "kvsplice-gemma3-small", "model": args.model, "dtype": "float32", **git_commit(),
           "config": {**vars(args), "protocol": "teacher-forced", "bos": bos, "domain": "docs", "part": "test",
                      "calibration": "kvsplice.api.calibrate_recipe, default calibration split, seq_len 1024",
                      "bootstrap": "kvsplice.evaluate.stats.compare defaults (block 64, 2000 resamples, seed 0)",
                      "layout": {"layers": L, "kv_heads": H, "head_dim": D}},
           "text": texts.part_info("docs", "test"), "load_seconds": round(time.time() - t0, 1), "rows": []}
    values_per_token = 2 * L * H * D

    def tf(name, make):
        return perplexity_teacher_forced(model, ids, make, window=args.window, name=name)

    base = tf("DynamicCache", lambda: DynamicCache(config=model.config))

    def add(row, method, extra):
        d = row.as_json()
        d.update(method=method, bits_per_value=8 * row.kv_bytes_per_token / values_per_token, **extra)
        if row is not base:
            d["vs_baseline"] = compare(base.token_nll, row.token_nll)
        res["rows"].append(d)
        _write(out, res)
        print(json.dumps({k: d[k] for k in ("method", "ppl", "bits_per_value")} | {"vs": d.get("vs_baseline")}), flush=True)

    add(base, "DynamicCache (16-bit reference; float32 run)", {})
    want = args.rows.split(",")
    for bits, tags in ((4, ["q4"]), (2, ["q2", "q2s0"])):
        if not any(t in want for t in tags):
            continue
        t = time.time()
        rec = calibrate_recipe(model, tok, preset="best", bits=bits, sink=1, max_batches=args.max_batches)
        cal_s = round(time.time() - t, 1)
        for tag, sink in zip(tags, (1, 0)):
            if tag in want:
                row = tf(f"pca-q {bits}-bit K+V sink {sink}", lambda: rec.cache(model, sink=sink))
                add(row, f"pca-q {bits}-bit K+V joint sink {sink}", {"calibration_seconds": cal_s, "sink": sink})
    if "v20" in want:
        t = time.time()
        rec = calibrate_recipe(model, tok, preset="seed", rank=64, sink=0, max_batches=args.max_batches)
        cal_s = round(time.time() - t, 1)
        row = tf("spline-pca rank 64 V", lambda: rec.cache(model))
        add(row, "seed V20-type: spline-pca rank 64/256, V only", {"calibration_seconds": cal_s, "sink": 0})
    res["seconds"] = round(time.time() - t0, 1)
    res["status"] = "complete"
    _write(out, res)


if __name__ == "__main__":
    main()
