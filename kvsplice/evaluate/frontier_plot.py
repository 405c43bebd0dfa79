"""PNG of a frontier JSON: perplexity vs total KV bytes per token (log x), one colour per method,
each method's Pareto points joined by a line, globally Pareto-optimal points ringed in black,
the uncompressed baseline as a dashed line. Top axis: bits per cached value. Atomic write."""

from __future__ import annotations

import math
import os
from typing import Any

from kvsplice.errors import KVSpliceError
from kvsplice.evaluate.frontier import pareto_flags
from kvsplice.evaluate.report import save_png


def plot_frontier_json(path: str | os.PathLike, result: dict[str, Any], title: str | None = None) -> None:
    """Write the PNG for `result` (the dict `run_frontier` returns) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    pts = [q for q in result.get("points", []) if q["ppl"] is not None and math.isfinite(q["ppl"])]
    if not pts:
        raise KVSpliceError("plot: the frontier has no finite points")
    methods = list(dict.fromkeys(q["method"] for q in pts))
    cmap = plt.get_cmap("tab20" if len(methods) > 10 else "tab10")
    glob = pareto_flags([(q["kv_bytes_per_token"], q["ppl"]) for q in pts])
    fig, ax = plt.subplots(figsize=(9.0, 6.0), dpi=120)
    try:
        for i, m in enumerate(methods):
            mp = [q for q in pts if q["method"] == m]
            colour = "black" if m == "baseline" else cmap(i % cmap.N)
            ax.scatter([q["kv_bytes_per_token"] for q in mp], [q["ppl"] for q in mp], s=30, color=colour, label=m, zorder=3,
                       marker="*" if m == "baseline" else "o")
            front = sorted((q for q in mp if q["pareto"]), key=lambda q: q["kv_bytes_per_token"])
            if len(front) > 1:
                ax.plot([q["kv_bytes_per_token"] for q in front], [q["ppl"] for q in front], color=colour, lw=1.2, zorder=2)
        gx = [q["kv_bytes_per_token"] for q, f in zip(pts, glob) if f]
        gy = [q["ppl"] for q, f in zip(pts, glob) if f]
        ax.scatter(gx, gy, s=110, facecolors="none", edgecolors="black", linewidths=1.3, zorder=4, label="Pareto (all methods)")
        ax.axhline(result["baseline_ppl"], color="grey", ls="--", lw=0.8, zorder=1)
        ax.set_xscale("log")
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ys = [q["ppl"] for q in pts]
        if max(ys) / min(ys) > 3:
            ax.set_yscale("log")
        ax.set_xlabel("total KV cache bytes per token (K + V + all overheads, all layers, measured)")
        ax.set_ylabel("perplexity (prefill-continue)")
        vpt = (result.get("run") or {}).get("values_per_token")
        if vpt:
            sec = ax.secondary_xaxis("top", functions=(lambda b: 8.0 * b / vpt, lambda bits: bits * vpt / 8.0))
            sec.set_xlabel("bits per cached K/V value")
            sec.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            sec.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: f"{v:g}" if str(round(v, 3))[0] in "1235" else ""))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right", ncol=2)
        ax.set_title(title or f"KV cache quality per byte: {result.get('model', '')}", fontsize=10)
        fig.tight_layout()
        save_png(fig, path)
    finally:
        plt.close(fig)


FAMILY_STYLE = {"ours": ("o", "-"), "peer": ("s", "--"), "seed": ("D", ":")}


def plot_suite_json(path: str | os.PathLike, result: dict[str, Any], clip: tuple[float, float] = (-2.0, 30.0),
                    title: str | None = None) -> None:
    """PNG of a suite result (kvsplice/evaluate/suite.py): one panel per domain; x = bits per cached
    K/V value with the geometry amortised over the LARGEST deployment of the result (log2 axis); y = Δ
    perplexity % vs the uncompressed baseline of the same protocol (linear, clipped to `clip`; a point
    beyond is drawn at the edge as a triangle with its value). Calibrated methods: mean over draws,
    bars = the envelope of the draws' 95 % CIs; others: the point's own 95 % CI. Our coders: circles,
    solid lines; peers: squares, dashed; the seed's rows: diamonds, dotted; at most 8 colours. Points
    of the config's `headline` methods are labelled with their Δ %. Atomic write."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter

    rows = [r for r in result.get("summary", []) if r["delta_pct"] and math.isfinite(r["delta_pct"]["mean"])]
    if not rows:
        raise KVSpliceError("plot: the suite result has no summary rows with a finite Δ (is it complete?)")
    lo, hi = clip
    if not lo < 0 < hi:
        raise KVSpliceError(f"plot: clip must be (low < 0 < high), got {clip}")
    keys = [k for k in rows[0]["bits_per_value"] if k != "payload"]
    xkey = max(keys, key=lambda k: int(k.split("_")[1].split("x")[0])) if keys else "payload"
    domains = list(dict.fromkeys(r["domain"] for r in rows))
    methods = list(dict.fromkeys(r["method"] for r in rows))
    colours = plt.get_cmap("tab10")
    headline = set(result.get("config", {}).get("headline", []))
    fig, axes = plt.subplots(1, len(domains), figsize=(5.2 * len(domains), 5.0), dpi=110, squeeze=False, sharey=True)
    try:
        for ax, domain in zip(axes[0], domains):
            for i, m in enumerate(methods):
                mr = sorted((r for r in rows if r["domain"] == domain and r["method"] == m), key=lambda r: r["bits_per_value"][xkey])
                if not mr:
                    continue
                marker, ls = FAMILY_STYLE.get(mr[0]["family"], ("x", "-."))
                colour = colours(i % 8)
                xs = [r["bits_per_value"][xkey] for r in mr]
                ys = [r["delta_pct"]["mean"] for r in mr]
                yc = [min(max(y, lo), hi) for y in ys]
                err = [[max(y - max(r["ci95_envelope"][0], lo), 0) for y, r in zip(yc, mr)],
                       [max(min(r["ci95_envelope"][1], hi) - y, 0) for y, r in zip(yc, mr)]]
                ax.errorbar(xs, yc, yerr=err, color=colour, marker=marker, ls=ls, lw=1.1, ms=5, capsize=2.5, label=m, zorder=3)
                for x, y, r in zip(xs, ys, mr):
                    if y > hi or y < lo:
                        edge = hi if y > hi else lo
                        ax.scatter([x], [edge], marker="^" if y > hi else "v", s=70, color=colour, zorder=5, edgecolors="black", clip_on=False)
                        ax.annotate(f"{y:+.3g}%", (x, edge), textcoords="offset points", xytext=(6, -12 if y > hi else 6), fontsize=7,
                                    color=colour, weight="bold", annotation_clip=False)
                    elif m in headline:
                        ax.annotate(f"{y:+.3g}%", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7.5, color=colour, weight="bold")
            base = (result.get("domains", {}).get(domain, {}).get("baseline", {}))
            ppl = ", ".join(f"{'TF' if p.startswith('teacher') else 'PC'} {b['ppl']:.2f}" for p, b in base.items())
            ax.axhline(0.0, color="grey", lw=0.8, ls="--", zorder=1)
            ax.set_ylim(lo, hi)
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_locator(FixedLocator([1, 1.5, 2, 3, 4, 6, 8, 12, 16, 32]))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.grid(True, which="major", alpha=0.3)
            ax.set_title(f"{domain} ({result.get('split', '?')} split; baseline ppl {ppl})", fontsize=9)
            dep = xkey.replace("amortised_", "").replace("x", " seq x ")
            ax.set_xlabel(f"bits per K/V value (geometry amortised over {dep} tokens)" if keys else "bits per K/V value (payload)", fontsize=8)
        axes[0][0].set_ylabel(f"Δ perplexity, % vs uncompressed (95% CI; axis clipped to [{lo:g}, {hi:g}])", fontsize=8)
        handles, labels = axes[0][0].get_legend_handles_labels()
        for ax in axes[0][1:]:  # methods missing from the first panel
            for h, l in zip(*ax.get_legend_handles_labels()):
                if l not in labels:
                    handles.append(h)
                    labels.append(l)
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
        fig.suptitle(title or f"{result.get('model') or 'model'}: {result.get('suite', '')} suite, {result.get('split', '')} split\n"
                     "circles / solid: ours; squares / dashed: peers; diamonds / dotted: the seed's rows", fontsize=9)
        fig.tight_layout(rect=(0, 0.07, 1, 1))
        save_png(fig, path)
    finally:
        plt.close(fig)
