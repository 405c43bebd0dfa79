"""Issue 8 §2: CompressedCache in every generation mode transformers offers.

Matrix: {tiny GPT-2, tiny Llama} x {identity K+V, pca-q V, pca-q K+V with sink, V-only pruning} x
{greedy, sampling with a seed, beam search, batched with left padding, prompt lookup / assisted
decoding, multi-turn reuse of one cache, pipeline("text-generation") with a list of prompts, bf16}.

Checks: identity codecs (K through the pre-RoPE path on Llama) give DynamicCache's tokens and
logits; deterministic codecs give token-identical greedy output padded in a batch or alone, chunked
(prompt lookup / assisted verification, multi-turn prefill) or step by step; pruning, which cannot
be cropped, refuses assisted decoding and says why. Tiny configs, few tokens (runs in seconds).
"""

from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from conftest import make_byte_tokenizer, make_tiny_gpt2, make_tiny_llama
from transformers import DynamicCache

from kvsplice.attention import prepare_model
from kvsplice.cache import CompressedCache, LayerCodec
from kvsplice.codecs import get_codec
from kvsplice.errors import KVSpliceError
from kvsplice.pruning import VOnlyPruner

MAKERS = {"gpt2": make_tiny_gpt2, "llama": make_tiny_llama}
KINDS = ["identity", "pcaq-v", "pcaq-kv-sink", "prune"]
PROMPTS = [[5, 17, 99, 23, 42, 8, 61, 77, 150, 12], [120, 7, 33, 81, 9, 140]]
N = 5  # new tokens


def layout(model):
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, cfg.hidden_size // cfg.num_attention_heads


def codecs(model, kind, seed=0):
    """One LayerCodec per layer: per-head identity or pca-q (4 bits) fitted on random vectors (fitted once
    per layout: a cache copies its codecs when it initialises, so sharing them between tests is safe)."""
    return _fitted(*layout(model), kind, seed)


@functools.lru_cache(maxsize=None)
def _fitted(L, H, D, kind, seed):
    g = torch.Generator().manual_seed(seed)
    if kind == "identity":
        return [LayerCodec([get_codec("identity").fit(torch.zeros(1, D))] * H) for _ in range(L)]
    return [LayerCodec([get_codec("pca-q", bits=4).fit(torch.randn(256, D, generator=g)) for _ in range(H)])
            for _ in range(L)]


def k_codecs(model, kind):
    """K codecs as `from_geometry` builds them: before RoPE where the model has one."""
    from kvsplice.kcodec import PreRopeLayerCodec, find_rotary

    rotary = find_rotary(model)
    cs = codecs(model, kind, seed=1)
    return cs if rotary is None else [PreRopeLayerCodec(c, rotary) for c in cs]


def cache_maker(model, kind):
    """() -> a fresh cache of the given kind, and the context the cache needs (kvsplice attention for pruning)."""
    L = model.config.num_hidden_layers
    if kind == "identity":
        v, k = codecs(model, "identity"), k_codecs(model, "identity")
        return lambda: CompressedCache(L, v, k), contextlib.nullcontext()
    if kind == "pcaq-v":
        v = codecs(model, "pcaq")
        return lambda: CompressedCache(L, v), contextlib.nullcontext()
    if kind == "pcaq-kv-sink":
        v, k = codecs(model, "pcaq"), k_codecs(model, "pcaq")
        return lambda: CompressedCache(L, v, k, sink=1), contextlib.nullcontext()
    v = codecs(model, "identity")
    pruner = VOnlyPruner(keep_ratio=0.6, k_min=4, recency=2)
    return lambda: CompressedCache(L, v, pruner=pruner), prepare_model(model)


def tiny(arch, dtype=torch.float32):
    model = MAKERS[arch]().to(dtype)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def run(model, ids, mask=None, **kw):
    out = model.generate(ids, attention_mask=mask, max_new_tokens=N, return_dict_in_generate=True,
                         output_scores=True, **kw)
    return out.sequences, torch.stack(out.scores, 1)


def left_padded(prompts):
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    return ids, mask


