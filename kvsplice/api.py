"""One-call Python API: calibrate the best measured recipe and keep it as one artefact.

    import kvsplice
    from kvsplice.loading import load_model

    model, tok = load_model("smollm2-135m")
    recipe = kvsplice.calibrate_recipe(model, tok)     # pca-q 4-bit, joint heads, K and V, sink 1
    ids = tok("The KV cache", return_tensors="pt")
    out = model.generate(**ids, cache=recipe.cache(model), max_new_tokens=20)   # one fresh cache per call
    recipe.save("my-recipe")                            # my-recipe/{k,v}.safetensors + recipe.json
    recipe = kvsplice.Recipe.load("my-recipe", model=model)   # a folder, or a Hugging Face Hub repo id

A recipe is the V geometry, the K geometry (either may be absent) and the number of exact sink tokens:
exactly what `CompressedCache.from_geometry` needs. Presets (`PRESETS`): "best" (the best measured
recipe at ~4 bits), "low-bit" (the best at 2 bits: cross-layer prediction, kvsplice/codecs/xpred.py)
and "seed" (the seed's Spline->PCA, V only, rank 16, per head).

This module imports neither torch nor transformers at import time (`import kvsplice` stays light).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsplice.errors import GeometryError, KVSpliceError

RECIPE_FORMAT = "kvsplice-recipe"
RECIPE_VERSION = 1
RECIPE_FILE = "recipe.json"
GEOMETRY_FILES = {"k": "k.safetensors", "v": "v.safetensors"}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Preset:
    """codec: registry name; params: its constructor parameters; rank: latent dims (None: the codec
    has no rank); targets: what is coded ("k", "v"); joint_heads: one codec per layer over all KV
    heads; sink: first tokens kept exact; max_batches: `kvsplice calibrate`'s default number of
    1024-token calibration windows (None: the whole text)."""

    codec: str
    params: dict
    rank: int | None
    targets: tuple[str, ...]
    joint_heads: bool
    sink: int
    max_batches: int | None
    k_rope: str = "pre"  # "post": K coded after RoPE, scored from its codes (the fast decode path)
    seq_len: int = 1024  # calibration window; K after RoPE is valid only up to it (capped at the model's positions)
    allocate: str | None = None  # "sensitivity": per-(layer, K|V) widths from a probe (kvsplice/allocation.py; minutes)


PRESETS = {
    # README section 3: +0.35..0.67 % perplexity at 4.04 bits per cached value on SmolLM2-135M
    "best": Preset("pca-q", {"bits": 4}, None, ("k", "v"), True, 1, 8),
    # the fast decode path (issue 12): "best" with K coded AFTER RoPE, so the coded-domain attention
    # scores K from its codes too (kvsplice.coded_decode); costs quality (README section 5)
    "fast": Preset("pca-q", {"bits": 4}, None, ("k", "v"), True, 1, 2, k_rope="post", seq_len=4096),
    # issue 13's best live recipe at 2 bits: cross-layer prediction + pca-q on the residual (docs/RESULTS.md)
    "low-bit": Preset("xpred-pca-q", {"bits": 2}, None, ("k", "v"), True, 1, 8),
    # the same with the sensitivity allocation (levers 1 + 2): 8 of 12 paired wins, no loss, at the same
    # bytes (docs/RESULTS.md section 11); the probe takes 14-23 min on a 2-core CPU
    "low-bit-alloc": Preset("xpred-pca-q", {"bits": 2}, None, ("k", "v"), True, 1, 8, allocate="sensitivity"),
    # the seed document's Spline->PCA: V only, 64 -> 16 dims, one codec per (layer, head)
    "seed": Preset("spline-pca", {}, 16, ("v",), False, 0, None),
}


@dataclass
class Recipe:
    """v / k: kvsplice.geometry.Geometry or None (stored uncompressed); sink: exact first tokens;
    model: the model id it was calibrated on; allow_other_model: use it on another model (warns)."""

    v: Any = None
    k: Any = None
    sink: int = 1
    model: str = ""
    allow_other_model: bool = field(default=False, compare=False)

    def __post_init__(self) -> None:
        if self.v is None and self.k is None:
            raise KVSpliceError("a recipe needs a V and/or a K geometry, got neither")
        if isinstance(self.sink, bool) or not isinstance(self.sink, int) or self.sink < 0:
            raise KVSpliceError(f"recipe sink must be an integer >= 0, got {self.sink!r}")
        for target, geo in (("v", self.v), ("k", self.k)):
            found = None if geo is None else geo.meta.get("target", target)
            if found not in (None, target):
                raise GeometryError(f"recipe {target.upper()} slot holds a geometry with target {found!r}")

    def describe(self) -> str:
        """e.g. 'pca-q 4-bit, joint heads, K+V, sink 1 (calibrated on smollm2-135m)'."""
        geo = self.v if self.v is not None else self.k
        params = json.loads(geo.meta.get("codec_params", "{}") or "{}")
        bits = f" {params['bits']:g}-bit" if isinstance(params.get("bits"), (int, float)) else ""
        rank = f" k={params['k']}" if "k" in params else ""
        joint = "joint heads" if geo.meta.get("joint_heads") == "true" else "per head"
        targets = "+".join(t.upper() for t, g in (("k", self.k), ("v", self.v)) if g is not None)
        return f"{geo.codec_name}{bits}{rank}, {joint}, {targets}, sink {self.sink} (calibrated on {self.model or '?'})"

    def check_model(self, model: Any) -> bool:
        """Warn (KVSpliceWarning) when `model` is not the model the recipe was calibrated on (the same
        rule as a plain geometry, `Geometry.check_model`); allow_other_model silences it. Layouts are
        checked again by the cache. True when the ids match or the recipe names no model."""
        from kvsplice.errors import KVSpliceWarning
        from kvsplice.loading import model_id

        found = model_id(model)
        if not self.model or found == self.model:
            return True
        if not self.allow_other_model:
            warnings.warn(f"recipe was calibrated on {self.model!r}, the model is {found!r}; results may be worse "
                          "than measured (allow_other_model=True / --allow-other-model silences this)",
                          KVSpliceWarning, stacklevel=3)
        return False

    def cache(self, model: Any, **kwargs: Any):
        """A FRESH `CompressedCache` for `model` (call once per generate: a cache holds one
        conversation). kwargs go to `CompressedCache.from_geometry` (window, pruner, ...)."""
        from kvsplice.cache import CompressedCache

        self.check_model(model)
        kwargs.setdefault("sink", self.sink)
        return CompressedCache.from_geometry(model, v_geometry=self.v, k_geometry=self.k, **kwargs)

    # -- one artefact: a folder with {k,v}.safetensors + recipe.json -------------------------------
    def save(self, folder: str | os.PathLike) -> Path:
        """Write the geometries, then recipe.json (with each file's SHA-256) last, each atomically;
        a half-finished save never loads (hash mismatch), an interrupted one leaves old files intact."""
        from kvsplice.geometry import save_geometry
        from kvsplice.paths import atomic_write_bytes

        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise KVSpliceError(f"recipe output {folder} exists and is not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for target, geo in (("k", self.k), ("v", self.v)):
            if geo is None:
                continue
            save_geometry(folder / GEOMETRY_FILES[target], geo)
            files[target] = {"path": GEOMETRY_FILES[target], "sha256": _sha256(folder / GEOMETRY_FILES[target])}
        doc = {"format": RECIPE_FORMAT, "version": RECIPE_VERSION, "model": self.model, "sink": self.sink,
               "files": files, "description": self.describe()}
        atomic_write_bytes(folder / RECIPE_FILE, (json.dumps(doc, indent=2, sort_keys=True) + "\n").encode())
        return folder

    @classmethod
    def load(cls, source: str | os.PathLike, model: Any = None, allow_other_model: bool = False,
             revision: str | None = None) -> "Recipe":
        """From a folder written by `save`, or a Hugging Face Hub repo id ("owner/name", fetched
        with huggingface_hub.snapshot_download; `revision` pins a commit). With `model`, the model
        id is checked now (see `check_model`)."""
        from kvsplice.geometry import load_geometry

        folder = _resolve(source, revision)
        doc = _read_recipe_json(folder)
        geos = {}
        for target, entry in doc["files"].items():
            path = folder / entry["path"]
            if not path.is_file():
                raise GeometryError(f"{folder}: recipe.json names {entry['path']!r}, found no such file")
            if _sha256(path) != entry["sha256"]:
                raise GeometryError(f"{path}: SHA-256 differs from recipe.json (file replaced or corrupted)")
            geos[target] = load_geometry(path)
        recipe = cls(v=geos.get("v"), k=geos.get("k"), sink=doc["sink"], model=doc["model"],
                     allow_other_model=allow_other_model)
        if model is not None:
            recipe.check_model(model)
        return recipe


def calibrate_recipe(
    model: Any,
    tokenizer: Any,
    text: str | None = None,
    *,
    preset: str = "best",
    bits: float | None = None,
    sink: int | None = None,
    max_batches: int | None = 4,
    seq_len: int | None = None,
    progress: bool = False,
    allocate: str | None = None,
    levels: list[float] | None = None,
    **calibration: Any,
) -> Recipe:
    """Calibrate a recipe for `model` in one call: one pass per target (K, V) over `text` (default:
    the calibration split of pydoc_data.topics), a codec fitted per layer -> Recipe.

    preset: "best", "fast" (K after RoPE: faster decode under `kvsplice.coded_decode`), "low-bit",
    "low-bit-alloc" (low-bit + allocate="sensitivity") or "seed" (`PRESETS`); bits: override the preset's bits (codecs with a `bits`
    parameter only); sink: override its sink; max_batches * seq_len: calibration tokens (default
    4 x the preset's window: 1024 tokens, "fast" 4096 (capped at the model's positions), ~20 s for SmolLM2-135M on 2 CPU cores; None: the whole text). allocate="sensitivity":
    `bits` becomes the AVERAGE over layers and K / V, each (layer, K|V) getting its own width from
    `levels` by a probe of its effect on the output (kvsplice/allocation.py; minutes, not seconds).
    Other keyword arguments go to `kvsplice.calibrate.CalibrationConfig` (samples, seed, layers, ...).
    """
    if seq_len is None:
        seq_len = preset_seq_len(preset, model)
    cfgs = recipe_configs(preset, bits=bits, max_batches=max_batches, seq_len=seq_len, **calibration)
    sink = PRESETS[preset].sink if sink is None else sink
    allocate = PRESETS[preset].allocate if allocate is None else allocate
    if allocate is not None:
        return calibrate_allocated(model, tokenizer, text, cfgs, sink=sink, allocate=allocate, levels=levels, progress=progress)
    return calibrate_with(model, tokenizer, text, cfgs, sink=sink, progress=progress)


def calibrate_allocated(model: Any, tokenizer: Any, text: str | None, cfgs: dict, sink: int, allocate: str = "sensitivity",
                        levels: list[float] | None = None, progress: bool = False, description: str | None = None,
                        probe_text: str | None = None) -> Recipe:
    """Like `calibrate_with`, with per-(layer, K|V) bit widths from the sensitivity probe; the
    codec's `bits` parameter is the average budget (uniform pca-q's payload at that bits). The probe
    reads the first 512 tokens of `probe_text` (default: of `text`; text None: the default mix, and
    the probe a finely mixed copy of it so that those tokens see every domain)."""
    from types import SimpleNamespace

    from kvsplice.allocation import DEFAULT_LEVELS, check_allocation_params
    from kvsplice.evaluate.frontier import Calibration
    from kvsplice.loading import model_id

    first = next(iter(cfgs.values()))
    if "bits" not in first.codec_params:
        raise KVSpliceError(f"allocate needs a codec with a bits budget; {first.codec!r} has params {first.codec_params}")
    s = {"codec": first.codec, "target": "".join(t for t in ("k", "v") if t in cfgs), "joint_heads": first.joint_heads,
         "sink": sink, **first.codec_params, "allocate": allocate, "levels": list(levels or DEFAULT_LEVELS)}
    check_allocation_params(s, "calibrate")
    if first.layers is not None:
        raise KVSpliceError(f"allocate spreads the budget over every layer; got layers={list(first.layers)}: drop layers")
    if text is None:
        from kvsplice.texts import PROBE_MIX_CHARS, mix_text

        text, description = mix_text()
        probe_text = mix_text(chunk_chars=PROBE_MIX_CHARS)[0]  # the probe's 512 tokens then see every domain
    keep = ("knots", "epochs", "samples", "max_batches", "seq_len", "batch_size", "seed")
    cal = Calibration(SimpleNamespace(calibration={k: v for k, v in first.to_dict().items() if k in keep}, calibration_data=None),
                      model, tokenizer, log=print if progress else (lambda m: None), progress=progress)
    cal.text, cal.probe_text = text, probe_text
    geo = {t: cal.allocated_geometry(s, t, description or "custom text") for t in cfgs}
    return Recipe(v=geo.get("v"), k=geo.get("k"), sink=sink, model=model_id(model))


def preset_seq_len(preset: str, model: Any) -> int:
    """The preset's calibration window, capped at the model's positions (max_position_embeddings)."""
    if preset not in PRESETS:
        raise KVSpliceError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(PRESETS[preset].seq_len, int(limit)) if limit else PRESETS[preset].seq_len


def recipe_configs(preset: str = "best", *, codec: str | None = None, bits: float | None = None,
                   rank: int | None = None, params: dict | None = None, targets: tuple[str, ...] | None = None,
                   joint_heads: bool | None = None, **calibration: Any) -> dict:
    """{target: CalibrationConfig} for a preset with overrides. The preset's params apply only to its
    own codec; `rank` (or `bits`) given for a codec that takes none is an error, not a no-op."""
    import inspect

    import kvsplice.codecs  # noqa: F401  (registers the built-in codecs)
    from kvsplice.calibrate import CalibrationConfig
    from kvsplice.codecs.base import CODECS

    if preset not in PRESETS:
        raise KVSpliceError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    codec = p.codec if codec is None else codec
    if codec not in CODECS:
        raise KVSpliceError(f"unknown codec {codec!r}; expected one of {sorted(CODECS)}")
    accepted = inspect.signature(CODECS[codec].__init__).parameters
    merged = dict(p.params) if codec == p.codec else {}
    merged.update(params or {})
    if bits is not None:
        if "bits" not in accepted:
            raise KVSpliceError(f"codec {codec!r} takes no bits parameter; got bits={bits!r}")
        merged["bits"] = bits
    if rank is not None and "k" not in accepted:
        raise KVSpliceError(f"codec {codec!r} has no rank (it takes {sorted(a for a in accepted if a != 'self')}); "
                            f"got rank={rank!r}: drop it")
    if rank is None:
        rank = p.rank if (codec == p.codec and p.rank is not None) else 16
    targets = p.targets if targets is None else tuple(targets)
    if not targets or any(t not in ("k", "v") for t in targets) or len(set(targets)) != len(targets):
        raise KVSpliceError(f"targets must be a non-empty subset of ('k', 'v'), got {targets!r}")
    joint = p.joint_heads if joint_heads is None else joint_heads
    calibration.setdefault("k_rope", p.k_rope)
    return {t: CalibrationConfig(codec=codec, rank=rank, target=t, joint_heads=joint, codec_params=dict(merged),
                                 **calibration) for t in targets}


def calibrate_with(model: Any, tokenizer: Any, text: str | None, cfgs: dict, sink: int, progress: bool = False,
                   description: str | None = None) -> Recipe:
    """Run `kvsplice.calibrate.run_calibration` once per target config -> Recipe."""
    from kvsplice import data
    from kvsplice.calibrate import run_calibration
    from kvsplice.loading import model_id

    if text is None:  # the default: the domains mix (docs/CROSS_DOMAIN.md: it transfers; pydoc alone does not)
        from kvsplice.texts import mix_text

        text, description = mix_text()
    from kvsplice.calibrate import collect_targets

    def sampling(c: Any) -> dict:  # what decides the sampled vectors (not the codec)
        return {k: v for k, v in c.to_dict().items() if k not in ("codec", "rank", "knots", "epochs", "codec_params",
                                                                   "fit_samples_per_dim", "target", "joint_heads")}

    collected = {}
    if len(cfgs) == 2 and sampling(cfgs["k"]) == sampling(cfgs["v"]) and cfgs["v"].codec != "xpred-pca-q":  # one pass for K and V
        collected = collect_targets(model, tokenizer, text, cfgs["v"], ("k", "v"), progress)
    geos = {t: run_calibration(model, tokenizer, text, cfg, description=description or "custom text",
                               progress=progress, collected=collected.get(t)).geometry for t, cfg in cfgs.items()}
    return Recipe(v=geos.get("v"), k=geos.get("k"), sink=sink, model=model_id(model))


# -- helpers -------------------------------------------------------------------------------------
def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve(source: str | os.PathLike, revision: str | None) -> Path:
    """A local folder as it is; a Hub repo id -> the folder of its snapshot (recipe files only)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise GeometryError(f"a recipe is a folder ({RECIPE_FILE} + {{k,v}}.safetensors); {path} is a file")
    text = str(source)
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise GeometryError(f"recipe {text!r}: expected a folder or a Hugging Face Hub repo id 'owner/name', found neither")
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id=text, revision=revision,
                                   allow_patterns=[RECIPE_FILE, *GEOMETRY_FILES.values()])
    except Exception as e:  # network, auth, missing repo, offline mode: one line, no traceback
        raise GeometryError(f"recipe {text!r}: no such local folder, and fetching it from the Hugging Face Hub "
                            f"failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    return Path(folder)


def _read_recipe_json(folder: Path) -> dict:
    path = folder / RECIPE_FILE
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GeometryError(f"{folder}: not a recipe folder (expected {RECIPE_FILE}, found none)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise GeometryError(f"{path}: unreadable recipe: {e}") from e
    if not isinstance(doc, dict) or doc.get("format") != RECIPE_FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise GeometryError(f"{path}: expected format {RECIPE_FORMAT!r}, found {found!r}")
    if doc.get("version") != RECIPE_VERSION:
        raise GeometryError(f"{path}: recipe version {doc.get('version')!r}, this kvsplice reads {RECIPE_VERSION}")
    files, sink, model = doc.get("files"), doc.get("sink"), doc.get("model", "")
    if not isinstance(files, dict) or not files or set(files) - set(GEOMETRY_FILES):
        raise GeometryError(f"{path}: 'files' must map some of {sorted(GEOMETRY_FILES)} to entries, found {files!r}")
    for target, entry in files.items():
        ok = isinstance(entry, dict) and entry.get("path") == GEOMETRY_FILES[target] and isinstance(entry.get("sha256"), str)
        if not ok:
            raise GeometryError(f"{path}: files.{target} must be {{'path': {GEOMETRY_FILES[target]!r}, 'sha256': ...}}, "
                                f"found {entry!r}")
    if isinstance(sink, bool) or not isinstance(sink, int) or sink < 0:
        raise GeometryError(f"{path}: sink must be an integer >= 0, found {sink!r}")
    if not isinstance(model, str):
        raise GeometryError(f"{path}: model must be a string, found {model!r}")
    return doc
