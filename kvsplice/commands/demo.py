"""`kvsplice demo` (what `make demo` runs; a few minutes on 2 CPU cores): calibrate the best measured
recipe (pca-q 4-bit, joint heads, K and V, 1 exact sink token) and the seed's Spline->PCA (V, rank
16, per head) on SmolLM2-135M, then put them beside `DynamicCache` on the evaluation split:

  * quality: teacher-forced perplexity (one forward per window through a fresh cache: exact for
    these per-token codecs), Δppl vs DynamicCache with a 95 % paired block-bootstrap interval;
  * bytes: K + V held per token, all overheads, vs the model dtype and vs a 16-bit cache;
  * speed: greedy decoding tokens/s of the same prompt through each cache (one run each: a ratio);
  * one generated sample through the recipe.

Writes results/demo/demo.json and the recipe folder results/demo/recipe/. The seed's full inference
ablation (V0/V19/V20, ~20 min) is `kvsplice ablate --config configs/smollm2-kv-ablation.toml`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from kvsplice.commands.common import add_device_args, load_model_for
from kvsplice.errors import KVSpliceError

ABLATION_CONFIG = "configs/smollm2-kv-ablation.toml"
SAMPLE_PROMPT = "Python's with statement is used to"


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="calibrate the best recipe and compare it with DynamicCache and the seed (minutes)",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local HF folder, or a hub id")
    p.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    p.add_argument("--calib-batches", type=int, default=4, help="calibration windows of 1024 tokens (default 4)")
    p.add_argument("--windows", type=int, default=2, help="teacher-forced evaluation windows (default 2)")
    p.add_argument("--window", type=int, default=1024, help="tokens per evaluation window (default 1024)")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens generated for the speed runs and the sample (default 24)")
    p.add_argument("--no-seed", action="store_true", help="skip the seed's Spline->PCA row (saves ~1 min)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_args(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch
    from transformers import DynamicCache

    from kvsplice import data
    from kvsplice.api import calibrate_recipe
    from kvsplice.cache import model_layout
    from kvsplice.evaluate.perplexity import perplexity_teacher_forced
    from kvsplice.evaluate.stats import paired_block_bootstrap
    from kvsplice.loading import model_id
    from kvsplice.paths import atomic_write_bytes

    for name in ("calib_batches", "windows", "window", "new_tokens"):
        if getattr(args, name) < 1:
            raise KVSpliceError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    from kvsplice.paths import check_outputs

    check_outputs({}, {}, folders={"--out": out})  # before the model loads
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:5.0f} s] {msg}", file=sys.stderr, flush=True)

    model, tok = load_model_for(args)
    L, H, D = model_layout(model)
    values_per_token = 2 * L * H * D  # K and V values cached per token
    elem = torch.finfo(model.dtype).bits // 8

    # -- calibrate ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    recipe = calibrate_recipe(model, tok, max_batches=args.calib_batches, progress=not args.quiet)
    recipe.save(out / "recipe")
    log(f"calibrated {recipe.describe()} on {recipe.v.meta['tokens']} tokens in {time.perf_counter() - t0:.0f} s "
        f"-> {out / 'recipe'}")
    makers = {"DynamicCache": DynamicCache, "best recipe": lambda: recipe.cache(model)}
    labels = {"DynamicCache": f"DynamicCache ({str(model.dtype).removeprefix('torch.')})",
              "best recipe": "pca-q 4-bit K+V, sink 1 (ours)"}
    if not args.no_seed:
        t0 = time.perf_counter()
        # the seed's codec and rank, fitted on 500 vectors per latent dim (the seed: ~2000) to fit the budget
        seed = calibrate_recipe(model, tok, preset="seed", max_batches=args.calib_batches, fit_samples_per_dim=500,
                                progress=not args.quiet)
        log(f"calibrated the seed's {seed.describe()} in {time.perf_counter() - t0:.0f} s")
        makers["seed"] = lambda: seed.cache(model)
        labels["seed"] = "the seed: spline-pca V 64->16"

    # -- quality and bytes ---------------------------------------------------------------------------
    data.refuse_bos_tokenizer(tok, "kvsplice demo")
    ids = data.tokenize(tok, data.evaluation_text())
    rows = {}
    for name, make in makers.items():
        rows[name] = perplexity_teacher_forced(model, ids, make, window=args.window, max_windows=args.windows, name=name)
        log(f"{name}: ppl {rows[name].ppl:.3f} ({rows[name].seconds:.0f} s)")
    base = rows["DynamicCache"]
    for name, r in rows.items():
        if not torch.isfinite(torch.tensor(r.ppl)):
            raise KVSpliceError(f"{name}: perplexity is not finite ({r.ppl}); refusing to report it")

    # -- speed and a sample --------------------------------------------------------------------------
    device = next(model.parameters()).device
    prompt_ids = ids[: min(128, args.window // 2)].unsqueeze(0).to(device)  # (1, T) of the evaluation text
    speed, samples = {}, {}
    sample_enc = tok(SAMPLE_PROMPT, return_tensors="pt").to(device)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for name, make in makers.items():
        with torch.no_grad():
            t0 = time.perf_counter()
            g = model.generate(input_ids=prompt_ids, attention_mask=torch.ones_like(prompt_ids), cache=make(),
                               max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
                               pad_token_id=pad)
            speed[name] = (g.shape[1] - prompt_ids.shape[1]) / (time.perf_counter() - t0)
            if name != "seed":  # the sample: ours beside DynamicCache
                s = model.generate(**sample_enc, cache=make(), max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=pad)
                samples[name] = tok.decode(s[0, sample_enc["input_ids"].shape[1]:], skip_special_tokens=True)
    log("decode speed measured")

    # -- report --------------------------------------------------------------------------------------
    table = []
    for name, r in rows.items():
        d = None if name == "DynamicCache" else paired_block_bootstrap(base.token_nll, r.token_nll, block=64, n=2000)
        bits = 8 * r.kv_bytes_per_token / values_per_token
        table.append({
            "row": labels[name], "ppl": r.ppl, "delta_pct": None if d is None else d.delta_pct,
            "ci95": None if d is None else [d.ci_low, d.ci_high],
            "kv_bytes_per_token": r.kv_bytes_per_token, "bits_per_value": bits,
            "vs_model_dtype_pct": 100 * r.kv_bytes_per_token / (values_per_token * elem),
            "vs_16bit_pct": 100 * r.kv_bytes_per_token / (values_per_token * 2),
            "tokens_per_s": speed[name], "speed_vs_dynamic": speed[name] / speed["DynamicCache"],
        })
    print(f"\n{model_id(model)}: {base.tokens} evaluation tokens, teacher-forced ({args.windows} x {args.window}); "
          f"Δppl 95 % CI: paired block bootstrap (64-token blocks)")
    head = f"{'cache':34} {'ppl':>7} {'Δppl':>8} {'95 % CI':>17} {'bits/val':>8} {'vs fp16':>8} {'tok/s':>6} {'speed':>6}"
    print(head + "\n" + "-" * len(head))
    for t in table:
        ci = "" if t["ci95"] is None else f"[{t['ci95'][0]:+.2f}, {t['ci95'][1]:+.2f}]"
        dp = "" if t["delta_pct"] is None else f"{t['delta_pct']:+.2f}%"
        print(f"{t['row']:34} {t['ppl']:7.3f} {dp:>8} {ci:>17} {t['bits_per_value']:8.2f} {t['vs_16bit_pct']:7.1f}% "
              f"{t['tokens_per_s']:6.1f} {t['speed_vs_dynamic']:5.2f}x")
    print(f"(bytes: K+V held per token, every overhead counted, {table[1]['kv_bytes_per_token']:.0f} vs "
          f"{base.kv_bytes_per_token:.0f} B/token for {str(model.dtype).removeprefix('torch.')}; tok/s: one greedy run of "
          f"{args.new_tokens} tokens after a {prompt_ids.shape[1]}-token prompt, prefill included: a ratio on a shared machine)")
    print(f"\nsample through the best recipe: {SAMPLE_PROMPT!r} ->\n  {samples['best recipe'].strip()!r}")
    if samples["best recipe"] != samples["DynamicCache"]:
        print(f"  DynamicCache gives: {samples['DynamicCache'].strip()!r}")
    else:
        print("  (identical to DynamicCache's greedy continuation)")
    result = {
        "model": model_id(model), "dtype": str(model.dtype), "device": str(device), "recipe": recipe.describe(),
        "eval": {"protocol": "teacher-forced", "window": args.window, "windows": args.windows, "tokens": base.tokens},
        "rows": table, "sample": {"prompt": SAMPLE_PROMPT, **samples},
        "config": {k: v for k, v in vars(args).items() if k != "func"},
        "seconds": time.perf_counter() - t_start,
    }
    atomic_write_bytes(out / "demo.json", (json.dumps(result, indent=2) + "\n").encode())
    print(f"\nwall time {result['seconds']:.0f} s; JSON -> {out / 'demo.json'}; recipe -> {out / 'recipe'}/")
    print(f"the seed's full inference ablation (~20 min): kvsplice ablate --config {ABLATION_CONFIG} "
          f"--json results/ablation.json --plot results/ablation.png")
    return 0
