"""Multi-head self-attention with timm's parameter names (``qkv``, ``proj``, ``q_norm``, ``k_norm``).

The data path has no copies between the GEMMs and the attention kernel: the qkv GEMM writes (B, N, 3*C), the
attention op reads q/k/v through their strides in it (``ops.attention_qkv``, whose backward writes d(qkv)
in one buffer; with q/k norms, ``ops.attention`` on the strided (B, H, N, D) views), and fused backends write
the attention output in (B, N, H, D) memory so that the reshape to (B, N, C) for ``proj`` is a view.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels import ops
from vitkernels.ops.attention_qkv import split_qkv
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
                 proj_drop=0.0, norm_eps=1e-6, backend: str = "auto", norm_layer=None, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        dd = dict(device=device, dtype=dtype)
        norm_layer = norm_layer or functools.partial(LayerNorm, eps=norm_eps, backend=backend)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_dim = dim
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, attn_mask: torch.Tensor | None = None,
                is_causal: bool = False) -> torch.Tensor:
        """proj(attention(x)) [+ residual]: the residual add is fused into the proj GEMM's epilogue.
        ``attn_mask`` / ``is_causal`` (timm's masked attention): the fused attention with the mask as an additive
        bias."""
        return attention_forward(self, x, residual, self.backend, attn_mask, is_causal)


def attention_forward(attn: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, backend: str,
                      attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """x (B, N, C) -> proj(attention(x)) [+ residual], for any module with timm's Attention attribute names
    (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``proj``, ``proj_drop``, ``num_heads``, ``head_dim``,
    ``scale``): this Attention, and timm's own under ``vitkernels.patch_timm``."""
    qkv = ops.linear(x, attn.qkv.weight, attn.qkv.bias, backend=backend)  # (B, N, 3C)
    return attention_from_qkv(attn, qkv, residual, backend, attn_mask, is_causal)


def attention_from_qkv(attn: nn.Module, qkv: torch.Tensor, residual: torch.Tensor | None, backend: str,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """qkv (B, N, 3C), the qkv projection's output -> proj(attention) [+ residual] (B, N, C). The lean block
    (vitkernels/nn/block.py) computes qkv with its LayerNorm fused in and continues here.

    Written without Python control flow on shapes or on the mask, so torch.fx can trace it (the attention
    is one leaf call that picks the fused op or SDPA when it runs: under symbolic tracing ``attn_mask`` and
    ``is_causal`` are graph inputs whose values are known only then)."""
    dropout_p = attn.attn_drop.p if attn.training else 0.0
    if isinstance(attn.q_norm, nn.Identity) and isinstance(attn.k_norm, nn.Identity):
        o = attend_qkv(qkv, attn.num_heads, attn.scale, attn_mask, is_causal, dropout_p, backend)  # (B, H, N, D)
    else:
        q, k, v = qkv.unflatten(-1, (3, attn.num_heads, attn.head_dim)).unbind(2)  # each (B, N, H, D), strided
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, N, D) views
        o = attend(attn.q_norm(q), attn.k_norm(k), v, attn.scale, attn_mask, is_causal, dropout_p, backend)
    return _project(attn, o.transpose(1, 2).flatten(2), residual, backend)  # (B, N, C): a view of (B, N, H, D)


def causal_mask(n: int, m: int, device) -> torch.Tensor:
    """SDPA's ``is_causal`` as a bool mask (n, m): query i attends to keys j <= i."""
    return torch.ones(n, m, dtype=torch.bool, device=device).tril()


def mask_bias(attn_mask: torch.Tensor | None, is_causal: bool, q: torch.Tensor, k: torch.Tensor
              ) -> torch.Tensor | None:
    """SDPA's ``attn_mask`` / ``is_causal`` as the additive bias ``ops.attention`` takes: a bool mask (True:
    attend) becomes 0 / -inf in q's dtype, a float mask is used as it is (any shape broadcastable to
    (B, H, N, M), fewer dims aligned right as SDPA does), ``is_causal`` the lower-triangular 0 / -inf (N, M)."""
    if attn_mask is not None and is_causal:
        raise ValueError("attn_mask and is_causal=True together: give one (as torch's scaled_dot_product_attention)")
    if is_causal:
        N, M = q.shape[-2], k.shape[-2]
        attn_mask = causal_mask(N, M, q.device)
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(~attn_mask, float("-inf"))
    return attn_mask


def attend_qkv(qkv: torch.Tensor, num_heads: int, scale: float, attn_mask: torch.Tensor | None, is_causal: bool,
               dropout_p: float, backend: str) -> torch.Tensor:
    """qkv (B, N, 3C) -> (B, H, N, D): one fused op on qkv itself (its backward writes d(qkv) whole, no stack of
    dq, dk, dv); with a mask or causal masking, ``ops.attention`` with the mask as an additive bias on the q, k,
    v views; with attention dropout, which no fused kernel implements, PyTorch's SDPA."""
    if attn_mask is None and not is_causal and dropout_p == 0.0:
        return ops.attention_qkv(qkv, num_heads, scale=scale, backend=backend)
    q, k, v = split_qkv(qkv, num_heads)
    return attend(q, k, v, scale, attn_mask, is_causal, dropout_p, backend)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, attn_mask: torch.Tensor | None,
           is_causal: bool, dropout_p: float, backend: str) -> torch.Tensor:
    """q, k, v (B, H, N, D) -> (B, H, N, D): ``ops.attention`` (a mask or causal masking as its additive bias),
    or SDPA with attention dropout."""
    if dropout_p == 0.0:
        return ops.attention(q, k, v, bias=mask_bias(attn_mask, is_causal, q, k), scale=scale, backend=backend)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                                          scale=scale)


torch.fx.wrap("attend_qkv")  # leaf calls under torch.fx: they branch on the mask, a graph input
torch.fx.wrap("attend")


def _project(attn: nn.Module, o: torch.Tensor, residual: torch.Tensor | None, backend: str) -> torch.Tensor:
    """o (B, N, C) -> proj(o) [+ residual], the residual add in proj's epilogue (dropout: the plain path)."""
    if attn.training and attn.proj_drop.p > 0:
        o = attn.proj_drop(ops.linear(o, attn.proj.weight, attn.proj.bias, backend=backend))
        return o if residual is None else o + residual
    return ops.linear(o, attn.proj.weight, attn.proj.bias, residual=residual, backend=backend)
