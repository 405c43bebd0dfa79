"""The seed's inference ablation: baseline, V-only pruning, codecs, and their combination.

A config (TOML, `AblationConfig.from_toml`) names the model, the calibration budget, the protocol
token counts and the rows. Each row is one cache:

    no codec, no keep_ratio   -> transformers.DynamicCache (the baseline, V0)
    keep_ratio r              -> VOnlyPruner(keep_ratio=r) (V19), needs protocol prefill-continue
    codec c, rank k           -> V stored as c's k-dim latents (geometry calibrated or reused)
    both                      -> prune, then compress the kept V (strategy "A"; V20)

Protocol: EVERY row is measured with prefill-continue (the only protocol pruning allows), on the
same tokens with the same loss accounting, so all rows compare. Rows with pruning decode token by
token (`chunk`, default 1); rows without pruning are fed `unpruned_chunk` tokens per step, which
changes nothing they compute except float summation order (no selection exists; every V is encoded
on arrival) and makes them much cheaper. Rows without pruning are also measured teacher-forced when
`protocol.teacher_forced` is on (the usual protocol for codec-only results).

Geometries: one per (codec, rank, joint_heads). A row's `geometry` path, else
`<geometry_dir>/<codec>-k<rank>[-joint].safetensors` when present, is reused (checked against the
model layout and the row's codec and rank); otherwise V is collected ONCE from the calibration text
(all rows share the sample) and each geometry is fitted and, with a geometry_dir, saved there.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from kvsplice.config import check, from_table, is_int, read_toml
from kvsplice.errors import KVSpliceError
from kvsplice.evaluate.perplexity import EvalRow, perplexity_prefill_continue, perplexity_teacher_forced
from kvsplice.evaluate.report import require_finite, result_dict


class AblationConfigError(KVSpliceError):
    """A bad ablation config (unknown key, wrong type, impossible combination)."""


_check = functools.partial(check, error=AblationConfigError)
_from_table = functools.partial(from_table, error=AblationConfigError)
_is_int = is_int




@dataclass
class RowSpec:
    """One row. codec/rank: V codec (None: V stored raw); keep_ratio: V-only pruning (None: off);
    recency/k_min: pruner parameters; strategy: "A" prune then compress, "B" compress then select;
    window: newest tokens kept in full precision; joint_heads: one codec over the layer's KV heads;
    geometry: a geometry file to reuse for this row."""

    name: str
    codec: str | None = None
    rank: int | None = None
    keep_ratio: float | None = None
    recency: int = 64
    k_min: int = 64
    strategy: str = "A"
    window: int = 0
    joint_heads: bool = False
    geometry: str | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and bool(self.name), f"row name must be a non-empty string, got {self.name!r}")
        w = f"row {self.name!r}"
        _check((self.codec is None) == (self.rank is None), f"{w}: give both codec and rank, or neither (got {self.codec!r}, {self.rank!r})")
        if self.codec is not None:
            from kvsplice.codecs import codec_names

            _check(self.codec in codec_names(), f"{w}: unknown codec {self.codec!r}; expected one of {codec_names()}")
            _check(_is_int(self.rank) and self.rank >= 1, f"{w}: rank must be a positive int, got {self.rank!r}")
        if self.keep_ratio is not None:
            _check(
                isinstance(self.keep_ratio, (int, float)) and not isinstance(self.keep_ratio, bool) and 0 < self.keep_ratio <= 1,
                f"{w}: keep_ratio must be in (0, 1], got {self.keep_ratio!r}",
            )
            self.keep_ratio = float(self.keep_ratio)
        for k in ("recency", "k_min", "window"):
            _check(_is_int(getattr(self, k)) and getattr(self, k) >= 0, f"{w}: {k} must be an int >= 0, got {getattr(self, k)!r}")
        _check(self.strategy in ("A", "B"), f"{w}: strategy must be 'A' or 'B', got {self.strategy!r}")
        _check(isinstance(self.joint_heads, bool), f"{w}: joint_heads must be a bool, got {self.joint_heads!r}")
        _check(self.geometry is None or self.codec is not None, f"{w}: a geometry file needs codec and rank")

    @property
    def prunes(self) -> bool:
        return self.keep_ratio is not None

    @property
    def geometry_key(self) -> tuple[str, int, bool] | None:
        return None if self.codec is None else (self.codec, self.rank, self.joint_heads)


@dataclass
class ProtocolSpec:
    """prefill/continue_tokens/segments/batch_size: prefill-continue (every row). chunk: tokens fed
    per step for rows WITH pruning (1 = true decoding: the selection is refreshed after every token).
    unpruned_chunk: the same for rows without pruning, where the chunk size cannot change what any
    query reads (every token's V is encoded on arrival, nothing is selected), only the float summation
    order; a larger chunk just makes those rows cheaper. teacher_forced: also run rows without
    pruning teacher-forced, `tf_windows` windows of `tf_window`."""

    prefill: int = 768
    continue_tokens: int = 256
    chunk: int = 1
    unpruned_chunk: int = 16
    segments: int = 4
    batch_size: int = 4
    teacher_forced: bool = True
    tf_window: int = 1024
    tf_windows: int = 2

    def __post_init__(self) -> None:
        for k in ("prefill", "continue_tokens", "chunk", "unpruned_chunk", "segments", "batch_size", "tf_window", "tf_windows"):
            _check(_is_int(getattr(self, k)) and getattr(self, k) >= 1, f"[protocol] {k} must be a positive int, got {getattr(self, k)!r}")
        _check(isinstance(self.teacher_forced, bool), f"[protocol] teacher_forced must be a bool, got {self.teacher_forced!r}")
        _check(self.tf_window >= 2, f"[protocol] tf_window must be >= 2, got {self.tf_window}")


def default_rows() -> list[RowSpec]:
    """The seed's rows (V0, V19, V20, V20-pca) and the codec-only rank sweep."""
    r = 0.382  # 391 of 1024, as in the seed
    rows = [
        RowSpec("V0"),
        RowSpec("V19", keep_ratio=r),
        RowSpec("V20", codec="spline-pca", rank=16, keep_ratio=r),
        RowSpec("V20-pca", codec="pca", rank=16, keep_ratio=r),
    ]
    for k in (16, 32, 48):
        rows += [RowSpec(f"pca-{k}", codec="pca", rank=k), RowSpec(f"spline-pca-{k}", codec="spline-pca", rank=k)]
    return rows


def _default_calibration() -> dict[str, Any]:
    return {"samples": 12288, "max_batches": 4, "fit_samples_per_dim": 2000, "epochs": 8, "knots": 7}


@dataclass
class AblationConfig:
    """model: `load_model` name or folder; dtype: "float32" | "bfloat16" | "float16";
    eval_data / calibration_data: text files (empty: the default corpus's evaluation / calibration
    split); geometry_dir: where geometries are reused from / saved to (None: not saved);
    threads: torch threads (None: torch's default); calibration: CalibrationConfig options except
    codec, rank, joint_heads (taken from the rows); protocol: ProtocolSpec; rows: RowSpec list."""

    model: str = "smollm2-135m"
    dtype: str = "float32"
    eval_data: list[str] = field(default_factory=list)
    calibration_data: list[str] = field(default_factory=list)
    geometry_dir: str | None = None
    threads: int | None = None
    calibration: dict[str, Any] = field(default_factory=_default_calibration)
    protocol: ProtocolSpec = field(default_factory=ProtocolSpec)
    rows: list[RowSpec] = field(default_factory=default_rows)

    def __post_init__(self) -> None:
        _check(isinstance(self.model, str) and bool(self.model), f"model must be a non-empty string, got {self.model!r}")
        _check(self.dtype in DTYPES, f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        for k in ("eval_data", "calibration_data"):
            v = getattr(self, k)
            _check(isinstance(v, list) and all(isinstance(p, str) for p in v), f"{k} must be a list of paths, got {v!r}")
        _check(self.geometry_dir is None or isinstance(self.geometry_dir, str), f"geometry_dir must be a path, got {self.geometry_dir!r}")
        _check(self.threads is None or (_is_int(self.threads) and self.threads >= 1), f"threads must be a positive int, got {self.threads!r}")
        if isinstance(self.protocol, dict):
            self.protocol = _from_table(ProtocolSpec, self.protocol, "protocol")
        _check(isinstance(self.protocol, ProtocolSpec), f"protocol must be a table, got {type(self.protocol).__name__}")
        _check(isinstance(self.rows, list) and bool(self.rows), "rows must be a non-empty list of [[rows]] tables")
        self.rows = [r if isinstance(r, RowSpec) else _from_table(RowSpec, r, "rows") for r in self.rows]
        names = [r.name for r in self.rows]
        _check(len(set(names)) == len(names), f"row names must be unique, got {names}")
        _check(isinstance(self.calibration, dict), f"[calibration] must be a table, got {type(self.calibration).__name__}")
        fixed = sorted({"codec", "rank", "joint_heads"} & set(self.calibration))
        _check(not fixed, f"[calibration] must not set {fixed}: they come from each row")
        try:  # validates the table (unknown keys, types)
            self.calibration_config("pca", 1, False)
        except AblationConfigError:
            raise
        except KVSpliceError as e:
            raise AblationConfigError(f"[calibration]: {e}") from e

    def calibration_config(self, codec: str, rank: int, joint_heads: bool):
        """The CalibrationConfig fitting one geometry (validates the [calibration] table)."""
        from kvsplice.calibrate import CalibrationConfig

        return CalibrationConfig.from_dict({**self.calibration, "codec": codec, "rank": rank, "joint_heads": joint_heads})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AblationConfig":
        return _from_table(cls, d, "top level")

    @classmethod
    def from_toml(cls, path: str | Path) -> "AblationConfig":
        d = read_toml(path, "ablation", AblationConfigError)
        return cls.from_dict(d)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class AblationResult:
    """rows: prefill-continue rows (every row); tf_rows: teacher-forced rows (non-pruning rows, or
    empty); result: the JSON object (report.result_dict + "extra_protocols" + "geometries")."""

    rows: list[EvalRow]
    tf_rows: list[EvalRow]
    result: dict[str, Any]


def geometry_filename(codec: str, rank: int, joint_heads: bool) -> str:
    return f"{codec}-k{rank}{'-joint' if joint_heads else ''}.safetensors"


def _check_geometry(geo: Any, key: tuple[str, int, bool], model: Any, source: str) -> None:
    from kvsplice.cache import model_layout

    codec, rank, joint = key
    layers, heads, head_dim = model_layout(model)
    geo.check_compatible(layers, heads, head_dim)
    found_codec = geo.meta.get("codec") or next(iter(geo.codecs.values())).name
    found_rank = next(iter(geo.codecs.values())).latent_dim
    found_joint = all(h == -1 for (_, h) in geo.codecs)
    if (found_codec, found_rank, found_joint) != (codec, rank, joint):
        raise KVSpliceError(
            f"geometry {source}: expected codec {codec!r} rank {rank} joint_heads={joint}, "
            f"found codec {found_codec!r} rank {found_rank} joint_heads={found_joint}"
        )


def prepare_geometries(
    cfg: AblationConfig, model: Any, tokenizer: Any, log: Callable[[str], None] = print, progress: bool = True
) -> tuple[dict[tuple[str, int, bool], Any], dict[str, Any]]:
    """Reuse or calibrate every geometry the rows need -> ({key: Geometry}, {name: description})."""
    from kvsplice.calibrate import collect_layer_vectors, fit_geometry, split_heads
    from kvsplice.data import calibration_text, describe_default, load_texts
    from kvsplice.geometry import load_geometry, save_geometry
    from kvsplice.loading import model_id
    from kvsplice.models import get_adapter

    geos: dict[tuple[str, int, bool], Any] = {}
    info: dict[str, Any] = {}
    explicit = {r.geometry_key: r.geometry for r in cfg.rows if r.geometry}
    needed = list(dict.fromkeys(r.geometry_key for r in cfg.rows if r.codec is not None))
    gdir = Path(cfg.geometry_dir) if cfg.geometry_dir else None
    collected = None
    description = f"files {cfg.calibration_data}" if cfg.calibration_data else describe_default("calibration")
    for key in needed:
        name = geometry_filename(*key)
        path = Path(explicit[key]) if key in explicit else (gdir / name if gdir else None)
        ccfg = cfg.calibration_config(*key)
        if path is not None and (key in explicit or path.is_file()):
            geo = load_geometry(path)
            _check_geometry(geo, key, model, str(path))
            made_with = geo.meta.get("calibration_config")
            stale = []
            if made_with is not None and json.loads(made_with) != json.loads(json.dumps(ccfg.to_dict())):
                stale.append(f"calibration settings {made_with}")
            if geo.meta.get("calibration", description) != description:
                stale.append(f"calibration text {geo.meta['calibration']!r}")
            if geo.meta.get("model", model_id(model)) != model_id(model):
                stale.append(f"model {geo.meta['model']!r}")
            if stale and key in explicit:
                log(f"note: geometry {path} differs from this config: {'; '.join(stale)} (used as given)")
            elif stale:
                log(f"geometry {path} was made with other {'; '.join(stale)}; recalibrating")
                geo = None
        else:
            geo = None
        if geo is not None:
            geos[key] = geo
            info[name] = {"path": str(path), "reused": True, **{k: geo.meta.get(k) for k in ("calibration", "tokens", "fit_seconds")}}
            log(f"reusing geometry {path}")
            continue
        if collected is None:
            text = load_texts(cfg.calibration_data) if cfg.calibration_data else calibration_text()
            t0 = time.perf_counter()
            collected = collect_layer_vectors(model, tokenizer, text, ccfg, progress=progress)
            collect_s = time.perf_counter() - t0
            log(f"collected V: {collected.tokens} tokens, {next(iter(collected.layers.values())).shape[0]} tokens/layer kept, {collect_s:.1f} s")
        meta = {
            "model": model_id(model),
            "model_type": str(model.config.model_type),
            **{k: str(v) for k, v in get_adapter(model).layout().items()},
            "calibration": description,
            "tokens": str(collected.tokens),
            "collect_seconds": f"{collect_s:.2f}",
        }
        t0 = time.perf_counter()
        geo = fit_geometry(split_heads(collected, key[2]), ccfg, meta)
        fit_s = time.perf_counter() - t0
        log(f"fitted {name[: -len('.safetensors')]}: {len(geo.codecs)} codecs in {fit_s:.1f} s")
        if path is not None:
            save_geometry(path, geo)
        geos[key] = geo
        info[name] = {"path": str(path) if path else None, "reused": False, "calibration": description,
                      "tokens": collected.tokens, "collect_seconds": round(collect_s, 2), "fit_seconds": round(fit_s, 2)}
    return geos, info


def cache_factory(model: Any, row: RowSpec, geometry: Any = None) -> Callable[[], Any]:
    """() -> a fresh cache for `row`: DynamicCache for the baseline, else a CompressedCache."""
    from transformers import DynamicCache

    from kvsplice.cache import CompressedCache
    from kvsplice.pruning import VOnlyPruner

    if row.codec is None and not row.prunes:
        return lambda: DynamicCache()
    if row.codec is not None and geometry is None:
        raise KVSpliceError(f"row {row.name!r} needs a {row.codec} rank-{row.rank} geometry, got none")

    def make() -> Any:
        pruner = VOnlyPruner(keep_ratio=row.keep_ratio, recency=row.recency, k_min=row.k_min) if row.prunes else None
        return CompressedCache.from_geometry(model, v_geometry=geometry, pruner=pruner, window=row.window, strategy=row.strategy)

    make()  # fail on a bad geometry / setting before any compute
    return make


def run_ablation(
    cfg: AblationConfig,
    model: Any = None,
    tokenizer: Any = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
    on_row: Callable[[AblationResult], None] | None = None,
) -> AblationResult:
    """Calibrate (or reuse) the geometries, then measure every row (see module docstring).
    on_row(partial result) runs after every finished row (rows so far, result["complete"] False),
    so a caller can save them: an interrupted run loses at most the row in progress. A row with a
    non-finite perplexity raises NonFiniteError."""
    from kvsplice.data import evaluation_text, load_texts, tokenize
    from kvsplice.loading import load_model, model_id

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if model is None:
        t0 = time.perf_counter()
        model, tokenizer = load_model(cfg.model, dtype=cfg.torch_dtype)
        log(f"loaded {cfg.model} in {time.perf_counter() - t0:.1f} s")
    model.eval()
    t_cal = time.perf_counter()
    geos, geo_info = prepare_geometries(cfg, model, tokenizer, log=log, progress=progress)
    t_cal = time.perf_counter() - t_cal
    from kvsplice.data import refuse_bos_tokenizer

    refuse_bos_tokenizer(tokenizer, "the seed's ablation (kvsplice ablate)")
    ids = tokenize(tokenizer, load_texts(cfg.eval_data) if cfg.eval_data else evaluation_text())
    p = cfg.protocol
    rows, tf_rows = [], []

    def assemble(complete: bool) -> AblationResult:
        result = result_dict(model_id(model), "prefill-continue", rows, cfg.to_dict())
        if tf_rows:
            tf = result_dict(model_id(model), "teacher-forced", tf_rows, {})
            result["extra_protocols"] = [{k: tf[k] for k in ("protocol", "tokens", "rows")}]
        result["geometries"] = geo_info
        result["calibration_seconds"] = round(t_cal, 2)
        result["eval_tokens_available"] = int(ids.shape[0])
        result["complete"] = complete
        return AblationResult(list(rows), list(tf_rows), json.loads(json.dumps(result)))

    for row in cfg.rows:
        make = cache_factory(model, row, geos.get(row.geometry_key))
        r = perplexity_prefill_continue(
            model, ids, make, prefill=p.prefill, continue_tokens=p.continue_tokens,
            chunk=p.chunk if row.prunes else p.unpruned_chunk,
            segments=p.segments, batch_size=p.batch_size, name=row.name,
        )
        rows.append(require_finite(r, "(prefill-continue)"))
        log(f"[prefill-continue] {row.name}: ppl {r.ppl:.3f}, KV {r.kv_bytes_per_token:.0f} B/token, {r.seconds:.1f} s")
        if p.teacher_forced and not row.prunes:
            t = perplexity_teacher_forced(model, ids, make, window=p.tf_window, max_windows=p.tf_windows, name=row.name)
            tf_rows.append(require_finite(t, "(teacher-forced)"))
            log(f"[teacher-forced]   {row.name}: ppl {t.ppl:.3f}, {t.seconds:.1f} s")
        if on_row is not None:
            on_row(assemble(complete=False))
    return assemble(complete=True)
