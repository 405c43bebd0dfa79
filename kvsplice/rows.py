"""Rows of one cache layer (K or V) and the per-sequence token bookkeeping shared by a cache's layers.

Shapes: B batch, H KV heads, S rows held, D head_dim, q rows of the current step.

`LayerCodec`: the codecs of one layer (per head, or one joint codec over the heads).
`_Rows`: K or V rows of one layer in token order: codec payload (older rows) then raw rows (the
    newest `window`, and under pruning strategy A the step's rows until the selection), plus exact
    copies of each sequence's sink rows. `_Rows.read()` is the one place where rows are decoded.
`TokenIndex`: what the layers of one cache share about the sequences: each row's position (for
    pre-RoPE K codecs) and the row of each sequence's first real tokens (the attention sink). Held
    once per cache and counted once (`CompressedCache.memory().index_bytes`).
`SlidingTokens`: the TokenIndex as a sliding-window layer sees it once its oldest rows are dropped
    (row r of the layer is token row r + dropped; a sink row that left the window is an empty slot).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from kvsplice.codecs.base import Codec
from kvsplice.errors import CodecError, GeometryError, KVSpliceError, ModelError


class LayerCodec:
    """The codecs of one layer for K or V: one per KV head, or one joint codec over the concatenated
    heads (geometry head index -1; vector = concat of heads, dim H * head_dim).

    encode(x (B, H, T, D)) -> {name: (B, H', T, *)} (H' = H per head, 1 joint); decode inverts it.
    """

    def __init__(self, codecs: Sequence[Codec], joint: bool = False, num_heads: int | None = None) -> None:
        codecs = list(codecs)
        if not codecs or any(c.dim is None for c in codecs):
            raise CodecError("LayerCodec needs fitted codecs (dim set); got none or an unfitted one")
        if joint and (len(codecs) != 1 or not num_heads or codecs[0].dim % num_heads):
            raise CodecError(
                f"a joint LayerCodec takes one codec whose dim is a multiple of num_heads; got {len(codecs)} "
                f"codec(s), dim {codecs[0].dim}, num_heads {num_heads}"
            )
        if not joint and len({c.dim for c in codecs}) != 1:
            raise CodecError(f"per-head codecs of one layer must share one dim, got {[c.dim for c in codecs]}")
        self.codecs, self.joint = codecs, joint
        self.num_heads = num_heads if joint else len(codecs)
        self.head_dim = codecs[0].dim // self.num_heads if joint else codecs[0].dim
        # cross-layer prediction (kvsplice/codecs/xpred.py): the previous layer's decoded rows come
        # from `chain`, the cache's per-step record (bound by the cache's rows, never shared by caches)
        self.predictive = getattr(codecs[0], "pred", None) is not None
        self.chain: dict | None = None
        if self.predictive and not joint:
            raise CodecError(f"{codecs[0].name} predicts a layer from the previous one jointly over its KV heads: fit it with joint heads")

    @classmethod
    def from_geometry(cls, geometry: Any, layer: int) -> "LayerCodec | None":
        """The codecs of `layer` in a Geometry (API.md), or None when the geometry skips that layer."""
        heads = sorted(h for (l, h) in geometry.codecs if l == layer)
        if not heads:
            return None
        if heads == [-1]:
            try:
                num_heads = int(geometry.meta["num_kv_heads"])
            except (KeyError, ValueError) as e:
                raise GeometryError(f"joint geometry needs meta['num_kv_heads'] (an int): {e}") from e
            return cls([geometry.codecs[(layer, -1)]], joint=True, num_heads=num_heads)
        if heads != list(range(len(heads))):
            raise GeometryError(f"layer {layer}: expected heads 0..H-1 (or -1 for joint), found {heads}")
        return cls([geometry.codecs[(layer, h)] for h in heads])

    def check(self, num_heads: int, head_dim: int, what: str) -> None:
        if (num_heads, head_dim) != (self.num_heads, self.head_dim):
            raise CodecError(
                f"{what} codec expects {self.num_heads} heads of dim {self.head_dim}, "
                f"the model gives {num_heads} heads of dim {head_dim}"
            )

    def to(self, device: torch.device, dtype: torch.dtype) -> "LayerCodec":
        """A copy with every codec tensor on `device` (floating ones in `dtype`); self is unchanged."""
        moved = [Codec.from_state(c.state_tensors(), c.metadata()).to(device, dtype) for c in self.codecs]
        return LayerCodec(moved, self.joint, self.num_heads)

    def _previous(self, B: int, n: int, newest: bool) -> torch.Tensor:
        """The predecessor layer's decoded rows (B, n, H * D) from this step's chain: its newest n rows
        when encoding the step's new rows, all of them (exactly n) when decoding. Refuses anything
        else: a prediction from the wrong rows would decode garbage silently."""
        layer, p = self.codecs[0].layer, self.codecs[0].prev
        ch = self.chain
        if ch is None:
            raise KVSpliceError(f"layer {layer}: a cross-layer predicted codec runs only inside a CompressedCache (no chain bound)")
        x = ch.get(p)
        if x is None or x.shape[0] != B or (x.shape[1] < n if newest else x.shape[1] != n):
            found = "nothing" if x is None else f"{tuple(x.shape[:2])} (B, rows)"
            raise KVSpliceError(f"layer {layer}: cross-layer prediction needs layer {p}'s decoded rows of this step "
                                f"({B} sequences, {n} rows); found {found} (layers updated out of order, or rows differ between layers)")
        return x[:, x.shape[1] - n :] if newest else x

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.joint:
            B, H, T, D = x.shape
            flat = x.transpose(1, 2).reshape(B, T, H * D)
            if self.predictive and self.codecs[0].prev >= 0:  # code the residual of the prediction
                flat = flat.float() - self.codecs[0].predict(self._previous(B, T, newest=True))
            return {k: v.unsqueeze(1) for k, v in self.codecs[0].encode(flat).items()}
        per_head = [c.encode(x[:, h]) for h, c in enumerate(self.codecs)]
        return {k: torch.stack([p[k] for p in per_head], dim=1) for k in per_head[0]}

    def decode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.joint:
            y = self.codecs[0].decode({k: v[:, 0] for k, v in payload.items()})  # (B, T, H * D)
            B, T, _ = y.shape
            if self.predictive:
                c = self.codecs[0]
                if c.prev >= 0:
                    y = y + c.predict(self._previous(B, T, newest=False))
                    del self.chain[c.prev]  # each layer has one successor (CompressedCache checks): free its rows
                elif self.chain is None:
                    raise KVSpliceError(f"layer {c.layer}: a cross-layer predicted codec runs only inside a CompressedCache (no chain bound)")
                if getattr(self.chain, "needed", None) is None or c.layer in self.chain.needed:
                    self.chain[c.layer] = y  # the successor predicts from these rows (one layer per type held)
            return y.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        return torch.stack([c.decode({k: v[:, h] for k, v in payload.items()}) for h, c in enumerate(self.codecs)], 1)

    def bytes_per_token(self, dtype: torch.dtype = torch.float32) -> float:
        """Payload bytes of one token (all KV heads of the layer) when the cache runs in `dtype`."""
        return float(sum(c.payload_bytes_per_vector(dtype) for c in self.codecs))


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x (B, Hx, T, *), idx (B, G, K) with G in (1, Hx) -> (B, Hx, K, *)."""
    B, Hx, K = x.shape[0], x.shape[1], idx.shape[-1]
    if idx.shape[1] != Hx:
        if idx.shape[1] != 1:
            raise KVSpliceError(f"cannot select {idx.shape[1]} per-head row sets from a tensor with {Hx} heads")
        idx = idx.expand(B, Hx, K)
    idx = idx.reshape(B, Hx, K, *([1] * (x.ndim - 3))).expand(B, Hx, K, *x.shape[3:])
    return x.gather(2, idx)


class TokenIndex:
    """Per-sequence bookkeeping shared by the layers of one cache (no pruning: row r is token r).

    positions (B, S) int32: the position the model gave each row (`position_ids`, passed by the
        attention modules to `cache.update` in their kwargs), kept only when a K codec needs it.
    sink_rows (B, sink) int64: for p = 0..sink-1, the row holding the sequence's token at position p
        (-1: none yet). Generate gives left-padding rows position 0 too; they come first, so the LAST
        row with position p wins: the first real token, not a pad.
    Positions are what the model passes: a direct forward over a left-padded batch must pass
    position_ids (as generate does) for the sink to land on the first real token.
    """

    def __init__(self, sink: int, keep_positions: bool) -> None:
        self.sink, self.keep_positions = sink, keep_positions
        self.reset()

    def reset(self) -> None:
        self.chains: dict[str, dict] = getattr(self, "chains", {})  # cross-layer prediction: {"K"|"V": {layer: decoded rows}}
        for ch in self.chains.values():
            ch.clear()
        self.length = 0
        self.positions: torch.Tensor | None = None  # (B, S) int32
        self.span: tuple[int, int] | None = None  # (min, max) of every position seen (host ints, no device sync)
        self.sink_rows: torch.Tensor | None = None  # (B, sink) int64
        self._last: tuple[int, int, torch.Tensor | None] | None = None  # (start, q, assign) of the last step

    def observe(self, start: int, position_ids: Any, B: int, q: int, device: torch.device) -> torch.Tensor | None:
        """Record the step's rows start..start+q-1 (the first layer of a step records, the others get the
        same answer). Returns assign (B, sink) int64: the step-local row that becomes sink slot p, -1 for none."""
        if self._last is not None and self._last[:2] == (start, q) and start + q == self.length:
            return self._last[2]
        if start != self.length:
            raise KVSpliceError(f"internal: a cache layer wrote rows from {start}, the cache holds {self.length}")
        if not isinstance(position_ids, torch.Tensor) or position_ids.ndim != 2 or position_ids.shape[-1] != q \
                or position_ids.shape[0] not in (1, B):
            found = tuple(position_ids.shape) if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
            raise ModelError(
                f"this cache (sink / pre-RoPE K codec) needs the token positions: position_ids of shape "
                f"(1 or {B}, {q}) "
                f"in the kwargs the attention passes to cache.update; found {found}"
            )
        pos = position_ids.to(device=device, dtype=torch.long).expand(B, q)
        if self.positions is None:
            self.positions = torch.zeros(B, 0, dtype=torch.int32, device=device)
            self.sink_rows = torch.full((B, self.sink), -1, dtype=torch.long, device=device)
        if self.keep_positions:
            self.positions = torch.cat([self.positions, pos.to(torch.int32)], dim=1)
            lo, hi = torch.stack(torch.aminmax(pos)).tolist()  # one host sync per step, not one per layer read
            self.span = (lo, hi) if self.span is None else (min(lo, self.span[0]), max(hi, self.span[1]))
        assign = None
        if self.sink:
            local = torch.arange(q, device=device).expand(B, q)
            slots = torch.arange(self.sink, device=device)
            hit = pos[:, None, :] == slots[None, :, None]  # (B, sink, q)
            assign = torch.where(hit, local[:, None, :], -1).max(dim=2).values  # last row with position p
            self.sink_rows = torch.where(assign >= 0, start + assign, self.sink_rows)
        self.length += q
        self._last = (start, q, assign)
        return assign

    def row_positions(self, start: int, n: int) -> torch.Tensor:
        """Positions (B, n) int64 of rows start..start+n-1."""
        if self.positions is None or self.positions.shape[1] < start + n:
            raise KVSpliceError(f"internal: positions of rows {start}..{start + n - 1} were not recorded")
        return self.positions[:, start : start + n].long()

    def crop_to(self, length: int) -> None:
        """Forget rows from `length` on (idempotent: every layer calls it after its own crop)."""
        for ch in self.chains.values():
            ch.clear()
        if length >= self.length:
            return
        self.length, self._last = length, None
        if self.positions is not None:
            self.positions = self.positions[:, : min(length, self.positions.shape[1])]
            self.sink_rows = torch.where(self.sink_rows >= length, -1, self.sink_rows)

    def map_batch(self, fn) -> None:
        if self.positions is not None:
            self.positions, self.sink_rows = fn(self.positions), fn(self.sink_rows)
        self._last = None
        for ch in self.chains.values():
            ch.clear()

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.positions, self.sink_rows) if t is not None)


