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
from kvsplice.peers.h2o import H2O, split_budget
from kvsplice.peers.hf_quantized import HFQuantized, held_nbytes
from kvsplice.peers.kivi import KIVILayer
from kvsplice.peers.streaming import SinkWindowPruner

B, H, D = 2, 2, 8  # tiny llama: 2 layers, 2 KV heads, head_dim 8


def _feed(model, cache, n_prefill: int, n_steps: int, seed: int = 0) -> torch.Tensor:
    """Prefill n_prefill random tokens, then decode n_steps one at a time; the last logits (B, 1, V)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 250, (B, n_prefill + n_steps), generator=g)
    with torch.no_grad():
        out = model(input_ids=ids[:, :n_prefill], cache=cache, use_cache=True).logits[:, -1:]
        for j in range(n_prefill, n_prefill + n_steps):
            out = model(input_ids=ids[:, j : j + 1], cache=cache, use_cache=True).logits
    return out


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


def _kivi_feed(layer: KIVILayer, k: torch.Tensor, v: torch.Tensor, prefill: int, chunk: int) -> None:
    """Feed (B, H, T, D) K/V to one KIVI layer: `prefill` rows at once, then `chunk` rows per step."""
    layer.update(k[:, :, :prefill], v[:, :, :prefill])
    for j in range(prefill, k.shape[2], chunk):
        layer.update(k[:, :, j : j + chunk], v[:, :, j : j + chunk])


@pytest.mark.parametrize("prefill,chunk", [(300, 1), (100, 1), (200, 16), (128, 1), (5, 7)])
def test_kivi_official_residual_rule_at_300_tokens(prefill, chunk):
    """The reference (jy-yuan/KIVI models/llama_kivi.py): K keeps the last L mod R rows in full
    precision (flushed a whole R block at a time), V the newest min(L, R) rows. L = 300, R = 128:
    K 300 mod 128 = 44 raw rows, 256 quantised (8 groups of 32 tokens); V 128 raw, 172 quantised."""
    torch.manual_seed(0)
    k, v = torch.randn(1, 2, 300, 64), torch.randn(1, 2, 300, 64)
    layer = KIVILayer(bits=2, group=32, residual=128, v_group=32)
    _kivi_feed(layer, k, v, prefill, chunk)
    assert layer.k_raw.shape[2] == 44 and layer.k_codes.shape[2] == 256
    assert layer.k_lo.shape == layer.k_step.shape == (1, 2, 256 // 32, 64)  # per channel, per 32 tokens
    assert layer.v_raw.shape[2] == 128 and layer.v_codes.shape[2] == 172
    assert layer.v_lo.shape == layer.v_step.shape == (1, 2, 172, 64 // 32)  # per token, per 32 channels
    torch.testing.assert_close(layer.k_raw, k[:, :, 256:], rtol=0, atol=0)  # residual rows are exact
    torch.testing.assert_close(layer.v_raw, v[:, :, 172:], rtol=0, atol=0)


def test_kivi_v_groups_of_32_channels_have_their_own_scale():
    """Channels 0..31 of V tiny, 32..63 large: with groups of 32 the tiny half gets its own scale and
    comes back >100x more accurately than with one scale per head vector (the old behaviour)."""
    torch.manual_seed(0)
    v = torch.cat([torch.randn(1, 1, 8, 32) * 1e-2, torch.randn(1, 1, 8, 32) * 10.0], dim=-1)
    k = torch.randn(1, 1, 8, 64)
    err = {}
    for vg in (32, None):
        layer = KIVILayer(bits=4, group=4, residual=4, v_group=vg)
        layer.update(k, v)
        layer.update(k[:, :, :4], v[:, :, :4])  # 12 tokens: V keeps the newest 4 raw, 8 quantised
        err[vg] = float((layer._read_v()[:, :, :8, :32] - v[:, :, :, :32]).abs().max())
    assert layer.v_lo.shape[-1] == 1
    assert err[32] < 5e-3 < err[None] and err[32] * 100 < err[None]


@pytest.mark.parametrize("dtype,elem", [(torch.float32, 4), (torch.bfloat16, 2)])
def test_kivi_bytes_are_codes_scales_and_residual_in_model_dtype(dtype, elem):
    """Every byte: K codes + fp16 lo/step per (channel, group of g tokens), V codes + fp16 lo/step per
    (token, group of vg channels), and the K (L mod R) and V (min(L, R)) residual rows in the MODEL
    dtype. Tiny llama: 2 layers, B 2, 2 KV heads, D 8; g 4, R 8, vg 4; L = 21 + 6 = 27."""
    model = make_tiny_llama().to(dtype)
    bits, g, R, vg, L = 2, 4, 8, 4, 27
    cache = get_peer("kivi", bits=bits, group=g, residual=R, v_group=vg).cache_factory(model)()
    out = _feed(model, cache, 21, 6)
    assert bool(torch.isfinite(out).all())
    mem = cache.memory()
    held = sum(t.nbytes for layer in cache.layers for t in layer._tensors().values() if t is not None)
    assert mem.total_bytes == held
    kq, vq = L - L % R, L - min(L, R)  # 24 K rows quantised (3 raw), 19 V rows quantised (8 raw)
    codes = math.ceil(D * bits / 8)
    per_layer = B * H * (
        kq * codes + (kq // g) * D * 2 * 2 + (L - kq) * D * elem  # K: codes, fp16 lo + step, raw rows
        + vq * codes + vq * (D // vg) * 2 * 2 + (L - vq) * D * elem  # V: codes, fp16 lo + step, raw rows
    )
    assert mem.total_bytes == 2 * per_layer
    assert mem.window_bytes == 2 * B * H * ((L - kq) + (L - vq)) * D * elem
    assert (mem.tokens, mem.batch) == (L, B)
    assert mem.uncompressed_bytes == 2 * 2 * L * B * H * D * elem


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_kivi_round_trip_within_half_a_step(bits):
    """Quantised rows come back within half a quantisation step of their group (+ fp16 rounding of
    the minimum); the error falls with the bits."""
    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 2, 64, 64, generator=g) * torch.linspace(0.2, 5.0, 64)  # outlier-ish channels
    v = torch.randn(1, 2, 64, 64, generator=g)
    layer = KIVILayer(bits=bits, group=32, residual=32, v_group=32)
    layer.update(k, v)
    assert layer.k_raw.shape[2] == 0 and layer.v_raw.shape[2] == 32  # 64 mod 32 = 0; V keeps R
    k_step = layer.k_step.float().repeat_interleave(32, dim=2)  # (1, 2, 64, 64) per row and channel
    v_step = layer.v_step.float().repeat_interleave(32, dim=3)  # (1, 2, 32, 64)
    k_err = (layer._read_k() - k).abs()
    v_err = (layer._read_v()[:, :, :32] - v[:, :, :32]).abs()
    assert bool((k_err <= 0.5 * k_step + 2e-3 * k.abs()).all())
    assert bool((v_err <= 0.5 * v_step + 2e-3 * v[:, :, :32].abs()).all())
    assert float(k_err.pow(2).mean()) < {2: 0.2, 3: 0.05, 4: 0.01, 8: 1e-4}[bits] * float(k.pow(2).mean())


def test_kivi_step_reads_own_tokens_exactly_and_old_ones_quantised():
    layer = KIVILayer(bits=2, group=4, residual=8, v_group=None)
    x = torch.randn(1, 1, 10, 4)
    k, v = layer.update(x, x + 1)
    assert torch.equal(k, x) and torch.equal(v, x + 1)  # the step's own rows are exact
    y = torch.randn(1, 1, 1, 4)
    k2, v2 = layer.update(y, y)
    assert torch.equal(k2[:, :, -1:], y)
    assert not torch.allclose(k2[:, :, :8], x[:, :, :8])  # one R block (8 rows) was quantised at 2 bits
    assert torch.equal(k2[:, :, 8:10], x[:, :, 8:10])  # 10 mod 8 = 2 residual K rows stay exact
    assert not torch.allclose(v2[:, :, :2], x[:, :, :2] + 1) and torch.equal(v2[:, :, 2:10], x[:, :, 2:10] + 1)


def test_kivi_residual_must_be_a_multiple_of_group():
    with pytest.raises(PeerError, match="multiple of group"):
        get_peer("kivi", group=32, residual=48)
    assert get_peer("kivi").params() == {"bits": 2, "group": 32, "residual": 128, "v_group": 32}  # paper


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
    Budget heavy 2 + recent 2 -> keeps tokens 0, 4 (heavy hitters) and 6, 7 (recent)."""
    T = 8
    probs = torch.zeros(1, 1, T, T)
    for i in range(T):
        if i < 4:
            probs[0, 0, i, : i + 1] = 1.0 / (i + 1)
        else:
            probs[0, 0, i, : i + 1] = 0.1 / i
            probs[0, 0, i, 4] = 0.9
    allowed = torch.ones(T, T).tril().bool()[None, None]
    layer = CompressedLayer(pruner=H2O(heavy=2, recent=2).pruner(), layer_idx=0)
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
    # charged: only the 7 kept K and V rows per (layer, sequence, head), fp32; no positions, no
    # statistics (StreamingLLM needs neither), although the harness holds them
    assert mem.k_bytes == mem.v_bytes == 2 * B * H * 7 * D * 4
    assert mem.index_bytes == 0 and mem.other_bytes == 0 and cache.layers[0].mass is not None
    assert mem.total_bytes == mem.k_bytes + mem.v_bytes and mem.tokens == 16


