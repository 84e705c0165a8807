"""Attention on the compiled extension: softmax(q k^T * scale + bias) v, non-causal (ViT attention).

The kernels live in csrc/: ``attention_kernel.cu`` (CUDA: flash-attention-2 style tiles in shared memory,
online softmax, wmma tensor cores for fp16/bf16 on sm80+, fp32 FMA otherwise; backward without atomics)
and ``attention.cpp`` (argument checks, schemas and the C++ CPU twin, the readable statement of the math,
which CI runs). Both sit behind two operators:

    torch.ops.vitkernels_C.attention_fwd(q, k, v, bias, scale) -> (out, lse)
    torch.ops.vitkernels_C.attention_bwd(grad_out, q, k, v, bias, out, lse, scale, needs_dbias)
        -> (dq, dk, dv, dbias)

Shapes: q (B, H, N, D); k, v (B, H, M, D), any batch/head/row strides with a contiguous last dim (a tensor
whose last dim is strided is copied once here). ``out`` (B, H, N, D) is a transposed view of a
(B, N, H, D)-contiguous buffer, so ``out.transpose(1, 2).reshape(B, N, H * D)`` is free; lse (B, H, N) is
the fp32 log-sum-exp of the scaled scores, saved for the backward. dq, dk, dv come back the same way
(views of (B, rows, H, D) buffers).

Supported: fp32, fp16, bf16; any N and M >= 1; head dim D <= 128 on CUDA (tiles of 32, 64, 80, 96 or 128
columns; 64 and 80 are the ViT cases), any D on the CPU twin; B * H <= 65535 on CUDA. The optional additive
bias of the contract (vitkernels/ops/attention.py), (B | 1, H | 1, N | 1, M) in the inputs' dtype or fp32,
any strides: the kernels read it element by element through its strides as they scale the scores; its
gradient, when asked for, goes through an fp32 (B, H, N, M) buffer of dS summed over the broadcast dims.

The extension is loaded (JIT-built from csrc/ when not prebuilt) when this module is imported, which the
``cuda`` backend does on first use of the op; the fake implementations and the autograd formula are
registered then (from the contract in ``vitkernels/ops/attention.py``), so ``torch.compile(fullgraph=True)``
sees one opaque op each way.
"""

from __future__ import annotations

import torch

from vitkernels.cuda import NAMESPACE
from vitkernels.cuda.build import load_extension
from vitkernels.ops.attention import CONTRACT

load_extension()  # registers torch.ops.vitkernels_C.* with the dispatcher

MAX_HEAD_DIM = 128  # tiles of 32, 64, 80, 96 or 128 columns
MAX_GRID_Y = 65535  # B * H on grid axis 1


def why_not_supported(device: torch.device, dtype: torch.dtype, D: int, BH: int, has_bias: bool = False
                      ) -> str | None:
    """The kernels' limits (None when these inputs run here): the CPU twin runs any head dim; a bias adds
    none."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"cuda attention runs fp32/fp16/bf16, got {dtype}"
    if device.type == "cuda" and D > MAX_HEAD_DIM:
        return f"cuda attention supports head dims up to {MAX_HEAD_DIM} on CUDA, got {D}"
    if device.type == "cuda" and BH > MAX_GRID_Y:
        return f"cuda attention launches B * H = {BH} blocks on grid axis 1, at most {MAX_GRID_Y}"
    return None


def last_dim_contiguous(*args):
    """The kernels need a unit stride along D only: other strides (views of a fused qkv) stay as they are."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) and a.dim() and a.stride(-1) != 1 else a
                 for a in args)


attention = CONTRACT.register(NAMESPACE, prepare=last_dim_contiguous)
