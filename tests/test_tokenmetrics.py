"""KL(uncompressed ‖ compressed) and top-1 agreement from the perplexity forward passes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from kvsplice.evaluate.perplexity import perplexity_prefill_continue, perplexity_teacher_forced
from kvsplice.evaluate.tokenmetrics import ReferenceMismatch, TokenScorer
from kvsplice.peers import get_peer


def test_full_topk_gives_the_exact_kl_and_truncation_a_lower_bound():
    g = torch.Generator().manual_seed(0)
    p_logits, q_logits = torch.randn(2, 5, 30, generator=g), torch.randn(2, 5, 30, generator=g)
    targets = torch.randint(0, 30, (2, 5), generator=g)
    base = TokenScorer(record_topk=30)
    nll = base(p_logits, targets)
    torch.testing.assert_close(nll, F.cross_entropy(p_logits.transpose(1, 2), targets, reduction="none"))
    comp = TokenScorer(reference=base.recorded)
    comp(q_logits, targets)
    lp, lq = F.log_softmax(p_logits, -1), F.log_softmax(q_logits, -1)
    exact = (lp.exp() * (lp - lq)).sum(-1).reshape(-1)
    torch.testing.assert_close(comp.kl, exact, rtol=1e-4, atol=1e-5)
    assert comp.top1.tolist() == (q_logits.argmax(-1) == p_logits.argmax(-1)).float().reshape(-1).tolist()
    base5 = TokenScorer(record_topk=5)
    base5(p_logits, targets)
    comp5 = TokenScorer(reference=base5.recorded)
    comp5(q_logits, targets)
    assert (comp5.kl <= exact + 1e-5).all() and comp5.summary()["ref_mass"] < 1.0


def test_same_logits_give_zero_kl_and_full_agreement():
    logits = torch.randn(1, 7, 20)
    t = torch.zeros(1, 7, dtype=torch.long)
    base = TokenScorer(record_topk=4)
    base(logits, t)
    comp = TokenScorer(reference=base.recorded)
    comp(logits.clone(), t)
    comp.finish()
    s = comp.summary()
    assert s["kl"] < 1e-6 and s["top1"] == 1.0


def test_reference_must_match_the_tokens():
    base = TokenScorer(record_topk=3)
    base(torch.randn(1, 4, 10), torch.zeros(1, 4, dtype=torch.long))
    comp = TokenScorer(reference=base.recorded)
    with pytest.raises(ReferenceMismatch, match="positions"):
        comp(torch.randn(1, 5, 10), torch.zeros(1, 5, dtype=torch.long))
    short = TokenScorer(reference=base.recorded + base.recorded)
    short(torch.randn(1, 4, 10), torch.zeros(1, 4, dtype=torch.long))
    with pytest.raises(ReferenceMismatch, match="scored 1 chunks"):
        short.finish()


@pytest.mark.parametrize("protocol", ["teacher-forced", "prefill-continue"])
def test_protocols_route_through_the_scorer(tiny_llama, protocol):
    model, _ = tiny_llama
    ids = torch.randint(3, 200, (400,), generator=torch.Generator().manual_seed(1))
    int2 = get_peer("uniform-int", bits=2).cache_factory(model)

    def run(make, scorer=None):
        if protocol == "teacher-forced":
            return perplexity_teacher_forced(model, ids, make, window=64, max_windows=3, scorer=scorer)
        return perplexity_prefill_continue(model, ids, make, prefill=32, continue_tokens=16, chunk=4, segments=4, batch_size=2, scorer=scorer)

    plain = run(DynamicCache)
    base = TokenScorer(record_topk=16)
    row = run(DynamicCache, base)
    assert math.isclose(row.ppl, plain.ppl, rel_tol=1e-6)  # the scorer's NLL is the cross-entropy
    same = TokenScorer(reference=base.recorded)
    run(DynamicCache, same)
    same.finish()
    assert same.summary()["kl"] < 1e-6 and same.summary()["top1"] == 1.0
    comp = TokenScorer(reference=base.recorded)
    crow = run(int2, comp)
    comp.finish()
    # a random tiny model has near-flat logits: small, but far above the identical-cache rounding
    assert comp.summary()["kl"] > max(100 * same.summary()["kl"], 1e-7) and comp.kl.numel() == crow.tokens
