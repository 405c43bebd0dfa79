"""The supported model types, each as a tiny random config built here (offline, float32):

* capture at the cache: shapes (B, H_kv, T, head_dim); V and K are what the cache receives; the
  captured pre-RoPE K re-rotated with the model's own cos/sin is the cached K; pre-RoPE K equals an
  independent computation (k_norm output, fused-projection slice, k_proj output);
* a pca-q K+V calibration gives a geometry, and a cache built from it generates;
* identity V and K codecs (K through the pre-RoPE path) give the logits of a DynamicCache.
"""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_VOCAB, make_tiny_gpt2, make_tiny_llama
from transformers import DynamicCache

from kvsplice.cache import CompressedCache
from kvsplice.calibrate import CalibrationConfig, calibrate
from kvsplice.capture import CapturedKV, apply_rope, capture_kv
from kvsplice.codecs import get_codec
from kvsplice.errors import ModelError
from kvsplice.geometry import Geometry
from kvsplice.models import get_adapter, supported_model_types

COMMON = dict(vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              bos_token_id=1, eos_token_id=2, pad_token_id=0)
WINDOW = 6  # Gemma 3's sliding window here: shorter than the test sequences


def _build(cfg_name: str, model_name: str, **kw):
    import transformers

    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_name)(**{**COMMON, **kw})
    return getattr(transformers, model_name)(cfg).eval()


