"""Swap vitkernels' fused ops into an existing timm ``VisionTransformer``, in place.

    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    vitkernels.patch_timm(model)          # same object, same Parameters, optimizer state stays valid
    vitkernels.unpatch_timm(model)        # back to timm's own forward

The modules, parameters, state_dict and everything else of the timm model stay as they are; only the
forwards of the model (``forward_features``), of each ``Block`` and its ``attn`` and ``mlp``, each LayerNorm
and the classifier head are replaced (per instance, with ``types.MethodType``) by the same functions
vitkernels' own modules run (``block_forward``, ``attention_forward``, ``mlp_forward`` in vitkernels/nn/),
which call ``vitkernels.ops`` with the timm modules' own parameters:

    patch embed + class token + position embedding   one ops.patch_embed
    norm1 + qkv                                      ops.ln_linear (LayerNorm fused into the GEMM)
    attention                                        ops.attention on strided views of the qkv output
    proj (+ residual)                                ops.linear with the residual add in its epilogue
    norm2 + fc1 + GELU + fc2 (+ residual)            ops.ln_mlp, one op (only z = fc1's pre-activation is
                                                     stored between the GEMMs)
    other LayerNorms (norm_pre, norm, fc_norm, q/k norm), head   ops.layer_norm, ops.linear

With ``lean=False`` the blocks call every submodule instead (ops.layer_norm for norm1 / norm2, ops.linear for
qkv, fc1 + GELU, fc2), saving what timm saves for the backward; see vitkernels/nn/block.py.

Attention dropout during training uses PyTorch's SDPA (no fused kernel implements it). A block called with
``attn_mask`` / ``is_causal`` (timm's masked forward) runs timm's own block code. Configurations that
``vitkernels.from_timm`` rejects (register tokens, attention pooling, RMSNorm, tanh-GELU, ...) are rejected
here with the same errors.
"""

from __future__ import annotations

import types

import torch
import torch.utils.checkpoint
from torch import nn

from vitkernels import ops
from vitkernels.backends import OPS, BackendError, check_name, resolve
from vitkernels.convert import timm_vit_config
from vitkernels.nn.attention import attention_forward
from vitkernels.nn.block import block_forward
from vitkernels.nn.mlp import mlp_forward

__all__ = ["patch_timm", "unpatch_timm", "is_patched"]

_BACKEND = "_vitkernels_backend"  # attribute set on every patched module
_PATCHED = "_vitkernels_patched"  # names of the methods bound on a patched module
_LEAN = "_vitkernels_lean"  # set on every patched Block: run vitkernels' memory-lean block path


def _bind(module: nn.Module, name: str, fn, backend: str) -> None:
    setattr(module, name, types.MethodType(fn, module))
    setattr(module, _BACKEND, backend)
    setattr(module, _PATCHED, getattr(module, _PATCHED, ()) + (name,))


# -- replacement forwards -------------------------------------------------------------------------------------
def _layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return ops.layer_norm(x, self.weight, self.bias, eps=self.eps, backend=getattr(self, _BACKEND))


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return ops.linear(x, self.weight, self.bias, backend=getattr(self, _BACKEND))


def _attention_forward(self: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    if attn_mask is not None or is_causal:  # masked attention: timm's own code
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    return attention_forward(self, x, residual, getattr(self, _BACKEND))


def _mlp_forward(self: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    return mlp_forward(self, x, residual, getattr(self, _BACKEND))


def _block_forward(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False) -> torch.Tensor:
    if attn_mask is not None or is_causal:  # masked attention: timm's own code (its norms stay patched)
        return type(self).forward(self, x, attn_mask=attn_mask, is_causal=is_causal)
    return block_forward(self, x, getattr(self, _BACKEND), getattr(self, _LEAN, True))


def _embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) -> tokens (B, prefix + N, D): patchify, project, class token, position, one op."""
    pe = self.patch_embed
    proj = pe.proj
    if x.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(x.shape)}")
    C, H, W = x.shape[1:]
    P = proj.kernel_size[0]
    if C != proj.in_channels:
        raise ValueError(f"expected {proj.in_channels} input channels, got {C}")
    if pe.strict_img_size and (H, W) != tuple(pe.img_size):
        raise ValueError(f"input image size {H}x{W} does not match the model's {pe.img_size[0]}x{pe.img_size[1]}")
    if H % P or W % P:
        raise ValueError(f"input image size {H}x{W} is not divisible by the patch size {P}")
    pos_embed = self.pos_embed
    if self.dynamic_img_size:
        from timm.layers import resample_abs_pos_embed

        pos_embed = resample_abs_pos_embed(
            pos_embed, new_size=(H // P, W // P), old_size=pe.grid_size,
            num_prefix_tokens=0 if self.no_embed_class else self.num_prefix_tokens,
        )
    x = ops.patch_embed(x, proj.weight, proj.bias, pos_embed=pos_embed, cls_token=self.cls_token,
                        backend=getattr(self, _BACKEND))
    return self.pos_drop(x)


def _forward_features(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      is_causal: bool = False) -> torch.Tensor:
    x = _embed(self, x)
    x = self.patch_drop(x)
    x = self.norm_pre(x)
    if attn_mask is not None or is_causal:
        for blk in self.blocks:
            x = blk(x, attn_mask=attn_mask, is_causal=is_causal)
    elif self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
        for blk in self.blocks:
            x = torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
    else:
        x = self.blocks(x)
    return self.norm(x)


# -- public API -----------------------------------------------------------------------------------------------
def is_patched(model: nn.Module) -> bool:
    return _PATCHED in model.__dict__


def patch_timm(model: nn.Module, backend: str = "auto", lean: bool = True) -> nn.Module:
    """Run a timm ``VisionTransformer`` on vitkernels ops, in place; returns the same model.

    Args:
        model: ``timm.models.vision_transformer.VisionTransformer``.
        backend: 'auto' | 'triton' | 'cuda' | 'torch' for every op. Patching a patched model changes the backend.
        lean: the memory-lean blocks (vitkernels/nn/block.py: norm1 fused into qkv, norm2 + MLP one op; hooks
            on norm1 / attn / norm2 / mlp do not fire). False: every submodule's forward is called.

    Raises:
        TypeError for another model type; ``vitkernels.convert.UnsupportedModelError`` naming an unsupported
        feature. Nothing is modified when it raises.
    """
    backend = check_name(backend)
    timm_vit_config(model)  # validates everything the replacement forwards rely on
    if is_patched(model):
        unpatch_timm(model)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            _bind(m, "forward", _layer_norm_forward, backend)
    for blk in model.blocks:
        _bind(blk, "forward", _block_forward, backend)
        setattr(blk, _LEAN, lean)
        _bind(blk.attn, "forward", _attention_forward, backend)
        _bind(blk.mlp, "forward", _mlp_forward, backend)
    if isinstance(model.head, nn.Linear):
        _bind(model.head, "forward", _linear_forward, backend)
    _bind(model, "forward_features", _forward_features, backend)
    # Probe the backends now, outside any torch.compile trace (probing imports modules, which dynamo cannot
    # trace). A backend that cannot run here raises at the first forward, with its reason.
    device = model.pos_embed.device
    for op in OPS:
        try:
            resolve(op, backend, device)
        except BackendError:
            pass
    return model


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo ``patch_timm``: every module runs timm's own forward again. Returns the same model."""
    for m in model.modules():
        for name in m.__dict__.pop(_PATCHED, ()):
            m.__dict__.pop(name, None)
        m.__dict__.pop(_BACKEND, None)
        m.__dict__.pop(_LEAN, None)
    return model
