"""The codec contract and the registry by name.

A codec maps vectors of dimension D (the last axis) to a compressed payload and back:

    fit(x)          x: (N, D) calibration vectors            -> self
    compress(x)     x: (..., D)                              -> latents (..., k)
    decompress(z)   z: (..., k)                              -> (..., D), x's dtype
    encode(x)       x: (..., D) -> dict of tensors, each shaped (..., *) : what a cache stores
    decode(p)       the inverse of encode

`encode`/`decode` default to {"z": compress(x)}; quantising codecs override them to return
integer codes plus scales. A cache concatenates every payload entry along the token axis and
counts `nbytes` of exactly those tensors, so memory accounting is whatever the codec stores.

State is a flat dict of named tensors plus a dict of string metadata; `Codec.from_state`
rebuilds the codec (class chosen by the metadata's "codec" entry) without pickle.
"""

from __future__ import annotations

import inspect
import json
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from kvsplice.errors import CodecError

CODECS: dict[str, type["Codec"]] = {}

# Largest |value| a state tensor in activation units (means, knots, clips) may hold. Every codec
# computes in float32: squares of 1e6 (1e12) summed over any head dimension stay ~1e20 below
# float32's max (3.4e38), while |x| >= 1e20 overflows to inf and then NaN (perplexity "nan").
# No real K/V activation comes near it (fp16 caches overflow at 65504).
VALUE_BOUND = 1e6
# Largest vector dimension a codec file may declare: a joint codec over 64 KV heads of 1024 dims.
# Codecs without state tensors (identity, uniform) take dim from the metadata alone; a crafted
# dim of 1e8 would otherwise allocate gigabytes on the first probe.
MAX_DIM = 1 << 16
_DTYPES = {"float": torch.float32, "int": torch.int64}  # what every fit produces; files must match


@dataclass(frozen=True)
class TensorSpec:
    """What a codec expects of one state tensor: exact `shape`, `kind` ("float": float32, "int":
    int64), |values| <= `bound` (finite always), and whether it may be absent (`optional`)."""

    shape: tuple[int, ...]
    kind: str = "float"
    bound: float = VALUE_BOUND
    optional: bool = False


def check_orthonormal_columns(name: str, what: str, m: torch.Tensor, tol: float = 1e-3) -> None:
    """CodecError unless m (D, k) has orthonormal columns (|m^T m - I| <= tol): bases, rotations."""
    m64 = m.double()
    err = float((m64.T @ m64 - torch.eye(m.shape[1], dtype=torch.float64, device=m.device)).abs().max())
    if not err <= tol:
        raise CodecError(f"{name} state: {what} must have orthonormal columns, found max |M^T M - I| = {err:.3g}")


def check_increasing(name: str, what: str, t: torch.Tensor, strict: bool) -> None:
    """CodecError unless t (D, K) increases along K (strictly when `strict`)."""
    d = t[:, 1:] - t[:, :-1]
    ok = bool((d > 0).all()) if strict else bool((d >= 0).all())
    if not ok:
        raise CodecError(f"{name} state: {what} must be {'strictly increasing' if strict else 'non-decreasing'} along the knot axis")


def register(cls: type["Codec"]) -> type["Codec"]:
    """Class decorator: make a codec constructible by its `name` (CLI, ablation, geometry files)."""
    if cls.name in CODECS and CODECS[cls.name] is not cls:
        raise CodecError(f"codec name {cls.name!r} registered twice")
    CODECS[cls.name] = cls
    return cls


def get_codec(name: str, **params: Any) -> "Codec":
    """Build an unfitted codec by registry name."""
    _load_builtin_codecs()
    if name not in CODECS:
        raise CodecError(f"unknown codec {name!r}; expected one of {sorted(CODECS)}")
    try:
        return CODECS[name](**params)
    except TypeError as e:  # unknown / missing constructor parameter
        accepted = [p for p in inspect.signature(CODECS[name].__init__).parameters if p != "self"]
        raise CodecError(f"bad parameters {sorted(params)} for codec {name!r} ({e}); it accepts {accepted}") from e


