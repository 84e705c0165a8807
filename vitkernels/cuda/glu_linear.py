"""The gated fc1 of a GLU MLP, h = act(x Wg^T + bg) * (x Wv^T + bv), on the compiled extension:
``torch.ops.vitkernels_C.glu_linear_fwd`` / ``glu_linear_bwd`` (two cuBLAS GEMMs + our GLU epilogue kernel,
and our dg / dv + bias-gradient kernel before the backward's cuBLAS GEMMs, in csrc/glu_linear_kernel.cu; the
C++ CPU twin, checks and schemas in csrc/glu_linear.cpp; the activations in csrc/glu_act.h), bound to the
contract of ``vitkernels/ops/glu_linear.py``; the C++ kernels take contiguous tensors (the halves of a packed
(2H, C) fc1 weight are contiguous row slices: no copy).
"""

from __future__ import annotations

import torch

from vitkernels.cuda import NAMESPACE
from vitkernels.cuda.build import load_extension
from vitkernels.ops.contract import contiguous
from vitkernels.ops.glu_linear import ACTIVATIONS, CONTRACT

load_extension()  # registers torch.ops.vitkernels_C.* (JIT-builds on first use when setup.py did not)


def why_not_supported(device: torch.device, dtype: torch.dtype, activation: str = "silu") -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"cuda glu_linear runs fp32/fp16/bf16, got {dtype}"
    if activation not in ACTIVATIONS:
        return f"cuda glu_linear has no activation {activation!r}"
    return None


glu_linear = CONTRACT.register(NAMESPACE, prepare=contiguous)
