"""VisionTransformer: timm's constructor arguments, module tree and state_dict keys, on vitkernels ops.

The model follows Dosovitskiy et al. (2021): patches -> linear projection -> [class token] + position
embeddings -> L pre-norm blocks (MSA, MLP with GELU) -> LayerNorm -> head on the class token (or the mean of
the patch tokens with ``global_pool='avg'``). Every LayerNorm, GEMM, attention and the patch embedding run
through ``vitkernels.ops`` with the backend chosen at construction (``backend=``, changeable with
``set_backend``); nothing else in the model dispatches.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from vitkernels import ops
from vitkernels.backends import check_name, prepare
from vitkernels.nn.block import Block
from vitkernels.nn.checkpoint import checkpointed
from vitkernels.nn.norm import LayerNorm
from vitkernels.nn.patch_embed import PatchEmbed
from vitkernels.nn.pos_embed import resample_pos_embed


class VisionTransformer(nn.Module):
    """Vision Transformer, a drop-in for ``timm.models.vision_transformer.VisionTransformer``.

    Args (timm's names and defaults):
        img_size, patch_size, in_chans, num_classes, global_pool ('token' | 'avg' | ''), embed_dim, depth,
        num_heads, mlp_ratio, qkv_bias, qk_norm, proj_bias, init_values (LayerScale), class_token,
        no_embed_class, pre_norm, final_norm, fc_norm (None: on for 'avg' pooling), dynamic_img_size,
        drop_rate (head), pos_drop_rate, proj_drop_rate, attn_drop_rate, drop_path_rate, weight_init
        ('' or 'skip').
        norm_eps: LayerNorm eps (timm and the paper: 1e-6; HF checkpoints use their config's, often 1e-12).
        backend: 'auto' | 'triton' | 'cuda' | 'torch' for every op of the model.
        lean_blocks: run the memory-lean fused blocks (LayerNorm fused into the qkv GEMM, norm2 + MLP as one
            op; the backward keeps 10 C values per token and block instead of 16; see vitkernels/nn/block.py).
            False: the per-op path, every submodule called (forward hooks on norm1 / norm2 / mlp fire).
        fp32_residual: under autocast keep the residual stream in fp32, as timm does (default False: the
            stream is in the autocast dtype and the residual adds are fused into GEMM epilogues); see
            vitkernels/nn/block.py.

    Input: images (B, in_chans, H, W); H, W = img_size unless ``dynamic_img_size``, then any multiple of P.
    Output: logits (B, num_classes), or features (B, embed_dim) when num_classes == 0.
    """

    def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, global_pool="token",
                 embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_norm=False,
                 proj_bias=True, init_values=None, class_token=True, no_embed_class=False, pre_norm=False,
                 final_norm=True, fc_norm=None, dynamic_img_size=False, drop_rate=0.0, pos_drop_rate=0.0,
                 proj_drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, weight_init="", norm_eps=1e-6,
                 backend="auto", lean_blocks=True, fp32_residual=False):
        super().__init__()
        if global_pool not in ("", "avg", "token"):
            raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True")
        if weight_init not in ("", "skip"):
            raise ValueError(f"weight_init must be '' or 'skip', got {weight_init!r}")
        backend = check_name(backend)
        prepare(backend)
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1 if class_token else 0
        self.has_class_token = class_token
        self.no_embed_class = no_embed_class
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.checkpoint_mode = "full"  # or "selective": see set_grad_checkpointing
        self.fp32_residual = fp32_residual
        self.backend = backend

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim, bias=not pre_norm,
                                      strict_img_size=not dynamic_img_size, backend=backend)
        num_patches = self.patch_embed.num_patches
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        embed_len = num_patches if no_embed_class else num_patches + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, embed_len, embed_dim))
        self.pos_drop = nn.Dropout(p=pos_drop_rate)
        self.norm_pre = LayerNorm(embed_dim, eps=norm_eps, backend=backend) if pre_norm else nn.Identity()
        dpr = [x.item() for x in torch.linspace(0, drop_path_rate, depth, device="cpu")]  # stochastic depth decay rule
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                  proj_bias=proj_bias, proj_drop=proj_drop_rate, attn_drop=attn_drop_rate,
                  init_values=init_values, drop_path=dpr[i], norm_eps=norm_eps, backend=backend,
                  lean=lean_blocks, fp32_residual=fp32_residual)
            for i in range(depth)
        ])
        self.norm = LayerNorm(embed_dim, eps=norm_eps, backend=backend) if final_norm and not use_fc_norm else nn.Identity()
        self.fc_norm = LayerNorm(embed_dim, eps=norm_eps, backend=backend) if final_norm and use_fc_norm else nn.Identity()
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if weight_init != "skip":
            self.init_weights()

    # -- initialisation ----------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """timm's default init: trunc-normal(0.02) position embeddings and Linear weights, zero biases,
        class token N(0, 1e-6); the patch projection keeps PyTorch's Conv2d init, as in timm."""
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # -- timm API ---------------------------------------------------------------------------------------
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token", "dist_token"}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True, selective: bool = False) -> None:
        """Checkpoint every block in training (timm's API). ``selective``: keep GEMM and attention outputs,
        recompute the rest (``vitkernels.nn.checkpoint``); else the whole block is recomputed."""
        self.grad_checkpointing = enable
        self.checkpoint_mode = "selective" if selective else "full"

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """Replace the head with a zero-initialised (embed_dim x num_classes) layer, as for fine-tuning in the
        paper (section 3.2): weight and bias all zero, so the new head starts at uniform predictions."""
        self.num_classes = num_classes
        if global_pool is not None:
            if global_pool not in ("", "avg", "token"):
                raise ValueError(f"global_pool must be 'token', 'avg' or '', got {global_pool!r}")
            if global_pool == "token" and not self.has_class_token:
                raise ValueError("global_pool='token' needs a class token")
            self.global_pool = global_pool
        ref = self.pos_embed
        if num_classes > 0:
            self.head = nn.Linear(self.embed_dim, num_classes, device=ref.device, dtype=ref.dtype)
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)
        else:
            self.head = nn.Identity()

    def set_backend(self, backend: str) -> "VisionTransformer":
        """Run every op of the model on ``backend`` from now on."""
        backend = check_name(backend)
        prepare(backend)
        for m in self.modules():
            if hasattr(m, "backend"):
                m.backend = backend
        return self

    # -- forward ----------------------------------------------------------------------------------------
    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> tokens (B, prefix + N, D) in one fused op."""
        grid = self.patch_embed.check_input(x)
        pos_embed = self.pos_embed
        if self.dynamic_img_size and grid != self.patch_embed.grid_size:
            pos_embed = resample_pos_embed(
                pos_embed, grid, old_size=self.patch_embed.grid_size,
                num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
            )
        proj = self.patch_embed.proj
        x = ops.patch_embed(x, proj.weight, proj.bias, pos_embed=pos_embed, cls_token=self.cls_token,
                            backend=self.backend)
        if getattr(self, "fp32_residual", False) and torch.is_autocast_enabled(x.device.type):
            x = x.float()  # the stream starts fp32 (timm: bf16 patch GEMM + fp32 position embedding)
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """images (B, C, H, W) -> normalised tokens (B, prefix + N, D)."""
        x = self._embed(x)
        x = self.norm_pre(x)
        if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
            for blk in self.blocks:
                x = checkpointed(blk, x, getattr(self, "checkpoint_mode", "full"))
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        if self.global_pool == "token":
            return x[:, 0]
        if self.global_pool == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """tokens (B, T, D) -> logits (B, num_classes), or the pooled features with ``pre_logits``."""
        x = self.pool(x)
        x = self.fc_norm(x)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


ViT = VisionTransformer


def load_pretrained(model: VisionTransformer, state_dict: dict, strict: bool = True,
                    interpolation: str = "bicubic"):
    """Load a timm-keyed state_dict, resampling position embeddings made at another resolution.

    A checkpoint whose ``pos_embed`` has a different number of patch positions (pre-trained at 224,
    fine-tuned at 384, say) is interpolated in 2-D to the model's grid first. With ``strict``, missing or
    unexpected keys raise a KeyError naming them. Returns ``load_state_dict``'s result.
    """
    state_dict = dict(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if strict and (missing or unexpected):
        raise KeyError(f"state_dict does not match the model: missing keys {missing}, unexpected keys {unexpected}")
    pe = state_dict.get("pos_embed")
    if pe is not None and pe.shape != own["pos_embed"].shape:
        prefix = 0 if model.no_embed_class else model.num_prefix_tokens
        old_n = pe.shape[1] - prefix
        hw = math.isqrt(old_n)
        if hw * hw != old_n:
            raise ValueError(f"checkpoint pos_embed has {old_n} patch positions, not a square grid")
        state_dict["pos_embed"] = resample_pos_embed(pe, model.patch_embed.grid_size, old_size=(hw, hw),
                                                     num_prefix_tokens=prefix, interpolation=interpolation)
    return model.load_state_dict(state_dict, strict=strict)
