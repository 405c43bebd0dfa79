"""PNG of a long-context JSON (kvsplice/evaluate/longctx_run.py): one panel per (task, length) cell,
accuracy (Wilson 95 % bars) vs bits per cached K/V value (log x), one colour per method family,
filled markers for kvsplice's codecs and open ones for peers; the uncompressed baseline as a
dashed line. A last panel shows perplexity after the long prefill when measured. Atomic write."""

from __future__ import annotations

import os
from typing import Any

from kvsplice.errors import KVSpliceError
from kvsplice.evaluate.report import save_png


def _family(method: str) -> str:
    return method.rsplit("-", 1)[0] if method[-1:].isdigit() else method


def plot_longctx(path: str | os.PathLike, result: dict[str, Any]) -> None:
    """Write the PNG for `result` (the dict `run_longctx` returns) to `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    cells = [c for c in result.get("cells", []) if c.get("accuracy") is not None]
    kept = [(k["task"], k["length"]) for k in result.get("kept", [])]
    ppl = [p for p in ((result.get("ppl") or {}).get("points") or []) if p.get("ppl") is not None]
    panels: list[Any] = [k for k in kept if any((c["task"], c["length"]) == k and c["method"] != "baseline" for c in cells)]
    panels = panels or kept
    if ppl:
        panels.append("ppl")
    if not panels:
        raise KVSpliceError("plot: the long-context result has no kept cell and no perplexity point")
    families = list(dict.fromkeys(_family(m) for m in [c["method"] for c in cells] + [p["method"] for p in ppl]))
    cmap = plt.get_cmap("tab10")
    colour = {f: ("black" if f == "baseline" else cmap(i % 10)) for i, f in enumerate(families)}
    ncol = min(3, len(panels))
    nrow = (len(panels) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.6 * nrow), dpi=110, squeeze=False)
    try:
        seen: set[str] = set()
        for ax, panel in zip(axes.flat, panels):
            if panel == "ppl":
                pts, title = ppl, f"perplexity after a {result['ppl']['prefill']}-token prefill"
                ys = [p["ppl"] for p in pts]
                lo = [p["ppl"] - p["ci95"][0] for p in pts]
                hi = [p["ci95"][1] - p["ppl"] for p in pts]
            else:
                pts = [c for c in cells if (c["task"], c["length"]) == panel]
                title = f"{panel[0]} @ {panel[1]} tokens"
                ys = [c["accuracy"] for c in pts]
                lo = [c["accuracy"] - c["ci95"][0] for c in pts]
                hi = [c["ci95"][1] - c["accuracy"] for c in pts]
            for p, y, l, h in zip(pts, ys, lo, hi):
                fam = _family(p["method"])
                ours = fam.startswith(("pca-q", "xpred"))  # our coders: filled circles
                if fam == "baseline":
                    ax.axhline(y, color="grey", ls="--", lw=0.8)
                ax.errorbar([p["kv_bits_per_value"]], [y], yerr=[[max(l, 0)], [max(h, 0)]], color=colour[fam],
                            marker="*" if fam == "baseline" else ("o" if ours else "s"), mfc=colour[fam] if ours or fam == "baseline" else "none",
                            ms=7, capsize=2, lw=1, ls="none", label=None if fam in seen else fam)
                seen.add(fam)
            ax.set_xscale("log")
            ax.xaxis.set_major_locator(FixedLocator([1, 2, 3, 4, 6, 8, 16, 32]))
            ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("bits per cached K/V value (measured)", fontsize=8)
            ax.set_ylabel("perplexity" if panel == "ppl" else "accuracy (Wilson 95 %)", fontsize=8)
            if panel != "ppl":
                ax.set_ylim(-0.05, 1.05)
            ax.set_title(title, fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        fig.legend(loc="lower center", ncol=min(len(seen), 6), fontsize=8, frameon=False)
        spec = result.get("spec", {})
        fig.suptitle(f"Long-context retrieval through compressed KV caches: {result.get('model', '')} "
                     f"({spec.get('prompt', '')} prompt, {spec.get('trials', '?')} contexts per cell)", fontsize=10)
        fig.tight_layout(rect=(0, 0.06, 1, 0.96))
        save_png(fig, path)
    finally:
        plt.close(fig)
