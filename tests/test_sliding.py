"""Sliding-window layers (Gemma 3's hybrid attention) in CompressedCache, on a tiny Gemma 3 (window 6,
layers sliding, sliding, global; float32):

* identity codecs give the logits of transformers' hybrid DynamicCache across the window boundary
  (prefill longer than the window, decoding past it), with and without the pre-RoPE K codec, with
  a sink, and for a left-padded batch;
* a sliding layer holds at most W - 1 rows after a step and its bytes say so; its mask sizes are
  DynamicSlidingWindowLayer's; the sink's exact copy is freed once the sink row leaves the window;
* a lossy (pca-q) cache gives the same logits whether sliding layers drop their old rows or keep
  them all (the model's sliding mask hides them), and the coded attention path agrees;
* refusals: pruning with sliding layers, cropping a sliding layer.
"""

from __future__ import annotations

import pytest
import torch
from test_model_types import MAKERS, TEXT, WINDOW, _feed, _identity_geometry
from transformers import DynamicCache
from transformers.cache_utils import DynamicSlidingWindowLayer

from kvsplice.cache import CompressedCache, layer_windows
from kvsplice.calibrate import CalibrationConfig, calibrate
from kvsplice.errors import KVSpliceError
from kvsplice.models import get_adapter
from kvsplice.pruning import VOnlyPruner

CHUNKS = [9, 1, 1, 3, 1, 1]  # prefill 9 > WINDOW = 6, then decode to 16 tokens


def _gemma():
    model = MAKERS["gemma3_text"]()
    return model, get_adapter(model)


def _ids(B: int = 1, T: int = 16, seed: int = 11) -> torch.Tensor:
    return torch.randint(3, 200, (B, T), generator=torch.Generator().manual_seed(seed))


def test_layer_windows_read_from_the_config():
    model, _ = _gemma()
    assert layer_windows(model) == [WINDOW, WINDOW, None]
    assert layer_windows(MAKERS["llama"]()) == [None, None]
    cache = CompressedCache.from_geometry(model)
    assert cache.is_sliding == [True, True, False]


@pytest.mark.parametrize("with_k", [False, True], ids=["v", "k+v"])
@pytest.mark.parametrize("sink", [0, 1])
def test_identity_codecs_equal_hybrid_dynamic_cache_past_the_window(with_k, sink):
    model, ad = _gemma()
    ids = _ids()
    ref = _feed(model, ids, DynamicCache(config=model.config), CHUNKS)
    k_geo = _identity_geometry(ad, "k") if with_k else None
    cache = CompressedCache.from_geometry(model, _identity_geometry(ad, "v"), k_geo, sink=sink)
    torch.testing.assert_close(_feed(model, ids, cache, CHUNKS), ref, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 16


def _feed_padded(model, ids, mask, cache, chunks):
    """Left-padded batch fed in chunks with its attention mask and true positions (as generate does)."""
    out, start = [], 0
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        for n in chunks:
            e = start + n
            out.append(model(ids[:, start:e], attention_mask=mask[:, :e], position_ids=pos[:, start:e],
                             cache=cache, use_cache=True).logits)
            start = e
    return torch.cat(out, 1)


@pytest.mark.parametrize("with_k", [False, True], ids=["v", "k+v"])
def test_left_padded_batch_equals_hybrid_dynamic_cache(with_k):
    model, ad = _gemma()
    ids = _ids(B=2)
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :4] = 0  # sequence 1: 4 pad rows, its sink is row 4, still in the window after the prefill
    ref = _feed_padded(model, ids, mask, DynamicCache(config=model.config), CHUNKS)
    k_geo = _identity_geometry(ad, "k") if with_k else None
    cache = CompressedCache.from_geometry(model, _identity_geometry(ad, "v"), k_geo, sink=1)
    got = _feed_padded(model, ids, mask, cache, CHUNKS)
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=1e-5, rtol=0)


