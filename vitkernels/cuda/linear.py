"""Linear with a fused epilogue on the compiled extension: ``torch.ops.vitkernels_C.linear_fwd`` /
``linear_bwd`` (cuBLAS GEMM + our bias / erf-GELU / residual epilogue kernel in csrc/linear_kernel.cu, the
C++ CPU twin and the math in csrc/linear.cpp), bound to the contract of ``vitkernels/ops/linear.py``; the
C++ kernels take contiguous tensors.
"""

from __future__ import annotations

import torch

from vitkernels.cuda import NAMESPACE
from vitkernels.cuda.build import load_extension
from vitkernels.ops.contract import contiguous
from vitkernels.ops.linear import CONTRACT

load_extension()  # registers torch.ops.vitkernels_C.* (JIT-builds on first use when setup.py did not)


def why_not_supported(device: torch.device, dtype: torch.dtype, activation: str = "none") -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"cuda linear runs fp32/fp16/bf16, got {dtype}"
    return None


linear = CONTRACT.register(NAMESPACE, prepare=contiguous)
