"""Configuration of the evidence suite (`kvsplice frontier --suite quick|full`; runner: suite.py).

A suite measures every method of its grid on every text domain (kvsplice/texts.py) on ONE split
(dev: design choices; test: the numbers the README reports), with statistics on every point:

    tokens          >= this many scored tokens per point per domain. Teacher-forced rows (methods
                    whose one-forward evaluation is exact) use ceil(tokens / (tf_window - 1))
                    non-overlapping windows of tf_window tokens; prefill-continue rows (eviction,
                    residual windows) use ceil(tokens / continue_tokens) segments of prefill +
                    continue_tokens + 1 tokens, `chunk` tokens fed per step, `batch_size` segments
                    per cache.
    draws           calibrated methods are fitted `draws` times on the calibration part of
                    `calibration_domain` (draw d: seed d, the part's documents rotated by
                    d * documents // draws, so each draw reads other windows); each draw is a point.
                    calibration_domain "mix": the default calibration text (texts.mix_text: every
                    domain's calibration part interleaved), each part rotated by the same fraction.
    block, resamples  the paired moving-block bootstrap (stats.py) of every Δ vs the baseline.
    topk            baseline top-k kept per token for KL / top-1 (tokenmetrics.py).
    deployment_tokens, deployment_sequences
                    geometry (rotations, tables) amortised over `n` sequences of
                    `deployment_tokens` tokens for each n listed: bits/value (b).
    headline        method names whose points the plot labels.
    matmul          "native", or "fp32-accumulate" for a bfloat16 / float16 `dtype`: the model's linears
                    as bf16 operands with float32 accumulation, one rounding (evaluate/bf16.py; what a
                    GPU's bf16 GEMM does, at float32 speed on a CPU without bf16 units).

Methods are `MethodSpec` tables, as in configs/frontier.toml.

An optional `[longctx]` table (`LongctxConfig`) adds the long-context part after the frontier points:
passkey / multi-key retrieval and perplexity after a long prefill (evaluate/longctx_run.py), the
haystack and the perplexity text drawn from `domain`'s part of the SAME split, the codecs calibrated
by the suite's draw 0; its result is the suite JSON's "longctx" entry.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsplice.config import check, from_table, is_int, read_toml
from kvsplice.errors import KVSpliceError
from kvsplice.evaluate.frontier_config import FrontierConfigError, MethodSpec

SUITES = ("quick", "full")
SPLITS = ("dev", "test")
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


class SuiteConfigError(FrontierConfigError):
    """A bad suite config."""


_check = functools.partial(check, error=SuiteConfigError)


def _pos(v: Any) -> bool:
    return is_int(v) and v >= 1


@dataclass
class LongctxConfig:
    """The suite's long-context part (module docstring). tasks / lengths / depths / trials / seed /
    prompt / chunk: evaluate/longctx.py TaskSpec; methods: names of longctx_run.METHODS ("baseline"
    always runs first and gates the rest: a (task, length) cell runs for the methods only when the
    baseline's accuracy >= keep); ppl_prefill / ppl_tokens: perplexity of ppl_tokens tokens after a
    ppl_prefill-token prefill (0: none)."""

    domain: str = "docs"
    tasks: list[str] = field(default_factory=lambda: ["passkey", "multikey"])
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    trials: int = 5
    seed: int = 0
    prompt: str = "plain"
    chunk: int = 512
    methods: list[str] = field(default_factory=lambda: ["baseline", "pca-q-4", "pca-q-2", "kivi-4", "kivi-2", "h2o-4", "streamingllm-4"])
    keep: float = 0.8
    ppl_prefill: int = 4096
    ppl_tokens: int = 256

    def __post_init__(self) -> None:
        from kvsplice.evaluate.longctx_run import METHODS
        from kvsplice.texts import domain_names

        _check(self.domain in domain_names(), f"[longctx] domain must be one of {domain_names()}, got {self.domain!r}")
        for k in ("tasks", "lengths", "depths"):
            _check(isinstance(getattr(self, k), list), f"[longctx] {k} must be a list, got {getattr(self, k)!r}")
        _check(isinstance(self.methods, list) and bool(self.methods) and set(self.methods) <= set(METHODS)
               and len(set(self.methods)) == len(self.methods),
               f"[longctx] methods must be distinct names from {sorted(METHODS)}, got {self.methods!r}")
        _check(isinstance(self.keep, (int, float)) and not isinstance(self.keep, bool) and 0.0 <= self.keep <= 1.0,
               f"[longctx] keep must be a number in [0, 1], got {self.keep!r}")
        _check(is_int(self.ppl_prefill) and self.ppl_prefill >= 0 and _pos(self.ppl_tokens),
               f"[longctx] ppl_prefill must be an int >= 0 and ppl_tokens a positive int, got {self.ppl_prefill!r}, {self.ppl_tokens!r}")
        try:
            self.task_spec()
        except KVSpliceError as e:
            raise SuiteConfigError(f"[longctx] {e}") from e

    def task_spec(self) -> Any:
        """The evaluate/longctx.py TaskSpec of these settings."""
        from kvsplice.evaluate.longctx import TaskSpec

        return TaskSpec(tasks=self.tasks, lengths=self.lengths, depths=self.depths, trials=self.trials, seed=self.seed,
                        prompt=self.prompt, chunk=self.chunk)

    def tokens_needed(self) -> int:
        """Filler tokens the longest trial or the perplexity window can need (an upper bound)."""
        from kvsplice.evaluate.longctx_run import tokens_needed

        return tokens_needed(self.lengths, self.ppl_prefill, self.ppl_tokens)


@dataclass
class SuiteConfig:
    name: str = "quick"
    model: str = "smollm2-135m"
    dtype: str = "float32"
    matmul: str = "native"  # "fp32-accumulate": bf16 / fp16 linears as float32 GEMMs (kvsplice/evaluate/bf16.py)
    threads: int | None = None
    domains: list[str] = field(default_factory=lambda: ["docs", "code", "prose"])
    calibration_domain: str = "docs"
    draws: int = 3
    tokens: int = 4096
    tf_window: int = 1024
    prefill: int = 256
    continue_tokens: int = 256
    chunk: int = 16
    batch_size: int = 4
    block: int = 64
    resamples: int = 2000
    topk: int = 64
    deployment_tokens: int = 4096
    deployment_sequences: list[int] = field(default_factory=lambda: [1, 32])
    headline: list[str] = field(default_factory=list)
    calibration: dict[str, Any] = field(default_factory=lambda: {"samples": 12000, "max_batches": 4, "seq_len": 1024})
    methods: list[MethodSpec] = field(default_factory=list)
    longctx: LongctxConfig | None = None

    def __post_init__(self) -> None:
        from kvsplice.calibrate import CalibrationConfig
        from kvsplice.texts import domain_names

        _check(isinstance(self.name, str) and bool(self.name), f"name must be a non-empty string, got {self.name!r}")
        _check(self.dtype in ("float32", "bfloat16", "float16"), f"dtype must be float32 | bfloat16 | float16, got {self.dtype!r}")
        _check(self.matmul == "native" or (self.matmul == "fp32-accumulate" and self.dtype != "float32"),
               f"matmul must be 'native', or 'fp32-accumulate' with a bfloat16 / float16 dtype; got {self.matmul!r} with {self.dtype}")
        _check(self.threads is None or _pos(self.threads), f"threads must be a positive int, got {self.threads!r}")
        _check(isinstance(self.domains, list) and bool(self.domains) and all(d in domain_names() for d in self.domains)
               and len(set(self.domains)) == len(self.domains), f"domains must be distinct names from {domain_names()}, got {self.domains!r}")
        _check(self.calibration_domain in (*domain_names(), "mix"),
               f"calibration_domain must be one of {domain_names() + ['mix']}, got {self.calibration_domain!r}")
        for k in ("draws", "tokens", "tf_window", "prefill", "continue_tokens", "chunk", "batch_size", "block", "topk", "deployment_tokens"):
            _check(_pos(getattr(self, k)), f"{k} must be a positive int, got {getattr(self, k)!r}")
        _check(self.tf_window >= 2, f"tf_window must be >= 2, got {self.tf_window}")
        _check(is_int(self.resamples) and self.resamples >= 100, f"resamples must be an int >= 100, got {self.resamples!r}")
        _check(isinstance(self.deployment_sequences, list) and bool(self.deployment_sequences) and all(_pos(n) for n in self.deployment_sequences),
               f"deployment_sequences must be a non-empty list of positive ints, got {self.deployment_sequences!r}")
        _check(isinstance(self.calibration, dict), "[calibration] must be a table")
        bad = sorted({"codec", "rank", "target", "joint_heads", "codec_params", "seed"} & set(self.calibration))
        _check(not bad, f"[calibration] must not set {bad}: they come from each method (seed: from the draw)")
        CalibrationConfig.from_dict(self.calibration)
        _check(isinstance(self.methods, list) and bool(self.methods), "methods must be a non-empty list of [[methods]] tables")
        self.methods = [m if isinstance(m, MethodSpec) else from_table(MethodSpec, m, "methods", SuiteConfigError) for m in self.methods]
        names = [m.name for m in self.methods]
        _check(len(set(names)) == len(names), f"method names must be unique, got {names}")
        _check(isinstance(self.headline, list) and set(self.headline) <= set(names), f"headline must name methods of the grid, got {self.headline!r}")
        if self.longctx is not None and not isinstance(self.longctx, LongctxConfig):
            self.longctx = from_table(LongctxConfig, self.longctx, "longctx", SuiteConfigError)

    @property
    def tf_windows(self) -> int:
        return -(-self.tokens // (self.tf_window - 1))

    @property
    def segments(self) -> int:
        return -(-self.tokens // self.continue_tokens)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SuiteConfig":
        return from_table(cls, d, "top level", SuiteConfigError)

    @classmethod
    def from_toml(cls, path: str | Path) -> "SuiteConfig":
        return cls.from_dict(read_toml(path, "suite", SuiteConfigError))

    @classmethod
    def named(cls, suite: str) -> "SuiteConfig":
        """The repository's configs/suite-{quick,full}.toml."""
        _check(suite in SUITES, f"--suite must be one of {SUITES}, got {suite!r}")
        return cls.from_toml(CONFIG_DIR / f"suite-{suite}.toml")

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))
