"""Text for calibration and evaluation, and turning it into token windows.

Default corpus: CPython's ``pydoc_data.topics`` (the ``topics`` dict behind ``help("if")``:
79 topics, ~465 KB of English technical prose in Python 3.11; the content follows the
interpreter's version, which the descriptions below record).

The fixed, disjoint split (``split_topics``):

1. Topics are taken in sorted name order. Each topic is cut into paragraphs (blocks separated by
   a blank line); a paragraph whose stripped text already occurred in an earlier topic is dropped.
   pydoc repeats whole sections (e.g. ``specialnames`` contains ``customization`` and
   ``attribute-access``, ``compound`` contains ``if``/``for``/``try``...), so without this step a
   topic-level split would put the same paragraphs on both sides. After it, every paragraph occurs
   once in the corpus (~373 KB).
2. A topic goes to the EVALUATION split when ``int(sha256(name).hexdigest(), 16) % 10 < 3``,
   else to CALIBRATION (stable across runs and machines; independent of PYTHONHASHSEED).
3. Each split is its topics joined by a blank line, in sorted name order.

On Python 3.11.7 this gives 57 calibration topics (290,146 chars, 70,310 SmolLM2 tokens) and 22
evaluation topics (82,956 chars, 20,510 SmolLM2 tokens), no paragraph in common.

Tokenisation (`tokenize`) encodes one long stream without special tokens (no BOS): windows are
slices of the stream, as in the seed's training / perplexity setup. A model whose tokenizer prepends
a BOS by default (Gemma: without it, perplexity 38.5 instead of 16.1) gets one at the start of every
window: `with_bos(ids, length, bos_id(tokenizer))`.
"""

from __future__ import annotations

import functools
import hashlib
import sys
from pathlib import Path

import torch

from kvsplice.errors import KVSpliceError

DEFAULT_CORPUS = "pydoc_data.topics"
EVAL_BUCKETS = 3  # of 10: the evaluation share of topics (by name hash)


def _is_eval_topic(name: str) -> bool:
    return int(hashlib.sha256(name.encode("utf-8")).hexdigest(), 16) % 10 < EVAL_BUCKETS


@functools.lru_cache(maxsize=1)
def split_topics() -> tuple[dict[str, str], dict[str, str]]:
    """(calibration, evaluation): topic name -> deduplicated topic text. See module docstring."""
    from pydoc_data.topics import topics

    seen: set[str] = set()
    cal: dict[str, str] = {}
    ev: dict[str, str] = {}
    for name in sorted(topics):
        kept = []
        for para in topics[name].split("\n\n"):
            key = para.strip()
            if not key or key in seen:
                continue
            seen.add(key)
            kept.append(para.strip("\n"))
        if kept:
            (ev if _is_eval_topic(name) else cal)[name] = "\n\n".join(kept)
    return cal, ev


def calibration_text() -> str:
    """The calibration split of the default corpus (disjoint from `evaluation_text`)."""
    return "\n\n".join(split_topics()[0].values())


def evaluation_text() -> str:
    """The evaluation split of the default corpus (disjoint from `calibration_text`)."""
    return "\n\n".join(split_topics()[1].values())


def describe_default(split: str) -> str:
    """One line naming the corpus, split, interpreter version and size (for result metadata)."""
    if split not in ("calibration", "evaluation"):
        raise KVSpliceError(f"split must be 'calibration' or 'evaluation', got {split!r}")
    part = split_topics()[0 if split == "calibration" else 1]
    n_chars = sum(len(t) for t in part.values()) + 2 * max(len(part) - 1, 0)
    v = sys.version_info
    return (
        f"{DEFAULT_CORPUS} (Python {v.major}.{v.minor}.{v.micro}) {split} split: "
        f"{len(part)} topics, {n_chars} chars (sha256(name) % 10 < {EVAL_BUCKETS} -> evaluation; paragraphs deduplicated)"
    )


