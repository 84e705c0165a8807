"""LayerNorm fused into the next GEMM, y = LN(x) W^T + b, forward and backward, in Triton (a block's
norm1 -> qkv). The contract is in ``vitkernels/ops/ln_linear.py``.

Forward, two launches:
    mean, rstd = row statistics of x                    (layer_norm_stats: one read of x, 8 bytes per row out)
    y = LN(x) W^T + b                                   (the linear GEMM with its LayerNorm prologue: each
                                                         x tile is normalised in fp32 as it is loaded, then
                                                         rounded once to the operand dtype, as a stored
                                                         LN(x) would have been)
Backward, with g = dy:
    dW = g^T LN(x)                                      (the GEMM with the LayerNorm prologue on its b operand:
                                                         LN(x) recomputed from x, mean, rstd)
    db = sum_rows g                                     (two-stage column sums, no atomics)
    d LN(x) = g W,  then dx, d ln_weight, d ln_bias     (plain GEMM, then the LayerNorm backward kernel
                                                         from x, mean, rstd)
What is saved for backward: x, mean, rstd (and the parameters); never LN(x).

Limits: those of triton/linear.py's GEMM and triton/layer_norm.py's row kernels (widths up to
layer_norm.MAX_C); fp32 / fp16 / bf16 operands of one dtype.
"""

from __future__ import annotations

import torch

from vitkernels.ops.ln_linear import CONTRACT
from vitkernels.triton import NAMESPACE
from vitkernels.triton.layer_norm import MAX_C, layer_norm_bwd, layer_norm_stats
from vitkernels.triton.linear import PRO_LN, _dz_and_dbias, _gemm


def unit_cols(x2d: torch.Tensor) -> torch.Tensor:
    """(R, C) with a unit column stride (the row kernels index columns densely): a no-op for activations."""
    return x2d if x2d.stride(1) == 1 or x2d.shape[1] == 1 else x2d.contiguous()


def ln_operand(x2d, ln_weight, ln_bias, mean, rstd):
    """The ``ln`` tuple of a LayerNorm prologue: (mean, rstd, gamma, beta), with gamma = 1 / beta = 0 where
    the LayerNorm has no affine parameter (two (C,) tensors: cheaper than a kernel variant)."""
    C = x2d.shape[1]
    gamma = ln_weight.contiguous() if ln_weight is not None else x2d.new_ones((C,))
    beta = ln_bias.contiguous() if ln_bias is not None else x2d.new_zeros((C,))
    return mean, rstd, gamma, beta


def empty_unless(wanted: bool, shape, like: torch.Tensor) -> torch.Tensor:
    """An output buffer of ``shape``, or the distinct empty (0,) tensor a gradient not asked for returns."""
    return like.new_empty(shape if wanted else (0,))


def ln_backward(d_ln, grad_s, x2d, ln_weight, ln_bias, mean, rstd, needs_dlw, needs_dlb):
    """LayerNorm backward from x and its statistics: (dx in x's dtype, d ln_weight, d ln_bias in the
    parameters' dtype, which is the GEMM's and may be lower than an fp32 x's)."""
    dx, dlw, dlb = layer_norm_bwd(d_ln, grad_s, x2d, ln_weight, mean, rstd, needs_dlw, needs_dlb)
    if needs_dlw:
        dlw = dlw.to(ln_weight.dtype)
    if needs_dlb:
        dlb = dlb.to(ln_bias.dtype)
    return dx, dlw, dlb


def ln_linear_fwd(x2d, ln_weight, ln_bias, eps, weight, bias):
    """y (R, M) = LN(x2d) weight^T + bias, and the fp32 row statistics (mean, rstd) of x2d.

    x2d (R, K), weight (M, K): any strides (x2d gets a unit column stride); ln_weight, ln_bias (K,) or None.
    """
    x2d = unit_cols(x2d)
    mean, rstd = layer_norm_stats(x2d, eps)
    y = weight.new_empty((x2d.shape[0], weight.shape[0]))
    _gemm(x2d, weight.t(), y, bias=bias, a_pro=PRO_LN, ln=ln_operand(x2d, ln_weight, ln_bias, mean, rstd))
    return y, mean, rstd


def ln_linear_bwd(grad_y, x2d, ln_weight, ln_bias, mean, rstd, weight, output_mask):
    """Gradients of ln_linear_fwd: (dx (R, K), dln_weight (K,), dln_bias (K,), dweight (M, K), dbias (M,)),
    those not in ``output_mask`` empty."""
    needs_dx, needs_dlw, needs_dlb, needs_dw, needs_db = output_mask
    x2d = unit_cols(x2d)
    R, K = x2d.shape
    dw = empty_unless(needs_dw, weight.shape, weight)
    if needs_dw:
        _gemm(grad_y.t(), x2d, dw, b_pro=PRO_LN, ln=ln_operand(x2d, ln_weight, ln_bias, mean, rstd), split_k=True)
    db = _dz_and_dbias(grad_y, None, False, True)[1] if needs_db else grad_y.new_empty((0,))
    if needs_dx or needs_dlw or needs_dlb:
        d_ln = _gemm(grad_y, weight, weight.new_empty((R, K)))  # gradient of LN(x), in the GEMM's dtype
        dx, dlw, dlb = ln_backward(d_ln, None, x2d, ln_weight, ln_bias, mean, rstd, needs_dlw, needs_dlb)
    else:
        dx, dlw, dlb = (x2d.new_empty((0,)) for _ in range(3))
    return (dx if needs_dx else x2d.new_empty((0,))), dlw, dlb, dw, db


def why_not_supported(device: torch.device, dtype: torch.dtype, K: int) -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"triton ln_linear runs fp32/fp16/bf16 (tl.dot), got {dtype}"
    if K > MAX_C:
        return f"triton ln_linear's row statistics hold a row in registers: widths up to {MAX_C}, got {K}"
    return None


ln_linear = CONTRACT.register(NAMESPACE, fwd=ln_linear_fwd, bwd=ln_linear_bwd)
