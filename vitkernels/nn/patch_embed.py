"""PatchEmbed: timm's module (``patch_embed.proj`` is a Conv2d with kernel = stride = P), run on the fused op.

The model calls ``vitkernels.ops.patch_embed`` with its class token and position embedding so that one
kernel writes the whole token sequence; ``forward`` alone returns the patch tokens (B, N, D).
"""

from __future__ import annotations

import torch
from torch import nn

from vitkernels import ops


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, D), N = (H/P) * (W/P).

    Args:
        img_size: the training resolution (int or (H, W)); fixes ``grid_size`` and ``num_patches``.
        patch_size: P (square patches).
        in_chans: C. embed_dim: D. bias: whether the projection has a bias.
        strict_img_size: reject inputs whose size differs from ``img_size`` (timm's default).
        backend: the ops backend.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True,
                 strict_img_size=True, backend: str = "auto"):
        super().__init__()
        self.img_size = _pair(img_size)
        p = _pair(patch_size)
        if p[0] != p[1]:
            raise ValueError(f"only square patches are supported, got patch_size={patch_size}")
        self.patch_size = p
        if self.img_size[0] % p[0] or self.img_size[1] % p[1]:
            raise ValueError(f"img_size {self.img_size} is not divisible by patch_size {p[0]}")
        self.grid_size = (self.img_size[0] // p[0], self.img_size[1] // p[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.strict_img_size = strict_img_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=p, stride=p, bias=bias)
        self.norm = nn.Identity()
        self.backend = backend

    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """Validate an image batch; return its patch grid (H/P, W/P)."""
        if x.dim() != 4:
            raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
        C, H, W = x.shape[1:]
        if C != self.proj.in_channels:
            raise ValueError(f"expected {self.proj.in_channels} input channels, got {C}")
        P = self.patch_size[0]
        if self.strict_img_size and (H, W) != self.img_size:
            raise ValueError(
                f"input image size {H}x{W} does not match the model's {self.img_size[0]}x{self.img_size[1]} "
                "(build the model with dynamic_img_size=True to accept other sizes)"
            )
        if H % P or W % P:
            raise ValueError(f"input image size {H}x{W} is not divisible by the patch size {P}")
        return H // P, W // P

    def feat_ratio(self) -> int:
        return self.patch_size[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return ops.patch_embed(x, self.proj.weight, self.proj.bias, backend=self.backend)
