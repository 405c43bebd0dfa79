"""Issue 13 lever 2 feasibility: how much of layer l's K (pre-RoPE) / V does layer l-1's explain?

Exact K/V of every layer on the same tokens (docs calibration part, 2 x 1,024 tokens, the sink row
dropped), a ridge-regularised affine map fitted on the first half of the rows, held-out R^2 =
1 - residual variance / variance on the second half, per layer (all KV heads jointly). An upper
bound for cross-layer prediction (AQUA-KV): a live coder predicts from the previous layer's DECODED
rows, which explains less. A coder that codes the residual saves about 0.5 * log2(1 / (1 - R^2))
bits per value at high rate for the same error.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/xlayer_r2.py --model smollm2-135m --out docs/results/xlayer-r2-smollm2.json
"""

from __future__ import annotations

import argparse
import json
import math


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--tokens", type=int, default=1024, help="tokens per window (2 windows)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from kvsplice.data import bos_id, tokenize, with_bos
    from kvsplice.evaluate.suite import git_commit
    from kvsplice.loading import load_model
    from kvsplice.models import get_adapter
    from kvsplice.paths import atomic_write_bytes, check_outputs
    from kvsplice.texts import part_text

    check_outputs({}, {"--out": args.out})
    torch.set_num_threads(1)
    model, tok = load_model(args.model)
    ad = get_adapter(model)
    T = args.tokens
    ids = with_bos(tokenize(tok, part_text("docs", "calibration")), T, bos_id(tok))[: 2 * T].reshape(2, T)
    out = {"kind": "kvsplice-xlayer-r2", "model": args.model, **git_commit(), "tokens": 2 * T, "r2": {}, "bits_saved_high_rate": {}}
    for target in ("k", "v"):
        got: dict[int, torch.Tensor] = {}

        def sink(l: int, x: torch.Tensor) -> None:  # x (B, H, T, D) -> (B*(T-1), H*D), sink row dropped
            got[l] = x[:, :, 1:].permute(0, 2, 1, 3).reshape(-1, x.shape[1] * x.shape[3]).float()

        with ad.capture(target, sink=sink, layers=list(range(ad.num_layers))), torch.no_grad():
            model(input_ids=ids, use_cache=False)
        r2 = []
        for l in range(1, ad.num_layers):
            X, Y = got[l - 1], got[l]
            n = X.shape[0] // 2
            Xa = torch.cat([X, torch.ones(X.shape[0], 1)], 1)  # affine
            A = Xa[:n]
            W = torch.linalg.solve(A.T @ A + 1e-3 * torch.eye(A.shape[1]), A.T @ Y[:n])
            res = Y[n:] - Xa[n:] @ W
            r2.append(round(float(1 - res.var(0).sum() / Y[n:].var(0).sum()), 4))
        out["r2"][target] = r2
        out["bits_saved_high_rate"][target] = [round(0.5 * math.log2(1 / max(1 - r, 1e-6)), 3) if r > 0 else 0.0 for r in r2]
        print(target.upper(), "held-out R^2, layers 1..:", " ".join(f"{r:.2f}" for r in r2))
    atomic_write_bytes(args.out, (json.dumps(out, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
