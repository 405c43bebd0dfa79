"""Peers (kvsplice/peers): byte accounting against their tensors, KIVI round trip, what H2O /
StreamingLLM keep on hand examples, the pre-RoPE K codec wrapper. Tiny models, offline."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_llama
from transformers import DynamicCache

from kvsplice.attention import prepare_model
from kvsplice.cache import CompressedCache, CompressedLayer, LayerCodec
from kvsplice.codecs import get_codec
from kvsplice.peers import PeerError, get_peer, peer_names
from kvsplice.peers.h2o import H2O
from kvsplice.peers.hf_quantized import held_nbytes
from kvsplice.peers.kivi import KIVICache, KIVILayer
from kvsplice.peers.streaming import SinkWindowPruner

B, H, D = 2, 2, 8  # tiny llama: 2 layers, 2 KV heads, head_dim 8


def _feed(model, cache, n_prefill: int, n_steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (B, n_prefill + n_steps), generator=g)
    with torch.no_grad():
        model(input_ids=ids[:, :n_prefill], cache=cache, use_cache=True)
        for j in range(n_prefill, n_prefill + n_steps):
            model(input_ids=ids[:, j : j + 1], cache=cache, use_cache=True)


def test_registry_and_bad_parameters():
    assert {"kivi", "h2o", "streamingllm", "hf-quantized", "uniform-int"} <= set(peer_names())
    with pytest.raises(PeerError, match="unknown peer"):
        get_peer("nope")
    with pytest.raises(PeerError, match="unknown parameter"):
        get_peer("kivi", bitz=2)
    with pytest.raises(PeerError, match="bits"):
        get_peer("kivi", bits=9)
    with pytest.raises(PeerError, match="keep_ratio"):
        get_peer("h2o", keep_ratio=0.0)
    with pytest.raises(PeerError, match="backend"):
        get_peer("hf-quantized", backend="fp8")


@pytest.mark.parametrize("bits,group,residual", [(2, 4, 4), (4, 8, 3), (3, 4, 0)])
def test_kivi_bytes_match_tensors_and_formula(bits, group, residual):
    model = make_tiny_llama()
    cache = get_peer("kivi", bits=bits, group=group, residual=residual).cache_factory(model)()
    _feed(model, cache, 21, 6)
    L = 27
    mem = cache.memory()
    held = sum(t.nbytes for layer in cache.layers for t in layer._tensors().values() if t is not None)
    assert mem.total_bytes == held
    # formula: K groups of `group` tokens older than the residual; V tokens older than the residual
    kq = (max(L - residual, 0) // group) * group
    vq = max(L - residual, 0)
    codes = math.ceil(D * bits / 8)
    per_layer = (
        B * H * (kq * codes + (kq // group) * D * 2 * 2 + (L - kq) * D * 4)  # K codes, fp16 lo+step, raw fp32
        + B * H * (vq * codes + vq * 2 * 2 + (L - vq) * D * 4)  # V codes, fp16 lo+step per token, raw
    )
    assert mem.total_bytes == 2 * per_layer
    assert (mem.tokens, mem.batch) == (L, B)
    assert mem.uncompressed_bytes == 2 * 2 * L * B * H * D * 4


def test_kivi_round_trip_error_falls_with_bits():
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 64, 16, generator=g) * torch.linspace(0.2, 5.0, 16)  # outlier-ish channels
    v = torch.randn(1, 2, 64, 16, generator=g)
    errs = []
    for bits in (2, 3, 4, 8):
        layer = KIVILayer(bits=bits, group=16, residual=0)
        layer.update(k, v)
        assert layer.k_raw.shape[2] == 0 and layer.v_raw.shape[2] == 0  # everything quantised
        errs.append((float((layer._read_k() - k).pow(2).mean()), float((layer._read_v() - v).pow(2).mean())))
    for a, b in zip(errs, errs[1:]):
        assert b[0] < a[0] and b[1] < a[1]
    assert errs[-1][0] < 1e-3 * float(k.pow(2).mean())


def test_kivi_step_reads_own_tokens_exactly_and_old_ones_quantised():
    layer = KIVILayer(bits=2, group=4, residual=2)
    x = torch.randn(1, 1, 10, 4)
    k, v = layer.update(x, x + 1)
    assert torch.equal(k, x) and torch.equal(v, x + 1)  # the step's own rows are exact
    y = torch.randn(1, 1, 1, 4)
    k2, _ = layer.update(y, y)
    assert torch.equal(k2[:, :, -1:], y)
    assert not torch.allclose(k2[:, :, :8], x[:, :, :8])  # groups 0..7 were quantised at 2 bits
    assert torch.equal(k2[:, :, 8:10], x[:, :, 8:10])  # residual rows stay exact


def test_uniform_int_bytes_match_formula():
    model = make_tiny_llama()
    for bits, target in ((4, "kv"), (2, "v")):
        cache = get_peer("uniform-int", bits=bits, target=target).cache_factory(model)()
        _feed(model, cache, 12, 3)
        L, per_vec = 15, math.ceil(D * bits / 8) + 4  # codes + fp16 min + fp16 step
        coded = per_vec * L * B * H
        raw = L * B * H * D * 4
        expect = 2 * (coded + (coded if target == "kv" else raw))
        assert cache.memory().total_bytes == expect


def test_h2o_keeps_heavy_hitters_and_recent_on_hand_example():
    """8 tokens, one head. Queries 0..3 attend uniformly; queries 4..7 put 0.9 on token 4, 0.1 spread
    over the rest. Accumulated mass: token 4 ~ 4.0, token 0 ~ 2.16, token 1 ~ 1.16, others less.
    Budget 4 (keep_ratio 0.5), recent 2 -> keeps tokens 0, 4 (heavy hitters) and 6, 7 (recent)."""
    T = 8
    probs = torch.zeros(1, 1, T, T)
    for i in range(T):
        if i < 4:
            probs[0, 0, i, : i + 1] = 1.0 / (i + 1)
        else:
            probs[0, 0, i, : i + 1] = 0.1 / i
            probs[0, 0, i, 4] = 0.9
    allowed = torch.ones(T, T).tril().bool()[None, None]
    layer = CompressedLayer(pruner=H2O(keep_ratio=0.5, recent=2).pruner(), layer_idx=0)
    x = torch.arange(T, dtype=torch.float32).view(1, 1, T, 1).expand(1, 1, T, 2).contiguous()
    layer.update(x, x, kwargs={})
    layer.observe(probs, allowed)
    assert layer.positions.flatten().tolist() == [0, 4, 6, 7]
    assert layer.v_rows.raw[0, 0, :, 0].tolist() == [0.0, 4.0, 6.0, 7.0]
    assert layer.k_rows.raw[0, 0, :, 0].tolist() == [0.0, 4.0, 6.0, 7.0]  # K evicted with V


def test_sink_window_pruner_on_hand_example():
    pr = SinkWindowPruner(sinks=2, window=3)
    imp = pr.importance(torch.rand(1, 1, 10), torch.ones(1, 1, 10))
    assert pr.select(imp, 10).flatten().tolist() == [0, 1, 7, 8, 9]


def test_streamingllm_cache_keeps_sinks_and_window_while_decoding():
    model = make_tiny_llama()
    cache = get_peer("streamingllm", sinks=2, window=5).cache_factory(model)()
    with prepare_model(model):
        _feed(model, cache, 10, 6)
    for layer in cache.layers:
        assert layer.positions.shape[1] == H  # one selection per KV head
        for pos in layer.positions.reshape(-1, 7).tolist():
            assert pos == [0, 1, 11, 12, 13, 14, 15]
    mem = cache.memory()
    # rows held: 7 per (layer, sequence, head), K and V in fp32; int32 positions; float32 mass + exposure
    assert mem.k_bytes == mem.v_bytes == 2 * B * H * 7 * D * 4
    assert mem.index_bytes == 2 * B * H * 7 * 4 and mem.other_bytes == 2 * 2 * B * H * 7 * 4
    assert mem.total_bytes == mem.k_bytes + mem.v_bytes + mem.index_bytes + mem.other_bytes and mem.tokens == 16


def test_h2o_cache_budget_while_decoding():
    model = make_tiny_llama()
    cache = get_peer("h2o", keep_ratio=0.5, recent=3).cache_factory(model)()
    with prepare_model(model):
        _feed(model, cache, 12, 4)
    for layer in cache.layers:
        pos = layer.positions
        assert pos.shape[-1] == 8  # floor(0.5 * 16)
        assert (pos[..., -3:] == torch.tensor([13, 14, 15], dtype=pos.dtype)).all()  # recent always kept


def test_hf_quantized_bytes_match_its_tensors():
    pytest.importorskip("hqq")
    model = make_tiny_llama()
    cache = get_peer("hf-quantized", backend="hqq", bits=4, group=8, residual=4).cache_factory(model)()
    _feed(model, cache, 20, 2)  # prefill quantised whole; 2 decode tokens in the fp32 residual
    mem = cache.memory()
    held = 0
    for layer in cache.layers:
        for q in (layer._quantized_keys, layer._quantized_values):
            held += q[0].nbytes + q[1]["scale"].nbytes + q[1]["zero"].nbytes
        held += layer.keys.nbytes + layer.values.nbytes
    assert mem.total_bytes == held == held_nbytes([[(l._quantized_keys, l._quantized_values, l.keys, l.values)] for l in cache.layers])
    # independent count: 20 tokens at 4 bits + fp32 scale and zero per group of 8 values; 2 raw fp32 tokens
    n = B * H * 20 * D
    assert mem.total_bytes == 2 * 2 * (n // 2 + (n // 8) * 2 * 4 + B * H * 2 * D * 4)
    assert mem.tokens == 22 and mem.batch == B


def test_pre_rope_k_codec_is_exact_with_identity_and_sees_pre_rope_k():
    from kvsplice.kcodec import PreRopeLayerCodec, find_rotary

    model = make_tiny_llama()
    rotary = find_rotary(model)
    ident = LayerCodec([get_codec("identity").fit(torch.zeros(1, D))] * H)
    k_codecs = [PreRopeLayerCodec(ident, rotary) for _ in range(2)]
    ids = torch.randint(3, 250, (1, 30))
    with torch.no_grad():
        ref = model(input_ids=ids, cache=DynamicCache(), use_cache=True).logits
        cache = CompressedCache(2, k_codecs=k_codecs)
        out = model(input_ids=ids[:, :20], cache=cache, use_cache=True).logits
        for j in range(20, 30):
            out = torch.cat([out, model(input_ids=ids[:, j : j + 1], cache=cache, use_cache=True).logits], 1)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    # what the inner codec stores is the k_proj output (pre-RoPE K)
    from kvsplice.models import get_adapter

    with get_adapter(model).capture("k") as cap, torch.no_grad():
        model(input_ids=ids, use_cache=False)
    cache = CompressedCache(2, k_codecs=k_codecs)
    with torch.no_grad():
        model(input_ids=ids, cache=cache, use_cache=True)
    torch.testing.assert_close(cache.layers[0].k_rows.payload["z"], cap.records[0][0], atol=1e-5, rtol=1e-5)
