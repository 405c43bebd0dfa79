"""CompressedCache: equivalence with DynamicCache, generate, padding, geometry checks, memory accounting."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama
from transformers import DynamicCache

from kvsplice.attention import prepare_model
from kvsplice.cache import CompressedCache, CompressedLayer, LayerCodec
from kvsplice.codecs import get_codec
from kvsplice.errors import GeometryError, KVSpliceError, ModelError
from kvsplice.pruning import VOnlyPruner

MAKERS = {"gpt2": make_tiny_gpt2, "llama": make_tiny_llama}
F32 = 4  # bytes per float32 / int32


def layout(model):
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    return cfg.num_hidden_layers, heads, cfg.hidden_size // cfg.num_attention_heads


def identity_codecs(model, joint=False):
    L, H, D = layout(model)
    if joint:
        c = get_codec("identity").fit(torch.zeros(1, H * D))
        return [LayerCodec([c], joint=True, num_heads=H) for _ in range(L)]
    c = get_codec("identity").fit(torch.zeros(1, D))
    return [LayerCodec([c] * H) for _ in range(L)]


def pca_codecs(model, k, seed=0):
    L, H, D = layout(model)
    g = torch.Generator().manual_seed(seed)
    fit = lambda: get_codec("pca", k=k).fit(torch.randn(200, D, generator=g))  # noqa: E731
    return [LayerCodec([fit() for _ in range(H)]) for _ in range(L)]


def no_eos(model):
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def feed(model, ids, cache, chunks, attention_mask=None):
    """Feed ids (B, T) through the cache in chunks of the given sizes; return the logits (B, T, V)."""
    out, start = [], 0
    for n in chunks:
        am = None if attention_mask is None else attention_mask[:, : start + n]
        out.append(model(ids[:, start : start + n], cache=cache, attention_mask=am, use_cache=True).logits)
        start += n
    return torch.cat(out, 1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("prune", [False, True])
def test_identity_forward_equals_dynamic_cache(arch, prune):
    model = MAKERS[arch]()
    ids = torch.randint(3, 200, (1, 16), generator=torch.Generator().manual_seed(1))
    chunks = [8, 1, 1, 3, 1, 2]
    ref = feed(model, ids, DynamicCache(config=model.config), chunks)
    pruner = VOnlyPruner(keep_ratio=1.0, k_min=1, recency=1) if prune else None
    cache = CompressedCache(model.config.num_hidden_layers, identity_codecs(model), pruner=pruner)
    with prepare_model(model) if prune else torch.no_grad():
        got = feed(model, ids, cache, chunks)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert cache.get_seq_length() == 16


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_identity_generate_equals_dynamic_cache(arch):
    model = no_eos(MAKERS[arch]())
    ids = torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(2))
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    plain = CompressedCache(model.config.num_hidden_layers, identity_codecs(model))
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, cache=plain), ref)
    # the deprecated keyword of the issue works too
    plain = CompressedCache(model.config.num_hidden_layers, identity_codecs(model))
    with pytest.warns(FutureWarning):
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, past_key_values=plain), ref)
    pruned = CompressedCache(
        model.config.num_hidden_layers, identity_codecs(model), pruner=VOnlyPruner(keep_ratio=1.0, k_min=1, recency=1)
    )
    with prepare_model(model):
        assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, cache=pruned), ref)
    assert model.config._attn_implementation == "sdpa"  # restored


@pytest.mark.parametrize(
    "arch, setting",
    [("llama", s) for s in ("pca", "pca-window", "prune-A", "prune-B", "joint-prune")]
    + [("gpt2", "pca-window"), ("gpt2", "prune-A")],
)
def test_generate_n_equals_n_minus_1_then_1(arch, setting):
    model = no_eos(MAKERS[arch]())
    L, H, D = layout(model)
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(3))
    pruner = VOnlyPruner(keep_ratio=0.5, k_min=3, recency=2) if "prune" in setting else None

    def make():
        codecs = {"pca": pca_codecs(model, 4), "pca-window": pca_codecs(model, 4),
                  "joint-prune": identity_codecs(model, joint=True)}.get(setting, pca_codecs(model, 5))
        return CompressedCache(L, codecs, pruner=pruner, window=2 if setting == "pca-window" else 0,
                               strategy="B" if setting == "prune-B" else "A")

    with prepare_model(model):
        one = model.generate(ids, max_new_tokens=8, do_sample=False, cache=make())
        cache = make()
        part = model.generate(ids, max_new_tokens=7, do_sample=False, cache=cache)
        rest = model.generate(part, max_new_tokens=1, do_sample=False, cache=cache)
    assert torch.equal(rest, one)
    if pruner is not None:  # rows were actually pruned: budget of 17 tokens = max(3, 2, floor(8.5)) = 8
        assert cache.layers[0].k_rows.raw.shape[2] + cache.layers[0].k_rows.num_payload == 8


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch(arch):
    model = no_eos(MAKERS[arch]())
    L, H, D = layout(model)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(3, 200, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    ids[1, :5], mask[1, :5] = 0, 0  # second sequence left-padded by 5
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    got = model.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                         cache=CompressedCache(L, identity_codecs(model)))
    assert torch.equal(got, ref)

    # with pruning: the unpadded row behaves as if alone; padded positions are pruned first
    pruner = VOnlyPruner(keep_ratio=0.5, k_min=2, recency=2)
    with prepare_model(model):
        cache = CompressedCache(L, identity_codecs(model), pruner=pruner)
        batch = feed(model, ids, cache, [8, 1, 1, 1, 1], attention_mask=mask)
        alone = feed(model, ids[:1], CompressedCache(L, identity_codecs(model), pruner=pruner), [8, 1, 1, 1, 1])
    torch.testing.assert_close(batch[:1], alone, atol=1e-5, rtol=0)
    assert torch.isfinite(batch[1, 5:]).all()
    for layer in cache.layers:  # 6 rows kept of 12, the padded row had 7 real tokens
        assert layer.positions.shape[-1] == 6 and (layer.positions[1] >= 5).all()


class _StandInGeometry:
    """Duck-typed Geometry (API.md) used only if kvsplice.geometry is not there yet."""

    def __init__(self, codecs, meta):
        self.codecs, self.meta = codecs, meta

    def check_compatible(self, num_layers, num_kv_heads, head_dim):
        pass


def make_geometry(codecs, meta):
    try:
        from kvsplice.geometry import Geometry
    except ImportError:
        return _StandInGeometry(codecs, meta)
    return Geometry(codecs=codecs, meta=meta)


@pytest.mark.parametrize("other", ["layers", "heads", "head_dim"])
def test_geometry_from_another_model_fails_before_compute(other):
    model = make_tiny_llama()  # 2 layers, 2 KV heads, head_dim 8
    L, H, D = {"layers": (3, 2, 8), "heads": (2, 3, 8), "head_dim": (2, 2, 16)}[other]
    g = torch.Generator().manual_seed(0)
    codecs = {(l, h): get_codec("pca", k=2).fit(torch.randn(50, D, generator=g)) for l in range(L) for h in range(H)}
    geometry = make_geometry(codecs, {"target": "v", "num_layers": str(L), "num_kv_heads": str(H), "head_dim": str(D)})
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(GeometryError) as e:
        CompressedCache.from_geometry(model, geometry)
    assert calls == []  # nothing ran
    assert {"layers": "layer", "heads": "head", "head_dim": "dim"}[other] in str(e.value).lower()


def test_geometry_of_the_wrong_target():
    model = make_tiny_llama()
    codecs = {(l, h): get_codec("identity").fit(torch.zeros(1, 8)) for l in range(2) for h in range(2)}
    geometry = make_geometry(codecs, {"target": "k", "num_layers": "2", "num_kv_heads": "2", "head_dim": "8"})
    with pytest.raises(GeometryError, match="expected a V geometry"):
        CompressedCache.from_geometry(model, geometry)


def test_from_geometry_builds_a_working_cache():
    model = no_eos(make_tiny_llama())
    g = torch.Generator().manual_seed(0)
    codecs = {(0, h): get_codec("pca", k=8).fit(torch.randn(100, 8, generator=g)) for h in range(2)}  # layer 1: raw V
    cache = CompressedCache.from_geometry(model, make_geometry(codecs, {"target": "v", "num_kv_heads": "2"}))
    ids = torch.randint(3, 200, (1, 8), generator=g)
    ref = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=5, do_sample=False, cache=cache), ref)  # full-rank PCA
    assert cache.layers[1].v_codec is None and cache.layers[0].v_codec is not None


def test_pca_cache_reads_codec_round_trip():
    """Logits with a rank-3 PCA cache = a DynamicCache whose V is replaced by decompress(compress(V))."""
    model = make_tiny_llama()
    codecs = pca_codecs(model, 3)

    class RoundTrip(DynamicCache):
        def update(self, k, v, layer_idx, *args, **kwargs):
            c = codecs[layer_idx]
            return super().update(k, c.decode(c.encode(v)), layer_idx, *args, **kwargs)

    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(5))
    ref = feed(model, ids, RoundTrip(), [6, 1, 1, 4])
    got = feed(model, ids, CompressedCache(2, codecs), [6, 1, 1, 4])
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    plain = feed(model, ids, DynamicCache(), [6, 1, 1, 4])
    assert (got - plain).abs().max() > 1e-3  # the codec is lossy: the check above is not vacuous


def test_strategy_a_reads_own_step_raw_strategy_b_through_codec():
    model = make_tiny_llama()
    codec = pca_codecs(model, 3)[0]
    k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    pruner = VOnlyPruner(keep_ratio=1.0, k_min=1, recency=1)
    for strategy, expect in (("A", v), ("B", codec.decode(codec.encode(v)))):
        layer = CompressedLayer(v_codec=codec, pruner=pruner, strategy=strategy, layer_idx=0)
        _, values = layer.update(k, v, kwargs={})
        torch.testing.assert_close(values, expect, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "setting", ["identity", "pca", "pca-window", "prune", "prune-pca-window", "joint", "joint-prune", "no-codec"]
)
def test_memory_equals_theoretical(setting):
    model = make_tiny_llama()
    L, H, D = layout(model)
    B, T, k, W = 2, 20, 3, 4
    if "pca" in setting:
        codecs = pca_codecs(model, k)
    elif "joint" in setting:
        codecs = identity_codecs(model, joint=True)
    else:
        codecs = None if setting == "no-codec" else identity_codecs(model)
    pruner = VOnlyPruner(keep_ratio=0.4, k_min=2, recency=W) if "prune" in setting else None
    window = W if "window" in setting else 0
    cache = CompressedCache(L, codecs, pruner=pruner, window=window)
    ids = torch.randint(3, 200, (B, T), generator=torch.Generator().manual_seed(6))
    with prepare_model(model):
        feed(model, ids, cache, [12, 1, 1, 3, 1, 1, 1])
    rows = pruner.budget(T, T) if pruner else T  # floor(0.4 * 20) = 8
    G = (1 if "joint" in setting else H) if pruner else 0
    v_dim = k if "pca" in setting else D
    raw_v = window if "pca" in setting else 0
    m = cache.memory()
    assert m.tokens == T and m.batch == B
    assert m.k_bytes == L * B * H * rows * D * F32
    assert m.v_bytes == L * B * H * (rows - raw_v) * v_dim * F32
    assert m.window_bytes == m.v_window_bytes == L * B * H * raw_v * D * F32
    assert m.index_bytes == L * B * G * rows * F32
    assert m.other_bytes == 2 * L * B * G * rows * F32
    assert m.total_bytes == m.k_bytes + m.v_bytes + m.window_bytes + m.index_bytes + m.other_bytes
    assert m.uncompressed_bytes == 2 * L * B * H * T * D * F32
    if codecs is not None and "pca" in setting and not pruner:
        assert m.v_bytes == B * (T - raw_v) * sum(c.bytes_per_token() for c in codecs)
    assert math.isclose(m.kv_bytes_per_token, m.total_bytes / (B * T))


def test_pruner_without_kvsplice_attention_is_a_clear_error():
    model = make_tiny_llama()
    cache = CompressedCache(2, identity_codecs(model), pruner=VOnlyPruner(k_min=1, recency=1))
    ids = torch.randint(3, 200, (1, 6))
    model(ids[:, :5], cache=cache)  # sdpa: the probabilities never reach the cache
    with pytest.raises(ModelError, match="prepare_model"):
        model(ids[:, 5:], cache=cache)


def test_bad_arguments():
    model = make_tiny_llama()
    with pytest.raises(KVSpliceError, match="strategy"):
        CompressedCache(2, strategy="C")
    with pytest.raises(KVSpliceError, match="window"):
        CompressedCache(2, window=8, pruner=VOnlyPruner(recency=4))
    with pytest.raises(KVSpliceError, match="2 LayerCodec"):
        CompressedCache(2, identity_codecs(model)[:1])
    cache = CompressedCache(2, pca_codecs(make_tiny_gpt2(), 2))  # head_dim 8, 4 heads vs llama's 2 KV heads
    with pytest.raises(KVSpliceError, match="expects 4 heads of dim 8"):
        model(torch.randint(3, 200, (1, 4)), cache=cache)


def _k_is_pre_rope_exact(model):
    """Llama K codecs behind PreRopeLayerCodec, full-rank pca (exact up to float rounding)."""
    from kvsplice.kcodec import PreRopeLayerCodec, find_rotary

    L, H, D = layout(model)
    return [PreRopeLayerCodec(lc, find_rotary(model)) for lc in pca_codecs(model, k=D)]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_sink_rows_are_exact_and_counted(arch):
    """The first `sink` tokens bypass the codec: read back bit-exact, held in full precision and
    counted in window_bytes; the rest goes through the codec."""
    model = MAKERS[arch]()
    L, H, D = layout(model)
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(5))
    ref = DynamicCache(config=model.config)
    with torch.no_grad():
        feed(model, ids, ref, [1, 4, 1, 6])
    cache = CompressedCache(L, pca_codecs(model, k=2), pca_codecs(model, k=2, seed=1), sink=2)
    with torch.no_grad():
        feed(model, ids, cache, [1, 4, 1, 6])
    layer = cache.layers[0]
    k_read, v_read = layer.k_rows.read(), layer.v_rows.read()
    assert k_read.shape[2] == v_read.shape[2] == 12
    torch.testing.assert_close(k_read[:, :, :2], ref.layers[0].keys[:, :, :2], atol=0, rtol=0)
    torch.testing.assert_close(v_read[:, :, :2], ref.layers[0].values[:, :, :2], atol=0, rtol=0)
    assert (k_read[:, :, 2:] - ref.layers[0].keys[:, :, 2:]).abs().max() > 1e-3  # the rest is coded (k=2 of D)
    mem = cache.memory()
    assert mem.window_bytes == L * 2 * (2 * H * D * F32)  # exact copies of the K and V sink rows of every layer
    assert mem.v_bytes == L * 12 * H * 2 * F32  # every row coded (payload aligned across a batch), 2 latents per head
    assert mem.index_bytes == 1 * 2 * 8  # the sink rows' indices (int64), once per cache


def test_sink_with_pre_rope_k_codec_keeps_positions():
    """A sink shifts the positions of the first coded K row: exact K codecs must still match DynamicCache."""
    model = make_tiny_llama()
    L = model.config.num_hidden_layers
    ids = torch.randint(3, 200, (1, 14), generator=torch.Generator().manual_seed(6))
    ref = feed(model, ids, DynamicCache(config=model.config), [5, 1, 8])
    cache = CompressedCache(L, identity_codecs(model), _k_is_pre_rope_exact(model), sink=3)
    with torch.no_grad():
        got = feed(model, ids, cache, [5, 1, 8])
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)


def test_sink_with_pruner_is_refused():
    with pytest.raises(KVSpliceError, match="sink"):
        CompressedCache(2, pruner=VOnlyPruner(), sink=1)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_from_geometry_codes_k_before_rope_where_the_model_has_rope(arch):
    """A K geometry is fitted on the adapter's K (pre-RoPE for Llama): the cache must un-rotate
    before encoding, so Llama's K codecs are PreRopeLayerCodec and GPT-2's plain LayerCodec."""
    from kvsplice.kcodec import PreRopeLayerCodec

    model = MAKERS[arch]()
    L, H, D = layout(model)
    g = torch.Generator().manual_seed(0)
    codecs = {(l, h): get_codec("pca", k=D).fit(torch.randn(100, D, generator=g)) for l in range(L) for h in range(H)}
    cache = CompressedCache.from_geometry(model, k_geometry=make_geometry(codecs, {"target": "k"}))
    assert isinstance(cache.layers[0].k_codec, PreRopeLayerCodec) == (arch == "llama")
    ids = torch.randint(3, 200, (1, 10), generator=g)
    torch.testing.assert_close(feed(model, ids, cache, [6, 1, 3]),
                               feed(model, ids, DynamicCache(config=model.config), [6, 1, 3]), atol=1e-4, rtol=0)


def test_pre_rope_k_codec_with_pruner_is_refused():
    from kvsplice.kcodec import PreRopeLayerCodec, find_rotary

    model = make_tiny_llama()
    k = [PreRopeLayerCodec(lc, find_rotary(model)) for lc in pca_codecs(model, k=2)]
    with pytest.raises(KVSpliceError, match="pruner"):
        CompressedCache(model.config.num_hidden_layers, k_codecs=k, pruner=VOnlyPruner())

