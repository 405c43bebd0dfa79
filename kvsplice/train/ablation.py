"""The training ablation (seed: defconfig gpt2-kv-pruning-ablation): variants trained in turn from
the same seed, data and step budget, then one table, a JSON file and a plot of validation loss.

Config (TOML):
    [ablation]  name, out_dir (each variant trains in <out_dir>/<variant>)
    [base]      TrainConfig fields shared by every variant
    [[variants]] name, description, and the TrainConfig fields it overrides

Row columns: final validation perplexity, its change vs the first variant (V0), V values cached
per head at T=1024 by the seed's formula (kept tokens x latent dims) and as measured at the
training context, total cache bytes per token as measured (K + V payload + kept indices + RA's
queries, float32, all layers), steps, training seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvsplice.errors import KVSpliceError
from kvsplice.train.config import TrainConfig, from_dict, load_toml
from kvsplice.train.trainer import train, write_json


@dataclass
class AblationConfig:
    name: str
    out_dir: str
    base: dict[str, Any]
    variants: list[dict[str, Any]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.variants:
            raise KVSpliceError("ablation config: expected at least one [[variants]] entry, found none")
        names = [v.get("name") for v in self.variants]
        if any(not isinstance(n, str) or not n for n in names) or len(set(names)) != len(names):
            raise KVSpliceError(f"ablation config: every variant needs a unique non-empty name, got {names}")

    def train_config(self, name: str) -> TrainConfig:
        v = next((v for v in self.variants if v["name"] == name), None)
        if v is None:
            raise KVSpliceError(f"ablation config: no variant {name!r}; expected one of {[x['name'] for x in self.variants]}")
        over = {k: val for k, val in v.items() if k not in ("description",)}
        return from_dict({**self.base, **over, "out_dir": str(Path(self.out_dir) / name)})

    def description(self, name: str) -> str:
        return next(v.get("description", "") for v in self.variants if v["name"] == name)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "out_dir": self.out_dir, "base": self.base, "variants": self.variants}


def load_ablation(path: str | Path, overrides: dict[str, Any] | None = None) -> AblationConfig:
    raw = load_toml(path)
    unknown = sorted(set(raw) - {"ablation", "base", "variants"})
    if unknown:
        raise KVSpliceError(f"ablation config {path}: unknown tables {unknown}; expected [ablation], [base], [[variants]]")
    head = raw.get("ablation", {})
    base = {**raw.get("base", {}), **(overrides or {})}
    return AblationConfig(name=head.get("name", Path(path).stem), out_dir=head.get("out_dir", "results/ablate-train"),
                          base=base, variants=raw.get("variants", []))


def make_row(result: dict[str, Any], description: str, ref_ppl: float | None) -> dict[str, Any]:
    mem = result["memory"]
    row = {
        "name": result["name"], "description": description,
        "val_ppl": round(result["val_ppl"], 3),
        "delta_vs_v0_pct": None if ref_ppl is None else round(100.0 * (result["val_ppl"] / ref_ppl - 1.0), 2),
        "v_values_per_head": int(result["v_values_per_head_T1024_formula"]),
        "v_values_per_head_measured": int(max(mem["v_values_per_head"])),
        "context": int(mem["context"]),
        "kv_bytes_per_token": round(mem["kv_bytes_per_token"], 2),
        "v_bytes_per_token": round(mem["v_bytes_per_token"], 2),
        "steps": int(result["steps"]), "seconds": float(result["seconds"]),
    }
    if "refit" in result:
        row["val_ppl_refit"] = round(result["refit"]["val_ppl"], 3)
    return row


def format_table(rows: list[dict[str, Any]]) -> str:
    cols = [("name", "variant"), ("val_ppl", "val ppl"), ("delta_vs_v0_pct", "Δ vs V0 %"),
            ("v_values_per_head", "V/head @1024"), ("v_values_per_head_measured", "V/head meas."),
            ("kv_bytes_per_token", "KV B/tok"), ("steps", "steps"), ("seconds", "seconds")]
    if any("val_ppl_refit" in r for r in rows):
        cols.insert(3, ("val_ppl_refit", "ppl refit"))
    cells = [[h for _, h in cols]] + [["" if r.get(k) is None else f"{r[k]:+.2f}" if k == "delta_vs_v0_pct"
                                       else f"{r[k]:.1f}" if k == "seconds" else str(r[k]) for k, _ in cols] for r in rows]
    w = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["| " + " | ".join(c[i].ljust(w[i]) for i in range(len(cols))) + " |" for c in cells]
    lines.insert(1, "|" + "|".join("-" * (x + 2) for x in w) + "|")
    return "\n".join(lines)


def plot_curves(results: list[dict[str, Any]], path: str | Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    for r in results:
        steps, losses = zip(*r["history"]["val"])
        ax.plot(steps, losses, marker=".", label=f"{r['name']} ({r['val_ppl']:.1f})")
        cal = r.get("calibration")
        if cal:
            ax.axvline(cal["step"], color="grey", lw=0.5, ls=":")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(path).with_name(Path(path).stem + ".tmp.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(path)


def run_ablation(acfg: AblationConfig, only: list[str] | None = None, json_path: str | Path | None = None,
                 plot_path: str | Path | None = None, log=print) -> dict[str, Any]:
    """Train the variants in order (all of them, or `only`), print/return the table."""
    names = [v["name"] for v in acfg.variants]
    if only:
        bad = [n for n in only if n not in names]
        if bad:
            raise KVSpliceError(f"unknown variants {bad}; expected among {names}")
        names = [n for n in names if n in only]
    for n in names:  # validate every selected variant now, not after an hour of training
        acfg.train_config(n)
    t0 = time.perf_counter()
    results, rows = [], []
    ref_ppl = None
    for n in names:
        cfg = acfg.train_config(n)
        log(f"[ablate-train] {n}: {acfg.description(n)}")
        res = train(cfg)
        results.append(res)
        if ref_ppl is None:
            ref_ppl = res["val_ppl"]
        rows.append(make_row(res, acfg.description(n), ref_ppl))
        log(f"[ablate-train] {n}: val ppl {res['val_ppl']:.3f} after {res['steps']} steps, {res['seconds']:.1f} s")
    wall = time.perf_counter() - t0
    out = {"config": acfg.to_dict(), "rows": rows, "wall_seconds": round(wall, 1),
           "reference": names[0], "curves": {r["name"]: r["history"]["val"] for r in results},
           "runs": {r["name"]: {k: v for k, v in r.items() if k != "history"} for r in results}}
    table = format_table(rows)
    log(table)
    log(f"[ablate-train] wall time {wall:.1f} s")
    json_path = json_path or Path(acfg.out_dir) / "ablation.json"
    write_json(json_path, out)
    plot_curves(results, plot_path or Path(acfg.out_dir) / "val_loss.png", f"{acfg.name}: validation loss")
    out["table"] = table
    return out
