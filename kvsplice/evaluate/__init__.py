"""Evaluation: perplexity protocols (perplexity.py), tables / JSON / plots (report.py), the
inference ablation runner (ablation.py)."""

from kvsplice.evaluate.perplexity import (
    PROTOCOLS,
    ROW_FIELDS,
    EvalRow,
    ProtocolError,
    evaluate,
    measure_cache,
    perplexity_prefill_continue,
    perplexity_teacher_forced,
)
from kvsplice.evaluate.report import format_table, plot_frontier, result_dict, validate_result, write_json

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
