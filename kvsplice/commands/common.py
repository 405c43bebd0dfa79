"""Flags shared by the model-running verbs (calibrate, eval, generate, frontier, demo): --device and
--dtype, and loading the model with them. No torch import at module level (`kvsplice --help`)."""

from __future__ import annotations

import argparse
import sys
import time

from kvsplice.errors import KVSpliceError

DTYPES = ("float32", "bfloat16", "float16")


def add_device_args(p: argparse.ArgumentParser, dtype_default: str | None = "float32") -> None:
    """dtype_default None: the verb's config decides (frontier)."""
    p.add_argument("--device", default=None,
                   help="torch device for the model and the cache: cpu, cuda, cuda:1, mps ... (default: cuda if available, else cpu)")
    p.add_argument("--dtype", choices=DTYPES, default=dtype_default,
                   help=f"model dtype (default {dtype_default or 'the config'}; bytes 'vs uncompressed' are relative to this dtype)")


def resolve_device(name: str | None):
    """--device -> torch.device; KVSpliceError for a device this torch cannot use."""
    import torch

    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise KVSpliceError(f"--device: expected a torch device such as cpu or cuda:0, got {name!r}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KVSpliceError(f"--device {name}: this torch build sees no CUDA device")
    if dev.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise KVSpliceError(f"--device {name}: MPS is not available here")
    return dev


def load_model_for(args: argparse.Namespace):
    """load_model(args.model) in args.dtype, moved to args.device; prints the load time to stderr."""
    import torch

    from kvsplice.loading import load_model

    device = resolve_device(getattr(args, "device", None))  # a bad device fails before the load
    dtype = getattr(torch, getattr(args, "dtype", None) or "float32")
    t0 = time.perf_counter()
    model, tokenizer = load_model(args.model, dtype=dtype)
    model.to(device)
    print(f"loaded {args.model} ({dtype}, {device}) in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return model, tokenizer
