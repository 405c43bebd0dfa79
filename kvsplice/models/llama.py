"""Llama family (Llama, Mistral, Qwen2): separate `k_proj` / `v_proj` Linear layers with grouped-query
attention (`num_key_value_heads` KV heads shared by `num_attention_heads` query heads).
K is the `k_proj` output, i.e. before the rotary embedding."""

from __future__ import annotations

import torch
from torch import nn

from kvsplice.models.base import ModelAdapter, find_attr


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2")

    @property
    def num_layers(self) -> int:
        return int(self.config.num_hidden_layers)

    @property
    def num_q_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        n = getattr(self.config, "num_key_value_heads", None)
        return int(n if n is not None else self.config.num_attention_heads)

    @property
    def head_dim(self) -> int:
        d = getattr(self.config, "head_dim", None)
        return int(d if d else self.config.hidden_size // self.config.num_attention_heads)

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in find_attr(self.model, ["model.layers", "layers"])]

    def _hook_module(self, layer_idx: int, target: str) -> nn.Module:
        attn = self.attention_modules()[layer_idx]
        return attn.k_proj if target == "k" else attn.v_proj

    def _split(self, out: torch.Tensor, target: str) -> torch.Tensor:
        return self._heads(out)  # (B, H_kv, T, head_dim)
