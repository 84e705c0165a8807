"""Attention maps of a fused model, and attention rollout, for visualising what a ViT attends to.

A fused attention kernel never materialises the (N x N) probabilities, so they cannot be read off the normal
forward. ``attention_maps`` runs that forward once, unchanged (same kernels, same speed), with a forward hook
on every block's ``attn`` module that captures its input (the ``norm1`` output) and recomputes, for that
layer only, q and k from ``qkv`` (with ``q_norm`` / ``k_norm``) and softmax(q k^T * scale) in fp32 in plain
PyTorch. The hooks exist only during the call and are removed afterwards, also when the forward raises; the
model's forward and the Attention class are untouched, so the normal forward stays as fast as before.

    maps = vitkernels.attention_maps(model.eval(), images)        # L x (B, H, N, N), fp32
    rollout = vitkernels.attention_rollout(maps)                  # (B, N, N)
    cls_to_patches = rollout[:, 0, model.num_prefix_tokens:]      # (B, num_patches): reshape to the grid
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["attention_maps", "attention_rollout"]


def _norm(norm: nn.Module, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Apply q_norm / k_norm to the fp32 tensor t (B, H, N, D): LayerNorm in fp32, anything else as is."""
    if isinstance(norm, nn.Identity):
        return t
    if isinstance(norm, nn.LayerNorm):  # includes vitkernels.nn.norm.LayerNorm
        weight = None if norm.weight is None else norm.weight.float()
        bias = None if norm.bias is None else norm.bias.float()
        return F.layer_norm(t, norm.normalized_shape, weight, bias, norm.eps)
    return norm(t.to(dtype)).float()


def _layer_probs(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """x (B, N, C), the input of ``attn`` -> softmax(q k^T * scale) (B, H, N, N) in fp32."""
    B, N, C = x.shape
    H, D = attn.num_heads, attn.head_dim
    weight = attn.qkv.weight.float()
    bias = None if attn.qkv.bias is None else attn.qkv.bias.float()
    # Only q and k are needed: the first 2C output rows of qkv.
    qk = F.linear(x.float(), weight[: 2 * C], None if bias is None else bias[: 2 * C])  # (B, N, 2C)
    q, k = qk.view(B, N, 2, H, D).permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D)
    q, k = _norm(attn.q_norm, q, x.dtype), _norm(attn.k_norm, k, x.dtype)
    return torch.softmax((q @ k.transpose(-2, -1)) * attn.scale, dim=-1)


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor) -> list[torch.Tensor]:
    """Every layer's attention probabilities of ``model`` on ``images``.

    Args:
        model: a ``vitkernels.VisionTransformer`` (any backend), in eval mode (in training mode the forward
            would apply dropout; the maps are still those of the deterministic attention).
        images: (B, C, H, W), as for ``model(images)``.

    Returns:
        A list with one (B, H, N, N) fp32 tensor per block, on the images' device; row i of head h is the
        distribution of query token i over the keys (rows sum to 1). N includes the prefix (class) token.
    """
    if model.training:
        warnings.warn("attention_maps: the model is in training mode; call model.eval() for inference maps",
                      stacklevel=2)
    maps: list[torch.Tensor] = []

    def hook(module, args, output):
        with torch.autocast(images.device.type, enabled=False):
            maps.append(_layer_probs(module, args[0]).to(images.device))

    handles = []
    lean = [getattr(block, "lean", False) for block in model.blocks]
    try:
        for block in model.blocks:
            handles.append(block.attn.register_forward_hook(hook))
            block.lean = False  # the lean path fuses norm1 into qkv and never calls attn: no hook would fire
        model(images)
    finally:
        for handle, block, was in zip(handles, model.blocks, lean):
            handle.remove()
            block.lean = was
    return maps


def attention_rollout(maps: list[torch.Tensor] | tuple[torch.Tensor, ...], discard_ratio: float = 0.0,
                      head_fusion: str = "mean") -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema, 2020): how much each token's final representation draws on each
    input token, through all layers and the residual connections.

    Per layer l: fuse the heads (``mean`` | ``max`` | ``min``), optionally zero the lowest ``discard_ratio``
    fraction of the fused (N x N) entries of each sample (never the class token's attention to itself, as in
    the common implementations), add the residual, A_l = 0.5 * attn + 0.5 * I, and renormalise the rows.
    The result is A_L ... A_2 A_1 (B, N, N), row-stochastic; row 0 is the class token's rollout.

    Args:
        maps: the per-layer (B, H, N, N) probabilities, first layer first (``attention_maps``'s output).
        discard_ratio: in [0, 1); the fraction of lowest attentions to drop per layer.
        head_fusion: how to fuse heads: "mean", "max" or "min".
    """
    if len(maps) == 0:
        raise ValueError("attention_rollout: maps is empty")
    if head_fusion not in ("mean", "max", "min"):
        raise ValueError(f"attention_rollout: head_fusion must be 'mean', 'max' or 'min', got {head_fusion!r}")
    if not 0.0 <= discard_ratio < 1.0:
        raise ValueError(f"attention_rollout: discard_ratio must be in [0, 1), got {discard_ratio}")
    shape = maps[0].shape
    if len(shape) != 4 or shape[-1] != shape[-2]:
        raise ValueError(f"attention_rollout: maps must be (B, H, N, N), got {tuple(shape)}")
    for i, a in enumerate(maps):
        if a.shape != shape:
            raise ValueError(f"attention_rollout: layer {i} has shape {tuple(a.shape)}, layer 0 {tuple(shape)}")
    B, _, N, _ = shape
    eye = torch.eye(N, device=maps[0].device, dtype=maps[0].dtype)
    result = eye.expand(B, N, N)
    for a in maps:
        if head_fusion == "mean":
            fused = a.mean(dim=1)
        elif head_fusion == "max":
            fused = a.amax(dim=1)
        else:
            fused = a.amin(dim=1)  # (B, N, N), a new tensor: the caller's maps are never modified
        n_drop = int(N * N * discard_ratio)
        if n_drop > 0:
            flat = fused.reshape(B, N * N)
            lowest = flat.topk(n_drop, dim=-1, largest=False).indices  # (B, n_drop)
            keep = torch.ones_like(flat, dtype=torch.bool).scatter_(1, lowest, False)
            keep[:, 0] = True  # the class token's attention to itself
            fused = (flat * keep).view(B, N, N)
        layer = 0.5 * fused + 0.5 * eye
        layer = layer / layer.sum(dim=-1, keepdim=True)
        result = layer @ result
    return result
