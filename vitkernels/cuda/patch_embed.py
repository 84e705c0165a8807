"""Patch embedding on the compiled extension: ``torch.ops.vitkernels_C.patch_embed_fwd`` / ``patch_embed_bwd``
(CUDA gather + cuBLAS GEMM + epilogue in csrc/patch_embed_kernel.cu, the C++ CPU twin and the math in
csrc/patch_embed.cpp), bound to the contract of ``vitkernels/ops/patch_embed.py``; the C++ kernels take
contiguous tensors.
"""

from __future__ import annotations

import torch

from vitkernels.cuda import NAMESPACE
from vitkernels.cuda.build import load_extension
from vitkernels.ops.contract import contiguous
from vitkernels.ops.patch_embed import CONTRACT

load_extension()  # registers torch.ops.vitkernels_C.* (JIT-builds on first use when setup.py did not)


def why_not_supported(device: torch.device, dtype: torch.dtype, D: int, P: int) -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"cuda patch_embed runs fp32/fp16/bf16, got {dtype}"
    return None


patch_embed = CONTRACT.register(NAMESPACE, prepare=contiguous)  # images too: usually a no-op