class Chain(dict):
    """{layer: its decoded rows (B, n, H * D) of this step}, for cross-layer prediction. `needed`: the
    layers some layer is predicted from (CompressedCache sets it); others' rows are not kept (None:
    keep every layer's, for a LayerCodec used on its own)."""

    def __init__(self, needed: set[int] | None = None) -> None:
        super().__init__()
        self.needed = needed


class SlidingTokens:
    """A sliding-window layer's view of the shared TokenIndex: the layer has dropped its oldest
    `dropped` rows (the same count for every sequence), so its row r is token row r + dropped.
    `sink_rows` (B, sink): the layer's row of each sink slot, -1 once that row left the window (the
    model's sliding mask no longer lets any query see it). Read by `_Rows` and by
    kvsplice/coded_attention.py exactly as a TokenIndex."""

    def __init__(self, tokens: TokenIndex) -> None:
        self.tokens, self.dropped = tokens, 0

    @property
    def sink_rows(self) -> torch.Tensor | None:
        r = self.tokens.sink_rows
        if r is None or not self.dropped:
            return r
        return torch.where(r >= self.dropped, r - self.dropped, -1)

    @property
    def span(self) -> tuple[int, int] | None:
        return self.tokens.span

    @property
    def chains(self) -> dict[str, dict]:  # cross-layer prediction: shared by every layer of the cache
        return self.tokens.chains

    def row_positions(self, start: int, n: int) -> torch.Tensor:
        return self.tokens.row_positions(start + self.dropped, n)


