"""`kvsplice generate`: greedy generation with a compressed (and optionally pruned) KV cache; prints
the continuation and the bytes the cache actually holds versus an uncompressed cache."""

from __future__ import annotations

import argparse
import sys
import time

from kvsplice.errors import KVSpliceError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text through a compressed KV cache", description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local HF folder, or a hub id")
    p.add_argument("--geometry", default=None, help="V geometry file (default: none, V stored uncompressed)")
    p.add_argument("--keep-ratio", type=float, default=None, help="V-only pruning keep ratio (default: no pruning)")
    p.add_argument("--recency", type=int, default=64, help="pruning: newest tokens always kept (default 64)")
    p.add_argument("--k-min", type=int, default=64, help="pruning: minimum tokens kept (default 64)")
    p.add_argument("--window", type=int, default=0, help="newest tokens kept in full precision (default 0)")
    p.add_argument("--k-geometry", default=None, help="K geometry file (default: none, K stored uncompressed)")
    p.add_argument("--sink", type=int, default=0, help="first tokens kept exact (attention sink; default 0)")
    p.add_argument("--prompt", required=True, help="prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import contextlib

    import torch

    from kvsplice.attention import prepare_model
    from kvsplice.cache import CompressedCache
    from kvsplice.geometry import load_geometry
    from kvsplice.loading import load_model
    from kvsplice.pruning import VOnlyPruner

    if args.max_new_tokens < 1:
        raise KVSpliceError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    pruner = None if args.keep_ratio is None else VOnlyPruner(keep_ratio=args.keep_ratio, recency=args.recency, k_min=args.k_min)
    geometry = load_geometry(args.geometry) if args.geometry else None
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model)
    print(f"loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    k_geometry = load_geometry(args.k_geometry) if args.k_geometry else None
    cache = CompressedCache.from_geometry(model, v_geometry=geometry, k_geometry=k_geometry, pruner=pruner,
                                          window=args.window, sink=args.sink)
    if args.chat and getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}], tokenize=False, add_generation_prompt=True)
    else:
        text = args.prompt
    enc = tokenizer(text, return_tensors="pt")
    device = next(model.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0 = time.perf_counter()
    with (prepare_model(model) if pruner is not None else contextlib.nullcontext()), torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, cache=cache, max_new_tokens=args.max_new_tokens,
                             do_sample=False, pad_token_id=pad)
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1]:]
    print(tokenizer.decode(new, skip_special_tokens=True))
    m = cache.memory()
    ratio = m.total_bytes / m.uncompressed_bytes if m.uncompressed_bytes else float("nan")
    print(
        f"\n[cache] {m.tokens} tokens held ({ids.shape[1]} prompt + generated): {m.total_bytes} bytes measured "
        f"(K {m.k_bytes}, V {m.v_bytes}, window {m.window_bytes}, index {m.index_bytes}, other {m.other_bytes}) "
        f"vs {m.uncompressed_bytes} bytes uncompressed ({model.dtype}): {100 * ratio:.1f} % "
        f"({100 * (1 - ratio):.1f} % saved); {len(new)} tokens in {dt:.1f} s",
        file=sys.stderr,
    )
    return 0
