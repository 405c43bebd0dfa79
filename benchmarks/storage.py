"""Storage format on SmolLM2-135M (or --model gemma3-270m): bits/value of the packed file per coder, vs
the live cache and 16-bit; pack / unpack time vs recomputing the prefill (issue 13, lever 5).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/storage.py --out docs/results/storage-smollm2.json

Prompt: the first --tokens tokens of the docs evaluation text (kvsplice.data.evaluation_text), batch 1.
Recipes: --preset (best: pca-q; low-bit: xpred-pca-q) K+V joint heads sink 1 at each --bits,
calibrated by `kvsplice.calibrate_recipe` (default text: the domains mix).
bits/value = bytes x 8 / values held, values held = sum over layers of its rows x 2 x kv_heads x head_dim
(tokens x layers x 2 x kv_heads x head_dim without sliding layers; a sliding layer holds its window,
as a 16-bit hybrid DynamicCache does, so its saving is not counted as ours). Times: median of --reps runs,
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

import torch

import kvsplice
from kvsplice import data, entropy
from kvsplice.cache import model_layout
from kvsplice.loading import load_model
from kvsplice.paths import atomic_write_bytes
from kvsplice.storage import code_groups, load_packed, pack, read_header, values_held


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
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    layers, H, D = model_layout(model)
    ids = data.tokenize(tok, data.evaluation_text())[: args.tokens][None]  # (1, T)
    T = ids.shape[1]
    mask = torch.ones_like(ids)
    values = None  # values held, from the first prefilled cache
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
            values = sum(layer.length - layer.dropped for layer in cache.layers) * 2 * H * D
            row = {"recipe": recipe.describe(), "bits": bits, "live_bits_per_value": bpv(cache.memory().total_bytes),
                   "prefill_s": ts_prefill, "coders": {}}
            for coder in args.coders:
                path = Path(tmp) / f"{coder}.kvs"
                reps = args.reps if coder == "rans" else 1
                info, t_pack, ts_pack = timed(lambda: pack(cache, path, model=model, recipe=recipe, input_ids=ids,
                                                           attention_mask=mask, coder=coder), reps)
                stored, t_unpack, ts_unpack = timed(lambda: load_packed(path, model, recipe), reps)
                h, tensors = read_header(path)
                if values_held(h) != values:  # the live cache's count and the file's must agree
                    raise SystemExit(f"values held: live cache {values}, file header {values_held(h)}")
                code_bytes = sum(t.nbytes for k, t in tensors.items() if k.startswith("codes"))
                row["coders"][coder] = {
                    "file_bytes": info["file_bytes"], "stored_bits_per_value": bpv(info["file_bytes"]),
                    "code_stream_bits_per_value": bpv(code_bytes),
                    "pack_over_prefill": t_pack / t_prefill, "unpack_over_prefill": t_unpack / t_prefill,
                    "pack_s": ts_pack, "unpack_s": ts_unpack,
                }
                if coder == "rans":
                    groups = code_groups(h, tensors).values()  # full-attention rows, then sliding ones
                    row["codes_packed_bits_per_value"] = bpv(sum(a.shape[0] * int(w.sum()) for a, w in groups) / 8)
                    row["codes_entropy_bits_per_value"] = bpv(sum(entropy.entropy_bits(a, w) for a, w in groups) / 8)
                    row["rans_tables_bits_per_value"] = bpv(sum(t.nbytes for k, t in tensors.items() if k.endswith(".tables")))
                    nxt = torch.tensor([[tok.encode(" the")[0]]])
                    m2 = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], 1)
                    step = lambda c: model(input_ids=nxt, attention_mask=m2, position_ids=torch.tensor([[T]]), cache=c).logits  # noqa: E731
                    row["next_token_logits_identical"] = bool(torch.equal(step(prefill()), step(stored.cache)))
                print(json.dumps({"bits": bits, "coder": coder, **row["coders"][coder]}), file=sys.stderr, flush=True)
            rows.append(row)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    doc = {
        "config": {"model": args.model, "values_held": values, "preset": args.preset, "tokens": T, "batch": 1, "layers": layers, "kv_heads": H, "head_dim": D,
                   "text": data.describe_default("evaluation"), "reps": args.reps, "threads": 1,
                   "bits_per_value": "bytes * 8 / values held (sum over layers of rows held * 2 * kv_heads * head_dim)",
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
