"""Attention in the coded domain: the "kvsplice-coded" attention reads V (and post-RoPE K) codec
payloads without decoding them row by row.

A transform coder without a warp decodes a row affinely (TransformQ.affine_form):

    x_t = g_t (c_t @ A + b) + mu        c_t (k,) stored codes as floats, g_t fp16 gain, A (k, D)

so for attention probabilities p_t over the payload rows (one query head, KV head slice h):

    V:  sum_t p_t x_t  = (sum_t p_t g_t c_t) @ A_h + (sum_t p_t g_t) b_h + (sum_t p_t) mu_h
    K:  q . x_t        = g_t (c_t . (A_h q)) + g_t (q . b_h) + q . mu_h

A weighted sum of codes (T x k per query head) replaces decoding (T x k x D per KV group) and the
projection back to D happens once per step. GQA: the G query heads of a KV group are stacked as
rows of one matmul, so each group's codes are read once. K codecs applied before RoPE
(kvsplice/kcodec.py: RoPE sits between decode and dot product) keep the decode path: their rows are
decoded (one layer at a time, the codec's one-matmul decode) and RoPE'd as before.

Use:
    cache = CompressedCache.from_geometry(model, v_geometry, k_geometry, sink=1)
    with coded_attention(model, cache):
        model.generate(ids, past_key_values=cache, ...)

The reference is the same cache without it (decode then the model's attention); tests assert both
give the same logits. Transient memory: codes of one layer as floats (B, P, k) plus one layer's
decoded K where K is coded before RoPE; float V is never materialised.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kvsplice import native
from kvsplice.codecs.packing import Layout, transposed_plan, unpack_fast_t
from kvsplice.errors import KVSpliceError, ModelError

NAME = "kvsplice-coded"
NATIVE_MAX_ROWS = 64  # query rows per group above which (prefill chunks) the torch matmuls run instead:
# the C kernels are built for decode (a few rows per KV group); their scratch grows with the rows


@dataclass
class AffineGroup:
    """One codec of a layer in affine form, covering KV heads h0 .. h0 + n - 1.
    A: (n, k, hd) (rows in `unpack_fast_t` order), b, mu: (n, 1, hd), all float32; payload index
    `slot` (H' axis)."""

    h0: int
    n: int
    slot: int
    lay: Layout
    A: torch.Tensor
    b: torch.Tensor
    mu: torch.Tensor
    gain: bool
    native: Any = None  # kvsplice.native.CodeOrder (codes in A's row order) when the C kernels run here
    Aext: torch.Tensor | None = None  # (n, k + 2, hd): [A; b; mu], for the C kernels


def affine_groups(layer_codec: Any) -> list[AffineGroup] | None:
    """The affine groups of a LayerCodec (cached on it), or None when a codec is not affine
    (a warp), the LayerCodec is position-aware (K coded before RoPE) or predicted from the previous
    layer (kvsplice/codecs/xpred.py: the decode adds the prediction)."""
    if getattr(layer_codec, "position_aware", False) or getattr(layer_codec, "predictive", False):
        return None  # pre-RoPE K: RoPE between decode and dot; cross-layer prediction: not affine in the codes
    cached = getattr(layer_codec, "_affine_groups", None)
    if cached is not None:
        return cached or None
    groups: list[AffineGroup] = []
    hd = layer_codec.head_dim
    for slot, codec in enumerate(layer_codec.codecs):
        form = codec.affine_form() if hasattr(codec, "affine_form") else None
        if form is None:
            groups = []
            break
        lay, A, b, mu = form
        order = transposed_plan(lay).order
        A = A[order.to(A.device)]  # rows in the order unpack_fast_t returns codes
        n = layer_codec.num_heads if layer_codec.joint else 1
        k = A.shape[0]
        An = A.view(k, n, hd).permute(1, 0, 2).contiguous()  # (n, k, hd)
        fast = A.device.type == "cpu" and native.available()
        groups.append(AffineGroup(
            h0=0 if layer_codec.joint else slot, n=n, slot=slot, lay=lay, A=An,
            b=b.view(n, 1, hd), mu=mu.view(n, 1, hd), gain=codec.scale == "gain",
            native=native.code_order(lay, order) if fast else None,
            Aext=torch.cat([An, b.view(n, 1, hd), mu.view(n, 1, hd)], dim=1).float().contiguous() if fast else None,
        ))
    layer_codec._affine_groups = groups
    return groups or None


class CodedRows:
    """K or V rows of one layer in token order: payload rows (coded: {name: (B, H', P, *)}), then
    `raw` exact rows (B, H, R, D); where the cache keeps a sink, the exact rows `sink_head`
    (B, H, n, D) replace rows `sink_rows` (B, n) (-1: empty slot) of each sequence. Handed to the
    attention function instead of a float tensor; `materialize()` is what the cache would return."""

    def __init__(self, rows: Any, groups: list[AffineGroup]) -> None:
        self.rows, self.groups = rows, groups
        self.payload, self.raw = rows.payload, rows.raw
        self.num_payload = rows.num_payload
        self.num_rows = self.num_payload + self.raw.shape[2]
        self.num_heads = self.raw.shape[1]
        tokens = getattr(rows, "tokens", None)
        sink_rows = getattr(tokens, "sink_rows", None)
        self.sink_head = rows.head if (rows.head is not None and sink_rows is not None) else None
        self.sink_rows = sink_rows if self.sink_head is not None else None

    def materialize(self) -> torch.Tensor:
        return self.rows.read()

    def codes(self, g: AffineGroup) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Stored codes of group g, TRANSPOSED: (B, k, P) float32, and gains (B, 1, P) float32 (None
        without gain). Unpacked once per call: K and V each read their codes once per layer step."""
        return unpack_fast_t(self.packed(g), g.lay, torch.float32), self.gain(g)

    def packed(self, g: AffineGroup) -> torch.Tensor:
        """The bit-packed codes of group g: (B, P, nbytes) uint8 (a view of the payload)."""
        return self.payload["codes"][:, g.slot]

    def gain(self, g: AffineGroup) -> torch.Tensor | None:
        """Gains of group g (B, 1, P) float32, None without gain."""
        return self.payload["gain"][:, g.slot].float().transpose(1, 2) if g.gain else None

    def gain_rows(self, g: AffineGroup) -> torch.Tensor | None:
        """Gains of group g as stored, (B, P) fp16 (a view), None without gain."""
        return self.payload["gain"][:, g.slot, :, 0] if g.gain else None

    def sink_span(self) -> tuple[int, int] | None:
        """(c, n) when every sequence's n sink rows are the same valid columns c .. c + n - 1 (the
        common case: no padding, sink = the first tokens): slicing replaces the scatter of
        `sink_index`. None otherwise (or without a sink)."""
        if self.sink_rows is None:
            return None
        cols = self.sink_rows.tolist()  # (B, n): a few ints
        c, n = cols[0][0], len(cols[0])
        if c < 0 or c + n > self.num_rows or any(row != list(range(c, c + n)) for row in cols):
            return None
        return c, n

    def sink_index(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(index (B, 1, 1, n) into S + 1 columns: empty slots point at the extra column S, valid (B, 1, 1, n))."""
        if self.sink_rows is None:
            return None
        r = self.sink_rows
        valid = (r >= 0) & (r < self.num_rows)
        return torch.where(valid, r, self.num_rows)[:, None, None, :], valid[:, None, None, :]


