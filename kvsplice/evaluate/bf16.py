"""bf16 / fp16 models on a CPU without bf16 matrix units (issue 9 item 7: baseline and peers in the
dtype people deploy), at float32 speed.

On this project's CPUs (AVX2, no AVX512-BF16 / AMX) torch's bf16 GEMM is ~8x slower than float32
(1024 x 576 x 1536: 185 vs 22 ms, 1 thread), which makes a bf16 suite run take hours. A bf16 GEMM
kernel, on a GPU (cuBLAS) or a CPU (oneDNN), multiplies bf16 operands, accumulates in float32 and
rounds the output once to bf16. `float32_accumulate` computes every bf16 / fp16 `nn.Linear` exactly
that way with a float32 GEMM: the operands are the model's bf16 values (their products are exact in
float32), the sum is float32, the output is rounded once to the model dtype. Only the summation order
differs from torch's own bf16 kernel (as it differs between any two kernels). Everything else (norms,
RoPE, attention, the K/V cache, every peer's residual rows) stays in the model dtype. The float32 copies
of the weights cost 4 bytes per parameter for the duration of the context.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from kvsplice.errors import KVSpliceError

LOW = (torch.bfloat16, torch.float16)


def _forward(w32: torch.Tensor, b32: torch.Tensor | None, dtype: torch.dtype):
    def forward(x: torch.Tensor) -> torch.Tensor:  # x (..., in) in the model dtype -> (..., out) in it
        return F.linear(x.to(dtype).float(), w32, b32).to(dtype)
    return forward


@contextmanager
def float32_accumulate(model: nn.Module) -> Iterator[int]:
    """Inside the context every bf16 / fp16 nn.Linear of `model` runs as (bf16 operands, float32
    accumulation, one rounding to its dtype); yields how many layers were switched. KVSpliceError for
    a model with no such layer (a float32 model: the option would silently do nothing)."""
    switched: list[tuple[nn.Linear, Any]] = []  # (module, its own instance forward before, or None)
    try:
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.weight.dtype in LOW and m.weight.device.type == "cpu":
                b32 = None if m.bias is None else m.bias.detach().float()
                switched.append((m, vars(m).get("forward")))
                m.forward = _forward(m.weight.detach().float(), b32, m.weight.dtype)
        if not switched:
            dtypes = sorted({str(p.dtype) for p in model.parameters()})
            raise KVSpliceError(f"float32_accumulate: expected a bf16 / fp16 model on the CPU, found parameter dtypes {dtypes}")
        yield len(switched)
    finally:
        for m, before in switched:
            if before is None:
                del m.forward  # back to the class's forward
            else:
                m.forward = before  # an outer context's (or a hook library's) own forward


def maybe_float32_accumulate(model: nn.Module, matmul: str) -> Any:
    """The context for a config's `matmul` ("native": none)."""
    from contextlib import nullcontext

    if matmul not in ("native", "fp32-accumulate"):
        raise KVSpliceError(f"matmul must be 'native' or 'fp32-accumulate', got {matmul!r}")
    return float32_accumulate(model) if matmul == "fp32-accumulate" else nullcontext()
