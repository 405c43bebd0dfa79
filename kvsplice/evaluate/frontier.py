"""`kvsplice frontier`: run the grid of kvsplice/evaluate/frontier_config.py and write the JSON + PNG.

JSON (issue 5, section 4, plus "config" and two documented extras):

    {"model": str, "baseline_ppl": float,
     "points": [{"method", "setting", "kv_bits_per_value", "kv_bytes_per_token", "ppl", "pareto"}],
     "config": {...},                              # the FrontierConfig that produced it
     "global_pareto": [{"method", "setting"}],     # not dominated by any point of any method
     "teacher_forced": {"baseline_ppl", "points"}  # only when protocol.teacher_forced (exact settings)
    }

The baseline (transformers DynamicCache, model dtype) is point {"method": "baseline"}; "pareto" is
per method (see frontier_config.py). Atomic writes.
"""

from __future__ import annotations

import json
import math
import time
from typing import Any, Callable

import torch

from kvsplice.allocation import ALLOCATE_KEYS
from kvsplice.errors import KVSpliceError
from kvsplice.evaluate.frontier_config import (
    POINT_KEYS,
    FrontierConfig,
    FrontierConfigError,
    FrontierProtocol,
    MethodSpec,
    make_peer,
    default_methods,
    quick_methods,
)
from kvsplice.evaluate.perplexity import EvalRow, perplexity_prefill_continue, perplexity_teacher_forced

__all__ = [
    "FrontierConfig", "FrontierConfigError", "FrontierProtocol", "MethodSpec", "default_methods", "quick_methods",
    "Calibration", "codec_factory", "pareto_flags", "run_frontier", "validate_frontier", "write_frontier_json", "POINT_KEYS",
]

SHAREABLE_WARPS = ("spline", "bennett")  # warps fitted on the data alone (not on the bit budget)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# setting keys that are not codec parameters (cache layout, protocol, allocation)
NON_CODEC_KEYS = ("codec", "target", "joint_heads", "window", "sink", "k", "protocol", "k_rope", *ALLOCATE_KEYS)


def pareto_flags(points: list[tuple[float, float]]) -> list[bool]:
    """(bytes, ppl) pairs -> True where no other pair has bytes <= and ppl <= with one strictly less.
    Non-finite ppl is never Pareto-optimal."""
    out = []
    for i, (b, p) in enumerate(points):
        ok = math.isfinite(p)
        for j, (b2, p2) in enumerate(points):
            if ok and j != i and math.isfinite(p2) and b2 <= b and p2 <= p and (b2 < b or p2 < p):
                ok = False
        out.append(ok)
    return out


