"""`kvsplice generate`: greedy generation with a compressed (and optionally pruned) KV cache; prints
the continuation, the bytes the cache actually holds versus an uncompressed cache, and tokens/s
beside a `DynamicCache` run of the same prompt (--no-compare skips it).

The cache: --recipe (a folder from `kvsplice calibrate`, or a Hub repo id), or --geometry /
--k-geometry files. With none of them, the best recipe (pca-q 4-bit, joint heads, K+V, sink 1)
is calibrated first on --calib-batches x 1024 tokens of the default text (~10-20 s on 2 cores)."""

from __future__ import annotations

import argparse
import sys
import time

from kvsplice.commands.common import add_device_args, load_model_for
from kvsplice.errors import KVSpliceError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text through a compressed KV cache", description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local HF folder, or a hub id")
    p.add_argument("--recipe", default=None, metavar="DIR_OR_HUB_ID",
                   help="recipe folder (kvsplice calibrate --out DIR) or Hugging Face Hub repo id: K + V geometries + sink")
    p.add_argument("--allow-other-model", action="store_true", help="a recipe or geometry calibrated on another model is warned about; this flag silences the warning")
    p.add_argument("--calib-batches", type=int, default=2,
                   help="no --recipe / --geometry / --k-geometry: calibrate the best recipe on this many 1024-token windows (default 2)")
    p.add_argument("--geometry", default=None, help="V geometry file (default: none, V stored uncompressed)")
    p.add_argument("--keep-ratio", type=float, default=None, help="V-only pruning keep ratio (default: no pruning)")
    p.add_argument("--recency", type=int, default=64, help="pruning: newest tokens always kept (default 64)")
    p.add_argument("--k-min", type=int, default=64, help="pruning: minimum tokens kept (default 64)")
    p.add_argument("--window", type=int, default=0, help="newest tokens kept in full precision (default 0)")
    p.add_argument("--k-geometry", default=None, help="K geometry file (default: none, K stored uncompressed)")
    p.add_argument("--sink", type=int, default=None,
                   help="first tokens kept exact (attention sink; default: the recipe's, else 1, 0 with --keep-ratio)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="a file from `kvsplice pack` (needs the same --recipe): its prompt is reused, --prompt continues it")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--attention", choices=("auto", "coded", "reference"), default="auto",
                   help="auto (default): attention in the coded domain (kvsplice/coded_attention.py: V read from its "
                        "codes, K too when coded after RoPE) where the cache allows it, else decode rows; coded: "
                        "refuse a cache that does not allow it; reference: decode every row, the model's own attention")
    p.add_argument("--no-compare", action="store_true", help="skip the DynamicCache run (tokens/s comparison)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_device_args(p)
    p.set_defaults(func=run)
    return p


def finite_logits_guard():
    """A LogitsProcessorList whose one processor raises NonFiniteError on NaN / +inf logits, or a row
    that is -inf everywhere: greedy decoding would otherwise pick token 0 forever and print an empty
    or garbage continuation with exit code 0. (-inf entries alone are fine: processors mask with them.)"""
    import torch
    from transformers import LogitsProcessor, LogitsProcessorList

    from kvsplice.errors import NonFiniteError

    class FiniteLogits(LogitsProcessor):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:  # scores (B, vocab)
            bad = torch.isnan(scores).any(-1) | torch.isposinf(scores).any(-1) | torch.isneginf(scores).all(-1)
            if bool(bad.any()):
                raise NonFiniteError(f"the model produced NaN/inf logits at generated token {input_ids.shape[1]} "
                                     "(corrupted geometry, or a dtype that overflows with this cache)")
            return scores

    return LogitsProcessorList([FiniteLogits()])


def run(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from kvsplice.api import Recipe, calibrate_recipe
    from kvsplice.attention import prepare_model
    from kvsplice.cache import CompressedCache
    from kvsplice.coded_attention import coded_attention, coded_supported
    from kvsplice.geometry import load_geometry
    from kvsplice.pruning import VOnlyPruner

    if not args.prompt:
        raise KVSpliceError("--prompt is empty: give the text to continue")
    if args.max_new_tokens < 1:
        raise KVSpliceError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.recipe and (args.geometry or args.k_geometry):
        raise KVSpliceError("give --recipe or --geometry / --k-geometry, not both")
    if args.prompt_cache and (not args.recipe or args.keep_ratio is not None or args.window or args.sink is not None or args.chat):
        raise KVSpliceError("--prompt-cache needs --recipe (the one it was packed with) and takes no --keep-ratio / --window / --sink / --chat")
    if args.calib_batches < 1:
        raise KVSpliceError(f"--calib-batches must be >= 1, got {args.calib_batches}")
    pruner = None if args.keep_ratio is None else VOnlyPruner(keep_ratio=args.keep_ratio, recency=args.recency, k_min=args.k_min)
    recipe = Recipe.load(args.recipe, allow_other_model=args.allow_other_model) if args.recipe else None
    geometry = load_geometry(args.geometry) if args.geometry else None
    k_geometry = load_geometry(args.k_geometry) if args.k_geometry else None
    model, tokenizer = load_model_for(args)
    if recipe is None and geometry is None and k_geometry is None and pruner is None:
        t0 = time.perf_counter()
        recipe = calibrate_recipe(model, tokenizer, max_batches=args.calib_batches)
        print(f"no --recipe / --geometry: calibrated {recipe.describe()} on {recipe.v.meta['tokens']} tokens in "
              f"{time.perf_counter() - t0:.1f} s (save one: kvsplice calibrate --out DIR; then --recipe DIR)", file=sys.stderr)
    for path, geo in ((args.geometry, geometry), (args.k_geometry, k_geometry)):  # same layout, other model: warn
        if geo is not None:
            geo.check_model(model, args.allow_other_model, source=f"geometry {path}")
    if recipe is not None:
        recipe.check_model(model)
        geometry, k_geometry = recipe.v, recipe.k
    sink = args.sink if args.sink is not None else (recipe.sink if recipe is not None else (0 if pruner else 1))
    cache = CompressedCache.from_geometry(model, v_geometry=geometry, k_geometry=k_geometry, pruner=pruner,
                                          window=args.window, sink=sink)
    if args.chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    enc = tokenizer(text, return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    if ids.shape[1] == 0:
        raise KVSpliceError(f"--prompt {args.prompt!r} gives no tokens with this tokenizer")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if args.prompt_cache:  # the stored prompt's cache, then --prompt's tokens after the stored ones
        from kvsplice.commands.pack import prompt_cache_inputs

        cache, ids, mask = prompt_cache_inputs(args.prompt_cache, model, recipe, tokenizer, args.prompt)

    why_not = coded_supported(cache, model)
    if args.attention == "coded" and why_not:
        raise KVSpliceError(f"--attention coded: this cache cannot use it ({why_not})")
    coded = args.attention != "reference" and why_not is None
    print(f"[attention] {'coded domain (kvsplice-coded)' if coded else 'decode rows, the model attention'}"
          + (f" ({why_not})" if why_not and args.attention == "auto" else ""), file=sys.stderr)

    def run_generate(c):
        """-> (new token ids (n,), seconds); c None = transformers' default DynamicCache."""
        kw = {} if c is None else {"cache": c}
        if c is None:
            ctx = contextlib.nullcontext()
        elif coded:
            ctx = coded_attention(model, c)
        else:
            ctx = prepare_model(model) if pruner is not None else contextlib.nullcontext()
        t0 = time.perf_counter()
        with ctx, torch.no_grad():
            o = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                               do_sample=False, pad_token_id=pad, logits_processor=finite_logits_guard(), **kw)
        return o[0, ids.shape[1]:], time.perf_counter() - t0

    new, dt = run_generate(cache)
    print(tokenizer.decode(new, skip_special_tokens=True))
    m = cache.memory()
    ratio = m.total_bytes / m.uncompressed_bytes if m.uncompressed_bytes else float("nan")
    bytes16 = m.uncompressed_bytes * 16 // torch.finfo(model.dtype).bits  # the same K and V in a 16-bit dtype
    print(
        f"\n[cache] {m.tokens} tokens held ({ids.shape[1]} prompt + generated): {m.total_bytes} bytes measured "
        f"(K {m.k_bytes}, V {m.v_bytes}, window {m.window_bytes}, index {m.index_bytes}, other {m.other_bytes}) "
        f"vs {m.uncompressed_bytes} bytes uncompressed ({model.dtype}): {100 * ratio:.1f} % "
        f"({100 * (1 - ratio):.1f} % saved); vs 16-bit ({bytes16} bytes): {100 * m.total_bytes / max(bytes16, 1):.1f} %",
        file=sys.stderr,
    )
    speed = f"[speed] compressed cache: {len(new)} tokens in {dt:.2f} s = {len(new) / dt:.1f} tokens/s"
    if not args.no_compare:
        ref, dt_ref = run_generate(None)
        same = int((ref[: len(new)] == new[: len(ref)]).long().cumprod(0).sum())
        speed += (f"; DynamicCache: {len(ref)} tokens in {dt_ref:.2f} s = {len(ref) / dt_ref:.1f} tokens/s "
                  f"({dt / max(len(new), 1) / (dt_ref / max(len(ref), 1)):.2f}x the time per token); "
                  f"first {same} of {len(new)} tokens identical")
    print(speed + " (one run, wall clock: a ratio on a shared machine)", file=sys.stderr)
    return 0
