"""The evidence suite runner (`kvsplice frontier --suite quick|full --split dev|test`).

For each text domain of the config (kvsplice/texts.py), on ONE split:
  1. the uncompressed baseline (DynamicCache, model dtype) under both protocols, recording per token
     its NLL and top-k next-token log-probs (tokenmetrics.py);
  2. every setting of every method: teacher-forced when one forward is exact for it (per-token
     codecs without a window, plain per-token ints), else prefill-continue; calibrated methods once
     per calibration draw (suite_config.py). Per point: per-token NLL, Δ% vs the baseline of the
     same protocol with a paired block-bootstrap 95 % CI and its verdict (stats.py), mean KL and
     top-1 agreement, bytes.

Bytes: bits/value (a) "payload" = 8 * measured cache bytes per token / (2 * layers * KV heads *
head_dim) (everything the cache holds); (b) "amortised_NxT" = (a) + 8 * geometry bytes / (values per
token * N * T): the calibrated geometry (rotations, tables; K + V, as stored) charged to a deployment
of N sequences of T tokens. "ratio_vs_16bit" = bits / 16 for each.

JSON (atomic rewrite after every point, so a crash loses at most the point in progress):
    {"kind": "kvsplice-suite", "suite", "split", "status": "running" | "complete", "model", "commit",
     "config", "domains": {name: {"provenance", "part", "tokens_available", "baseline": {protocol: {...}}}},
     "calibration": {"domain", "provenance", "draws": [{"draw", "seed", "rotate", "tokens"}]},
     "points": [...], "summary": [...], "comparisons": [...], "run": {"seconds", ...},
     "longctx": {...} (with a [longctx] table: evaluate/longctx_run.py's result, rewritten after every cell)}
Per-token values go to a sidecar `<json>.tokens.safetensors` (point i: "i.nll" float32, "i.kl"
float16, "i.top1" uint8), rewritten atomically with the JSON.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

from kvsplice.errors import KVSpliceError
from kvsplice.evaluate.frontier import Calibration, codec_factory, _for_target, _setting_str, prepare_model
from kvsplice.evaluate.frontier_config import MethodSpec, make_peer
from kvsplice.evaluate.perplexity import perplexity_prefill_continue, perplexity_teacher_forced
from kvsplice.evaluate.stats import paired_block_bootstrap, spread
from kvsplice.evaluate.suite_config import SPLITS, SuiteConfig
from kvsplice.evaluate.tokenmetrics import TokenScorer

TF, PC = "teacher-forced", "prefill-continue"
SEED_CODECS = ("pca", "spline-pca")  # the seed's rank-truncation codecs


class SuiteError(KVSpliceError):
    """The suite cannot run as configured (e.g. a domain's split holds too few tokens)."""


def family(m: MethodSpec) -> str:
    """"ours" (kvsplice's quantising coders), "seed" (the seed's pca / spline-pca / V-only pruning) or "peer"."""
    if m.kind == "peer":
        return "peer"
    if m.kind == "prune" or m.params.get("codec") in SEED_CODECS:
        return "seed"
    return "ours"


def git_commit(root: Path | None = None) -> dict[str, Any]:
    """HEAD of the repository holding this file, and whether kvsplice/ or configs/ differ from it."""
    root = root or Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "kvsplice", "configs"],
                               capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head or None, "dirty": bool(dirty)}


def platform_info() -> dict[str, Any]:
    """What decides the floating-point bits of a run besides the code: the CPU (MKL picks its kernels by
    instruction set, and a calibrated codec's discrete choices amplify last-bit differences), torch, the
    BLAS, the thread count and MKL_CBWR. Two runs of one commit compare bit for bit only where these match."""
    cpu, isa = None, None
    try:
        info = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        cpu = next((ln.split(":", 1)[1].strip() for ln in info.splitlines() if ln.startswith("model name")), None)
        flags = set(next((ln.split(":", 1)[1].split() for ln in info.splitlines() if ln.startswith("flags")), []))
        isa = next((f for f in ("avx512f", "avx2", "avx", "sse4_2") if f in flags), None)
    except OSError:  # not Linux: the fields stay None rather than guessed
        pass
    return {"cpu": cpu, "isa": isa, "torch": torch.__version__, "blas_mkl": bool(torch.backends.mkl.is_available()),
            "threads": torch.get_num_threads(), "mkl_cbwr": os.environ.get("MKL_CBWR")}


