"""The gated MLP half of a pre-norm block, y = fc2(act(LN(x) Wg^T + bg) * (LN(x) Wv^T + bv)) [+ x], on the
compiled extension, bound to the contract of ``vitkernels/ops/ln_glu_mlp.py``. Composed from the extension's
``layer_norm``, ``glu_linear`` and ``linear`` ops, as cuda/ln_mlp.py is (no new C++): correct and memory-lean,
not faster.

    forward   n = LN(x) (dropped);  h, g, v = glu_linear_fwd(n);  y = linear_fwd(h, fc2 [+ x]); h is dropped,
              g and v kept
    backward  h = act(g) * v recomputed (only for dW2), fc2's linear_bwd gives dh, dW2, db2; glu_linear_bwd
              from dh, g, v with LN(x) recomputed from the statistics (only for dWg / dWv) gives d LN(x), dWg,
              dbg, dWv, dbv; layer_norm_bwd (+ dy when add_input)

The saved tensors are the contract's (x, g, v, mean, rstd), as on the triton backend.
"""

from __future__ import annotations

import torch

from vitkernels.cuda import NAMESPACE
from vitkernels.cuda.ln_linear import _C, _c, layer_norm_out, ln_backward, none_empty, recompute_ln
from vitkernels.ops.glu_linear import ACTIVATIONS
from vitkernels.ops.ln_glu_mlp import CONTRACT
from vitkernels.ops.reference import activate


def ln_glu_mlp_fwd(x2d, ln_weight, ln_bias, eps, gate_weight, gate_bias, value_weight, value_bias, fc2_weight,
                   fc2_bias, add_input, activation):
    """(y (R, O), g (R, H), v (R, H), mean, rstd): see the contract."""
    x2d = x2d.contiguous()
    n, mean, rstd = layer_norm_out(x2d, ln_weight, ln_bias, eps, gate_weight.dtype)
    h, g, v = _C.glu_linear_fwd(n, gate_weight.contiguous(), _c(gate_bias), value_weight.contiguous(),
                                _c(value_bias), activation)
    del n  # transient: the backward recomputes LN(x) from mean and rstd
    fused_add = add_input and x2d.dtype == h.dtype  # the epilogue adds in the GEMM's dtype only
    y, _ = _C.linear_fwd(h, fc2_weight.contiguous(), _c(fc2_bias), x2d if fused_add else None, "none", False)
    if add_input and not fused_add:  # an fp32 residual stream: added in fp32
        y = x2d + y
    return y, g, v, mean, rstd


def recompute_h(g, v, activation):
    """h = act(g) * v (R, H) from the saved pre-activations (the torch reference's activations), in v's dtype."""
    gf = g.float()
    a = torch.sigmoid(gf) if activation == "sigmoid" else activate(gf, activation)
    return (a * v.float()).to(v.dtype)


def ln_glu_mlp_bwd(grad_y, x2d, ln_weight, ln_bias, mean, rstd, gate_weight, value_weight, fc2_weight, g, v,
                   add_input, activation, output_mask):
    """Gradients of ln_glu_mlp_fwd (see the contract); those not in ``output_mask`` empty."""
    needs_dx, needs_dlw, needs_dlb, needs_dgw, needs_dgb, needs_dvw, needs_dvb, needs_dw2, needs_db2 = output_mask
    x2d, grad_y, g, v = x2d.contiguous(), grad_y.contiguous(), g.contiguous(), v.contiguous()
    dy = _c(grad_y, fc2_weight.dtype)  # an fp32 y (fp32 residual stream): the GEMM branch is in g's dtype
    needs_glu_side = any(output_mask[:7])
    needs_ln_side = needs_dx or needs_dlw or needs_dlb
    h = recompute_h(g, v, activation) if needs_dw2 else g  # fc2's input, recomputed only for its weight gradient
    dh, dw2, db2 = _C.linear_bwd(dy, h, fc2_weight.contiguous(), None, "none", needs_glu_side, needs_dw2, needs_db2)
    del h
    dx = dlw = dlb = dgw = dgb = dvw = dvb = None
    if needs_glu_side:
        R, C = x2d.shape
        n = (recompute_ln(x2d, ln_weight, ln_bias, mean, rstd, g.dtype) if needs_dgw or needs_dvw
             else g.new_empty((R, C)))
        d_ln, dgw, dgb, dvw, dvb = _C.glu_linear_bwd(dh, n, gate_weight.contiguous(), value_weight.contiguous(), g,
                                                     v, activation,
                                                     [needs_ln_side, needs_dgw, needs_dgb, needs_dvw, needs_dvb])
        del n, dh
        if needs_ln_side:
            dx, dlw, dlb = ln_backward(d_ln, grad_y if add_input else None, x2d, ln_weight, ln_bias, mean, rstd,
                                       needs_dlw, needs_dlb)
    grads = (dx, dlw, dlb, dgw, dgb, dvw, dvb, dw2, db2)
    return tuple(none_empty(wanted and t is not None, t if t is not None else x2d) for t, wanted in
                 zip(grads, output_mask))


def why_not_supported(device: torch.device, dtype: torch.dtype, C: int, activation: str = "silu") -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"cuda ln_glu_mlp runs fp32/fp16/bf16, got {dtype}"
    if activation not in ACTIVATIONS:
        return f"cuda ln_glu_mlp has no activation {activation!r}"
    return None


ln_glu_mlp = CONTRACT.register(NAMESPACE, fwd=ln_glu_mlp_fwd, bwd=ln_glu_mlp_bwd)
