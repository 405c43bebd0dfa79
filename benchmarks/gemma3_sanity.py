"""Sanity check of the second real model: perplexity of the uncompressed Gemma 3 270M (float32,
DynamicCache) on the first 512 tokens of the pydoc evaluation split, with and without a leading
<bos> (the same 511 targets are scored in both). Gemma is trained with <bos> first; kvsplice.data
tokenizes without special tokens, so the no-<bos> number is what the evaluation protocols see today.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gemma3_sanity.py [--out docs/results/gemma3_270m_sanity.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--out", default="docs/results/gemma3_270m_sanity.json")
    args = ap.parse_args()

    from kvsplice.data import describe_default, evaluation_text, tokenize
    from kvsplice.loading import load_model

    model, tok = load_model("gemma3-270m")
    ids = tokenize(tok, evaluation_text())[: args.tokens]  # (T,)
    res = {"model": "gemma3-270m", "dtype": "float32", "cache": "DynamicCache", "tokens": int(ids.numel()),
           "text": describe_default("evaluation"), "scored_targets": int(ids.numel()) - 1}
    for name, x in (("no_bos", ids), ("bos", torch.cat([torch.tensor([tok.bos_token_id]), ids]))):
        with torch.no_grad():
            logits = model(x[None]).logits[0, :-1].float()  # (T', V): predictions of x[1:]
        skip = 1 if name == "bos" else 0  # with <bos>, drop the prediction of ids[0]: same targets in both
        nll = torch.nn.functional.cross_entropy(logits[skip:], x[1 + skip :])
        res[f"ppl_{name}"] = round(math.exp(nll.item()), 3)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", dir=out.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(res, f, indent=2, sort_keys=True)
    os.replace(tmp, out)
    print(json.dumps(res))


if __name__ == "__main__":
    main()
