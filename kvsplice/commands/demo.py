"""`kvsplice demo` (what `make demo` runs): the default calibration + the seed's inference ablation on
SmolLM2-135M with configs/smollm2-kv-ablation.toml (or the identical built-in defaults when the file
is not there), writing the geometries, JSON and PNG to ./results/demo/."""

from __future__ import annotations

import argparse
from pathlib import Path

CONFIG_NAME = "smollm2-kv-ablation.toml"


def default_config_path() -> Path | None:
    """configs/<CONFIG_NAME> in the working directory, else next to the package (a source checkout)."""
    for base in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = base / "configs" / CONFIG_NAME
        if p.is_file():
            return p
    return None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("demo", help="calibrate + run the default ablation on SmolLM2-135M (results/demo/)", description=__doc__)
    p.add_argument("--out", default="results/demo", help="output folder (default results/demo)")
    p.add_argument("--config", default=None, help=f"ablation config (default: configs/{CONFIG_NAME})")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from kvsplice.commands.ablate import execute
    from kvsplice.errors import KVSpliceError
    from kvsplice.evaluate.ablation import AblationConfig

    path = Path(args.config) if args.config else default_config_path()
    cfg = AblationConfig.from_toml(path) if path is not None else AblationConfig()
    print(f"config: {path if path is not None else 'built-in defaults (same as configs/' + CONFIG_NAME + ')'}")
    out = Path(args.out)
    if cfg.geometry_dir is None:
        cfg.geometry_dir = str(out / "geometry")
    if args.threads is not None:
        if args.threads < 1:
            raise KVSpliceError(f"--threads must be >= 1, got {args.threads}")
        cfg.threads = args.threads
    return execute(cfg, out / "ablation.json", out / "ablation.png", progress=not args.quiet)
