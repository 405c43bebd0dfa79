"""Model adapters: one per architecture family, chosen by `config.model_type`.

    get_adapter(model) -> ModelAdapter   (ModelError for an unsupported architecture)
"""

from __future__ import annotations

from torch import nn

from kvsplice.errors import ModelError
from kvsplice.models.base import Capture, ModelAdapter
from kvsplice.models.gpt2 import GPT2Adapter
from kvsplice.models.llama import LlamaAdapter

ADAPTERS: dict[str, type[ModelAdapter]] = {t: cls for cls in (GPT2Adapter, LlamaAdapter) for t in cls.model_types}


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model: nn.Module) -> ModelAdapter:
    """The adapter for `model`, chosen by `model.config.model_type`."""
    cfg = getattr(model, "config", None)
    mtype = getattr(cfg, "model_type", None)
    if mtype not in ADAPTERS:
        raise ModelError(
            f"unsupported model architecture: model_type {mtype!r} ({type(model).__name__}); "
            f"supported model types: {supported_model_types()}"
        )
    return ADAPTERS[mtype](model)


__all__ = ["ADAPTERS", "Capture", "ModelAdapter", "get_adapter", "supported_model_types"]
