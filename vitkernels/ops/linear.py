"""Linear with a fused epilogue, y = act(x W^T + b) + residual: the public op and its contract.

Contract (every backend's ``<ns>::linear_fwd`` / ``linear_bwd`` has exactly these schemas):

    linear_fwd(x, weight, bias?, residual?, activation, save_z) -> (y, z)
        x (R, K), weight (M, K), bias (M,), residual (R, M); activation "none" | "gelu" (exact erf) |
        "gelu_tanh" | "quick_gelu" | "silu".
        y (R, M); z = x W^T + b, the pre-activation, (R, M) with an activation and save_z, else (0,).
    linear_bwd(grad_out, x, weight, z?, activation, needs_dx, needs_dw, needs_db) -> (dx, dw, db)
        z: the saved pre-activation (None without activation). Gradients not asked for are empty (0,).
        The residual's gradient is grad_out itself (no op).

The public op flattens x (..., K) to rows; the forward saves x, weight and z (only with GELU), never y.
FLOPs: 2 R M K forward; backward 2 R M K per product asked for (dx and dw), as FlopCounterMode counts mm.
"""

from __future__ import annotations

import torch

from vitkernels.backends import resolve
from vitkernels.ops.contract import OpContract, or_none
from vitkernels.ops.validate import amp_dtype, cast, check_float, fail, same_device_dtype

OP = "linear"
# Epilogue activations: exact-erf GELU, tanh-GELU (SigLIP2, gelu_pytorch_tanh), QuickGELU (OpenAI CLIP) and
# SiLU; names as timm's act_layer strings.
ACTIVATIONS = (None, "gelu", "gelu_tanh", "quick_gelu", "silu")


def _fake_fwd(x, weight, bias, residual, activation, save_z):
    R, M = x.shape[0], weight.shape[0]
    return x.new_empty((R, M)), x.new_empty((R, M) if activation != "none" and save_z else (0,))


def _fake_bwd(grad_out, x, weight, z, activation, needs_dx, needs_dw, needs_db):
    return (x.new_empty(x.shape if needs_dx else (0,)), x.new_empty(weight.shape if needs_dw else (0,)),
            x.new_empty((weight.shape[0],) if needs_db else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, residual, activation, save_z = inputs
    ctx.activation = activation
    ctx.save_for_backward(x, weight, output[1] if activation != "none" else None)
    ctx.mark_non_differentiable(output[1])


def _backward(bwd_op, ctx, grad_out, grad_z):
    x, weight, z = ctx.saved_tensors
    needs_dx, needs_dw, needs_db, needs_dres = ctx.needs_input_grad[:4]
    dx = dw = db = None
    if needs_dx or needs_dw or needs_db:
        dx, dw, db = bwd_op(grad_out, x, weight, z, ctx.activation, needs_dx, needs_dw, needs_db)
    return or_none(dx, needs_dx), or_none(dw, needs_dw), or_none(db, needs_db), or_none(grad_out, needs_dres), \
        None, None


def _flops_fwd(x, weight, out_shape=None, **_):
    return 2 * x[0] * weight[0] * weight[1]


def _flops_bwd(x, weight, needs_dx, needs_dw, out_shape=None, **_):
    return (int(needs_dx) + int(needs_dw)) * 2 * x[0] * weight[0] * weight[1]


def _run(fwd_op, x, weight, bias, activation, residual):
    K, M = x.shape[-1], weight.shape[0]
    lead = x.shape[:-1]
    # (..., K) -> (R, K): a view whenever the leading dims flatten (the usual contiguous (B, N, K)), one copy
    # otherwise: the kernels take two strides per operand, not one per leading dim.
    x2d = x.reshape(-1, K)
    act = activation or "none"
    save_z = act != "none" and torch.is_grad_enabled() and (
        x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))
    y, _ = fwd_op(x2d, weight, bias, residual.reshape(-1, M) if residual is not None else None, act, save_z)
    return y.view(*lead, M)


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, str activation, bool save_z) "
               "-> (Tensor y, Tensor z)",
    bwd_schema="(Tensor grad_out, Tensor x, Tensor weight, Tensor? z, str activation, bool needs_dx, "
               "bool needs_dw, bool needs_db) -> (Tensor dx, Tensor dw, Tensor db)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=_flops_fwd, flops_bwd=_flops_bwd, run=_run,
)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = act(x W^T + b) + residual, the MLP / projection GEMM with its epilogue fused.

    Args:
        x: (..., K). weight: (M, K). bias: (M,) or None. activation: None, "gelu" (exact erf),
            "gelu_tanh", "quick_gelu" (z sigmoid(1.702 z)) or "silu".
        residual: (..., M) or None, added after the activation.

    Returns:
        (..., M).
    """
    check_float(OP, "x", x)
    check_float(OP, "weight", weight)
    if activation not in ACTIVATIONS:
        fail(OP, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if weight.dim() != 2:
        fail(OP, f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        fail(OP, "x must have at least one dim")
    name, fn = resolve(OP, backend, x.device, x.dtype, (activation or "none",))
    amp = amp_dtype(x.device) if name != "torch" else None
    if amp is not None:
        x, weight, bias, residual = cast(amp, x, weight, bias, residual)
    same_device_dtype(OP, "x", x, weight=weight, bias=bias, residual=residual)
    M, K = weight.shape
    if x.shape[-1] != K:
        fail(OP, f"x has {x.shape[-1]} features but weight expects {K}")
    if bias is not None and tuple(bias.shape) != (M,):
        fail(OP, f"bias must be ({M},), got {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], M):
        fail(OP, f"residual must be {(*x.shape[:-1], M)}, got {tuple(residual.shape)}")
    return fn(x, weight, bias, activation, residual)
