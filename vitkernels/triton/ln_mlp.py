"""The MLP half of a pre-norm block as one fused unit, y = fc2(GELU(fc1(LN(x)))) [+ x], forward and
backward, in Triton. The contract is in ``vitkernels/ops/ln_mlp.py``. "GELU" stands for the launch's
activation (triton/linear.py's ACT constexpr: exact-erf GELU, tanh-GELU, QuickGELU or SiLU).

Forward, three launches; only z (R, H) is written between the GEMMs:
    mean, rstd = row statistics of x                      (layer_norm_stats)
    z = LN(x) W1^T + b1                                   (GEMM, LayerNorm prologue on x tiles; z is stored,
                                                           it is both fc2's input and the saved activation)
    y = GELU(z) W2^T + b2 [+ x]                           (GEMM, GELU prologue on z tiles, bias + residual
                                                           epilogue)
Backward, with g = dy (R, O):
    dW2 = g^T GELU(z)                                     (GELU prologue on the b operand: GELU(z) recomputed)
    db2 = sum_rows g                                      (two-stage column sums)
    dz  = (g W2) * GELU'(z),  db1 = sum_rows dz           (one GEMM: GELU' and per-slice column sums in its
                                                           epilogue; no separate GELU-backward pass)
    dW1 = dz^T LN(x)                                      (LayerNorm prologue on the b operand)
    d LN(x) = dz W1,  then dx (+ g with add_input), d ln_weight, d ln_bias   (GEMM, LayerNorm backward kernel)
Saved for backward: x, z, mean, rstd (and the parameters); never LN(x) or GELU(z).

Limits: those of triton/linear.py's GEMM and triton/layer_norm.py's row kernels; the activations of ACT_IDS.
"""

from __future__ import annotations

import torch

from vitkernels.ops.ln_mlp import CONTRACT
from vitkernels.triton import NAMESPACE
from vitkernels.triton.layer_norm import MAX_C, layer_norm_stats
from vitkernels.triton.linear import ACT_IDS, PRO_GELU, PRO_LN, _dz_and_dbias, _gemm, colsum_buffer
from vitkernels.triton.ln_linear import empty_unless, ln_backward, ln_operand, unit_cols


def ln_mlp_fwd(x2d, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, add_input, activation):
    """y (R, O) = GELU(LN(x2d) W1^T + b1) W2^T + b2 [+ x2d], z (R, H) = the fc1 pre-activation, and the fp32
    row statistics (mean, rstd) of x2d. Weights (out, in) with any strides."""
    x2d = unit_cols(x2d)
    R = x2d.shape[0]
    act = ACT_IDS[activation]
    mean, rstd = layer_norm_stats(x2d, eps)
    z = fc1_weight.new_empty((R, fc1_weight.shape[0]))
    _gemm(x2d, fc1_weight.t(), z, bias=fc1_bias, a_pro=PRO_LN,
          ln=ln_operand(x2d, ln_weight, ln_bias, mean, rstd))
    y = (x2d if add_input else fc2_weight).new_empty((R, fc2_weight.shape[0]))  # an fp32 x is added in fp32
    _gemm(z, fc2_weight.t(), y, bias=fc2_bias, residual=x2d if add_input else None, a_pro=PRO_GELU, act=act)
    return y, z, mean, rstd


def ln_mlp_bwd(grad_y, x2d, ln_weight, ln_bias, mean, rstd, fc1_weight, fc2_weight, z, add_input, activation,
               output_mask):
    """Gradients of ln_mlp_fwd: (dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias),
    those not in ``output_mask`` empty. dx includes grad_y when add_input."""
    needs_dx, needs_dlw, needs_dlb, needs_dw1, needs_db1, needs_dw2, needs_db2 = output_mask
    x2d = unit_cols(x2d)
    R, C = x2d.shape
    H = fc1_weight.shape[0]
    act = ACT_IDS[activation]
    g = grad_y.to(fc2_weight.dtype)  # an fp32 y (fp32 residual stream): its GEMM branch is in the weights' dtype
    dw2 = empty_unless(needs_dw2, fc2_weight.shape, fc2_weight)
    if needs_dw2:
        _gemm(g.t(), z, dw2, b_pro=PRO_GELU, split_k=True, act=act)
    db2 = _dz_and_dbias(g, None, False, True)[1] if needs_db2 else g.new_empty((0,))
    dx = dlw = dlb = dw1 = db1 = None
    if any(output_mask[:5]):
        partial = colsum_buffer(R, H, z.device) if needs_db1 else None
        dz = _gemm(g, fc2_weight, z.new_empty((R, H)), dgelu_z=z, colsum=partial, act=act)
        if needs_db1:
            db1 = partial.sum(0).to(z.dtype)
        if needs_dw1:
            dw1 = _gemm(dz.t(), x2d, fc1_weight.new_empty(fc1_weight.shape), b_pro=PRO_LN,
                        ln=ln_operand(x2d, ln_weight, ln_bias, mean, rstd), split_k=True)
        if needs_dx or needs_dlw or needs_dlb:
            d_ln = _gemm(dz, fc1_weight, fc1_weight.new_empty((R, C)))  # gradient of LN(x)
            dx, dlw, dlb = ln_backward(d_ln, grad_y if add_input else None, x2d, ln_weight, ln_bias, mean, rstd,
                                       needs_dlw, needs_dlb)
    grads = (dx, dlw, dlb, dw1, db1, dw2, db2)
    return tuple(g if wanted and g is not None else x2d.new_empty((0,)) for g, wanted in zip(grads, output_mask))


def why_not_supported(device: torch.device, dtype: torch.dtype, C: int, activation: str = "gelu") -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"triton ln_mlp runs fp32/fp16/bf16 (tl.dot), got {dtype}"
    if C > MAX_C:
        return f"triton ln_mlp's row statistics hold a row in registers: widths up to {MAX_C}, got {C}"
    return None


ln_mlp = CONTRACT.register(NAMESPACE, fwd=ln_mlp_fwd, bwd=ln_mlp_bwd)
