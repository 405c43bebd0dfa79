"""Issue 13 lever 3 feasibility: would a non-uniform (Lloyd-Max) scalar quantiser per coefficient beat
pca-q's uniform midrise quantiser with fitted clips?

SmolLM2, docs calibration part (2 x 1,024 tokens), joint-head pca-q fitted per layer on the first
half of the sampled vectors; on the second half: the mean squared error of the rotated, gain-
normalised coefficients (dropped ones count their whole variance) under pca-q's own uniform codes vs
Lloyd-Max levels (1-D k-means from the uniform levels, 30 iterations, on the first half) with the
same bit allocation. Layers 2, 10, 20, 28.

    OMP_NUM_THREADS=1 nice .venv/bin/python benchmarks/lloyd_vs_uniform.py --out docs/results/lloyd-vs-uniform.json
"""

from __future__ import annotations

import argparse
import json

LAYERS = (2, 10, 20, 28)


def lloyd_levels(t, levels):
    """1-D Lloyd-Max from initial `levels` (L,) on samples t (N,)."""
    import torch

    lv = levels.clone()
    for _ in range(30):
        idx = torch.bucketize(t.contiguous(), ((lv[1:] + lv[:-1]) / 2).contiguous())
        for j in range(lv.numel()):
            m = idx == j
            if m.any():
                lv[j] = t[m].mean()
    return lv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    import torch

    from kvsplice.calibrate import CalibrationConfig, collect_layer_vectors, split_heads
    from kvsplice.codecs import get_codec
    from kvsplice.codecs.quant import midrise_codes, midrise_values
    from kvsplice.evaluate.suite import git_commit
    from kvsplice.loading import load_model
    from kvsplice.paths import atomic_write_bytes, check_outputs
    from kvsplice.texts import part_text

    check_outputs({}, {"--out": args.out})
    torch.set_num_threads(1)
    model, tok = load_model("smollm2-135m")
    res = {"kind": "kvsplice-lloyd-vs-uniform", "model": "smollm2-135m", **git_commit(), "layers": list(LAYERS), "ratio": {}}
    for target in ("v", "k"):
        ccfg = CalibrationConfig(target=target, samples=12000, max_batches=2, seq_len=1024)
        vec = split_heads(collect_layer_vectors(model, tok, part_text("docs", "calibration"), ccfg, progress=False), True)
        for bits in (2.0, 4.0):
            err_u = err_l = 0.0
            for l in LAYERS:
                x = vec[(l, -1)].float()
                n = x.shape[0] // 2
                c = get_codec("pca-q", bits=bits).fit(x[:n])
                fit_y = c._normalise(x[:n] - c.mean)[0] @ c.rotation - c.ymean  # (n, D)
                y = c._normalise(x[n:] - c.mean)[0] @ c.rotation - c.ymean
                for i in range(y.shape[1]):
                    b = int(c.alloc[i])
                    if b == 0:  # dropped: both quantisers lose the whole coefficient
                        e = float(y[:, i].pow(2).mean())
                        err_u, err_l = err_u + e, err_l + e
                        continue
                    L, clip = 1 << b, c.clip_abs[i : i + 1]
                    uq = midrise_values(midrise_codes(y[:, i : i + 1], clip, L), clip, L)[:, 0]
                    err_u += float((uq - y[:, i]).pow(2).mean())
                    lv = lloyd_levels(fit_y[:, i], midrise_values(torch.arange(L)[:, None], clip, L)[:, 0])
                    q = lv[torch.bucketize(y[:, i].contiguous(), ((lv[1:] + lv[:-1]) / 2).contiguous())]
                    err_l += float((q - y[:, i]).pow(2).mean())
            res["ratio"][f"{target}@{bits}"] = round(err_l / err_u, 4)
            print(f"{target.upper()} {bits} bits: held-out coefficient MSE, Lloyd-Max / uniform = {err_l / err_u:.3f}")
    atomic_write_bytes(args.out, (json.dumps(res, indent=1) + "\n").encode())


if __name__ == "__main__":
    main()