def coded_rows(rows: Any) -> Any:
    """What `CompressedLayer.update` returns under coded attention: a CodedRows when `rows` holds an
    affine payload, else the float rows (`rows.read()`: no codec, a warp, or K coded before RoPE)."""
    if rows.codec is None or rows.payload is None:
        return rows.read()
    groups = affine_groups(rows.codec)
    return rows.read() if groups is None else CodedRows(rows, groups)


# -- the attention function -------------------------------------------------------------------------


def _overwrite(x: torch.Tensor, idx: torch.Tensor, src: torch.Tensor | float) -> torch.Tensor:
    """x (..., S) with columns idx (B, 1, 1, n) (S = an extra column that is dropped) set to src."""
    ext = torch.cat([x, x.new_zeros(*x.shape[:-1], 1)], dim=-1)
    return ext.scatter(-1, idx.expand(*x.shape[:-1], idx.shape[-1]), src)[..., :-1]


def _coded_scores(qg: torch.Tensor, key: "CodedRows") -> torch.Tensor:
    """Scores of the payload rows: qg (B, H, Gq, D) -> (B, H, Gq, P). The n * Gq query rows of a
    group are one matmul against the group's codes (read once for all its query heads)."""
    parts = []
    B, _, Gq, _ = qg.shape
    for g in key.groups:  # one affine group per codec (joint: all heads)
        qh = qg[:, g.h0 : g.h0 + g.n]  # (B, n, Gq, hd)
        if g.native is not None and g.n * Gq <= NATIVE_MAX_ROWS:  # C kernel: (A q . c_t + q . b) g_t + q . mu straight from the packed bytes
            qa = (qh @ g.Aext.transpose(1, 2)).reshape(B, g.n * Gq, -1)  # (B, n*Gq, k + 2)
            parts.append(native.scores(key.packed(g), g.native, qa, key.gain_rows(g)).view(B, g.n, Gq, -1))
            continue
        qa = (qh @ g.A.transpose(1, 2)).reshape(B, g.n * Gq, -1)  # A_h q  (B, n*Gq, k)
        codes, gain = key.codes(g)  # (B, k, P), (B, 1, P)
        s = (qa @ codes).view(B, g.n, Gq, -1)  # (B, n, Gq, P)
        s = s + qh @ g.b.transpose(1, 2)  # + q . b_h  (B, n, Gq, 1)
        if gain is not None:
            s = s * gain[:, None]  # times g_t
        parts.append(s + qh @ g.mu.transpose(1, 2))  # + q . mu_h
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _scores(qg: torch.Tensor, key: Any) -> torch.Tensor:
    """qg (B, H, G*q, D) float32, key Tensor | CodedRows -> raw scores (B, H, G*q, S) float32."""
    if isinstance(key, torch.Tensor):
        return qg @ key.float().transpose(2, 3)
    s = torch.cat([_coded_scores(qg, key), qg @ key.raw.float().transpose(2, 3)], dim=-1)
    span = key.sink_span()
    if span is not None:  # exact scores of the sink rows, same columns in every sequence: a slice
        c, n = span
        s[..., c : c + n] = qg @ key.sink_head.float().transpose(2, 3)
        return s
    sink = key.sink_index()
    if sink is not None:  # exact scores of the sink rows
        s = _overwrite(s, sink[0], qg @ key.sink_head.float().transpose(2, 3))
    return s