def test_h2o_fixed_heavy_plus_recent_budget_while_decoding():
    """The reference cache is heavy + recent rows, fixed (not a fraction of the growing length)."""
    model = make_tiny_llama()
    cache = get_peer("h2o", heavy=3, recent=3).cache_factory(model)()
    with prepare_model(model):
        _feed(model, cache, 12, 4)
        for layer in cache.layers:
            pos = layer.positions
            assert pos.shape[-1] == 6  # heavy 3 + recent 3, at 16 tokens
            assert (pos[..., -3:] == torch.tensor([13, 14, 15], dtype=pos.dtype)).all()  # recent always kept
        _feed(model, cache, 8, 0, seed=1)  # 8 more tokens: still 6 rows
    assert all(layer.positions.shape[-1] == 6 for layer in cache.layers)
    mem = cache.memory()
    # charged: 6 K and V rows (fp32) + one float32 accumulated score per row and KV head; no positions
    assert mem.k_bytes == mem.v_bytes == 2 * B * H * 6 * D * 4
    assert mem.index_bytes == 0 and mem.other_bytes == 2 * B * H * 6 * 4
    assert mem.total_bytes == mem.k_bytes + mem.v_bytes + mem.other_bytes and mem.tokens == 24


def test_h2o_parameters_and_published_split():
    with pytest.raises(PeerError, match="exactly one of heavy"):
        get_peer("h2o")
    with pytest.raises(PeerError, match="exactly one of heavy"):
        get_peer("h2o", heavy=4, keep_ratio=0.5)
    assert split_budget(64) == (32, 32) and split_budget(65) == (32, 33)
    legacy = get_peer("h2o", keep_ratio=0.5, recent=3).pruner()  # growing budget, kept for old configs
    assert legacy.budget(16, 16) == 8 and legacy.budget(32, 32) == 16


