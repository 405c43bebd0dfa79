"""Issue 8 §1 on the real default model (SmolLM2-135M): left-padded batches with a K geometry, the sink
in a padded batch, and the bf16 pre-RoPE K round trip. Prints one JSON object.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/padding_check.py [--out results/padding_check.json]

(1) calibrates pca-q 4-bit joint-head V and K geometries on a slice of the calibration text, then
    greedy-generates two prompts of different lengths left-padded in one batch and each alone
    (CompressedCache sink=1): the continuations must match; and the teacher-forced NLL of 192 tokens
    alone and left-padded by 64 (DynamicCache beside them). (2) bf16 model, identity K codec through
    the pre-RoPE path: max |logit difference| against DynamicCache.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import DynamicCache

    from kvsplice.cache import CompressedCache, LayerCodec, model_layout
    from kvsplice.calibrate import CalibrationConfig, calibrate
    from kvsplice.codecs import get_codec
    from kvsplice.data import calibration_text
    from kvsplice.kcodec import PreRopeLayerCodec, find_rotary  # (runs on the pre-fix code too, for comparison)
    from kvsplice.loading import load_model

    torch.manual_seed(0)
    model, tok = load_model("smollm2-135m")
    text = calibration_text()[:60000]
    geo = {t: calibrate(model, tok, text, CalibrationConfig(codec="pca-q", codec_params={"bits": 4}, target=t,
                                                          joint_heads=True, seq_len=256, max_batches=8,
                                                          fit_samples_per_dim=None), progress=False)
           for t in ("v", "k")}
    make = lambda: CompressedCache.from_geometry(model, v_geometry=geo["v"], k_geometry=geo["k"], sink=1)  # noqa: E731
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived an old"]
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    kw = dict(max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    with torch.no_grad():
        padded = model.generate(**batch, cache=make(), **kw)[:, batch.input_ids.shape[1]:]
        alone = [model.generate(**tok([p], return_tensors="pt"), cache=make(), **kw)[0, -12:] for p in prompts]
    rows = [{"prompt": p, "padded": tok.decode(padded[i]), "alone": tok.decode(alone[i]),
             "identical": padded[i].tolist() == alone[i].tolist()} for i, p in enumerate(prompts)]

    # teacher-forced NLL of 192 real tokens, alone and left-padded by 64 beside a full-length row
    ids = tok(text[-20000:], return_tensors="pt").input_ids[:, :448]
    real, other = ids[:, :192], ids[:, 192:448]
    pad = torch.full((1, 64), tok.pad_token_id or 0)
    batch_ids = torch.cat([torch.cat([pad, real], 1), other], 0)
    mask = torch.cat([torch.cat([torch.zeros(1, 64), torch.ones(1, 192)], 1), torch.ones(1, 256)], 0).long()
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)

    def nll(logits: torch.Tensor, target: torch.Tensor) -> float:
        return float(torch.nn.functional.cross_entropy(logits[0, :-1].float(), target[0, 1:]))

    with torch.no_grad():
        nll_alone = nll(model(real, cache=make(), use_cache=True).logits, real)
        out = model(batch_ids, attention_mask=mask, position_ids=pos, cache=make(), use_cache=True).logits
        nll_padded = nll(out[:1, 64:], real)
        nll_dynamic = nll(model(real, cache=DynamicCache(config=model.config), use_cache=True).logits, real)
    teacher = {"tokens": 192, "pad": 64, "nll_dynamic_cache": nll_dynamic, "nll_alone": nll_alone,
               "nll_left_padded": nll_padded}

    model16 = model.to(torch.bfloat16)
    L, H, D = model_layout(model16)
    ident = LayerCodec([get_codec("identity").fit(torch.zeros(1, D))] * H)
    k = [PreRopeLayerCodec(ident, find_rotary(model16)) for _ in range(L)]  # SmolLM2: one rotary table
    ids = tok(text[:2000], return_tensors="pt").input_ids[:, :128]
    with torch.no_grad():
        ref = model16(ids, cache=DynamicCache(config=model16.config), use_cache=True).logits.float()
        got = model16(ids, cache=CompressedCache(L, k_codecs=k), use_cache=True).logits.float()
    result = {"model": "smollm2-135m", "left_padded_vs_alone": rows, "teacher_forced_nll": teacher,
              "bf16_identity_k_max_abs_logit_diff": float((got - ref).abs().max())}
    out = json.dumps(result, indent=1)
    print(out)
    if args.out:
        d = os.path.dirname(os.path.abspath(args.out))
        os.makedirs(d, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=d, delete=False, suffix=".tmp") as f:
            f.write(out + "\n")
        os.chmod(f.name, 0o644)
        os.replace(f.name, args.out)


if __name__ == "__main__":
    main()
