"""Sensitivity-driven bit allocation across layers and K / V (issue 13, lever 1).

Uniform pca-q gives every layer and both K and V the same average bits; inside a layer reverse
water-filling already spreads them over the rotated coefficients. This module spreads the budget
ACROSS layers and K / V by what each costs the model's output, measured, not assumed:

    damage[t][l][b] = mean KL(p_exact || p_coded) of the next-token distribution over probe tokens
                      of the CALIBRATION text when only layer l's t (K or V) is coded at b bits
                      (the setting's sink kept exact), every other row exact
    cost[t][l][b]   = payload bytes per token of that layer's codec at b bits (codes + gain)

    minimise  sum_{t,l} damage[t][l][b_tl]   subject to   sum_{t,l} cost[t][l][b_tl] <= budget

a multiple-choice knapsack, solved on its lower convex hull by a Lagrangian sweep (each item takes
argmin damage + lam * cost; bisection on lam for the cheapest lam that fits), then greedy upgrades
into the bytes left. budget = bits x (K+V values per token) / 8: the same payload as uniform pca-q
at `bits`. Damage is assumed additive over items (first order for small distortions): the end-to-
end delta measured on the dev split is the check, not this model.

Cost of the probe: len(levels) x 2 x layers forwards of `probe_tokens` tokens (SmolLM2, 6 levels:
360 forwards of 512 tokens) plus one geometry fit per level and target.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from kvsplice.errors import KVSpliceError

ALLOCATE_KEYS = ("allocate", "levels", "probe_tokens")  # setting keys that are not codec parameters
ALLOCATORS = ("sensitivity",)
DEFAULT_LEVELS = (1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
DEFAULT_PROBE_TOKENS = 512


def check_allocation_params(s: dict[str, Any], where: str) -> None:
    """KVSpliceError naming the bad key: allocate in ALLOCATORS, levels a list of >= 2 distinct
    numbers, probe_tokens an int >= 16, no k_bits (the allocator sets K's bits itself)."""
    if s.get("allocate") not in ALLOCATORS:
        raise KVSpliceError(f"{where}: allocate must be one of {ALLOCATORS}, got {s.get('allocate')!r}")
    levels = s.get("levels", list(DEFAULT_LEVELS))
    if (not isinstance(levels, (list, tuple)) or len(set(levels)) < 2
            or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0 for b in levels)):
        raise KVSpliceError(f"{where}: levels must be a list of >= 2 distinct positive bit widths, got {levels!r}")
    n = s.get("probe_tokens", DEFAULT_PROBE_TOKENS)
    if isinstance(n, bool) or not isinstance(n, int) or n < 16:
        raise KVSpliceError(f"{where}: probe_tokens must be an int >= 16, got {n!r}")
    if s.get("k_bits") is not None:
        raise KVSpliceError(f"{where}: k_bits cannot be combined with allocate (the allocator picks K's bits per layer)")
    if not min(levels) <= s["bits"] <= max(levels):
        raise KVSpliceError(f"{where}: bits {s['bits']} must lie within levels [{min(levels)}, {max(levels)}]")


def per_layer_codecs(model: Any, geometry: Any, target: str) -> list[Any]:
    """A geometry's LayerCodec per layer (None where it has none); K wrapped for pre-RoPE coding."""
    from kvsplice.cache import LayerCodec, model_layout
    from kvsplice.kcodec import k_layer_codecs

    if target == "k":
        return k_layer_codecs(model, geometry)
    return [LayerCodec.from_geometry(geometry, l) for l in range(model_layout(model)[0])]


def layer_cost(geometry: Any, layer: int) -> float:
    """Payload bytes per token of `layer` in `geometry` (every head's codec once per token)."""
    return float(sum(c.payload_bytes_per_vector() for (l, _), c in geometry.codecs.items() if l == layer))


@dataclass
class Allocation:
    """bits[t][l]: the chosen bit width of layer l's t in {"k", "v"}; damage[t][l]: {bits: KL} probed;
    cost[t][l]: {bits: bytes per token}; budget: bytes per token allowed; predicted_kl: sum of the
    chosen damages (the additive model's prediction, not a measurement)."""

    bits: dict[str, list[float]]
    damage: dict[str, list[dict[float, float]]]
    cost: dict[str, list[dict[float, float]]]
    budget: float
    predicted_kl: float
    info: dict[str, Any] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {"bits": self.bits, "budget_bytes_per_token": self.budget, "predicted_kl": self.predicted_kl,
                "damage": {t: [{str(b): d for b, d in row.items()} for row in rows] for t, rows in self.damage.items()},
                **self.info}


