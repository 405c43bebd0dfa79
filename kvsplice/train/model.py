"""A nanoGPT-sized GPT-2 with the exact parameter names and layouts of transformers' GPT2LMHeadModel.

Weight names (`transformer.wte`, `transformer.h.{i}.attn.c_attn`, ...) and the Conv1D layout
(weight (in, out), y = x @ W + b; c_attn's output = [q | k | v] along the last axis) match
transformers', so a plain checkpoint (V0) loads into GPT2LMHeadModel unchanged
(`kvsplice.train.checkpoint.load_checkpoint_as_hf`) and the GPT-2 model adapter's c_attn hooks see
the same tensors. Activation gelu_new (tanh approximation), LayerNorm eps 1e-5, tied lm_head.

Per attention layer, optional and independent:
- `ra`       ReciprocalBranch (extra parameters `attn.ra.beta`, `attn.ra.ln.*`)      see ra.py
- `pruner`   VOnlyPruner (EMA buffers only)                                            see prune.py
- `v_transform`: what V passes through before attention: a frozen codec round trip
             (CodecVTransform, from a geometry) or a LearnedVCompressor (`attn.learned.*`).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kvsplice.train.config import TrainConfig
from kvsplice.train.learned import LearnedVCompressor
from kvsplice.train.prune import VOnlyPruner, pruned_attention
from kvsplice.train.ra import ReciprocalBranch, middle_third


class Conv1D(nn.Module):
    """transformers' GPT-2 Conv1D: weight (nx, nf), y = x @ weight + bias."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.empty(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).view(*x.shape[:-1], self.nf)


class CodecVTransform:
    """Frozen per-head codecs of one layer applied as a compress -> decompress round trip.

    codecs: list of H fitted kvsplice codecs (one per head, D = head_dim). Not an nn.Module on
    purpose: codec tensors are calibration results, not trained parameters; gradients flow through
    the round trip to V (straight through the projection), never into the codec."""

    def __init__(self, codecs: list) -> None:
        self.codecs = codecs

    def encode(self, v: torch.Tensor) -> list[dict[str, torch.Tensor]]:
        """v: (B, H, n, D) -> one payload dict per head, each tensor (B, n, *)."""
        return [c.encode(v[:, h]) for h, c in enumerate(self.codecs)]

    def decode(self, payloads: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        return torch.stack([c.decode(p) for c, p in zip(self.codecs, payloads)], dim=1)  # (B, H, n, D)

    def __call__(self, v: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(v))

    def payload_nbytes(self, v: torch.Tensor) -> int:
        return sum(t.nbytes for p in self.encode(v) for t in p.values())


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TrainConfig, layer_idx: int, ra: bool) -> None:
        super().__init__()
        self.layer_idx, self.n_head, self.n_embd = layer_idx, cfg.n_head, cfg.n_embd
        self.c_attn = Conv1D(3 * cfg.n_embd, cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, cfg.n_embd)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        self.ra = ReciprocalBranch(cfg.n_embd) if ra else None
        self.pruner = VOnlyPruner(cfg.prune_config()) if cfg.prune_enable else None
        self.strategy = cfg.kvsplice_strategy
        self.learned = (
            LearnedVCompressor(cfg.head_dim, cfg.learned_k, cfg.learned_affine) if cfg.learned_enable else None
        )
        self.codec_transform: CodecVTransform | None = None
        self.record: dict[str, int] | None = None  # set to {} to record cache bytes of the next forward

    @property
    def v_transform(self):
        return self.learned if self.learned is not None else self.codec_transform

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, H, T, D)
        B, T, C = x.shape
        return x.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = (self._heads(t) for t in self.c_attn(x).split(self.n_embd, dim=2))  # (B, H, T, D)
        vt = self.v_transform
        extra = None
        if self.pruner is not None:
            ra_probs = self.ra.probs(q, k) if self.ra is not None else None
            out, extra, idx, _ = pruned_attention(q, k, v, self.pruner, vt, self.strategy, ra_probs)
        else:
            idx = None
            v_used = vt(v) if vt is not None else v
            out = F.scaled_dot_product_attention(q, k, v_used, is_causal=True)  # (B, H, T, D)
            if self.ra is not None:
                extra = self.ra.attend(q, k, v_used)
        if self.record is not None:
            self._record(q, k, v, idx)
        y = out.transpose(1, 2).reshape(B, T, C)
        if self.ra is not None:
            y = self.ra.mix(y, extra.transpose(1, 2).reshape(B, T, C))
        return self.resid_dropout(self.c_proj(y))

    @torch.no_grad()
    def _record(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor | None) -> None:
        """Bytes a decode-time cache would hold for this forward's tokens, from real tensors:
        K for every token, V (or its codec/learned payload) for the kept tokens, the kept indices,
        and Q for RA layers (the reciprocal branch needs past queries)."""
        from kvsplice.train.prune import gather_tokens

        v_kept = gather_tokens(v, idx) if idx is not None else v
        vt = self.v_transform
        self.record["k_bytes"] = k.nbytes
        self.record["v_bytes"] = vt.payload_nbytes(v_kept) if vt is not None else v_kept.nbytes
        self.record["index_bytes"] = idx.nbytes if idx is not None else 0
        self.record["q_bytes"] = q.nbytes if self.ra is not None else 0
        self.record["v_values_per_head"] = (
            (vt.payload_nbytes(v_kept) if vt is not None else v_kept.nbytes) // (v.element_size() * v.shape[0] * v.shape[1])
        )
        self.record["tokens"] = v.shape[0] * v.shape[2]


