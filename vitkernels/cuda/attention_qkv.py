"""Attention on the fused qkv tensor (the contract of ``vitkernels/ops/attention_qkv.py``) on the compiled
extension, composed from its ``attention_fwd`` / ``attention_bwd`` ops on the q, k, v views of qkv: correct,
but the backward stacks dq, dk, dv into d(qkv) with one copy (the extension's kernels write three buffers).
"""

from __future__ import annotations

import torch

from vitkernels.cuda import NAMESPACE
from vitkernels.cuda.attention import last_dim_contiguous
from vitkernels.cuda.attention import why_not_supported  # noqa: F401  (the same kernels, the same limits)
from vitkernels.cuda.build import load_extension
from vitkernels.ops.attention_qkv import CONTRACT, split_qkv

load_extension()
_C = torch.ops.vitkernels_C


def _views(qkv, num_heads):
    return last_dim_contiguous(*split_qkv(qkv, num_heads))


def attention_qkv_fwd(qkv, num_heads, scale):
    """qkv (B, N, 3 H D) -> (out (B, H, N, D), lse (B, H, N) fp32)."""
    return _C.attention_fwd(*_views(qkv, num_heads), None, scale)


def attention_qkv_bwd(grad_out, qkv, out, lse, num_heads, scale):
    """d(qkv) (B, N, 3 H D): the extension's dq, dk, dv stacked into qkv's layout."""
    B, N, C3 = qkv.shape
    grad_out, out = last_dim_contiguous(grad_out, out)
    dq, dk, dv, _ = _C.attention_bwd(grad_out, *_views(qkv, num_heads), None, out, lse, scale, False)
    return torch.stack([g.transpose(1, 2) for g in (dq, dk, dv)], dim=2).reshape(B, N, C3)


attention_qkv = CONTRACT.register(NAMESPACE, fwd=attention_qkv_fwd, bwd=attention_qkv_bwd)
