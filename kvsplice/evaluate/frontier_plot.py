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
