"""Configuration of `kvsplice frontier` (the runner is kvsplice/evaluate/frontier.py).

The quality-per-byte frontier: every method over a grid of budgets, one model, one text, one protocol.

A config (`FrontierConfig`, TOML: configs/frontier.toml) lists methods; each method sweeps ONE
parameter over a list of values (its budgets). Method kinds:

    codec  a calibrated kvsplice codec on V, K or both ("target" = "v" | "k" | "kv"), per KV head or
           joint over a layer's KV heads; params: codec, target, joint_heads, window, and the codec's
           constructor parameters (bits for the quantising codecs, k for pca / spline-pca)
    prune  the seed's V-only pruning (VOnlyPruner; sweep keep_ratio)
    peer   a registered peer (kvsplice/peers): params = its fields; for the eviction peers the pseudo
           parameter "budget" (fraction of the prefill + continue tokens kept at the end) sets
           h2o's heavy / recent rows (half the budget each, the published split) and
           streamingllm's window (budget * tokens - sinks)

Every setting is measured with `perplexity_prefill_continue` (the only protocol that is exact for
eviction and windows); settings whose teacher-forced run is exact (per-token codecs without a
window, plain per-token ints, the uncompressed baseline) are also measured teacher-forced when
`protocol.teacher_forced` is on. K for Llama is coded BEFORE RoPE (kvsplice/kcodec.py).

kv_bits_per_value = 8 * (all bytes the cache holds: K + V + scales + indices + windows + statistics)
/ (number of K and V values of the tokens seen) = 8 * kv_bytes_per_token / (2 * layers * KV heads *
head_dim). "pareto": not dominated (bytes <= and ppl <=, one strictly) by another point of the SAME
method; `global_pareto` lists the points no point of any method dominates.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kvsplice.config import check, from_table, is_int, read_toml
from kvsplice.errors import KVSpliceError

KINDS = ("codec", "prune", "peer")
TARGETS = ("v", "k", "kv")
POINT_KEYS = ("method", "setting", "kv_bits_per_value", "kv_bytes_per_token", "ppl", "pareto")


class FrontierConfigError(KVSpliceError):
    """A bad frontier config."""


_check = functools.partial(check, error=FrontierConfigError)
_from_table = functools.partial(from_table, error=FrontierConfigError)
_is_int = is_int


@dataclass
class MethodSpec:
    """name: label of the points (JSON "method", plot legend); kind: codec | prune | peer;
    sweep: {parameter: [values]} (exactly one parameter); params: fixed parameters."""

    name: str
    kind: str
    sweep: dict[str, list]
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        w = f"method {self.name!r}"
        _check(isinstance(self.name, str) and bool(self.name), f"method name must be a non-empty string, got {self.name!r}")
        _check(self.kind in KINDS, f"{w}: kind must be one of {KINDS}, got {self.kind!r}")
        _check(isinstance(self.params, dict), f"{w}: params must be a table")
        _check(isinstance(self.sweep, dict) and len(self.sweep) == 1, f"{w}: sweep must be a table with exactly one parameter, got {self.sweep!r}")
        (key, values), = self.sweep.items()
        _check(isinstance(values, list) and bool(values), f"{w}: sweep.{key} must be a non-empty list")
        if self.kind == "codec":
            from kvsplice.codecs import codec_names

            _check(self.params.get("codec") in codec_names(), f"{w}: params.codec must be one of {codec_names()}, got {self.params.get('codec')!r}")
            _check(self.params.get("target", "v") in TARGETS, f"{w}: params.target must be one of {TARGETS}")
            _check(isinstance(self.params.get("joint_heads", False), bool), f"{w}: params.joint_heads must be a bool")
            _check(_is_int(self.params.get("window", 0)) and self.params.get("window", 0) >= 0, f"{w}: params.window must be an int >= 0")
            _check(_is_int(self.params.get("sink", 0)) and self.params.get("sink", 0) >= 0, f"{w}: params.sink must be an int >= 0")
            _check(self.params.get("k_bits") is None or self.params.get("target") == "kv", f"{w}: params.k_bits needs target = \"kv\"")
            _check(self.params.get("k_rope", "pre") in ("pre", "post"), f"{w}: params.k_rope must be \"pre\" or \"post\", got {self.params.get('k_rope')!r}")
            _check(self.params.get("protocol", "auto") in ("auto", "prefill-continue"),
                   f"{w}: params.protocol must be \"auto\" (teacher-forced where exact) or \"prefill-continue\", got {self.params.get('protocol')!r}")
        elif self.kind == "prune":
            _check(key == "keep_ratio", f"{w}: a prune method sweeps keep_ratio, got {key!r}")
        else:
            from kvsplice.peers import peer_names

            _check(self.params.get("peer") in peer_names(), f"{w}: params.peer must be one of {peer_names()}, got {self.params.get('peer')!r}")
        for s in self.settings():  # validate every setting (codec / pruner / peer parameters) up front
            if self.kind == "peer":
                make_peer(s, 1000)
            elif self.kind == "prune":
                from kvsplice.pruning import VOnlyPruner

                _from_table(VOnlyPruner, s, f"methods.{self.name}")
            else:
                from kvsplice.codecs import get_codec

                from kvsplice.allocation import ALLOCATE_KEYS, check_allocation_params

                if "allocate" in s:
                    check_allocation_params(s, f"methods.{self.name}")
                get_codec(s["codec"], **{k: v for k, v in s.items()
                                         if k not in ("codec", "target", "joint_heads", "window", "sink", "k_bits", "protocol", "k_rope", *ALLOCATE_KEYS)})

    def settings(self) -> list[dict[str, Any]]:
        (key, values), = self.sweep.items()
        return [{**self.params, key: v} for v in values]


def make_peer(s: dict[str, Any], tokens: int) -> Any:
    """A peer from one setting; "budget" (fraction of `tokens` kept) is translated for eviction peers."""
    from kvsplice.peers import get_peer

    params = {k: v for k, v in s.items() if k not in ("peer", "budget")}
    if "budget" in s:
        b = s["budget"]
        _check(isinstance(b, (int, float)) and not isinstance(b, bool) and 0 < b <= 1, f"budget must be in (0, 1], got {b!r}")
        kept = max(1, round(b * tokens))
        if s["peer"] == "h2o":  # the published fixed cache: half heavy hitters, half recent
            from kvsplice.peers.h2o import split_budget

            heavy, recent = split_budget(kept)
            params.update(heavy=heavy, recent=recent)
        elif s["peer"] == "streamingllm":
            params["window"] = max(1, kept - params.get("sinks", 4))
        else:
            raise FrontierConfigError(f"budget is only defined for the eviction peers h2o / streamingllm, not {s['peer']!r}")
    return get_peer(s["peer"], **params)


@dataclass
class FrontierProtocol:
    """prefill-continue: `segments` segments of prefill + continue_tokens (+1) tokens, `batch_size` at a
    time, continued `chunk` tokens per forward (1 = token-by-token decoding; 16 reads the compressed
    cache the same way, 16x faster on CPU: a chunk's tokens see each other's fresh K/V as a decoding
    step sees its own, and eviction selects after every chunk instead of every token);
    teacher-forced (exact settings only): `tf_windows` windows of `tf_window` tokens."""

    prefill: int = 512
    continue_tokens: int = 128
    chunk: int = 16
    segments: int = 3
    batch_size: int = 3
    teacher_forced: bool = True
    tf_window: int = 1024
    tf_windows: int = 1

    def __post_init__(self) -> None:
        for k in ("prefill", "continue_tokens", "chunk", "segments", "batch_size", "tf_window", "tf_windows"):
            _check(_is_int(getattr(self, k)) and getattr(self, k) >= 1, f"[protocol] {k} must be a positive int, got {getattr(self, k)!r}")
        _check(isinstance(self.teacher_forced, bool), "[protocol] teacher_forced must be a bool")


def _default_calibration() -> dict[str, Any]:
    return {"samples": 24000, "max_batches": 8, "seq_len": 1024, "knots": 7, "epochs": 2}


def _ours(codec: str, target: str, bits: list, sink: int = 1, suffix: str = "", **params: Any) -> MethodSpec:
    """A transform coder joint over each layer's KV heads; sink=1 keeps the first token exact (the
    attention sink: without it 2-bit pca-q K+V loses ~4x more perplexity; see docs/RESULTS.md)."""
    name = f"{codec}{suffix}" + {"v": ":V", "k": ":K", "kv": ""}[target]
    extra = {"sink": sink} if sink else {}
    return MethodSpec(name, "codec", {"bits": bits}, {"codec": codec, "target": target, "joint_heads": True, **extra, **params})


def default_methods() -> list[MethodSpec]:
    """The default grid (configs/frontier.toml mirrors it)."""
    return [
        _ours("spline-pca-q", "kv", [2.0, 3.0, 4.0]),
        _ours("pca-q", "kv", [2.0, 3.0, 4.0]),
        _ours("pca-q", "kv", [2.5, 3.0], suffix="-k1.5", k_bits=1.5),  # bits = V's; K at 1.5
        _ours("pca-q", "kv", [2.0, 4.0], sink=0, suffix="-nosink"),
        _ours("pca-q", "v", [2.0, 4.0]),
        _ours("pca-q", "k", [2.0, 4.0]),
        MethodSpec("uniform-int", "peer", {"bits": [8, 4, 2]}, {"peer": "uniform-int"}),
        MethodSpec("kivi", "peer", {"bits": [2, 4]}, {"peer": "kivi", "group": 32, "residual": 128, "v_group": 32}),
        MethodSpec("hf-quanto", "peer", {"bits": [2, 4]}, {"peer": "hf-quantized", "backend": "quanto", "group": 64, "residual": 128}),
        MethodSpec("h2o", "peer", {"budget": [0.1, 0.2, 0.5]}, {"peer": "h2o"}),
        MethodSpec("streamingllm", "peer", {"budget": [0.1, 0.2, 0.5]}, {"peer": "streamingllm", "sinks": 4}),
        MethodSpec("seed-vonly", "prune", {"keep_ratio": [0.2, 0.382]}),
        MethodSpec("seed-pca", "codec", {"k": [16, 32, 48]}, {"codec": "pca", "target": "v"}),
        MethodSpec("seed-spline-pca", "codec", {"k": [16, 32]}, {"codec": "spline-pca", "target": "v"}),
    ]


def quick_methods() -> list[MethodSpec]:
    """The --quick grid: one or two budgets per family."""
    return [
        _ours("spline-pca-q", "kv", [2.0, 4.0]),
        _ours("pca-q", "kv", [2.0, 4.0]),
        _ours("pca-q", "kv", [2.5], suffix="-k1.5", k_bits=1.5),
        MethodSpec("uniform-int", "peer", {"bits": [4, 2]}, {"peer": "uniform-int"}),
        MethodSpec("kivi", "peer", {"bits": [2, 4]}, {"peer": "kivi", "group": 32, "residual": 128, "v_group": 32}),
        MethodSpec("hf-quanto", "peer", {"bits": [2]}, {"peer": "hf-quantized", "backend": "quanto", "group": 64, "residual": 128}),
        MethodSpec("h2o", "peer", {"budget": [0.2]}, {"peer": "h2o"}),
        MethodSpec("streamingllm", "peer", {"budget": [0.2]}, {"peer": "streamingllm", "sinks": 4}),
        MethodSpec("seed-vonly", "prune", {"keep_ratio": [0.382]}),
        MethodSpec("seed-pca", "codec", {"k": [32]}, {"codec": "pca", "target": "v"}),
    ]


@dataclass
class FrontierConfig:
    """model: `load_model` name or folder; dtype: float32 | bfloat16 | float16; eval_data /
    calibration_data: text files (empty: the default corpus's split); threads: torch threads;
    calibration: CalibrationConfig options (samples, max_batches, seq_len, knots, epochs, ...);
    protocol: FrontierProtocol; methods: MethodSpec list."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    eval_data: list[str] = field(default_factory=list)
    calibration_data: list[str] = field(default_factory=list)
    threads: int | None = None
    calibration: dict[str, Any] = field(default_factory=_default_calibration)
    protocol: FrontierProtocol = field(default_factory=FrontierProtocol)
    methods: list[MethodSpec] = field(default_factory=default_methods)

    def __post_init__(self) -> None:
        from kvsplice.calibrate import CalibrationConfig

        _check(isinstance(self.model, str) and bool(self.model), f"model must be a non-empty string, got {self.model!r}")
        _check(self.dtype in ("float32", "bfloat16", "float16"), f"dtype must be float32 | bfloat16 | float16, got {self.dtype!r}")
        _check(self.threads is None or (_is_int(self.threads) and self.threads >= 1), f"threads must be a positive int, got {self.threads!r}")
        if isinstance(self.protocol, dict):
            self.protocol = _from_table(FrontierProtocol, self.protocol, "protocol")
        _check(isinstance(self.calibration, dict), "[calibration] must be a table")
        bad = sorted({"codec", "rank", "target", "joint_heads", "codec_params"} & set(self.calibration))
        _check(not bad, f"[calibration] must not set {bad}: they come from each method")
        CalibrationConfig.from_dict(self.calibration)  # validates keys and types
        _check(isinstance(self.methods, list) and bool(self.methods), "methods must be a non-empty list of [[methods]] tables")
        self.methods = [m if isinstance(m, MethodSpec) else _from_table(MethodSpec, m, "methods") for m in self.methods]
        names = [m.name for m in self.methods]
        _check(len(set(names)) == len(names), f"method names must be unique, got {names}")

    @classmethod
    def quick(cls, **overrides: Any) -> "FrontierConfig":
        """The --quick grid: fewer budgets, a shorter protocol, a smaller calibration."""
        d = {"calibration": {"samples": 12000, "max_batches": 4, "seq_len": 1024, "knots": 7, "epochs": 2},
             "protocol": FrontierProtocol(prefill=512, continue_tokens=128, chunk=16, segments=2, batch_size=2, tf_windows=1),
             "methods": quick_methods()}
        d.update(overrides)
        return cls(**d)

    @classmethod
    def from_dict(cls, d: dict[str, Any], quick: bool = False) -> "FrontierConfig":
        """Top-level table; with quick=True its [quick] table (if any) overrides top-level keys
        (one level deep for protocol / calibration), else the built-in quick grid's keys apply."""
        d = dict(d)
        q = d.pop("quick", None)
        if quick:
            if q is None:
                base = cls.quick().to_dict()
                return cls.from_dict({**base, **{k: v for k, v in d.items() if k not in ("protocol", "calibration", "methods")}})
            _check(isinstance(q, dict), "[quick] must be a table")
            for k, v in q.items():
                d[k] = {**d.get(k, {}), **v} if k in ("protocol", "calibration") and isinstance(v, dict) else v
        return _from_table(cls, d, "top level")

    @classmethod
    def from_toml(cls, path: str | Path, quick: bool = False) -> "FrontierConfig":
        d = read_toml(path, "frontier", FrontierConfigError)
        return cls.from_dict(d, quick=quick)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))



