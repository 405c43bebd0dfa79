"""kvsplice/rope.py, kvsplice/kcodec.py and the cache's TokenIndex: the per-layer rotary lookup, the
pre-RoPE K codec at each sequence's true positions, and the sink on each sequence's first real token
(issue 8 section 1: left-padded batches, bf16)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama
from test_cache import F32, MAKERS, feed, identity_codecs, layout, make_geometry, no_eos, pca_codecs
from transformers import DynamicCache

from kvsplice.cache import CompressedCache, CompressedLayer, LayerCodec
from kvsplice.codecs import get_codec
from kvsplice.errors import KVSpliceError, ModelError
from kvsplice.kcodec import PreRopeLayerCodec
from kvsplice.rope import RotaryLookup, find_rotary, layer_rotary


def test_rotary_lookup_equals_the_models_module_in_float32():
    """Table lookups (grown past the first 256 positions) and negative positions (computed directly)
    give the module's own cos / sin, in float32."""
    model = make_tiny_llama()
    module = find_rotary(model)
    lookup = layer_rotary(model, 0)
    pos = torch.tensor([[0, 3, 255, 256, 700], [5, 5, 1, 2, 1000]])
    for p in (pos, pos - 3):
        cos, sin = lookup(p)
        ref_cos, ref_sin = module(torch.zeros(1), p)
        assert cos.dtype == torch.float32 and cos.shape == (2, 5, 8)
        torch.testing.assert_close(cos, ref_cos, atol=1e-6, rtol=0)
        torch.testing.assert_close(sin, ref_sin, atol=1e-6, rtol=0)
    assert layer_rotary(model, 1, shared := {}) is layer_rotary(model, 0, shared)  # one table per layer type


def test_pre_rope_codec_round_trip_is_exact_for_bf16_input():
    """Un-rotate, identity codec, re-rotate, all in float32: bf16 K comes back bit-exact after the cast."""
    model = make_tiny_llama()
    ident = LayerCodec([get_codec("identity").fit(torch.zeros(1, 8))] * 2)
    codec = PreRopeLayerCodec(ident, layer_rotary(model, 0)).to(torch.device("cpu"), torch.bfloat16)
    k = (torch.randn(2, 2, 50, 8) * 3).to(torch.bfloat16)
    pos = torch.arange(50).expand(2, 50) + torch.tensor([[0], [123]])
    out = codec.decode(codec.encode(k, pos), pos)
    assert out.dtype == torch.float32
    assert torch.equal(out.to(torch.bfloat16), k)
    assert (codec.encode(k, pos)["z"].float() - k.float()).abs().max() > 0.1  # RoPE really was undone


def test_pre_rope_codec_needs_positions():
    model = make_tiny_llama()
    ident = LayerCodec([get_codec("identity").fit(torch.zeros(1, 8))] * 2)
    codec = PreRopeLayerCodec(ident, find_rotary(model))  # a module is accepted (wrapped in a lookup)
    with pytest.raises(KVSpliceError, match="positions"):
        codec.encode(torch.randn(1, 2, 4, 8))
    with pytest.raises(KVSpliceError, match="positions"):
        codec.encode(torch.randn(1, 2, 4, 8), torch.arange(3)[None])


def test_length_dependent_rotary_is_refused():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=8, max_position_embeddings=64,
                      rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0})
    with pytest.raises(ModelError, match="dynamic"):
        layer_rotary(LlamaForCausalLM(cfg), 0)


def test_layer_type_rotary_needs_layer_types():
    class TypedRotary(torch.nn.Module):
        def forward(self, x, position_ids, layer_type):
            raise AssertionError("not called")

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.rotary_emb = TypedRotary()
            self.config = type("Cfg", (), {"layer_types": None})()

    with pytest.raises(ModelError, match="layer_type"):
        layer_rotary(Model(), 0)
    assert isinstance(RotaryLookup(TypedRotary(), "sliding_attention"), RotaryLookup)


# -- issue 8, section 1: left padding, sink, float32 RoPE ----------------------------------------------------


def pcaq_codecs(model, bits=4, seed=0):
    """Per-head pca-q codecs fitted on random vectors (deterministic, lossy)."""
    L, H, D = layout(model)
    g = torch.Generator().manual_seed(seed)
    return [LayerCodec([get_codec("pca-q", bits=bits).fit(torch.randn(256, D, generator=g)) for _ in range(H)])
            for _ in range(L)]


def pre_rope(model, codecs):
    from kvsplice.kcodec import PreRopeLayerCodec, find_rotary

    return [PreRopeLayerCodec(c, find_rotary(model)) for c in codecs]