DTYPE_BITS = {"float32": 32, "bfloat16": 16, "float16": 16}


class DrawCalibration(Calibration):
    """`Calibration` on the calibration part of one domain (or "mix": the project's default text, every
    MIX_DOMAINS part interleaved): seed = draw, documents rotated per draw (mix: each part by the same
    fraction draw / draws of its documents)."""

    def __init__(self, cfg: SuiteConfig, draw: int, model: Any, tokenizer: Any, log: Callable[[str], None]) -> None:
        from kvsplice.texts import MIX_DOMAINS, PROBE_MIX_CHARS, mix_text, part_documents, part_text

        if cfg.calibration_domain == "mix":
            self.rotate = draw / cfg.draws  # a fraction of each part's documents
            self.text = mix_text(MIX_DOMAINS, rotate=self.rotate)[0]
            self.probe_text = mix_text(MIX_DOMAINS, PROBE_MIX_CHARS, rotate=self.rotate)[0]
        else:
            n_docs = len(part_documents(cfg.calibration_domain, "calibration"))
            self.rotate = draw * n_docs // cfg.draws
            self.text = part_text(cfg.calibration_domain, "calibration", rotate=self.rotate)
        ns = SimpleNamespace(calibration={**cfg.calibration, "seed": draw}, calibration_data=[f"{cfg.calibration_domain}:calibration"])
        super().__init__(ns, model, tokenizer, log, progress=False)
        self.draw = draw  # collection: Calibration._collect on self.text (K and V in one pass)


def _calibration_sources(domain: str) -> dict[str, Any]:
    """Provenance and part info of the calibration text (mix: of each part, in mixing order)."""
    from kvsplice.texts import MIX_CHUNK_CHARS, MIX_DOMAINS, part_info, provenance

    if domain != "mix":
        return {"provenance": provenance(domain), "part_info": part_info(domain, "calibration")}
    return {"provenance": [provenance(d) for d in MIX_DOMAINS], "part_info": [part_info(d, "calibration") for d in MIX_DOMAINS],
            "mix": f"kvsplice.texts.mix_text: the parts interleaved in {MIX_CHUNK_CHARS}-character chunks"}


def geometry_bytes(s: dict[str, Any], cal: Calibration) -> int:
    """Bytes of the calibrated geometry (K + V, as stored) a codec setting `s` uses: amortised, not per token."""
    total = 0
    for t in ("v", "k"):
        if t in s.get("target", "v"):  # allocate: each layer holds the geometry of its own bit width
            geo = cal.allocated_geometry(s, t) if s.get("allocate") else cal.geometry(_for_target(s, t), t)
            total += sum(int(x.nbytes) for c in geo.codecs.values() for x in c.state_tensors().values())
    return total


def held_bits(row: Any, dtype: str) -> float:
    """Payload bits per value HELD: the model dtype's bits x bytes held / bytes an uncompressed cache
    holding the same rows holds. Equals 8 x bytes per token / values per token when every layer is
    full attention; on a hybrid model (Gemma 3) it is the compression rate, not the sliding layers'
    own saving (the uncompressed baseline drops those rows too; bytes per token are kept as measured)."""
    return DTYPE_BITS[dtype] * (1.0 - row.kv_reduction_pct / 100.0)


def honest_bits(payload_bits: float, geometry_bytes: int, values_per_token: int, cfg: SuiteConfig) -> dict[str, Any]:
    """bits/value (a) payload and (b) amortised over each deployment, with their ratios to 16 bits."""
    bits = {"payload": payload_bits}
    for n in cfg.deployment_sequences:
        bits[f"amortised_{n}x{cfg.deployment_tokens}"] = payload_bits + 8.0 * geometry_bytes / (values_per_token * n * cfg.deployment_tokens)
    return {"bits_per_value": bits, "ratio_vs_16bit": {k: v / 16.0 for k, v in bits.items()}, "geometry_bytes": geometry_bytes}