@pytest.mark.parametrize("name,params", [
    ("kivi", {"bits": 2, "group": 4, "residual": 8, "v_group": 4}),
    ("hf-quantized", {"backend": "quanto", "bits": 4, "group": 8, "residual": 4}),
    ("h2o", {"heavy": 4, "recent": 4}),
    ("streamingllm", {"sinks": 2, "window": 6}),
    ("uniform-int", {"bits": 4}),
])
def test_every_peer_runs_in_bf16_with_its_full_precision_rows_in_bf16(name, params):
    model = make_tiny_llama().to(torch.bfloat16)
    cache = get_peer(name, **params).cache_factory(model)()
    with prepare_model(model):
        out = _feed(model, cache, 20, 3)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())
    mem = cache.memory()
    assert mem.uncompressed_bytes == 2 * 2 * 23 * B * H * D * 2  # bf16 reference
    if name in ("h2o", "streamingllm"):  # kept rows raw, in bf16
        assert mem.k_bytes == 2 * B * H * 8 * D * 2
    if name == "kivi":  # K 23 mod 8 = 7 rows and V the newest 8 rows, in bf16
        assert mem.window_bytes == 2 * B * H * (7 + 8) * D * 2
    if name == "hf-quantized":  # 3 decoded tokens in the bf16 residual
        assert mem.window_bytes == 2 * 2 * B * H * 3 * D * 2