def load_texts(paths: list[str]) -> str:
    """Read UTF-8 text files (joined by a blank line, in the given order).

    An entry ``hf:DATASET[:CONFIG][@SPLIT]`` reads a hub dataset's ``text`` column instead
    (needs the optional ``datasets`` extra and a reachable hub), e.g. ``hf:wikitext:wikitext-2-raw-v1@test``.
    """
    if isinstance(paths, (str, Path)):
        paths = [str(paths)]
    if not paths:
        raise KVSpliceError("load_texts expects at least one path, got none")
    parts = []
    for p in paths:
        if str(p).startswith("hf:"):
            parts.append(load_hub_text(str(p)[3:]))
            continue
        path = Path(p).expanduser()
        if not path.is_file():
            raise KVSpliceError(f"text file {str(path)!r} not found (expected a readable UTF-8 text file)")
        try:
            parts.append(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as e:
            raise KVSpliceError(f"text file {str(path)!r} is not valid UTF-8: {e}") from e
    text = "\n\n".join(parts)
    if not text.strip():
        raise KVSpliceError(f"the text files {list(map(str, paths))} contain no text")
    return text


def load_hub_text(spec: str, column: str = "text") -> str:
    """``DATASET[:CONFIG][@SPLIT]`` (split defaults to ``train``) -> the column's rows joined by newlines."""
    try:
        import datasets  # optional extra: pip install 'kvsplice[datasets]'
    except ImportError as e:
        raise KVSpliceError(
            f"reading hub corpus {spec!r} needs the optional 'datasets' package (pip install 'kvsplice[datasets]'), "
            "found it not installed"
        ) from e
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    try:
        ds = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as e:  # network / hub errors come in many types
        raise KVSpliceError(f"could not load hub dataset {spec!r} (is the hub reachable?): {type(e).__name__}: {e}") from e
    if column not in ds.column_names:
        raise KVSpliceError(f"hub dataset {spec!r} has no column {column!r}; found {ds.column_names}")
    return "\n".join(r for r in ds[column] if r)


def tokenize(tokenizer, text: str) -> torch.LongTensor:
    """Encode `text` as one stream of token ids (N,), int64, without special tokens."""
    if not isinstance(text, str) or not text:
        raise KVSpliceError(f"tokenize expects a non-empty str, got {type(text).__name__} of length {len(text or '')}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def bos_id(tokenizer) -> int | None:
    """The tokenizer's BOS id when it prepends one by default (Gemma: ``tok("a").input_ids[0] == bos``),
    else None (SmolLM2 / GPT-2 add nothing: their windows stay plain slices of the stream)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    first = tokenizer("a", verbose=False)["input_ids"]
    return int(bos) if first and first[0] == bos else None


def refuse_bos_tokenizer(tokenizer, what: str) -> None:
    """KVSpliceError when the tokenizer adds a BOS by default: `what` builds its windows from the plain
    stream, and a model such as Gemma 3 scored without <bos> gives numbers 2-3x off (16.1 vs 38.5)."""
    if bos_id(tokenizer) is not None:
        raise KVSpliceError(f"{what} builds its windows without a BOS token, and this tokenizer adds one by default "
                            "(e.g. Gemma 3); use `kvsplice eval` or `kvsplice frontier --suite`, which put BOS first")


def with_bos(ids: torch.Tensor, length: int, bos: int | None) -> torch.LongTensor:
    """A stream (N,) re-cut so that every non-overlapping `length`-token window starts with `bos`:
    [bos, t0 .. t_{length-2}, bos, t_{length-1} ..] (the text is kept whole, in order). bos None: ids
    unchanged. The BOS row is context only: it is position 0 of its window, which no protocol scores."""
    if bos is None:
        return ids
    if not isinstance(length, int) or length < 2:
        raise KVSpliceError(f"a window with a BOS needs length >= 2, got {length!r}")
    chunks = ids.split(length - 1)
    head = torch.full((1,), bos, dtype=ids.dtype, device=ids.device)
    return torch.cat([t for c in chunks for t in (head, c)])


def windows(
    ids: torch.Tensor, length: int, stride: int | None = None, max_windows: int | None = None
) -> list[torch.LongTensor]:
    """Slice a stream ids (N,) into windows of `length` tokens starting every `stride` tokens
    (default: `length`, non-overlapping). Only full windows are returned, except that a stream
    shorter than `length` gives one window of all N tokens. At most `max_windows` windows."""
    if not isinstance(ids, torch.Tensor) or ids.ndim != 1:
        raise KVSpliceError(f"windows expects a 1-D tensor of token ids (N,), got {getattr(ids, 'shape', type(ids))}")
    if not isinstance(length, int) or length < 1:
        raise KVSpliceError(f"window length must be a positive int, got {length!r}")
    stride = length if stride is None else stride
    if not isinstance(stride, int) or stride < 1:
        raise KVSpliceError(f"window stride must be a positive int, got {stride!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise KVSpliceError(f"max_windows must be a positive int or None, got {max_windows!r}")
    n = ids.shape[0]
    if n == 0:
        return []
    if n < length:
        out = [ids]
    else:
        out = [ids[s : s + length] for s in range(0, n - length + 1, stride)]
    return out[:max_windows] if max_windows is not None else out
