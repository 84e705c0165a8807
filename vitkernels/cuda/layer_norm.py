"""LayerNorm with a fused residual add on the compiled extension: ``torch.ops.vitkernels_C.layer_norm_fwd``
/ ``layer_norm_bwd`` (CUDA kernels in csrc/layer_norm_kernel.cu, the C++ CPU twin and the math in
csrc/layer_norm.cpp), bound to the contract of ``vitkernels/ops/layer_norm.py``; the C++ kernels take
contiguous tensors.
"""

from __future__ import annotations

import torch

from vitkernels.cuda import NAMESPACE
from vitkernels.cuda.build import load_extension
from vitkernels.ops.contract import contiguous
from vitkernels.ops.layer_norm import CONTRACT

load_extension()  # registers torch.ops.vitkernels_C.* (JIT-builds on first use when setup.py did not)


def why_not_supported(device: torch.device, dtype: torch.dtype, C: int) -> str | None:
    """The kernels' limits (None when these inputs run here): any width; one warp per row on CUDA."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"cuda layer_norm runs fp32/fp16/bf16, got {dtype}"
    return None


layer_norm = CONTRACT.register(NAMESPACE, prepare=contiguous)
