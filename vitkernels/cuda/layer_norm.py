"""LayerNorm with a fused residual add on the compiled extension: ``torch.ops.vitkernels_C.layer_norm_fwd``
/ ``layer_norm_bwd`` (CUDA kernels in csrc/layer_norm_kernel.cu, the C++ CPU twin and the math in
csrc/layer_norm.cpp). Same function and signature as ``vitkernels/triton/layer_norm.py``.

Forward returns y, s = x + residual (empty without residual) and the fp32 per-row mean / rstd, which are all
the backward needs besides s (or x) and weight.
"""

from __future__ import annotations

import math

import torch

from vitkernels.cuda.build import load_extension

load_extension()  # registers torch.ops.vitkernels_C.* (JIT-builds on first use when setup.py did not)
_ops = torch.ops.vitkernels_C


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


@torch.library.register_fake("vitkernels_C::layer_norm_fwd")
def _layer_norm_fwd_fake(x, weight, bias, eps, residual):
    rows = math.prod(x.shape[:-1])
    s = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    return torch.empty_like(x), s, x.new_empty((rows,), dtype=torch.float32), x.new_empty((rows,), dtype=torch.float32)


@torch.library.register_fake("vitkernels_C::layer_norm_bwd")
def _layer_norm_bwd_fake(grad_y, grad_s, x, weight, mean, rstd, has_bias):
    C = x.shape[-1]
    dweight = x.new_empty((C,)) if weight is not None else x.new_empty((0,))
    dbias = x.new_empty((C,)) if has_bias else x.new_empty((0,))
    return torch.empty_like(x), dweight, dbias


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual = inputs
    y, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.has_weight = weight is not None
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(ctx, grad_y, grad_s, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors  # x: the normalised input (s when a residual was fused)
    grad_s = grad_s.contiguous() if ctx.has_residual and grad_s is not None else None
    dx, dweight, dbias = _ops.layer_norm_bwd(grad_y.contiguous(), grad_s, x, weight, mean, rstd, ctx.has_bias)
    return (dx, dweight if ctx.has_weight else None, dbias if ctx.has_bias else None, None,
            dx if ctx.has_residual else None)


torch.library.register_autograd("vitkernels_C::layer_norm_fwd", _backward, setup_context=_setup_context)


def layer_norm(x, weight, bias, eps, residual):
    """x (..., C) -> LN(x), or (LN(x + residual), x + residual); see vitkernels.ops.layer_norm."""
    y, s, _, _ = _ops.layer_norm_fwd(x.contiguous(), _contig(weight), _contig(bias), float(eps), _contig(residual))
    return y if residual is None else (y, s)
