"""Quality of the two K options of the coded attention: pca-q on K BEFORE RoPE (decoded, then
RoPE'd: today's default) versus AFTER RoPE (scores computed from the codes). Teacher-forced
perplexity of SmolLM2-135M on a held-out window, V coded the same way in both, sink=1.

    OMP_NUM_THREADS=1 nice -n 5 .venv/bin/python benchmarks/k_rope_quality.py [--bits 4 2] [--tokens 1024]
        [--json docs/results/k_rope_quality.json]

Codecs: joint pca-q per layer fitted on the first 2048 tokens of the evaluation text
(decode_speed.fit_codecs); evaluated on the next `--tokens` tokens (held out). One forward per
setting through a CompressedCache: every row is read through its codec, as decoding does.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_speed import _write_json, fit_codecs  # noqa: E402


def nll(model, ids: torch.Tensor, cache) -> float:
    with torch.no_grad():
        logits = model(ids, past_key_values=cache).logits[0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, nargs="+", default=[4.0, 2.0])
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json", default="docs/results/k_rope_quality.json")
    args = ap.parse_args(argv)
    from transformers import DynamicCache

    from kvsplice.cache import CompressedCache, model_layout
    from kvsplice.data import evaluation_text, tokenize
    from kvsplice.loading import load_model, model_id

    model, tokenizer = load_model("smollm2-135m")
    L = model_layout(model)[0]
    ids = tokenize(tokenizer, evaluation_text())[2048 : 2048 + args.tokens][None]
    codecs, _ = fit_codecs(model, tokenizer, args.bits)
    base = nll(model, ids, DynamicCache())
    out = {"model": model_id(model), "tokens": int(ids.shape[1]), "ppl": {"DynamicCache": math.exp(base)}}
    for bits, c in codecs.items():
        for name, k in (("K before RoPE", c["k_pre"]), ("K after RoPE", c["k_post"])):
            ppl = math.exp(nll(model, ids, CompressedCache(L, v_codecs=c["v"], k_codecs=k, sink=1)))
            out["ppl"][f"pca-q {bits:g}-bit K+V sink=1, {name}"] = ppl
            print(f"pca-q {bits:g}-bit, {name}: ppl {ppl:.3f} (DynamicCache {math.exp(base):.3f})", flush=True)
    _write_json(out, Path(args.json))
    return 0


if __name__ == "__main__":
    sys.exit(main())
