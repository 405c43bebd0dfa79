"""A transformers `Cache` that holds V only as codec payloads (and K in full, or through a K codec).

Layout per layer (`CompressedLayer`), shapes B batch, H KV heads, S rows held, D head_dim:

    K rows  : (B, H, S, D) in the model dtype, or a K codec's payload + raw window
    V rows  : codec payload {name: (B, H', S_old, *)} (H' = H per-head codecs, 1 joint codec)
              + raw (B, H, W, D): the newest `window` rows in full precision (default 0)
    pruning : positions (B, G, S) int32 (logical position of each kept row), mass / exposure
              (B, G, S) float32 running attention statistics (see kvsplice/pruning.py)

The uncompressed V is never kept: the cache decodes the payload when attention reads it, inside
`update`, and drops the decoded copy after the layer's attention. The logical length (tokens seen per
sequence) is kept apart from S, so positions, masks and `generate` stay right when rows are pruned.

Pruning needs attention probabilities, so a cache with a pruner only works with the "kvsplice"
attention function (kvsplice/attention.py: `prepare_model(model)`). Per step:
  1. `update` appends the step's rows and returns K/V of the kept rows + the new rows;
  2. attention runs over those rows only: softmax renormalised over the kept tokens. That output is
     exactly what evicting the pruned keys too gives (the pruned rows' K is freed as well, and the
     kept keys are counted in `memory()`);
  3. the attention function hands the probabilities back (`observe`); the layer scores the rows with
     the queries seen so far, selects, and frees the pruned rows. A step's queries therefore always
     use the selection made before the step: no selection ever sees a future query.
Strategy "A": the step's own rows stay uncompressed until the selection, then only kept rows are
encoded (so the step reads its own V exactly). Strategy "B": every row is encoded on arrival (the
step reads its own V through the codec), then payload rows are selected. Without a pruner every row
is encoded on arrival.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvsplice.codecs.base import Codec
from kvsplice.errors import CodecError, GeometryError, KVSpliceError, ModelError
from kvsplice.pruning import VOnlyPruner, attention_mass

STRATEGIES = ("A", "B")


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

    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.joint:
            B, H, T, D = x.shape
            return {k: v.unsqueeze(1) for k, v in self.codecs[0].encode(x.transpose(1, 2).reshape(B, T, H * D)).items()}
        per_head = [c.encode(x[:, h]) for h, c in enumerate(self.codecs)]
        return {k: torch.stack([p[k] for p in per_head], dim=1) for k in per_head[0]}

    def decode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.joint:
            y = self.codecs[0].decode({k: v[:, 0] for k, v in payload.items()})  # (B, T, H * D)
            B, T, _ = y.shape
            return y.view(B, T, self.num_heads, self.head_dim).transpose(1, 2)
        return torch.stack([c.decode({k: v[:, h] for k, v in payload.items()}) for h, c in enumerate(self.codecs)], 1)

    def skip(self, n: int) -> None:
        """n rows of the sequence bypass this codec (kept exact as attention sinks). Position-aware
        codecs (kvsplice/kcodec.py) advance their position counter; others need nothing."""

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


class _Rows:
    """K or V rows of one layer, in token order: the first `sink` rows exact (attention sinks), codec
    payload (older rows), then raw rows (the newest `window`, plus, under strategy A, the current step's
    rows until the selection). Without a codec every row is raw."""

    def __init__(self, codec: LayerCodec | None, window: int, sink: int = 0) -> None:
        self.codec, self.window, self.sink = codec, window, sink
        self.payload: dict[str, torch.Tensor] | None = None  # {name: (B, H', P, *)}
        self.raw: torch.Tensor | None = None  # (B, H, R, D)
        self.head: torch.Tensor | None = None  # (B, H, <= sink, D): the first rows, never encoded

    def init(self, like: torch.Tensor, what: str) -> None:
        if self.codec is not None:
            self.codec.check(like.shape[1], like.shape[3], what)
            self.codec = self.codec.to(like.device, like.dtype)
        self.payload, self.raw, self.head = None, like[:, :, :0], like[:, :, :0]

    @property
    def num_payload(self) -> int:
        return 0 if self.payload is None else next(iter(self.payload.values())).shape[2]

    def push(self, x: torch.Tensor, encode_now: bool = True) -> None:
        n = min(self.sink - self.head.shape[2], x.shape[2]) if self.codec is not None else 0
        if n > 0:  # the sequence's first rows: kept exact; the codec learns their positions were used
            self.head, x = torch.cat([self.head, x[:, :, :n]], dim=2), x[:, :, n:]
            self.codec.skip(n)
        self.raw = torch.cat([self.raw, x], dim=2)
        if encode_now:
            self._spill()

    def _spill(self) -> None:
        """Encode the raw rows that fell out of the window."""
        n = self.raw.shape[2] - self.window
        if self.codec is not None and n > 0:
            self._extend(self.codec.encode(self.raw[:, :, :n]))
            self.raw = self.raw[:, :, n:]

    def _extend(self, enc: dict[str, torch.Tensor]) -> None:
        self.payload = enc if self.payload is None else {k: torch.cat([v, enc[k]], 2) for k, v in self.payload.items()}

    def read(self) -> torch.Tensor:
        """(B, H, S, D) in the model dtype: sink rows, decoded payload, then raw rows."""
        parts = [self.head] if self.head is not None and self.head.shape[2] else []
        if self.payload is not None:
            parts.append(self.codec.decode(self.payload).to(self.raw.dtype))
        return torch.cat(parts + [self.raw], dim=2) if parts else self.raw

    def select(self, idx: torch.Tensor) -> None:
        """Keep rows idx (B, G, K), ascending; encode kept raw rows that leave the window."""
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

    def nbytes(self) -> tuple[int, int]:
        """(payload bytes, raw bytes: window + sink rows) actually held."""
        p = sum(v.nbytes for v in self.payload.values()) if self.payload is not None else 0
        return p, sum(t.nbytes for t in (self.raw, self.head) if t is not None)

    def map_batch(self, fn) -> None:
        if self.payload is not None:
            self.payload = {k: fn(v) for k, v in self.payload.items()}
        if self.raw is not None:
            self.raw, self.head = fn(self.raw), fn(self.head)


class BatchMapMixin:
    """Beam search / batch selection for cache layers that keep several per-sequence tensors: each
    operation maps every tensor through `self._map_batch(fn)` (fn acts on the batch axis 0)."""

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map_batch(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map_batch(lambda t: t.repeat_interleave(repeats, dim=0))


class CompressedLayer(BatchMapMixin, CacheLayerMixin):
    """One layer of a `CompressedCache`. Lazily initialised from the first K/V it sees."""

    is_sliding = False

    def __init__(
        self,
        v_codec: LayerCodec | None = None,
        k_codec: LayerCodec | None = None,
        pruner: VOnlyPruner | None = None,
        window: int = 0,
        strategy: str = "A",
        layer_idx: int | None = None,
        sink: int = 0,
    ) -> None:
        super().__init__()
        self.v_codec, self.k_codec, self.pruner = v_codec, k_codec, pruner
        self.window, self.strategy, self.layer_idx, self.sink = window, strategy, layer_idx, sink
        # pruning with a joint codec: one row set shared by the layer's heads (a joint payload row
        # holds every head of a token)
        self.shared_selection = any(c is not None and c.joint for c in (v_codec, k_codec))
        self.reset()

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None  # not used: rows live in k_rows / v_rows
        self.k_rows = _Rows(self.k_codec, self.window, self.sink)
        self.v_rows = _Rows(self.v_codec, self.window, self.sink)
        self.length = 0  # logical tokens per sequence
        self.positions = self.mass = self.exposure = None  # (B, G, S), pruning only
        self.key_positions = None  # (B, G, S + q) while a step awaits its selection

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size, self.num_heads, _, self.head_dim = key_states.shape
        self.k_rows.init(key_states, "K")
        self.v_rows.init(value_states, "V")
        if self.pruner is not None:
            G = 1 if self.shared_selection else self.num_heads
            self.positions = torch.zeros(self.batch_size, G, 0, dtype=torch.int32, device=self.device)
            self.mass = torch.zeros(self.batch_size, G, 0, device=self.device)
            self.exposure = torch.zeros_like(self.mass)
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the step's K/V (B, H, q, D); return K/V of every row the step attends to, (B, H, S + q, D)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        q = key_states.shape[2]
        if self.pruner is not None:
            if self.key_positions is not None:
                raise ModelError(
                    "a CompressedCache with a pruner needs the 'kvsplice' attention implementation (it hands the "
                    "attention probabilities back to the cache); call kvsplice.attention.prepare_model(model) first"
                )
            hook = kwargs.get("kwargs")
            if not isinstance(hook, dict):
                raise ModelError(
                    "this model's attention does not pass its kwargs to cache.update; pruning cannot score it"
                )
            hook["kvsplice_layer"] = self
            new = torch.arange(self.length, self.length + q, dtype=torch.int32, device=self.device)
            self.key_positions = torch.cat([self.positions, new.expand(*self.positions.shape[:2], q)], dim=2)
        encode_now = self.pruner is None or self.strategy == "B"
        self.k_rows.push(key_states, encode_now)
        self.v_rows.push(value_states, encode_now)
        self.length += q
        return self.k_rows.read(), self.v_rows.read()

    def observe(self, probs: torch.Tensor, allowed: torch.Tensor) -> None:
        """Called by the kvsplice attention function after the step: probs (B, Hq, q, S + q) over the
        rows `update` returned, allowed (B, 1 | G, q, S + q) bool. Scores, selects, frees rows."""
        G, q = self.positions.shape[1], probs.shape[2]
        step_mass, step_exposure = attention_mass(probs, allowed, G)
        pad = torch.zeros(self.batch_size, G, q, device=self.device)
        mass, exposure = self.pruner.accumulate(
            torch.cat([self.mass, pad], 2), torch.cat([self.exposure, pad], 2), step_mass, step_exposure
        )
        idx = self.pruner.select(self.pruner.importance(mass, exposure), self.length)  # (B, G, K)
        if idx.shape[-1] == mass.shape[-1]:  # nothing pruned this step
            self.k_rows._spill()
            self.v_rows._spill()
            self.positions, self.mass, self.exposure = self.key_positions, mass, exposure
        else:
            self.k_rows.select(idx)
            self.v_rows.select(idx)
            self.positions = self.key_positions.gather(2, idx)
            self.mass, self.exposure = mass.gather(2, idx), exposure.gather(2, idx)
        self.key_positions = None

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Logical sizes: the mask is built over positions 0..L+q-1; with pruning, the kvsplice attention
        function picks the columns of the rows held (`key_positions`), so padding and causality stay exact."""
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.k_rows.map_batch(fn)
        self.v_rows.map_batch(fn)
        if self.pruner is not None:
            self.positions, self.mass, self.exposure = fn(self.positions), fn(self.mass), fn(self.exposure)
        self.batch_size = self.k_rows.raw.shape[0]

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove:
            raise NotImplementedError("CompressedCache cannot be cropped (rows may be encoded or pruned)")

    def memory(self) -> dict[str, int]:
        kp, kr = self.k_rows.nbytes()
        vp, vr = self.v_rows.nbytes()
        k_win = kr if self.k_codec is not None else 0
        v_win = vr if self.v_codec is not None else 0
        other = sum(t.nbytes for t in (self.mass, self.exposure) if t is not None)
        elem = torch.empty((), dtype=self.dtype).element_size() if self.is_initialized else 0
        return {
            "k_bytes": kp + kr - k_win,
            "v_bytes": vp + vr - v_win,
            "index_bytes": self.positions.nbytes if self.positions is not None else 0,
            "window_bytes": k_win + v_win,
            "v_window_bytes": v_win,
            "other_bytes": other,
            "uncompressed_bytes": 2 * self.length * elem * self.num_heads * self.head_dim * self.batch_size
            if self.is_initialized
            else 0,
        }


