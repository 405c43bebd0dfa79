"""Decoder families built like Llama: `model.layers[i].self_attn`, grouped-query attention
(`num_key_value_heads` KV heads shared by `num_attention_heads` query heads), RoPE passed to every
attention as `position_embeddings`. K and V are captured where the cache receives them
(kvsplice/capture.py), so the families' differences need no code here:

    llama, mistral, qwen2 : separate k_proj / v_proj
    qwen3, gemma3_text    : per-head RMSNorm on K after k_proj (captured after it)
    gemma3_text           : sliding-window and global layers with different rotary tables
    phi3                  : one fused qkv_proj; partial rotary where configured

The projection-hook fallback (`capture_hooks`) only exists where K is a plain projection output."""

from __future__ import annotations

import torch
from torch import nn

from kvsplice.errors import ModelError
from kvsplice.models.base import ModelAdapter, find_attr


class LlamaAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "phi3")

    @property
    def text_config(self):
        cfg = self.config
        return cfg.get_text_config(decoder=True) if hasattr(cfg, "get_text_config") else cfg

    @property
    def num_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    @property
    def num_q_heads(self) -> int:
        return int(self.text_config.num_attention_heads)

    @property
    def num_kv_heads(self) -> int:
        n = getattr(self.text_config, "num_key_value_heads", None)
        return int(n if n is not None else self.num_q_heads)

    @property
    def head_dim(self) -> int:
        d = getattr(self.text_config, "head_dim", None)
        return int(d if d else self.text_config.hidden_size // self.num_q_heads)

    def attention_modules(self) -> list[nn.Module]:
        return [layer.self_attn for layer in find_attr(self.model, ["model.layers", "layers"])]

    def _hook_module(self, layer_idx: int, target: str) -> nn.Module:
        attn = self.attention_modules()[layer_idx]
        name = "k_proj" if target == "k" else "v_proj"
        if not hasattr(attn, name) or (target == "k" and hasattr(attn, "k_norm")):
            raise ModelError(
                f"{type(attn).__name__}: the {target.upper()} the cache holds is not a plain {name} output "
                "(fused projection or K norm); capture it at the cache with capture()"
            )
        return getattr(attn, name)

    def _split(self, out: torch.Tensor, target: str) -> torch.Tensor:
        return self._heads(out)  # (B, H_kv, T, head_dim)
