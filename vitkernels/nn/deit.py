"""DeiT's distilled Vision Transformer (Touvron et al., 2021; timm's ``VisionTransformerDistilled``): a second
prefix token (the distillation token, after the class token) and a second head reading it.

The distillation token is one more prefix row written by the fused patch embedding (with its position
embedding: timm's ``pos_embed`` covers both prefix tokens unless ``no_embed_class``). The heads: in training
with ``distilled_training`` the pair (class-head logits, distillation-head logits), for the teacher's loss;
otherwise their mean, as timm.
"""

from __future__ import annotations

import torch
from torch import nn

from vitkernels.nn.init import trunc_normal_
from vitkernels.nn.model_api import zero_head
from vitkernels.nn.vision_transformer import VisionTransformer


class VisionTransformerDistilled(VisionTransformer):
    """VisionTransformer with a distillation token and head; the arguments are VisionTransformer's
    (``global_pool`` must be 'token', no register tokens)."""

    def __init__(self, *args, **kwargs):
        weight_init = kwargs.pop("weight_init", "")
        super().__init__(*args, **kwargs, weight_init="skip")
        if self.global_pool != "token":
            raise ValueError("VisionTransformerDistilled reads the class and distillation tokens: global_pool must "
                             f"be 'token', got {self.global_pool!r}")
        if self.num_reg_tokens:
            raise ValueError("VisionTransformerDistilled takes no register tokens (as timm's)")
        if self.no_embed_class:
            raise ValueError("VisionTransformerDistilled(no_embed_class=True) is not supported: timm's sizes "
                             "pos_embed for both prefix tokens (its forward then fails); DeiT checkpoints use False")
        dd = dict(device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        self.num_prefix_tokens = 2
        self.dist_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim, **dd))
        if self.pos_embed is not None:  # the class and distillation tokens have positions (timm, DeiT)
            self.pos_embed = nn.Parameter(torch.zeros(1, self.patch_embed.num_patches + 2, self.embed_dim, **dd))
        self.head_dist = nn.Linear(self.embed_dim, self.num_classes, **dd) if self.num_classes > 0 else nn.Identity()
        self.distilled_training = False  # set_distilled_training(True) returns both heads' logits in training
        self.weight_init_mode = "reset" if weight_init == "skip" else weight_init
        if weight_init != "skip":
            self.init_weights(needs_reset=False)

    def init_weights(self, mode: str = "", needs_reset: bool = True) -> None:
        """timm's: the distillation token trunc-normal(0.02), then VisionTransformer's init."""
        trunc_normal_(self.dist_token, std=0.02)
        super().init_weights(mode or self.weight_init_mode, needs_reset=needs_reset)

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r"^cls_token|pos_embed|patch_embed|dist_token",
                    blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))])

    @torch.jit.ignore
    def get_classifier(self):
        return self.head, self.head_dist

    @torch.jit.ignore
    def set_distilled_training(self, enable: bool = True) -> None:
        self.distilled_training = enable

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Both heads replaced by zero-initialised (embed_dim x num_classes) layers (see VisionTransformer's)."""
        if global_pool not in (None, "", "token"):
            raise ValueError("VisionTransformerDistilled reads the class and distillation tokens: global_pool must "
                             f"be 'token', got {global_pool!r}")
        super().reset_classifier(num_classes)
        self.head_dist = zero_head(self, num_classes)
        self.head_dist.train(self.training)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False):
        """tokens (B, T, D) -> mean of both heads' logits (B, num_classes); in training with distilled_training
        the pair; with ``pre_logits`` the mean of the two tokens (B, D)."""
        x, x_dist = self.head_drop(x[:, 0]), self.head_drop(x[:, 1])
        if pre_logits:
            return (x + x_dist) / 2
        x, x_dist = self.head(x), self.head_dist(x_dist)
        if self.distilled_training and self.training and not torch.jit.is_scripting():
            return x, x_dist
        return (x + x_dist) / 2
