"""In-forward V-only pruning with the seed's `VOnlyPruner` semantics, plus the score-reuse variant.

Pure tensor math (no transformers). Shapes: B batch, H heads, T tokens, D head_dim, k kept tokens.

V-only ("v_only"): one set of full causal scores, ONE softmax:
    attn = softmax(q k^T / sqrt(D) + causal mask)                       # (B, H, T, T)
    importance[j] = sum_i attn[i, j] / (T - j)    (exposure correction)  # (B, H, T)
                  = mean_i attn[i, j]             (without it; the seed divides by T)
    importance[..., -recency:] = 1.0              (recency forcing; skipped when T <= recency)
    importance  <- EMA over steps (optional; see `VOnlyPruner._ema`)
    idx = topk(importance, k),  k = min(T, max(k_min, int(keep_ratio * T)))   # (B, H, k)
    attn_kept = attn[..., idx] / (attn[..., idx].sum(-1) + 1e-10)         # (B, H, T, k)
    out = attn_kept @ V[idx]                                              # (B, H, T, D)
K is never pruned (every query still scores every key); only the V rows outside idx are dropped,
so a cache holds K for all T tokens and V for k tokens (+ the k indices).

Score reuse ("kv_scores_reuse"): same idx, but the kept *scores* are gathered and re-softmaxed
(K and V both pruned, no second q @ K_keep GEMM):  out = softmax(scores[..., idx]) @ V[idx].

Differences from the seed's code, on purpose:
- The causal mask is applied before the softmax. The seed's `VOnlyPruner.forward` shows no mask,
  but its exposure correction (T - j queries see key j) assumes causal attention, and a maskless
  softmax in a causal LM leaks future tokens.
- In score-reuse mode a query row whose kept keys are all in its future gets a zero output
  instead of the NaN a softmax over all -inf would give.
- The EMA is used and updated only while the module is in training mode (`ema_in_eval=False`,
  default): validation perplexity then depends on the sequence itself, not on which batches were
  evaluated before it. Set `ema_in_eval=True` for the seed's behaviour (EMA in every forward).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from kvsplice.errors import KVSpliceError

MODES = ("v_only", "kv_scores_reuse")


@dataclass
class PruneConfig:
    """Seed defaults: keep_ratio 0.382 (~1/(1+phi)), k_min 64, recency 64, exposure correction on,
    EMA momentum 0.9 updated every 8 steps."""

    keep_ratio: float = 0.382
    k_min: int = 64
    recency: int = 64
    exposure_correction: bool = True
    ema_momentum: float = 0.9  # 0 disables the EMA
    ema_update_interval: int = 8
    mode: str = "v_only"
    ema_in_eval: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < float(self.keep_ratio) <= 1.0:
            raise KVSpliceError(f"keep_ratio must be in (0, 1], got {self.keep_ratio!r}")
        for name in ("k_min", "recency", "ema_update_interval"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 0 or (name == "ema_update_interval" and v < 1):
                raise KVSpliceError(f"{name} must be a non-negative integer (interval >= 1), got {v!r}")
        if not 0.0 <= float(self.ema_momentum) < 1.0:
            raise KVSpliceError(f"ema_momentum must be in [0, 1), got {self.ema_momentum!r}")
        if self.mode not in MODES:
            raise KVSpliceError(f"pruning mode must be one of {MODES}, got {self.mode!r}")

    def kept(self, T: int) -> int:
        """Number of V tokens kept out of T: min(T, max(k_min, int(keep_ratio * T)))."""
        return min(T, max(self.k_min, int(T * float(self.keep_ratio))))


def causal_mask(T: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(T, T) bool, True where query i may see key j (j <= i)."""
    return torch.ones(T, T, dtype=torch.bool, device=device).tril()


def causal_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q, k: (B, H, T, D) -> scaled scores (B, H, T, T) with -inf above the diagonal."""
    T, D = q.shape[-2], q.shape[-1]
    scores = (q @ k.transpose(-2, -1)) * (D ** -0.5)  # (B, H, T, T)
    return scores.masked_fill(~causal_mask(T, q.device), float("-inf"))


def importance_scores(attn: torch.Tensor, exposure_correction: bool) -> torch.Tensor:
    """attn: (B, H, T, T) post-softmax, rows = queries -> importance of each key/V token (B, H, T)."""
    T = attn.shape[-1]
    col_mass = attn.sum(dim=-2)  # (B, H, T): total attention token j receives
    if not exposure_correction:
        return col_mass / attn.shape[-2]
    exposure = torch.arange(T, 0, -1, device=attn.device, dtype=attn.dtype).clamp_min(1.0)  # (T,) = T - j
    return col_mass / exposure


def force_recency(importance: torch.Tensor, recency: int) -> torch.Tensor:
    """Set the last `recency` positions to 1.0 (the maximum an importance can reach), as the seed."""
    T = importance.shape[-1]
    if recency <= 0 or T <= recency:
        return importance
    importance = importance.clone()
    importance[..., -recency:] = 1.0
    return importance


def gather_columns(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, T), idx: (B, H, k) -> x[..., idx] (B, H, T, k)."""
    B, H, T, _ = x.shape
    return torch.gather(x, -1, idx.unsqueeze(-2).expand(B, H, T, idx.shape[-1]))