def _weighted_values(p: torch.Tensor, value: Any) -> torch.Tensor:
    """p (B, H, G*q, S) float32, value Tensor | CodedRows -> (B, H, G*q, D) float32."""
    if isinstance(value, torch.Tensor):
        return p @ value.float()
    out = None
    span = value.sink_span()
    sink = value.sink_index() if span is None else None
    if span is not None:  # the same sink columns in every sequence: slices (p is ours: zeroed in place)
        c, n = span
        out = p[..., c : c + n] @ value.sink_head.float()
        p[..., c : c + n] = 0.0
    elif sink is not None:  # sink rows: their probability goes to the exact rows, not to the decoded ones
        idx, valid = sink
        p_sink = p.gather(-1, idx.clamp_max(value.num_rows - 1).expand(*p.shape[:-1], idx.shape[-1])) * valid
        out = p_sink @ value.sink_head.float()
        p = _overwrite(p, idx, 0.0)
    P = value.num_payload
    heads = []
    B, _, Gq, _ = p.shape
    for g in value.groups:
        ph = p[:, g.h0 : g.h0 + g.n, :, :P]  # (B, n, Gq, P)
        if g.native is not None and g.n * Gq <= NATIVE_MAX_ROWS:  # C kernel: [sum p g c, sum p g, sum p] from the packed bytes, then one matmul
            c = native.weighted(value.packed(g), g.native, ph.reshape(B, g.n * Gq, P), value.gain_rows(g))
            heads.append(c.view(B, g.n, Gq, -1) @ g.Aext)
            continue
        codes, gain = value.codes(g)  # (B, k, P), (B, 1, P)
        w = ph if gain is None else ph * gain[:, None]  # p_t g_t
        c = (w.reshape(B, g.n * Gq, P) @ codes.transpose(1, 2)).view(B, g.n, Gq, -1)  # sum_t p_t g_t c_t
        heads.append(c @ g.A + w.sum(-1, keepdim=True) * g.b + ph.sum(-1, keepdim=True) * g.mu)
    o = torch.cat(heads, dim=1) if len(heads) > 1 else heads[0]
    if value.raw.shape[2]:
        o = o + p[..., P:] @ value.raw.float()
    return o if out is None else o + out


