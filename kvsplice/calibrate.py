"""Calibration: text -> model forward, V (or pre-RoPE K) captured where the cache receives it
(kvsplice/capture.py, via `ModelAdapter.capture`) -> bounded vector store -> codec fit -> Geometry.

Collection. The calibration text is tokenized into one stream and cut into non-overlapping windows
of `seq_len` tokens (`max_batches` caps how many forward batches of `batch_size` windows run).
Every token's V (B, H_kv, T, head_dim) is moved to CPU float32 as soon as its layer's hook fires and
offered to a per-layer reservoir (Algorithm R, seeded per layer): the reservoir keeps a uniform
sample of `samples // H_kv` TOKENS per layer, each with all H_kv head vectors, so

    * `samples` counts head-vectors of dimension head_dim per layer (the seed's "120k V vectors
      per layer"), and memory is bounded by samples * head_dim * 4 bytes per layer whatever the
      corpus size;
    * per-head codecs and a joint codec (head = -1, vector = the H_kv heads concatenated) are fitted
      on the same tokens.

The forward stops (by an exception raised in the last needed capture) right after the cache update
of the highest requested layer, so quick runs on a subset of `layers` skip the rest of the model.
Sharded / offloaded models (accelerate `device_map`): the ids go to the input embedding's device
(CPU when it is offloaded); accelerate's hooks move activations from layer to layer.

Fit. Per codec key, a seeded random subset of `fit_samples_per_dim * rank` vectors (the seed used
~2k vectors per latent dimension; None = all) is passed to `get_codec(codec, ...).fit`.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from kvsplice.codecs.base import CODECS, get_codec
from kvsplice.data import bos_id, tokenize, windows, with_bos
from kvsplice.errors import KVSpliceError, KVSpliceWarning
from kvsplice.models import get_adapter


@dataclass
class CalibrationConfig:
    """codec: registry name; rank: latent dim k; knots/epochs: spline-pca parameters (passed to any
    codec whose constructor takes them); codec_params: extra constructor arguments (override).
    samples: head-vectors kept per layer (reservoir); fit_samples_per_dim: fit subset = this * rank
    vectors per codec (None: all kept vectors); max_batches: forward batches (None: whole text);
    seq_len: tokens per window; batch_size: windows per forward; target: "v" or "k";
    joint_heads: one codec per layer over the concatenated KV heads; layers: subset (None: all);
    k_rope: "pre" (K coded before RoPE: the quality default, decoded rows at read time) or "post"
    (K coded as the cache receives it, after RoPE: the coded-domain attention scores it from its
    codes, kvsplice/coded_attention.py, at some quality cost; docs/RESULTS.md §6)."""

    codec: str = "spline-pca"
    rank: int = 16
    knots: int = 7
    epochs: int = 8
    samples: int = 120000
    fit_samples_per_dim: int | None = 2000
    max_batches: int | None = None
    seq_len: int = 1024
    batch_size: int = 1
    target: str = "v"
    joint_heads: bool = False
    seed: int = 0
    layers: tuple[int, ...] | None = None
    codec_params: dict = field(default_factory=dict)
    k_rope: str = "pre"

    def __post_init__(self) -> None:
        def pos_int(name: str, allow_none: bool = False) -> None:
            v = getattr(self, name)
            if v is None and allow_none:
                return
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise KVSpliceError(f"CalibrationConfig.{name} must be a positive int{' or None' if allow_none else ''}, got {v!r}")

        for name in ("rank", "knots", "samples", "seq_len", "batch_size"):
            pos_int(name)
        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 0:
            raise KVSpliceError(f"CalibrationConfig.epochs must be an int >= 0, got {self.epochs!r}")
        for name in ("fit_samples_per_dim", "max_batches"):
            pos_int(name, allow_none=True)
        if not isinstance(self.codec, str) or not self.codec:
            raise KVSpliceError(f"CalibrationConfig.codec must be a codec name, got {self.codec!r}")
        if self.target not in ("v", "k"):
            raise KVSpliceError(f"CalibrationConfig.target must be 'v' or 'k', got {self.target!r}")
        if not isinstance(self.joint_heads, bool):
            raise KVSpliceError(f"CalibrationConfig.joint_heads must be a bool, got {self.joint_heads!r}")
        if self.k_rope not in ("pre", "post"):
            raise KVSpliceError(f"CalibrationConfig.k_rope must be 'pre' or 'post', got {self.k_rope!r}")
        if not isinstance(self.seed, int):
            raise KVSpliceError(f"CalibrationConfig.seed must be an int, got {self.seed!r}")
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise KVSpliceError(f"CalibrationConfig.layers must be non-empty non-negative ints or None, got {self.layers!r}")
            self.layers = tuple(sorted(set(layers)))
        if not isinstance(self.codec_params, dict):
            raise KVSpliceError(f"CalibrationConfig.codec_params must be a dict, got {type(self.codec_params).__name__}")

    @classmethod
    def from_dict(cls, d: dict) -> "CalibrationConfig":
        """Build from a (TOML) table; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise KVSpliceError(f"unknown calibration option(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["layers"] = list(self.layers) if self.layers is not None else None
        return d

    def codec_kwargs(self) -> dict:
        """Constructor arguments for `get_codec(self.codec, ...)`: rank (as k), knots, epochs and seed
        where the codec's constructor accepts them, then `codec_params`."""
        import kvsplice.codecs  # noqa: F401  (registers the built-in codecs)

        if self.codec not in CODECS:
            raise KVSpliceError(f"unknown codec {self.codec!r}; expected one of {sorted(CODECS)}")
        accepted = inspect.signature(CODECS[self.codec].__init__).parameters
        base = {"k": self.rank, "knots": self.knots, "epochs": self.epochs, "seed": self.seed}
        kw = {k: v for k, v in base.items() if k in accepted}
        kw.update(self.codec_params)
        return kw


class _Reservoir:
    """Uniform sample of at most `capacity` rows of shape (H, D) from a stream (Algorithm R),
    vectorised per chunk; deterministic given the generator seed and the stream."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.seen = 0
        self.buf: torch.Tensor | None = None  # (capacity, H, D) float32, CPU
        self.gen = torch.Generator().manual_seed(seed)

    def add(self, x: torch.Tensor) -> None:
        """x: (M, H, D) on CPU."""
        M = x.shape[0]
        if self.buf is None:
            self.buf = torch.empty((self.capacity, *x.shape[1:]), dtype=torch.float32)
        start = 0
        if self.seen < self.capacity:  # fill phase
            take = min(self.capacity - self.seen, M)
            self.buf[self.seen : self.seen + take] = x[:take]
            self.seen += take
            start = take
        if start == M:
            return
        # replacement phase: the item with 0-based stream index i replaces slot r ~ U{0..i} if r < capacity
        idx = torch.arange(self.seen, self.seen + (M - start), dtype=torch.float64)  # (m,)
        r = torch.floor(torch.rand(idx.shape, dtype=torch.float64, generator=self.gen) * (idx + 1)).long()
        j = torch.arange(start, M)
        hit = r < self.capacity
        r, j = r[hit], j[hit]
        if r.numel():
            # the sequential algorithm lets the LAST item aimed at a slot win
            order = torch.argsort(r * M + j)
            r, j = r[order], j[order]
            last = torch.ones_like(r, dtype=torch.bool)
            last[:-1] = r[1:] != r[:-1]
            self.buf[r[last]] = x[j[last]].float()
        self.seen += M - start

    def result(self) -> torch.Tensor:
        """(min(seen, capacity), H, D)"""
        if self.buf is None:
            raise KVSpliceError("no vectors were collected (empty calibration text?)")
        return self.buf[: min(self.seen, self.capacity)]


def input_device(model) -> torch.device:
    """Where token ids go: the input embedding's device, or CPU when its weights are offloaded
    (device "meta" under an accelerate device_map with cpu/disk offload)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    w = getattr(emb, "weight", None)
    if w is None:
        w = next(model.parameters())
    return w.device if w.device.type != "meta" else torch.device("cpu")


class _StopForward(Exception):
    """Raised from the last needed hook to skip the rest of the forward pass."""


@dataclass
class Collected:
    """Per-layer samples: layers[l] is (N, H_kv, head_dim) float32 on CPU (the same N tokens for
    every head); tokens/windows: how much text was run through the model."""

    layers: dict[int, torch.Tensor]
    tokens: int
    windows: int
    target: str


def collect_layer_vectors(model, tokenizer, text: str, cfg: CalibrationConfig, progress: bool = True) -> Collected:
    """Run the calibration text through `model` and reservoir-sample V (or K) per layer."""
    return collect_targets(model, tokenizer, text, cfg, (cfg.target,), progress)[cfg.target]


def collect_targets(model, tokenizer, text: str, cfg: CalibrationConfig, targets: tuple[str, ...] = ("k", "v"),
                    progress: bool = True) -> dict[str, Collected]:
    """One pass over the calibration text for every target in `targets` (K and V together: half the
    forwards of one pass per target). Each target's reservoirs use the same seeds as a pass of its
    own, so the samples equal `collect_layer_vectors` with that target (tests/test_calibrate.py)."""
    import contextlib

    from tqdm.auto import tqdm

    adapter = get_adapter(model)
    layers = adapter.check_layers(cfg.layers)
    H = adapter.num_kv_heads
    capacity = cfg.samples // H
    if capacity < 1:
        raise KVSpliceError(f"samples={cfg.samples} keeps no token for {H} KV heads; expected samples >= {H}")
    if not targets or any(t not in ("k", "v") for t in targets) or len(set(targets)) != len(targets):
        raise KVSpliceError(f"targets must be distinct entries of ('k', 'v'), got {targets!r}")
    ids = tokenize(tokenizer, text)
    wins = windows(with_bos(ids, cfg.seq_len, bos_id(tokenizer)), cfg.seq_len)  # BOS first when the tokenizer adds one
    batches = [torch.stack(wins[i : i + cfg.batch_size]) for i in range(0, len(wins), cfg.batch_size)]
    if cfg.max_batches is not None:
        batches = batches[: cfg.max_batches]
    if not batches:
        raise KVSpliceError("calibration text gave no tokens")
    reservoirs = {t: {l: _Reservoir(capacity, cfg.seed * 1_000_003 + l) for l in layers} for t in targets}
    last = layers[-1]
    pending: set[str] = set()  # targets still to see the last layer in this forward
    device = input_device(model)

    def make_sink(t: str):
        def sink(layer: int, x: torch.Tensor) -> None:
            # x: (B, H, T, D) -> (B*T, H, D) on CPU, float32
            reservoirs[t][layer].add(x.permute(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3]).to("cpu", torch.float32))
            if layer == last:
                pending.discard(t)
                if not pending:  # every target has its last layer: skip the rest of the model
                    raise _StopForward
        return sink

    tokens = 0
    was_training = model.training
    model.eval()  # no dropout while sampling
    try:
        with contextlib.ExitStack() as stack, torch.no_grad():
            for t in targets:
                what = "k_post" if t == "k" and cfg.k_rope == "post" else t  # K as the cache receives it
                stack.enter_context(adapter.capture(what, sink=make_sink(t), layers=layers))
            label = "+".join(t.upper() for t in targets)
            for batch in tqdm(batches, desc=f"calibrate {label}", unit="batch", disable=not progress):
                pending.update(targets)
                try:
                    model(input_ids=batch.to(device), use_cache=False)
                except _StopForward:
                    pass
                tokens += batch.numel()
    finally:
        model.train(was_training)
    return {t: Collected({l: r.result() for l, r in reservoirs[t].items()}, tokens, len(batches), t) for t in targets}