def gather_tokens(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """v: (B, H, T, D), idx: (B, H, k) -> v[:, :, idx] (B, H, k, D)."""
    return torch.gather(v, 2, idx.unsqueeze(-1).expand(*idx.shape, v.shape[-1]))


def renormalise(attn_kept: torch.Tensor) -> torch.Tensor:
    """Rows of the kept attention columns rescaled to sum to 1 (the seed's +1e-10 guard)."""
    return attn_kept / (attn_kept.sum(dim=-1, keepdim=True) + 1e-10)


def softmax_kept_scores(scores_kept: torch.Tensor) -> torch.Tensor:
    """Softmax over gathered scores (B, H, T, k); rows with no visible kept key -> zeros (not NaN)."""
    visible = torch.isfinite(scores_kept)
    any_visible = visible.any(dim=-1, keepdim=True)
    safe = torch.where(any_visible, scores_kept, torch.zeros_like(scores_kept))
    return torch.softmax(safe, dim=-1) * any_visible


class VOnlyPruner(nn.Module):
    """Selects which V tokens to keep from the full attention probabilities.

    Holds the EMA state (buffers, saved with checkpoints by the trainer so resumes are exact):
    `ema_importance` (B, H, T) and `ema_step` (). `select(attn)` returns idx (B, H, k).
    """

    def __init__(self, cfg: PruneConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.register_buffer("ema_importance", torch.zeros(0), persistent=False)
        self.register_buffer("ema_step", torch.zeros((), dtype=torch.long), persistent=False)

    def _ema(self, importance: torch.Tensor) -> torch.Tensor:
        """The seed's EMA: reset (and return the current importance) when empty or the shape
        changed; otherwise update every `ema_update_interval` calls and return the EMA."""
        if self.ema_importance.numel() == 0 or self.ema_importance.shape != importance.shape:
            self.ema_importance = importance.detach().clone()
            self.ema_step = torch.zeros((), dtype=torch.long)
            return importance
        if int(self.ema_step) % self.cfg.ema_update_interval == 0:
            m = float(self.cfg.ema_momentum)
            self.ema_importance = m * self.ema_importance + (1.0 - m) * importance.detach()
        self.ema_step = self.ema_step + 1
        return self.ema_importance

    @torch.no_grad()
    def select(self, attn: torch.Tensor) -> torch.Tensor:
        """attn: (B, H, T, T) causal softmax probabilities -> kept token indices (B, H, k)."""
        importance = importance_scores(attn, self.cfg.exposure_correction)  # (B, H, T)
        importance = force_recency(importance, self.cfg.recency)
        if self.cfg.ema_momentum > 0 and (self.training or self.cfg.ema_in_eval):
            importance = self._ema(importance)
        k = self.cfg.kept(attn.shape[-1])
        return torch.topk(importance, k, dim=-1).indices  # (B, H, k)


def pruned_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pruner: VOnlyPruner,
    v_transform=None,
    strategy: str = "A",
    extra_branch=None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Attention with in-forward pruning.

    q, k, v: (B, H, T, D). v_transform: optional callable (B, H, n, D) -> (B, H, n, D) applied to
    V (a compress -> decompress round trip): Strategy "A" prunes then transforms the kept V,
    "B" transforms all V then selects (identical for per-vector codecs). extra_branch: optional
    (B, H, T, T) attention probabilities of a second branch (reciprocal attention) whose kept
    columns are renormalised and applied to the same kept V.
    Returns (out (B, H, T, D), extra (B, H, T, D) or None, idx (B, H, k), v_kept (B, H, k, D) as
    used in the product).
    """
    scores = causal_scores(q, k)  # (B, H, T, T)
    attn = torch.softmax(scores, dim=-1)
    idx = pruner.select(attn)  # (B, H, k)
    if strategy == "B" and v_transform is not None:
        v_kept = gather_tokens(v_transform(v), idx)  # (B, H, k, D)
    else:
        v_kept = gather_tokens(v, idx)
        if v_transform is not None:
            v_kept = v_transform(v_kept)
    if pruner.cfg.mode == "v_only":
        attn_kept = renormalise(gather_columns(attn, idx))  # (B, H, T, k)
    else:
        attn_kept = softmax_kept_scores(gather_columns(scores, idx))
    out = attn_kept @ v_kept  # (B, H, T, D)
    extra = None
    if extra_branch is not None:
        extra = renormalise(gather_columns(extra_branch, idx)) @ v_kept  # (B, H, T, D)
    return out, extra, idx, v_kept
