"""LayerNorm with timm's parameter names, running ``vitkernels.ops.layer_norm`` (eps 1e-6 as in ViT)."""

from __future__ import annotations

import torch
from torch import nn

from vitkernels import ops


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state_dict) whose forward runs on the chosen backend.

    ``forward(x, residual=None)``: x (..., C) -> LN(x); with a residual, (LN(x + residual), x + residual).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 bias: bool = True, backend: str = "auto"):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps, residual=residual, backend=self.backend)
