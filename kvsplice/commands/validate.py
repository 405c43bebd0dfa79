"""`kvsplice validate`: the seed's standalone check, held-out MSE of `pca` vs `spline-pca` per rank.

    kvsplice validate --synthetic [--ranks 8,16,64] [--json PATH]
    kvsplice validate --data vectors.safetensors [--key NAME_OR_GLOB ...] [--ranks ...] [--json PATH]

--synthetic uses kvsplice.synthetic.make_synthetic (100 000 train / 20 000 test vectors, 64 dims).
--data reads real vectors (N, D) from a safetensors file: the tensor "vectors" if present, else the
only tensor, else the tensors selected with --key (exact names or globs, e.g. "v.3.*" for the
calibrator's per-(layer, head) dumps named "v.<layer>.<head>"; --key '*' takes all). Each tensor
is split by a fixed-seed permutation into train and a held-out test fraction; both codecs are
fitted on train only. With several tensors each gets its own codecs, and the reported MSE per
rank is the mean over tensors (the per-tensor rows are printed).

--json writes exactly {"rows": [{"k", "pca_mse", "spline_pca_mse", "delta_pct"}], "n_train",
"n_test", "seconds"} with delta_pct = 100 (spline_pca_mse - pca_mse) / pca_mse.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import time
from pathlib import Path
from typing import TYPE_CHECKING

from kvsplice.errors import KVSpliceError

if TYPE_CHECKING:  # torch is imported inside the functions: `kvsplice --help` must not load it
    import torch


def _ranks(text: str) -> list[int]:
    try:
        ranks = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks expects comma-separated integers, got {text!r}") from None
    if not ranks or min(ranks) < 1:
        raise argparse.ArgumentTypeError(f"--ranks expects positive integers, got {text!r}")
    return ranks


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser("validate", help="held-out MSE of pca vs spline-pca (synthetic or real vectors)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true", help="the built-in synthetic V-like set")
    src.add_argument("--data", type=Path, help="safetensors file of real vectors (N, D)")
    p.add_argument("--key", action="append", default=None, help="tensor name or glob in --data (repeatable)")
    p.add_argument("--ranks", type=_ranks, default=[8, 16, 64], help="comma-separated ranks k (default 8,16,64)")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    p.add_argument("--n-train", type=int, default=100_000, help="synthetic train vectors (default 100000)")
    p.add_argument("--n-test", type=int, default=20_000, help="synthetic test vectors (default 20000)")
    p.add_argument("--test-fraction", type=float, default=0.2, help="--data: held-out fraction (default 0.2)")
    p.add_argument("--epochs", type=int, default=8, help="spline-pca training epochs (default 8, the seed's)")
    p.add_argument("--knots", type=int, default=7, help="spline knots (default 7)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run)
    return p


def _select(path: Path, keys: list[str] | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            names = sorted(f.keys())
            if keys:
                chosen = sorted({n for pat in keys for n in names if fnmatch.fnmatchcase(n, pat)})
                missing = [pat for pat in keys if not any(fnmatch.fnmatchcase(n, pat) for n in names)]
                if missing:
                    raise KVSpliceError(f"{path}: no tensor matches {missing}; tensors: {names[:20]}{' ...' if len(names) > 20 else ''}")
            elif "vectors" in names or len(names) == 1:
                chosen = ["vectors" if "vectors" in names else names[0]]
            else:
                raise KVSpliceError(
                    f"{path} holds {len(names)} tensors and none is named 'vectors'; choose with --key "
                    f"(names or globs, e.g. 'v.0.*', or '*' for all): {names[:20]}{' ...' if len(names) > 20 else ''}"
                )
            out = {n: f.get_tensor(n) for n in chosen}
    except KVSpliceError:
        raise
    except Exception as e:
        raise KVSpliceError(f"cannot read vectors from {path}: {e}") from e
    for n, t in out.items():
        if t.ndim != 2 or not t.is_floating_point():
            raise KVSpliceError(f"{path}: tensor {n!r} must be floating (N, D), found {t.dtype} {tuple(t.shape)}")
    return out


def _split(x: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    import torch

    if not 0 < fraction < 1:
        raise KVSpliceError(f"--test-fraction must be in (0, 1), got {fraction}")
    n_test = max(1, int(round(fraction * x.shape[0])))
    perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))
    return x[perm[n_test:]].float(), x[perm[:n_test]].float()


def _mse(codec, test: torch.Tensor) -> float:
    return float(((codec.decompress(codec.compress(test)).double() - test.double()) ** 2).mean())


def compare(train: torch.Tensor, test: torch.Tensor, ranks: list[int], epochs: int = 8, knots: int = 7,
            seed: int = 0, on_row=None) -> list[dict]:
    """Fit pca and spline-pca on train (N, D) per rank; held-out MSE on test. Rows of the JSON schema
    plus "warp" (whether spline-pca kept its trained warp) for the printed table."""
    from kvsplice.codecs import get_codec

    rows = []
    for k in ranks:
        pca = get_codec("pca", k=k).fit(train)
        spl = get_codec("spline-pca", k=k, knots=knots, epochs=epochs, seed=seed).fit(train)
        pm, sm = _mse(pca, test), _mse(spl, test)
        rows.append({"k": k, "pca_mse": pm, "spline_pca_mse": sm,
                     "delta_pct": 100.0 * (sm - pm) / pm if pm > 0 else 0.0, "warp": spl.info["warp"]})
        if on_row is not None:
            on_row(rows[-1])
    return rows


def _header(title: str) -> None:
    print(title)
    print(f"{'k':>5} {'pca_mse':>14} {'spline_pca_mse':>15} {'delta_%':>9}  warp", flush=True)


def _row(r: dict) -> None:
    print(f"{r['k']:>5} {r['pca_mse']:>14.6g} {r['spline_pca_mse']:>15.6g} {r['delta_pct']:>+9.3f}  {r['warp']}", flush=True)


def run(args: argparse.Namespace) -> int:
    from kvsplice.paths import check_outputs

    check_outputs({"--data": args.data}, {"--json": args.json})  # before any work
    t0 = time.perf_counter()
    if args.synthetic:
        from kvsplice.synthetic import make_synthetic

        if args.n_train < 1 or args.n_test < 1:
            raise KVSpliceError(f"--n-train and --n-test must be >= 1, got {args.n_train}, {args.n_test}")
        train, test = make_synthetic(args.n_train, args.n_test, seed=args.seed)
        sets = {"synthetic": (train, test)}
    else:
        sets = {n: _split(t, args.test_fraction, args.seed) for n, t in _select(args.data, args.key).items()}
    per_set = {}
    for name, (train, test) in sets.items():
        _header(f"{name}: {train.shape[0]} train / {test.shape[0]} test vectors of dim {train.shape[1]}"
                " (held-out MSE, lower is better)")
        per_set[name] = compare(train, test, args.ranks, args.epochs, args.knots, args.seed, on_row=_row)
    rows = []
    for i, k in enumerate(args.ranks):
        pm = sum(r[i]["pca_mse"] for r in per_set.values()) / len(per_set)
        sm = sum(r[i]["spline_pca_mse"] for r in per_set.values()) / len(per_set)
        rows.append({"k": k, "pca_mse": pm, "spline_pca_mse": sm, "delta_pct": 100.0 * (sm - pm) / pm if pm > 0 else 0.0})
    if len(per_set) > 1:
        _header(f"mean over {len(per_set)} tensors")
        for r in rows:
            _row(dict(r, warp="-"))
    result = {
        "rows": rows,
        "n_train": sum(t.shape[0] for t, _ in sets.values()),
        "n_test": sum(t.shape[0] for _, t in sets.values()),
        "seconds": time.perf_counter() - t0,
    }
    print(f"{result['seconds']:.1f} s")
    if args.json is not None:
        from kvsplice.paths import atomic_write_bytes

        atomic_write_bytes(args.json, (json.dumps(result, indent=2) + "\n").encode("utf-8"))
    return 0