def left_padded(prompts):
    """Token lists -> (ids (B, T) left-padded with 0, attention mask (B, T))."""
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    return ids, mask


def generate_positions(mask):
    """What generate passes for a left-padded batch: cumsum of the mask - 1, pads at 0."""
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


PROMPTS = [[5, 17, 99, 23, 42, 8, 61, 77, 150, 12, 31, 64], [120, 7, 33, 81, 9, 140, 55]]


def test_left_padded_batch_with_k_codec_equals_each_prompt_alone():
    """Issue 8 §1: a K geometry on a left-padded batch must give each row what it gives alone
    (the K codec used to assume row index == position)."""
    model = no_eos(make_tiny_llama())
    L = model.config.num_hidden_layers
    v, k = pcaq_codecs(model), pre_rope(model, pcaq_codecs(model, seed=1))
    ids, mask = left_padded(PROMPTS)
    batch = model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                           cache=CompressedCache(L, v, k, sink=1))
    for i, p in enumerate(PROMPTS):
        alone = model.generate(torch.tensor([p]), max_new_tokens=8, do_sample=False,
                               cache=CompressedCache(L, v, k, sink=1))
        assert batch[i, -8:].tolist() == alone[0, -8:].tolist()


def test_k_codec_sees_true_pre_rope_k_in_a_left_padded_batch():
    """The inner K codec must receive the k_proj output (pre-RoPE K) of every real token, padded rows included."""
    model = make_tiny_llama()
    L, H, D = layout(model)
    ident = LayerCodec([get_codec("identity").fit(torch.zeros(1, D))] * H)
    ids, mask = left_padded(PROMPTS)
    seen = []
    model.model.layers[0].self_attn.k_proj.register_forward_hook(lambda m, i, o: seen.append(o))
    cache = CompressedCache(L, k_codecs=pre_rope(model, [ident] * L))
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=generate_positions(mask), cache=cache, use_cache=True)
    pre = seen[0].view(2, -1, H, D).transpose(1, 2)  # (B, H, T, D)
    real = mask.bool()[:, None, :, None].expand_as(pre)
    payload = cache.layers[0].k_rows.payload["z"]
    torch.testing.assert_close(payload[real], pre[real], atol=1e-5, rtol=0)