MAKERS = {
    "gpt2": lambda: make_tiny_gpt2(),
    "llama": lambda: make_tiny_llama(),
    "mistral": lambda: _build("MistralConfig", "MistralForCausalLM", head_dim=8),
    "qwen2": lambda: _build("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": lambda: _build("Qwen3Config", "Qwen3ForCausalLM", head_dim=8),
    # 3 layers: sliding, sliding, global (Gemma 3's 5:1 pattern, shortened); one KV head as in 270M
    "gemma3_text": lambda: _build("Gemma3TextConfig", "Gemma3ForCausalLM", num_hidden_layers=3, num_key_value_heads=1,
                                  head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                                  layer_types=["sliding_attention", "sliding_attention", "full_attention"]),
    "phi3": lambda: _build("Phi3Config", "Phi3ForCausalLM"),  # fused qkv_proj; full rotary as Phi-3-mini
}
TYPES = sorted(MAKERS)
NORM_K = {"qwen3", "gemma3_text"}  # K normalised per head after k_proj, before RoPE


def test_every_supported_type_is_tested_here():
    assert set(supported_model_types()) == set(TYPES)


def _records(model, ids, **kw) -> tuple[dict[int, CapturedKV], object]:
    recs: dict[int, CapturedKV] = {}
    with capture_kv(model, get_adapter(model).attention_modules(), lambda r: recs.__setitem__(r.layer, r)), torch.no_grad():
        out = model(ids, use_cache=True, **kw)
    return recs, out.past_key_values


def _k_reference(model, ad, i: int, ids) -> torch.Tensor:
    """Pre-RoPE K of layer i computed independently of the cache path: (B, H, T, D)."""
    attn = ad.attention_modules()[i]
    B, T, H, D = ids.shape[0], ids.shape[1], ad.num_kv_heads, ad.head_dim
    mod = attn.k_norm if hasattr(attn, "k_norm") else attn.qkv_proj if hasattr(attn, "qkv_proj") else \
        attn.c_attn if hasattr(attn, "c_attn") else attn.k_proj
    got = []
    h = mod.register_forward_hook(lambda m, a, out: got.append(out.detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    out = got[0]
    if hasattr(attn, "k_norm"):  # (B, T, H, D) or (B, H, T, D) depending on the family
        return out.transpose(1, 2) if out.shape[1] == T and out.shape[2] == H else out
    if hasattr(attn, "qkv_proj"):
        q = ad.num_q_heads * D
        out = out[..., q : q + H * D]
    elif hasattr(attn, "c_attn"):
        C = H * D
        out = out[..., C : 2 * C]
    return out.view(B, T, H, D).transpose(1, 2)


@pytest.mark.parametrize("kind", TYPES)
def test_capture_is_what_the_cache_receives(kind):
    model = MAKERS[kind]()
    ad = get_adapter(model)
    B, T = 2, 5  # T < WINDOW: every layer's DynamicCache still holds all rows
    ids = torch.randint(3, 200, (B, T), generator=torch.Generator().manual_seed(1))
    recs, cache = _records(model, ids)
    assert sorted(recs) == list(range(ad.num_layers))
    for i, r in recs.items():
        shape = (B, ad.num_kv_heads, T, ad.head_dim)
        assert r.keys.shape == r.values.shape == r.keys_pre_rope.shape == shape
        torch.testing.assert_close(r.keys, cache.layers[i].keys, atol=0, rtol=0)
        torch.testing.assert_close(r.values, cache.layers[i].values, atol=0, rtol=0)
        torch.testing.assert_close(r.keys_pre_rope, _k_reference(model, ad, i, ids), atol=1e-5, rtol=1e-5)
        if kind == "gpt2":
            assert r.cos is None  # no RoPE: pre-RoPE K is K
        else:
            torch.testing.assert_close(apply_rope(r.keys_pre_rope, r.cos, r.sin), r.keys, atol=1e-5, rtol=1e-5)
            assert (r.keys_pre_rope[:, :, 1:] - r.keys[:, :, 1:]).abs().max() > 1e-3  # RoPE really was undone


def test_gemma3_layers_get_their_own_rotary_tables():
    """Sliding and global layers of Gemma 3 use different rope_theta: the inversion must use each layer's."""
    model = MAKERS["gemma3_text"]()
    recs, _ = _records(model, torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(2)))
    assert torch.equal(recs[0].cos, recs[1].cos)  # both sliding
    assert not torch.allclose(recs[0].cos, recs[2].cos)  # sliding vs global


def test_positions_come_from_the_model_after_a_cache_prefix():
    """A second chunk through a cache starts at position 5: the captured cos/sin are the model's, so
    pre-RoPE K of the chunk equals pre-RoPE K of the same tokens in one pass."""
    model = make_tiny_llama()
    ids = torch.randint(3, 200, (1, 8), generator=torch.Generator().manual_seed(3))
    whole, _ = _records(model, ids)
    ad, recs = get_adapter(model), {}
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :5], cache=cache, use_cache=True)
        with capture_kv(model, ad.attention_modules(), lambda r: recs.__setitem__(r.layer, r)):
            model(ids[:, 5:], cache=cache, use_cache=True)
    torch.testing.assert_close(recs[0].keys_pre_rope, whole[0].keys_pre_rope[:, :, 5:], atol=1e-5, rtol=1e-5)


def _identity_geometry(ad, target: str) -> Geometry:
    c = get_codec("identity").fit(torch.zeros(1, ad.head_dim))
    codecs = {(l, h): c for l in range(ad.num_layers) for h in range(ad.num_kv_heads)}
    meta = {"target": target, "num_layers": str(ad.num_layers), "num_kv_heads": str(ad.num_kv_heads), "head_dim": str(ad.head_dim)}
    return Geometry(codecs=codecs, meta=meta)


def _feed(model, ids, cache, chunks):
    out, start = [], 0
    with torch.no_grad():
        for n in chunks:
            out.append(model(ids[:, start : start + n], cache=cache, use_cache=True).logits)
            start += n
    return torch.cat(out, 1)


@pytest.mark.parametrize("kind", TYPES)
def test_identity_codecs_k_and_v_equal_dynamic_cache(kind):
    model = MAKERS[kind]()
    ad = get_adapter(model)
    ids = torch.randint(3, 200, (1, 14), generator=torch.Generator().manual_seed(4))  # 14 > WINDOW
    chunks = [8, 1, 1, 3, 1]
    ref = _feed(model, ids, DynamicCache(config=model.config), chunks)
    cache = CompressedCache.from_geometry(model, _identity_geometry(ad, "v"), _identity_geometry(ad, "k"))
    torch.testing.assert_close(_feed(model, ids, cache, chunks), ref, atol=1e-5, rtol=0)


