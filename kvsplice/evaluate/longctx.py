"""Long-context retrieval through a compressed KV cache: passkey and multi-key needle-in-a-haystack.

Tasks are generated offline, in token space, from the EVALUATION split of the default corpus
(kvsplice/data.py; never vendored text). One trial = one context (prefilled once, in chunks of
`chunk` tokens, through the method's cache) and one or more queries (question -> greedy answer):

    passkey   context = head + haystack with ONE needle
              "The pass key is 71432. Remember it. 71432 is the pass key." at depth d;
              query "What is the pass key? The pass key is" -> the 5 digits.
              Trial i uses depth depths[i % len(depths)].
    multikey  context = head + haystack with len(depths) needles "The magic number for <key> is <value>."
              (distinct keys, one per depth, in depth order); one query per needle, each on a copy of
              the cache after the context (prefill once per haystack): answers = trials * len(depths).

Length L: context + query + answer fit in L tokens: the context is L - RESERVE tokens (RESERVE covers
the longest question and `max_new` answer tokens; checked). Depth d: the needle's first token sits at
haystack offset round(d * (H - n)) (H: haystack tokens, n: needle tokens), i.e. context position
len(head) + that offset. The filler is a contiguous slice of the evaluation token stream at a
seeded offset, cut at the needle positions. Every trial is seeded by (seed, task, length, index)
through `random.Random(str)` (sha512 seeding: the same on every machine and PYTHONHASHSEED).

Prompt formats: "plain" (the text as is) and "chat" (the tokenizer's chat template around the user
turn; the answer prefix follows the assistant header). Score: the first run of digits in the greedy
continuation (<= max_new tokens) equals the needle's value exactly.

Statistics: accuracy with a Wilson 95 % interval over answers (multikey answers of one haystack are
not independent: its interval is optimistic). Bytes: `cache.memory()` (DynamicCache: K + V nbytes)
after each query, as bits per cached K/V value HELD = the dtype's bits * bytes / the bytes an uncompressed
cache holds for the same rows (= 8 * bytes / (tokens * 2 * layers * KV heads * head_dim) without sliding layers).
The runner (`run_longctx`) lives in kvsplice/evaluate/longctx_run.py.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from kvsplice.errors import KVSpliceError

TASKS = ("passkey", "multikey")
FORMATS = ("plain", "chat")
RESERVE = 96  # tokens kept free after the context for the question and the answer
KEYS = ("apple", "river", "candle", "mirror", "garden", "violin", "rocket", "pepper", "harbor", "lantern",
        "meadow", "copper", "falcon", "orchid", "glacier", "saddle", "thimble", "walnut", "compass", "velvet")
HEAD = {"passkey": "There is a pass key hidden in the text below. Find it and remember it.\n\n",
        "multikey": "Several magic numbers are hidden in the text below. Find them and remember them.\n\n"}


class LongCtxError(KVSpliceError):
    """Bad long-context task parameters (length, depth, format) or a model the task cannot fit."""


@dataclass
class TaskSpec:
    """Everything that defines the generated tasks (saved with the results).

    tasks: subset of TASKS; lengths: tokens per sequence (context + question + answer <= length);
    depths: needle depths in [0, 1]; trials: contexts per (task, length); seed: base seed;
    prompt: "plain" | "chat"; chunk: prefill chunk (tokens per forward); max_new: answer tokens."""

    tasks: list[str] = field(default_factory=lambda: list(TASKS))
    lengths: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 8192])
    depths: list[float] = field(default_factory=lambda: [0.1, 0.5, 0.9])
    trials: int = 10
    seed: int = 0
    prompt: str = "plain"
    chunk: int = 512
    max_new: int = 8

    def __post_init__(self) -> None:
        def fail(msg: str) -> None:
            raise LongCtxError(msg)

        if not self.tasks or any(t not in TASKS for t in self.tasks):
            fail(f"tasks must be a non-empty subset of {TASKS}, got {self.tasks!r}")
        if not self.lengths or any(isinstance(n, bool) or not isinstance(n, int) or n <= RESERVE for n in self.lengths):
            fail(f"lengths must be ints > {RESERVE}, got {self.lengths!r}")
        if not self.depths or any(not isinstance(d, (int, float)) or not 0.0 <= d <= 1.0 for d in self.depths):
            fail(f"depths must be numbers in [0, 1], got {self.depths!r}")
        if len(self.depths) > len(KEYS):
            fail(f"at most {len(KEYS)} depths (one key per needle), got {len(self.depths)}")
        for k in ("trials", "chunk", "max_new"):
            v = getattr(self, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                fail(f"{k} must be a positive int, got {v!r}")
        if self.prompt not in FORMATS:
            fail(f"prompt must be one of {FORMATS}, got {self.prompt!r}")
        self.depths = [float(d) for d in self.depths]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Query:
    """One question about a context: ids (Q,) int64 fed after the context; answer: the digits
    expected; depth: the needle's requested depth; needle_pos: its first token's context position."""

    ids: torch.Tensor
    answer: str
    depth: float
    needle_pos: int
    needle_len: int


@dataclass
class Trial:
    """context: (T,) int64 token ids (prefilled once); queries: asked one by one after it."""

    task: str
    length: int
    index: int
    context: torch.Tensor
    queries: list[Query]


def _enc(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def prompt_parts(tokenizer: Any, prompt: str) -> tuple[str, str]:
    """(before, after) the user text: ("", "") for plain; the chat template's text around the user
    turn (generation prompt included) for chat; LongCtxError when the tokenizer has no template."""
    if prompt == "plain":
        return "", ""
    if not getattr(tokenizer, "chat_template", None):
        raise LongCtxError(f"prompt 'chat' needs a tokenizer with a chat template; {type(tokenizer).__name__} has none")
    mark = "\x00USER\x00"
    text = tokenizer.apply_chat_template([{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True)
    if text.count(mark) != 1:
        raise LongCtxError("the chat template does not contain the user text exactly once")
    before, after = text.split(mark)
    return before, after


def make_trial(tokenizer: Any, stream: torch.Tensor, spec: TaskSpec, task: str, length: int, index: int) -> Trial:
    """Generate trial `index` of (task, length) from the evaluation token stream (N,) (module docstring)."""
    if task not in TASKS:
        raise LongCtxError(f"task must be one of {TASKS}, got {task!r}")
    rng = random.Random(f"{spec.seed}:{task}:{length}:{index}")
    from kvsplice.data import bos_id

    before, after = prompt_parts(tokenizer, spec.prompt)
    bos = bos_id(tokenizer)  # Gemma 3 adds <bos> by default: the context starts with it, as in the model's training
    head = ([] if bos is None else [bos]) + _enc(tokenizer, before + HEAD[task])
    if task == "passkey":
        depths = [spec.depths[index % len(spec.depths)]]
        values = [str(rng.randint(10000, 99999))]
        needles = [_enc(tokenizer, f"\nThe pass key is {values[0]}. Remember it. {values[0]} is the pass key.\n")]
        questions = [_enc(tokenizer, "\n\nWhat is the pass key?" + after + " The pass key is")]
    else:
        depths = sorted(spec.depths)
        keys = rng.sample(KEYS, len(depths))
        values = [str(rng.randint(10000, 99999)) for _ in depths]
        needles = [_enc(tokenizer, f"\nThe magic number for {k} is {v}.\n") for k, v in zip(keys, values)]
        questions = [_enc(tokenizer, f"\n\nWhat is the magic number for {k}?" + after + f" The magic number for {k} is")
                     for k in keys]
    longest = max(len(q) for q in questions)
    if longest + spec.max_new > RESERVE:
        raise LongCtxError(f"question ({longest} tokens) + max_new ({spec.max_new}) exceed the {RESERVE} reserved tokens")
    H = length - RESERVE - len(head)  # haystack tokens: filler + needles
    filler_len = H - sum(len(n) for n in needles)
    if filler_len < 1:
        raise LongCtxError(f"length {length} leaves no filler for task {task!r} (head {len(head)}, needles "
                           f"{sum(len(n) for n in needles)}, reserve {RESERVE} tokens)")
    if filler_len > stream.shape[0]:
        raise LongCtxError(f"length {length} needs {filler_len} filler tokens; the evaluation text has {stream.shape[0]}")
    start = rng.randint(0, stream.shape[0] - filler_len)
    filler = stream[start : start + filler_len].tolist()
    # haystack offsets of the needles, in depth order, then cut the filler there
    offsets = [round(d * (H - len(n))) for d, n in zip(depths, needles)]
    for i in range(1, len(offsets)):
        if offsets[i] < offsets[i - 1] + len(needles[i - 1]):
            raise LongCtxError(f"needles at depths {depths} overlap at length {length}; use fewer depths or a longer length")
    hay, used = [], 0
    for off, n in zip(offsets, needles):
        cut = off - len(hay)  # filler tokens between the previous needle and this one
        hay += filler[used : used + cut] + n
        used += cut
    hay += filler[used:]
    context = torch.tensor(head + hay, dtype=torch.long)
    queries = [Query(torch.tensor(q, dtype=torch.long), v, d, len(head) + off, len(n))
               for q, v, d, off, n in zip(questions, values, depths, offsets, needles)]
    return Trial(task, length, index, context, queries)


def make_trials(tokenizer: Any, stream: torch.Tensor, spec: TaskSpec, task: str, length: int) -> list[Trial]:
    return [make_trial(tokenizer, stream, spec, task, length, i) for i in range(spec.trials)]


_DIGITS = re.compile(r"\d+")


def first_number(text: str) -> str | None:
    """The first run of ASCII digits in `text` (None when there is none)."""
    m = _DIGITS.search(text)
    return m.group(0) if m else None


def score(output: str, answer: str) -> bool:
    """Exact match: the first digit run of the generated text equals the answer's digits."""
    return first_number(output) == answer


