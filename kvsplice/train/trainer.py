"""The training loop: AdamW, linear warm-up + cosine decay, step (and optional time) budget,
validation every `eval_interval` steps, KVSplice calibration after `kvsplice_warmup_steps`,
checkpoints (safetensors + JSON) and exact resume.

Determinism: the global torch RNG is seeded with `seed` before the model is built (weights), the
batch stream has its own generator (seed), calibration batches another (seed + 7919); all states
are checkpointed, so on CPU with the same thread count the same seed gives the same run and a
resumed run continues bit-identically (tested). `time_budget_s` > 0 trades that for a wall-clock cap.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from kvsplice.errors import KVSpliceError
from kvsplice.train import checkpoint as ckpt
from kvsplice.train.calibration import calibrate_in_training, install
from kvsplice.train.config import TrainConfig, from_dict
from kvsplice.train.model import GPT
from kvsplice.train.textdata import build_corpus, check_lengths, random_batch, val_batches

# fields that must agree between a checkpoint and the config resuming it
_ARCH = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "ra_enable", "ra_layers", "prune_enable",
         "prune_mode", "kvsplice_enable", "kvsplice_codec", "kvsplice_k", "learned_enable", "learned_k",
         "learned_affine", "seed", "data", "val_fraction", "batch_size")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over warmup_steps, then cosine from lr to min_lr at max_steps."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.max_steps - cfg.warmup_steps)
    frac = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * frac)) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: GPT, cfg: TrainConfig) -> torch.optim.AdamW:
    """Weight decay on matrices and embeddings only (not biases, LayerNorms, RA beta)."""
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), foreach=False,
    )


@torch.no_grad()
def evaluate(model: GPT, batches, device: str) -> float:
    """Mean next-token cross-entropy (nats) over the fixed validation windows."""
    was = model.training
    model.eval()
    total, n = 0.0, 0
    for x, y in batches:
        _, loss = model(x.to(device), y.to(device))
        total += float(loss) * y.numel()
        n += y.numel()
    model.train(was)
    return total / n


@torch.no_grad()
def measure_cache(model: GPT, x: torch.Tensor) -> dict[str, Any]:
    """Run one forward on x (B, T) recording, per layer, the bytes a decode-time cache would hold
    for these tokens (see CausalSelfAttention._record). Returns totals over layers, per token."""
    was = model.training
    model.eval()
    attns = model.attention_modules()
    for a in attns:
        a.record = {}
    try:
        model(x)
        recs = [dict(a.record) for a in attns]
    finally:
        for a in attns:
            a.record = None
        model.train(was)
    tokens = recs[0]["tokens"]
    tot = {k: sum(r[k] for r in recs) for k in ("k_bytes", "v_bytes", "index_bytes", "q_bytes")}
    return {
        "context": x.shape[1], "dtype": str(x.new_zeros((), dtype=torch.float32).dtype),
        "k_bytes_per_token": tot["k_bytes"] / tokens, "v_bytes_per_token": tot["v_bytes"] / tokens,
        "index_bytes_per_token": tot["index_bytes"] / tokens, "q_bytes_per_token": tot["q_bytes"] / tokens,
        "kv_bytes_per_token": sum(tot.values()) / tokens,
        "v_values_per_head": [r["v_values_per_head"] for r in recs],
    }


def v_values_per_head_formula(cfg: TrainConfig, T: int = 1024) -> int:
    """The seed's count: kept tokens at context T x values stored per V vector (latent dims)."""
    kept = cfg.prune_config().kept(T) if cfg.prune_enable else T
    width = cfg.kvsplice_k if cfg.kvsplice_enable else cfg.learned_k if cfg.learned_enable else cfg.head_dim
    return kept * width


def _check_resume(cfg: TrainConfig, record: dict) -> None:
    old = from_dict(record["config"])
    diff = {k: (getattr(old, k), getattr(cfg, k)) for k in _ARCH if getattr(old, k) != getattr(cfg, k)}
    if diff:
        raise KVSpliceError(f"cannot resume: the config differs from the checkpoint's in {diff} (checkpoint, now)")


def train(cfg: TrainConfig, resume: str | Path | None = None) -> dict[str, Any]:
    """Train (or resume) one run; writes <out_dir>/checkpoint/ and <out_dir>/result.json. Returns the result.
    torch's CPU thread count is set to cfg.threads for the run and restored afterwards."""
    threads = torch.get_num_threads()
    try:
        return _train(cfg, resume)
    finally:
        torch.set_num_threads(threads)