class Calibration:
    """Collects V and K once (lazily) and fits one geometry per (codec, params, target, joint)."""

    def __init__(self, cfg: FrontierConfig, model: Any, tokenizer: Any, log: Callable[[str], None], progress: bool) -> None:
        self.cfg, self.model, self.tokenizer, self.log, self.progress = cfg, model, tokenizer, log, progress
        self.collected: dict[str, Any] = {}
        self.geometries: dict[str, Any] = {}
        self.warps: dict[str, Any] = {}  # geometries whose trained warps later bit budgets reuse
        self.info: dict[str, Any] = {}
        self.allocations: dict[str, Any] = {}

    def _text(self) -> str:
        from kvsplice.data import calibration_text, load_texts

        if getattr(self, "text", None) is None:
            self.text = load_texts(self.cfg.calibration_data) if self.cfg.calibration_data else calibration_text()
        return self.text

    def allocation(self, s: dict[str, Any]) -> tuple[Any, dict[str, dict[float, Any]]]:
        """(Allocation, pca-q geometries[t][bits]) of an `allocate` setting (kvsplice/allocation.py). The
        probe runs once per setting family (every budget `bits` shares it) on the first `probe_tokens`
        tokens of this calibration text, always with pca-q; xpred-pca-q rescales its damage by the
        two codecs' coding errors on the same rows (allocation.rescale_damage)."""
        from kvsplice.allocation import DEFAULT_PROBE_TOKENS, fit_allocation, layer_mse, rescale_damage, run_probe

        xpred = s["codec"] == "xpred-pca-q"
        base = {**s, "codec": "pca-q"} if xpred else s  # the model's sensitivity, probed with pca-q
        family = json.dumps({k: v for k, v in base.items() if k not in ("window", "bits")}, sort_keys=True)
        if family not in self.allocations:
            n = int(s.get("probe_tokens", DEFAULT_PROBE_TOKENS))
            text = getattr(self, "probe_text", None) or self._text()  # mix: finer chunks, so the probe sees every domain
            ids = self.tokenizer(text, return_tensors="pt").input_ids[:, :n]
            if ids.shape[1] < n:
                raise KVSpliceError(f"sensitivity probe: expected {n} calibration tokens, found {ids.shape[1]}")
            self.allocations[family] = run_probe(self.model, base, lambda g, t: self.geometry(g, t), ids, self.log)
        probe = self.allocations[family]
        if xpred:
            if "xpred " + family not in self.allocations:
                levels = probe.info["levels"]
                ref = {t: {b: layer_mse(probe.geos[t][b], self.rows(t)) for b in levels} for t in probe.damage}
                new = {t: {b: [c.info["mse"] for _, c in sorted(self.geometry({**s, "bits": b}, t).codecs.items())] for b in levels}
                       for t in probe.damage}
                self.allocations["xpred " + family] = rescale_damage(probe, ref, new)
            probe = self.allocations["xpred " + family]
        alloc = fit_allocation(probe, s["bits"])
        self.info.setdefault("allocations", {})[json.dumps(s, sort_keys=True)] = alloc.as_json()
        return alloc, probe.geos

    def allocated_geometry(self, s: dict[str, Any], target: str, description: str | None = None) -> Any:
        """The Geometry of an `allocate` setting for `target`: each layer's codec at its allocated bits
        (pca-q: taken from the probe's fits; xpred-pca-q: the maps refitted closed loop at those bits)."""
        from kvsplice.allocation import allocated_geometry, allocation_meta

        alloc, geos = self.allocation(s)
        if s["codec"] != "xpred-pca-q":
            return allocated_geometry(alloc, geos, target, description)
        key = json.dumps(["xpred-alloc", target, alloc.bits[target], {k: v for k, v in s.items() if k != "bits"}], sort_keys=True)
        if key not in self.geometries:
            from kvsplice.codecs.xpred import fit_xpred_geometry

            params = {k: v for k, v in s.items() if k not in (*NON_CODEC_KEYS, "bits")}
            geo = fit_xpred_geometry(self.model, self.tokenizer, "", target, params, rows=self.rows(target),
                                     layer_bits=alloc.bits[target], meta=dict(self.geometry({**s, "bits": alloc.bits[target][0]}, target).meta))
            geo.meta["allocation"] = allocation_meta(alloc, target)
            self.geometries[key] = geo
        geo = self.geometries[key]
        if description is not None:
            geo.meta["calibration"] = description
        return geo

    def rows(self, target: str) -> dict[int, Any]:
        """Every layer's `target` rows on the same calibration tokens (cross-layer prediction), captured once."""
        from kvsplice.codecs.xpred import capture_all_layers

        if "all " + target not in self.collected:
            c = self.cfg.calibration
            self.collected["all " + target] = capture_all_layers(self.model, self.tokenizer, self._text(), target,
                                                                 int(c.get("max_batches") or 4) * int(c.get("batch_size", 1)),
                                                                 int(c.get("seq_len", 1024)))
        return self.collected["all " + target]

    def _collect(self, target: str, k_rope: str = "pre") -> Any:
        from kvsplice.calibrate import CalibrationConfig, collect_targets

        if target == "k" and k_rope == "post":  # K after RoPE: its own pass (same windows and seeds)
            if "k_post" not in self.collected:
                ccfg = CalibrationConfig.from_dict({**self.cfg.calibration, "k_rope": "post"})
                t0 = time.perf_counter()
                self.collected["k_post"] = collect_targets(self.model, self.tokenizer, self._text(), ccfg, ("k",), progress=self.progress)["k"]
                self.log(f"collected post-RoPE K in {time.perf_counter() - t0:.1f} s")
            return self.collected["k_post"]
        if target not in self.collected:
            ccfg = CalibrationConfig.from_dict(dict(self.cfg.calibration))
            t0 = time.perf_counter()  # K and V in one pass: whichever comes second is then free
            self.collected.update(collect_targets(self.model, self.tokenizer, self._text(), ccfg, ("k", "v"), progress=self.progress))
            self.info["collect_kv_seconds"] = round(time.perf_counter() - t0, 2)
            self.log(f"collected K+V: {self.collected[target].tokens} tokens in {self.info['collect_kv_seconds']} s")
        return self.collected[target]

    def geometry(self, s: dict[str, Any], target: str) -> Any:
        from kvsplice.calibrate import CalibrationConfig, fit_geometry, split_heads
        from kvsplice.codecs.base import CODECS
        from kvsplice.data import describe_default
        from kvsplice.loading import model_id
        from kvsplice.models import get_adapter

        joint = bool(s.get("joint_heads", False))
        codec_params = {k: v for k, v in s.items() if k not in NON_CODEC_KEYS}
        k_rope = s.get("k_rope", "pre") if target == "k" else "pre"  # V is the same either way
        if getattr(CODECS[s["codec"]], "default_warp", None) == "spline" and "warp" not in codec_params:
            # the seed spline inside a transform coder: train it like the seed's spline-pca rows
            codec_params.setdefault("warp_params", {k: self.cfg.calibration[k] for k in ("epochs", "knots") if k in self.cfg.calibration})
        key = json.dumps([s["codec"], target, joint, s.get("k"), codec_params] + ([k_rope] if k_rope == "post" else []), sort_keys=True)
        if key not in self.geometries and s["codec"] == "xpred-pca-q":  # every layer on the same tokens, fitted in order
            from kvsplice.codecs.xpred import fit_xpred_geometry

            if not joint:
                raise KVSpliceError("xpred-pca-q predicts jointly over a layer's KV heads: set joint_heads = true")
            if k_rope == "post":
                raise KVSpliceError("xpred-pca-q codes K before RoPE: k_rope = \"post\" is not supported")

            t0 = time.perf_counter()
            meta = {"model": model_id(self.model), "calibration": "files" if self.cfg.calibration_data else describe_default("calibration")}
            self.geometries[key] = fit_xpred_geometry(self.model, self.tokenizer, self._text(), target, codec_params,
                                                      rows=self.rows(target), meta=meta)
            self.info.setdefault("fit_seconds", {})[key] = round(time.perf_counter() - t0, 2)
            self.log(f"fitted xpred-pca-q {target.upper()} {codec_params} in {time.perf_counter() - t0:.1f} s")
        if key not in self.geometries:
            col = self._collect(target, k_rope)
            ccfg = CalibrationConfig.from_dict({**self.cfg.calibration, "codec": s["codec"], "rank": int(s.get("k", 1)),
                                                "target": target, "joint_heads": joint, "codec_params": codec_params, "k_rope": k_rope})
            if "k" not in s:
                ccfg.fit_samples_per_dim = None  # quantising codecs: fit on every sampled vector
            meta = {"model": model_id(self.model), **{k: str(v) for k, v in get_adapter(self.model).layout().items()},
                    "calibration": "files" if self.cfg.calibration_data else describe_default("calibration"),
                    "tokens": str(col.tokens)}
            warp_key = json.dumps([s["codec"], target, joint, k_rope, {k: v for k, v in codec_params.items() if k != "bits"}], sort_keys=True)
            t0 = time.perf_counter()
            donor = self.warps.get(warp_key)
            if donor is not None:
                geo = fit_geometry_sharing_warp(split_heads(col, joint), ccfg, meta, donor)
            else:
                geo = fit_geometry(split_heads(col, joint), ccfg, meta)
                if getattr(getattr(next(iter(geo.codecs.values())), "warp", None), "kind", None) in SHAREABLE_WARPS:
                    self.warps[warp_key] = geo
            self.geometries[key] = geo
            self.info.setdefault("fit_seconds", {})[key] = round(time.perf_counter() - t0, 2)
            self.log(f"fitted {s['codec']} {target.upper()} {codec_params or {'k': s.get('k')}} joint={joint} "
                     f"in {time.perf_counter() - t0:.1f} s{' (warp reused)' if donor is not None else ''}")
        return self.geometries[key]


