"""The pre-norm transformer block (timm's ``Block``): x + attn(norm1(x)), then x + mlp(norm2(x)).

Residual adds are fused: with no LayerScale and no active stochastic depth, into the epilogues of the
``proj`` and ``fc2`` GEMMs; otherwise the first one into ``norm2`` (LayerNorm with fused residual).
"""

from __future__ import annotations

import torch
from torch import nn

from vitkernels import ops
from vitkernels.nn.attention import Attention
from vitkernels.nn.mlp import Mlp
from vitkernels.nn.norm import LayerNorm


class LayerScale(nn.Module):
    """x * gamma, gamma (C,) initialised to ``init_values`` (CaiT); timm's key is ``gamma``."""

    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, scale the rest by 1/(1-p)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Block(nn.Module):
    """x (B, N, C) -> (B, N, C). Arguments as timm's Block, plus ``backend``."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_norm=False, proj_bias=True,
                 proj_drop=0.0, attn_drop=0.0, init_values=None, drop_path=0.0, norm_eps=1e-6,
                 backend: str = "auto"):
        super().__init__()
        self.norm1 = LayerNorm(dim, eps=norm_eps, backend=backend)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
                              attn_drop=attn_drop, proj_drop=proj_drop, norm_eps=norm_eps, backend=backend)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=norm_eps, backend=backend)
        self.mlp = Mlp(dim, hidden_features=int(dim * mlp_ratio), bias=proj_bias, drop=proj_drop, backend=backend)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.backend = backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_forward(self, x, self.backend)


def _layer_scale(ls: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if isinstance(ls, nn.Identity) else x * ls.gamma  # never timm's in-place variant


def block_forward(blk: nn.Module, x: torch.Tensor, backend: str) -> torch.Tensor:
    """x (B, N, C) -> (B, N, C) for any module with timm's Block attribute names (``norm1``, ``attn``, ``ls1``,
    ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``): this Block, and timm's own under
    ``vitkernels.patch_timm``, whose ``attn`` and ``mlp`` take ``residual=``. The submodules are called (not
    bypassed), so hooks on them fire. The residual adds are fused where the math allows (module docstring)."""
    plain = (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)
             and (not blk.training or (isinstance(blk.drop_path1, nn.Identity)
                                       and isinstance(blk.drop_path2, nn.Identity))))
    if plain:  # both residual adds in the GEMM epilogues
        x = blk.attn(blk.norm1(x), residual=x)
        return blk.mlp(blk.norm2(x), residual=x)
    branch = blk.drop_path1(_layer_scale(blk.ls1, blk.attn(blk.norm1(x))))
    n2 = blk.norm2
    h, x = ops.layer_norm(branch, n2.weight, n2.bias, eps=n2.eps, residual=x, backend=backend)  # x <- x + branch
    return x + blk.drop_path2(_layer_scale(blk.ls2, blk.mlp(h)))