def test_sliding_layers_hold_their_window_and_count_it():
    model, ad = _gemma()
    cache = CompressedCache.from_geometry(model, _identity_geometry(ad, "v"), _identity_geometry(ad, "k"), sink=1)
    ref = DynamicSlidingWindowLayer(WINDOW)
    row = ad.num_kv_heads * ad.head_dim * 4  # bytes of one float32 row (all KV heads)
    ids, start = _ids(), 0
    with torch.no_grad():
        for n in CHUNKS:
            assert cache.layers[0].get_mask_sizes(n) == ref.get_mask_sizes(n)
            model(ids[:, start : start + n], cache=cache, use_cache=True)
            ref.update(torch.zeros(1, 1, n, 1), torch.zeros(1, 1, n, 1))
            start += n
            held = min(start, WINDOW - 1)
            for i in (0, 1):
                m = cache.layers[i].memory()
                assert m["k_bytes"] == m["v_bytes"] == held * row  # identity payload: one row per token held
                assert m["uncompressed_bytes"] == 2 * held * row  # what the hybrid DynamicCache holds
                # the sink's exact copy (1 row of K and of V) lives only while the sink row is held
                assert m["window_bytes"] == (2 * row if start < WINDOW else 0)
                assert m["k_bytes"] + m["v_bytes"] + m["window_bytes"] <= 2 * WINDOW * row
            g = cache.layers[2].memory()  # the global layer keeps every row and the sink
            assert g["k_bytes"] == start * row and g["window_bytes"] == 2 * row


def _pca_q(model, byte_tokenizer, target: str):
    cfg = CalibrationConfig(codec="pca-q", rank=4, target=target, seq_len=64, max_batches=3, samples=400,
                            codec_params={"bits": 4})
    return calibrate(model, byte_tokenizer, TEXT, cfg, progress=False)


def test_lossy_codec_dropping_rows_equals_keeping_them(byte_tokenizer):
    """The rows a sliding layer drops (coded, and the exact sink) are masked for every later query:
    the same pca-q K+V cache with every layer kept full gives the same logits."""
    model, _ = _gemma()
    v, k = _pca_q(model, byte_tokenizer, "v"), _pca_q(model, byte_tokenizer, "k")
    ids = _ids(seed=12)
    sliding = CompressedCache.from_geometry(model, v, k, sink=1)
    full = CompressedCache.from_geometry(model, v, k, sink=1)
    for layer in full.layers:  # the same cache without the window: holds every row
        layer.sliding_window, layer.is_sliding = None, False
    a, b = _feed(model, ids, sliding, CHUNKS), _feed(model, ids, full, CHUNKS)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert sliding.memory().total_bytes < full.memory().total_bytes


def test_coded_attention_on_sliding_layers(byte_tokenizer):
    from kvsplice.coded_attention import coded_attention

    model, _ = _gemma()
    v = _pca_q(model, byte_tokenizer, "v")
    ids = _ids(seed=13)
    ref = _feed(model, ids, CompressedCache.from_geometry(model, v, sink=1), CHUNKS)
    cache = CompressedCache.from_geometry(model, v, sink=1)
    with coded_attention(model, cache):
        got = _feed(model, ids, cache, CHUNKS)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_pruning_and_cropping_are_refused_on_sliding_layers():
    model, ad = _gemma()
    with pytest.raises(KVSpliceError, match="sliding-window layers"):
        CompressedCache.from_geometry(model, pruner=VOnlyPruner(keep_ratio=0.5, k_min=2, recency=2))
    cache = CompressedCache.from_geometry(model, _identity_geometry(ad, "v"))
    _feed(model, _ids(), cache, [8])
    with pytest.raises(KVSpliceError, match="sliding-window layer"):
        cache.crop(-1)


def test_generate_left_padded_batch_past_the_window_equals_dynamic_cache():
    model, ad = _gemma()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = _ids(B=2, T=8, seed=14)
    mask = torch.ones(2, 8, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0  # left padding
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False)
    ref = model.generate(ids, cache=DynamicCache(config=model.config), **kw)
    cache = CompressedCache.from_geometry(model, _identity_geometry(ad, "v"), _identity_geometry(ad, "k"), sink=1)
    assert torch.equal(model.generate(ids, cache=cache, **kw), ref)
    assert cache.layers[0].memory()["k_bytes"] == 2 * (WINDOW - 1) * ad.num_kv_heads * ad.head_dim * 4


def test_frontier_and_suite_caches_respect_sliding_layers():
    """The frontier / suite build their caches in `codec_factory`; before the fix it passed no
    sliding windows, so Gemma's sliding layers kept every row (bytes over-counted)."""
    from types import SimpleNamespace

    from kvsplice.evaluate.frontier import codec_factory

    model, ad = _gemma()
    cal = SimpleNamespace(geometry=lambda s, target: _identity_geometry(ad, target))
    cache = codec_factory(model, {"codec": "identity", "target": "kv", "sink": 1}, cal)()
    assert cache.is_sliding == [True, True, False]
    _feed(model, _ids(), cache, CHUNKS)
    row = ad.num_kv_heads * ad.head_dim * 4  # identity payload: one float32 row per token held
    assert [layer.memory()["k_bytes"] for layer in cache.layers] == [(WINDOW - 1) * row, (WINDOW - 1) * row, 16 * row]
