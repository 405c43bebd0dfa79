"""The coded-domain attention ("kvsplice-coded", kvsplice/coded_attention.py) equals the reference
(decode every row, then the model's own attention) on tiny random models: pca-q per head and joint,
with and without sink, K coded after RoPE (coded scores) and before RoPE (decoded K), GQA, batching
with left padding, through the native C kernels and through the pure-torch path; and the affine decode
equals the codec's reference decode."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from kvsplice import native
from kvsplice.cache import CompressedCache, LayerCodec
from kvsplice.codecs import get_codec
from kvsplice.coded_attention import affine_groups, coded_attention
from kvsplice.errors import KVSpliceError
from kvsplice.pruning import VOnlyPruner

L, H, D = 2, 2, 8  # tiny llama: 2 layers, 2 KV heads (4 query heads: GQA groups of 2), head_dim 8


def _data(n: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g) * torch.linspace(0.2, 2.0, dim)  # anisotropic: uneven bit widths


def _codecs(joint: bool, bits: float, seed: int, name: str = "pca-q", **params) -> list[LayerCodec]:
    if joint:
        return [LayerCodec([get_codec(name, bits=bits, **params).fit(_data(400, H * D, seed + l))], joint=True, num_heads=H)
                for l in range(L)]
    return [LayerCodec([get_codec(name, bits=bits, **params).fit(_data(300, D, seed + 10 * l + h)) for h in range(H)])
            for l in range(L)]


def _pre_rope(model, codecs):
    from kvsplice.kcodec import PreRopeLayerCodec, find_rotary

    return [PreRopeLayerCodec(c, find_rotary(model)) for c in codecs]


def _left_padded():
    prompts = [[5, 17, 99, 23, 42, 8, 61, 77, 150, 12, 31, 64], [120, 7, 33, 81, 9, 140, 55], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):], mask[i, T - len(p):] = torch.tensor(p), 1
    return ids, mask


def _same_length():
    ids = torch.tensor([[5, 17, 99, 23, 42, 8, 61, 77], [120, 7, 33, 81, 9, 140, 55, 2]])
    return ids, torch.ones_like(ids)


def _scores(model, make_cache, coded: bool, batch=_left_padded):
    """Greedy generate over a batch (default: left-padded); per-step logits (steps, B, vocab)."""
    ids, mask = batch()
    cache = make_cache()
    kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, output_logits=True,
                  return_dict_in_generate=True, pad_token_id=0)
    with torch.no_grad():
        if coded:
            with coded_attention(model, cache):
                out = model.generate(ids, cache=cache, **kwargs)
        else:
            out = model.generate(ids, cache=cache, **kwargs)
    return torch.stack(out.logits), out.sequences


@pytest.mark.parametrize("bits", [4.0, 2.0])
@pytest.mark.parametrize("scale", ["gain", "static"])
@pytest.mark.parametrize("metric", [False, True])
def test_affine_decode_equals_reference_decode(bits, scale, metric):
    codec = get_codec("pca-q", bits=bits, scale=scale)
    x = _data(500, 16, 3)
    M = None
    if metric:
        W = torch.randn(16, 16, generator=torch.Generator().manual_seed(1))
        M = W.T @ W + 0.1 * torch.eye(16)
    codec.fit(x, metric=M)
    payload = codec.encode(_data(37, 16, 4).reshape(37, 16))
    ref = codec.decompress(codec._coefficients(payload))  # the decode before issue 12
    assert codec.affine_form() is not None
    torch.testing.assert_close(codec.decode(payload), ref, rtol=1e-5, atol=1e-5)


def test_warped_codec_has_no_affine_form_and_keeps_the_decode_path():
    codec = get_codec("bennett-pca-q", bits=4.0).fit(_data(400, 16, 0))
    assert codec.affine_form() is None
    assert affine_groups(LayerCodec([codec])) is None


@pytest.fixture(params=["native", "torch"])
def kernels(request, monkeypatch):
    """Run a test through the C kernels (skipped without a compiler) and through the pure-torch path."""
    if request.param == "torch":
        monkeypatch.setattr(native, "available", lambda: False)
    elif not native.available():
        pytest.skip("native kernels unavailable (no C compiler)")
    return request.param


def _assert_path(codecs, kernels):
    """Every affine group of these codecs runs the path under test (not silently the other one)."""
    for c in codecs:
        for g in affine_groups(c) or []:
            assert (g.native is not None) == (kernels == "native")


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("sink", [0, 1, 2])
@pytest.mark.parametrize("k_mode", ["post-rope", "pre-rope", "raw"])
def test_coded_attention_equals_reference(joint, sink, k_mode, kernels):
    model = make_tiny_llama()
    v = _codecs(joint, 4.0, seed=0)
    if k_mode == "post-rope":
        k = _codecs(joint, 4.0, seed=100)
    elif k_mode == "pre-rope":
        k = _pre_rope(model, _codecs(joint, 4.0, seed=100))
    else:
        k = None
    make = lambda: CompressedCache(L, v_codecs=v, k_codecs=k, sink=sink)  # noqa: E731
    ref, ref_seq = _scores(model, make, coded=False)
    fast, fast_seq = _scores(model, make, coded=True)
    _assert_path(v + (k or []), kernels)
    assert model.config._attn_implementation != "kvsplice-coded"  # restored
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast_seq, ref_seq)


@pytest.mark.parametrize("sink", [1, 2])
def test_coded_attention_unpadded_batch_takes_the_sink_slices(sink, kernels, monkeypatch):
    """Without padding every sequence's sink rows are the same columns: the slice path (no scatter)
    runs, and equals the reference."""
    from kvsplice import coded_attention as ca

    model = make_tiny_llama()
    v, k = _codecs(True, 4.0, seed=0), _codecs(True, 4.0, seed=100)
    make = lambda: CompressedCache(L, v_codecs=v, k_codecs=k, sink=sink)  # noqa: E731
    spans = []
    real = ca.CodedRows.sink_span
    monkeypatch.setattr(ca.CodedRows, "sink_span", lambda self: spans.append(real(self)) or spans[-1])
    ref, _ = _scores(model, make, coded=False, batch=_same_length)
    fast, _ = _scores(model, make, coded=True, batch=_same_length)
    assert spans and all(s == (0, sink) for s in spans)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_coded_attention_2bit_with_window_and_warp_fallback(kernels):
    """A raw window and a warped (non-affine) K codec: exact rows and decoded K mix with coded V."""
    model = make_tiny_llama()
    v = _codecs(True, 2.0, seed=5)
    k = _codecs(False, 4.0, seed=7, name="bennett-pca-q")
    make = lambda: CompressedCache(L, v_codecs=v, k_codecs=k, sink=1, window=3)  # noqa: E731
    ref, _ = _scores(model, make, coded=False)
    fast, _ = _scores(model, make, coded=True)
    _assert_path(v, kernels)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)


def test_coded_attention_never_decodes_v(monkeypatch):
    """The float V rows are never materialised: V's decode is not called on the coded path."""
    model = make_tiny_llama()
    v, k = _codecs(True, 4.0, seed=0), _codecs(True, 4.0, seed=1)
    cache = CompressedCache(L, v_codecs=v, k_codecs=k, sink=1)
    calls = []
    real = LayerCodec.decode
    monkeypatch.setattr(LayerCodec, "decode", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    ids, mask = _left_padded()
    with torch.no_grad(), coded_attention(model, cache):
        model.generate(ids, attention_mask=mask, cache=cache, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert calls == []


def test_coded_attention_refuses_pruning_and_foreign_caches():
    from transformers import DynamicCache

    model = make_tiny_llama()
    with pytest.raises(KVSpliceError, match="pruning"):
        coded_attention(model, CompressedCache(L, v_codecs=_codecs(False, 4.0, 0), pruner=VOnlyPruner()))
    with pytest.raises(KVSpliceError, match="CompressedCache"):
        coded_attention(model, DynamicCache())
    assert model.config._attn_implementation != "kvsplice-coded"


def test_package_exposes_the_switch_lazily():
    import kvsplice

    assert kvsplice.coded_decode is coded_attention


def test_softcapping_is_refused_not_ignored():
    """Gemma 2 style logit soft-capping: the coded attention refuses it (and says so up front)."""
    from kvsplice.coded_attention import coded_attention_forward, coded_supported

    q, kv = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 5, 8)
    with pytest.raises(Exception, match="softcap"):
        coded_attention_forward(torch.nn.Module(), q, kv, kv, None, softcap=30.0)
    model = make_tiny_llama()
    model.config.attn_logit_softcapping = 30.0
    cache = CompressedCache(L, v_codecs=_codecs(True, 4.0, 0))
    assert "soft-caps" in coded_supported(cache, model)
    model.config.attn_logit_softcapping = None
    assert coded_supported(cache, model) is None


def test_sliding_layer_with_an_empty_payload_runs_at_two_threads(kernels):
    """A sliding layer whose rows all sit in the raw window holds a 0-row payload; the coded path
    (C kernels at 2 threads) must equal the reference there."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    cfg = Gemma3TextConfig(vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4,
                           layer_types=["sliding_attention", "full_attention"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = Gemma3ForCausalLM(cfg).eval()
    v, k = _codecs(False, 4.0, seed=0), _codecs(False, 4.0, seed=100)
    make = lambda: CompressedCache(L, v_codecs=v, k_codecs=k, window=4, sliding_windows=[4, None])  # noqa: E731
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ref, ref_seq = _scores(model, make, coded=False, batch=_same_length)
        fast, fast_seq = _scores(model, make, coded=True, batch=_same_length)
    finally:
        torch.set_num_threads(before)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast_seq, ref_seq)


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("sink", [0, 1])
def test_decode_steps_run_the_fused_c_path_and_equal_the_reference(joint, sink, monkeypatch):
    """Decode steps (q = 1, window 0) take `_decode_step` (scores, sink, mask, values in C) on a
    left-padded batch (masks and per-sequence sink columns differ) and equal the decode path."""
    if not native.available():
        pytest.skip("native kernels unavailable (no C compiler)")
    from kvsplice import coded_attention as ca

    model = make_tiny_llama()
    v, k = _codecs(joint, 4.0, seed=0), _codecs(joint, 4.0, seed=100)
    make = lambda: CompressedCache(L, v_codecs=v, k_codecs=k, sink=sink)  # noqa: E731
    taken = []
    real = ca._decode_step
    monkeypatch.setattr(ca, "_decode_step", lambda *a: taken.append(real(*a)) or taken[-1])
    ref, ref_seq = _scores(model, make, coded=False)
    fast, fast_seq = _scores(model, make, coded=True)
    assert taken and all(t is not None for t in taken)
    torch.testing.assert_close(fast, ref, rtol=1e-4, atol=1e-4)
    assert torch.equal(fast_seq, ref_seq)
