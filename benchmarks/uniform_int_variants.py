"""The per-token int8 / int4 peer (uniform-int) on the default frontier protocol, and the variants
that could explain a different re-measurement (docs/PEERS.md, "int4 / int8 rows"). SmolLM2-135M,
float32, prefill 512 + 128 scored tokens in chunks of 16, 3 segments, 1 thread.

    --part segments  baseline / int8 / int4 with per-segment perplexity from the per-token NLL
                     (first 2 segments = the tokens the --quick protocol scores)
    --part variants  int8 / int4 with the first token kept exact (sink = 1) and with K coded
                     before RoPE (as our transform coders do; the peer codes K after RoPE)

    .venv/bin/python benchmarks/uniform_int_variants.py --part segments --json docs/results/peers-int-segments.json
    .venv/bin/python benchmarks/uniform_int_variants.py --part variants --json docs/results/peers-int-variants.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

import torch

PROTOCOL = dict(prefill=512, continue_tokens=128, chunk=16, segments=3, batch_size=3)


def segments(model, ids) -> dict:
    from transformers import DynamicCache

    from kvsplice.evaluate.perplexity import perplexity_prefill_continue
    from kvsplice.peers import get_peer

    out = {}
    for name, make in (("baseline", DynamicCache), ("int8", get_peer("uniform-int", bits=8).cache_factory(model)),
                       ("int4", get_peer("uniform-int", bits=4).cache_factory(model))):
        r = perplexity_prefill_continue(model, ids, make, **PROTOCOL)
        nll = r.token_nll.double()  # (segments, continue_tokens)
        out[name] = {"ppl_3seg": round(r.ppl, 4), "ppl_first2": round(math.exp(float(nll[:2].mean())), 4),
                     "ppl_per_segment": [round(math.exp(float(x)), 4) for x in nll.mean(1)]}
        print(name, out[name], flush=True)
    return out


def variants(model, ids) -> list:
    from kvsplice.cache import CompressedCache, model_layout
    from kvsplice.evaluate.perplexity import perplexity_prefill_continue
    from kvsplice.kcodec import PreRopeLayerCodec
    from kvsplice.peers.uniform import uniform_layer_codecs
    from kvsplice.rope import layer_rotary

    layers, out = model_layout(model)[0], []
    for bits in (8, 4):
        c = uniform_layer_codecs(model, bits)
        shared: dict = {}
        kc = [PreRopeLayerCodec(c[l], layer_rotary(model, l, shared)) for l in range(layers)]
        for name, make in ((f"int{bits} sink=1", lambda: CompressedCache(layers, v_codecs=c, k_codecs=c, sink=1)),
                           (f"int{bits} K coded before RoPE", lambda: CompressedCache(layers, v_codecs=c, k_codecs=kc))):
            r = perplexity_prefill_continue(model, ids, make, **PROTOCOL)
            out.append({"variant": name, "ppl": round(r.ppl, 4), "kv_bytes_per_token": r.kv_bytes_per_token, "protocol": PROTOCOL})
            print(name, round(r.ppl, 4), flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("segments", "variants"), required=True)
    ap.add_argument("--json", required=True)
    a = ap.parse_args(argv)
    from kvsplice.data import evaluation_text, tokenize
    from kvsplice.loading import load_model

    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m", dtype=torch.float32)
    ids = tokenize(tok, evaluation_text())
    res = segments(model, ids) if a.part == "segments" else variants(model, ids)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(a.json)), suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, a.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