def _decode_step(qg: torch.Tensor, key: "CodedRows", value: "CodedRows", allowed: torch.Tensor, scaling: float) -> torch.Tensor | None:
    """One decode step (q = 1) with every row in the payloads and every group on the C kernels: per
    group one C call for the scores (sink, scaling, mask inside), the softmax, one C call for the
    values (sink rows, [A; b; mu] inside). qg (B, H, G, D) -> (B, H, G, D) float32, or None when this
    does not apply (raw rows, another layout): the general path runs."""
    B, H, G, D = qg.shape
    P = key.num_payload
    if key.raw.shape[2] or value.raw.shape[2] or value.num_payload != P or (key.sink_head is None) != (value.sink_head is None):
        return None
    if any(g.native is None or g.n * G > NATIVE_MAX_ROWS for g in (*key.groups, *value.groups)):
        return None
    al = allowed.reshape(allowed.shape[0], allowed.shape[-1])  # (B | 1, P): q = 1
    al = None if bool(al.all()) else al.expand(B, P)
    sink_col = None
    if key.sink_rows is not None:
        r = key.sink_rows
        sink_col = torch.where((r >= 0) & (r < P), r, torch.full_like(r, -1)).long()  # (B, ns), -1: empty slot
    s = qg.new_empty(B, H, G, P)
    for g in key.groups:
        qh = qg[:, g.h0 : g.h0 + g.n]  # (B, n, G, D)
        qa = (qh @ g.Aext.transpose(1, 2)).reshape(B, g.n * G, -1)  # (B, n*G, k + 2)
        ss = None if sink_col is None else (qh @ key.sink_head[:, g.h0 : g.h0 + g.n].float().transpose(2, 3)).reshape(B, g.n * G, -1)
        s[:, g.h0 : g.h0 + g.n] = native.step_scores(key.packed(g), g.native, qa, key.gain_rows(g), ss, sink_col, al, scaling).view(B, g.n, G, P)
    p = nn.functional.softmax(s, dim=-1)
    out = qg.new_empty(B, H, G, D)
    for g in value.groups:
        ph = p[:, g.h0 : g.h0 + g.n].reshape(B, g.n * G, P).contiguous()  # modified by the kernel (sink columns)
        sv = None if sink_col is None else value.sink_head[:, g.h0 : g.h0 + g.n]
        out[:, g.h0 : g.h0 + g.n] = native.step_values(value.packed(g), g.native, ph, value.gain_rows(g), sink_col, sv, g.Aext).view(B, g.n, G, D)
    return out


