"""2-D rotary position embedding on q and k together, on the compiled extension:
``torch.ops.vitkernels_C.rope_fwd`` / ``rope_bwd`` (the CUDA kernel in csrc/rope_kernel.cu, the C++ CPU twin
and the math in csrc/rope.cpp), bound to the contract of ``vitkernels/ops/rope.py``.

q, k (and the gradients) are read through their batch / head / row strides (views of a fused qkv) and the
(T - P, D) tables through their row stride (the halves of timm's (T - P, 2 D) table are views); each needs a
unit last stride only (else it is copied here). Outputs are (B, H, T, D) views of (B, T, H, D) buffers.
"""

from __future__ import annotations

import torch

from vitkernels.cuda import NAMESPACE
from vitkernels.cuda.build import load_extension
from vitkernels.ops.rope import CONTRACT

load_extension()  # registers torch.ops.vitkernels_C.* (JIT-builds on first use when setup.py did not)


def why_not_supported(device: torch.device, dtype: torch.dtype, D: int) -> str | None:
    """The kernels' limits (None when these inputs run here): any even head dim."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"cuda rope runs fp32/fp16/bf16, got {dtype}"
    return None


def _prepare(*args):
    """A unit last stride for every tensor (the other strides stay as they are)."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) and a.stride(-1) != 1 else a for a in args)


rope = CONTRACT.register(NAMESPACE, prepare=_prepare)
