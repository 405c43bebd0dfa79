"""Reciprocal attention (RA): a second, "swapped" causal attention branch gated by a learned beta.

    y = SDPA(q, k, v, causal) + tanh(beta) * LN(SDPA(k, q, v, causal))

The reciprocal branch lets position i use its *key* k_i as a query against the *queries* q_j of
positions j <= i (the score matrix is the transpose of the usual one, masked causally again), and
mixes the values v_j with those weights. beta is one scalar per RA layer, initialised at 0, so RA
starts disabled (tanh(0) = 0 exactly: the layer equals standard attention) and training decides.
LN is a LayerNorm over the merged heads (n_embd), applied before the output projection c_proj.

Memory at decode time: the reciprocal branch of a new token attends over the *queries* of all
past tokens, so an RA layer must cache Q as well as K and V: + H * D values per token per RA
layer (for GPT-2 124M: +50 % of that layer's KV cache). The ablation counts these bytes in
`kv_bytes_per_token`. When V is pruned (V21), the reciprocal branch uses the same kept V tokens
as the standard branch (its kept columns renormalised the same way), since pruned V is gone.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvsplice.train.prune import causal_scores


class ReciprocalBranch(nn.Module):
    """Parameters: `beta` (1,) initialised 0, `ln` LayerNorm(n_embd)."""

    def __init__(self, n_embd: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.beta = nn.Parameter(torch.zeros(1))
        self.ln = nn.LayerNorm(n_embd, eps=eps)

    @staticmethod
    def probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """(B, H, T, D) x2 -> the reciprocal branch's causal attention probabilities (B, H, T, T):
        softmax_j(k_i . q_j / sqrt(D)) for j <= i."""
        return torch.softmax(causal_scores(k, q), dim=-1)

    @staticmethod
    def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Unpruned reciprocal branch: SDPA(k, q, v, causal) -> (B, H, T, D)."""
        return F.scaled_dot_product_attention(k, q, v, is_causal=True)

    def mix(self, y: torch.Tensor, y_reciprocal: torch.Tensor) -> torch.Tensor:
        """y, y_reciprocal: merged heads (B, T, n_embd) -> y + tanh(beta) * LN(y_reciprocal)."""
        return y + torch.tanh(self.beta) * self.ln(y_reciprocal)


def middle_third(n_layer: int) -> list[int]:
    """Default RA layers: the middle third, e.g. 12 layers -> [4..7], 4 layers -> [1, 2]."""
    lo, hi = n_layer // 3, n_layer - n_layer // 3
    return list(range(lo, hi)) if hi > lo else [n_layer // 2]
