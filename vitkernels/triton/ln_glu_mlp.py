"""The gated MLP half of a pre-norm block as one unit, y = fc2(act(LN(x) Wg^T + bg) * (LN(x) Wv^T + bv)) [+ x],
forward and backward, in Triton. The contract is in ``vitkernels/ops/ln_glu_mlp.py``. Composed from the
kernels of triton/layer_norm.py, triton/glu_linear.py and triton/linear.py (no kernel of its own):

Forward, three launches; g and v (R, H) are the only tensors kept:
    n, mean, rstd = LayerNorm(x)                          (layer_norm_fwd; n in the weights' dtype)
    h, g, v = act(n Wg^T + bg) * (n Wv^T + bv)            (glu_linear's fused two-GEMM kernel: n read once)
    y = h W2^T + b2 [+ x]                                 (GEMM, bias + residual epilogue)
    n and h are transient: freed when the forward returns, never saved.
Backward, with dy (R, O):
    h = act(g) * v                                        (recomputed, only for dW2: glu_linear's elementwise
                                                           backward kernel with v as the incoming gradient,
                                                           dv = v * act(g) = h)
    dW2 = dy^T h,  db2 = sum_rows dy                      (split-K GEMM; two-stage column sums)
    dh = dy W2                                            (GEMM)
    dg, dv, dbg, dbv                                      (glu_linear's elementwise backward kernel)
    dWg = dg^T LN(x),  dWv = dv^T LN(x)                   (split-K GEMMs, LayerNorm prologue on the b operand:
                                                           LN(x) recomputed from the statistics in registers)
    d LN(x) = dg Wg + dv Wv                               (dv Wv into fp32, then dg Wg adding it, rounded once)
    dx (+ dy with add_input), d ln_weight, d ln_bias      (triton/layer_norm.py's backward)
Saved for backward: x, g, v, mean, rstd (and the parameters); never LN(x) or h.

Known costs of the composition (what a fused version would remove): the forward writes and reads n (R x C)
once, where a LayerNorm prologue in the glu kernel would not; the backward writes and reads dh, dg, dv
(R x H each) and, for dW2, h.

Limits: those of triton/glu_linear.py's and triton/linear.py's GEMMs and of triton/layer_norm.py's row
kernels (widths up to MAX_C); activation "silu" | "gelu" | "gelu_tanh" | "sigmoid".
"""

from __future__ import annotations

import torch

from vitkernels.ops.ln_glu_mlp import CONTRACT
from vitkernels.triton import NAMESPACE
from vitkernels.triton.glu_linear import GLU_ACT_IDS, _dg_dv_and_dbias, glu_linear_fwd
from vitkernels.triton.layer_norm import MAX_C, layer_norm_fwd
from vitkernels.triton.linear import PRO_LN, _dz_and_dbias, _gemm
from vitkernels.triton.ln_linear import empty_unless, ln_backward, ln_operand, unit_cols


def ln_glu_mlp_fwd(x2d, ln_weight, ln_bias, eps, gate_weight, gate_bias, value_weight, value_bias, fc2_weight,
                   fc2_bias, add_input, activation):
    """(y (R, O), g (R, H), v (R, H), mean, rstd): see the contract. Weights (out, in) with any strides."""
    x2d = unit_cols(x2d)
    R = x2d.shape[0]
    # LN(x) in x's dtype (an fp32 residual stream is normalised in fp32), then in the GEMMs' dtype.
    n, _, mean, rstd = layer_norm_fwd(x2d, ln_weight, ln_bias, eps, None)
    h, g, v = glu_linear_fwd(n.to(gate_weight.dtype), gate_weight, gate_bias, value_weight, value_bias, activation)
    del n  # transient: the backward recomputes LN(x) from mean and rstd
    y = (x2d if add_input else fc2_weight).new_empty((R, fc2_weight.shape[0]))  # an fp32 x is added in fp32
    _gemm(h, fc2_weight.t(), y, bias=fc2_bias, residual=x2d if add_input else None)
    return y, g, v, mean, rstd


