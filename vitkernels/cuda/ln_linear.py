"""LayerNorm fused into the next GEMM, y = LN(x) W^T + b, on the compiled extension, bound to the contract of
``vitkernels/ops/ln_linear.py``. The extension has no fused prologue kernel: this file composes its
``layer_norm`` and ``linear`` ops (a composed implementation, correct and memory-lean, not faster):

    forward   LN(x), mean, rstd = layer_norm_fwd(x);  y = linear_fwd(LN(x))   LN(x) is then dropped
    backward  LN(x) = layer_norm_fwd(x) again (the recompute the contract allows instead of saving it);
              d LN(x), dW, db = linear_bwd(dy, LN(x));  dx, d ln_weight, d ln_bias = layer_norm_bwd(...)

So the saved tensors are the contract's (x, mean, rstd), as on the triton backend, at the cost of one more
LayerNorm pass in the backward and of writing LN(x) once in the forward (the triton GEMM never writes it).
"""

from __future__ import annotations

import torch

from vitkernels.cuda import NAMESPACE
from vitkernels.cuda.build import load_extension
from vitkernels.ops.ln_linear import CONTRACT

load_extension()  # registers torch.ops.vitkernels_C.* (JIT-builds on first use when setup.py did not)
_C = torch.ops.vitkernels_C


def none_empty(wanted: bool, t: torch.Tensor) -> torch.Tensor:
    """``t`` when asked for, else a distinct empty (0,) tensor (an op's outputs may not alias)."""
    return t if wanted else t.new_empty((0,))


def _c(t, dtype=None):
    """Contiguous (and of ``dtype``, when given), or None: the C++ kernels take one dtype per op."""
    if t is None:
        return None
    return (t if dtype is None else t.to(dtype)).contiguous()


def layer_norm_out(x2d, ln_weight, ln_bias, eps, dtype):
    """(LN(x2d) in ``dtype``, mean, rstd) from the extension's LayerNorm kernel, computed in x2d's dtype (an
    fp32 residual stream under autocast is normalised in fp32, then rounded to the GEMM's dtype)."""
    y, _, mean, rstd = _C.layer_norm_fwd(x2d.contiguous(), _c(ln_weight, x2d.dtype), _c(ln_bias, x2d.dtype),
                                         eps, None)
    return y.to(dtype), mean, rstd


def ln_backward(d_ln, grad_s, x2d, ln_weight, ln_bias, mean, rstd, needs_dlw, needs_dlb):
    """The extension's LayerNorm backward in x2d's dtype; parameter gradients in the parameters' dtype."""
    dt = x2d.dtype
    dx, dlw, dlb = _C.layer_norm_bwd(_c(d_ln, dt), _c(grad_s, dt), x2d, _c(ln_weight, dt), mean, rstd,
                                     needs_dlw, needs_dlb)
    return dx, (dlw.to(ln_weight.dtype) if needs_dlw else dlw), (dlb.to(ln_bias.dtype) if needs_dlb else dlb)


def ln_linear_fwd(x2d, ln_weight, ln_bias, eps, weight, bias):
    """y (R, M) = LN(x2d) weight^T + bias, and the fp32 row statistics (mean, rstd) of x2d."""
    h, mean, rstd = layer_norm_out(x2d, ln_weight, ln_bias, eps, weight.dtype)
    y, _ = _C.linear_fwd(h, weight.contiguous(), _c(bias), None, "none", False)
    return y, mean, rstd


def recompute_ln(x2d, ln_weight, ln_bias, mean, rstd, dtype):
    """LN(x2d) from the saved statistics (no second reduction): (x - mean) * rstd * w + b, in ``dtype``."""
    h = (x2d.float() - mean[:, None]) * rstd[:, None]
    if ln_weight is not None:
        h = h * ln_weight.float()
    if ln_bias is not None:
        h = h + ln_bias.float()
    return h.to(dtype)


def ln_linear_bwd(grad_y, x2d, ln_weight, ln_bias, mean, rstd, weight, output_mask):
    """Gradients of ln_linear_fwd (see the contract); those not in ``output_mask`` empty."""
    needs_dx, needs_dlw, needs_dlb, needs_dw, needs_db = output_mask
    x2d, grad_y = x2d.contiguous(), grad_y.contiguous()
    needs_ln_side = needs_dx or needs_dlw or needs_dlb
    h = recompute_ln(x2d, ln_weight, ln_bias, mean, rstd, weight.dtype) if needs_dw else grad_y.new_empty(
        (grad_y.shape[0], weight.shape[1]))
    d_ln, dw, db = _C.linear_bwd(grad_y, h, weight.contiguous(), None, "none", needs_ln_side, needs_dw, needs_db)
    if needs_ln_side:
        dx, dlw, dlb = ln_backward(d_ln, None, x2d, ln_weight, ln_bias, mean, rstd, needs_dlw, needs_dlb)
    else:
        dx, dlw, dlb = (x2d.new_empty((0,)) for _ in range(3))
    return none_empty(needs_dx, dx), dlw, dlb, dw, db


def why_not_supported(device: torch.device, dtype: torch.dtype, K: int) -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"cuda ln_linear runs fp32/fp16/bf16, got {dtype}"
    return None


ln_linear = CONTRACT.register(NAMESPACE, fwd=ln_linear_fwd, bwd=ln_linear_bwd)
