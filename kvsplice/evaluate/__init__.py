"""Evaluation: perplexity protocols (perplexity.py), tables / JSON / plots (report.py), the
inference ablation runner (ablation.py)."""

import importlib

# name -> submodule, resolved on first use (PEP 562): importing a light submodule of this package
# (e.g. stats, or a task table for `kvsplice --help`) must not import torch through perplexity.py
_LAZY = {
    **dict.fromkeys(["PROTOCOLS", "ROW_FIELDS", "EvalRow", "ProtocolError", "evaluate", "measure_cache",
                     "perplexity_prefill_continue", "perplexity_teacher_forced"], "perplexity"),
    **dict.fromkeys(["format_table", "plot_frontier", "result_dict", "validate_result", "write_json"], "report"),
}


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f"kvsplice.evaluate.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'kvsplice.evaluate' has no attribute {name!r}")


__all__ = [
    "PROTOCOLS",
    "ROW_FIELDS",
    "EvalRow",
    "ProtocolError",
    "evaluate",
    "format_table",
    "measure_cache",
    "perplexity_prefill_continue",
    "perplexity_teacher_forced",
    "plot_frontier",
    "result_dict",
    "validate_result",
    "write_json",
]