def fit_geometry_sharing_warp(vectors: dict[tuple[int, int], torch.Tensor], ccfg: Any, meta: dict[str, str], donor: Any) -> Any:
    """Like `calibrate.fit_geometry` for a transform coder (codecs/transform.py), but each codec takes
    the already trained warp of `donor`'s codec for the same key instead of training it again: the
    warp does not depend on the bit budget ("spline" is trained for truncation), so the result equals
    a fresh fit with the same seed, minus the training time. Uses the transform coder's quantiser fit
    (`_fit_quantiser`); any other codec falls back to `fit_geometry`."""
    from kvsplice.calibrate import fit_geometry
    from kvsplice.codecs import get_codec
    from kvsplice.geometry import Geometry

    kwargs = ccfg.codec_kwargs()
    codecs = {}
    for key, x in sorted(vectors.items()):
        c, d = get_codec(ccfg.codec, **kwargs), donor.codecs.get(key)
        if d is None or not hasattr(c, "_fit_quantiser") or getattr(getattr(d, "warp", None), "kind", None) not in SHAREABLE_WARPS \
                or d.warp.kind != c.warp.kind:
            return fit_geometry(vectors, ccfg, meta)
        c.code_bits(x.shape[1])
        c.warp = d.warp
        c._fit_quantiser(c.warp.forward(x))
        c.dim = x.shape[1]
        c.info.update(c.warp.info)
        codecs[key] = c
    meta = {**donor.meta, **meta, "codec_params": json.dumps(kwargs, sort_keys=True),
            "calibration_config": json.dumps(ccfg.to_dict(), sort_keys=True)}
    return Geometry(codecs=codecs, meta={k: str(v) for k, v in meta.items()})