def recompute_h(g, v, activation):
    """h = act(g) * v (R, H) in v's dtype, from the saved pre-activations: glu_linear's elementwise backward
    kernel computes dv = dh * act(g), which with dh = v is h."""
    return _dg_dv_and_dbias(v, g, v, GLU_ACT_IDS[activation], False, True, False, False)[1]


def ln_glu_mlp_bwd(grad_y, x2d, ln_weight, ln_bias, mean, rstd, gate_weight, value_weight, fc2_weight, g, v,
                   add_input, activation, output_mask):
    """Gradients of ln_glu_mlp_fwd: (dx, dln_weight, dln_bias, dgate_weight, dgate_bias, dvalue_weight,
    dvalue_bias, dfc2_weight, dfc2_bias), those not in ``output_mask`` empty. dx includes grad_y when
    add_input."""
    needs_dx, needs_dlw, needs_dlb, needs_dgw, needs_dgb, needs_dvw, needs_dvb, needs_dw2, needs_db2 = output_mask
    x2d = unit_cols(x2d)
    R, C = x2d.shape
    H = gate_weight.shape[0]
    dy = grad_y.to(fc2_weight.dtype)  # an fp32 y (fp32 residual stream): its GEMM branch is in the weights' dtype
    dw2 = empty_unless(needs_dw2, fc2_weight.shape, fc2_weight)
    if needs_dw2:
        _gemm(dy.t(), recompute_h(g, v, activation), dw2, split_k=True)
    db2 = _dz_and_dbias(dy, None, False, True)[1] if needs_db2 else dy.new_empty((0,))
    dx = dlw = dlb = dgw = dgb = dvw = dvb = None
    needs_ln_side = needs_dx or needs_dlw or needs_dlb
    if any(output_mask[:7]):
        dh = _gemm(dy, fc2_weight, g.new_empty((R, H)))
        need_dg = needs_ln_side or needs_dgw or needs_dgb
        need_dv = needs_ln_side or needs_dvw or needs_dvb
        dg, dv, dgb, dvb = _dg_dv_and_dbias(dh, g, v, GLU_ACT_IDS[activation], need_dg, need_dv, needs_dgb,
                                            needs_dvb)
        del dh
        ln = ln_operand(x2d, ln_weight, ln_bias, mean, rstd)
        if needs_dgw:
            dgw = _gemm(dg.t(), x2d, gate_weight.new_empty(gate_weight.shape), b_pro=PRO_LN, ln=ln, split_k=True)
        if needs_dvw:
            dvw = _gemm(dv.t(), x2d, value_weight.new_empty(value_weight.shape), b_pro=PRO_LN, ln=ln, split_k=True)
        if needs_ln_side:
            # d LN(x) = dg Wg + dv Wv: dv Wv into fp32, then dg Wg with it added in the epilogue, rounded once.
            d_ln_v = _gemm(dv, value_weight, torch.empty((R, C), device=x2d.device, dtype=torch.float32))
            d_ln = _gemm(dg, gate_weight, gate_weight.new_empty((R, C)), residual=d_ln_v)
            del d_ln_v
            dx, dlw, dlb = ln_backward(d_ln, grad_y if add_input else None, x2d, ln_weight, ln_bias, mean, rstd,
                                       needs_dlw, needs_dlb)
    grads = (dx, dlw, dlb, dgw, dgb, dvw, dvb, dw2, db2)
    return tuple(t if wanted and t is not None else x2d.new_empty((0,)) for t, wanted in zip(grads, output_mask))


def why_not_supported(device: torch.device, dtype: torch.dtype, C: int, activation: str = "silu") -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"triton ln_glu_mlp runs fp32/fp16/bf16 (tl.dot), got {dtype}"
    if C > MAX_C:
        return f"triton ln_glu_mlp's LayerNorm holds a row in registers: widths up to {MAX_C}, got {C}"
    if activation not in GLU_ACT_IDS:
        return f"triton ln_glu_mlp has no activation {activation!r}"
    return None


ln_glu_mlp = CONTRACT.register(NAMESPACE, fwd=ln_glu_mlp_fwd, bwd=ln_glu_mlp_bwd)