def greedy_by_hand(model, ids, cache, n=N):
    """Greedy decoding by explicit forward calls: the reference for what generate must do with the cache."""
    out = ids
    with torch.no_grad():
        logits = model(ids, cache=cache, use_cache=True).logits
        for _ in range(n):
            nxt = logits[:, -1:].argmax(-1)
            out = torch.cat([out, nxt], 1)
            logits = model(nxt, cache=cache, use_cache=True).logits
    return out


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_and_sampling(arch, kind):
    model = tiny(arch)
    make, ctx = cache_maker(model, kind)
    ids = torch.tensor([PROMPTS[0]])
    with ctx:
        seq, scores = run(model, ids, do_sample=False, cache=make())
        assert torch.equal(seq, greedy_by_hand(model, ids, make()))
        samples = []
        for _ in range(2):
            torch.manual_seed(3)
            samples.append(run(model, ids, do_sample=True, top_k=0, cache=make())[0])
    assert torch.equal(samples[0], samples[1])
    if kind == "identity":  # DynamicCache: same tokens and logits (K path included), same samples
        ref_seq, ref_scores = run(model, ids, do_sample=False)
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(scores, ref_scores, atol=1e-5, rtol=0)
        torch.manual_seed(3)
        assert torch.equal(samples[0], run(model, ids, do_sample=True, top_k=0)[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_beam_search(arch, kind):
    model = tiny(arch)
    make, ctx = cache_maker(model, kind)
    ids, mask = left_padded(PROMPTS)
    with ctx:
        seq, _ = run(model, ids, mask, num_beams=3, do_sample=False, cache=make())
    assert seq.shape == (2, ids.shape[1] + N)
    if kind == "identity":
        assert torch.equal(seq, run(model, ids, mask, num_beams=3, do_sample=False)[0])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_reorder_maps_every_per_sequence_state(arch, kind):
    """Beam search reorders the batch: every row kind (payload, raw, sink copy, positions, sink rows,
    pruning statistics) must follow, so each read equals the original read reordered."""
    model = tiny(arch)
    make, ctx = cache_maker(model, kind)
    ids, mask = left_padded(PROMPTS + [PROMPTS[0][:7]])
    pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    cache = make()
    with ctx, torch.no_grad():
        model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    before = [(l.k_rows.read(), l.v_rows.read()) for l in cache.layers]
    beam_idx = torch.tensor([2, 0, 0])
    cache.reorder_cache(beam_idx)
    for (k, v), layer in zip(before, cache.layers):
        torch.testing.assert_close(layer.k_rows.read(), k[beam_idx], atol=0, rtol=0)
        torch.testing.assert_close(layer.v_rows.read(), v[beam_idx], atol=0, rtol=0)
    if getattr(cache, "tokens", None) is not None and cache.tokens.sink:
        assert cache.tokens.sink_rows[:, 0].tolist() == [3, 0, 0]  # first real rows: pads 3, 0, 0
    cache.batch_select_indices(torch.tensor([1, 0]))
    assert cache.layers[0].k_rows.read().shape[0] == 2 and cache.batch_size == 2


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch_equals_each_prompt_alone(arch, kind):
    model = tiny(arch)
    make, ctx = cache_maker(model, kind)
    ids, mask = left_padded(PROMPTS)
    with ctx:
        batch, scores = run(model, ids, mask, do_sample=False, cache=make())
        alone = [run(model, torch.tensor([p]), do_sample=False, cache=make())[0] for p in PROMPTS]
    if kind == "identity":  # DynamicCache logits on the padded batch, K path included
        torch.testing.assert_close(scores, run(model, ids, mask, do_sample=False)[1], atol=1e-5, rtol=0)
    if kind == "prune":  # the budget counts the padded length: runs, but rows differ from the prompt alone
        assert batch.shape == (2, ids.shape[1] + N)
        return
    for i in range(2):
        assert batch[i, -N:].tolist() == alone[i][0, -N:].tolist()


@pytest.mark.parametrize("lookup", ["prompt", "assistant"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_assisted_and_prompt_lookup(arch, kind, lookup):
    """Candidate verification feeds several tokens at once and crops the rejected ones: with window 0
    and no pruner the cache crops exactly, so the output equals plain greedy with the same cache kind."""
    model = tiny(arch)
    make, ctx = cache_maker(model, kind)
    ids = torch.tensor([[5, 17, 99, 23, 5, 17, 99, 23, 5, 17]])  # repetitive: prompt lookup finds candidates
    extra = {"prompt_lookup_num_tokens": 3} if lookup == "prompt" else {"assistant_model": tiny(arch).eval()}
    if lookup == "assistant":
        extra["assistant_model"].load_state_dict(model.state_dict())  # the same weights: long accepted runs
    with ctx:
        if kind == "prune":
            cache = make()
            with pytest.raises(KVSpliceError, match="pruner.*cannot be cropped"):
                model.generate(ids, max_new_tokens=N, do_sample=False, cache=cache, **extra)
            with torch.no_grad():
                model(ids, cache=cache, use_cache=True)
            with pytest.raises(KVSpliceError, match="pruner"):
                cache.crop(-1)
            return
        plain = model.generate(ids, max_new_tokens=N, do_sample=False, cache=make())
        assisted = model.generate(ids, max_new_tokens=N, do_sample=False, cache=make(), **extra)
    assert torch.equal(assisted, plain)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_multi_turn_reuse_of_one_cache(arch, kind):
    """Turn 2 passes the whole conversation; generate feeds only the new tokens to the cache."""
    model = tiny(arch)
    make, ctx = cache_maker(model, kind)
    cache = make()
    with ctx:
        turn1 = model.generate(torch.tensor([PROMPTS[0]]), max_new_tokens=N, do_sample=False, cache=cache)
        history = torch.cat([turn1, torch.tensor([[40, 41, 42]])], 1)
        turn2 = model.generate(history, max_new_tokens=N, do_sample=False, cache=cache)
        fresh = model.generate(history, max_new_tokens=N, do_sample=False, cache=make())
    assert cache.get_seq_length() == turn2.shape[1] - 1
    if kind != "prune":  # rows are coded one by one: a reused cache equals a fresh one
        assert torch.equal(turn2, fresh)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_pipeline_with_a_list_of_prompts(arch, kind):
    """A pipeline calls generate once per prompt: `factory.installed(model)` gives each call a fresh cache."""
    from transformers import pipeline

    from kvsplice.cache import CacheFactory

    model = tiny(arch)
    tok = make_byte_tokenizer()
    tok.padding_side = "left"
    make, ctx = cache_maker(model, kind)
    factory = CacheFactory(make)
    texts = ["hello there", "a longer prompt, padded"]
    pipe = pipeline("text-generation", model=model, tokenizer=tok)
    with ctx:
        with factory.installed(model):
            outs = pipe(texts, max_new_tokens=N, do_sample=False, return_full_text=False)
            if kind == "pcaq-kv-sink":  # one left-padded batch through the pipeline: the same texts
                assert pipe(texts, max_new_tokens=N, do_sample=False, return_full_text=False, batch_size=2) == outs
        alone = [model.generate(tok(t, return_tensors="pt").input_ids, max_new_tokens=N, do_sample=False,
                                cache=make()) for t in texts]
    assert "generate" not in vars(model)  # restored
    for out, ref in zip(outs, alone):
        assert out[0]["generated_text"] == tok.decode(ref[0, -N:])


def test_factory_from_geometry_checks_now_and_gives_fresh_caches():
    from kvsplice.geometry import Geometry

    model = tiny("llama")
    L, H, D = layout(model)
    g = torch.Generator().manual_seed(0)
    cs = {(l, h): get_codec("pca-q", bits=4).fit(torch.randn(256, D, generator=g)) for l in range(L) for h in range(H)}
    v = Geometry(codecs=cs, meta={"target": "v"})
    factory = CompressedCache.factory(model, v_geometry=v, sink=1)
    a, b = factory(), factory()
    assert a is not b and isinstance(a, CompressedCache)
    with pytest.raises(KVSpliceError):
        CompressedCache.factory(model, v_geometry=v, sink=-1)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_bf16(arch, kind):
    model = tiny(arch, torch.bfloat16)
    make, ctx = cache_maker(model, kind)
    ids, mask = left_padded(PROMPTS)
    with ctx:
        seq, scores = run(model, ids, mask, do_sample=False, cache=make())
    assert torch.isfinite(scores).all()
    if kind == "identity":  # K path in float32: lossless in bf16 too
        ref_seq, ref_scores = run(model, ids, mask, do_sample=False)
        assert torch.equal(seq, ref_seq)
        torch.testing.assert_close(scores, ref_scores, atol=0, rtol=0)


def test_crop_refusal_names_the_mode_and_window_zero_crops_exactly():
    model = tiny("llama")
    L = model.config.num_hidden_layers
    ids = torch.tensor([PROMPTS[0]])
    windowed = CompressedCache(L, codecs(model, "pcaq"), window=2)
    with torch.no_grad():
        model(ids, cache=windowed, use_cache=True)
    assert not windowed.is_croppable
    with pytest.raises(KVSpliceError, match="window=2"):
        windowed.crop(-1)
    with pytest.raises(KVSpliceError, match="window=2"):  # at first use by generate, before any compute
        model.generate(ids, max_new_tokens=2, prompt_lookup_num_tokens=2, cache=CompressedCache(L, window=2))
    make, _ = cache_maker(model, "pcaq-kv-sink")
    cut, ref = make(), make()
    with torch.no_grad():
        model(ids, cache=cut, use_cache=True)
        model(ids[:, :7], cache=ref, use_cache=True)
    cut.crop(-3)
    assert cut.is_croppable and cut.get_seq_length() == 7
    for a, b in zip(cut.layers, ref.layers):
        torch.testing.assert_close(a.k_rows.read(), b.k_rows.read(), atol=0, rtol=0)
        torch.testing.assert_close(a.v_rows.read(), b.v_rows.read(), atol=0, rtol=0)
    assert cut.memory().total_bytes == ref.memory().total_bytes
    with pytest.raises(KVSpliceError, match="negative|<= 0"):
        cut.crop(3)
    assert cut.get_max_cache_shape() == -1
