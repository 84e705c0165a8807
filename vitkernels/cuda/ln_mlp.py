"""The MLP half of a pre-norm block, y = fc2(act(fc1(LN(x)))) [+ x], on the compiled extension, bound to the
contract of ``vitkernels/ops/ln_mlp.py``. Composed from the extension's ``layer_norm`` and ``linear`` ops
(no fused prologue kernels in csrc/ yet): correct and memory-lean, not faster.

    forward   h = LN(x) (dropped);  act(z), z = linear_fwd(h, fc1, act, save_z);  y = linear_fwd(act(z), fc2
              [+ x]); act(z) is dropped, z kept
    backward  act(z) recomputed (the torch reference's ``activate``), fc2's linear_bwd; fc1's linear_bwd from z
              with LN(x) recomputed from the statistics; layer_norm_bwd (+ dy when add_input)

The saved tensors are the contract's (x, z, mean, rstd), as on the triton backend.
"""

from __future__ import annotations

import torch

from vitkernels.cuda import NAMESPACE
from vitkernels.cuda.ln_linear import _C, _c, layer_norm_out, ln_backward, none_empty, recompute_ln
from vitkernels.ops.ln_mlp import CONTRACT
from vitkernels.ops.reference import activate


def ln_mlp_fwd(x2d, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, add_input, activation):
    """(y (R, O), z (R, H), mean, rstd): see the contract."""
    x2d = x2d.contiguous()
    h, mean, rstd = layer_norm_out(x2d, ln_weight, ln_bias, eps, fc1_weight.dtype)
    a, z = _C.linear_fwd(h, fc1_weight.contiguous(), _c(fc1_bias), None, activation, True)
    fused_add = add_input and x2d.dtype == a.dtype  # the epilogue adds in the GEMM's dtype only
    y, _ = _C.linear_fwd(a, fc2_weight.contiguous(), _c(fc2_bias), x2d if fused_add else None, "none", False)
    if add_input and not fused_add:  # an fp32 residual stream: added in fp32
        y = x2d + y
    return y, z, mean, rstd


def ln_mlp_bwd(grad_y, x2d, ln_weight, ln_bias, mean, rstd, fc1_weight, fc2_weight, z, add_input, activation,
               output_mask):
    """Gradients of ln_mlp_fwd (see the contract); those not in ``output_mask`` empty."""
    needs_dx, needs_dlw, needs_dlb, needs_dw1, needs_db1, needs_dw2, needs_db2 = output_mask
    x2d, grad_y, z = x2d.contiguous(), grad_y.contiguous(), z.contiguous()
    g = _c(grad_y, fc2_weight.dtype)  # an fp32 y (fp32 residual stream): the GEMM branch is in z's dtype
    needs_fc1_side = any(output_mask[:5])
    needs_ln_side = needs_dx or needs_dlw or needs_dlb
    a = activate(z, activation) if needs_dw2 else z  # fc2's input, recomputed only for its weight gradient
    da, dw2, db2 = _C.linear_bwd(g, a, fc2_weight.contiguous(), None, "none", needs_fc1_side, needs_dw2, needs_db2)
    dx = dlw = dlb = dw1 = db1 = None
    if needs_fc1_side:
        h = recompute_ln(x2d, ln_weight, ln_bias, mean, rstd, z.dtype) if needs_dw1 else z.new_empty(
            (z.shape[0], x2d.shape[1]))
        d_ln, dw1, db1 = _C.linear_bwd(da, h, fc1_weight.contiguous(), z, activation, needs_ln_side, needs_dw1,
                                       needs_db1)
        if needs_ln_side:
            dx, dlw, dlb = ln_backward(d_ln, grad_y if add_input else None, x2d, ln_weight, ln_bias, mean, rstd,
                                       needs_dlw, needs_dlb)
    grads = (dx, dlw, dlb, dw1, db1, dw2, db2)
    return tuple(none_empty(wanted and g is not None, g if g is not None else x2d) for g, wanted in
                 zip(grads, output_mask))


def why_not_supported(device: torch.device, dtype: torch.dtype, C: int, activation: str = "gelu") -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"cuda ln_mlp runs fp32/fp16/bf16, got {dtype}"
    return None


ln_mlp = CONTRACT.register(NAMESPACE, fwd=ln_mlp_fwd, bwd=ln_mlp_bwd)