def test_hf_quantized_defaults_are_the_library_defaults():
    import inspect

    from transformers.cache_utils import HQQQuantizedLayer, QuantoQuantizedLayer

    peer = HFQuantized()
    for layer_cls in (QuantoQuantizedLayer, HQQQuantizedLayer):
        d = {k: p.default for k, p in inspect.signature(layer_cls.__init__).parameters.items() if k != "self"}
        assert (peer.bits, peer.group, peer.residual, peer.axis_key, peer.axis_value) == (
            d["nbits"], d["q_group_size"], d["residual_length"], d["axis_key"], d["axis_value"]) == (4, 64, 128, 0, 0)
    assert peer.backend == "quanto"  # generate(cache_implementation="quantized") default backend


def test_hf_quanto_bytes_and_residual_cycle():
    """quanto, axis 0, group 8 = head_dim: one scale + shift (model dtype) per token and head. The
    residual fills to R - 1 tokens, then everything is re-quantised and the residual empties."""
    model = make_tiny_llama()
    cache = get_peer("hf-quantized", backend="quanto", bits=4, group=8, residual=4).cache_factory(model)()
    _feed(model, cache, 20, 3)  # prefill quantised whole; 3 decode tokens in the fp32 residual
    mem = cache.memory()
    n = B * H * 20 * D
    assert mem.window_bytes == 2 * 2 * B * H * 3 * D * 4
    assert mem.total_bytes == 2 * 2 * (n // 2 + (n // 8) * 2 * 4) + mem.window_bytes
    _feed(model, cache, 1, 0, seed=1)  # the 4th residual token: re-quantise all 24, residual empty
    mem = cache.memory()
    n = B * H * 24 * D
    assert mem.window_bytes == 0 and mem.total_bytes == 2 * 2 * (n // 2 + (n // 8) * 2 * 4)


def test_hf_quantized_bytes_match_its_tensors():
    pytest.importorskip("hqq")
    model = make_tiny_llama()
    cache = get_peer("hf-quantized", backend="hqq", bits=4, group=8, residual=4, axis_key=1, axis_value=1).cache_factory(model)()
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


@pytest.mark.parametrize("nbits", [2, 4])
def test_hf_quanto_round_trip_within_half_a_step_per_token_head(nbits):
    """Library defaults (axis 0, group 64 = head_dim): each token's head vector has its own scale,
    so the round trip is within half of that vector's step (max - min) / (2**nbits - 1)."""
    pytest.importorskip("optimum.quanto")
    from transformers.cache_utils import QuantoQuantizedLayer

    g = torch.Generator().manual_seed(0)
    k = torch.randn(1, 3, 10, 64, generator=g) * torch.logspace(-2, 1, 10).view(1, 1, 10, 1)  # scales differ per token
    layer = QuantoQuantizedLayer(nbits=nbits)
    layer.update(k, k.clone())
    back = layer._dequantize(layer._quantized_keys)
    step = (k.amax(-1, keepdim=True) - k.amin(-1, keepdim=True)) / (2**nbits - 1)  # (1, 3, 10, 1)
    assert bool(((back - k).abs() <= 0.5 * step * 1.01 + 1e-6).all())
