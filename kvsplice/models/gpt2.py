"""GPT-2 (`GPT2LMHeadModel` / `GPT2Model`): one fused `c_attn` Conv1D gives (B, T, 3C) = [q | k | v];
all heads are KV heads (no grouping), head_dim = C / n_head, no RoPE (learned absolute positions).

transformers' GPT-2 hands K/V to `cache.update` like every family, so `capture()` takes them there;
the `c_attn` hook (`capture_hooks`) serves kvsplice.train's GPT, which has no Cache."""

from __future__ import annotations

import torch
from torch import nn

from kvsplice.models.base import ModelAdapter, find_attr


class GPT2Adapter(ModelAdapter):
    model_types = ("gpt2",)

    @property
    def num_layers(self) -> int:
        return int(self.config.n_layer)

    @property
    def num_q_heads(self) -> int:
        return int(self.config.n_head)

    @property
    def num_kv_heads(self) -> int:
        return int(self.config.n_head)

    @property
    def head_dim(self) -> int:
        return int(self.config.n_embd) // int(self.config.n_head)

    def attention_modules(self) -> list[nn.Module]:
        return [block.attn for block in find_attr(self.model, ["transformer.h", "h"])]

    def _hook_module(self, layer_idx: int, target: str) -> nn.Module:
        return self.attention_modules()[layer_idx].c_attn

    def _split(self, out: torch.Tensor, target: str) -> torch.Tensor:
        C = int(self.config.n_embd)
        part = out[..., C : 2 * C] if target == "k" else out[..., 2 * C : 3 * C]  # (B, T, C)
        return self._heads(part)  # (B, H, T, head_dim)