class MLP(nn.Module):
    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(4 * cfg.n_embd, cfg.n_embd)
        self.c_proj = Conv1D(cfg.n_embd, 4 * cfg.n_embd)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: TrainConfig, layer_idx: int, ra: bool) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.attn = CausalSelfAttention(cfg, layer_idx, ra)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, eps=1e-5)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """forward(idx (B, T) int64, targets (B, T) | None) -> (logits (B, T, V), loss | None)."""

    def __init__(self, cfg: TrainConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.config = cfg  # n_layer / n_head / n_embd / model_type "gpt2": the GPT-2 adapter works on it
        ra_layers = set(cfg.ra_layers if cfg.ra_layers is not None else middle_third(cfg.n_layer)) if cfg.ra_enable else set()
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(cfg.vocab_size, cfg.n_embd),
            wpe=nn.Embedding(cfg.block_size, cfg.n_embd),
            drop=nn.Dropout(cfg.dropout),
            h=nn.ModuleList([Block(cfg, i, i in ra_layers) for i in range(cfg.n_layer)]),
            ln_f=nn.LayerNorm(cfg.n_embd, eps=1e-5),
        ))
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as GPT-2
        self._init_weights()

    @property
    def ra_layers(self) -> list[int]:
        return [i for i, b in enumerate(self.transformer.h) if b.attn.ra is not None]

    def attention_modules(self) -> list[CausalSelfAttention]:
        return [b.attn for b in self.transformer.h]

    def _init_weights(self) -> None:
        # GPT-2 init: N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer). Uses the
        # global torch RNG, which the trainer seeds first (same seed -> same weights).
        std_proj = 0.02 / math.sqrt(2 * self.cfg.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, std_proj)
            elif name.endswith(("c_attn.weight", "c_fc.weight", "wte.weight", "wpe.weight")):
                nn.init.normal_(p, 0.0, 0.02)

    def set_codecs(self, per_layer: list[list] | None) -> None:
        """Install frozen per-head codecs (per_layer[l][h]) as the V round trip; None removes them."""
        for l, attn in enumerate(self.attention_modules()):
            attn.codec_transform = CodecVTransform(per_layer[l]) if per_layer is not None else None

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        if T > self.cfg.block_size:
            from kvsplice.errors import KVSpliceError

            raise KVSpliceError(f"sequence length {T} exceeds block_size {self.cfg.block_size}")
        pos = torch.arange(T, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        logits = self.lm_head(self.transformer.ln_f(x))  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1))
        return logits, loss