def wilson(k: int, n: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval (95 % by default) for k successes in n trials; (0, 1) when n = 0."""
    if n == 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise LongCtxError(f"wilson: need 0 <= k <= n, got k={k}, n={n}")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    lo, hi = max(0.0, mid - half), min(1.0, mid + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)  # exact ends (no rounding residue)


def _forward(model: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
    """Feed ids (T,) through `cache`; -> last position's logits (V,)."""
    return model(input_ids=ids[None], cache=cache, use_cache=True, logits_to_keep=1).logits[0, -1]


def prefill(model: Any, context: torch.Tensor, cache: Any, chunk: int) -> None:
    """Feed the context (T,) through `cache`, `chunk` tokens per forward (eviction selects after each)."""
    device = next(model.parameters()).device
    with torch.no_grad():
        for s in range(0, context.shape[0], chunk):
            model(input_ids=context[None, s : s + chunk].to(device), cache=cache, use_cache=True, logits_to_keep=1)
    if cache.get_seq_length() < context.shape[0]:
        raise LongCtxError(f"the model did not write to the cache it was given ({cache.get_seq_length()} of "
                           f"{context.shape[0]} tokens held)")


def answer(model: Any, tokenizer: Any, question: torch.Tensor, cache: Any, max_new: int) -> str:
    """Greedy answer to `question` (Q,) read through `cache` (already holding the context): at most
    `max_new` tokens, stopping once a digit run is followed by a non-digit."""
    device = next(model.parameters()).device
    out: list[int] = []
    with torch.no_grad():
        logits = _forward(model, question.to(device), cache)
        for _ in range(max_new):
            nxt = int(logits.argmax())
            if nxt == tokenizer.eos_token_id:
                break
            out.append(nxt)
            if re.search(r"\d\D", tokenizer.decode(out)):
                break
            logits = _forward(model, torch.tensor([nxt], device=device), cache)
    return tokenizer.decode(out)