def _for_target(s: dict[str, Any], target: str) -> dict[str, Any]:
    """The setting as K or V sees it: `k_bits` (K+V methods) overrides `bits` for K, so the two can
    get different budgets (K codes far better than V at the same bits)."""
    s = dict(s)
    k_bits = s.pop("k_bits", None)
    if target == "k" and k_bits is not None:
        s["bits"] = k_bits
    return s


def codec_factory(model: Any, s: dict[str, Any], cal: Calibration) -> Callable[[], Any]:
    from kvsplice.allocation import per_layer_codecs
    from kvsplice.cache import CompressedCache, layer_windows, model_layout

    layers = model_layout(model)[0]
    target = s.get("target", "v")
    codecs = {}
    for t in ("v", "k"):
        if t not in target:
            codecs[t] = None
        elif s.get("allocate"):  # per-layer bits from the sensitivity probe
            codecs[t] = per_layer_codecs(model, cal.allocated_geometry(s, t), t)
        else:
            codecs[t] = per_layer_codecs(model, cal.geometry(_for_target(s, t), t), t)
    v, k = codecs["v"], codecs["k"]
    window, sink = int(s.get("window", 0)), int(s.get("sink", 0))
    sliding = layer_windows(model)  # Gemma 3: a sliding layer holds <= its window (bytes counted as held)
    # beyond_calibration="warn": the harnesses measure what happens past a post-RoPE K's calibrated positions
    return lambda: CompressedCache(layers, v_codecs=v, k_codecs=k, window=window, sink=sink, sliding_windows=sliding,
                                   beyond_calibration="warn")