def codec_names() -> list[str]:
    _load_builtin_codecs()
    return sorted(CODECS)


def _load_builtin_codecs() -> None:
    # Importing the package registers every built-in codec; deferred to avoid import cycles.
    import kvsplice.codecs  # noqa: F401


class Codec(ABC):
    """Base class. Subclasses set `name`, implement the abstract methods, and keep their
    constructor parameters in `self.params` (JSON-serialisable) so they round-trip through files."""

    name: ClassVar[str] = "base"

    def __init__(self, **params: Any) -> None:
        self.params: dict[str, Any] = dict(params)
        self.dim: int | None = None  # D, set by fit / load
        self.info: dict[str, Any] = {}  # fit diagnostics (MSEs, decisions), saved as metadata

    # -- contract ---------------------------------------------------------------------------
    @abstractmethod
    def fit(self, x: torch.Tensor) -> "Codec":
        """Fit on calibration vectors x of shape (N, D). Returns self."""

    @abstractmethod
    def compress(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> latents (..., k)."""

    @abstractmethod
    def decompress(self, z: torch.Tensor) -> torch.Tensor:
        """(..., k) -> (..., D)."""

    @abstractmethod
    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Named tensors that, with `metadata()`, fully determine the fitted codec."""

    @abstractmethod
    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Inverse of `state_tensors` (dim and info already restored)."""

    @property
    @abstractmethod
    def latent_dim(self) -> int:
        """k: the number of latent values stored per vector."""

    # -- payload used by caches ---------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(..., D) -> payload dict; every tensor shares x's leading dims."""
        return {"z": self.compress(x)}

    def decode(self, payload: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.decompress(payload["z"])

    def payload_bytes_per_vector(self, dtype: torch.dtype = torch.float32) -> float:
        """Bytes the payload of one vector occupies when the cache runs in `dtype`."""
        return self.latent_dim * torch.empty((), dtype=dtype).element_size()

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Codec":
        """Move fitted tensors (floating ones cast to dtype when given)."""
        moved = {}
        for k, t in self.state_tensors().items():
            moved[k] = t.to(device=device, dtype=dtype if (dtype and t.is_floating_point()) else None)
        self.load_state_tensors(moved)
        return self

    # -- (de)serialisation ----------------------------------------------------------------------
    def metadata(self) -> dict[str, str]:
        return {
            "codec": self.name,
            "params": json.dumps(self.params, sort_keys=True),
            "dim": str(self.dim),
            "latent_dim": str(self.latent_dim),
            "info": json.dumps(self.info, sort_keys=True),
        }

    @staticmethod
    def from_state(tensors: dict[str, torch.Tensor], metadata: dict[str, str], validate: bool = False) -> "Codec":
        """Rebuild a fitted codec from `state_tensors()` and `metadata()`. validate: run
        `validate_state` first (exact float32/int64 dtypes, shapes, bounds): the geometry loader does
        for every file; in-memory copies (e.g. a codec already cast to bf16 for a cache) need not."""
        try:
            codec = get_codec(metadata["codec"], **json.loads(metadata["params"]))
            codec.dim = int(metadata["dim"])
            codec.info = json.loads(metadata.get("info", "{}"))
        except (KeyError, ValueError, TypeError) as e:
            raise CodecError(f"codec metadata is incomplete or malformed: {e}") from e
        if not 1 <= codec.dim <= MAX_DIM:  # before anything allocates dim-sized buffers (probes, caches)
            raise CodecError(f"codec metadata: dim must be in [1, {MAX_DIM}], found {codec.dim}")
        if not isinstance(codec.info, dict):
            raise CodecError(f"codec metadata: info must be a JSON object, found {type(codec.info).__name__}")
        if validate:
            codec.validate_state(tensors)
        codec.load_state_tensors(tensors)
        if codec.latent_dim != int(metadata["latent_dim"]):
            raise CodecError(
                f"codec latent_dim mismatch: metadata says {metadata['latent_dim']}, tensors give {codec.latent_dim}"
            )
        return codec

    def min_fit_vectors(self, D: int) -> int:
        """Fewest calibration vectors (N) for a meaningful fit in dimension D; calibration warns below
        it. Every codec here estimates a D x D covariance (PCA basis or rotation): with N < 4 D its
        eigenvalues are mostly sampling noise (Marchenko-Pastur spread (1 +- sqrt(D/N))^2 > 2x)."""
        return 4 * D

    # -- state validation (run on every load, before the tensors are used) ----------------------------
    def state_spec(self) -> dict[str, TensorSpec]:
        """{name: TensorSpec} of the state tensors this codec (params and dim set) expects. Codecs with
        state override this; the default is none."""
        return {}

    def check_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Codec-specific checks beyond shape/dtype/bounds (orthonormal bases, monotone knots...).
        Called by `validate_state` after the spec checks passed."""

    def validate_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """CodecError unless `tensors` are exactly what `state_spec()` declares: the same names (no
        extra, none missing unless optional), exact shapes and dtypes, finite values with |x| <= bound;
        then `check_state`. A file that passes loads into a codec that computes finite results."""
        spec = self.state_spec()
        extra = sorted(set(tensors) - set(spec))
        missing = sorted(n for n, s in spec.items() if n not in tensors and not s.optional)
        if extra or missing:
            raise CodecError(f"{self.name} state: expected tensors {sorted(spec)}, found {sorted(tensors)}"
                             f" (missing {missing}, unexpected {extra})")
        for n, s in spec.items():
            t = tensors.get(n)
            if t is None:
                continue
            if not isinstance(t, torch.Tensor):
                raise CodecError(f"{self.name} state: {n} must be a tensor, found {type(t).__name__}")
            want = _DTYPES[s.kind]
            if t.dtype != want or tuple(t.shape) != tuple(s.shape):
                raise CodecError(f"{self.name} state: {n} must be {want} of shape {tuple(s.shape)}, "
                                 f"found {t.dtype} of shape {tuple(t.shape)}")
            if t.numel() == 0:
                continue
            if s.kind == "float" and not bool(torch.isfinite(t).all()):
                raise CodecError(f"{self.name} state: {n} has {int((~torch.isfinite(t)).sum())} non-finite values (NaN/inf)")
            top = float(t.abs().max())
            if not top <= s.bound:
                raise CodecError(f"{self.name} state: {n} has |value| up to {top:.3g}, more than the {s.bound:.3g} "
                                 "this codec can compute with (corrupted or absurd geometry)")
        self.check_state(tensors)

    # -- shared input checks ----------------------------------------------------------------------
    def _check_fit_input(self, x: torch.Tensor, min_rows: int = 2) -> torch.Tensor:
        """Validate calibration data (N, D); returns it as float32 (fits always run in float32+)."""
        if not isinstance(x, torch.Tensor):
            raise CodecError(f"{self.name}.fit expects a torch.Tensor of shape (N, D), got {type(x).__name__}")
        if x.ndim != 2:
            raise CodecError(f"{self.name}.fit expects shape (N, D), got {tuple(x.shape)}")
        if x.shape[0] < min_rows:
            raise CodecError(f"{self.name}.fit needs at least {min_rows} vectors, got N={x.shape[0]}")
        if not x.is_floating_point():
            raise CodecError(f"{self.name}.fit expects floating-point vectors, got dtype {x.dtype}")
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise CodecError(f"{self.name}.fit: calibration data has {bad} non-finite values (NaN/inf) of {x.numel()}")
        return x.float()

    def _check_vectors(self, x: torch.Tensor, width: int, what: str) -> None:
        if self.dim is None:
            raise CodecError(f"{self.name} codec is not fitted; call fit() or load a geometry file first")
        if x.shape[-1] != width:
            raise CodecError(f"{self.name}.{what} expects last dimension {width}, got shape {tuple(x.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(dim={self.dim}, k={self.latent_dim if self.dim else '?'}, params={self.params})"
