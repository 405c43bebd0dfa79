"""V-only pruning: the scoring math by hand, selection through a cache layer, and causality in a model."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from kvsplice.attention import prepare_model
from kvsplice.cache import CompressedCache, CompressedLayer, LayerCodec
from kvsplice.codecs import get_codec
from kvsplice.errors import KVSpliceError
from kvsplice.pruning import VOnlyPruner, attention_mass

# One KV head, two query heads (GQA group of 2), a prefill of 4 tokens (causal).
PROBS = torch.tensor(
    [
        [[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.2, 0.2, 0.6, 0], [0.1, 0.1, 0.1, 0.7]],
        [[1.0, 0, 0, 0], [0.9, 0.1, 0, 0], [0.8, 0.1, 0.1, 0], [0.1, 0.2, 0.3, 0.4]],
    ]
)[None]  # (B=1, Hq=2, q=4, S=4)
CAUSAL = torch.ones(4, 4, dtype=torch.bool).tril()[None, None]  # (1, 1, 4, 4)
# by hand: mass = column sums over both heads; exposure = queries that can see the token
MASS = torch.tensor([1.8 + 2.8, 0.8 + 0.4, 0.7 + 0.4, 0.7 + 0.4])  # 4.6, 1.2, 1.1, 1.1
EXPOSURE = torch.tensor([4.0, 3.0, 2.0, 1.0])  # importance with correction: 1.15, 0.4, 0.55, 1.1


def test_attention_mass_by_hand():
    mass, exposure = attention_mass(PROBS, CAUSAL, groups=1)
    torch.testing.assert_close(mass[0, 0], MASS)
    torch.testing.assert_close(exposure[0, 0], EXPOSURE)
    # per query head as its own group: no summing over the GQA group
    mass2, _ = attention_mass(PROBS, CAUSAL, groups=2)
    torch.testing.assert_close(mass2[0, 1], torch.tensor([2.8, 0.4, 0.4, 0.4]))


def test_fully_masked_query_counts_for_nobody():
    allowed = CAUSAL.clone()
    allowed[..., 0, :] = False  # query 0 is left padding: it may see nothing
    probs = PROBS.clone()
    probs[:, :, 0] = 0.25  # what a softmax over an all-masked row gives
    mass, exposure = attention_mass(probs, allowed, groups=1)
    torch.testing.assert_close(mass[0, 0], MASS - torch.tensor([2.0, 0, 0, 0]))
    torch.testing.assert_close(exposure[0, 0], EXPOSURE - torch.tensor([1.0, 0, 0, 0]))


@pytest.mark.parametrize("correction, kept", [(True, [0, 2, 3]), (False, [0, 1, 3])])
def test_exposure_correction_and_recency_by_hand(correction, kept):
    pruner = VOnlyPruner(keep_ratio=0.75, k_min=0, recency=1, exposure_correction=correction)
    importance = pruner.importance(MASS[None, None], EXPOSURE[None, None])
    expected = MASS / EXPOSURE if correction else MASS
    torch.testing.assert_close(importance[0, 0], expected)
    # budget floor(0.75 * 4) = 3; token 3 is forced (recency 1) although its raw mass is the lowest
    assert pruner.select(importance, logical=4)[0, 0].tolist() == kept


def test_recency_forces_the_newest_tokens():
    importance = torch.tensor([[[5.0, 4.0, 3.0, 0.0, 0.0, 0.0]]])
    pruner = VOnlyPruner(keep_ratio=0.5, k_min=0, recency=2)
    assert pruner.select(importance, logical=6)[0, 0].tolist() == [0, 4, 5]
    pruner = VOnlyPruner(keep_ratio=0.1, k_min=0, recency=4)  # recency above keep_ratio * L wins
    assert pruner.select(importance, logical=6)[0, 0].tolist() == [2, 3, 4, 5]


def test_budget_and_ema():
    p = VOnlyPruner()
    assert p.budget(1024, 1024) == 391  # the seed's 391 of 1024
    assert p.budget(50, 50) == 50 and p.budget(200, 200) == 76 and p.budget(100, 300) == 100
    e = VOnlyPruner(ema=0.5)
    m, x = e.accumulate(torch.tensor([2.0]), torch.tensor([4.0]), torch.tensor([1.0]), torch.tensor([1.0]))
    assert (m.item(), x.item()) == (2.0, 3.0)


@pytest.mark.parametrize(
    "kwargs", [{"keep_ratio": 0.0}, {"keep_ratio": 1.5}, {"k_min": -1}, {"recency": 2.5}, {"ema": 1.0},
               {"exposure_correction": 1}, {"keep_ratio": "0.5"}]
)
def test_pruner_validation(kwargs):
    with pytest.raises(KVSpliceError, match=next(iter(kwargs))):
        VOnlyPruner(**kwargs)


@pytest.mark.parametrize("strategy", ["A", "B"])
def test_layer_selects_and_frees_rows(strategy):
    """The hand example through a cache layer: kept rows are K[0, 2, 3] and encode(V[0, 2, 3])."""
    g = torch.Generator().manual_seed(0)
    codec = LayerCodec([get_codec("pca", k=3).fit(torch.randn(100, 8, generator=g))])
    pruner = VOnlyPruner(keep_ratio=0.75, k_min=0, recency=1)
    layer = CompressedLayer(v_codec=codec, pruner=pruner, strategy=strategy, layer_idx=0)
    k, v = torch.randn(1, 1, 4, 8, generator=g), torch.randn(1, 1, 4, 8, generator=g)
    hook = {}
    layer.update(k, v, kwargs=hook)
    assert hook["kvsplice_layer"] is layer
    layer.observe(PROBS, CAUSAL)
    assert layer.positions[0, 0].tolist() == [0, 2, 3]
    torch.testing.assert_close(layer.k_rows.raw, k[:, :, [0, 2, 3]])
    assert layer.v_rows.raw.shape[2] == 0  # no uncompressed V is left
    torch.testing.assert_close(layer.v_rows.payload["z"], layer.v_rows.codec.encode(v[:, :, [0, 2, 3]])["z"])
    torch.testing.assert_close(layer.mass[0, 0], MASS[[0, 2, 3]])


def _run(model, ids, chunks, pruner):
    """Feed ids through a pruning cache in chunks; logits (T, V) and the kept positions after each chunk."""
    cache = CompressedCache(model.config.num_hidden_layers, pruner=pruner)
    logits, selections, start = [], [], 0
    with prepare_model(model):
        for n in chunks:
            logits.append(model(ids[:, start : start + n], cache=cache).logits[0])
            selections.append([layer.positions.clone() for layer in cache.layers])
            start += n
    return torch.cat(logits), selections, cache


PRUNER = VOnlyPruner(keep_ratio=0.5, k_min=2, recency=2)


def test_token_by_token_is_causal():
    model = make_tiny_llama()
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(1))
    full, sel_full, _ = _run(model, ids, [6] + [1] * 10, PRUNER)
    cut, sel_cut, _ = _run(model, ids[:, :11], [6] + [1] * 5, PRUNER)  # tokens after t = 10 never fed
    torch.testing.assert_close(full[:11], cut, atol=0, rtol=0)
    for a, b in zip(sel_full, sel_cut):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert sel_full[-1][0].shape[-1] == 8  # pruning did happen: 8 of 16 rows held


def test_chunked_feeding_never_lets_a_selection_see_a_future_query():
    model = make_tiny_llama()
    ids = torch.randint(3, 200, (1, 18), generator=torch.Generator().manual_seed(2))
    full, sel_full, _ = _run(model, ids, [6, 4, 4, 4], PRUNER)
    # cut inside the third chunk: logits of tokens 10, 11 must not depend on queries 12, 13
    cut, sel_cut, _ = _run(model, ids[:, :12], [6, 4, 2], PRUNER)
    torch.testing.assert_close(full[:12], cut, atol=1e-5, rtol=0)
    assert all(torch.equal(x, y) for x, y in zip(sel_full[1], sel_cut[1]))
    assert sel_full[1][0].shape[-1] == 5  # 10 tokens seen -> 5 rows kept: selections were made


def test_chunked_statistics_count_only_causal_queries():
    """Without pruning, running statistics do not depend on the chunking, and exposure[j] = L - j."""
    model = make_tiny_llama()
    ids = torch.randint(3, 200, (1, 14), generator=torch.Generator().manual_seed(3))
    keep_all = VOnlyPruner(keep_ratio=1.0, k_min=0, recency=0)
    _, _, chunked = _run(model, ids, [5, 4, 5], keep_all)
    _, _, single = _run(model, ids, [1] * 14, keep_all)
    for a, b in zip(chunked.layers, single.layers):
        torch.testing.assert_close(a.mass, b.mass, atol=1e-5, rtol=0)
        assert torch.equal(a.exposure, b.exposure)
        assert torch.equal(a.exposure[0, 0], 14.0 - torch.arange(14.0))


def test_attention_picks_mask_columns_of_the_rows_held():
    """Rows held at logical positions [0, 3, 5, 6] (5, 6 = this step's two queries); positions 0-3 are
    left padding. Each query may see only the real rows at or before its own position."""
    from types import SimpleNamespace

    from kvsplice.attention import kvsplice_attention_forward

    seen = {}
    layer = SimpleNamespace(key_positions=torch.tensor([[[0, 3, 5, 6]]]), length=7, layer_idx=0,
                            observe=lambda p, a: seen.update(allowed=a))
    module = torch.nn.Module()
    module.layer_idx = 0
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 2, 4, generator=g)  # (B, Hq, q, D): two query heads share one KV head
    k, v = torch.randn(1, 1, 4, 4, generator=g), torch.randn(1, 1, 4, 4, generator=g)
    pos = torch.arange(7)
    logical = ((pos[None, :] <= torch.tensor([5, 6])[:, None]) & (pos >= 4))[None, None]  # (1, 1, 2, 7)
    out, probs = kvsplice_attention_forward(module, q, k, v, logical, scaling=0.5, kvsplice_layer=layer)
    expect_allowed = torch.tensor([[False, False, True, False], [False, False, True, True]])
    assert torch.equal(seen["allowed"][0, 0], expect_allowed)
    scores = (q @ k.transpose(2, 3) * 0.5).masked_fill(~expect_allowed, float("-inf"))
    torch.testing.assert_close(out, (scores.softmax(-1) @ v).transpose(1, 2))
    assert probs[..., :2].abs().max() == 0


def test_prepare_model_restores_the_attention_implementation_on_error():
    model = make_tiny_llama()
    before = model.config._attn_implementation
    with pytest.raises(RuntimeError):
        with prepare_model(model):
            assert model.config._attn_implementation == "kvsplice"
            raise RuntimeError("boom")
    assert model.config._attn_implementation == before
