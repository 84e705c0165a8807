"""Attention on the fused qkv tensor (the contract of ``vitkernels/ops/attention_qkv.py``), on the kernels of
``triton/attention.py``: the forward reads q, k, v through their strides in qkv (B, N, 3, H, D), the backward
writes dq, dk, dv through theirs into one d(qkv) buffer of the same layout, so autograd gets d(qkv) whole and
stacks nothing. Limits: those of triton/attention.py.
"""

from __future__ import annotations

from vitkernels.ops.attention_qkv import CONTRACT, split_qkv
from vitkernels.triton import NAMESPACE
from vitkernels.triton.attention import attention_bwd_into, attention_fwd
from vitkernels.triton.attention import why_not_supported  # noqa: F401  (the same kernels, the same limits)


def attention_qkv_fwd(qkv, num_heads, scale):
    """qkv (B, N, 3 H D) -> (out (B, H, N, D) view of (B, N, H, D), lse (B, H, N) fp32)."""
    return attention_fwd(*split_qkv(qkv, num_heads), None, scale)


def attention_qkv_bwd(grad_out, qkv, out, lse, num_heads, scale):
    """d(qkv) (B, N, 3 H D), contiguous: the kernels write dq, dk, dv straight into its three slices."""
    dqkv = qkv.new_empty(qkv.shape)
    attention_bwd_into(grad_out, *split_qkv(qkv, num_heads), None, out, lse, scale, *split_qkv(dqkv, num_heads))
    return dqkv


attention_qkv = CONTRACT.register(NAMESPACE, fwd=attention_qkv_fwd, bwd=attention_qkv_bwd)
