"""The default corpus split, text loading, tokenisation and windows."""

from __future__ import annotations

import hashlib
import importlib.util

import pytest
import torch

from kvsplice import data
from kvsplice.errors import KVSpliceError


def _paragraphs(text: str) -> set[str]:
    return {p.strip() for p in text.split("\n\n") if p.strip()}


def test_default_split_is_disjoint_and_covers_the_corpus():
    from pydoc_data.topics import topics

    cal, ev = data.split_topics()
    assert set(cal).isdisjoint(ev)
    assert set(cal) | set(ev) <= set(topics) and len(set(cal) | set(ev)) >= len(topics) - 2
    assert all(int(hashlib.sha256(n.encode()).hexdigest(), 16) % 10 < 3 for n in ev)
    assert all(int(hashlib.sha256(n.encode()).hexdigest(), 16) % 10 >= 3 for n in cal)
    ct, et = data.calibration_text(), data.evaluation_text()
    assert _paragraphs(ct).isdisjoint(_paragraphs(et))  # pydoc repeats sections: dedup must hold
    assert len(ct) > 2 * len(et) > 100_000  # ~290 KB / ~83 KB on Python 3.11
    # every paragraph of the original corpus survives on exactly one side
    assert set().union(*(_paragraphs(t) for t in topics.values())) == _paragraphs(ct) | _paragraphs(et)
    # a topic that pydoc copies into another one lands on one side only
    assert "customization" in cal or "customization" in ev
    assert "Basic customization" in ct or "Basic customization" in et


def test_default_split_is_deterministic():
    a = (data.calibration_text(), data.evaluation_text())
    data.split_topics.cache_clear()
    b = (data.calibration_text(), data.evaluation_text())
    assert a == b
    import sys

    desc = data.describe_default("calibration")
    assert f"calibration split: {len(data.split_topics()[0])} topics" in desc
    assert f"Python {sys.version_info.major}.{sys.version_info.minor}" in desc
    with pytest.raises(KVSpliceError, match="split"):
        data.describe_default("train")


def test_load_texts(tmp_path):
    (tmp_path / "a.txt").write_text("alpha", encoding="utf-8")
    (tmp_path / "b.txt").write_text("bêta", encoding="utf-8")
    assert data.load_texts([str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]) == "alpha\n\nbêta"
    with pytest.raises(KVSpliceError, match="not found"):
        data.load_texts([str(tmp_path / "missing.txt")])
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(KVSpliceError, match="UTF-8"):
        data.load_texts([str(tmp_path / "bin.txt")])
    (tmp_path / "blank.txt").write_text("  \n", encoding="utf-8")
    with pytest.raises(KVSpliceError, match="no text"):
        data.load_texts([str(tmp_path / "blank.txt")])
    with pytest.raises(KVSpliceError, match="at least one"):
        data.load_texts([])


@pytest.mark.skipif(importlib.util.find_spec("datasets") is not None, reason="datasets is installed")
def test_hub_corpus_without_datasets_is_a_clear_error():
    with pytest.raises(KVSpliceError, match="datasets"):
        data.load_texts(["hf:wikitext:wikitext-2-raw-v1@test"])


def test_tokenize(byte_tokenizer):
    ids = data.tokenize(byte_tokenizer, "héllo\n")
    assert ids.dtype == torch.long and ids.shape == (len("héllo\n".encode()),)  # one token per byte, no BOS
    assert byte_tokenizer.decode(ids.tolist()) == "héllo\n"
    with pytest.raises(KVSpliceError, match="non-empty str"):
        data.tokenize(byte_tokenizer, "")


def test_windows():
    ids = torch.arange(10)
    w = data.windows(ids, 4)
    assert [t.tolist() for t in w] == [[0, 1, 2, 3], [4, 5, 6, 7]]  # full windows only
    assert [t[0].item() for t in data.windows(ids, 4, stride=2)] == [0, 2, 4, 6]
    assert len(data.windows(ids, 4, stride=1, max_windows=3)) == 3
    assert [t.tolist() for t in data.windows(ids[:3], 4)] == [[0, 1, 2]]  # short stream: one short window
    assert data.windows(ids[:0], 4) == []
    for bad in (dict(length=0), dict(length=4, stride=0), dict(length=4, max_windows=0)):
        with pytest.raises(KVSpliceError):
            data.windows(ids, **bad)
    with pytest.raises(KVSpliceError, match="1-D"):
        data.windows(ids.view(2, 5), 4)
