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
                 backend: str = "auto", device=None, dtype=None):
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias, device=device, dtype=dtype)
        self.act = nn.GELU()  # kept for timm's module tree; the fused epilogue computes it
        self.drop1 = nn.Dropout(drop)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, out_features, bias=bias, device=device, dtype=dtype)
        self.drop2 = nn.Dropout(drop)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        return mlp_forward(self, x, residual, self.backend)


def mlp_forward(mlp: nn.Module, x: torch.Tensor, residual: torch.Tensor | None, backend: str) -> torch.Tensor:
    """x (B, N, C) -> fc2(drop1(GELU(fc1(x)))) [+ residual] for any module with timm's Mlp attribute names
    (``fc1``, ``drop1``, ``fc2``, ``drop2``): GELU in fc1's epilogue, the residual in fc2's."""
    h = mlp.drop1(ops.linear(x, mlp.fc1.weight, mlp.fc1.bias, activation="gelu", backend=backend))
    if mlp.training and mlp.drop2.p > 0:
        y = mlp.drop2(ops.linear(h, mlp.fc2.weight, mlp.fc2.bias, backend=backend))
        return y if residual is None else y + residual
    return ops.linear(h, mlp.fc2.weight, mlp.fc2.bias, residual=residual, backend=backend)
