"""The pre-norm transformer block (timm's ``Block``): x + attn(norm1(x)), then x + mlp(norm2(x)).

Residual adds are fused: with no LayerScale and no active stochastic depth, into the epilogues of the
``proj`` and ``fc2`` GEMMs; otherwise the first one into ``norm2`` (LayerNorm with fused residual).
"""

from __future__ import annotations

import torch
from torch import nn

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

    def _plain_residual(self) -> bool:
        """True when both branches are added unscaled and undropped, so the GEMM epilogues can add them."""
        no_ls = isinstance(self.ls1, nn.Identity)
        no_dp = isinstance(self.drop_path1, nn.Identity) or not self.training
        return no_ls and no_dp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._plain_residual():
            x = self.attn(self.norm1(x), residual=x)
            return self.mlp(self.norm2(x), residual=x)
        branch = self.drop_path1(self.ls1(self.attn(self.norm1(x))))
        h, x = self.norm2(branch, residual=x)  # h = LN(x + branch), x <- x + branch
        return x + self.drop_path2(self.ls2(self.mlp(h)))
