"""The storage format (kvsplice/storage.py, kvsplice/entropy.py): lossless entropy coders, pack /
unpack of a prefilled cache to one safetensors file (bit-exact: same logits for the next tokens),
refusals on mismatch or corruption, and the `pack` / `unpack` / `generate --prompt-cache` CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import kvsplice
from kvsplice import entropy
from kvsplice.storage import StorageError, load_packed, pack, read_header, unpack

TEXT = "The quick brown fox jumps over the lazy dog. A cache holds keys and values. " * 30


def _codes(seed: int = 0, N: int = 300, K: int = 12):
    rng = np.random.default_rng(seed)
    w = rng.integers(1, 9, K)
    g = rng.normal(size=(N, K)) * (1 << w) / 6 + (1 << w) / 2  # peaked: worth entropy coding
    return np.clip(g, 0, (1 << w) - 1).astype(np.uint8), w


@pytest.mark.parametrize("coder", sorted(entropy.CODERS))
def test_coders_round_trip_exactly(coder):
    sym, w = _codes()
    sym[:, 0] = 3 if w[0] >= 2 else 1  # a constant column
    back = entropy.decode(coder, entropy.encode(coder, sym, w), sym.shape[0], w)
    assert back.dtype == np.uint8 and np.array_equal(back, sym)


def test_rans_spends_close_to_the_empirical_entropy():
    sym, w = _codes(1, N=4000, K=8)
    a = entropy.encode("rans", sym, w)
    stream_bits = 16 * a["words"].size + 32 * a["state"].size
    ideal = entropy.entropy_bits(sym, w)
    assert ideal <= stream_bits <= ideal * 1.01 + 32 * 8 + 64
    assert stream_bits < sym.shape[0] * w.sum()  # below the bit-packed size


def test_rans_refuses_a_corrupted_stream():
    sym, w = _codes(2)
    a = entropy.encode("rans", sym, w)
    a["words"] = a["words"].copy()
    a["words"][len(a["words"]) // 2] ^= 0x5A5A
    with pytest.raises(entropy.EntropyError):
        entropy.decode("rans", a, sym.shape[0], w)


@pytest.fixture
def setup(tiny_llama):
    model, tok = tiny_llama
    recipe = kvsplice.calibrate_recipe(model, tok, TEXT, bits=3, seq_len=64, max_batches=3)
    return model, tok, recipe


def _prefill(model, recipe, batch=2):
    """Batch 2 (or `batch`), left-padded (sequence 0 has 5 pads): (cache, ids, mask)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 259, (batch, 40), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    ids[0, :5] = 0
    cache = recipe.cache(model)
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True)
    return cache, ids, mask


def _next_logits(model, cache, mask, steps=3):
    """Logits (B, steps, vocab) of `steps` next tokens fed one at a time through `cache`."""
    g = torch.Generator().manual_seed(1)
    out, B = [], mask.shape[0]
    with torch.no_grad():
        for _ in range(steps):
            tok = torch.randint(3, 259, (B, 1), generator=g)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype)], 1)
            pos = mask.sum(-1, keepdim=True) - 1
            out.append(model(input_ids=tok, attention_mask=mask, position_ids=pos, cache=cache).logits)
    return torch.cat(out, 1)


@pytest.mark.parametrize("coder", ["rans", "zlib"])
def test_pack_unpack_is_bit_exact(setup, tmp_path, coder):
    model, _, recipe = setup
    cache, ids, mask = _prefill(model, recipe)
    info = pack(cache, tmp_path / "p.kvs", model=model, recipe=recipe, input_ids=ids, attention_mask=mask, coder=coder)
    stored = load_packed(tmp_path / "p.kvs", model, recipe)
    back = stored.cache
    assert torch.equal(stored.input_ids, ids) and torch.equal(stored.attention_mask, mask)
    assert info["file_bytes"] == (tmp_path / "p.kvs").stat().st_size
    for a, b in zip(cache.layers, back.layers):
        assert a.length == b.length == 40
        for kind in ("k_rows", "v_rows"):
            ra, rb = getattr(a, kind), getattr(b, kind)
            assert set(ra.payload) == set(rb.payload) == {"codes", "gain"}
            assert all(torch.equal(ra.payload[n], rb.payload[n]) for n in ra.payload)
            assert torch.equal(ra.head, rb.head) and torch.equal(ra.raw, rb.raw)
    assert torch.equal(cache.tokens.sink_rows, back.tokens.sink_rows)
    assert torch.equal(cache.tokens.positions, back.tokens.positions) and cache.tokens.span == back.tokens.span
    assert cache.memory() == back.memory()
    assert torch.equal(_next_logits(model, cache, mask), _next_logits(model, back, mask))


def test_unpack_refuses_other_recipe_model_or_corruption(setup, tmp_path, byte_tokenizer):
    from conftest import make_tiny_llama

    model, tok, recipe = setup
    cache, ids, mask = _prefill(model, recipe)
    path = tmp_path / "p.kvs"
    pack(cache, path, model=model, recipe=recipe, input_ids=ids, attention_mask=mask)
    other = kvsplice.calibrate_recipe(model, tok, TEXT, bits=2, seq_len=64, max_batches=3)
    with pytest.raises(StorageError, match="recipe"):
        unpack(path, model, other)
    model2 = make_tiny_llama(1)
    model2.config.name_or_path = "another-model"  # same layout, another model id
    with pytest.raises(StorageError, match="model"):
        unpack(path, model2, recipe)
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF  # a flipped bit in the tensor data
    bad = tmp_path / "bad.kvs"
    bad.write_bytes(bytes(data))
    with pytest.raises(StorageError, match="digest"):
        unpack(bad, model, recipe)
    (tmp_path / "junk.kvs").write_bytes(b"not a file")
    with pytest.raises(StorageError):
        read_header(tmp_path / "junk.kvs")


