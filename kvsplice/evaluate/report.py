"""Results: the text table, the JSON file (with the config that produced it) and the PNG plot.

JSON layout (issue 3, section 6), one object per protocol:

    {"model": str, "protocol": str, "tokens": int,
     "rows": [{"name", "ppl", "nll", "v_bytes_per_token", "kv_bytes_per_token",
               "v_reduction_pct", "kv_reduction_pct", "measured_cache_bytes", "seconds"}],
     "config": {...}}

`kvsplice ablate` may add "extra_protocols": [{"protocol", "tokens", "rows"}] for rows measured under
a second protocol, and "complete": false while rows are still being added (true at the end).
Writes are atomic (temporary file in the same folder, then os.replace).
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Sequence

from kvsplice.paths import atomic_write_bytes, clean_stale_temporaries

from kvsplice.errors import KVSpliceError, NonFiniteError
from kvsplice.evaluate.perplexity import PROTOCOLS, ROW_FIELDS, EvalRow

_FLOAT_FIELDS = tuple(f for f in ROW_FIELDS if f not in ("name", "measured_cache_bytes"))


def result_dict(model: str, protocol: str, rows: Sequence[EvalRow], config: dict[str, Any]) -> dict[str, Any]:
    """The JSON object of one protocol's rows. `tokens` = scored tokens per row (the same for every
    row, or the rows are not comparable and this raises)."""
    if protocol not in PROTOCOLS:
        raise KVSpliceError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    counts = {r.tokens for r in rows}
    if len(counts) > 1:
        raise KVSpliceError(f"rows scored different token counts {sorted(counts)}; they would not be comparable")
    return {
        "model": str(model),
        "protocol": protocol,
        "tokens": int(counts.pop()) if counts else 0,
        "rows": [r.as_json() for r in rows],
        "config": config,
    }


def validate_result(d: Any, require_config: bool = True) -> None:
    """Raise KVSpliceError unless `d` follows the JSON layout above (types included)."""

    def fail(msg: str) -> None:
        raise KVSpliceError(f"result JSON: {msg}")

    if not isinstance(d, dict):
        fail(f"expected an object, found {type(d).__name__}")
    need = {"model": str, "protocol": str, "tokens": int, "rows": list}
    if require_config:
        need["config"] = dict
    for k, t in need.items():
        if k not in d:
            fail(f"missing key {k!r} (expected keys {sorted(need)})")
        if not isinstance(d[k], t) or isinstance(d[k], bool):
            fail(f"{k!r} must be {t.__name__}, found {type(d[k]).__name__}")
    if d["protocol"] not in PROTOCOLS:
        fail(f"protocol must be one of {PROTOCOLS}, found {d['protocol']!r}")
    if "complete" in d and not isinstance(d["complete"], bool):
        fail(f"'complete' must be a bool, found {d['complete']!r}")
    for i, row in enumerate(d["rows"]):
        if not isinstance(row, dict) or set(row) != set(ROW_FIELDS):
            fail(f"row {i} must have exactly the keys {list(ROW_FIELDS)}, found {sorted(row) if isinstance(row, dict) else row!r}")
        if not isinstance(row["name"], str):
            fail(f"row {i} 'name' must be str")
        if not isinstance(row["measured_cache_bytes"], int) or isinstance(row["measured_cache_bytes"], bool):
            fail(f"row {i} 'measured_cache_bytes' must be int, found {row['measured_cache_bytes']!r}")
        for k in _FLOAT_FIELDS:
            if not isinstance(row[k], float):
                fail(f"row {i} {k!r} must be float, found {row[k]!r}")
    for j, extra in enumerate(d.get("extra_protocols", [])):
        validate_result({"model": d["model"], **extra}, require_config=False)


def write_json(path: str | os.PathLike, data: dict[str, Any]) -> None:
    """Validate and write atomically (non-finite floats are written as null: strict JSON).
    Commands call it after every finished row with "complete": false, then once more with true,
    so an interrupted run keeps every finished row."""
    validate_result(data)
    atomic_write_bytes(Path(path), (json.dumps(_finite(data), indent=2, sort_keys=False) + "\n").encode("utf-8"))


def require_finite(row: EvalRow, what: str = "") -> EvalRow:
    """NonFiniteError unless the row's perplexity and NLL are finite: NaN/inf logits (e.g. from an
    absurd geometry or an overflowing dtype) must stop the run, never print `ppl nan` and exit 0."""
    if not (math.isfinite(row.ppl) and math.isfinite(row.nll)):
        raise NonFiniteError(
            f"row {row.name!r}{' ' + what if what else ''}: perplexity {row.ppl} / NLL {row.nll} is not finite: the model "
            "produced NaN/inf logits with this cache (corrupted geometry, or a dtype that overflows)"
        )
    return row


def _finite(x: Any) -> Any:
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def _public(path: str) -> None:
    """mkstemp creates 0600 files; give results the usual mode (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        _public(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def save_png(fig: Any, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically (temp file + rename: never a half-written plot)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)  # left by a killed earlier save
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, format="png")
        _public(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def format_table(rows: Sequence[EvalRow], baseline: str | None = None, title: str | None = None) -> str:
    """A fixed-width text table. Δppl % is relative to the row named `baseline` (default: the first);
    its header names that row."""
    if not rows:
        return "(no rows)"
    base = next((r for r in rows if r.name == baseline), rows[0]) if baseline is not None else rows[0]
    # name the reference row in the header: with --no-baseline it is not a DynamicCache row
    head = ("row", "ppl", f"Δppl % vs {base.name}", "V B/tok", "KV B/tok", "V red %", "KV red %", "cache bytes", "sec")
    lines = []
    for r in rows:
        d = 100.0 * (r.ppl / base.ppl - 1.0) if base.ppl and math.isfinite(base.ppl) else float("nan")
        lines.append(
            (
                r.name,
                f"{r.ppl:.3f}",
                f"{d:+.2f}",
                f"{r.v_bytes_per_token:.0f}",
                f"{r.kv_bytes_per_token:.0f}",
                f"{r.v_reduction_pct:.1f}",
                f"{r.kv_reduction_pct:.1f}",
                f"{r.measured_cache_bytes}",
                f"{r.seconds:.1f}",
            )
        )
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))  # noqa: E731
    out = [title] if title else []
    out += [fmt(head), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    return "\n".join(out)


def _close(x1: float, y1: float, x2: float, y2: float, xs: Sequence[float], ys: Sequence[float]) -> bool:
    """Within 5 % of the axis spans of each other (y on a log scale when all positive)."""
    span_x = (max(xs) - min(xs)) or 1.0
    logy = all(v > 0 and math.isfinite(v) for v in ys)
    f = (lambda v: math.log(v)) if logy else (lambda v: v)
    span_y = (max(map(f, ys)) - min(map(f, ys))) or 1.0
    return abs(x1 - x2) / span_x < 0.05 and abs(f(y1) - f(y2)) / span_y < 0.05


def plot_frontier(path: str | os.PathLike, rows: Sequence[EvalRow], title: str = "") -> None:
    """PNG: perplexity (log scale) vs total KV bytes per token, one labelled point per row. Atomic."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        raise KVSpliceError("plot_frontier needs at least one row")
    fig, ax = plt.subplots(figsize=(7.5, 5.0), dpi=120)
    try:
        xs = [r.kv_bytes_per_token for r in rows]
        ys = [r.ppl for r in rows]
        ax.axhline(ys[0], color="grey", lw=0.8, ls="--", zorder=1, label=f"{rows[0].name} (first row)")
        # one colour per family (the name without a trailing "-<number>": pca-16, pca-32 -> pca)
        families = [re.sub(r"-\d+$", "", r.name) for r in rows]
        palette = dict(zip(dict.fromkeys(families), plt.rcParams["axes.prop_cycle"].by_key()["color"] * 4))
        for fam in dict.fromkeys(families):
            pts = [(x, y) for x, y, f in zip(xs, ys, families) if f == fam]
            ax.scatter(*zip(*pts), s=28, color=palette[fam], zorder=3, label=fam if families.count(fam) > 1 else None)
        ax.legend(loc="best", fontsize=8)
        for i, (r, x, y) in enumerate(zip(rows, xs, ys)):
            # label above the point, or below when a close neighbour lies above it (keeps pairs legible)
            below = any(_close(x, y, x2, y2, xs, ys) and y2 > y for j, (x2, y2) in enumerate(zip(xs, ys)) if j != i)
            ax.annotate(r.name, (x, y), textcoords="offset points", xytext=(5, -11 if below else 4), fontsize=8)
        ax.set_xlabel("total KV cache bytes per token (K + V, all layers, measured)")
        ax.set_ylabel("perplexity (log scale)")
        if all(y > 0 and math.isfinite(y) for y in ys):
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        save_png(fig, path)
    finally:
        plt.close(fig)