def _write(path: Path, result: dict[str, Any], tokens: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save

    from kvsplice.evaluate.report import _atomic_write_bytes, _finite

    _atomic_write_bytes(path, (json.dumps(_finite(result), indent=1) + "\n").encode("utf-8"))
    if tokens:
        _atomic_write_bytes(path.with_suffix(".tokens.safetensors"), save({k: v.contiguous() for k, v in tokens.items()}))


def summarise(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (domain, method, setting): Δ%, KL, top-1 as mean / sd / min / max over draws
    (one value for uncalibrated methods), and the envelope of the draws' CIs."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for q in points:
        if q["method"] != "baseline":
            groups.setdefault((q["domain"], q["method"], q["setting"]), []).append(q)
    out = []
    for (domain, method, setting), qs in groups.items():
        row = {"domain": domain, "method": method, "setting": setting, "family": qs[0]["family"], "protocol": qs[0]["protocol"],
               "draws": len(qs), "bits_per_value": {k: sum(q["bits_per_value"][k] for q in qs) / len(qs) for k in qs[0]["bits_per_value"]},
               "delta_pct": spread([q["delta_pct"] for q in qs]),
               "ci95_envelope": [min(q["ci95"][0] for q in qs), max(q["ci95"][1] for q in qs)],
               "verdicts": sorted({q["verdict"] for q in qs})}
        for k in ("kl", "top1"):
            vals = [q[k] for q in qs if q[k] is not None]
            row[k] = spread(vals) if vals else None
        out.append(row)
    return out


def run_suite(cfg: SuiteConfig, split: str, json_path: str | Path, model: Any = None, tokenizer: Any = None,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run the suite on `split` ("dev" | "test"), rewriting `json_path` after every point; returns the result.
    cfg.matmul "fp32-accumulate": a bf16 model's linears as float32 GEMMs for the whole run (evaluate/bf16.py)."""
    from kvsplice.evaluate.bf16 import maybe_float32_accumulate

    model, tokenizer, _ = prepare_model(cfg, model, tokenizer)
    with maybe_float32_accumulate(model, cfg.matmul):
        return _run_suite(cfg, split, json_path, model, tokenizer, log)


def _run_suite(cfg: SuiteConfig, split: str, json_path: str | Path, model: Any, tokenizer: Any,
               log: Callable[[str], None]) -> dict[str, Any]:
    from transformers import DynamicCache

    from kvsplice.cache import CompressedCache, model_layout
    from kvsplice.data import bos_id, tokenize, with_bos
    from kvsplice.loading import model_id
    from kvsplice.pruning import VOnlyPruner
    from kvsplice.texts import part_info, part_text, provenance

    if split not in SPLITS:
        raise SuiteError(f"split must be one of {SPLITS}, got {split!r}")
    t_start = time.perf_counter()
    json_path = Path(json_path)
    model, tokenizer, vpt = prepare_model(cfg, model, tokenizer)
    layers = model_layout(model)[0]
    seg_len = cfg.prefill + cfg.continue_tokens + 1
    result: dict[str, Any] = {
        "kind": "kvsplice-suite", "suite": cfg.name, "split": split, "status": "running", "model": model_id(model),
        **git_commit(), "config": cfg.to_dict(), "domains": {},
        "calibration": {"domain": cfg.calibration_domain, "part": "calibration", **_calibration_sources(cfg.calibration_domain), "draws": []},
        "protocols": {TF: {"window": cfg.tf_window, "windows": cfg.tf_windows},
                      PC: {"prefill": cfg.prefill, "continue_tokens": cfg.continue_tokens, "chunk": cfg.chunk,
                           "segments": cfg.segments, "batch_size": cfg.batch_size}},
        "points": [], "summary": [], "comparisons": [], "run": {"values_per_token": vpt, "platform": platform_info()}}
    tokens: dict[str, torch.Tensor] = {}
    cals: dict[int, DrawCalibration] = {}
    if cfg.longctx is not None:  # refuse now, not after hours of frontier points
        check_longctx(cfg, split, model, tokenizer)

    def calibration(draw: int) -> DrawCalibration:
        if draw not in cals:
            cals[draw] = DrawCalibration(cfg, draw, model, tokenizer, log)
            rot = "rotate_fraction" if cfg.calibration_domain == "mix" else "rotate_documents"  # mix: each part by this fraction
            result["calibration"]["draws"].append({"draw": draw, "seed": draw, rot: cals[draw].rotate})
        return cals[draw]

    def save_point(q: dict[str, Any], scorer: TokenScorer) -> None:
        i = len(result["points"])
        q["index"] = i
        result["points"].append(q)
        tokens[f"{i}.nll"] = scorer.nll.float()
        if scorer.kl.numel():
            tokens[f"{i}.kl"] = scorer.kl.half()
            tokens[f"{i}.top1"] = scorer.top1.to(torch.uint8)
        result["run"]["seconds"] = round(time.perf_counter() - t_start, 1)
        result["summary"] = summarise(result["points"])  # a partial file is readable (and plottable) too
        _write(json_path, result, tokens)

    for domain in cfg.domains:
        ids = tokenize(tokenizer, part_text(domain, split))
        need = max(cfg.tf_windows * cfg.tf_window, cfg.segments * seg_len)
        if ids.shape[0] < need:
            raise SuiteError(f"domain {domain!r} {split} part has {ids.shape[0]} tokens; the protocols need {need} "
                             f"({cfg.tf_windows} x {cfg.tf_window} teacher-forced, {cfg.segments} x {seg_len} prefill-continue)")
        info = {k: v for k, v in part_info(domain, split).items()}
        result["domains"][domain] = {"provenance": provenance(domain), "part": info, "tokens_available": int(ids.shape[0]), "baseline": {}}

        def measure(protocol: str, make: Callable[[], Any], scorer: TokenScorer, name: str) -> Any:
            bos = bos_id(tokenizer)  # Gemma: <bos> first in every window / segment (context only); SmolLM2: none
            if protocol == TF:
                return perplexity_teacher_forced(model, with_bos(ids, cfg.tf_window, bos), make, window=cfg.tf_window, max_windows=cfg.tf_windows, name=name, scorer=scorer)
            return perplexity_prefill_continue(model, with_bos(ids, seg_len, bos), make, prefill=cfg.prefill, continue_tokens=cfg.continue_tokens, chunk=cfg.chunk,
                                               segments=cfg.segments, batch_size=cfg.batch_size, name=name, scorer=scorer)

        refs: dict[str, TokenScorer] = {}
        for protocol in (TF, PC):
            sc = TokenScorer(record_topk=cfg.topk)
            r = measure(protocol, DynamicCache, sc, "baseline")
            refs[protocol] = sc
            q = {"domain": domain, "method": "baseline", "family": "baseline", "setting": f"DynamicCache {cfg.dtype}" + (" (fp32-accumulate)" if cfg.matmul != "native" else ""),
                 "protocol": protocol, "draw": None, "tokens": int(r.tokens), "ppl": float(r.ppl), "baseline_ppl": float(r.ppl),
                 "delta_pct": 0.0, "ci95": [0.0, 0.0], "verdict": "tie", "kl": 0.0, "top1": 1.0, "ref_mass": None,
                 "kv_bytes_per_token": float(r.kv_bytes_per_token), **honest_bits(held_bits(r, cfg.dtype), 0, vpt, cfg),
                 "seconds": round(r.seconds, 2)}
            result["domains"][domain]["baseline"][protocol] = {"ppl": float(r.ppl), "tokens": int(r.tokens)}
            save_point(q, sc)
            log(f"[{domain}] baseline {protocol}: ppl {r.ppl:.3f} over {r.tokens} tokens ({r.seconds:.0f} s)")

        for m in cfg.methods:
            for s in m.settings():
                draws = range(cfg.draws) if m.kind == "codec" else [None]
                for draw in draws:
                    peer, geo_bytes = None, 0
                    if m.kind == "codec":
                        cal = calibration(draw)
                        make = codec_factory(model, s, cal)
                        exact = not s.get("window") and s.get("protocol") != PC  # PC forced: equal-terms comparisons
                        geo_bytes = geometry_bytes(s, cal)
                    elif m.kind == "prune":
                        make, exact = (lambda s=s: CompressedCache(layers, pruner=VOnlyPruner(**s))), False
                    else:
                        peer = make_peer(s, cfg.prefill + cfg.continue_tokens)
                        make, exact = peer.cache_factory(model), peer.teacher_forced_exact
                    protocol = TF if exact else PC
                    setting = _setting_str(m, s, peer)
                    sc = TokenScorer(reference=refs[protocol].recorded)
                    r = measure(protocol, make, sc, f"{m.name} {setting}")
                    sc.finish()
                    st = paired_block_bootstrap(refs[protocol].nll, sc.nll, block=cfg.block, n=cfg.resamples, seed=len(result["points"]))
                    summ = sc.summary()
                    q = {"domain": domain, "method": m.name, "family": family(m), "setting": setting, "protocol": protocol, "draw": draw,
                         "tokens": int(r.tokens), "ppl": float(r.ppl), "baseline_ppl": result["domains"][domain]["baseline"][protocol]["ppl"],
                         "delta_pct": st.delta_pct, "ci95": [st.ci_low, st.ci_high], "verdict": st.verdict, **summ,
                         "kv_bytes_per_token": float(r.kv_bytes_per_token), **honest_bits(held_bits(r, cfg.dtype), geo_bytes, vpt, cfg),
                         "seconds": round(r.seconds, 2)}
                    save_point(q, sc)
                    log(f"[{domain}] {m.name} [{setting}]{'' if draw is None else f' draw {draw}'} ({protocol}): Δ {st.delta_pct:+.2f} % "
                        f"[{st.ci_low:+.2f}, {st.ci_high:+.2f}] {st.verdict}, KL {summ['kl']:.4f}, top-1 {summ['top1']:.3f}, "
                        f"{q['bits_per_value']['payload']:.2f} bits/value ({r.seconds:.0f} s)")
    result["summary"] = summarise(result["points"])
    result["comparisons"] = compare_within_protocol(result["points"], tokens, cfg)
    if cfg.longctx is not None:
        def save_longctx(lc: dict[str, Any]) -> None:
            result["longctx"] = lc
            result["run"]["seconds"] = round(time.perf_counter() - t_start, 1)
            _write(json_path, result, tokens)

        try:
            run_longctx_part(cfg, split, model, tokenizer, calibration(0), save_longctx, log)
        except BaseException:  # the grid's points are all on disk: say so in the file, not only in the traceback
            result["status"] = "grid complete, longctx failed"
            _write(json_path, result, tokens)
            raise
    result["status"] = "complete"
    result["run"].update(seconds=round(time.perf_counter() - t_start, 1),
                         calibration={str(d): c.info for d, c in cals.items()})
    _write(json_path, result, tokens)
    return result


def check_longctx(cfg: SuiteConfig, split: str, model: Any, tokenizer: Any) -> None:
    """SuiteError unless the [longctx] part can run: its lengths within the model's positions, its
    domain's `split` part long enough for the longest trial and the perplexity window."""
    from kvsplice.data import tokenize
    from kvsplice.texts import part_text

    lc = cfg.longctx
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and lc.tokens_needed() > max_pos:
        raise SuiteError(f"[longctx] lengths {lc.lengths} / ppl {lc.ppl_prefill}+{lc.ppl_tokens} exceed the model's {max_pos} positions")
    stream = tokenize(tokenizer, part_text(lc.domain, split))
    if stream.shape[0] < lc.tokens_needed():
        raise SuiteError(f"[longctx] domain {lc.domain!r} {split} part has {stream.shape[0]} tokens; lengths {lc.lengths} / ppl "
                         f"{lc.ppl_prefill}+{lc.ppl_tokens} need up to {lc.tokens_needed()}")
    from kvsplice.evaluate.longctx import make_trial

    spec = lc.task_spec()
    for task in spec.tasks:  # what only the tokenizer can refuse (no chat template, overlapping needles, no filler): now
        for n in spec.lengths:
            try:
                make_trial(tokenizer, stream, spec, task, n, 0)
            except KVSpliceError as e:
                raise SuiteError(f"[longctx] {e}") from e


def run_longctx_part(cfg: SuiteConfig, split: str, model: Any, tokenizer: Any, cal: Calibration,
                     save: Callable[[dict[str, Any]], None], log: Callable[[str], None]) -> dict[str, Any]:
    """The [longctx] part (suite_config.LongctxConfig): retrieval and perplexity after a long prefill on
    the longctx domain's `split` part, codecs from `cal` (the suite's draw 0); `save` after every cell."""
    from kvsplice.evaluate.longctx_run import run_longctx
    from kvsplice.texts import part_info, part_text, provenance

    lc = cfg.longctx
    text = part_text(lc.domain, split)
    info = {"domain": lc.domain, "split": split, "provenance": provenance(lc.domain), "part": part_info(lc.domain, split)}
    log(f"[longctx] {lc.tasks} at {lc.lengths} tokens, {lc.trials} trials; methods {lc.methods}; text {lc.domain} {split}")
    return run_longctx(model, tokenizer, lc.task_spec(), lc.methods, keep=lc.keep, ppl_prefill=lc.ppl_prefill,
                       ppl_tokens=lc.ppl_tokens, log=lambda m: log(f"[longctx] {m}"), text=(text, info), cal=cal, on_save=save)


def compare_within_protocol(points: list[dict[str, Any]], tokens: dict[str, torch.Tensor], cfg: SuiteConfig) -> list[dict[str, Any]]:
    """"Does ours beat that peer?" for every (ours, peer) pair measured on the same tokens (same domain
    and protocol; draw 0 of calibrated methods): paired Δ% of ours vs the peer, CI and verdict for ours.
    Pairs across protocols score different tokens and are not compared."""
    ours = [q for q in points if q["family"] == "ours" and q["draw"] in (None, 0)]
    peers = [q for q in points if q["family"] == "peer"]
    out = []
    for a in peers:
        for b in ours:
            if (a["domain"], a["protocol"]) != (b["domain"], b["protocol"]):
                continue
            st = paired_block_bootstrap(tokens[f"{a['index']}.nll"], tokens[f"{b['index']}.nll"], block=cfg.block, n=cfg.resamples, seed=0)
            out.append({"domain": a["domain"], "protocol": a["protocol"], "ours": [b["method"], b["setting"]], "peer": [a["method"], a["setting"]],
                        "ours_bits": b["bits_per_value"]["payload"], "peer_bits": a["bits_per_value"]["payload"],
                        "delta_pct_ours_vs_peer": st.delta_pct, "ci95": [st.ci_low, st.ci_high], "verdict_for_ours": st.verdict})
    return out


def format_summary(result: dict[str, Any]) -> str:
    """Fixed-width table of the summary: domain, method, setting, bits (a) / (b), Δ% [CI], KL, top-1."""
    amort = [k for k in result["summary"][0]["bits_per_value"] if k != "payload"] if result["summary"] else []
    rows = [("domain", "method", "setting", "proto", "bits(a)", *[f"bits({k.split('_')[1]})" for k in amort], "Δ% mean", "95% CI (envelope)",
             "draws", "KL", "top-1")]
    for r in result["summary"]:
        d = r["delta_pct"]
        spread_txt = f" ({d['min']:+.2f}..{d['max']:+.2f})" if r["draws"] > 1 else ""
        rows.append((r["domain"], r["method"], r["setting"], "TF" if r["protocol"] == TF else "PC",
                     f"{r['bits_per_value']['payload']:.2f}", *[f"{r['bits_per_value'][k]:.2f}" for k in amort],
                     f"{d['mean']:+.2f}{spread_txt}", f"[{r['ci95_envelope'][0]:+.2f}, {r['ci95_envelope'][1]:+.2f}]", str(r["draws"]),
                     f"{r['kl']['mean']:.4f}" if r["kl"] else "-", f"{r['top1']['mean']:.3f}" if r["top1"] else "-"))
    w = [max(len(x[i]) for x in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w[i]) for i, c in enumerate(x)) for x in rows)


def check_complete(result: dict[str, Any]) -> None:
    """Refuse a partial result where a complete one is required (e.g. before plotting a README figure)."""
    if result.get("status") != "complete":
        raise SuiteError(f"the suite result is {result.get('status')!r}, expected 'complete'")
    if not any(math.isfinite(q["ppl"]) for q in result["points"]):
        raise SuiteError("the suite result has no finite point")
