"""The transformer MLP with timm's names (``fc1``, ``act``, ``fc2``): two GEMMs with fused epilogues.

fc1 runs bias + exact-erf GELU in its epilogue; fc2 runs bias (+ the block's residual) in its epilogue.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkernels import ops


class Mlp(nn.Module):
    """x (B, N, C) -> fc2(GELU(fc1(x))) [+ residual], hidden width ``hidden_features``."""

    def __init__(self, in_features, hidden_features=None, out_features=None, bias=True, drop=0.0,
                 backend: str = "auto"):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()  # kept for timm's module tree; the fused epilogue computes it
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias)
        self.drop2 = nn.Dropout(drop)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        h = ops.linear(x, self.fc1.weight, self.fc1.bias, activation="gelu", backend=self.backend)
        h = self.drop1(h)
        if self.drop2.p > 0 and self.training:
            y = self.drop2(ops.linear(h, self.fc2.weight, self.fc2.bias, backend=self.backend))
            return y if residual is None else y + residual
        return ops.linear(h, self.fc2.weight, self.fc2.bias, residual=residual, backend=self.backend)
