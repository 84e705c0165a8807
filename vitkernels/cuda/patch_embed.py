"""Patch embedding on the compiled extension: ``torch.ops.vitkernels_C.patch_embed_fwd`` / ``patch_embed_bwd``
(gather + cuBLAS GEMM + bias/pos/cls epilogue in csrc/patch_embed_kernel.cu, the C++ CPU twin, the math and
the shared backward in csrc/patch_embed.cpp). Same function and signature as
``vitkernels/triton/patch_embed.py``. Images may have any strides (the gather reads them in place); the
backward gathers the patches again instead of saving them.
"""

from __future__ import annotations

import torch

from vitkernels.cuda.build import load_extension

load_extension()  # registers torch.ops.vitkernels_C.* (JIT-builds on first use when setup.py did not)
_ops = torch.ops.vitkernels_C


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


@torch.library.register_fake("vitkernels_C::patch_embed_fwd")
def _patch_embed_fwd_fake(images, weight, bias, pos_embed, cls_token):
    B, _, H, W = images.shape
    D, P = weight.shape[0], weight.shape[-1]
    T_out = (H // P) * (W // P) + (1 if cls_token is not None else 0)
    return images.new_empty((B, T_out, D))


@torch.library.register_fake("vitkernels_C::patch_embed_bwd")
def _patch_embed_bwd_fake(grad_out, images, weight, has_bias, pos_tokens, has_cls, need_dimages, need_dweight):
    D = weight.shape[0]

    def empty():  # distinct (0,) tensors: outputs must not alias each other
        return images.new_empty((0,))

    return (images.new_empty(images.shape) if need_dimages else empty(),
            torch.empty_like(weight) if need_dweight else empty(),
            images.new_empty((D,)) if has_bias else empty(),
            images.new_empty((1, pos_tokens, D)) if pos_tokens > 0 else empty(),
            images.new_empty((1, 1, D)) if has_cls else empty())


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, cls_token = inputs
    ctx.save_for_backward(images, weight)
    ctx.has_bias = bias is not None
    ctx.pos_tokens = 0 if pos_embed is None else pos_embed.shape[1]
    ctx.has_cls = cls_token is not None


def _backward(ctx, grad_out):
    images, weight = ctx.saved_tensors
    need_dimages, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    dimages, dweight, dbias, dpos, dcls = _ops.patch_embed_bwd(
        grad_out.contiguous(), images, weight, ctx.has_bias, ctx.pos_tokens, ctx.has_cls, need_dimages,
        need_dweight)
    return (dimages if need_dimages else None, dweight if need_dweight else None,
            dbias if ctx.has_bias else None, dpos if ctx.pos_tokens > 0 else None,
            dcls if ctx.has_cls else None)


torch.library.register_autograd("vitkernels_C::patch_embed_fwd", _backward, setup_context=_setup_context)


def patch_embed(images, weight, bias, pos_embed, cls_token):
    """images (B, C, H, W), weight (D, C, P, P) -> tokens (B, [1+]N, D); see vitkernels.ops.patch_embed."""
    return _ops.patch_embed_fwd(images, weight.contiguous(), _contig(bias), _contig(pos_embed), _contig(cls_token))
