"""`TrainConfig`: one flat, validated dataclass for `kvsplice train`, loadable from TOML.

Every field is also a CLI flag (`kvsplice_k` <-> `--kvsplice-k`, booleans as `--x/--no-x`), so the
seed's trainer arguments (`--kvsplice-enable`, `--kvsplice-k`, `--kvsplice-knots`,
`--kvsplice-samples`, `--kvsplice-max-batches`, `--kvsplice-epochs`, `--kvsplice-lr`,
`--kvsplice-save`, `--kvsplice-warmup-steps`, `--kvsplice-strategy`) work unchanged.
TOML: either flat keys at top level, or under a `[train]` table.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field, fields
from typing import ClassVar
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kvsplice.train.prune import PruneConfig

from kvsplice.errors import KVSpliceError


@dataclass
class TrainConfig:
    model_type: ClassVar[str] = "gpt2"  # so kvsplice.models.get_adapter picks the GPT-2 adapter
    # -- model (GPT-2 architecture; head_dim = n_embd / n_head) --------------------------------
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256  # context T
    vocab_size: int = 4096  # byte-level BPE trained on the training split
    dropout: float = 0.0
    # -- data -------------------------------------------------------------------------------------
    data: list[str] = field(default_factory=list)  # text files; empty = kvsplice.data.calibration_text()
    val_fraction: float = 0.1  # the last 10 % of the text (cut at a line break) is validation
    # -- optimisation -----------------------------------------------------------------------------
    batch_size: int = 8
    max_steps: int = 200
    time_budget_s: float = 0.0  # > 0: also stop when training time exceeds it (breaks determinism)
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    eval_interval: int = 25
    eval_batches: int = 4  # validation = the first eval_batches * batch_size non-overlapping windows
    checkpoint_interval: int = 0  # > 0: also write <out_dir>/checkpoint-<step> every N steps
    seed: int = 1337
    threads: int = 2  # torch.set_num_threads (CPU)
    device: str = "cpu"
    progress: bool = True
    out_dir: str = "results/train/run"
    name: str = "run"
    # -- reciprocal attention ---------------------------------------------------------------------
    ra_enable: bool = False
    ra_layers: list[int] | None = None  # None: the middle third
    # -- in-forward V-only pruning (seed defaults) ------------------------------------------------
    prune_enable: bool = False
    prune_mode: str = "v_only"  # or "kv_scores_reuse"
    prune_keep_ratio: float = 0.382
    prune_k_min: int = 64
    prune_recency: int = 64
    prune_exposure_correction: bool = True
    prune_ema_momentum: float = 0.9
    prune_ema_update_interval: int = 8
    prune_ema_in_eval: bool = False
    # -- KVSplice calibration inside training (seed argument names) ------------------------------
    kvsplice_enable: bool = False
    kvsplice_codec: str = "spline-pca"  # any registry name taking k ("pca" is the control)
    kvsplice_k: int = 16
    kvsplice_knots: int = 7
    kvsplice_samples: int = 120000  # V vectors collected per layer (split evenly over its heads)
    kvsplice_max_batches: int = 64
    kvsplice_epochs: int = 8
    kvsplice_lr: float = 2e-3
    kvsplice_save: str = ""  # geometry path; "" = <out_dir>/geometry.safetensors
    kvsplice_warmup_steps: int = 100  # calibrate after this many optimiser steps
    kvsplice_strategy: str = "A"  # A: prune, then compress kept V ; B: compress all V, then select
    kvsplice_refit_at_end: bool = False  # also report val ppl with a geometry refitted on the final model
    # -- learned low-rank compression ---------------------------------------------------------------
    learned_enable: bool = False
    learned_k: int = 16
    learned_affine: bool = False

    def __post_init__(self) -> None:
        def bad(name: str, want: str) -> KVSpliceError:
            return KVSpliceError(f"train config: {name} must be {want}, got {getattr(self, name)!r}")

        for name in ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "batch_size", "max_steps",
                     "eval_interval", "eval_batches", "kvsplice_k", "kvsplice_knots", "kvsplice_samples",
                     "kvsplice_max_batches", "kvsplice_epochs", "learned_k", "threads"):
            if not isinstance(getattr(self, name), int) or isinstance(getattr(self, name), bool) or getattr(self, name) < 1:
                raise bad(name, "a positive integer")
        for name in ("warmup_steps", "checkpoint_interval", "kvsplice_warmup_steps", "seed"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise bad(name, "a non-negative integer")
        if self.n_embd % self.n_head:
            raise KVSpliceError(f"train config: n_embd={self.n_embd} is not divisible by n_head={self.n_head}")
        if self.vocab_size < 260:
            raise bad("vocab_size", ">= 260 (256 byte symbols + special tokens)")
        if not 0.0 < self.val_fraction < 0.5:
            raise bad("val_fraction", "in (0, 0.5)")
        if not 0.0 <= self.dropout < 1.0:
            raise bad("dropout", "in [0, 1)")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise KVSpliceError(f"train config: need 0 <= min_lr <= lr and lr > 0, got lr={self.lr}, min_lr={self.min_lr}")
        if self.kvsplice_strategy not in ("A", "B"):
            raise bad("kvsplice_strategy", "'A' or 'B'")
        if self.kvsplice_k > self.head_dim:
            raise KVSpliceError(f"train config: kvsplice_k={self.kvsplice_k} exceeds head_dim={self.head_dim}")
        if self.learned_k > self.head_dim:
            raise KVSpliceError(f"train config: learned_k={self.learned_k} exceeds head_dim={self.head_dim}")
        if self.kvsplice_enable and self.learned_enable:
            raise KVSpliceError("train config: kvsplice_enable and learned_enable are exclusive (both transform V)")
        if self.kvsplice_enable and self.kvsplice_warmup_steps >= self.max_steps:
            raise KVSpliceError(f"train config: kvsplice_warmup_steps={self.kvsplice_warmup_steps} must be "
                                f"< max_steps={self.max_steps}, or calibration never happens")
        if self.ra_layers is not None:
            if any(not isinstance(i, int) or not 0 <= i < self.n_layer for i in self.ra_layers):
                raise bad("ra_layers", f"a list of layer indices in [0, {self.n_layer})")
        if not isinstance(self.data, list):
            raise bad("data", "a list of file paths")
        self.prune_config()  # validates the pruning fields

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def prune_config(self) -> PruneConfig:
        from kvsplice.train.prune import PruneConfig  # imports torch: not at module level (`kvsplice --help` stays fast)

        return PruneConfig(
            keep_ratio=self.prune_keep_ratio, k_min=self.prune_k_min, recency=self.prune_recency,
            exposure_correction=self.prune_exposure_correction, ema_momentum=self.prune_ema_momentum,
            ema_update_interval=self.prune_ema_update_interval, mode=self.prune_mode,
            ema_in_eval=self.prune_ema_in_eval,
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **overrides: Any) -> "TrainConfig":
        return from_dict({**self.to_dict(), **overrides})


def field_names() -> list[str]:
    return [f.name for f in fields(TrainConfig)]


def from_dict(d: dict[str, Any]) -> TrainConfig:
    """Build from a plain dict; unknown keys raise (typos in configs must not pass silently)."""
    unknown = sorted(set(d) - set(field_names()))
    if unknown:
        raise KVSpliceError(f"train config: unknown keys {unknown}; expected keys among {field_names()}")
    try:
        return TrainConfig(**d)
    except TypeError as e:
        raise KVSpliceError(f"train config: {e}") from e


def load_toml(path: str | Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError as e:
        raise KVSpliceError(f"config file not found: {path}") from e
    except tomllib.TOMLDecodeError as e:
        raise KVSpliceError(f"config file {path} is not valid TOML: {e}") from e


def from_toml(path: str | Path) -> TrainConfig:
    raw = load_toml(path)
    return from_dict(raw.get("train", raw))
