"""Real-model check of the sliding-window CompressedCache on Gemma 3 270M (float32): identity V and
pre-RoPE K codecs with sink 1, <bos> + a 599-token prefill (past the 512 window) then 8 single-token
decode steps; max |logit diff| against transformers' hybrid DynamicCache, and the rows / bytes each
layer holds (a sliding layer: 511 rows, its sink copy freed; a global layer: every row + the sink).

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/gemma3_sliding_check.py --out docs/results/gemma3-sliding-check.json
"""

from __future__ import annotations

import argparse
import json

from gemma3_results import _write


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, default=600)
    ap.add_argument("--decode", type=int, default=8)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch
    from transformers import DynamicCache

    from kvsplice import texts
    from kvsplice.cache import CompressedCache, layer_windows
    from kvsplice.codecs import get_codec
    from kvsplice.data import bos_id, tokenize, with_bos
    from kvsplice.evaluate.suite import git_commit
    from kvsplice.geometry import Geometry
    from kvsplice.loading import load_model
    from kvsplice.models import get_adapter

    model, tok = load_model("gemma3-270m")
    ad = get_adapter(model)
    n = args.prefill + args.decode
    ids = with_bos(tokenize(tok, texts.part_text("docs", "test")), n + 1, bos_id(tok))[:n][None]  # (1, n)

    def identity(target):
        c = get_codec("identity").fit(torch.zeros(1, ad.head_dim))
        meta = {"target": target, "num_layers": str(ad.num_layers), "num_kv_heads": str(ad.num_kv_heads),
                "head_dim": str(ad.head_dim)}
        return Geometry(codecs={(l, h): c for l in range(ad.num_layers) for h in range(ad.num_kv_heads)}, meta=meta)

    def feed(cache):
        out = []
        with torch.no_grad():
            out.append(model(ids[:, : args.prefill], cache=cache, use_cache=True).logits[:, -1:])
            for t in range(args.prefill, n):
                out.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
        return torch.cat(out, 1)

    ref = feed(DynamicCache(config=model.config))
    cache = CompressedCache.from_geometry(model, identity("v"), identity("k"), sink=1)
    got = feed(cache)
    row = ad.num_kv_heads * ad.head_dim * 4  # one float32 row, all KV heads
    layers = []
    for l, w in enumerate(layer_windows(model)):
        m = cache.layers[l].memory()
        layers.append({"layer": l, "window": w, "k_rows": m["k_bytes"] // row, "v_rows": m["v_bytes"] // row,
                       "sink_rows_exact": m["window_bytes"] // (2 * row)})
    res = {"kind": "kvsplice-gemma3-sliding-check", "model": "gemma3-270m", "dtype": "float32", **git_commit(),
           "config": vars(args), "tokens": n, "max_abs_logit_diff": float((got - ref).abs().max()),
           "argmax_equal": bool(torch.equal(got.argmax(-1), ref.argmax(-1))),
           "memory": cache.memory().as_dict(), "layers": layers}
    _write(__import__("pathlib").Path(args.out), res)
    print(json.dumps({k: res[k] for k in ("max_abs_logit_diff", "argmax_equal")}), json.dumps(layers[:6]))


if __name__ == "__main__":
    main()
