"""KVSplice calibration inside training (the seed's KVSpliceCalibrator, on the package's codecs).

After `kvsplice_warmup_steps` optimiser steps the trainer calls `calibrate_in_training`:
1. hooks on every layer's `c_attn` (the GPT-2 model adapter's `capture("v")`) take the V slice
   (B, H, T, D) of up to `kvsplice_max_batches` training batches (drawn from their own seeded
   generator, so the training batch stream is unchanged), no gradients, model in eval mode;
   at most `kvsplice_samples` vectors per layer are kept (split evenly over its heads), on CPU;
2. one codec per (layer, head) is fitted: `get_codec(kvsplice_codec, k=..., knots=..., epochs=...,
   lr=...)` (parameters the codec does not take are not passed);
3. the bank is saved as a geometry file (`kvsplice.geometry.save_geometry`);
4. from then on V passes through compress -> decompress in every attention layer.

Decision: the geometry is FROZEN once fitted (the seed's calibrate-then-use): the weights keep
training for the remaining steps and adapt to the fixed codec. The V distribution drifts meanwhile,
so `kvsplice_refit_at_end` refits on the final weights and reports the validation perplexity
with that refitted geometry too (saved beside, never used in training).
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from kvsplice.errors import KVSpliceError
from kvsplice.train.config import TrainConfig
from kvsplice.train.textdata import random_batch


def codec_params(cfg: TrainConfig) -> dict:
    """The kvsplice_* settings the chosen codec's constructor accepts."""
    from kvsplice.codecs.base import CODECS, _load_builtin_codecs

    _load_builtin_codecs()
    if cfg.kvsplice_codec not in CODECS:
        raise KVSpliceError(f"unknown codec {cfg.kvsplice_codec!r}; expected one of {sorted(CODECS)}")
    wanted = {"k": cfg.kvsplice_k, "knots": cfg.kvsplice_knots, "epochs": cfg.kvsplice_epochs,
              "lr": cfg.kvsplice_lr, "seed": cfg.seed}
    accepted = inspect.signature(CODECS[cfg.kvsplice_codec].__init__).parameters
    return {k: v for k, v in wanted.items() if k in accepted}


@torch.no_grad()
def collect_v(model, train_ids: torch.Tensor, cfg: TrainConfig, seed: int) -> dict[tuple[int, int], torch.Tensor]:
    """-> {(layer, head): (N, D) float32 CPU} with N <= kvsplice_samples // n_head."""
    from kvsplice.models import get_adapter

    per_head = max(1, cfg.kvsplice_samples // cfg.n_head)
    store: dict[tuple[int, int], list[torch.Tensor]] = {}
    count: dict[tuple[int, int], int] = {}

    def sink(layer: int, v: torch.Tensor) -> None:  # v: (B, H, T, D)
        for h in range(v.shape[1]):
            key = (layer, h)
            room = per_head - count.get(key, 0)
            if room > 0:
                x = v[:, h].reshape(-1, v.shape[-1])[:room].float().cpu()  # (n, D)
                store.setdefault(key, []).append(x)
                count[key] = count.get(key, 0) + x.shape[0]

    gen = torch.Generator().manual_seed(seed + 7919)
    was_training = model.training
    model.eval()
    try:
        with get_adapter(model).capture("v", sink=sink):
            for _ in range(cfg.kvsplice_max_batches):
                x, _ = random_batch(train_ids, cfg.batch_size, cfg.block_size, gen)
                model(x.to(cfg.device))
                if min(count.values(), default=0) >= per_head:
                    break
    finally:
        model.train(was_training)
    return {key: torch.cat(parts) for key, parts in sorted(store.items())}


def fit_geometry(vectors: dict[tuple[int, int], torch.Tensor], cfg: TrainConfig, meta: dict[str, str]):
    """One codec per (layer, head) -> kvsplice.geometry.Geometry."""
    from kvsplice.codecs import get_codec
    from kvsplice.geometry import Geometry

    params = codec_params(cfg)
    codecs = {key: get_codec(cfg.kvsplice_codec, **params).fit(x) for key, x in vectors.items()}
    n = min(x.shape[0] for x in vectors.values())
    meta = {**meta, "model": "kvsplice-train-gpt2", "target": "v", "num_layers": str(cfg.n_layer),
            "num_kv_heads": str(cfg.n_head), "head_dim": str(cfg.head_dim),
            "calibration": f"in-training, {n} vectors per head", "tokens": str(n)}
    return Geometry(codecs=codecs, meta=meta)


def install(model, geometry) -> None:
    """Put the geometry's per-head codecs into the model's attention (compress -> decompress on V)."""
    cfg = model.cfg
    geometry.check_compatible(cfg.n_layer, cfg.n_head, cfg.head_dim)
    model.set_codecs([[geometry.codec_for(l, h).to(cfg.device) for h in range(cfg.n_head)] for l in range(cfg.n_layer)])


def calibrate_in_training(model, train_ids: torch.Tensor, cfg: TrainConfig, step: int, path: str | Path,
                          seed: int | None = None) -> tuple[object, dict]:
    """Collect, fit, save to `path`, install. Returns (geometry, info dict for the run record)."""
    from kvsplice.geometry import save_geometry

    t0 = time.perf_counter()
    vectors = collect_v(model, train_ids, cfg, cfg.seed if seed is None else seed)
    t1 = time.perf_counter()
    geometry = fit_geometry(vectors, cfg, {"trained_step": str(step), "codec_params": str(codec_params(cfg))})
    t2 = time.perf_counter()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_geometry(path, geometry)
    install(model, geometry)
    info = {"step": step, "codec": cfg.kvsplice_codec, "params": codec_params(cfg), "path": str(path),
            "vectors_per_head": min(x.shape[0] for x in vectors.values()),
            "collect_seconds": round(t1 - t0, 2), "fit_seconds": round(t2 - t1, 2),
            "fit_info": {f"{l}.{h}": c.info for (l, h), c in sorted(geometry.codecs.items())}}
    return geometry, info