def split_heads(collected: Collected, joint_heads: bool) -> dict[tuple[int, int], torch.Tensor]:
    """Collected -> {(layer, head): (N, head_dim)} or, joint, {(layer, -1): (N, H_kv * head_dim)}."""
    out = {}
    for l, x in sorted(collected.layers.items()):  # x: (N, H, D)
        if joint_heads:
            out[(l, -1)] = x.reshape(x.shape[0], -1).contiguous()
        else:
            for h in range(x.shape[1]):
                out[(l, h)] = x[:, h].contiguous()
    return out


def collect_vectors(model, tokenizer, text: str, cfg: CalibrationConfig, progress: bool = True) -> dict[tuple[int, int], torch.Tensor]:
    """{(layer, head): (N, D)} float32 CPU; head -1 = joint vector when cfg.joint_heads."""
    return split_heads(collect_layer_vectors(model, tokenizer, text, cfg, progress), cfg.joint_heads)


def fit_geometry(
    vectors: dict[tuple[int, int], torch.Tensor],
    cfg: CalibrationConfig,
    meta: dict[str, str] | None = None,
    fit_seconds: dict[tuple[int, int], float] | None = None,
):
    """Fit one codec per key on (a seeded subset of) its vectors -> Geometry. meta gets the codec
    parameters and fit sizes added (no timings: the same inputs give the same geometry bytes);
    per-key fit seconds go to `fit_seconds` when a dict is passed."""
    from kvsplice.geometry import Geometry

    if not vectors:
        raise KVSpliceError("fit_geometry got no vectors")
    kwargs = cfg.codec_kwargs()
    codecs = {}
    n_fit_used = set()
    for (layer, head), x in sorted(vectors.items()):
        t0 = time.perf_counter()
        n = x.shape[0]
        if cfg.fit_samples_per_dim is not None and n > cfg.fit_samples_per_dim * cfg.rank:
            g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + 7919 * layer + head + 1)
            x = x[torch.randperm(n, generator=g)[: cfg.fit_samples_per_dim * cfg.rank]]
        n_fit_used.add(x.shape[0])
        codecs[(layer, head)] = get_codec(cfg.codec, **kwargs).fit(x)
        if fit_seconds is not None:
            fit_seconds[(layer, head)] = time.perf_counter() - t0
    used = {key: int(min(x.shape[0], _fit_cap(cfg))) for key, x in vectors.items()}
    few = {key: n for key, n in used.items() if n < codecs[key].min_fit_vectors(vectors[key].shape[1])}
    if few:
        key, n = next(iter(sorted(few.items())))
        need = codecs[key].min_fit_vectors(vectors[key].shape[1])
        warnings.warn(f"codecs fitted on only {n} vectors for {len(few)} of {len(codecs)} codec(s) (e.g. {key}); {cfg.codec} in "
                      f"dimension {vectors[key].shape[1]} needs at least {need} to be meaningful: calibrate on more text",
                      KVSpliceWarning, stacklevel=2)
    meta = dict(meta or {})
    meta.update(
        {
            "codec": cfg.codec,
            "codec_params": json.dumps(kwargs, sort_keys=True),
            "target": cfg.target,
            **({"k_rope": cfg.k_rope} if cfg.target == "k" else {}),
            # K after RoPE knows the rotations of these positions only (kvsplice/kcodec.py)
            **({"positions": cfg.seq_len} if cfg.target == "k" and cfg.k_rope == "post" else {}),
            "joint_heads": str(cfg.joint_heads).lower(),
            "fit_vectors_per_codec": ",".join(str(v) for v in sorted(n_fit_used)),
            "calibration_config": json.dumps(cfg.to_dict(), sort_keys=True),
        }
    )
    return Geometry(codecs=codecs, meta={k: str(v) for k, v in meta.items()})


