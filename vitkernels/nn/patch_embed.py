"""PatchEmbed: timm's module (``patch_embed.proj`` is a Conv2d with kernel = stride = P), run on the fused op.

The model calls ``vitkernels.ops.patch_embed`` with its class token and position embedding so that one
kernel writes the whole token sequence; ``forward`` alone returns the patch tokens (B, N, D).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitkernels import ops


def _pair(x) -> tuple[int, int]:
    return (int(x), int(x)) if isinstance(x, int) else (int(x[0]), int(x[1]))


def is_fx_tracing() -> bool:
    """True while torch.fx symbolically traces (inputs are Proxies: no checks on their shapes); False under
    torch.compile / torch.export, which trace real (fake) tensors."""
    if torch.compiler.is_compiling():
        return False
    fx = torch.fx._symbolic_trace
    return (getattr(fx, "is_fx_symbolic_tracing", None) or fx.is_fx_tracing)()


def check_images(pe: nn.Module, x: torch.Tensor) -> None:
    """Validate an image batch for a patch embedding with timm's attributes (``proj``, ``img_size``,
    ``strict_img_size``, ``dynamic_img_pad``): vitkernels' PatchEmbed and timm's."""
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    C, H, W = x.shape[1:]
    proj = pe.proj
    if C != proj.in_channels:
        raise ValueError(f"expected {proj.in_channels} input channels, got {C}")
    P = proj.kernel_size[0]
    img_size = tuple(pe.img_size)
    if pe.strict_img_size and (H, W) != img_size:
        raise ValueError(
            f"input image size {H}x{W} does not match the model's {img_size[0]}x{img_size[1]} "
            "(build the model with dynamic_img_size=True to accept other sizes)"
        )
    fixed_size = pe.strict_img_size and (H, W) == img_size  # timm's Conv2d drops a remainder of the fixed size
    if not getattr(pe, "dynamic_img_pad", False) and (H % P or W % P) and not fixed_size:
        raise ValueError(f"input image size {H}x{W} is not divisible by the patch size {P}")


def pad_images(pe: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """With ``pe.dynamic_img_pad``: zero-pad right and bottom to multiples of P (timm's F.pad). A fixed
    img_size that is not a multiple of P (SigLIP so400m/14 at 384: 27 x 27 patches) loses its last rows and
    columns, as timm's stride-P Conv2d drops them: a view of x. Else x."""
    if not getattr(pe, "dynamic_img_pad", False):
        gh, gw = pe.grid_size
        P = pe.proj.kernel_size[0]
        if pe.strict_img_size and (pe.img_size[0] != gh * P or pe.img_size[1] != gw * P):
            return x[:, :, :gh * P, :gw * P]
        return x
    P = pe.proj.kernel_size[0]
    H, W = x.shape[-2], x.shape[-1]
    return F.pad(x, (0, (P - W % P) % P, 0, (P - H % P) % P))


class PatchEmbed(nn.Module):
    """Image (B, C, H, W) -> patch tokens (B, N, D), N = (H/P) * (W/P).

    Args:
        img_size: the training resolution (int or (H, W)); fixes ``grid_size`` and ``num_patches``.
        patch_size: P (square patches).
        in_chans: C. embed_dim: D. bias: whether the projection has a bias.
        strict_img_size: reject inputs whose size differs from ``img_size`` (timm's default).
        dynamic_img_pad: zero-pad the right / bottom of an image to a multiple of P (timm's).
        backend: the ops backend. device, dtype: of the projection's parameters.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768, bias=True,
                 strict_img_size=True, backend: str = "auto", dynamic_img_pad: bool = False, device=None,
                 dtype=None):
        super().__init__()
        p = _pair(patch_size)
        if p[0] != p[1]:
            raise ValueError(f"only square patches are supported, got patch_size={patch_size}")
        self.patch_size = p
        self.dynamic_img_pad = dynamic_img_pad
        self._set_img_size(img_size)
        self.strict_img_size = strict_img_size
        self.flatten = True
        self.output_fmt = "NLC"
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=p, stride=p, bias=bias, device=device, dtype=dtype)
        self.norm = nn.Identity()
        self.backend = backend

    def _set_img_size(self, img_size) -> None:
        self.img_size = _pair(img_size)
        p = self.patch_size  # a remainder of img_size is dropped (timm's stride-P Conv2d): see pad_images
        self.grid_size = (self.img_size[0] // p[0], self.img_size[1] // p[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        """timm's: a new training resolution (and patch size: the projection is resampled with timm's
        ``resample_patch_embed``, FlexiViT's pseudo-inverse, which needs timm)."""
        if patch_size is not None and _pair(patch_size) != self.patch_size:
            try:
                from timm.layers import resample_patch_embed
            except ImportError as exc:
                raise ImportError("changing patch_size resamples the projection with timm's resample_patch_embed: "
                                  "pip install timm") from exc
            new = _pair(patch_size)
            if new[0] != new[1]:
                raise ValueError(f"only square patches are supported, got patch_size={patch_size}")
            with torch.no_grad():
                weight = resample_patch_embed(self.proj.weight, list(new), verbose=True)
            proj = nn.Conv2d(self.proj.in_channels, self.proj.out_channels, kernel_size=new, stride=new,
                             bias=self.proj.bias is not None, device=weight.device, dtype=weight.dtype)
            proj.weight = nn.Parameter(weight, requires_grad=self.proj.weight.requires_grad)
            if self.proj.bias is not None:
                proj.bias = self.proj.bias
            self.proj = proj
            self.patch_size = new
        self._set_img_size(self.img_size if img_size is None else img_size)

    def dynamic_feat_size(self, img_size) -> tuple[int, int]:
        """The patch grid of an (H, W) image (rounded up with ``dynamic_img_pad``)."""
        H, W = img_size
        P = self.patch_size[0]
        if self.dynamic_img_pad:
            return -(-H // P), -(-W // P)
        return H // P, W // P

    def check_input(self, x: torch.Tensor) -> tuple[int, int]:
        """Validate an image batch; return its patch grid (H/P, W/P) (after padding with dynamic_img_pad)."""
        check_images(self, x)
        return self.dynamic_feat_size(tuple(x.shape[-2:]))

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """With ``dynamic_img_pad``: zero-pad right and bottom to multiples of P (timm's F.pad)."""
        return pad_images(self, x)

    def feat_ratio(self, as_scalar: bool = True):
        return self.patch_size[0] if as_scalar else self.patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not is_fx_tracing():
            self.check_input(x)
        return ops.patch_embed(self.pad(x), self.proj.weight, self.proj.bias, backend=self.backend)
