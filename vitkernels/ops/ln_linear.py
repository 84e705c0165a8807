"""LayerNorm fused into the GEMM that follows it, y = LN(x) W^T + b (a block's norm1 -> qkv): the public op
and its contract. The LayerNorm output is never stored: the forward normalises x on the fly from fp32 row
statistics, the backward recomputes LN(x) where the weight gradient needs it.

Contract (every backend's ``<ns>::ln_linear_fwd`` / ``ln_linear_bwd`` has exactly these schemas):

    ln_linear_fwd(x, ln_weight?, ln_bias?, eps, weight, bias?) -> (y, mean, rstd)
        x (R, K); ln_weight, ln_bias (K,); weight (M, K); bias (M,). y (R, M) in weight's dtype; mean, rstd
        fp32 (R,), the LayerNorm statistics of x's rows. x may be fp32 with lower-precision parameters (an
        fp32 residual stream under autocast): LN(x) is computed in fp32 and rounded to weight's dtype.
    ln_linear_bwd(grad_y, x, ln_weight?, ln_bias?, mean, rstd, weight, output_mask) -> (dx, dln_weight,
                  dln_bias, dweight, dbias)
        output_mask: bool[5], which of the five gradients to compute (as aten's native_layer_norm_backward);
        the others are empty (0,). Each gradient has its input's dtype.

The forward saves x, the statistics and the parameters: K per row of x plus 8 bytes, where LayerNorm then
Linear keep x and LN(x) (2 K). FLOPs: 2 R M K forward; backward 2 R M K per GEMM run (d LN(x) = dy W when
any LayerNorm-side gradient is asked for, dW = dy^T LN(x)), as FlopCounterMode counts mm.
"""

from __future__ import annotations

import torch

from vitkernels.backends import resolve
from vitkernels.ops.contract import OpContract, or_none
from vitkernels.ops.validate import amp_dtype, cast, check_float, fail, same_device_dtype

OP = "ln_linear"


def _fake_fwd(x, ln_weight, ln_bias, eps, weight, bias):
    R, M = x.shape[0], weight.shape[0]
    stats = x.new_empty((R,), dtype=torch.float32)
    return weight.new_empty((R, M)), stats, torch.empty_like(stats)


def grad_like(*likes: torch.Tensor | None):
    """Fake gradients: each ``like`` tensor's gradient (its shape and dtype) when wanted, else an empty (0,)
    tensor of the first like's dtype. Shared with ln_mlp's fake."""
    def fake(output_mask):
        return tuple(t.new_empty(t.shape) if wanted else likes[0].new_empty((0,))
                     for t, wanted in zip(likes, output_mask))

    return fake


def _fake_bwd(grad_y, x, ln_weight, ln_bias, mean, rstd, weight, output_mask):
    ln_w = ln_weight if ln_weight is not None else x.new_empty((x.shape[1],))
    ln_b = ln_bias if ln_bias is not None else ln_w
    bias = weight.new_empty((weight.shape[0],))
    return grad_like(x, ln_w, ln_b, weight, bias)(output_mask)


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, eps, weight, bias = inputs
    _, mean, rstd = output
    ctx.mark_non_differentiable(mean, rstd)
    ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd, weight)
    ctx.has_bias = bias is not None


def _backward(bwd_op, ctx, grad_y, grad_mean, grad_rstd):
    x, ln_weight, ln_bias, mean, rstd, weight = ctx.saved_tensors
    nx, nlw, nlb, _, nw, nb = ctx.needs_input_grad
    mask = [nx, nlw and ln_weight is not None, nlb and ln_bias is not None, nw, nb and ctx.has_bias]
    if not any(mask):
        return None, None, None, None, None, None
    dx, dlw, dlb, dw, db = bwd_op(grad_y, x, ln_weight, ln_bias, mean, rstd, weight, mask)
    return (or_none(dx, mask[0]), or_none(dlw, mask[1]), or_none(dlb, mask[2]), None, or_none(dw, mask[3]),
            or_none(db, mask[4]))


def _flops_fwd(x, weight, out_shape=None, **_):
    return 2 * x[0] * weight[0] * weight[1]


def _flops_bwd(x, weight, output_mask, out_shape=None, **_):
    gemms = int(any(output_mask[:3])) + int(output_mask[3])
    return gemms * 2 * x[0] * weight[0] * weight[1]


def _run(fwd_op, x, ln_weight, ln_bias, eps, weight, bias):
    K, M = x.shape[-1], weight.shape[0]
    y, _, _ = fwd_op(x.reshape(-1, K), ln_weight, ln_bias, eps, weight, bias)
    return y.view(*x.shape[:-1], M)


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor x, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor weight, Tensor? bias) "
               "-> (Tensor y, Tensor mean, Tensor rstd)",
    bwd_schema="(Tensor grad_y, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor mean, Tensor rstd, "
               "Tensor weight, bool[] output_mask) "
               "-> (Tensor dx, Tensor dln_weight, Tensor dln_bias, Tensor dweight, Tensor dbias)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=_flops_fwd, flops_bwd=_flops_bwd, run=_run,
)


def ln_linear(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """y = LN(x) W^T + b with the LayerNorm fused into the GEMM (its output is neither stored nor saved).

    Args:
        x: (..., K). ln_weight, ln_bias: (K,) or None (LayerNorm affine). weight: (M, K). bias: (M,) or None.
        eps: LayerNorm epsilon.

    Returns:
        (..., M).
    """
    check_float(OP, "x", x)
    check_float(OP, "weight", weight)
    if weight.dim() != 2:
        fail(OP, f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1 or x.shape[-1] == 0:
        fail(OP, f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    name, fn = resolve(OP, backend, x.device, x.dtype, (x.shape[-1],))
    amp = amp_dtype(x.device) if name != "torch" else None
    if amp is not None:
        # Autocast runs LayerNorm in fp32 and the GEMM in the autocast dtype: an fp32 x (an fp32 residual
        # stream) is normalised as is; any other x and all parameters go to the autocast dtype.
        x = x if x.dtype == torch.float32 else x.to(amp)
        ln_weight, ln_bias, weight, bias = cast(amp, ln_weight, ln_bias, weight, bias)
    same_device_dtype(OP, "x", x, ln_weight=ln_weight, ln_bias=ln_bias, weight=weight, bias=bias)
    M, K = weight.shape
    if x.shape[-1] != K:
        fail(OP, f"x has {x.shape[-1]} features but weight expects {K}")
    for arg, t, n in (("ln_weight", ln_weight, K), ("ln_bias", ln_bias, K), ("bias", bias, M)):
        if t is not None and tuple(t.shape) != (n,):
            fail(OP, f"{arg} must be ({n},), got {tuple(t.shape)}")
    if not eps > 0:
        fail(OP, f"eps must be positive, got {eps}")
    return fn(x, ln_weight, ln_bias, float(eps), weight, bias)