def solve(damage: dict[Any, dict[float, float]], cost: dict[Any, dict[float, float]], budget: float) -> dict[Any, float]:
    """Multiple-choice knapsack: one option (bits) per item, sum cost <= budget, least sum damage.
    Lagrangian relaxation (exact on the lower convex hull of each item's options) + greedy fill."""
    items = sorted(damage)
    floor = sum(min(cost[i].values()) for i in items)
    if floor > budget + 1e-9:
        raise KVSpliceError(f"bit budget {budget:.1f} bytes/token is below the cheapest allocation ({floor:.1f}): lower the smallest level")

    def pick(lam: float) -> dict[Any, float]:
        return {i: min(damage[i], key=lambda b: (damage[i][b] + lam * cost[i][b], cost[i][b])) for i in items}

    def total(choice: dict[Any, float]) -> float:
        return sum(cost[i][choice[i]] for i in items)

    lo, hi = 0.0, 1.0
    while total(pick(hi)) > budget and hi < 1e12:
        hi *= 10.0
    for _ in range(200):  # smallest lam whose choice fits (larger lam -> cheaper choices)
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6
        if total(pick(mid)) <= budget:
            hi = mid
        else:
            lo = mid
        if hi - lo <= 1e-9 * hi:
            break
    choice = pick(hi)
    while True:  # spend what is left on the upgrade with the best damage saved per byte
        left, best = budget - total(choice), None
        for i in items:
            for b in damage[i]:
                dc, dd = cost[i][b] - cost[i][choice[i]], damage[i][choice[i]] - damage[i][b]
                if 0 < dc <= left + 1e-9 and dd > 0 and (best is None or dd / dc > best[0]):
                    best = (dd / dc, i, b)
        if best is None:
            return choice
        choice[best[1]] = best[2]


@torch.no_grad()
def probe_damage(model: Any, ids: torch.Tensor, candidates: dict[str, dict[float, list[Any]]], sink: int,
                 log: Callable[[str], None] = lambda m: None) -> dict[str, list[dict[float, float]]]:
    """ids (B, T) calibration tokens; candidates[t][b]: per-layer LayerCodecs of t at b bits.
    -> damage[t][l][b]: mean KL(exact || only (t, l) coded at b) in nats per token, one forward each."""
    from kvsplice.cache import CompressedCache, layer_windows, model_layout

    L = model_layout(model)[0]
    sliding = layer_windows(model)
    ref = F.log_softmax(model(ids, use_cache=False).logits.float(), dim=-1)  # (B, T, vocab)
    p_ref = ref.exp()
    out: dict[str, list[dict[float, float]]] = {t: [{} for _ in range(L)] for t in candidates}
    t0, n, todo = time.perf_counter(), 0, sum(len(v) for v in candidates.values()) * L
    for t, by_bits in candidates.items():
        for b, codecs in sorted(by_bits.items()):
            for l in range(L):
                only = [c if i == l else None for i, c in enumerate(codecs)]
                cache = CompressedCache(L, v_codecs=only if t == "v" else None, k_codecs=only if t == "k" else None,
                                        sink=sink, sliding_windows=sliding)
                logp = F.log_softmax(model(ids, cache=cache, use_cache=True).logits.float(), dim=-1)
                out[t][l][b] = float((p_ref * (ref - logp)).sum(-1).mean())
                n += 1
            log(f"sensitivity probe: {t.upper()} at {b} bits, {n}/{todo} forwards ({time.perf_counter() - t0:.0f} s)")
    return out


@dataclass
class Probe:
    """What the sensitivity probe measured for one setting family (all but `bits`): damage[t][l][b],
    cost[t][l][b] (bytes per token), geos[t][b], values per token of each target, and info."""

    damage: dict[str, list[dict[float, float]]]
    cost: dict[str, list[dict[float, float]]]
    geos: dict[str, dict[float, Any]]
    values: int
    info: dict[str, Any]


def run_probe(model: Any, s: dict[str, Any], geometry: Callable[[dict[str, Any], str], Any], ids: torch.Tensor,
              log: Callable[[str], None] = lambda m: None) -> Probe:
    """Fit every level's geometry (`geometry(setting, target)`, cached by the caller) and probe the
    damage of each (target, layer, level); ids (B, T) probe tokens from the calibration text."""
    from kvsplice.cache import model_layout

    check_allocation_params(s, "allocate")
    L, H, D = model_layout(model)
    levels = sorted({float(b) for b in s.get("levels", DEFAULT_LEVELS)})
    base = {k: v for k, v in s.items() if k not in ALLOCATE_KEYS and k not in ("bits", "k_bits")}
    targets = [t for t in ("k", "v") if t in s.get("target", "v")]
    geos = {t: {b: geometry({**base, "bits": b}, t) for b in levels} for t in targets}
    t0 = time.perf_counter()
    damage = probe_damage(model, ids, {t: {b: per_layer_codecs(model, g, t) for b, g in geos[t].items()} for t in targets},
                          int(s.get("sink", 0)), log)
    cost = {t: [{b: layer_cost(geos[t][b], l) for b in levels} for l in range(L)] for t in targets}
    info = {"probe_tokens": int(ids.numel()), "probe_seconds": round(time.perf_counter() - t0, 1), "levels": levels}
    return Probe(damage, cost, geos, len(targets) * L * H * D, info)