def _fit_cap(cfg: CalibrationConfig) -> float:
    """Vectors a codec is fitted on at most (fit_samples_per_dim * rank), inf when uncapped."""
    return float("inf") if cfg.fit_samples_per_dim is None else cfg.fit_samples_per_dim * cfg.rank


@dataclass
class CalibrationResult:
    """geometry + how long collection and fitting took (seconds; not stored in the geometry)."""

    geometry: object  # kvsplice.geometry.Geometry
    collect_seconds: float
    fit_seconds: dict[tuple[int, int], float]

    @property
    def total_fit_seconds(self) -> float:
        return sum(self.fit_seconds.values())


def run_calibration(
    model,
    tokenizer,
    text: str,
    cfg: CalibrationConfig,
    description: str = "custom text",
    dump_vectors: str | os.PathLike | None = None,
    progress: bool = True,
    collected: Collected | None = None,
) -> CalibrationResult:
    """Collect + fit, with timings. `description` names the calibration text in the geometry's
    meta; `dump_vectors` also writes the collected vectors (see `save_vectors`); `collected`: vectors
    already sampled with this cfg (one K+V pass, `collect_targets`), then nothing is collected here."""
    from kvsplice.loading import model_id

    adapter = get_adapter(model)
    cfg.codec_kwargs()  # unknown codec -> error before any compute
    t0 = time.perf_counter()
    if cfg.codec == "xpred-pca-q":  # every layer on the same tokens, fitted in order (kvsplice/codecs/xpred.py)
        return _run_xpred(model, tokenizer, text, cfg, description, progress)
    if collected is not None and collected.target != cfg.target:
        raise KVSpliceError(f"run_calibration: collected {collected.target.upper()} vectors for a {cfg.target.upper()} config")
    col = collected if collected is not None else collect_layer_vectors(model, tokenizer, text, cfg, progress)
    collect_seconds = time.perf_counter() - t0
    if dump_vectors is not None:
        save_vectors(dump_vectors, col, meta={"model": model_id(model), "calibration": description})
    meta = {
        "model": model_id(model),
        "model_type": str(model.config.model_type),
        **{k: str(v) for k, v in adapter.layout().items()},
        "calibration": description,
        "tokens": str(col.tokens),
        "windows": str(col.windows),
        "vectors_per_head": str(next(iter(col.layers.values())).shape[0]),
    }
    fit_seconds: dict[tuple[int, int], float] = {}
    geometry = fit_geometry(split_heads(col, cfg.joint_heads), cfg, meta, fit_seconds)
    return CalibrationResult(geometry, collect_seconds, fit_seconds)