def test_gemma3_sliding_layers_hold_at_most_their_window():
    model = MAKERS["gemma3_text"]()
    ad = get_adapter(model)
    ids = torch.randint(3, 200, (1, 14), generator=torch.Generator().manual_seed(4))
    cache = CompressedCache.from_geometry(model, _identity_geometry(ad, "v"), _identity_geometry(ad, "k"))
    _feed(model, ids, cache, [8, 1, 1, 3, 1])
    row = ad.num_kv_heads * ad.head_dim * 4  # bytes of one float32 K (or V) row of all KV heads
    for i in (0, 1):  # the sliding layers
        m = cache.layers[i].memory()
        assert m["k_bytes"] + m["v_bytes"] + m["window_bytes"] <= 2 * WINDOW * row


TEXT = "def add(a, b):\n    return a + b  # the quick brown fox\n" * 8  # 432 byte tokens


@pytest.mark.parametrize("kind", TYPES)
def test_pca_q_k_and_v_calibration_gives_a_geometry(kind, byte_tokenizer):
    model = MAKERS[kind]()
    ad = get_adapter(model)
    geos = {}
    for target in ("k", "v"):
        cfg = CalibrationConfig(codec="pca-q", rank=4, target=target, seq_len=64, max_batches=3, samples=400,
                                codec_params={"bits": 4})
        geos[target] = calibrate(model, byte_tokenizer, TEXT, cfg, progress=False)
        g = geos[target]
        assert sorted(g.codecs) == [(l, h) for l in range(ad.num_layers) for h in range(ad.num_kv_heads)]
        assert g.meta["target"] == target and g.meta["model_type"] == kind
        assert (int(g.meta["num_kv_heads"]), int(g.meta["head_dim"])) == (ad.num_kv_heads, ad.head_dim)
    cache = CompressedCache.from_geometry(model, geos["v"], geos["k"])
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    ids = torch.randint(3, 200, (1, 6), generator=torch.Generator().manual_seed(5))
    out = model.generate(ids, max_new_tokens=4, do_sample=False, cache=cache)
    assert out.shape == (1, 10) and cache.get_seq_length() == 9  # the last token is never written


def test_partial_rotary_is_inverted_on_its_rotated_dims_only():
    """Phi-3-style partial RoPE (first half of each head rotated): pre-RoPE K = the qkv_proj K slice."""
    model = _build("Phi3Config", "Phi3ForCausalLM", partial_rotary_factor=0.5)
    ad = get_adapter(model)
    ids = torch.randint(3, 200, (1, 7), generator=torch.Generator().manual_seed(6))
    recs, _ = _records(model, ids)
    assert recs[0].cos.shape[-1] == ad.head_dim // 2
    torch.testing.assert_close(recs[0].keys_pre_rope, _k_reference(model, ad, 0, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(recs[0].keys[..., 4:], recs[0].keys_pre_rope[..., 4:], atol=0, rtol=0)


def test_unknown_type_names_what_is_missing():
    import transformers

    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                                                          num_attention_heads=2, intermediate_size=32))
    with pytest.raises(ModelError, match="decoder-layer list") as e:
        get_adapter(bert)
    assert "'bert'" in str(e.value) and "gemma3_text" in str(e.value)
    olmo2 = _build("Olmo2Config", "Olmo2ForCausalLM")  # built like Llama, but not tested here
    with pytest.raises(ModelError, match="untested"):
        get_adapter(olmo2)


def test_a_cache_passed_under_the_old_name_is_used_not_replaced():
    model = make_tiny_llama()
    ids = torch.randint(3, 200, (1, 5), generator=torch.Generator().manual_seed(7))
    cache, recs = DynamicCache(config=model.config), {}
    with capture_kv(model, get_adapter(model).attention_modules(), lambda r: recs.__setitem__(r.layer, r)), torch.no_grad():
        model(ids, past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 5 and recs[1].keys.shape[2] == 5