def _put_sink(out: torch.Tensor, head: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write head (B, H, sink, D) into out (B, H, S, D) in place at rows (B, sink) (-1: slot empty, left
    alone). An empty slot repeats a filled slot of its sequence (same row, same value) so that no two
    writes to one row disagree; a sequence with no filled slot rewrites row 0 with its own value."""
    B, H, n, D = head.shape
    valid = (rows >= 0) & (rows < out.shape[2])
    slot = torch.arange(n, device=rows.device).expand(B, n)
    src = torch.where(valid, slot, valid.to(torch.uint8).argmax(dim=1, keepdim=True))  # (B, sink)
    r = rows.gather(1, src).clamp_min(0)
    any_valid = valid.any(dim=1)[:, None, None, None]
    put = torch.where(any_valid, _gather_rows(head, src[:, None]), _gather_rows(out, r[:, None]))
    return out.scatter_(2, r[:, None, :, None].expand(B, H, n, D), put.to(out.dtype))


class _Rows:
    """K or V rows of one layer, in token order: codec payload (older rows), then raw rows (the newest
    `window`, plus, under strategy A, the current step's rows until the selection). Without a codec every
    row is raw. With `sink`, exact copies of each sequence's first real rows (`TokenIndex.sink_rows`)
    are kept beside the payload and replace the decoded rows when read."""

    def __init__(self, codec: LayerCodec | None, window: int, sink: int = 0, tokens: TokenIndex | None = None) -> None:
        self.codec, self.window, self.sink, self.tokens = codec, window, sink, tokens
        self.position_aware = getattr(codec, "position_aware", False)
        if (self.position_aware or (sink and codec is not None) or getattr(codec, "predictive", False)) and tokens is None:
            raise KVSpliceError("internal: rows with a sink or a pre-RoPE K codec need a TokenIndex")
        self.payload: dict[str, torch.Tensor] | None = None  # {name: (B, H', P, *)}
        self.raw: torch.Tensor | None = None  # (B, H, R, D)
        self.head: torch.Tensor | None = None  # (B, H, sink, D): exact sink rows (codec'd rows only)

    def init(self, like: torch.Tensor, what: str) -> None:
        if self.codec is not None:
            self.codec.check(like.shape[1], like.shape[3], what)
            self.codec = self.codec.to(like.device, like.dtype)
            if self.codec.predictive:  # one chain per cache and target, shared by its layers
                self.codec.chain = self.tokens.chains.setdefault(what, {})
        self.payload, self.raw = None, like[:, :, :0]
        B, H, _, D = like.shape
        self.head = like.new_zeros(B, H, self.sink, D) if self.sink and self.codec is not None else None

    @property
    def num_payload(self) -> int:
        return 0 if self.payload is None else next(iter(self.payload.values())).shape[2]

    def push(self, x: torch.Tensor, encode_now: bool = True, assign: torch.Tensor | None = None) -> None:
        """Append the step's rows x (B, H, q, D); assign (B, sink): step rows that are sink slots (-1: none)."""
        if self.head is not None and assign is not None:
            got = _gather_rows(x, assign.clamp_min(0)[:, None])  # (B, H, sink, D)
            self.head = torch.where((assign >= 0)[:, None, :, None], got, self.head)
        self.raw = torch.cat([self.raw, x], dim=2)
        if encode_now:
            self._spill()

    def _encode(self, x: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        """Payload of rows start..start+T-1 (x (B, H, T, D)); a pre-RoPE codec gets their positions."""
        if self.position_aware:
            return self.codec.encode(x, self.tokens.row_positions(start, x.shape[2]), self.tokens.span)
        return self.codec.encode(x)

    def _spill(self) -> None:
        """Encode the raw rows that fell out of the window."""
        n = self.raw.shape[2] - self.window
        if self.codec is not None and n > 0:
            self._extend(self._encode(self.raw[:, :, :n], self.num_payload))
            self.raw = self.raw[:, :, n:]

    def _extend(self, enc: dict[str, torch.Tensor]) -> None:
        self.payload = enc if self.payload is None else {k: torch.cat([v, enc[k]], 2) for k, v in self.payload.items()}

    def read(self) -> torch.Tensor:
        """(B, H, S, D) in the model dtype: decoded payload then raw rows, exact sink rows put back.
        The one place where rows are decoded."""
        if self.payload is None:  # every row raw, sink rows included: nothing to decode or put back
            return self.raw
        if self.position_aware:
            dec = self.codec.decode(self.payload, self.tokens.row_positions(0, self.num_payload), self.tokens.span)
        else:
            dec = self.codec.decode(self.payload)
        out = torch.cat([dec.to(self.raw.dtype), self.raw], dim=2)  # a fresh tensor: the sink goes in in place
        if self.head is not None and self.tokens.sink_rows is not None:
            _put_sink(out, self.head, self.tokens.sink_rows)
        return out

    def select(self, idx: torch.Tensor) -> None:
        """Keep rows idx (B, G, K), ascending; encode kept raw rows that leave the window. (Pruning
        only: no sink and no position-aware codec, which CompressedCache refuses with a pruner.)"""
        if self.codec is None:
            self.raw = _gather_rows(self.raw, idx)
            return
        P, K = self.num_payload, idx.shape[-1]
        keep_raw = min(self.window, K)
        head, tail = idx[..., : K - keep_raw], idx[..., K - keep_raw :]
        if keep_raw and bool((tail < P).any()):
            raise KVSpliceError("internal: the full-precision window rows must always be kept (window <= recency)")
        new_raw = _gather_rows(self.raw, tail - P)
        is_raw = head >= P  # kept rows still raw: encode them now (ascending, so they end each row set)
        m = int(is_raw.sum(-1).max()) if head.numel() else 0
        if m:
            Kh = head.shape[-1]
            self._extend(self.codec.encode(_gather_rows(self.raw, (head[..., Kh - m :] - P).clamp_min(0))))
            head = torch.where(is_raw, P + torch.arange(Kh, device=idx.device) - (Kh - m), head)
        if self.payload is not None:
            self.payload = {k: _gather_rows(v, head) for k, v in self.payload.items()}
        self.raw = new_raw

    def drop_oldest(self, n: int) -> None:
        """Drop the oldest n rows (payload first: it holds the older rows, then raw), as a sliding-window
        layer does when rows leave its window. The caller shifts the layer's `SlidingTokens`."""
        P = self.num_payload  # clone: a slice would keep the dropped rows' storage alive
        if P:
            self.payload = {k: v[:, :, min(n, P) :].clone() for k, v in self.payload.items()}
        if n > P:
            self.raw = self.raw[:, :, n - P :].clone()

    def release_sink(self) -> None:
        """Free the exact sink copies once no sequence's sink row is held any more (sliding layers)."""
        rows = self.tokens.sink_rows if self.tokens is not None else None
        if self.head is not None and rows is not None and not bool((rows >= 0).any()):
            self.head = None

    def crop(self, n: int) -> None:
        """Drop the newest n rows (raw first, then payload rows: each payload row codes one token alone)."""
        r = min(n, self.raw.shape[2])
        self.raw = self.raw[:, :, : self.raw.shape[2] - r]
        if n > r:
            keep = self.num_payload - (n - r)
            self.payload = {k: v[:, :, :keep] for k, v in self.payload.items()}

    def nbytes(self) -> tuple[int, int]:
        """(payload bytes, raw bytes: window + sink rows) actually held."""
        p = sum(v.nbytes for v in self.payload.values()) if self.payload is not None else 0
        return p, sum(t.nbytes for t in (self.raw, self.head) if t is not None)

    def map_batch(self, fn) -> None:
        if self.payload is not None:
            self.payload = {k: fn(v) for k, v in self.payload.items()}
        if self.raw is not None:
            self.raw = fn(self.raw)
        if self.head is not None:
            self.head = fn(self.head)
