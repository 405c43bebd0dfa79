"""Runner of the long-context suite (tasks: kvsplice/evaluate/longctx.py): methods by name, the
baseline gate, incremental JSON, perplexity after a long prefill.

Protocol: lengths in increasing order; at each length the uncompressed baseline runs every task
first, and a (task, length) cell is KEPT when its accuracy >= `keep` (default 0.8); every other
method then runs the kept cells of that length. After each cell the whole JSON is rewritten
atomically (an interrupted run keeps what it measured; `resume` skips the cells already in the file
when its spec matches). Optionally the prompt format is chosen first on DEV trials (another seed)
of the baseline, and perplexity is measured after a `ppl_prefill`-token prefill of the evaluation
text (`ppl_tokens` scored, fed 16 at a time; `perplexity_prefill_continue`, one segment).

Methods (METHODS): "baseline" (transformers DynamicCache); our pca-q K+V (joint heads, sink 1) at 4
and 2 bits ("fast-4": K coded after RoPE, the fast decode path), calibrated by kvsplice/evaluate/frontier.py's machinery (same calibration config as the
frontier unless `calibration` overrides it); the peers by registry name with their class defaults
(KIVI, uniform ints); the eviction peers at matching bytes: budget = bits / (8 * bytes per element
of the model dtype) of the sequence's tokens (H2O: heavy / recent half each; StreamingLLM: 4 sinks).

JSON: {"model", "spec", "dev", "methods": {name: setting}, "cells": [...], "kept": [...],
"ppl": {...}, "geometry_bytes": {codec method: bytes}, "run": {...}} (see `run_longctx`). Bits per value
are the payload (what the cache holds, per value held); the codecs' geometry is in "geometry_bytes".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable

import torch

from kvsplice.evaluate.longctx import FORMATS, LongCtxError, TaskSpec, answer, make_trials, prefill, score, wilson

METHODS: dict[str, dict[str, Any]] = {
    "baseline": {"kind": "baseline"},
    "pca-q-4": {"kind": "codec", "codec": "pca-q", "target": "kv", "joint_heads": True, "sink": 1, "bits": 4.0},
    "pca-q-2": {"kind": "codec", "codec": "pca-q", "target": "kv", "joint_heads": True, "sink": 1, "bits": 2.0},
    "fast-4": {"kind": "codec", "codec": "pca-q", "target": "kv", "joint_heads": True, "sink": 1, "bits": 4.0, "k_rope": "post"},
    "xpred-4": {"kind": "codec", "codec": "xpred-pca-q", "target": "kv", "joint_heads": True, "sink": 1, "bits": 4.0},
    "xpred-2": {"kind": "codec", "codec": "xpred-pca-q", "target": "kv", "joint_heads": True, "sink": 1, "bits": 2.0},
    "kivi-4": {"kind": "peer", "peer": "kivi", "bits": 4},
    "kivi-2": {"kind": "peer", "peer": "kivi", "bits": 2},
    "int-4": {"kind": "peer", "peer": "uniform-int", "bits": 4},
    "int-2": {"kind": "peer", "peer": "uniform-int", "bits": 2},
    "h2o-4": {"kind": "evict", "peer": "h2o", "bits": 4},
    "h2o-2": {"kind": "evict", "peer": "h2o", "bits": 2},
    "streamingllm-4": {"kind": "evict", "peer": "streamingllm", "sinks": 4, "bits": 4},
    "streamingllm-2": {"kind": "evict", "peer": "streamingllm", "sinks": 4, "bits": 2},
}


class Methods:
    """Builds `() -> cache` factories by method name; calibrates each codec geometry once."""

    def __init__(self, model: Any, tokenizer: Any, calibration: dict[str, Any] | None, log: Callable[[str], None],
                 cal: Any = None) -> None:
        """cal: a ready `frontier.Calibration` (the evidence suite's draw) instead of one built from `calibration`."""
        from kvsplice.evaluate.frontier import FrontierConfig, Calibration

        self.geometry_bytes: dict[str, int] = {}  # codec method -> its geometry's bytes (K + V)
        if cal is not None:
            self.model, self.cal, self.calibration = model, cal, cal.cfg.calibration
            return
        cfg = FrontierConfig(calibration=calibration) if calibration else FrontierConfig()
        self.model, self.cal = model, Calibration(cfg, model, tokenizer, log, progress=False)
        self.calibration = cfg.calibration

    def factory(self, name: str, tokens: int) -> tuple[Callable[[], Any], str]:
        """(make_cache, setting string) for method `name` on sequences of `tokens` tokens."""
        from transformers import DynamicCache

        from kvsplice.evaluate.frontier import codec_factory
        from kvsplice.evaluate.frontier_config import make_peer
        from kvsplice.peers import get_peer

        if name not in METHODS:
            raise LongCtxError(f"unknown method {name!r}; expected some of {sorted(METHODS)}")
        m = dict(METHODS[name])
        kind = m.pop("kind")
        if kind == "baseline":
            return DynamicCache, f"DynamicCache {str(self.model.dtype).removeprefix('torch.')}"
        if kind == "codec":
            from kvsplice.evaluate.suite import geometry_bytes

            make = codec_factory(self.model, m, self.cal)
            self.geometry_bytes[name] = geometry_bytes(m, self.cal)  # amortised over a deployment, not in bits/value
            return make, f"{m['codec']} bits={m['bits']} K+V joint sink={m['sink']}" + (" K after RoPE" if m.get("k_rope") == "post" else "")
        if kind == "peer":
            peer = get_peer(m.pop("peer"), **m)
            return peer.cache_factory(self.model), peer.setting()
        elem = torch.finfo(self.model.dtype).bits  # eviction keeps rows in the model dtype
        bits = m.pop("bits")
        peer = make_peer({**m, "budget": bits / elem}, tokens)
        return peer.cache_factory(self.model), f"{peer.setting()} (budget {bits}/{elem} of {tokens} tokens)"


def _needs_attention(cache: Any) -> bool:
    return getattr(cache, "pruner", None) is not None


def run_cell(model: Any, tokenizer: Any, trials: list, make: Callable[[], Any], spec: TaskSpec) -> dict[str, Any]:
    """Prefill each trial's context once through a fresh cache, answer its queries (each on a copy of
    the cache when there are several) -> accuracy, Wilson 95 % interval, bits/value, outputs."""
    from kvsplice.attention import prepare_model
    from kvsplice.evaluate.perplexity import measure_cache

    t0 = time.perf_counter()
    outputs, bits = [], []
    cache = make()
    switch = prepare_model(model) if _needs_attention(cache) else None
    try:
        for i, tr in enumerate(trials):
            cache = cache if i == 0 else make()
            prefill(model, tr.context, cache, spec.chunk)
            for j, q in enumerate(tr.queries):
                c = cache if j == len(tr.queries) - 1 else copy.deepcopy(cache)
                out = answer(model, tokenizer, q.ids, c, spec.max_new)
                m = measure_cache(c)
                # per value HELD: the dtype's bits x bytes / what an uncompressed cache holds for the same rows
                # (= 8 x bytes / (tokens x values per token) without sliding layers; on Gemma 3 the sliding
                # layers' own saving is not counted as the method's)
                bits.append(torch.finfo(model.dtype).bits * m.total_bytes / max(m.uncompressed_bytes, 1))
                outputs.append({"trial": tr.index, "depth": q.depth, "needle_pos": q.needle_pos, "answer": q.answer,
                                "output": out, "correct": score(out, q.answer)})
    finally:
        if switch is not None:
            switch.restore()
    k, n = sum(o["correct"] for o in outputs), len(outputs)
    by_depth: dict[str, list[int]] = {}
    for o in outputs:
        kn = by_depth.setdefault(f"{o['depth']:g}", [0, 0])
        kn[0] += int(o["correct"])
        kn[1] += 1
    lo, hi = wilson(k, n)
    return {"contexts": len(trials), "answers": n, "correct": k, "accuracy": k / n if n else float("nan"),
            "ci95": [lo, hi], "kv_bits_per_value": sum(bits) / len(bits), "by_depth": by_depth,
            "seconds": round(time.perf_counter() - t0, 1), "outputs": outputs}


def ppl_after_prefill(model: Any, stream: torch.Tensor, make: Callable[[], Any], prefill_tokens: int, scored: int,
                      name: str, seed: int = 0) -> dict[str, Any]:
    """Perplexity of `scored` tokens after a `prefill_tokens` prefill of the stream's start, and a
    95 % block-bootstrap interval (blocks of 16 contiguous tokens, 2000 resamples, seeded)."""
    from kvsplice.evaluate.perplexity import perplexity_prefill_continue

    r = perplexity_prefill_continue(model, stream[: prefill_tokens + scored + 1], make, prefill=prefill_tokens,
                                    continue_tokens=scored, chunk=16, segments=1, name=name)
    nll = r.token_nll.reshape(-1).double()
    block = 16
    nb = max(nll.numel() // block, 1)
    blocks = nll[: nb * block].view(nb, -1).mean(dim=1)
    g = torch.Generator().manual_seed(seed)
    means = blocks[torch.randint(0, nb, (2000, nb), generator=g)].mean(dim=1)
    lo, hi = torch.quantile(means, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return {"ppl": r.ppl, "ci95": [math.exp(lo), math.exp(hi)], "nll": r.nll, "tokens": r.tokens,
            "kv_bits_per_value": torch.finfo(next(model.parameters()).dtype).bits * (1.0 - r.kv_reduction_pct / 100.0),
            "seconds": round(r.seconds, 1),
            "token_nll": [round(float(x), 4) for x in nll]}


def add_ppl_deltas(result: dict[str, Any], block: int = 16, resamples: int = 2000, seed: int = 0) -> None:
    """Give every perplexity point "delta_pct" = 100 (ppl / baseline ppl - 1) and a PAIRED 95 % block
    bootstrap interval of it (the same resampled blocks of contiguous scored tokens for both, so the
    text's difficulty cancels); in place. No-op without a baseline point."""
    pts = (result.get("ppl") or {}).get("points") or []
    base = next((p for p in pts if p["method"] == "baseline"), None)
    if base is None:
        return
    b = torch.tensor(base["token_nll"], dtype=torch.float64)
    nb = max(b.numel() // block, 1)
    idx = torch.randint(0, nb, (resamples, nb), generator=torch.Generator().manual_seed(seed))
    for p in pts:
        x = torch.tensor(p["token_nll"], dtype=torch.float64)
        if x.numel() != b.numel():
            raise LongCtxError(f"ppl point {p['method']} scored {x.numel()} tokens, the baseline {b.numel()}")
        d = (x - b)[: nb * block].view(nb, -1).mean(dim=1)  # per-block mean NLL difference
        lo, hi = torch.quantile(d[idx].mean(dim=1), torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
        p["delta_pct"] = 100.0 * (math.exp(float((x - b).mean())) - 1.0)
        p["delta_ci95"] = [100.0 * (math.exp(lo) - 1.0), 100.0 * (math.exp(hi) - 1.0)]


def write_result(path: str | Path, result: dict[str, Any]) -> None:
    """Atomic JSON rewrite (non-finite floats as null)."""
    from kvsplice.evaluate.report import _atomic_write_bytes, _finite

    _atomic_write_bytes(Path(path), (json.dumps(_finite(result), indent=1) + "\n").encode("utf-8"))


def choose_prompt(model: Any, tokenizer: Any, stream: torch.Tensor, spec: TaskSpec, trials: int, lengths: list[int],
                  log: Callable[[str], None]) -> dict[str, Any]:
    """Baseline accuracy of each prompt format on DEV trials (seed + 1,000,000: disjoint from the test
    trials) at `lengths`; the format with the most correct answers wins (ties: plain)."""
    from transformers import DynamicCache

    results: dict[str, dict[str, list[int]]] = {}
    for fmt in FORMATS:
        if fmt == "chat" and not getattr(tokenizer, "chat_template", None):
            continue
        dev = dataclasses.replace(spec, prompt=fmt, seed=spec.seed + 1_000_000, trials=trials)
        for task in spec.tasks:
            for n in lengths:
                c = run_cell(model, tokenizer, make_trials(tokenizer, stream, dev, task, n), DynamicCache, dev)
                results.setdefault(fmt, {})[f"{task}@{n}"] = [c["correct"], c["answers"]]
                log(f"dev {fmt} {task}@{n}: {c['correct']}/{c['answers']} ({c['seconds']} s)")
    total = {f: sum(k for k, _ in r.values()) for f, r in results.items()}
    chosen = max(results, key=lambda f: (total[f], f == "plain"))
    return {"seed": spec.seed + 1_000_000, "trials": trials, "lengths": lengths, "results": results, "chosen": chosen}


def tokens_needed(lengths: list[int], ppl_prefill: int, ppl_tokens: int) -> int:
    """Positions (and filler tokens: an upper bound) the longest trial or the perplexity window needs;
    no prefill: no window."""
    return max(list(lengths) + [ppl_prefill + ppl_tokens + 1 if ppl_prefill else 0])


def run_longctx(model: Any, tokenizer: Any, spec: TaskSpec, methods: list[str], out: str | Path | None = None,
                keep: float = 0.8, calibration: dict[str, Any] | None = None, ppl_prefill: int = 4096, ppl_tokens: int = 256,
                dev_trials: int = 0, dev_lengths: list[int] | None = None, tasks: bool = True, resume: bool = False,
                log: Callable[[str], None] = print, text: tuple[str, Any] | None = None, cal: Any = None,
                on_save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run the suite (module docstring); rewrite `out` after every cell; return the result dict.
    methods: names from METHODS ("baseline" is always run first and gates the others).
    text: (haystack / perplexity text, its description) instead of the default evaluation text;
    cal: a ready Calibration for the codecs (see Methods); on_save: called with the result after every cell."""
    from kvsplice.cache import model_layout
    from kvsplice.data import describe_default, evaluation_text, tokenize
    from kvsplice.loading import model_id

    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise LongCtxError(f"unknown method(s) {unknown}; expected some of {sorted(METHODS)}")
    need = tokens_needed(spec.lengths, ppl_prefill, ppl_tokens)
    max_pos = getattr(model.config, "max_position_embeddings", None)
    if max_pos and need > max_pos:
        raise LongCtxError(f"lengths {spec.lengths} / ppl prefill {ppl_prefill}+{ppl_tokens} exceed the model's "
                           f"{max_pos} positions")
    t_start = time.perf_counter()
    layers, heads, head_dim = model_layout(model)
    vpt = 2 * layers * heads * head_dim
    from kvsplice.data import bos_id

    stream = tokenize(tokenizer, evaluation_text() if text is None else text[0])
    if stream.shape[0] < need:
        raise LongCtxError(f"the haystack text has {stream.shape[0]} tokens; lengths {spec.lengths} / ppl prefill "
                           f"{ppl_prefill}+{ppl_tokens} need up to {need}")
    bos = bos_id(tokenizer)  # trials put it first themselves; the perplexity window starts with it too
    ppl_stream = stream if bos is None else torch.cat([torch.tensor([bos]), stream])
    methods = ["baseline"] + [m for m in dict.fromkeys(methods) if m != "baseline"]
    reg = Methods(model, tokenizer, calibration, log, cal=cal)
    result: dict[str, Any] = {"model": model_id(model), "spec": spec.to_dict(), "dev": None, "methods": {}, "cells": [],
                              "kept": [], "keep_threshold": keep, "ppl": None, "calibration": reg.calibration,
                              "filler": describe_default("evaluation") if text is None else text[1], "run": {}}
    if resume and out is not None and Path(out).is_file():
        old = json.loads(Path(out).read_text(encoding="utf-8"))
        if dev_trials and old.get("dev"):  # the prompt format the earlier run chose on dev
            spec = dataclasses.replace(spec, prompt=old["dev"]["chosen"])
        if old.get("spec") == spec.to_dict() and old.get("model") == result["model"]:
            result.update({k: old[k] for k in ("dev", "methods", "cells", "kept", "ppl") if k in old})
            log(f"resuming: {len(result['cells'])} cells already in {out}")

    def save() -> None:
        result["run"] = {"seconds": round(time.perf_counter() - t_start, 1), "values_per_token": vpt,
                         "threads": torch.get_num_threads()}
        result["geometry_bytes"] = dict(reg.geometry_bytes)  # kv_bits_per_value is the payload: these are not in it
        add_ppl_deltas(result)
        if out is not None:
            write_result(out, result)
        if on_save is not None:
            on_save(result)

    if dev_trials and result["dev"] is None:
        result["dev"] = choose_prompt(model, tokenizer, stream, spec, dev_trials, dev_lengths or spec.lengths[:1], log)
        spec = dataclasses.replace(spec, prompt=result["dev"]["chosen"])
        result["spec"] = spec.to_dict()
        log(f"prompt format chosen on dev: {spec.prompt}")
        save()
    elif result["dev"]:
        spec = dataclasses.replace(spec, prompt=result["dev"]["chosen"])
    done = {(c["method"], c["task"], c["length"]) for c in result["cells"]}
    for n in sorted(spec.lengths) if tasks else []:
        for name in methods:
            for task in spec.tasks:
                kept = any(k["task"] == task and k["length"] == n for k in result["kept"])
                if (name, task, n) in done or (name != "baseline" and not kept):
                    continue
                make, setting = reg.factory(name, n)
                cell = run_cell(model, tokenizer, make_trials(tokenizer, stream, spec, task, n), make, spec)
                result["methods"][name] = setting
                result["cells"].append({"method": name, "setting": setting, "task": task, "length": n, **cell})
                if name == "baseline" and cell["accuracy"] >= keep:
                    result["kept"].append({"task": task, "length": n, "baseline_accuracy": cell["accuracy"]})
                lo, hi = cell["ci95"]
                log(f"{name} [{setting}] {task}@{n}: {cell['correct']}/{cell['answers']} = {cell['accuracy']:.2f} "
                    f"[{lo:.2f}, {hi:.2f}], {cell['kv_bits_per_value']:.2f} bits/value, {cell['seconds']} s")
                save()
    if ppl_prefill:
        result["ppl"] = result["ppl"] or {"prefill": ppl_prefill, "scored": ppl_tokens, "points": []}
        if (result["ppl"]["prefill"], result["ppl"]["scored"]) != (ppl_prefill, ppl_tokens):
            raise LongCtxError(f"{out} holds perplexity after {result['ppl']['prefill']}+{result['ppl']['scored']} tokens; "
                               f"this run asks for {ppl_prefill}+{ppl_tokens}: use another --json")
        for name in methods:
            if any(p["method"] == name for p in result["ppl"]["points"]):
                continue
            make, setting = reg.factory(name, ppl_prefill + ppl_tokens)
            p = ppl_after_prefill(model, ppl_stream, make, ppl_prefill, ppl_tokens, name)
            result["methods"][name] = setting
            result["ppl"]["points"].append({"method": name, "setting": setting, **p})
            log(f"{name} [{setting}] ppl after {ppl_prefill} prefill: {p['ppl']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}], "
                f"{p['kv_bits_per_value']:.2f} bits/value, {p['seconds']} s")
            save()
    save()
    return result