def _setting_str(m: MethodSpec, s: dict[str, Any], peer: Any = None) -> str:
    (key, _), = m.sweep.items()
    if peer is not None:
        return peer.setting()
    extra = f" window={s['window']}" if s.get("window") else ""
    extra += f" sink={s['sink']}" if s.get("sink") else ""
    extra += f" K@{s['k_bits']}" if s.get("k_bits") is not None else ""
    extra += f" alloc={s['allocate']}" if s.get("allocate") else ""
    extra += " K-after-RoPE" if s.get("k_rope") == "post" else ""
    if m.kind == "codec":
        joint = " joint" if s.get("joint_heads") else ""
        return f"{key}={s[key]} {s.get('target', 'v').upper()}{joint}{extra}"
    return f"{key}={s[key]}"


def prepare_model(cfg: Any, model: Any = None, tokenizer: Any = None) -> tuple[Any, Any, int]:
    """Threads, model (loaded from cfg.model in cfg.dtype when not given), eval mode, and the K/V
    values cached per token (2 x layers x KV heads x head_dim). Shared by the grid and the suite."""
    from kvsplice.cache import model_layout
    from kvsplice.loading import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if model is None:
        model, tokenizer = load_model(cfg.model, dtype=DTYPES[cfg.dtype])
    model.eval()
    layers, heads, head_dim = model_layout(model)
    return model, tokenizer, 2 * layers * heads * head_dim