def test_cli_pack_unpack_info_and_generate_with_prompt_cache(tiny_llama, tmp_path, capsys):
    from kvsplice.cli import main

    model, tok = tiny_llama
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    (tmp_path / "t.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "prompt.txt").write_text("The cache holds keys and values. " * 3, encoding="utf-8")
    m = ["--model", str(tmp_path / "m"), "--device", "cpu"]
    for name, bits in (("r", "4"), ("r2", "2")):
        assert main(["calibrate", *m, "--data", str(tmp_path / "t.txt"), "--seq-len", "64", "--max-batches", "3",
                     "--param", f"bits={bits}", "--quiet", "--out", str(tmp_path / name)]) == 0
    out = tmp_path / "p.kvs"
    assert main(["pack", *m, "--recipe", str(tmp_path / "r"), "--prompt-file", str(tmp_path / "prompt.txt"),
                 "--out", str(out)]) == 0
    assert "bits/value" in capsys.readouterr().err
    assert main(["unpack", str(out), "--info"]) == 0
    info = capsys.readouterr().out
    assert "coder rans" in info and "prompt stored: yes, 99 tokens" in info
    assert main(["generate", *m, "--recipe", str(tmp_path / "r"), "--prompt-cache", str(out), "--prompt", " More",
                 "--max-new-tokens", "3", "--no-compare"]) == 0
    assert "106 tokens held (104 prompt + generated)" in capsys.readouterr().err  # 99 stored + 5 + 2 fed back
    # refusals: another recipe, no recipe, an output that is the input
    assert main(["generate", *m, "--recipe", str(tmp_path / "r2"), "--prompt-cache", str(out), "--prompt", " More",
                 "--max-new-tokens", "2", "--no-compare"]) == 2
    assert "packed with recipe" in capsys.readouterr().err
    assert main(["generate", *m, "--prompt-cache", str(out), "--prompt", " More", "--no-compare"]) == 2
    assert "--prompt-cache needs --recipe" in capsys.readouterr().err
    assert main(["pack", *m, "--recipe", str(tmp_path / "r"), "--prompt-file", str(tmp_path / "prompt.txt"),
                 "--out", str(tmp_path / "prompt.txt")]) == 2


def test_v_only_recipe_round_trips_raw_k_and_empty_positions(tiny_llama, tmp_path):
    """K stored raw (no K codec: no positions kept, a (B, 0) positions tensor), V coded at 2 bits."""
    model, tok = tiny_llama
    recipe = kvsplice.calibrate_recipe(model, tok, TEXT, bits=2, seq_len=64, max_batches=3, targets=("v",))
    cache, ids, mask = _prefill(model, recipe)
    assert cache.layers[0].k_rows.codec is None and cache.tokens.positions.shape == (2, 0)
    pack(cache, tmp_path / "v.kvs", model=model, recipe=recipe, input_ids=ids, attention_mask=mask)
    back = unpack(tmp_path / "v.kvs", model, recipe)
    assert torch.equal(back.layers[1].k_rows.raw, cache.layers[1].k_rows.raw) and back.tokens.positions.shape == (2, 0)
    assert torch.equal(_next_logits(model, cache, mask), _next_logits(model, back, mask))


@pytest.mark.parametrize("codec,batch", [("pca-q", 2), ("xpred-pca-q", 2), ("xpred-pca-q", 1)])
def test_sliding_window_layers_round_trip_exactly(tmp_path, codec, batch):
    """Gemma 3 sliding layers hold only their window (and free the sink copy once it leaves): the file
    stores what they hold and their dropped count, their codes in a second stream group; the
    restored cache continues with the same logits. xpred: each layer predicted within its type."""
    from conftest import make_byte_tokenizer
    from test_model_types import _build

    model = _build("Gemma3TextConfig", "Gemma3ForCausalLM", num_hidden_layers=4, num_key_value_heads=1, head_dim=8,
                   query_pre_attn_scalar=8, sliding_window=6,
                   layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"]).eval()
    tok = make_byte_tokenizer()
    recipe = kvsplice.calibrate_recipe(model, tok, TEXT, codec=codec, bits=3, seq_len=64, max_batches=3)
    cache, ids, mask = _prefill(model, recipe, batch)
    assert cache.layers[0].dropped > 0 and cache.layers[0].v_rows.head is None and cache.layers[1].v_rows.head is not None
    info = pack(cache, tmp_path / "g.kvs", model=model, recipe=recipe, input_ids=ids, attention_mask=mask)
    assert info["code_groups"] == [batch * 40, batch * 5]  # full layers hold 40 rows per sequence, sliding ones 5
    from kvsplice.storage import read_header, values_held

    held = sum(layer.length - layer.dropped for layer in cache.layers) * 2 * batch * model.config.num_key_value_heads * 8
    assert values_held(read_header(tmp_path / "g.kvs")[0]) == held == 2 * (40 + 5) * 2 * batch * model.config.num_key_value_heads * 8
    back = unpack(tmp_path / "g.kvs", model, recipe)
    for a, b in zip(cache.layers, back.layers):
        assert (a.dropped, a.length) == (b.dropped, b.length)
        for kind in ("k_rows", "v_rows"):
            ra, rb = getattr(a, kind), getattr(b, kind)
            assert all(torch.equal(ra.payload[n], rb.payload[n]) for n in ra.payload) and (ra.head is None) == (rb.head is None)
    assert cache.memory() == back.memory()
    assert torch.equal(_next_logits(model, cache, mask), _next_logits(model, back, mask))