"""A transformers `Cache` that holds V only as codec payloads (and K in full, or through a K codec).

Layout per layer (`CompressedLayer`), shapes B batch, H KV heads, S rows held, D head_dim:

    K rows  : (B, H, S, D) in the model dtype, or a K codec's payload + raw window
    V rows  : codec payload {name: (B, H', S_old, *)} (H' = H per-head codecs, 1 joint codec)
              + raw (B, H, W, D): the newest `window` rows in full precision (default 0)
    pruning : positions (B, G, S) int32 (logical position of each kept row), mass / exposure
              (B, G, S) float32 running attention statistics (see kvsplice/pruning.py)
    sink    : exact copies (B, H, sink, D) of each sequence's first real rows (K and V)
Shared by the layers (kvsplice/rows.py `TokenIndex`, held and counted once): each row's position as
the model passed it (`position_ids`; only for pre-RoPE K codecs, kvsplice/kcodec.py) and the row of
each sequence's sink tokens. With left padding these are the true positions, not row indices.

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

import warnings
from typing import Any, Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from kvsplice.cache_factory import CacheFactory
from kvsplice.coded_attention import coded_rows
from kvsplice.errors import GeometryError, KVSpliceError, KVSpliceWarning, ModelError
from kvsplice.layout import SLIDING_TYPES, CacheMemory, layer_windows, model_layout  # noqa: F401 (re-exported)
from kvsplice.pruning import VOnlyPruner, attention_mass
from kvsplice.rows import LayerCodec, SlidingTokens, TokenIndex, _Rows

__all__ = [
    "BatchMapMixin", "CacheFactory", "CacheMemory", "CompressedCache", "CompressedLayer", "LayerCodec", "layer_windows",
    "model_layout",
]

STRATEGIES = ("A", "B")


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
    """One layer of a `CompressedCache`. Lazily initialised from the first K/V it sees.

    sliding_window W (None: full attention): the layer behaves as transformers'
    `DynamicSlidingWindowLayer`: after each step it holds the newest W - 1 rows (coded or raw, the
    oldest dropped first), `update` returns those + the step's rows, and `get_mask_sizes` gives the
    offset of the first held row, so the model's sliding mask lines up. The sink's exact copy is kept
    while its row is held and freed when the row leaves the window: no query of a sliding layer can
    see a row older than the window, the sink included, so keeping it would change the output.
    """

    coded = False  # True: update returns CodedRows for the "kvsplice-coded" attention (kvsplice/coded_attention.py)

    def __init__(
        self,
        v_codec: LayerCodec | None = None,
        k_codec: LayerCodec | None = None,
        pruner: VOnlyPruner | None = None,
        window: int = 0,
        strategy: str = "A",
        layer_idx: int | None = None,
        sink: int = 0,
        tokens: TokenIndex | None = None,
        sliding_window: int | None = None,
    ) -> None:
        super().__init__()
        if sliding_window is not None and (isinstance(sliding_window, bool) or not isinstance(sliding_window, int)
                                           or sliding_window < 1):
            raise KVSpliceError(f"sliding_window must be a positive int or None, got {sliding_window!r}")
        if sliding_window is not None and pruner is not None:
            raise KVSpliceError(
                f"layer {layer_idx}: pruning is not supported on a sliding-window layer (window {sliding_window}); "
                "the layer already evicts every row older than its window"
            )
        self.sliding_window, self.is_sliding = sliding_window, sliding_window is not None
        self.v_codec, self.k_codec, self.pruner = v_codec, k_codec, pruner
        self.window, self.strategy, self.layer_idx, self.sink = window, strategy, layer_idx, sink
        # crop keeps "as if never written": rows are coded one by one on arrival, so dropping the newest
        # rows is exact; a window (rows already spilled) or a pruner (rows already evicted) cannot undo
        # a sliding layer has dropped rows a crop would need back (transformers' sliding layer refuses too)
        self.is_croppable = pruner is None and window == 0 and sliding_window is None
        position_aware = getattr(k_codec, "position_aware", False)
        predictive = any(getattr(c, "predictive", False) for c in (v_codec, k_codec))
        self.own_tokens = tokens is None and (position_aware or sink > 0 or predictive)  # a layer used on its own
        self.tokens = TokenIndex(sink, position_aware) if self.own_tokens else tokens
        # pruning with a joint codec: one row set shared by the layer's heads (a joint payload row
        # holds every head of a token)
        self.shared_selection = any(c is not None and c.joint for c in (v_codec, k_codec))
        self.reset()

    def reset(self) -> None:
        self.is_initialized = False
        self.keys = self.values = None  # not used: rows live in k_rows / v_rows
        self.dropped = 0  # oldest rows dropped by the sliding window (same count for every sequence)
        # a sliding layer reads the shared TokenIndex through a view shifted by its dropped rows
        self.view = SlidingTokens(self.tokens) if self.is_sliding and self.tokens is not None else self.tokens
        self.k_rows = _Rows(self.k_codec, self.window, self.sink, self.view)
        self.v_rows = _Rows(self.v_codec, self.window, self.sink, self.view)
        if self.tokens is not None:
            self.tokens.reset()
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
        B, _, q, _ = key_states.shape
        self._check_calibrated_positions(q)
        hook = kwargs.get("kwargs")
        assign = None
        if self.tokens is not None:  # positions / sink slots of the step's rows, from the model's position_ids
            pos = hook.get("position_ids") if isinstance(hook, dict) else None
            assign = self.tokens.observe(self.length, pos, B, q, key_states.device)
        if self.pruner is not None:
            if self.key_positions is not None:
                raise ModelError(
                    "a CompressedCache with a pruner needs the 'kvsplice' attention implementation (it hands the "
                    "attention probabilities back to the cache); call kvsplice.attention.prepare_model(model) first"
                )
            if not isinstance(hook, dict):
                raise ModelError(
                    "this model's attention does not pass its kwargs to cache.update; pruning cannot score it"
                )
            hook["kvsplice_layer"] = self
            new = torch.arange(self.length, self.length + q, dtype=torch.int32, device=self.device)
            self.key_positions = torch.cat([self.positions, new.expand(*self.positions.shape[:2], q)], dim=2)
        encode_now = self.pruner is None or self.strategy == "B"
        self.k_rows.push(key_states, encode_now, assign)
        self.v_rows.push(value_states, encode_now, assign)
        self.length += q
        if self.coded:  # the attention reads the payloads itself, without decoding them
            keys, values = coded_rows(self.k_rows), coded_rows(self.v_rows)  # hold references, not the _Rows
        else:
            keys, values = self.k_rows.read(), self.v_rows.read()
        if self.is_sliding:
            self._slide()
        return keys, values

    def _slide(self) -> None:
        """Sliding layer, after the step's rows were read: keep the newest W - 1 rows (what the next
        step's queries can see besides their own rows), as DynamicSlidingWindowLayer does."""
        n = self.length - self.dropped - (self.sliding_window - 1)
        if n <= 0:
            return
        self.k_rows.drop_oldest(n)  # replaces the payload / raw tensors: a CodedRows made above keeps its own
        self.v_rows.drop_oldest(n)
        self.dropped += n
        if isinstance(self.view, SlidingTokens):
            self.view.dropped = self.dropped
            self.k_rows.release_sink()
            self.v_rows.release_sink()

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
        function picks the columns of the rows held (`key_positions`), so padding and causality stay exact.
        A sliding layer: (rows held + q, rows dropped), the (kv_length, kv_offset) of DynamicSlidingWindowLayer."""
        return self.length - self.dropped + query_length, self.dropped

    def get_seq_length(self) -> int:
        return self.length

    beyond_calibration = "error"  # CompressedCache(beyond_calibration=...): "error" | "warn"

    def _check_calibrated_positions(self, q: int) -> None:
        """K coded AFTER RoPE only knows the rotations of the positions it was calibrated on
        (kvsplice/kcodec.py `calibrated_positions`); past them its basis is a guess (measured:
        multi-key retrieval at 4k falls from 13/15 to 0/15 with 1k calibration windows). Refused, or
        warned once with beyond_calibration="warn" (evaluation harnesses that measure exactly that)."""
        limit = getattr(self.k_codec, "calibrated_positions", None)
        if limit is None or self.length + q <= limit:
            return
        msg = (f"layer {self.layer_idx}: K is coded after RoPE and was calibrated on positions < {limit}; this step reaches "
               f"position {self.length + q - 1}: calibrate with windows at least as long as the context (--seq-len / seq_len=) "
               f"or use K coded before RoPE (the default recipe)")
        if self.beyond_calibration == "error":
            raise KVSpliceError(msg)
        if not getattr(self, "_warned_positions", False):
            self._warned_positions = True
            warnings.warn(msg, KVSpliceWarning, stacklevel=3)

    def get_max_length(self) -> int:
        return self.sliding_window if self.is_sliding else -1

    def _map_batch(self, fn) -> None:
        if not self.is_initialized:
            return
        self.k_rows.map_batch(fn)
        self.v_rows.map_batch(fn)
        if self.pruner is not None:
            self.positions, self.mass, self.exposure = fn(self.positions), fn(self.mass), fn(self.exposure)
        if self.own_tokens:  # a shared TokenIndex is mapped once by CompressedCache
            self.tokens.map_batch(fn)
        self.batch_size = self.k_rows.raw.shape[0]

    def activate_past_recording(self) -> None:
        """Called by generate before assisted decoding / prompt lookup (they crop rejected candidates):
        refuse there, naming the mode, when this layer cannot crop."""
        if not self.is_croppable:
            mode = (f"a pruner ({type(self.pruner).__name__})" if self.pruner is not None else
                    f"window={self.window}" if self.window else f"a sliding-window layer ({self.sliding_window})")
            raise KVSpliceError(
                f"a CompressedCache with {mode} cannot be cropped (rows already coded or evicted cannot be restored); "
                "assisted decoding and prompt lookup need window=0, no pruner and no sliding-window layer"
            )

    def crop(self, tokens_to_remove: int) -> None:
        """Remove the newest -tokens_to_remove tokens (transformers 5.x: a count <= 0), as if never written.
        Refused (KVSpliceError naming the mode) with a window or a pruner: see `is_croppable`."""
        if isinstance(tokens_to_remove, bool) or not isinstance(tokens_to_remove, int) or tokens_to_remove > 0:
            raise KVSpliceError(f"crop takes minus the number of tokens to remove (<= 0), got {tokens_to_remove!r}")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        self.activate_past_recording()  # refuses when not croppable
        if n > self.length:
            raise KVSpliceError(f"cannot crop {n} tokens from a cache holding {self.length}")
        self.k_rows.crop(n)
        self.v_rows.crop(n)
        self.length -= n
        if self.tokens is not None:
            self.tokens.crop_to(self.length)

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
            "index_bytes": (self.positions.nbytes if self.positions is not None else 0)
            + (self.tokens.nbytes() if self.own_tokens else 0),
            "window_bytes": k_win + v_win,
            "v_window_bytes": v_win,
            "other_bytes": other,
            # what a (hybrid) DynamicCache holds for the same tokens: a sliding layer, its held rows only
            "uncompressed_bytes": 2 * (self.length - self.dropped) * elem * self.num_heads * self.head_dim
            * self.batch_size
            if self.is_initialized
            else 0,
        }


class CompressedCache(Cache):
    """KV cache with V stored as codec payloads, optional K codec, full-precision window and V-only pruning.

    num_layers: decoder layers. v_codecs / k_codecs: one LayerCodec (or None: stored raw) per layer.
    pruner: VOnlyPruner (needs `kvsplice.attention.prepare_model(model)`). window: newest rows kept in
    full precision (with a pruner, window <= pruner.recency). strategy: "A" or "B" (module docstring).
    sink: the first `sink` rows of every sequence kept in full precision (the attention-sink token:
    coding it costs far more perplexity than its bytes; not combinable with a pruner). "First" means
    each sequence's first REAL tokens, by the positions the model passes (left padding: see
    kvsplice/rows.py `TokenIndex`). Sink rows are also coded (the payload stays aligned across the
    batch); their exact copies are counted in `window_bytes`, their row indices in `index_bytes`.

    Generation modes (transformers >= 5.24 `generate`): greedy, sampling, beam search (every
    per-sequence tensor is reordered), left-padded batches, multi-turn reuse of one cache, and, when
    `is_croppable` (window 0, no pruner, no sliding layer), assisted decoding and prompt lookup. One
    cache holds one conversation: for a pipeline or any repeated `generate`, use `CompressedCache.factory(...)`.

    sliding_windows: per layer, its sliding window W or None (full attention); `from_geometry` reads it
    from the model config (`layer_windows`: Gemma 3's 5 sliding : 1 global). A sliding layer holds at
    most W - 1 rows after a step, compressed like any layer, and counts only what it holds in
    `memory()` (uncompressed_bytes too: what a hybrid DynamicCache holds). The sink's exact copy is
    freed on a sliding layer when its row leaves the window (the mask hides it from then on). Pruning
    is refused when any layer slides; cropping (assisted decoding) is refused on sliding layers.
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
        sliding_windows: list[int | None] | None = None,
        beyond_calibration: str = "error",
    ) -> None:
        if beyond_calibration not in ("error", "warn"):
            raise KVSpliceError(f"beyond_calibration must be 'error' or 'warn', got {beyond_calibration!r}")
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise KVSpliceError(f"num_layers must be a positive integer, got {num_layers!r}")
        sliding_windows = [None] * num_layers if sliding_windows is None else list(sliding_windows)
        if len(sliding_windows) != num_layers:
            raise KVSpliceError(f"sliding_windows must have {num_layers} entries (int or None), got {len(sliding_windows)}")
        if pruner is not None and any(w is not None for w in sliding_windows):
            raise KVSpliceError(
                "a pruner cannot be combined with sliding-window layers (layers "
                f"{[l for l, w in enumerate(sliding_windows) if w is not None]}): they already evict every row "
                "older than their window; prune a model whose layers are all full attention"
            )
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
        position_aware = any(getattr(c, "position_aware", False) for c in k_codecs)
        predictive = [l for l, cs in enumerate(zip(v_codecs, k_codecs)) if any(getattr(c, "predictive", False) for c in cs)]
        if predictive and (pruner is not None or window):
            raise KVSpliceError(  # each layer must hold the same rows as the layer it is predicted from
                "cross-layer predicted codecs (layers %s) need every layer to hold the same rows: no pruner, window 0; "
                "got pruner=%s, window=%d" % (predictive, type(pruner).__name__ if pruner else None, window))
        for name, cs in (("v_codecs", v_codecs), ("k_codecs", k_codecs)):
            prevs = {l: c.codecs[0].prev for l, c in enumerate(cs) if getattr(c, "predictive", False) and c.codecs[0].prev >= 0}
            bad = [(l, p) for l, p in prevs.items() if sliding_windows[l] != sliding_windows[p]]
            if bad:  # a sliding layer and a global one hold different rows: the prediction would read the wrong ones
                raise KVSpliceError(f"{name}: layers predicted from a layer with another sliding window (layer, from): {bad}; "
                                    f"windows {sliding_windows}: fit the geometry for this model (xpred.predecessors)")
            if len(set(prevs.values())) != len(prevs):  # the chain frees a layer's rows once its successor read them
                raise KVSpliceError(f"{name}: two layers predicted from the same layer: {prevs}")
            misplaced = [(l, c.codecs[0].layer) for l, c in enumerate(cs) if getattr(c, "predictive", False) and c.codecs[0].layer != l]
            if misplaced:  # the chain is keyed by the codec's own layer
                raise KVSpliceError(f"{name}: predicted codecs fitted for another layer (position, codec layer): {misplaced}")
        for name, cs in (("v_codecs", v_codecs), ("k_codecs", k_codecs)):
            flags = [bool(getattr(c, "predictive", False)) for c in cs]
            if any(flags) and not all(flags):
                raise KVSpliceError(f"{name}: cross-layer prediction needs a predicted codec on every layer (each reads the previous); "
                                    f"layers without one: {[l for l, f in enumerate(flags) if not f]}")
        # one TokenIndex for all layers: every layer sees the same tokens (stored and counted once)
        self.tokens = TokenIndex(sink, position_aware) if (sink or position_aware or predictive) else None
        if predictive:  # keep a layer's decoded rows in the step's chain only if a layer is predicted from them
            from kvsplice.rows import Chain

            for what, cs in (("K", k_codecs), ("V", v_codecs)):
                self.tokens.chains[what] = Chain({c.codecs[0].prev for c in cs if getattr(c, "predictive", False)} - {-1})
        layers = [
            CompressedLayer(v, k, pruner, window, strategy, i, sink, self.tokens, w)
            for i, (v, k, w) in enumerate(zip(v_codecs, k_codecs, sliding_windows))
        ]
        for layer in layers:
            layer.beyond_calibration = beyond_calibration
        super().__init__(layers=layers)

    @classmethod
    def factory(cls, model: Any, **kwargs: Any) -> "CacheFactory":
        """A callable returning a fresh cache per call (`from_geometry(model, **kwargs)`); checks the
        arguments now. `with CompressedCache.factory(model, ...).installed(model): pipe(prompts)` gives
        every `model.generate` call (pipelines included) its own cache."""
        return CacheFactory(lambda: cls.from_geometry(model, **kwargs))

    # -- transformers Cache contract: batch operations map the shared TokenIndex once --
    def _map_tokens(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        if self.tokens is not None:
            self.tokens.map_batch(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_tokens(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_tokens(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_tokens(lambda t: t.repeat_interleave(repeats, dim=0))

    def get_max_cache_shape(self, layer_idx: int = 0) -> int:
        """-1: no maximum (kept for callers of the transformers 4.x Cache API)."""
        return -1

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
        beyond_calibration: str = "error",
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
        return cls(num_layers, codecs["v"], codecs["k"], pruner=pruner, window=window, strategy=strategy, sink=sink,
                   sliding_windows=layer_windows(model), beyond_calibration=beyond_calibration)

    @property
    def teacher_forced_exact(self) -> bool:
        """One forward over a window reads every row through its codec, as decoding does, unless
        rows are pruned or kept raw in a window (decoding would read older rows coded)."""
        return self.pruner is None and self.window == 0

    def memory(self) -> CacheMemory:
        """Bytes held now (sum of tensor.nbytes), all layers."""
        per = [layer.memory() for layer in self.layers]
        tot = {k: sum(p[k] for p in per) for k in per[0]}
        tot["index_bytes"] += self.tokens.nbytes() if self.tokens is not None else 0
        total = tot["k_bytes"] + tot["v_bytes"] + tot["index_bytes"] + tot["window_bytes"] + tot["other_bytes"]
        first = self.layers[0]
        return CacheMemory(
            total_bytes=total,
            tokens=first.length,
            batch=first.batch_size if first.is_initialized else 0,
            **tot,
        )

