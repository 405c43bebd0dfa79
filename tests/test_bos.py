"""BOS at the start of every evaluation / calibration window when the tokenizer adds one by default
(Gemma: perplexity 38.5 without it, 16.1 with it); tokenizers that add none (SmolLM2, GPT-2, the
test byte tokenizer) keep plain slices of the stream. The BOS is context only: never a target."""

from __future__ import annotations

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama

from kvsplice.calibrate import CalibrationConfig, calibrate
from kvsplice.data import bos_id, tokenize, windows, with_bos
from kvsplice.errors import KVSpliceError
from kvsplice.evaluate.perplexity import perplexity_teacher_forced
from kvsplice.loading import cache_root

BOS = 1


def _bos_tokenizer():
    """The byte tokenizer, but prepending <bos> by default, as Gemma's does."""
    from tokenizers import processors

    tok = make_byte_tokenizer()
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return tok


def test_bos_id_only_when_the_tokenizer_adds_one():
    assert bos_id(make_byte_tokenizer()) is None  # has a <bos> token, but does not add it
    tok = _bos_tokenizer()
    assert tok("a")["input_ids"][0] == BOS and bos_id(tok) == BOS


def test_with_bos_starts_every_window_and_keeps_the_text():
    ids = torch.arange(10, 30)  # (20,)
    s = with_bos(ids, 8, BOS)
    wins = windows(s, 8)
    assert all(int(w[0]) == BOS for w in wins)
    assert torch.equal(s[s != BOS], ids)  # the text whole, in order
    assert with_bos(ids, 8, None) is ids  # no BOS: unchanged (SmolLM2's numbers stay as they were)
    with pytest.raises(KVSpliceError, match="length >= 2"):
        with_bos(ids, 1, BOS)


def test_bos_is_never_scored():
    model = make_tiny_llama()
    stream = with_bos(torch.randint(3, 200, (40,), generator=torch.Generator().manual_seed(0)), 10, BOS)
    seen = []

    def scorer(logits, targets):
        seen.append(targets)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="none")

    from transformers import DynamicCache

    row = perplexity_teacher_forced(model, stream, lambda: DynamicCache(config=model.config), window=10, scorer=scorer)
    assert row.tokens == 4 * 9  # 4 windows of [BOS + 9 tokens]: 9 targets each
    assert not any(bool((t == BOS).any()) for t in seen)


def test_calibration_windows_start_with_bos():
    model = make_tiny_llama()
    firsts = []
    h = model.model.embed_tokens.register_forward_pre_hook(lambda m, a: firsts.append(a[0][:, 0].tolist()))
    cfg = CalibrationConfig(codec="pca", rank=2, target="v", seq_len=32, max_batches=2, samples=200)
    try:
        calibrate(model, _bos_tokenizer(), "def add(a, b):\n    return a + b\n" * 6, cfg, progress=False)
    finally:
        h.remove()
    assert firsts and all(f == BOS for batch in firsts for f in batch)


@pytest.mark.real
@pytest.mark.parametrize("name, expected", [("smollm2-135m", None), ("gemma3-270m", 2)])
def test_real_tokenizers(name, expected):
    """SmolLM2's tokenizer adds no BOS (its windows, and numbers, are unchanged); Gemma's adds <bos> (2)."""
    from transformers import AutoTokenizer

    folder = cache_root() / name
    if not (folder / "tokenizer.json").is_file():
        pytest.skip(f"{name} is not cached in {cache_root()} (`make setup` / `make models`)")
    tok = AutoTokenizer.from_pretrained(folder)
    assert bos_id(tok) == expected
    ids = tokenize(tok, "def f(x):\n    return x")
    assert (with_bos(ids, 8, bos_id(tok)) is ids) == (expected is None)


def test_eval_cli_puts_bos_first_in_every_window(tmp_path):
    import json

    from transformers import AutoTokenizer, DynamicCache

    from kvsplice.cli import main

    model, tok = make_tiny_llama(), _bos_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    out = tmp_path / "e.json"
    argv = ["eval", "--model", str(tmp_path / "m"), "--data", str(text), "--protocol", "teacher-forced",
            "--tf-window", "64", "--max-windows", "2", "--json", str(out)]
    assert main(argv) == 0
    got = json.loads(out.read_text())["rows"][0]["ppl"]
    ids = tokenize(AutoTokenizer.from_pretrained(tmp_path / "m"), text.read_text())

    def ppl(stream):
        return perplexity_teacher_forced(model, stream, lambda: DynamicCache(config=model.config), window=64,
                                         max_windows=2).ppl

    assert got == pytest.approx(ppl(with_bos(ids, 64, BOS)), rel=1e-5)
    assert got != pytest.approx(ppl(ids), rel=1e-5)  # the windows without BOS score differently
    assert main(argv + ["--stride", "32"]) == 2  # overlapping windows cannot all start with BOS: refused


def test_paths_without_bos_windows_refuse_a_bos_tokenizer(tmp_path):
    """Frontier grid, ablation and demo slice the plain stream: with a BOS-adding tokenizer
    (Gemma) they would report numbers 2-3x off, so they refuse instead of guessing."""
    from kvsplice.data import refuse_bos_tokenizer
    from kvsplice.evaluate.frontier import FrontierConfig, run_frontier
    from kvsplice.evaluate.longctx import TaskSpec
    from kvsplice.evaluate.longctx_run import run_longctx

    refuse_bos_tokenizer(make_byte_tokenizer(), "x")  # no BOS added: fine
    with pytest.raises(KVSpliceError, match="BOS"):
        refuse_bos_tokenizer(_bos_tokenizer(), "x")
    model = make_tiny_llama()
    with pytest.raises(KVSpliceError, match="frontier"):
        run_frontier(FrontierConfig.quick(), model=model, tokenizer=_bos_tokenizer(), log=lambda m: None, progress=False)


def test_longctx_puts_bos_first_in_every_context_and_the_perplexity_window():
    """kvsplice longctx on a BOS-adding tokenizer (Gemma 3): each trial's context starts with <bos> and
    keeps its length; the perplexity-after-prefill window starts with it too."""
    from kvsplice.data import evaluation_text, tokenize
    from kvsplice.evaluate import longctx_run
    from kvsplice.evaluate.longctx import TaskSpec, make_trial

    tok = _bos_tokenizer()
    stream = tokenize(tok, evaluation_text()[:20000])
    spec = TaskSpec(lengths=[800], trials=1)
    for task in ("passkey", "multikey"):
        t, plain = make_trial(tok, stream, spec, task, 800, 0), make_trial(make_byte_tokenizer(), stream, spec, task, 800, 0)
        assert int(t.context[0]) == BOS and int(plain.context[0]) != BOS
        assert t.context.shape == plain.context.shape  # the haystack gives the BOS its token
    seen = []
    real = longctx_run.ppl_after_prefill
    longctx_run.ppl_after_prefill = lambda model, stream, *a, **k: (seen.append(int(stream[0])), real(model, stream, *a, **k))[1]
    try:
        m = make_tiny_llama()
        m.config.max_position_embeddings = 1024
        longctx_run.run_longctx(m, tok, TaskSpec(lengths=[300], trials=1, tasks=["passkey"]), ["baseline"], out=None,
                                ppl_prefill=64, ppl_tokens=16)
    finally:
        longctx_run.ppl_after_prefill = real
    assert seen == [BOS]
