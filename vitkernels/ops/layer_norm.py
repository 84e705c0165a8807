"""LayerNorm over the last dim, optionally fused with a residual add: the public op and its contract.

Contract (every backend's ``<ns>::layer_norm_fwd`` / ``layer_norm_bwd`` has exactly these schemas):

    layer_norm_fwd(x, weight?, bias?, eps, residual?) -> (y, s, mean, rstd)
        x, residual: (..., C); weight, bias: (C,). s = x + residual (an empty (0,) tensor without residual);
        y = LN(s); mean, rstd: fp32 (rows,), rows = numel / C.
    layer_norm_bwd(grad_y, grad_s?, x, weight?, mean, rstd, needs_dw, needs_db) -> (dx, dw, db)
        x: the normalised input (s when a residual was fused). dx includes grad_s (so it is also the
        residual's gradient); dw / db are empty (0,) unless asked for.

The forward saves x (or s), weight and the fp32 statistics, never y. LayerNorm does no GEMM: its FLOPs
count as 0, as FlopCounterMode counts aten's layer norm.
"""

from __future__ import annotations

import math

import torch

from vitkernels.backends import resolve
from vitkernels.ops.contract import OpContract, or_none
from vitkernels.ops.validate import amp_dtype, cast, check_float, fail, same_device_dtype

OP = "layer_norm"


def _fake_fwd(x, weight, bias, eps, residual):
    rows = math.prod(x.shape[:-1])
    s = torch.empty_like(x) if residual is not None else x.new_empty((0,))
    stats = x.new_empty((rows,), dtype=torch.float32)
    return torch.empty_like(x), s, stats, torch.empty_like(stats)


def _fake_bwd(grad_y, grad_s, x, weight, mean, rstd, needs_dw, needs_db):
    C = x.shape[-1]
    return (torch.empty_like(x), x.new_empty((C,) if needs_dw else (0,)),
            x.new_empty((C,) if needs_db else (0,)))


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps, residual = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s if residual is not None else x, weight, mean, rstd)
    ctx.has_bias = bias is not None
    ctx.has_residual = residual is not None
    ctx.mark_non_differentiable(mean, rstd)


def _backward(bwd_op, ctx, grad_y, grad_s, grad_mean, grad_rstd):
    x, weight, mean, rstd = ctx.saved_tensors
    needs_x, needs_w, needs_b, _, needs_r = ctx.needs_input_grad
    needs_dw, needs_db = weight is not None and needs_w, ctx.has_bias and needs_b
    dx, dw, db = bwd_op(grad_y, grad_s if ctx.has_residual else None, x, weight, mean, rstd, needs_dw, needs_db)
    return or_none(dx, needs_x), or_none(dw, needs_dw), or_none(db, needs_db), None, or_none(dx, needs_r)


def _run(fwd_op, x, weight, bias, eps, residual):
    y, s, _, _ = fwd_op(x, weight, bias, eps, residual)
    return y if residual is None else (y, s)


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor x, Tensor? weight, Tensor? bias, float eps, Tensor? residual) "
               "-> (Tensor y, Tensor s, Tensor mean, Tensor rstd)",
    bwd_schema="(Tensor grad_y, Tensor? grad_s, Tensor x, Tensor? weight, Tensor mean, Tensor rstd, "
               "bool needs_dw, bool needs_db) -> (Tensor dx, Tensor dw, Tensor db)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=lambda **kw: 0, flops_bwd=lambda **kw: 0, run=_run,
)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
):
    """LayerNorm over the last dim, optionally fused with a residual add.

    Args:
        x: (..., C). weight, bias: (C,) or None. residual: same shape as x, or None.

    Returns:
        y = LN(x) when ``residual`` is None, else the pair (LN(s), s) with s = x + residual.
    """
    check_float(OP, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        fail(OP, f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    name, fn = resolve(OP, backend, x.device, x.dtype, (x.shape[-1],))
    amp = amp_dtype(x.device) if name != "torch" else None
    if amp is not None:
        # LayerNorm under autocast: keep the activation's dtype, bring parameters to it.
        x = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(amp)
        weight, bias, residual = cast(x.dtype, weight, bias, residual)
    same_device_dtype(OP, "x", x, weight=weight, bias=bias, residual=residual)
    C = x.shape[-1]
    for arg, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            fail(OP, f"{arg} must be ({C},), got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        fail(OP, f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    if not eps > 0:
        fail(OP, f"eps must be positive, got {eps}")
    return fn(x, weight, bias, float(eps), residual)