def _train(cfg: TrainConfig, resume: str | Path | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    if cfg.device == "cpu":
        torch.set_num_threads(cfg.threads)
    elif cfg.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # fp32 weights, TF32 matmuls
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    record: dict[str, Any] = {}
    tokenizer = None
    if resume is not None:
        record = ckpt.read_record(resume)
        _check_resume(cfg, record)
        tokenizer = ckpt.load_tokenizer(resume)
    corpus = build_corpus(cfg.data, cfg.val_fraction, cfg.vocab_size, tokenizer)
    n_val = check_lengths(corpus, cfg.block_size, cfg.eval_batches * cfg.batch_size)
    vb = val_batches(corpus.val_ids, n_val, cfg.batch_size, cfg.block_size)
    model = GPT(cfg).to(cfg.device)
    opt = make_optimizer(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)
    geometry_path = Path(cfg.kvsplice_save) if cfg.kvsplice_save else out / "geometry.safetensors"
    step, history, calib, prior_seconds = 0, {"train": [], "val": []}, None, 0.0
    if resume is not None:
        ckpt.load_model_weights(resume, model)
        ckpt.load_training_state(resume, model, opt, gen)
        step, history, calib = record["step"], record["history"], record.get("calibration")
        prior_seconds = record.get("seconds", 0.0)
        if (Path(resume) / ckpt.GEOMETRY).is_file():
            from kvsplice.geometry import load_geometry

            install(model, load_geometry(Path(resume) / ckpt.GEOMETRY))
            if Path(resume) / ckpt.GEOMETRY != geometry_path:
                geometry_path.parent.mkdir(parents=True, exist_ok=True)
                geometry_path.write_bytes((Path(resume) / ckpt.GEOMETRY).read_bytes())

    def make_record(seconds: float) -> dict[str, Any]:
        return {"config": cfg.to_dict(), "step": step, "history": history, "calibration": calib,
                "seconds": seconds, "corpus": corpus.summary()}

    def save(where: Path) -> None:
        ckpt.save_checkpoint(where, model, opt, gen, corpus.tokenizer,
                             make_record(prior_seconds + time.perf_counter() - t_start),
                             geometry_path if calib is not None else None)

    bar = None
    if cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.name, leave=False, dynamic_ncols=True)
    model.train()
    stopped_by_time = False
    if step == 0 and not history["val"]:
        history["val"].append([0, evaluate(model, vb, cfg.device)])  # the untrained model (~ln vocab)
    while step < cfg.max_steps:
        if cfg.kvsplice_enable and calib is None and step >= cfg.kvsplice_warmup_steps:
            _, calib = calibrate_in_training(model, corpus.train_ids, cfg, step, geometry_path)
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        x, y = random_batch(corpus.train_ids, cfg.batch_size, cfg.block_size, gen)
        _, loss = model(x.to(cfg.device), y.to(cfg.device))
        if not torch.isfinite(loss):
            raise KVSpliceError(f"{cfg.name}: training loss became {loss.detach().item()} at step {step}")
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        step += 1
        history["train"].append([step, round(loss.detach().item(), 5)])
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            history["val"].append([step, evaluate(model, vb, cfg.device)])
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.detach().item():.3f}", val=f"{history['val'][-1][1]:.3f}" if history["val"] else "-")
        if cfg.checkpoint_interval and step % cfg.checkpoint_interval == 0:
            save(out / f"checkpoint-{step}")
        if cfg.time_budget_s > 0 and prior_seconds + time.perf_counter() - t_start > cfg.time_budget_s:
            stopped_by_time = True
            break
    if bar is not None:
        bar.close()
    if not history["val"] or history["val"][-1][0] != step:
        history["val"].append([step, evaluate(model, vb, cfg.device)])
    train_seconds = prior_seconds + time.perf_counter() - t_start
    save(out / "checkpoint")
    val_loss = history["val"][-1][1]
    result: dict[str, Any] = {
        "name": cfg.name, "config": cfg.to_dict(), "steps": step, "stopped_by_time": stopped_by_time,
        "val_loss": val_loss, "val_ppl": math.exp(val_loss), "seconds": round(train_seconds, 2),
        "history": history, "calibration": calib, "corpus": corpus.summary(),
        "v_values_per_head_T1024_formula": v_values_per_head_formula(cfg, 1024),
        "memory": measure_cache(model, vb[0][0].to(cfg.device)),
        "ra_beta": {i: model.transformer.h[i].attn.ra.beta.detach().item() for i in model.ra_layers},
        "torch": torch.__version__, "threads": torch.get_num_threads(), "device": cfg.device,
        "checkpoint": str(out / "checkpoint"),
    }
    if cfg.kvsplice_enable and cfg.kvsplice_refit_at_end and calib is not None:
        result["refit"] = refit_and_evaluate(model, corpus, cfg, vb, step, out / "geometry-refit.safetensors")
    write_json(out / "result.json", result)
    return result


def refit_and_evaluate(model: GPT, corpus, cfg: TrainConfig, vb, step: int, path: Path) -> dict[str, Any]:
    """Refit the geometry on the final weights, report val loss/ppl with it, restore the frozen one."""
    frozen = [a.codec_transform for a in model.attention_modules()]
    model.set_codecs(None)
    try:
        _, info = calibrate_in_training(model, corpus.train_ids, cfg, step, path, seed=cfg.seed + 1)
        loss = evaluate(model, vb, cfg.device)
    finally:
        for a, t in zip(model.attention_modules(), frozen):
            a.codec_transform = t
    return {"val_loss": loss, "val_ppl": math.exp(loss), "geometry": str(path), "fit_seconds": info["fit_seconds"]}


def write_json(path: str | Path, obj: Any) -> None:
    """Atomic JSON write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=False, default=str))
    os.replace(tmp, path)