@dataclass
class CacheMemory:
    """Bytes actually held by a cache's tensors (all layers), and the uncompressed equivalent.

    k_bytes: K rows (raw, or K codec payload). v_bytes: V codec payload (raw V for layers without codec).
    window_bytes: full-precision window and sink rows of codec'd K/V (v_window_bytes: the V part of it).
    index_bytes: kept-row positions (pruning). other_bytes: pruning statistics (mass, exposure).
    total_bytes: k + v + index + window + other. uncompressed_bytes: what a DynamicCache in the model
    dtype holds for the same tokens. tokens: logical length per sequence. batch: sequences.
    """

    k_bytes: int
    v_bytes: int
    index_bytes: int
    window_bytes: int
    v_window_bytes: int
    other_bytes: int
    total_bytes: int
    uncompressed_bytes: int
    tokens: int
    batch: int

    @property
    def kv_bytes_per_token(self) -> float:
        """Total bytes per token of one sequence (all layers, K + V + overheads)."""
        return self.total_bytes / max(self.tokens * self.batch, 1)

    @property
    def v_bytes_per_token(self) -> float:
        """V bytes (payload + V window) per token of one sequence, all layers."""
        return (self.v_bytes + self.v_window_bytes) / max(self.tokens * self.batch, 1)

    def as_dict(self) -> dict[str, float]:
        per_token = {"kv_bytes_per_token": self.kv_bytes_per_token, "v_bytes_per_token": self.v_bytes_per_token}
        return {**asdict(self), **per_token}


