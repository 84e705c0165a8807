"""Activation checkpointing policies for vitkernels' ops (``VisionTransformer.set_grad_checkpointing``).

``full``: each block is a ``torch.utils.checkpoint`` region; the backward reruns its whole forward (one more
forward's FLOPs) and only the block inputs are kept.

``selective``: the same regions with ``torch.utils.checkpoint.create_selective_checkpoint_contexts`` and the
policy below: the outputs of GEMMs and attention (vitkernels' fused ops in any backend's namespace, and
aten's matmuls and SDPA kernels for the torch backend) are saved, everything else (LayerNorm, GELU, adds,
views) is recomputed in the backward. On the per-op path this drops LN(x); on the lean blocks every op of a
block is a GEMM or attention op, so selective keeps what no checkpointing keeps (the lean blocks already
recompute LN(x) and GELU(z) inside their GEMMs) and recomputes nothing but views.
"""

from __future__ import annotations

import functools

import torch
from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

# Ops whose outputs a selective policy keeps: "<op>_fwd" in any vitkernels namespace, and aten's GEMM /
# attention kernels (what the torch backend and timm run).
_FUSED_SAVED = ("linear_fwd", "ln_linear_fwd", "ln_mlp_fwd", "attention_fwd", "attention_qkv_fwd", "patch_embed_fwd")
_ATEN_SAVED = {
    "aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::linear", "aten::convolution",
    "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_efficient_attention",
    "aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
}


def saves_gemm_and_attention(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    """A selective-checkpointing policy: save GEMM / attention outputs, recompute the rest."""
    name = op._schema.name  # "vitkernels_triton::ln_mlp_fwd", "aten::mm"
    ns, _, short = name.partition("::")
    if name in _ATEN_SAVED or (ns.startswith("vitkernels") and short in _FUSED_SAVED):
        return CheckpointPolicy.MUST_SAVE
    return CheckpointPolicy.PREFER_RECOMPUTE


def checkpoint_kwargs(mode: str) -> dict:
    """Keyword arguments of ``torch.utils.checkpoint.checkpoint`` for ``mode`` "full" or "selective"."""
    if mode == "full":
        return dict(use_reentrant=False)
    if mode == "selective":
        return dict(use_reentrant=False,
                    context_fn=functools.partial(create_selective_checkpoint_contexts, saves_gemm_and_attention))
    raise ValueError(f"checkpointing mode must be 'full' or 'selective', got {mode!r}")


def checkpointed(fn, x: torch.Tensor, mode: str) -> torch.Tensor:
    """fn(x) as a checkpoint region of ``mode``."""
    return torch.utils.checkpoint.checkpoint(fn, x, **checkpoint_kwargs(mode))
