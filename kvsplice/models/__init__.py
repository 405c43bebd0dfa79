"""Model adapters: one per architecture family, chosen by `config.model_type`.

    get_adapter(model) -> ModelAdapter   (ModelError naming what is missing for anything else)

K and V are captured where transformers' Cache receives them (kvsplice/capture.py), so a family built
like Llama only needs its model_type listed (after a tiny-config test: tests/test_model_types.py).
"""

from __future__ import annotations

import inspect

from torch import nn

from kvsplice.errors import ModelError
from kvsplice.models.base import Capture, ModelAdapter
from kvsplice.models.gpt2 import GPT2Adapter
from kvsplice.models.llama import LlamaAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {t: cls for cls in (GPT2Adapter, LlamaAdapter) for t in cls.model_types}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def missing_parts(model: nn.Module) -> list[str]:
    """What a model lacks for kvsplice's Llama-style capture (empty: the structure looks compatible)."""
    cfg = getattr(model, "config", None)
    if cfg is None:
        return ["a transformers `config`"]
    text = cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg
    missing = [f"config.{f}" for f in ("num_hidden_layers", "num_attention_heads") if getattr(text, f, None) is None]
    fwd = getattr(model, "forward", None)
    if fwd is None or not {"cache", "past_key_values"} & set(inspect.signature(fwd).parameters):
        missing.append("a `cache` argument in forward (transformers' Cache)")
    layers = None
    for path in ("model.layers", "layers"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            layers = obj
            break
        except AttributeError:
            continue
    if layers is None:
        missing.append("a decoder-layer list at model.layers")
    elif not all(hasattr(layer, "self_attn") for layer in layers):
        missing.append("a `self_attn` module in every decoder layer")
    else:
        params = [set(inspect.signature(layer.self_attn.forward).parameters) for layer in layers]
        if not all({"cache", "past_key_values"} & p for p in params):
            missing.append("attention that hands K/V to `cache.update` (a `cache` argument)")
        if not all("position_embeddings" in p for p in params):
            missing.append("rotary `position_embeddings` passed to attention")
    return missing


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`, chosen by `model.config.model_type`."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in ADAPTERS:
        missing = missing_parts(model)
        found = (
            f"it lacks: {'; '.join(missing)}"
            if missing
            else "its structure looks Llama-like, but this model type is untested here: add it to "
            "LlamaAdapter.model_types with a tiny-config test (tests/test_model_types.py)"
        )
        raise ModelError(
            f"unsupported model type {mtype!r} ({type(model).__name__}): {found}; "
            f"supported model types: {supported_model_types()}"
        )
    return ADAPTERS[mtype](model)


__all__ = ["ADAPTERS", "Capture", "ModelAdapter", "get_adapter", "missing_parts", "supported_model_types"]
