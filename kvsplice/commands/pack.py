"""`kvsplice pack` / `kvsplice unpack`: a prompt's compressed KV cache in one file (kvsplice/storage.py).

    kvsplice pack --recipe DIR --prompt-file F --out X.kvs     prefill F through the recipe's cache, store it
    kvsplice unpack X.kvs --info                               print what the file holds (no model needed)
    kvsplice generate --recipe DIR --prompt-cache X.kvs --prompt "continuation"   reuse it

The file records the model id and the recipe's hash; reusing it with another model or recipe is
refused. The codes are entropy-coded (--coder rans, default; zlib / lzma for comparison)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from kvsplice.commands.common import add_device_args, load_model_for
from kvsplice.errors import KVSpliceError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("pack", help="prefill a prompt through a recipe's cache and store it in one file",
                              description=__doc__)
    p.add_argument("--model", default="smollm2-135m", help="smollm2-135m (default), a local HF folder, or a hub id")
    p.add_argument("--recipe", required=True, metavar="DIR_OR_HUB_ID", help="recipe folder (kvsplice calibrate --out DIR)")
    p.add_argument("--allow-other-model", action="store_true", help="use a recipe calibrated on another model")
    p.add_argument("--prompt-file", required=True, help="UTF-8 text file: the prompt")
    p.add_argument("--out", required=True, help="output file (e.g. prompt.kvs), written atomically")
    p.add_argument("--coder", default="rans", choices=("rans", "zlib", "lzma"), help="code entropy coder (default rans)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    add_device_args(p)
    p.set_defaults(func=run_pack)
    u = subparsers.add_parser("unpack", help="describe a file written by `kvsplice pack`", description=__doc__)
    u.add_argument("file", help="a .kvs file written by `kvsplice pack`")
    u.add_argument("--info", action="store_true", help="print the header (the default and only action)")
    u.add_argument("--json", action="store_true", help="print the whole header as JSON")
    u.set_defaults(func=run_unpack)
    return p


def run_pack(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from kvsplice.api import Recipe
    from kvsplice.paths import check_outputs
    from kvsplice.storage import pack, read_header, values_held

    check_outputs({"--prompt-file": args.prompt_file, "--recipe": args.recipe}, {"--out": args.out})
    try:
        text = Path(args.prompt_file).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise KVSpliceError(f"--prompt-file {args.prompt_file}: cannot read UTF-8 text ({e})") from e
    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    recipe = Recipe.load(args.recipe, allow_other_model=args.allow_other_model)
    model, tokenizer = load_model_for(args)
    recipe.check_model(model)
    device = next(model.parameters()).device
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)  # (1, T)
    if ids.shape[1] == 0:
        raise KVSpliceError(f"--prompt-file {args.prompt_file} gives no tokens with this tokenizer")
    mask = torch.ones_like(ids)
    cache = recipe.cache(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=torch.arange(ids.shape[1], device=device)[None], cache=cache)
    t1 = time.perf_counter()
    info = pack(cache, args.out, model=model, recipe=recipe, input_ids=ids, attention_mask=mask, coder=args.coder)
    t2 = time.perf_counter()
    values = values_held(read_header(args.out)[0])  # a sliding layer holds its window only
    live = cache.memory().total_bytes
    print(f"packed {ids.shape[1]} tokens ({recipe.describe()}) to {args.out}: {info['file_bytes']} bytes = "
          f"{info['file_bytes'] * 8 / values:.3f} bits/value (live cache {live * 8 / values:.3f}, 16-bit 16); "
          f"prefill {t1 - t0:.2f} s, pack {t2 - t1:.2f} s", file=sys.stderr)
    return 0


def run_unpack(args: argparse.Namespace) -> int:
    from kvsplice.storage import read_header, values_held

    h, tensors = read_header(args.file)
    if args.json:
        print(json.dumps(h, indent=2, sort_keys=True))
        return 0
    values = values_held(h)
    size = sum(t.nbytes for t in tensors.values())
    codes = sum(t.nbytes for k, t in tensors.items() if k.startswith("codes"))
    prompt = tensors.get("input_ids")
    print(f"{args.file}: {h['format']} v{h['version']}\n"
          f"  model {h['model']}, dtype {h['dtype']}; recipe {h['recipe_description']} (hash {h['recipe'][:16]})\n"
          f"  {h['batch']} sequence(s) x {h['length']} tokens, {h['num_layers']} layers x {h['num_heads']} KV heads x "
          f"{h['head_dim']}, window {h['window']}, sink {h['sink']}\n"
          f"  coder {h['coder']}: codes {codes} bytes, tensors {size} bytes = {size * 8 / max(values, 1):.3f} bits/value\n"
          f"  prompt stored: {'yes, ' + str(prompt.shape[1]) + ' tokens' if prompt is not None else 'no'}")
    return 0


def prompt_cache_inputs(path: str, model, recipe, tokenizer, continuation: str):
    """For `generate --prompt-cache`: (cache, input_ids (1, T + n), attention_mask) = the stored prompt's
    cache and tokens followed by the continuation's tokens (no special tokens added between them)."""
    import torch

    from kvsplice.storage import load_packed

    if recipe is None:
        raise KVSpliceError("--prompt-cache needs --recipe: the recipe the file was packed with")
    stored = load_packed(path, model, recipe)
    if stored.input_ids is None or stored.input_ids.shape[0] != 1:
        raise KVSpliceError(f"--prompt-cache {path}: expected one stored prompt (batch 1 with its tokens), "
                            f"found {None if stored.input_ids is None else stored.input_ids.shape[0]}")
    device = next(model.parameters()).device
    more = tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    if more.shape[1] == 0:
        raise KVSpliceError(f"--prompt {continuation!r} gives no tokens: give the text that continues the stored prompt")
    ids = torch.cat([stored.input_ids.to(device), more], 1)
    mask = torch.cat([stored.attention_mask.to(device), torch.ones_like(more)], 1)
    return stored.cache, ids, mask
