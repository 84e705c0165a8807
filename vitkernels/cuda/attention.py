"""Attention on the compiled extension: softmax(q k^T * scale) v, non-causal, no mask (ViT attention).

The kernels live in csrc/: ``attention_kernel.cu`` (CUDA: flash-attention-2 style tiles in shared memory,
online softmax, wmma tensor cores for fp16/bf16 on sm80+, fp32 FMA otherwise; backward without atomics)
and ``attention.cpp`` (argument checks, schemas and the C++ CPU twin, the readable statement of the math,
which CI runs). Both sit behind two operators:

    torch.ops.vitkernels_C.attention_fwd(q, k, v, scale) -> (out, lse)
    torch.ops.vitkernels_C.attention_bwd(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)

Shapes: q (B, H, N, D); k, v (B, H, M, D), any batch/head/row strides with a contiguous last dim (a tensor
whose last dim is strided is copied once here). ``out`` (B, H, N, D) is a transposed view of a
(B, N, H, D)-contiguous buffer, so ``out.transpose(1, 2).reshape(B, N, H * D)`` is free; lse (B, H, N) is
the fp32 log-sum-exp of the scaled scores, saved for the backward. dq, dk, dv come back the same way
(views of (B, rows, H, D) buffers).

Supported: fp32, fp16, bf16; any N and M >= 1; head dim D <= 128 on CUDA (tiles of 32, 64, 80, 96 or 128
columns; 64 and 80 are the ViT cases), any D on the CPU twin; B * H <= 65535 on CUDA.

The extension is loaded (JIT-built from csrc/ when not prebuilt) when this module is imported, which the
``cuda`` backend does on first use of the op; the fake implementations and the autograd formula are
registered then, so ``torch.compile(fullgraph=True)`` sees one opaque op each way.
"""

from __future__ import annotations

import torch

from vitkernels.cuda.build import load_extension

load_extension()  # registers torch.ops.vitkernels_C.* with the dispatcher


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim has stride 1, else one contiguous copy (the kernels need unit stride)."""
    return t if t.stride(-1) == 1 else t.clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------------------
# Fake implementations: shapes, dtypes and strides exactly as the C++/CUDA code allocates them.


@torch.library.register_fake("vitkernels_C::attention_fwd")
def _attention_fwd_fake(q, k, v, scale):
    B, H, N, D = q.shape
    out = q.new_empty((B, N, H, D)).transpose(1, 2)  # (B, H, N, D) view of (B, N, H, D)
    lse = q.new_empty((B, H, N), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("vitkernels_C::attention_bwd")
def _attention_bwd_fake(grad_out, q, k, v, out, lse, scale):
    B, H, N, D = q.shape
    M = k.shape[2]
    dq = q.new_empty((B, N, H, D)).transpose(1, 2)
    dk = q.new_empty((B, M, H, D)).transpose(1, 2)
    dv = q.new_empty((B, M, H, D)).transpose(1, 2)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------------------------
# Autograd: the forward saves q, k, v, out and the fp32 lse (never the N x M probabilities).


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.vitkernels_C.attention_bwd(
        _last_dim_contiguous(grad_out), q, k, v, out, lse, ctx.scale
    )
    return dq, dk, dv, None


torch.library.register_autograd("vitkernels_C::attention_fwd", _backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale) v: q (B, H, N, D), k/v (B, H, M, D) -> (B, H, N, D), a view of (B, N, H, D).

    Inputs are validated by ``vitkernels.ops.attention``; the C++ code checks them again before any launch.
    """
    q, k, v = _last_dim_contiguous(q), _last_dim_contiguous(k), _last_dim_contiguous(v)
    out, _ = torch.ops.vitkernels_C.attention_fwd(q, k, v, float(scale))
    return out
