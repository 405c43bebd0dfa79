"""Perplexity of a causal LM whose KV cache is compressed and/or pruned, under two protocols.

Both take one token stream `ids` (N,) and a `make_cache()` factory returning a fresh cache (a
`transformers.DynamicCache` for the baseline, a `kvsplice.cache.CompressedCache` otherwise), so
every row of a table is measured by the same code on the same tokens.

teacher-forced (`perplexity_teacher_forced`)
    Windows of `window` tokens starting every `stride` tokens (default: non-overlapping). Each window
    is ONE forward through an empty cache: the cache stores K and the codec payload of V and hands
    attention the decoded V, so every token's V passes through compress -> decompress before any
    query reads it. Exact for per-token codecs (a token's reconstruction does not depend on other
    tokens). The first window scores all its targets; a later window scores only its last `stride`
    targets (the ones no earlier window scored). Pruning is refused (`ProtocolError`): a single
    forward would let every query see a selection made with later queries.

prefill-continue (`perplexity_prefill_continue`)
    The stream is cut into segments of prefill + continue_tokens + 1 tokens. Per segment: feed the
    first `prefill` tokens in one forward (not scored), then feed tokens prefill .. prefill+N-1 through
    the cache `chunk` tokens at a time (1 = true decoding), scoring each fed token's prediction of
    the next one. Every scored prediction reads the compressed / pruned cache; the cache only ever
    sees the queries fed so far, so no selection uses a future query. Pruning caches are run with
    the "kvsplice" attention function (switched on and off around the row automatically).

Loss accounting is identical for every row of a protocol: the same targets, summed in float32
natural-log NLL, ppl = exp(mean NLL). Byte figures come from the cache's own measurement at the end
of the last window / segment (`CompressedCache.memory()`; for a `DynamicCache`, the nbytes of its K
and V tensors): per token = bytes / (tokens held per sequence * batch); reductions are relative to
an uncompressed cache in the model dtype holding the same tokens (V reference = half of it).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kvsplice.errors import KVSpliceError

PROTOCOLS = ("teacher-forced", "prefill-continue")
ROW_FIELDS = (
    "name",
    "ppl",
    "nll",
    "v_bytes_per_token",
    "kv_bytes_per_token",
    "v_reduction_pct",
    "kv_reduction_pct",
    "measured_cache_bytes",
    "seconds",
)


class ProtocolError(KVSpliceError):
    """An evaluation protocol was asked for something it cannot measure honestly (e.g. pruning
    under teacher forcing), or got inputs it cannot use."""


@dataclass
class EvalRow:
    """One row of a results table (the JSON row schema is exactly `ROW_FIELDS`).

    ppl = exp(nll); nll: mean natural-log NLL per scored token. *_bytes_per_token: bytes per token of
    one sequence, all layers (V: V payload + V window; KV: everything the cache holds, K + V + indices
    + statistics). *_reduction_pct: 100 * (1 - bytes / uncompressed bytes). measured_cache_bytes:
    bytes held by the cache for ONE sequence at the end of the last window / segment. seconds: wall
    time of the row. tokens: scored tokens. token_nll: per-token NLL (windows|segments, scored
    positions) float32, for causality checks; not serialised.
    """

    name: str
    ppl: float
    nll: float
    v_bytes_per_token: float
    kv_bytes_per_token: float
    v_reduction_pct: float
    kv_reduction_pct: float
    measured_cache_bytes: int
    seconds: float
    tokens: int = 0
    token_nll: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def as_json(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ROW_FIELDS}
        d["measured_cache_bytes"] = int(d["measured_cache_bytes"])
        for k in ROW_FIELDS[1:]:
            if k != "measured_cache_bytes":
                d[k] = float(d[k])
        return d


@dataclass
class Measured:
    """What a cache holds: bytes (all layers, all sequences) and its layout."""

    v_bytes: int
    total_bytes: int
    uncompressed_bytes: int
    tokens: int  # logical tokens per sequence
    batch: int


def measure_cache(cache: Any) -> Measured:
    """Bytes held by `cache`: its own `memory()` when it has one (CompressedCache), else the nbytes of
    the K / V tensors of every layer (DynamicCache: K + V, nothing else held)."""
    if hasattr(cache, "memory"):
        m = cache.memory()
        return Measured(int(m.v_bytes + m.v_window_bytes), int(m.total_bytes), int(m.uncompressed_bytes), int(m.tokens), int(m.batch))
    layers = getattr(cache, "layers", None)
    if not layers:
        raise ProtocolError(f"cannot measure a {type(cache).__name__}: expected a `memory()` method or `layers` with keys/values")
    k = sum(int(l.keys.nbytes) for l in layers if getattr(l, "keys", None) is not None)
    v = sum(int(l.values.nbytes) for l in layers if getattr(l, "values", None) is not None)
    first = layers[0].keys
    return Measured(v, k + v, k + v, int(cache.get_seq_length()), int(first.shape[0]) if first is not None else 0)


def _has_pruner(cache: Any) -> bool:
    return getattr(cache, "pruner", None) is not None


def _check_ids(ids: torch.Tensor, need: int, what: str) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1 or ids.dtype not in (torch.long, torch.int32):
        raise ProtocolError(f"{what} expects token ids as a 1-D integer tensor (N,), got {getattr(ids, 'shape', type(ids))}")
    if ids.shape[0] < need:
        raise ProtocolError(f"{what} needs at least {need} tokens, got {ids.shape[0]}")
    return ids.long()


def _pos_int(v: Any, name: str, allow_none: bool = False) -> None:
    if v is None and allow_none:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ProtocolError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {v!r}")


def _row(name: str, nll_sum: float, count: int, mem: Measured, seconds: float, token_nll: torch.Tensor) -> EvalRow:
    nll = nll_sum / count
    per_seq = max(mem.tokens * mem.batch, 1)
    kv_tok = mem.total_bytes / per_seq
    v_tok = mem.v_bytes / per_seq
    ref_tok = mem.uncompressed_bytes / per_seq  # K + V uncompressed, per token
    return EvalRow(
        name=name,
        ppl=math.exp(nll),
        nll=nll,
        v_bytes_per_token=v_tok,
        kv_bytes_per_token=kv_tok,
        v_reduction_pct=100.0 * (1.0 - v_tok / (ref_tok / 2)) if ref_tok else 0.0,
        kv_reduction_pct=100.0 * (1.0 - kv_tok / ref_tok) if ref_tok else 0.0,
        measured_cache_bytes=int(mem.total_bytes // max(mem.batch, 1)),
        seconds=seconds,
        tokens=count,
        token_nll=token_nll,
    )


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device


def _check_cache_used(cache: Any, expected: int) -> None:
    """A model that ignores `cache=` (e.g. another transformers version) would silently score the
    baseline for every row: refuse instead."""
    if cache.get_seq_length() < expected:
        raise ProtocolError(
            f"the model did not write to the cache it was given ({cache.get_seq_length()} of {expected} tokens held): "
            "this transformers version / model does not accept `cache=`"
        )


def perplexity_teacher_forced(
    model: Any,
    ids: torch.Tensor,
    make_cache: Callable[[], Any],
    window: int = 1024,
    stride: int | None = None,
    max_windows: int | None = None,
    name: str = "",
    scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EvalRow:
    """Teacher-forced perplexity of ids (N,) in windows of `window` tokens (see module docstring).

    make_cache: () -> a fresh cache per window; a cache with a pruner raises ProtocolError.
    stride: window start step (default `window`); max_windows: cap on windows (None: all full ones).
    scorer: optional (logits (B, T, V), targets (B, T)) -> NLL (B, T), called once per scored slice
    in order (kvsplice/evaluate/tokenmetrics.py: KL / top-1 against a baseline); default cross-entropy.
    """
    _pos_int(window, "window")
    _pos_int(stride, "stride", allow_none=True)
    _pos_int(max_windows, "max_windows", allow_none=True)
    if window < 2:
        raise ProtocolError(f"window must be >= 2 tokens to score anything, got {window}")
    stride = window if stride is None else stride
    if stride > window:
        raise ProtocolError(f"stride ({stride}) must be <= window ({window}); otherwise tokens go unscored")
    ids = _check_ids(ids, window, "teacher-forced perplexity")
    probe = make_cache()
    if _has_pruner(probe):
        raise ProtocolError(
            "teacher-forced perplexity cannot evaluate a pruning cache: in one forward every query would "
            "read a selection made with later queries; use protocol 'prefill-continue'"
        )
    if not getattr(probe, "teacher_forced_exact", True):
        raise ProtocolError(
            f"teacher-forced perplexity is not exact for {type(probe).__name__} with these settings (in one forward "
            "the queries read rows that decoding would read coded, e.g. a full-precision window or a quantiser's "
            "residual); use protocol 'prefill-continue'"
        )
    starts = list(range(0, ids.shape[0] - window + 1, stride))[:max_windows]
    device = _device(model)
    t0 = time.perf_counter()
    nll_sum, count, per_window, mem = 0.0, 0, [], None
    with torch.no_grad():
        for i, s in enumerate(starts):
            cache = probe if i == 0 else make_cache()
            x = ids[s : s + window].to(device)[None]  # (1, T)
            logits = model(input_ids=x, cache=cache, use_cache=True).logits  # (1, T, V)
            _check_cache_used(cache, window)
            # logits index of the first scored prediction: all of the first window, then the last
            # `stride` targets (all window - 1 when stride >= window - 1: non-overlapping windows)
            first = 0 if i == 0 else max(window - stride - 1, 0)
            if scorer is not None:
                nll = scorer(logits[:, first:-1], x[:, first + 1 :])[0]  # (scored,)
            else:
                nll = F.cross_entropy(logits[0, first:-1].float(), x[0, first + 1 :], reduction="none")  # (scored,)
            nll_sum += float(nll.sum(dtype=torch.float64))
            count += nll.numel()
            per_window.append(nll.cpu())
            mem = measure_cache(cache)
            del logits, cache
    token_nll = torch.nn.utils.rnn.pad_sequence(per_window, batch_first=True, padding_value=float("nan"))
    return _row(name, nll_sum, count, mem, time.perf_counter() - t0, token_nll)


def perplexity_prefill_continue(
    model: Any,
    ids: torch.Tensor,
    make_cache: Callable[[], Any],
    prefill: int = 512,
    continue_tokens: int = 128,
    chunk: int = 1,
    segments: int | None = None,
    batch_size: int = 1,
    name: str = "",
    scorer: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> EvalRow:
    """Prefill-continue perplexity (see module docstring).

    ids (N,) is cut into non-overlapping segments of prefill + continue_tokens + 1 tokens (at most
    `segments`; None: all that fit); `batch_size` segments run together in one cache (batch B, no
    padding needed: equal lengths). Scored per segment: `continue_tokens` predictions, each made by
    feeding one of tokens prefill .. prefill+N-1 through the cache in chunks of `chunk` tokens.
    token_nll of the result: (segments, continue_tokens). scorer: as in `perplexity_teacher_forced`
    (called once per chunk).
    """
    for v, n in ((prefill, "prefill"), (continue_tokens, "continue_tokens"), (chunk, "chunk"), (batch_size, "batch_size")):
        _pos_int(v, n)
    _pos_int(segments, "segments", allow_none=True)
    seg_len = prefill + continue_tokens + 1
    ids = _check_ids(ids, seg_len, "prefill-continue perplexity")
    n_seg = ids.shape[0] // seg_len if segments is None else min(segments, ids.shape[0] // seg_len)
    segs = ids[: n_seg * seg_len].view(n_seg, seg_len)  # (S, C + N + 1)
    device = _device(model)
    probe = make_cache()
    switch = None
    if _has_pruner(probe):
        from kvsplice.attention import prepare_model

        switch = prepare_model(model)
    t0 = time.perf_counter()
    nll_sum, count, per_batch, mem = 0.0, 0, [], None
    try:
        with torch.no_grad():
            for b0 in range(0, n_seg, batch_size):
                cache = probe if b0 == 0 else make_cache()
                x = segs[b0 : b0 + batch_size].to(device)  # (B, C + N + 1)
                model(input_ids=x[:, :prefill], cache=cache, use_cache=True, logits_to_keep=1)
                _check_cache_used(cache, prefill)
                losses = []
                for j in range(prefill, prefill + continue_tokens, chunk):
                    e = min(j + chunk, prefill + continue_tokens)
                    logits = model(input_ids=x[:, j:e], cache=cache, use_cache=True).logits  # (B, c, V)
                    if scorer is not None:
                        nll = scorer(logits, x[:, j + 1 : e + 1])  # (B, c)
                    else:
                        nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, j + 1 : e + 1], reduction="none")  # (B, c)
                    losses.append(nll)
                nll = torch.cat(losses, dim=1)  # (B, N)
                nll_sum += float(nll.sum(dtype=torch.float64))
                count += nll.numel()
                per_batch.append(nll.cpu())
                mem = measure_cache(cache)
                del cache
    finally:
        if switch is not None:
            switch.restore()
    return _row(name, nll_sum, count, mem, time.perf_counter() - t0, torch.cat(per_batch, dim=0))


def evaluate(
    protocol: str, model: Any, ids: torch.Tensor, make_cache: Callable[[], Any], name: str = "", **options: Any
) -> EvalRow:
    """Dispatch by protocol name ("teacher-forced" | "prefill-continue"); options go to the protocol."""
    if protocol == "teacher-forced":
        return perplexity_teacher_forced(model, ids, make_cache, name=name, **options)
    if protocol == "prefill-continue":
        return perplexity_prefill_continue(model, ids, make_cache, name=name, **options)
    raise ProtocolError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
