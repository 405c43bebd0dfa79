"""Long-context suite: task generation (deterministic, needle at the requested token depth), scoring,
Wilson interval, greedy answers through the cache, incremental JSON + resume, the CLI end to end."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_llama

from kvsplice.evaluate import longctx_run
from kvsplice.evaluate.longctx import (
    HEAD,
    RESERVE,
    LongCtxError,
    TaskSpec,
    answer,
    make_trial,
    prefill,
    score,
    wilson,
)

CAL = {"samples": 300, "max_batches": 2, "seq_len": 64, "epochs": 1}


@pytest.fixture
def stream():
    from kvsplice.data import evaluation_text, tokenize

    return tokenize(make_byte_tokenizer(), evaluation_text()[:20000])


def _llama():
    m = make_tiny_llama()
    m.config.max_position_embeddings = 1024  # RoPE is computed on the fly; lets the tasks be 400+ tokens
    return m


def test_trials_are_deterministic_and_differ_by_index(byte_tokenizer, stream):
    spec = TaskSpec(lengths=[400], trials=3)
    for task in ("passkey", "multikey"):
        a, b = make_trial(byte_tokenizer, stream, spec, task, 400, 1), make_trial(byte_tokenizer, stream, spec, task, 400, 1)
        assert torch.equal(a.context, b.context) and [q.answer for q in a.queries] == [q.answer for q in b.queries]
        assert all(torch.equal(x.ids, y.ids) for x, y in zip(a.queries, b.queries))
        c = make_trial(byte_tokenizer, stream, spec, task, 400, 2)
        assert not torch.equal(a.context, c.context)


@pytest.mark.parametrize("task,depths", [("passkey", [0.0, 0.5, 1.0]), ("multikey", [0.1, 0.5, 0.9])])
def test_needle_sits_at_the_requested_token_depth(byte_tokenizer, stream, task, depths):
    L = 500
    spec = TaskSpec(lengths=[L], depths=depths, trials=3)
    for i in range(3):
        tr = make_trial(byte_tokenizer, stream, spec, task, L, i)
        assert tr.context.shape[0] == L - RESERVE
        expected = [depths[i % 3]] if task == "passkey" else depths
        assert [q.depth for q in tr.queries] == expected
        head = len(byte_tokenizer(HEAD[task], add_special_tokens=False)["input_ids"])
        H = tr.context.shape[0] - head  # haystack tokens
        for q in tr.queries:
            assert q.needle_pos == head + round(q.depth * (H - q.needle_len))
            needle = byte_tokenizer.decode(tr.context[q.needle_pos : q.needle_pos + q.needle_len])
            assert q.answer in needle and needle.startswith("\nThe ")
            assert q.ids.shape[0] + spec.max_new <= RESERVE  # the question and answer fit in the length
        # the answer occurs only in its needle (no leak into the filler or the question)
        text = byte_tokenizer.decode(tr.context)
        for q in tr.queries:
            assert text.count(q.answer) == (2 if task == "passkey" else 1)
            assert q.answer not in byte_tokenizer.decode(q.ids)


def test_bad_specs_are_refused(byte_tokenizer, stream):
    with pytest.raises(LongCtxError, match="depths"):
        TaskSpec(depths=[1.5])
    with pytest.raises(LongCtxError, match="lengths"):
        TaskSpec(lengths=[RESERVE])
    with pytest.raises(LongCtxError, match="no filler"):
        make_trial(byte_tokenizer, stream, TaskSpec(lengths=[200]), "multikey", 200, 0)
    with pytest.raises(LongCtxError, match="overlap"):
        make_trial(byte_tokenizer, stream, TaskSpec(depths=[0.5, 0.51]), "multikey", 400, 0)
    with pytest.raises(LongCtxError, match="chat template"):
        make_trial(byte_tokenizer, stream, TaskSpec(prompt="chat"), "passkey", 400, 0)


def test_score_and_wilson():
    assert score(" 71432.", "71432") and score("71432", "71432") and score(" is 71432 and 5", "71432")
    assert not score(" 7143.", "71432") and not score(" 714321", "71432") and not score("no digits", "71432")
    assert not score(" 1, 71432", "71432")  # only the first number counts
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and abs(lo - 0.7225) < 1e-3
    lo, hi = wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert wilson(0, 0) == (0.0, 1.0)
    with pytest.raises(LongCtxError):
        wilson(3, 2)


def test_greedy_answer_through_the_cache_matches_full_recompute(byte_tokenizer):
    from transformers import DynamicCache

    model = _llama()
    ctx = torch.arange(3, 120) % 250 + 3
    q = torch.tensor([40, 41, 42])
    cache = DynamicCache()
    prefill(model, ctx, cache, chunk=32)
    out = answer(model, byte_tokenizer, q, cache, max_new=6)
    ids, ref = torch.cat([ctx, q]), []
    with torch.no_grad():
        for _ in range(6):
            nxt = int(model(input_ids=ids[None]).logits[0, -1].argmax())
            if nxt == byte_tokenizer.eos_token_id:
                break
            ref.append(nxt)
            if re.search(r"\d\D", byte_tokenizer.decode(ref)):
                break
            ids = torch.cat([ids, torch.tensor([nxt])])
    assert out == byte_tokenizer.decode(ref)


def test_incremental_json_survives_an_interruption_and_resumes(tmp_path, monkeypatch):
    model, tok = _llama(), make_byte_tokenizer()
    spec = TaskSpec(lengths=[400], trials=1)
    out = tmp_path / "lc.json"
    real, calls = longctx_run.run_cell, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # an interrupted run
        return real(*a, **k)

    monkeypatch.setattr(longctx_run, "run_cell", flaky)
    with pytest.raises(KeyboardInterrupt):
        longctx_run.run_longctx(model, tok, spec, ["baseline", "int-4"], out=out, keep=0.0, ppl_prefill=0, log=lambda m: None)
    d = json.loads(out.read_text())
    assert [(c["method"], c["task"]) for c in d["cells"]] == [("baseline", "passkey"), ("baseline", "multikey")]
    monkeypatch.setattr(longctx_run, "run_cell", real)
    d = longctx_run.run_longctx(model, tok, spec, ["baseline", "int-4"], out=out, keep=0.0, ppl_prefill=0, resume=True,
                                log=lambda m: None)
    assert [(c["method"], c["task"]) for c in d["cells"]] == [("baseline", "passkey"), ("baseline", "multikey"),
                                                              ("int-4", "passkey"), ("int-4", "multikey")]
    assert json.loads(out.read_text())["cells"] == json.loads(json.dumps(d["cells"]))


def test_baseline_gates_the_methods(monkeypatch):
    model, tok = _llama(), make_byte_tokenizer()
    d = longctx_run.run_longctx(model, tok, TaskSpec(lengths=[400], trials=1), ["baseline", "int-4"], keep=0.9,
                                ppl_prefill=0, log=lambda m: None)
    assert {c["method"] for c in d["cells"]} == {"baseline"}  # a random model solves nothing: nothing kept
    assert d["kept"] == []
    with pytest.raises(LongCtxError, match="unknown method"):
        longctx_run.run_longctx(model, tok, TaskSpec(lengths=[400]), ["nope"], log=lambda m: None)
    with pytest.raises(LongCtxError, match="positions"):
        longctx_run.run_longctx(model, tok, TaskSpec(lengths=[2048]), ["baseline"], log=lambda m: None)


def test_cli_end_to_end(tmp_path):
    from kvsplice.cli import main

    folder = tmp_path / "tiny"
    _llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    js, png = tmp_path / "lc.json", tmp_path / "lc.png"
    rc = main(["longctx", "--model", str(folder), "--lengths", "400", "--trials", "1", "--prompt", "plain", "--keep", "0",
               "--chunk", "64", "--ppl-prefill", "128", "--ppl-tokens", "32", "--methods", "baseline,pca-q-2,h2o-2,streamingllm-4",
               "--calibration", json.dumps(CAL), "--json", str(js), "--plot", str(png), "--threads", "1"])
    assert rc == 0
    d = json.loads(js.read_text())
    assert d["spec"]["lengths"] == [400] and d["spec"]["prompt"] == "plain"
    got = {(c["method"], c["task"]) for c in d["cells"]}
    assert got == {(m, t) for m in ("baseline", "pca-q-2", "h2o-2", "streamingllm-4") for t in ("passkey", "multikey")}
    bits = {c["method"]: c["kv_bits_per_value"] for c in d["cells"]}
    assert bits["baseline"] == 32.0 and all(b < 8 for m, b in bits.items() if m != "baseline")
    for c in d["cells"]:
        assert c["answers"] == len(c["outputs"]) and 0 <= c["ci95"][0] <= c["accuracy"] <= c["ci95"][1] <= 1
    assert [p["method"] for p in d["ppl"]["points"]] == ["baseline", "pca-q-2", "h2o-2", "streamingllm-4"]
    assert png.stat().st_size > 1000


def test_paired_ppl_deltas():
    base = [float(i % 7) for i in range(64)]
    result = {"ppl": {"points": [{"method": "baseline", "token_nll": base},
                                 {"method": "worse", "token_nll": [x + 0.1 for x in base]},
                                 {"method": "noisy", "token_nll": [x + (0.2 if i % 2 else 0.0) for i, x in enumerate(base)]}]}}
    longctx_run.add_ppl_deltas(result)
    b, w, n = result["ppl"]["points"]
    assert b["delta_pct"] == 0.0 and b["delta_ci95"] == [0.0, 0.0]
    expected = 100 * (torch.tensor(0.1).exp().item() - 1)  # a constant NLL shift: exact, zero-width interval
    assert abs(w["delta_pct"] - expected) < 1e-4 and all(abs(c - expected) < 1e-4 for c in w["delta_ci95"])
    assert n["delta_ci95"][0] <= n["delta_pct"] <= n["delta_ci95"][1]
    result["ppl"]["points"].append({"method": "short", "token_nll": base[:10]})
    with pytest.raises(LongCtxError, match="scored"):
        longctx_run.add_ppl_deltas(result)


def test_bits_are_per_value_held_on_a_hybrid_model(byte_tokenizer, stream):
    """Gemma 3's sliding layers hold only their window: an uncompressed hybrid cache is 32 bits per
    value held (not less: its own sliding saving is not a method's), DynamicCache and CompressedCache alike."""
    from test_model_types import MAKERS
    from transformers import DynamicCache

    from kvsplice.cache import CompressedCache

    model = MAKERS["gemma3_text"]()
    model.config.max_position_embeddings = 1024
    spec = TaskSpec(lengths=[400], trials=1, tasks=["passkey"], max_new=4)
    trials = [make_trial(byte_tokenizer, stream, spec, "passkey", 400, 0)]
    base = longctx_run.run_cell(model, byte_tokenizer, trials, lambda: DynamicCache(config=model.config), spec)
    assert base["kv_bits_per_value"] == pytest.approx(32.0)
    ident = longctx_run.run_cell(model, byte_tokenizer, trials, lambda: CompressedCache.from_geometry(model), spec)
    assert ident["kv_bits_per_value"] == pytest.approx(32.0)  # no codec: every held row kept as it came