def run_frontier(
    cfg: FrontierConfig, model: Any = None, tokenizer: Any = None, log: Callable[[str], None] = print, progress: bool = True,
    on_point: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Measure the baseline and every setting; return the JSON object (module docstring). `on_point`
    gets the result so far ("complete": false) after every finished setting, so a caller can write it
    and a crash or Ctrl-C loses at most the setting in progress."""
    from transformers import DynamicCache

    from kvsplice.cache import CompressedCache, model_layout
    from kvsplice.data import evaluation_text, load_texts, tokenize
    from kvsplice.loading import model_id
    from kvsplice.pruning import VOnlyPruner

    t_start = time.perf_counter()
    model, tokenizer, values_per_token = prepare_model(cfg, model, tokenizer)
    layers = model_layout(model)[0]
    from kvsplice.data import refuse_bos_tokenizer

    refuse_bos_tokenizer(tokenizer, "the frontier grid (kvsplice frontier --config)")
    ids = tokenize(tokenizer, load_texts(cfg.eval_data) if cfg.eval_data else evaluation_text())
    p = cfg.protocol
    tokens_end = p.prefill + p.continue_tokens
    cal = Calibration(cfg, model, tokenizer, log, progress)

    def pc(make: Callable[[], Any], name: str) -> EvalRow:
        return perplexity_prefill_continue(model, ids, make, prefill=p.prefill, continue_tokens=p.continue_tokens, chunk=p.chunk,
                                           segments=p.segments, batch_size=p.batch_size, name=name)

    def tf(make: Callable[[], Any], name: str) -> EvalRow:
        return perplexity_teacher_forced(model, ids, make, window=p.tf_window, max_windows=p.tf_windows, name=name)

    def point(method: str, setting: str, r: EvalRow) -> dict[str, Any]:
        return {"method": method, "setting": setting, "kv_bits_per_value": 8.0 * r.kv_bytes_per_token / values_per_token,
                "kv_bytes_per_token": float(r.kv_bytes_per_token), "ppl": float(r.ppl), "pareto": False}

    def assemble(complete: bool) -> dict[str, Any]:
        _flag(points)
        result: dict[str, Any] = {"model": model_id(model), "baseline_ppl": float(base.ppl), "points": points,
                                  "config": cfg.to_dict(), "complete": complete}
        flags = pareto_flags([(q["kv_bytes_per_token"], q["ppl"]) for q in points])
        result["global_pareto"] = [{"method": q["method"], "setting": q["setting"]} for q, f in zip(points, flags) if f]
        if p.teacher_forced:
            _flag(tf_points)
            result["teacher_forced"] = {"baseline_ppl": float(tf_base.ppl), "points": tf_points}
        result["run"] = {"seconds": round(time.perf_counter() - t_start, 1), "eval_tokens_available": int(ids.shape[0]),
                         "values_per_token": values_per_token, "calibration": cal.info, "details": details}
        return json.loads(json.dumps(result))

    base = pc(DynamicCache, "baseline")
    points = [point("baseline", f"DynamicCache {cfg.dtype}", base)]
    log(f"baseline: ppl {base.ppl:.3f}, {base.kv_bytes_per_token:.0f} B/token, {base.seconds:.1f} s")
    tf_points, tf_base = [], None
    if p.teacher_forced:
        tf_base = tf(DynamicCache, "baseline")
        tf_points.append(point("baseline", f"DynamicCache {cfg.dtype}", tf_base))
    details = []
    for m in cfg.methods:
        for s in m.settings():
            t0 = time.perf_counter()
            peer, exact = None, False
            if m.kind == "codec":
                make = codec_factory(model, s, cal)
                exact = not s.get("window") and s.get("protocol") != "prefill-continue"
            elif m.kind == "prune":
                make = lambda s=s: CompressedCache(layers, pruner=VOnlyPruner(**s))  # noqa: E731
            else:
                peer = make_peer(s, tokens_end)
                make = peer.cache_factory(model)
                exact = peer.teacher_forced_exact
            setting = _setting_str(m, s, peer)
            r = pc(make, f"{m.name} {setting}")
            points.append(point(m.name, setting, r))
            line = f"{m.name} [{setting}]: ppl {r.ppl:.3f}, {points[-1]['kv_bits_per_value']:.2f} bits/value, {r.kv_bytes_per_token:.0f} B/token, {r.seconds:.1f} s"
            if p.teacher_forced and exact:
                t = tf(make, r.name)
                tf_points.append(point(m.name, setting, t))
                line += f" | teacher-forced ppl {t.ppl:.3f}"
            log(line)
            details.append({"method": m.name, "setting": setting, "v_bytes_per_token": r.v_bytes_per_token,
                            "seconds": round(time.perf_counter() - t0, 2)})
            if on_point is not None:
                on_point(assemble(complete=False))
    return assemble(complete=True)


def _flag(points: list[dict[str, Any]]) -> None:
    by_method: dict[str, list[int]] = {}
    for i, q in enumerate(points):
        by_method.setdefault(q["method"], []).append(i)
    for idx in by_method.values():
        for i, f in zip(idx, pareto_flags([(points[i]["kv_bytes_per_token"], points[i]["ppl"]) for i in idx])):
            points[i]["pareto"] = f


def validate_frontier(d: Any) -> None:
    """Raise KVSpliceError unless d follows the frontier JSON layout (module docstring)."""

    def fail(msg: str) -> None:
        raise KVSpliceError(f"frontier JSON: {msg}")

    if not isinstance(d, dict):
        fail(f"expected an object, found {type(d).__name__}")
    for k, t in (("model", str), ("baseline_ppl", float), ("points", list), ("config", dict)):
        if not isinstance(d.get(k), t):
            fail(f"{k!r} must be {t.__name__}, found {type(d.get(k)).__name__}")
    blocks = [d["points"]] + ([d["teacher_forced"]["points"]] if "teacher_forced" in d else [])
    for pts in blocks:
        for i, q in enumerate(pts):
            if not isinstance(q, dict) or set(q) != set(POINT_KEYS):
                fail(f"point {i} must have exactly the keys {list(POINT_KEYS)}, found {sorted(q) if isinstance(q, dict) else q!r}")
            for k in ("method", "setting"):
                if not isinstance(q[k], str):
                    fail(f"point {i} {k!r} must be str")
            for k in ("kv_bits_per_value", "kv_bytes_per_token", "ppl"):
                if not isinstance(q[k], float) and q[k] is not None:
                    fail(f"point {i} {k!r} must be float, found {q[k]!r}")
            if not isinstance(q["pareto"], bool):
                fail(f"point {i} 'pareto' must be bool")


def write_frontier_json(path: Any, result: dict[str, Any]) -> None:
    """Validate, then write atomically (non-finite floats as null)."""
    from pathlib import Path

    from kvsplice.evaluate.report import _atomic_write_bytes, _finite

    validate_frontier(result)
    _atomic_write_bytes(Path(path), (json.dumps(_finite(result), indent=2) + "\n").encode("utf-8"))
