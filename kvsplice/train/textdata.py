"""Training text, its train / validation split, the tokenizer, and batches.

Text: `kvsplice.data.calibration_text()` (the calibration split of pydoc_data.topics) unless
`data` names files. The evaluation split of the default corpus is never read by the trainer, so a
trained checkpoint can be calibrated and evaluated by the package's pipeline on unseen text.

Split: the last `val_fraction` of the characters (cut at the first line break after the cut point)
is validation; the rest is training. The tokenizer is trained on the training part only.

Tokenizer: a byte-level BPE (`tokenizers`, GPT-2 style pre-tokenisation, one special token
"<|endoftext|>" = id 0) trained on the training split, vocab `vocab_size` (default 2048-4096).
Why not SmolLM2's 49k-entry tokenizer: at n_embd 128-256 its embedding + logits would be 49k x C
parameters and FLOPs per token, several times the whole transformer, and most entries would never
occur in ~300 KB of text. A small BPE keeps the step time in the transformer and is deterministic
(same text + vocab size -> same merges; checked in the tests).

Batches: windows of block_size + 1 tokens at uniformly random starts (a seeded torch.Generator
whose state is checkpointed). Validation: the first eval_batches * batch_size non-overlapping
windows of the validation stream, always the same.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from kvsplice.errors import KVSpliceError

EOT = "<|endoftext|>"


def load_training_text(paths: list[str]) -> tuple[str, str]:
    """-> (text, description)."""
    from kvsplice import data

    if paths:
        return data.load_texts(paths), f"files {list(paths)}"
    return data.calibration_text(), data.describe_default("calibration")


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): val = the tail after the first line break at or past (1 - val_fraction) * len."""
    cut = int(len(text) * (1.0 - val_fraction))
    nl = text.find("\n", cut)
    cut = nl + 1 if nl != -1 else cut
    train, val = text[:cut], text[cut:]
    if not train.strip() or not val.strip():
        raise KVSpliceError(f"text of {len(text)} chars is too short to split with val_fraction={val_fraction}")
    return train, val


def train_bpe(text: str, vocab_size: int):
    """Byte-level BPE `tokenizers.Tokenizer` trained on `text` (deterministic)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # chunk by paragraph so the pre-tokeniser sees realistic units; order is fixed
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return tok


def hf_tokenizer(tok):
    """Wrap a `tokenizers.Tokenizer` as a transformers PreTrainedTokenizerFast."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT, bos_token=EOT, model_max_length=1 << 20)


def encode(tok, text: str) -> torch.Tensor:
    """One long stream (N,) int64, no special tokens."""
    return torch.tensor(tok.encode(text, add_special_tokens=False).ids, dtype=torch.long)


@dataclass
class Corpus:
    train_ids: torch.Tensor  # (N_train,)
    val_ids: torch.Tensor  # (N_val,)
    tokenizer: object  # tokenizers.Tokenizer
    description: str
    text_sha256: str

    def summary(self) -> dict:
        return {"text": self.description, "text_sha256": self.text_sha256,
                "train_tokens": int(self.train_ids.numel()), "val_tokens": int(self.val_ids.numel()),
                "tokenizer": f"byte-level BPE, vocab {self.tokenizer.get_vocab_size()}, trained on the train split"}


_CACHE: dict[tuple, Corpus] = {}


def build_corpus(paths: list[str], val_fraction: float, vocab_size: int, tokenizer=None) -> Corpus:
    """Text -> split -> BPE (trained on train, unless `tokenizer` is given, e.g. on resume) -> ids.
    Memoised per (paths, val_fraction, vocab_size) when the tokenizer is trained here."""
    key = (tuple(paths), val_fraction, vocab_size)
    if tokenizer is None and key in _CACHE:
        return _CACHE[key]
    text, desc = load_training_text(paths)
    train, val = split_text(text, val_fraction)
    tok = tokenizer if tokenizer is not None else train_bpe(train, vocab_size)
    if tok.get_vocab_size() > vocab_size:
        raise KVSpliceError(f"tokenizer has {tok.get_vocab_size()} entries, model vocab_size is {vocab_size}")
    corpus = Corpus(encode(tok, train), encode(tok, val), tok, desc, hashlib.sha256(text.encode()).hexdigest())
    if tokenizer is None:
        _CACHE[key] = corpus
    return corpus


def check_lengths(corpus: Corpus, block_size: int, n_val_windows: int) -> int:
    """Validate stream lengths; returns the number of validation windows available (<= requested)."""
    if corpus.train_ids.numel() < block_size + 2:
        raise KVSpliceError(f"training split has {corpus.train_ids.numel()} tokens, need > block_size+1={block_size + 1}")
    avail = (corpus.val_ids.numel() - 1) // block_size
    if avail < 1:
        raise KVSpliceError(f"validation split has {corpus.val_ids.numel()} tokens, need > block_size+1={block_size + 1}")
    return min(avail, n_val_windows)


def random_batch(ids: torch.Tensor, batch_size: int, block_size: int, gen: torch.Generator):
    """-> x, y (B, T) int64: windows at random starts, y shifted by one token."""
    starts = torch.randint(0, ids.numel() - block_size - 1, (batch_size,), generator=gen)
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x, y


def val_batches(ids: torch.Tensor, n_windows: int, batch_size: int, block_size: int):
    """The fixed validation windows, in batches: list of (x, y) each (b, T)."""
    xs = [ids[i * block_size : i * block_size + block_size] for i in range(n_windows)]
    ys = [ids[i * block_size + 1 : i * block_size + 1 + block_size] for i in range(n_windows)]
    return [(torch.stack(xs[i : i + batch_size]), torch.stack(ys[i : i + batch_size])) for i in range(0, n_windows, batch_size)]
