"""kvsplice/evaluate/bf16.py: a bf16 model's linears as float32 GEMMs on the bf16 operands (float32
accumulation, one rounding) give torch's bf16 logits to bf16 rounding, stay bf16 everywhere else,
are undone on exit, and refuse a float32 model (the option would do nothing)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from kvsplice.errors import KVSpliceError
from kvsplice.evaluate.bf16 import float32_accumulate, maybe_float32_accumulate


def test_bf16_linears_accumulate_in_float32_and_are_restored():
    model = make_tiny_llama().to(torch.bfloat16).eval()
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        native = model(ids).logits
        exact = make_tiny_llama().eval()(ids).logits  # float32 reference
        with float32_accumulate(model) as n:
            assert n == sum(isinstance(m, torch.nn.Linear) for m in model.modules())
            fast = model(ids).logits
            q = model.model.layers[0].self_attn.q_proj(torch.randn(3, 32, dtype=torch.bfloat16))
        assert "forward" not in vars(model.model.layers[0].self_attn.q_proj)  # the class forward is back
        with float32_accumulate(model):
            with float32_accumulate(model):  # nested: the outer context's forwards come back on the inner exit
                pass
            torch.testing.assert_close(model(ids).logits, fast, atol=0, rtol=0)
        assert not any("forward" in vars(m) for m in model.modules())
        again = model(ids).logits
    assert fast.dtype == torch.bfloat16 and q.dtype == torch.bfloat16
    torch.testing.assert_close(again, native, atol=0, rtol=0)
    # both are bf16 models: equally far from float32, and close to each other (summation order only)
    e_native, e_fast = float((native.float() - exact).abs().mean()), float((fast.float() - exact).abs().mean())
    assert 0 < e_fast < 2 * e_native and float((fast - native).float().abs().max()) < 0.1


def test_float32_model_and_bad_option_are_refused():
    with pytest.raises(KVSpliceError, match="bf16 / fp16 model"), float32_accumulate(make_tiny_llama()):
        pass
    with pytest.raises(KVSpliceError, match="matmul must be"):
        maybe_float32_accumulate(make_tiny_llama(), "fast")


def test_suite_config_takes_fp32_accumulate_for_bf16_only():
    from kvsplice.evaluate.suite_config import SuiteConfig, SuiteConfigError

    base = SuiteConfig.named("quick").to_dict()
    assert SuiteConfig.from_dict({**base, "dtype": "bfloat16", "matmul": "fp32-accumulate"}).matmul == "fp32-accumulate"
    with pytest.raises(SuiteConfigError, match="matmul"):
        SuiteConfig.from_dict({**base, "matmul": "fp32-accumulate"})  # float32: nothing to accumulate