def model_layout(model: Any) -> tuple[int, int, int]:
    """(num_layers, num_kv_heads, head_dim) from a transformers model's config."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    try:
        layers, q_heads = int(cfg.num_hidden_layers), int(cfg.num_attention_heads)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or q_heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // q_heads)
    except AttributeError as e:
        raise ModelError(f"cannot read layers / heads / head_dim from {type(cfg).__name__}: {e}") from e
    return layers, kv_heads, head_dim


class CompressedCache(Cache):
    """KV cache with V stored as codec payloads, optional K codec, full-precision window and V-only pruning.

    num_layers: decoder layers. v_codecs / k_codecs: one LayerCodec (or None: stored raw) per layer.
    pruner: VOnlyPruner (needs `kvsplice.attention.prepare_model(model)`). window: newest rows kept in
    full precision (with a pruner, window <= pruner.recency). strategy: "A" or "B" (module docstring).
    sink: the first `sink` rows of every sequence kept in full precision (the attention-sink token:
    coding it costs far more perplexity than its bytes; not combinable with a pruner). Sink rows are
    counted in `window_bytes`.
    """

    def __init__(
        self,
        num_layers: int,
        v_codecs: list[LayerCodec | None] | None = None,
        k_codecs: list[LayerCodec | None] | None = None,
        pruner: VOnlyPruner | None = None,
        window: int = 0,
        strategy: str = "A",
        sink: int = 0,
    ) -> None:
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise KVSpliceError(f"num_layers must be a positive integer, got {num_layers!r}")
        v_codecs = [None] * num_layers if v_codecs is None else list(v_codecs)
        k_codecs = [None] * num_layers if k_codecs is None else list(k_codecs)
        for name, cs in (("v_codecs", v_codecs), ("k_codecs", k_codecs)):
            if len(cs) != num_layers or any(c is not None and not isinstance(c, LayerCodec) for c in cs):
                raise KVSpliceError(f"{name} must be {num_layers} LayerCodec-or-None entries, got {len(cs)}")
        if isinstance(window, bool) or not isinstance(window, int) or window < 0:
            raise KVSpliceError(f"window must be an integer >= 0, got {window!r}")
        if pruner is not None and any(getattr(c, "position_aware", False) for c in k_codecs):
            raise KVSpliceError(
                "K codecs applied before RoPE assume rows in token order; they cannot be combined with a pruner"
            )
        if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
            raise KVSpliceError(f"sink must be an integer >= 0, got {sink!r}")
        if sink and pruner is not None:
            raise KVSpliceError(f"sink ({sink}) cannot be combined with a pruner (the pruner decides what is kept)")
        if strategy not in STRATEGIES:
            raise KVSpliceError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if pruner is not None and not isinstance(pruner, VOnlyPruner):
            raise KVSpliceError(f"pruner must be a VOnlyPruner or None, got {type(pruner).__name__}")
        if pruner is not None and window > pruner.recency:
            raise KVSpliceError(
                f"window ({window}) must be <= pruner.recency ({pruner.recency}): window rows are never pruned"
            )
        self.pruner, self.window, self.strategy = pruner, window, strategy
        layers = [
            CompressedLayer(v, k, pruner, window, strategy, i, sink) for i, (v, k) in enumerate(zip(v_codecs, k_codecs))
        ]
        super().__init__(layers=layers)

    @classmethod
    def from_geometry(
        cls,
        model: Any,
        v_geometry: Any = None,
        k_geometry: Any = None,
        pruner: VOnlyPruner | None = None,
        window: int = 0,
        strategy: str = "A",
        sink: int = 0,
    ) -> "CompressedCache":
        """Build a cache for `model` from V / K geometries; GeometryError before any compute when a
        geometry was made for another layout (layers, KV heads, head_dim) or the wrong target."""
        num_layers, num_heads, head_dim = model_layout(model)
        codecs = {}
        for target, geometry in (("v", v_geometry), ("k", k_geometry)):
            if geometry is None:
                codecs[target] = None
                continue
            found = geometry.meta.get("target", target)
            if found != target:
                raise GeometryError(f"expected a {target.upper()} geometry, found target {found!r}")
            geometry.check_compatible(num_layers, num_heads, head_dim)
            bad = sorted({l for (l, _) in geometry.codecs if not 0 <= l < num_layers})
            if bad:
                raise GeometryError(f"geometry has codecs for layers {bad}; the model has {num_layers} layers")
            per_layer = [LayerCodec.from_geometry(geometry, l) for l in range(num_layers)]
            if target == "k":  # K geometry is fitted on pre-RoPE K: un-rotate on write, re-rotate on read
                from kvsplice.kcodec import k_layer_codecs

                per_layer = k_layer_codecs(model, geometry)
            for l, c in enumerate(per_layer):
                if c is not None and (c.num_heads, c.head_dim) != (num_heads, head_dim):
                    raise GeometryError(
                        f"layer {l}: geometry has {c.num_heads} heads of dim {c.head_dim}, "
                        f"the model has {num_heads} KV heads of dim {head_dim}"
                    )
            codecs[target] = per_layer
        return cls(num_layers, codecs["v"], codecs["k"], pruner=pruner, window=window, strategy=strategy, sink=sink)

    @property
    def teacher_forced_exact(self) -> bool:
        """One forward over a window reads every row through its codec, as decoding does, unless
        rows are pruned or kept raw in a window (decoding would read older rows coded)."""
        return self.pruner is None and self.window == 0

    def memory(self) -> CacheMemory:
        """Bytes held now (sum of tensor.nbytes), all layers."""
        per = [layer.memory() for layer in self.layers]
        tot = {k: sum(p[k] for p in per) for k in per[0]}
        total = tot["k_bytes"] + tot["v_bytes"] + tot["index_bytes"] + tot["window_bytes"] + tot["other_bytes"]
        first = self.layers[0]
        return CacheMemory(
            total_bytes=total,
            tokens=first.length,
            batch=first.batch_size if first.is_initialized else 0,
            **tot,
        )
