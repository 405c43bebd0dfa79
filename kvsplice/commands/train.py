"""`kvsplice train`: train a nanoGPT-sized GPT-2 (optionally with reciprocal attention, in-forward
V-only pruning, KVSplice calibration + V codec, or learned V compression). Settings come from
TrainConfig defaults < --config TOML < command-line flags (every TrainConfig field is a flag:
--kvsplice-enable, --kvsplice-k 16, --prune-enable, --ra-enable, --max-steps ...)."""

from __future__ import annotations

import argparse
import dataclasses
import typing


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field, default None (= keep the TOML / dataclass value)."""
    from kvsplice.train.config import TrainConfig

    hints = typing.get_type_hints(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        t = hints[f.name]
        if t is bool:
            p.add_argument(_flag(f.name), dest=f.name, action=argparse.BooleanOptionalAction, default=None)
        elif f.name == "data":
            p.add_argument("--data", dest="data", nargs="+", metavar="PATH", default=None,
                           help="UTF-8 text files (default: the calibration split of pydoc_data.topics)")
        elif f.name == "ra_layers":
            p.add_argument("--ra-layers", dest="ra_layers", type=int, nargs="+", default=None,
                           help="RA layer indices (default: the middle third)")
        else:
            p.add_argument(_flag(f.name), dest=f.name, type=t, default=None, metavar=t.__name__.upper())


def config_from_args(args: argparse.Namespace):
    from kvsplice.train.config import TrainConfig, field_names, from_dict, load_toml

    base: dict = {}
    if args.config:
        raw = load_toml(args.config)
        base = dict(raw.get("train", raw))
    over = {k: getattr(args, k) for k in field_names() if getattr(args, k, None) is not None}
    return from_dict({**TrainConfig().to_dict(), **base, **over})


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("train", help="train a small GPT-2 with RA / V-only pruning / KVSplice / learned compression",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="TOML with TrainConfig keys (flat or under [train])")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT_DIR", help="continue from <out_dir>/checkpoint")
    p.add_argument("--export-hf", default=None, metavar="DIR",
                   help="after training, also write the checkpoint as a transformers GPT-2 folder (plain-attention runs)")
    add_config_flags(p)
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from kvsplice.train.checkpoint import export_hf
    from kvsplice.train.trainer import train

    cfg = config_from_args(args)
    res = train(cfg, resume=args.resume)
    print(f"{cfg.name}: val loss {res['val_loss']:.4f}, val ppl {res['val_ppl']:.3f}, {res['steps']} steps, "
          f"{res['seconds']:.1f} s; cache {res['memory']['kv_bytes_per_token']:.1f} B/token (float32, T={res['memory']['context']})")
    print(f"checkpoint: {res['checkpoint']}  result: {cfg.out_dir}/result.json")
    if args.export_hf:
        print(f"transformers folder: {export_hf(res['checkpoint'], args.export_hf)}")
    return 0
