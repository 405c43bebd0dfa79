"""kvsplice/rope.py and kvsplice/kcodec.py: the per-layer rotary lookup and the pre-RoPE K codec."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from kvsplice.cache import LayerCodec
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
