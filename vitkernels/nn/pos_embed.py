"""Resampling absolute position embeddings to a new patch grid (fine-tuning at higher resolution, ViT
paper section 3.2: 2-D interpolation of the pre-trained position embeddings by their location in the image).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def resample_pos_embed(
    pos_embed: torch.Tensor,
    new_size,
    old_size=None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Interpolate (1, prefix + h*w, D) position embeddings to a (H, W) grid; same result as timm's
    ``resample_abs_pos_embed``.

    Args:
        pos_embed: (1, num_prefix_tokens + h * w, D).
        new_size: target grid (H, W) in patches (an int means square).
        old_size: source grid (h, w); None means square, inferred from the token count.
        num_prefix_tokens: leading tokens (class token) copied unchanged.
        interpolation: F.interpolate mode ("bicubic", "bilinear", ...). antialias: as F.interpolate.

    Returns:
        (1, num_prefix_tokens + H * W, D) in the input dtype (interpolated in fp32).
    """
    new_size = (new_size, new_size) if isinstance(new_size, int) else tuple(new_size)
    if pos_embed.dim() != 3 or pos_embed.shape[0] != 1:
        raise ValueError(f"pos_embed must be (1, T, D), got {tuple(pos_embed.shape)}")
    num_pos = pos_embed.shape[1]
    if num_pos == new_size[0] * new_size[1] + num_prefix_tokens and new_size[0] == new_size[1]:
        return pos_embed
    if old_size is None:
        hw = int(math.isqrt(num_pos - num_prefix_tokens))
        if hw * hw != num_pos - num_prefix_tokens:
            raise ValueError(
                f"cannot infer a square grid from {num_pos - num_prefix_tokens} patch positions; pass old_size"
            )
        old_size = (hw, hw)
    old_size = (old_size, old_size) if isinstance(old_size, int) else tuple(old_size)
    if old_size[0] * old_size[1] + num_prefix_tokens != num_pos:
        raise ValueError(f"old_size {old_size} with {num_prefix_tokens} prefix tokens does not match {num_pos} positions")
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    D = pos_embed.shape[-1]
    dtype = pos_embed.dtype
    grid = grid.float().reshape(1, old_size[0], old_size[1], D).permute(0, 3, 1, 2)  # (1, D, h, w)
    grid = F.interpolate(grid, size=new_size, mode=interpolation, antialias=antialias)
    grid = grid.permute(0, 2, 3, 1).reshape(1, -1, D).to(dtype)
    return torch.cat([prefix, grid], dim=1) if num_prefix_tokens else grid