def test_identity_k_path_left_padded_equals_dynamic_cache_logits():
    """Identity codecs (K through the pre-RoPE path) on a left-padded batch: DynamicCache logits at every
    real position, prefill and decode steps (float32, atol 1e-5)."""
    model = make_tiny_llama()
    L, H, D = layout(model)
    ids, mask = left_padded(PROMPTS)
    pos = generate_positions(mask)
    steps = torch.tensor([[11, 12, 13], [21, 22, 23]])
    logits = {}
    compressed = CompressedCache(L, identity_codecs(model), pre_rope(model, identity_codecs(model)), sink=1)
    for name, cache in (("ref", DynamicCache(config=model.config)), ("got", compressed)):
        with torch.no_grad():
            out = [model(ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits]
            for j in range(3):
                m = torch.cat([mask, torch.ones(2, j + 1, dtype=torch.long)], 1)
                out.append(model(steps[:, j : j + 1], attention_mask=m, position_ids=pos[:, -1:] + j + 1,
                                 cache=cache, use_cache=True).logits)
        logits[name] = torch.cat(out, 1)
    real = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1).bool()
    torch.testing.assert_close(logits["got"][real], logits["ref"][real], atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sink_is_each_sequences_first_real_token(arch):
    """Issue 8 §1: with left padding the sink must hold the first REAL token exactly, not the pad."""
    model = no_eos(MAKERS[arch]())
    L, H, D = layout(model)
    ids, mask = left_padded(PROMPTS)  # sequence 1 has 5 pads
    ref = DynamicCache(config=model.config)
    k = pre_rope(model, pcaq_codecs(model, bits=3)) if arch == "llama" else pcaq_codecs(model, bits=3)
    cache = CompressedCache(L, pcaq_codecs(model, bits=3), k, sink=1)
    for c in (ref, cache):
        with torch.no_grad():
            model(ids, attention_mask=mask, position_ids=generate_positions(mask), cache=c, use_cache=True)
    for layer, r in zip(cache.layers, ref.layers):
        k_read, v_read = layer.k_rows.read(), layer.v_rows.read()
        for b, first in ((0, 0), (1, 5)):
            torch.testing.assert_close(k_read[b, :, first], r.keys[b, :, first], atol=0, rtol=0)
            torch.testing.assert_close(v_read[b, :, first], r.values[b, :, first], atol=0, rtol=0)
        assert (v_read[1, :, 0] - r.values[1, :, 0]).abs().max() > 1e-3  # the pad row is coded like any other
    assert cache.tokens.sink_rows.tolist() == [[0], [5]]
    m = cache.memory()
    positions = 2 * 12 * F32 if arch == "llama" else 0  # pre-RoPE K: every row's position, once per cache
    assert m.index_bytes == 2 * 1 * 8 + positions
    assert m.window_bytes == L * 2 * (2 * H * D * F32)


def test_pre_rope_k_path_is_lossless_in_bf16():
    """Issue 8 §1: the un-rotate / re-rotate runs in float32, so a no-op K codec gives DynamicCache's
    logits in bf16 (it used to differ by up to 0.6 on SmolLM2)."""
    model = make_tiny_llama().to(torch.bfloat16)
    L, H, D = layout(model)
    ids = torch.randint(3, 200, (2, 40), generator=torch.Generator().manual_seed(7))
    ident = LayerCodec([get_codec("identity").fit(torch.zeros(1, D))] * H)
    ref = feed(model, ids, DynamicCache(config=model.config), [30, 1, 1, 8])
    cache = CompressedCache(L, k_codecs=pre_rope(model, [ident] * L))
    with torch.no_grad():
        got = feed(model, ids, cache, [30, 1, 1, 8])
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert cache.layers[0].k_rows.payload["z"].dtype == torch.float32  # held (and counted) in float32


def test_cache_without_positions_is_refused_when_it_needs_them():
    """A sink or a pre-RoPE K codec needs each row's position: a caller that passes none gets a clear error."""
    model = make_tiny_llama()
    k, v = torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)
    layer = CompressedLayer(v_codec=pca_codecs(model, 3)[0], layer_idx=0, sink=1)
    with pytest.raises(ModelError, match="position_ids"):
        layer.update(k, v, kwargs={})
    layer = CompressedLayer(v_codec=pca_codecs(model, 3)[0], layer_idx=0, sink=1)  # with positions: fine
    layer.update(k, v, kwargs={"position_ids": torch.arange(4)[None]})
    assert layer.get_seq_length() == 4


def test_gemma3_pre_rope_k_uses_each_layers_rotary_table():
    """Gemma 3 rotates sliding and global layers with different tables (rope_theta per layer type): the
    K codec of every layer must see that layer's true pre-RoPE K (the k_norm output), in a left-padded batch."""
    import transformers

    from kvsplice.geometry import Geometry

    torch.manual_seed(0)
    cfg = transformers.Gemma3TextConfig(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=64, max_position_embeddings=256,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2,
        pad_token_id=0)
    model = transformers.Gemma3ForCausalLM(cfg).eval()
    ident = get_codec("identity").fit(torch.zeros(1, 8))
    k_geometry = make_geometry({(l, 0): ident for l in range(3)}, {"target": "k"})
    cache = CompressedCache.from_geometry(model, k_geometry=k_geometry)
    seen = {}
    for i, layer in enumerate(model.model.layers):
        layer.self_attn.k_norm.register_forward_hook(lambda m, a, out, i=i: seen.__setitem__(i, out))
    ids, mask = left_padded(PROMPTS)
    with torch.no_grad():
        model(ids, attention_mask=mask, position_ids=generate_positions(mask), cache=cache, use_cache=True)
    real = mask.bool()[:, None, :, None].expand(2, 1, ids.shape[1], 8)
    for i in range(3):
        torch.testing.assert_close(cache.layers[i].k_rows.payload["z"][real], seen[i][real], atol=1e-5, rtol=0)


def test_put_sink_leaves_empty_slots_alone():
    """Sink slots not filled yet (-1) must not overwrite a filled slot's row, whatever the scatter order."""
    from kvsplice.rows import _put_sink

    B, H, S, D = 3, 2, 5, 4
    out = torch.zeros(B, H, S, D)
    head = torch.arange(1.0, 1 + B * H * 2 * D).view(B, H, 2, D)
    rows = torch.tensor([[0, 3], [0, -1], [-1, -1]])
    for _ in range(20):  # a conflicting write would show up in some order
        got = _put_sink(out.clone(), head, rows)
        want = out.clone()
        want[0, :, 0], want[0, :, 3], want[1, :, 0] = head[0, :, 0], head[0, :, 1], head[1, :, 0]
        assert torch.equal(got, want)
