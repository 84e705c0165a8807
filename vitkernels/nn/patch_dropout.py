"""Patch dropout (timm's ``PatchDropout``; Liu et al. 2022, Li et al. 2023): in training, keep a random subset
of the patch tokens (the prefix tokens always), max(1, int(N * (1 - p))) per sample, in random order, drawn
exactly as timm draws them (``argsort(randn(B, N))``), so a seeded run keeps the same patches as timm."""

from __future__ import annotations

import torch
from torch import nn


def patch_dropout(x: torch.Tensor, prob: float, num_prefix_tokens: int, ordered: bool, training: bool) -> torch.Tensor:
    """tokens (B, prefix + N, C) -> (B, prefix + K, C), K = max(1, int(N * (1 - prob))), in training."""
    if not training or prob == 0.0:
        return x
    prefix, x = (x[:, :num_prefix_tokens], x[:, num_prefix_tokens:]) if num_prefix_tokens else (None, x)
    B, L = x.shape[0], x.shape[1]
    keep = torch.argsort(torch.randn(B, L, device=x.device), dim=-1)[:, :max(1, int(L * (1.0 - prob)))]
    if ordered:
        keep = keep.sort(dim=-1)[0]
    x = x.gather(1, keep.unsqueeze(-1).expand((-1, -1) + x.shape[2:]))
    return x if prefix is None else torch.cat((prefix, x), dim=1)


torch.fx.wrap("patch_dropout")  # a leaf call under torch.fx: its token count is data, not graph structure


class PatchDropout(nn.Module):
    """timm's PatchDropout (no parameters); identity in eval mode."""

    def __init__(self, prob: float = 0.5, num_prefix_tokens: int = 1, ordered: bool = False):
        super().__init__()
        if not 0.0 <= prob < 1.0:
            raise ValueError(f"patch_drop_rate must be in [0, 1), got {prob}")
        self.prob = prob
        self.num_prefix_tokens = num_prefix_tokens
        self.ordered = ordered

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return patch_dropout(x, self.prob, self.num_prefix_tokens, self.ordered, self.training)