def fit_allocation(probe: Probe, bits: float, log: Callable[[str], None] = lambda m: None) -> Allocation:
    """The allocation at an average of `bits` per value: uniform pca-q's payload at `bits`."""
    targets, L = sorted(probe.damage), len(next(iter(probe.damage.values())))
    budget = float(bits) * probe.values / 8.0
    flat = solve({(t, l): probe.damage[t][l] for t in targets for l in range(L)},
                 {(t, l): probe.cost[t][l] for t in targets for l in range(L)}, budget)
    chosen = {t: [flat[(t, l)] for l in range(L)] for t in targets}
    kl = sum(probe.damage[t][l][flat[(t, l)]] for t in targets for l in range(L))
    log(f"allocation at {bits} bits: " + "; ".join(f"{t.upper()} {chosen[t]}" for t in targets))
    return Allocation(chosen, probe.damage, probe.cost, budget, kl, dict(probe.info))


def allocation_meta(alloc: Allocation, target: str) -> str:
    """The geometry-file record of an allocation (meta["allocation"]): `target`'s per-layer bits."""
    import json

    return json.dumps({"allocate": "sensitivity", "bits": alloc.bits[target], "budget_bytes_per_token": alloc.budget,
                       "predicted_kl": alloc.predicted_kl, **alloc.info}, sort_keys=True)


def allocated_geometry(alloc: Allocation, geos: dict[str, dict[float, Any]], target: str, description: str | None = None) -> Any:
    """One Geometry for `target` whose layer l holds the codec fitted at alloc.bits[target][l] (each
    codec keeps its own parameters in the file); meta records the allocation."""
    from kvsplice.geometry import Geometry

    bits = alloc.bits[target]
    codecs = {key: c for l, b in enumerate(bits) for key, c in geos[target][b].codecs.items() if key[0] == l}
    meta = dict(geos[target][bits[0]].meta)
    meta["allocation"] = allocation_meta(alloc, target)
    if description is not None:
        meta["calibration"] = description
    return Geometry(codecs=codecs, meta=meta)


# --- levers 1 + 2 combined: allocation for cross-layer prediction (kvsplice/codecs/xpred.py) ---------------
# The probe codes one layer at a time, but a predicted layer needs its coded predecessor, so it cannot
# probe xpred-pca-q directly. It measures the MODEL's sensitivity instead, with pca-q: KL per unit of a
# layer's coding error. First order, the KL a layer's rows cause grows linearly with their mean squared
# error whichever codec made it, so xpred's damage at b bits = pca-q's probed damage x mse_xpred / mse_pcaq
# of that (target, layer, b), both errors measured on the same calibration rows. The knapsack then
# spends the same payload (xpred's bytes per token are pca-q's) and the maps are refitted closed loop at
# the chosen widths. The dev split, not this model, is the check.


def layer_mse(geometry: Any, rows: dict[int, torch.Tensor]) -> list[float]:
    """Per layer l, the mean squared coding error per value of `geometry`'s joint codec on rows[l] (N, D)."""
    out = []
    for l in sorted(rows):
        c = geometry.codecs.get((l, -1))
        if c is None:
            raise KVSpliceError(f"layer_mse: expected a joint codec (layer {l}, head -1) in the geometry, found keys {sorted(geometry.codecs)[:4]}")
        x = rows[l]
        out.append(float((c.decode(c.encode(x)) - x).pow(2).mean()))
    return out


def rescale_damage(probe: Probe, mse_ref: dict[str, dict[float, list[float]]], mse_new: dict[str, dict[float, list[float]]]) -> Probe:
    """The probe with damage[t][l][b] scaled by mse_new[t][b][l] / mse_ref[t][b][l] (see above)."""
    damage = {t: [{b: d * mse_new[t][b][l] / max(mse_ref[t][b][l], 1e-30) for b, d in row.items()} for l, row in enumerate(rows)]
              for t, rows in probe.damage.items()}
    ratio = {t: {str(b): [round(n / max(r, 1e-30), 4) for n, r in zip(mse_new[t][b], mse_ref[t][b])] for b in mse_ref[t]} for t in mse_ref}
    return Probe(damage, probe.cost, probe.geos, probe.values, {**probe.info, "damage": "pca-q probe x mse ratio", "mse_ratio": ratio})
