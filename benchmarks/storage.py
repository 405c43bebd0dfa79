"""Storage format on SmolLM2-135M: bits/value of the packed file per coder, vs the live cache and
16-bit; pack / unpack time vs recomputing the prefill (issue 13, lever 5).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/storage.py --out docs/results/storage-smollm2.json

Prompt: the first --tokens tokens of the docs evaluation text (kvsplice.data.evaluation_text), batch 1.
Recipes: --preset (best: pca-q; low-bit: xpred-pca-q) K+V joint heads sink 1 at each --bits,
calibrated by `kvsplice.calibrate_recipe` (default text: the domains mix).
bits/value = bytes x 8 / (tokens x layers x 2 x kv_heads x head_dim). Times: median of --reps runs,
reported as ratios to the prefill time (shared 2-core CPU: absolute seconds are not comparable).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import kvsplice
from kvsplice import data, entropy
from kvsplice.cache import model_layout
from kvsplice.loading import load_model
from kvsplice.paths import atomic_write_bytes
from kvsplice.storage import load_packed, pack, read_header


def timed(fn, reps):
    out, ts = None, []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        ts.append(time.perf_counter() - t0)
    return out, statistics.median(ts), ts


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--bits", type=float, nargs="+", default=[4, 2])
    ap.add_argument("--preset", default="best", help="recipe preset: best (pca-q) or low-bit (xpred-pca-q)")
    ap.add_argument("--coders", nargs="+", default=["rans", "zlib", "lzma"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    layers, H, D = model_layout(model)
    ids = data.tokenize(tok, data.evaluation_text())[: args.tokens][None]  # (1, T)
    T = ids.shape[1]
    mask = torch.ones_like(ids)
    values = T * layers * 2 * H * D
    bpv = lambda nbytes: nbytes * 8 / values  # noqa: E731
    rows = []
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        for bits in args.bits:
            recipe = kvsplice.calibrate_recipe(model, tok, preset=args.preset, bits=bits)

            def prefill():
                c = recipe.cache(model)
                model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(T)[None], cache=c)
                return c

            cache, t_prefill, ts_prefill = timed(prefill, args.reps)
            row = {"recipe": recipe.describe(), "bits": bits, "live_bits_per_value": bpv(cache.memory().total_bytes),
                   "prefill_s": ts_prefill, "coders": {}}
            for coder in args.coders:
                path = Path(tmp) / f"{coder}.kvs"
                reps = args.reps if coder == "rans" else 1
                info, t_pack, ts_pack = timed(lambda: pack(cache, path, model=model, recipe=recipe, input_ids=ids,
                                                           attention_mask=mask, coder=coder), reps)
                stored, t_unpack, ts_unpack = timed(lambda: load_packed(path, model, recipe), reps)
                h, tensors = read_header(path)
                code_bytes = sum(t.nbytes for k, t in tensors.items() if k.startswith("codes."))
                row["coders"][coder] = {
                    "file_bytes": info["file_bytes"], "stored_bits_per_value": bpv(info["file_bytes"]),
                    "code_stream_bits_per_value": bpv(code_bytes),
                    "pack_over_prefill": t_pack / t_prefill, "unpack_over_prefill": t_unpack / t_prefill,
                    "pack_s": ts_pack, "unpack_s": ts_unpack,
                }
                if coder == "rans":
                    widths = np.asarray([b for e in h["entries"] if e["codes"] for w in e["codes"]["widths"]
                                         for b in w if b > 0], dtype=np.int64)
                    arrays = {k[6:]: t.numpy() for k, t in tensors.items() if k.startswith("codes.")}
                    sym = entropy.decode("rans", arrays, h["code_rows"], widths)
                    row["codes_packed_bits_per_value"] = bpv(sym.shape[0] * int(widths.sum()) / 8)
                    row["codes_entropy_bits_per_value"] = bpv(entropy.entropy_bits(sym, widths) / 8)
                    row["rans_tables_bits_per_value"] = bpv(tensors["codes.tables"].nbytes)
                    nxt = torch.tensor([[tok.encode(" the")[0]]])
                    m2 = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
                    la = model(input_ids=nxt, attention_mask=m2, position_ids=torch.tensor([[T]]), cache=cache).logits
                    lb = model(input_ids=nxt, attention_mask=m2, position_ids=torch.tensor([[T]]), cache=stored.cache).logits
                    row["next_token_logits_identical"] = bool(torch.equal(la, lb))
                    cache.crop(-1)  # back to the prompt (window 0, no pruner: exact)
                print(json.dumps({"bits": bits, "coder": coder, **row["coders"][coder]}), file=sys.stderr, flush=True)
            rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {
        "config": {"model": "smollm2-135m", "preset": args.preset, "tokens": T, "batch": 1, "layers": layers, "kv_heads": H, "head_dim": D,
                   "text": data.describe_default("evaluation"), "reps": args.reps, "threads": 1,
                   "bits_per_value": "bytes * 8 / (tokens * layers * 2 * kv_heads * head_dim)",
                   "sixteen_bit_bits_per_value": 16.0,
                   "timing": "median seconds; ratios to the prefill through the recipe's cache (what a reuse saves)",
                   "command": "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/storage.py " + " ".join(sys.argv[1:])},
        "commit": commit, "machine": f"{platform.machine()} shared 2-core CPU, 1 thread", "rows": rows,
    }
    atomic_write_bytes(Path(args.out), (json.dumps(doc, indent=2) + "\n").encode())
    print(json.dumps(doc, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
