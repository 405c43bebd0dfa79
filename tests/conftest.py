"""Shared tiny models for the test suite (built in code, offline, deterministic).

Fixtures (function-scoped, fresh objects each test):
    tiny_gpt2   -> (GPT2LMHeadModel, tokenizer)   2 layers, 4 heads, n_embd 32 (head_dim 8)
    tiny_llama  -> (LlamaForCausalLM, tokenizer)  2 layers, 4 q heads, 2 KV heads, head_dim 8
    byte_tokenizer -> a real `PreTrainedTokenizerFast`: one token per UTF-8 byte (ids 3..258),
                   specials <pad>=0, <bos>=1, <eos>=2; vocab 259.
The model builders `make_tiny_gpt2(seed)` / `make_tiny_llama(seed)` / `make_byte_tokenizer()` can
be imported (`from conftest import make_tiny_llama`) when a test needs another seed.
Both models use vocab_size 260 (covers the tokenizer) and are in eval() mode, float32.
"""

from __future__ import annotations

import pytest
import torch

TINY_VOCAB = 260


def make_byte_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    vocab.update({ch: i + 3 for i, ch in enumerate(alphabet)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", model_max_length=1 << 20
    )


def make_tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=TINY_VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg).eval()


def make_tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=TINY_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture
def byte_tokenizer():
    return make_byte_tokenizer()


@pytest.fixture
def tiny_gpt2(byte_tokenizer):
    return make_tiny_gpt2(), byte_tokenizer


@pytest.fixture
def tiny_llama(byte_tokenizer):
    return make_tiny_llama(), byte_tokenizer


TWO_METHOD_FRONTIER = """
model = "{model}"
[calibration]
samples = 1500
max_batches = 2
seq_len = 128
[protocol]
prefill = 100
continue_tokens = 30
segments = 1
batch_size = 1
tf_window = 128
tf_windows = 1

[[methods]]
name = "pca-q"
kind = "codec"
sweep = {{ bits = [3.0] }}
params = {{ codec = "pca-q", target = "kv", joint_heads = true, sink = 1 }}

[[methods]]
name = "{name}"
kind = "codec"
sweep = {{ bits = [3.0] }}
params = {{ {params} }}
"""


def run_two_method_frontier(tmp_path, name: str, params: str) -> dict:
    """`kvsplice frontier` on a saved tiny Llama with uniform pca-q 3-bit K+V and one other codec method
    (`params`: the TOML inline table's body) -> {method: point} of the result JSON."""
    import json

    from kvsplice.cli import main

    folder = tmp_path / "tiny"
    make_tiny_llama().save_pretrained(folder)
    make_byte_tokenizer().save_pretrained(folder)
    cfg = tmp_path / "f.toml"
    cfg.write_text(TWO_METHOD_FRONTIER.format(model=folder, name=name, params=params), encoding="utf-8")
    out = tmp_path / "f.json"
    if main(["frontier", "--config", str(cfg), "--json", str(out), "--quiet", "--threads", "1"]) != 0:
        raise RuntimeError("frontier failed")
    return {q["method"]: q for q in json.loads(out.read_text())["points"]}