def _run_xpred(model, tokenizer, text: str, cfg: CalibrationConfig, description: str, progress: bool) -> CalibrationResult:
    from kvsplice.codecs.xpred import fit_xpred_geometry
    from kvsplice.loading import model_id

    if cfg.target == "k" and cfg.k_rope == "post":
        raise KVSpliceError("xpred-pca-q codes K before RoPE (its maps predict pre-RoPE rows); k_rope='post' is not supported")
    if not cfg.joint_heads or cfg.layers is not None:
        raise KVSpliceError("xpred-pca-q predicts each layer from the previous one jointly over its KV heads: "
                            f"it needs joint_heads (--joint-heads) and every layer; got joint_heads={cfg.joint_heads}, layers={cfg.layers}")
    t0 = time.perf_counter()
    windows = (cfg.max_batches or 4) * cfg.batch_size
    meta = {"model": model_id(model), "model_type": str(model.config.model_type), "calibration": description}
    geometry = fit_xpred_geometry(model, tokenizer, text, cfg.target, dict(cfg.codec_params), windows=windows,
                                  seq_len=cfg.seq_len, meta=meta)
    return CalibrationResult(geometry, time.perf_counter() - t0, {})


def calibrate(
    model,
    tokenizer,
    text: str,
    cfg: CalibrationConfig,
    description: str = "custom text",
    dump_vectors: str | os.PathLike | None = None,
    progress: bool = True,
):
    """Collect + fit -> kvsplice.geometry.Geometry (see `run_calibration`)."""
    return run_calibration(model, tokenizer, text, cfg, description, dump_vectors, progress).geometry


def save_vectors(path: str | os.PathLike, collected: Collected, meta: dict[str, str] | None = None) -> None:
    """Write collected vectors atomically as safetensors: "{target}.{layer}.{head}" -> (N, head_dim)
    float32 (all heads of a layer hold the same N tokens, in the same order, so the joint vector is
    torch.cat over heads along dim 1)."""
    from safetensors.torch import save_file

    tensors = {
        f"{collected.target}.{l}.{h}": x[:, h].contiguous()
        for l, x in sorted(collected.layers.items())
        for h in range(x.shape[1])
    }
    md = {"target": collected.target, "tokens": str(collected.tokens), **(meta or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={k: str(v) for k, v in md.items()})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