def coded_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: Any,
    value: Any,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query (B, Hq, q, D); key / value: (B, H, S, D) tensors or CodedRows (same S, token order).
    Returns (B, q, Hq, D) in query's dtype and no probabilities. Logit soft-capping (Gemma 2) and
    attention-sink logits (gpt-oss `s_aux`) are not implemented: refused, never ignored."""
    from kvsplice.attention import _allowed

    for name in ("softcap", "s_aux", "sinks"):
        if kwargs.get(name) is not None:
            raise ModelError(f"{NAME} attention does not implement {name!r} (this model passes one): use the reference path")

    B, Hq, q, D = query.shape
    H = key.num_heads if isinstance(key, CodedRows) else key.shape[1]
    S = key.num_rows if isinstance(key, CodedRows) else key.shape[2]
    Sv = value.num_rows if isinstance(value, CodedRows) else value.shape[2]
    if Hq % H or S != Sv:
        raise ModelError(f"{NAME} attention: {Hq} query heads over {H} KV heads, {S} key rows and {Sv} value rows")
    G = Hq // H
    qg = query.float().reshape(B, H, G * q, D)  # query head h*G + j -> rows j*q .. j*q + q - 1 of group h
    scale = D**-0.5 if scaling is None else scaling
    if q == 1 and isinstance(key, CodedRows) and isinstance(value, CodedRows) and not (module.training and dropout):
        allowed = _allowed(attention_mask, None, q, S, query.device)  # (B | 1, 1, 1, S)
        if allowed.shape[1] == 1:
            out = _decode_step(qg, key, value, allowed, scale)
            if out is not None:  # the decode step in C (its glue too); else the general path below
                return out.reshape(B, Hq, q, D).transpose(1, 2).contiguous().to(query.dtype), None
    scores = _scores(qg, key) * (D**-0.5 if scaling is None else scaling)  # (B, H, G*q, S)
    allowed = _allowed(attention_mask, None, q, S, query.device)  # (B | 1, 1, q, S)
    if allowed.shape[1] != 1:
        raise ModelError(f"{NAME} attention expects a mask shared by heads, got {tuple(allowed.shape)}")
    scores = scores.view(B, H, G, q, S).masked_fill(~allowed[:, :, None], torch.finfo(torch.float32).min)
    p = nn.functional.softmax(scores, dim=-1).view(B, H, G * q, S)
    p = nn.functional.dropout(p, p=dropout, training=module.training)
    out = _weighted_values(p, value)  # (B, H, G*q, D)
    return out.view(B, Hq, q, D).transpose(1, 2).contiguous().to(query.dtype), None


def register_coded_attention() -> None:
    """Register "kvsplice-coded" (attention + a mask that is never skipped) with transformers."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    from kvsplice.attention import kvsplice_mask

    AttentionInterface.register(NAME, coded_attention_forward)
    AttentionMaskInterface.register(NAME, kvsplice_mask)


def coded_supported(cache: Any, model: Any = None) -> str | None:
    """None when `coded_attention(model, cache)` runs and reads some codes without decoding them;
    else why not (a pruner, not a CompressedCache, no layer with an affine codec: warps, cross-layer
    prediction; a model whose attention soft-caps its logits). K coded before RoPE still decodes K;
    its V is read in the coded domain."""
    from kvsplice.cache import CompressedCache

    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    if cfg is not None and getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "the model soft-caps its attention logits (not implemented in the coded attention)"
    if not isinstance(cache, CompressedCache):
        return f"not a CompressedCache ({type(cache).__name__})"
    if getattr(cache, "pruner", None) is not None:
        return "a pruning cache needs the attention probabilities"
    codecs = [getattr(layer, name, None) for layer in cache.layers for name in ("k_codec", "v_codec")]
    if not any(c is not None and affine_groups(c) is not None for c in codecs):
        return "no layer has a codec readable in the coded domain (affine, not cross-layer predicted)"
    return None


class coded_attention:  # noqa: N801 - used as a context manager, like torch.no_grad
    """Switch `model` to the coded attention and `cache` (a CompressedCache) to coded reads; restore
    both on exit (or `.restore()`). Refuses a pruning cache (pruning needs the probabilities)."""

    def __init__(self, model: Any, cache: Any) -> None:
        if getattr(cache, "pruner", None) is not None:
            raise KVSpliceError(f"{NAME} attention cannot run a pruning cache (the pruner needs attention probabilities)")
        from kvsplice.cache import CompressedCache  # here: cache.py imports this module

        if not isinstance(cache, CompressedCache):
            raise KVSpliceError(f"{NAME} attention needs a CompressedCache, got {type(cache).__name__}")
        if not all(hasattr(type(layer), "coded") for layer in cache.layers):  # else it would decode silently
            raise KVSpliceError(f"{NAME} attention: this CompressedCache's layers have no coded read (CompressedLayer.coded)")
        register_coded_attention()
        self.model, self.cache, self.previous = model, cache, model.config._attn_implementation
        model.set_attn_implementation(NAME)
        for layer in cache.layers:
            layer.coded = True

    def restore(self) -> None:
        for layer in self.cache.layers:
            layer.coded = False
        self.model.set_attn_implementation(self.previous)

    def __enter__(self) -> Any:
        return self.model

    def __exit__(self, *exc: Any) -> None:
        self.restore()
