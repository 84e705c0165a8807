"""Linear with a fused epilogue on the compiled extension: ``torch.ops.vitkernels_C.linear_fwd`` /
``linear_bwd`` (cuBLAS GEMM + our bias / erf-GELU / residual epilogue kernel in csrc/linear_kernel.cu, the
C++ CPU twin and the math in csrc/linear.cpp). Same function and signature as ``vitkernels/triton/linear.py``.

With GELU the forward also returns the pre-activation x W^T + b (in x's dtype), which the backward needs for
gelu'; the residual's gradient is the output gradient itself.
"""

from __future__ import annotations

import torch

from vitkernels.cuda.build import load_extension

load_extension()  # registers torch.ops.vitkernels_C.* (JIT-builds on first use when setup.py did not)
_ops = torch.ops.vitkernels_C


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


@torch.library.register_fake("vitkernels_C::linear_fwd")
def _linear_fwd_fake(x, weight, bias, gelu, residual):
    out = x.new_empty((*x.shape[:-1], weight.shape[0]))
    return out, torch.empty_like(out) if gelu else x.new_empty((0,))


@torch.library.register_fake("vitkernels_C::linear_bwd")
def _linear_bwd_fake(grad_out, x, weight, preact, has_bias, need_dx, need_dweight):
    return (torch.empty_like(x) if need_dx else x.new_empty((0,)),
            torch.empty_like(weight) if need_dweight else x.new_empty((0,)),
            x.new_empty((weight.shape[0],)) if has_bias else x.new_empty((0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, gelu, residual = inputs
    out, preact = output
    ctx.save_for_backward(x, weight, preact if gelu else None)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(preact)


def _backward(ctx, grad_out, grad_preact):
    x, weight, preact = ctx.saved_tensors
    need_dx, need_dweight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
    grad_out = grad_out.contiguous()
    dx, dweight, dbias = _ops.linear_bwd(grad_out, x, weight, preact, ctx.has_bias, need_dx, need_dweight)
    return (dx if need_dx else None, dweight if need_dweight else None, dbias if ctx.has_bias else None, None,
            grad_out if ctx.has_residual else None)


torch.library.register_autograd("vitkernels_C::linear_fwd", _backward, setup_context=_setup_context)


def linear(x, weight, bias, activation, residual):
    """x (..., K), weight (M, K) -> act(x W^T + b) + residual, (..., M); see vitkernels.ops.linear."""
    out, _ = _ops.linear_fwd(x.contiguous(), weight.contiguous(), _contig(bias), activation == "gelu",
                             _contig(residual))
    return out
