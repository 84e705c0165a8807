"""Multi-head self-attention with timm's parameter names (``qkv``, ``proj``, ``q_norm``, ``k_norm``).

The data path has no copies between the GEMMs and the attention kernel: the qkv GEMM writes (B, N, 3*C), the
attention op reads q/k/v through their strides in it (``ops.attention_qkv``, whose backward writes d(qkv)
in one buffer; with q/k norms, ``ops.attention`` on the strided (B, H, N, D) views), and fused backends write
the attention output in (B, N, H, D) memory so that the reshape to (B, N, C) for ``proj`` is a view.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels import ops
from vitkernels.nn.norm import LayerNorm


class Attention(nn.Module):
    """x (B, N, C) -> attention output (B, N, C), before or with the residual add.

    Args:
        dim: C. num_heads: H (C must be divisible by H; D = C / H).
        qkv_bias, proj_bias: biases of the two projections. qk_norm: LayerNorm over D on q and k (eps norm_eps).
        attn_drop, proj_drop: dropout rates (attention dropout uses the reference path while training).
        backend: the ops backend.
    """

    def __init__(self, dim, num_heads=8, qkv_bias=False, qk_norm=False, proj_bias=True, attn_drop=0.0,
                 proj_drop=0.0, norm_eps=1e-6, backend: str = "auto"):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = LayerNorm(self.head_dim, eps=norm_eps, backend=backend) if qk_norm else nn.Identity()
        self.k_norm = LayerNorm(self.head_dim, eps=norm_eps, backend=backend) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """proj(attention(x)) [+ residual]: the residual add is fused into the proj GEMM's epilogue."""
        return attention_forward(self, x, residual, self.backend)


def attention_forward(attn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, backend: str) -> torch.Tensor:
    """x (B, N, C) -> proj(attention(x)) [+ residual], for any module with timm's Attention attribute names
    (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``proj``, ``proj_drop``, ``num_heads``, ``head_dim``,
    ``scale``): this Attention, and timm's own under ``vitkernels.patch_timm``."""
    qkv = ops.linear(x, attn.qkv.weight, attn.qkv.bias, backend=backend)  # (B, N, 3C)
    return attention_from_qkv(attn, qkv, residual, backend)


def attention_from_qkv(attn: nn.Module, qkv: torch.Tensor, residual: torch.Tensor | None,
                       backend: str) -> torch.Tensor:
    """qkv (B, N, 3C), the qkv projection's output -> proj(attention) [+ residual] (B, N, C). The lean block
    (vitkernels/nn/block.py) computes qkv with its LayerNorm fused in and continues here."""
    B, N, C3 = qkv.shape
    C = C3 // 3
    dropout = attn.training and attn.attn_drop.p > 0
    if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity) and not dropout:
        # One op on qkv itself: its backward writes d(qkv) whole (no stack of dq, dk, dv).
        o = ops.attention_qkv(qkv, attn.num_heads, scale=attn.scale, backend=backend)  # (B, H, N, D)
        return _project(attn, o.transpose(1, 2).reshape(B, N, C), residual, backend)
    q, k, v = qkv.reshape(B, N, 3, attn.num_heads, attn.head_dim).unbind(2)  # each (B, N, H, D), strided
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D) views
    q, k = attn.q_norm(q), attn.k_norm(k)
    if dropout:
        # No fused kernel implements attention dropout: the reference path keeps the semantics.
        o = F.scaled_dot_product_attention(q, k, v, dropout_p=attn.attn_drop.p, scale=attn.scale)
    else:
        o = ops.attention(q, k, v, scale=attn.scale, backend=backend)  # (B, H, N, D)
    return _project(attn, o.transpose(1, 2).reshape(B, N, C), residual, backend)  # a view: (B, N, H, D) storage


def _project(attn: nn.Module, o: torch.Tensor, residual: torch.Tensor | None, backend: str) -> torch.Tensor:
    """o (B, N, C) -> proj(o) [+ residual], the residual add in proj's epilogue (dropout: the plain path)."""
    if attn.training and attn.proj_drop.p > 0:
        o = attn.proj_drop(ops.linear(o, attn.proj.weight, attn.proj.bias, backend=backend))
        return o if residual is None else o + residual
    return ops.linear(o, attn.proj.weight, attn.proj.bias, residual=residual, backend=backend)
