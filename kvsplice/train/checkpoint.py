"""Checkpoints (<out_dir>/checkpoint at the end, <out_dir>/checkpoint-<step> every
checkpoint_interval steps): a folder of safetensors + JSON, never pickle. Written atomically (a temporary folder
renamed over the old one), so a crash leaves either the old or the new checkpoint.

    <dir>/model.safetensors       parameters, transformers GPT-2 names (lm_head tied -> not stored)
    <dir>/optimizer.safetensors   AdamW moments per parameter ("<name>.exp_avg", ...)
    <dir>/state.safetensors       RNG states (torch global, batch generator) + pruner EMA buffers
    <dir>/tokenizer.json          the byte-level BPE
    <dir>/geometry.safetensors    the fitted KVSplice geometry, once calibrated
    <dir>/config.json             {"config": TrainConfig, "step", "history", "calibration", ...}

`load_checkpoint_as_hf(dir)` gives a transformers GPT2LMHeadModel + tokenizer for checkpoints
whose attention GPT-2 can represent (no RA, no learned compression; pruning / codec variants
only with allow_modified_attention=True, since the HF model then runs plain attention);
`export_hf(dir, out)` writes that as an HF folder (save_pretrained) for `load_model(out)`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from kvsplice.errors import KVSpliceError, ModelError
from kvsplice.train.config import TrainConfig, from_dict

GEOMETRY = "geometry.safetensors"


def _model_tensors(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items() if k != "lm_head.weight"}


def _optimizer_tensors(model, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    names = {id(p): n for n, p in model.named_parameters()}
    out = {}
    for p, st in opt.state.items():
        for key, t in st.items():
            out[f"{names[id(p)]}.{key}"] = torch.as_tensor(t).detach().cpu().contiguous().clone()
    return out


def _state_tensors(model, gen: torch.Generator) -> dict[str, torch.Tensor]:
    out = {"rng.torch": torch.get_rng_state(), "rng.batches": gen.get_state()}
    for i, attn in enumerate(model.attention_modules()):
        if attn.pruner is not None:
            out[f"pruner.{i}.ema_importance"] = attn.pruner.ema_importance.detach().cpu().contiguous().clone()
            out[f"pruner.{i}.ema_step"] = attn.pruner.ema_step.detach().cpu().clone()
    return out


def save_checkpoint(path: str | Path, model, opt, gen: torch.Generator, tokenizer, record: dict[str, Any],
                    geometry_path: str | Path | None = None) -> Path:
    """Write the checkpoint folder atomically. record: JSON-serialisable (config, step, history...)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(_model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
    save_file(_optimizer_tensors(model, opt), str(tmp / "optimizer.safetensors"))
    save_file(_state_tensors(model, gen), str(tmp / "state.safetensors"))
    tokenizer.save(str(tmp / "tokenizer.json"))
    if geometry_path is not None and Path(geometry_path).is_file():
        shutil.copyfile(geometry_path, tmp / GEOMETRY)
    (tmp / "config.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    old = path.with_name(path.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)
    return path


def read_record(path: str | Path) -> dict[str, Any]:
    f = Path(path) / "config.json"
    if not f.is_file():
        raise KVSpliceError(f"{path} is not a kvsplice training checkpoint: {f.name} missing")
    try:
        return json.loads(f.read_text())
    except json.JSONDecodeError as e:
        raise KVSpliceError(f"checkpoint record {f} is not valid JSON: {e}") from e


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(Path(path) / "tokenizer.json"))


def load_model_weights(path: str | Path, model) -> None:
    tensors = load_file(str(Path(path) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}")


def load_training_state(path: str | Path, model, opt, gen: torch.Generator) -> None:
    """Optimizer moments, RNG states and pruner EMA buffers (model weights via load_model_weights)."""
    path = Path(path)
    names = dict(model.named_parameters())
    opt_t = load_file(str(path / "optimizer.safetensors"))
    for key, t in opt_t.items():
        pname, _, field = key.rpartition(".")
        if pname not in names:
            raise ModelError(f"optimizer state names unknown parameter {pname!r}")
        opt.state[names[pname]][field] = t
    st = load_file(str(path / "state.safetensors"))
    torch.set_rng_state(st["rng.torch"])
    gen.set_state(st["rng.batches"])
    for i, attn in enumerate(model.attention_modules()):
        if attn.pruner is not None and f"pruner.{i}.ema_importance" in st:
            attn.pruner.ema_importance = st[f"pruner.{i}.ema_importance"].to(attn.c_attn.weight.device)
            attn.pruner.ema_step = st[f"pruner.{i}.ema_step"]


def load_checkpoint(path: str | Path, device: str = "cpu"):
    """-> (GPT model with weights and geometry installed, tokenizers.Tokenizer, record)."""
    from kvsplice.train.model import GPT

    record = read_record(path)
    cfg = from_dict({**record["config"], "device": device})
    torch.manual_seed(cfg.seed)
    model = GPT(cfg).to(device)
    load_model_weights(path, model)
    if (Path(path) / GEOMETRY).is_file():
        from kvsplice.geometry import load_geometry
        from kvsplice.train.calibration import install

        install(model, load_geometry(Path(path) / GEOMETRY))
    return model, load_tokenizer(path), record


def hf_config(cfg: TrainConfig, eot_id: int = 0):
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.block_size, n_embd=cfg.n_embd, n_layer=cfg.n_layer,
        n_head=cfg.n_head, activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        layer_norm_epsilon=1e-5, bos_token_id=eot_id, eos_token_id=eot_id, tie_word_embeddings=True,
    )


def load_checkpoint_as_hf(path: str | Path, allow_modified_attention: bool = False):
    """-> (transformers GPT2LMHeadModel in eval mode, PreTrainedTokenizerFast).

    Raises ModelError for RA / learned-compression checkpoints (GPT-2 has no such parameters) and,
    unless allow_modified_attention, for pruning / KVSplice variants (their weights load, but the
    HF model would run plain attention, not what they were trained with)."""
    from transformers import GPT2LMHeadModel

    from kvsplice.train.textdata import hf_tokenizer

    record = read_record(path)
    cfg = from_dict(record["config"])
    if cfg.ra_enable or cfg.learned_enable:
        raise ModelError(f"checkpoint {path} ({cfg.name}) uses reciprocal attention / learned compression, "
                         "which GPT2LMHeadModel cannot represent; expected a V0-style checkpoint")
    if (cfg.prune_enable or cfg.kvsplice_enable) and not allow_modified_attention:
        raise ModelError(f"checkpoint {path} ({cfg.name}) was trained with pruning / a V codec in attention; "
                         "GPT2LMHeadModel would run plain attention (pass allow_modified_attention=True to accept)")
    tok = load_tokenizer(path)
    model = GPT2LMHeadModel(hf_config(cfg, tok.token_to_id("<|endoftext|>") or 0))
    tensors = load_file(str(Path(path) / "model.safetensors"))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if m != "lm_head.weight"]
    if missing or unexpected:
        raise ModelError(f"checkpoint {path} does not load into GPT2LMHeadModel: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    return model.eval(), hf_tokenizer(tok)


def export_hf(path: str | Path, out: str | Path, allow_modified_attention: bool = False) -> Path:
    """Write `load_checkpoint_as_hf(path)` as a transformers folder (config.json, model.safetensors,
    tokenizer files) loadable with from_pretrained / kvsplice.loading.load_model."""
    model, tok = load_checkpoint_as_hf(path, allow_modified_attention)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
