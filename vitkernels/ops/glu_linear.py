"""The fc1 half of a GLU MLP, h = act(x Wg^T + bg) * (x Wv^T + bv): the public op and its contract.

timm's gated MLPs compute it with two Linears (SwiGLU: fc1_g, fc1_x) or one packed Linear chunked in two
(GluMlp, SwiGLUPacked: fc1 of width 2H); here both GEMMs share one pass over x and the gate is applied in
their epilogue, so neither the (R, 2H) fc1 output nor act(g) is ever a separate tensor to read back.

Contract (every backend's ``<ns>::glu_linear_fwd`` / ``glu_linear_bwd`` has exactly these schemas):

    glu_linear_fwd(x, gate_weight, gate_bias?, value_weight, value_bias?, activation) -> (h, g, v)
        x (R, C); gate_weight, value_weight (H, C); gate_bias, value_bias (H,); activation "silu" (SwiGLU) |
        "gelu" (exact erf; GEGLU) | "gelu_tanh" | "sigmoid" (the original GLU, timm GluMlp's default).
        g = x Wg^T + bg and v = x Wv^T + bv, the pre-activations (R, H), are what the backward needs;
        h = act(g) * v (R, H) is the next GEMM's input and is not saved. All three have x's dtype.
    glu_linear_bwd(grad_h, x, gate_weight, value_weight, g, v, activation, output_mask)
        -> (dx, dgate_weight, dgate_bias, dvalue_weight, dvalue_bias)
        output_mask: bool[5], which of the five gradients to compute (the others are empty (0,)); each has
        its input's dtype.

Backward (derivation):
    h = a(g) * v
    dg = dh * v * a'(g),   dv = dh * a(g)
    dx = dg Wg + dv Wv,   dWg = dg^T x,   dWv = dv^T x,   dbg = sum_rows dg,   dbv = sum_rows dv

timm's packed fc1 (GluMlp, SwiGLUPacked): fc1.weight is (2H, C) and ``x.chunk(2, -1)`` splits its output;
gate_last=False (SwiGLUPacked) is act(first half) * second half, i.e. gate_weight = fc1.weight[:H] and
value_weight = fc1.weight[H:]; gate_last=True (GluMlp's default) swaps the halves. The caller passes those
slices (views of the one Parameter): autograd carries their gradients into the packed parameter.

The forward saves x, both weights, g and v (C + 2 H per row), where timm's eager fc1 -> chunk -> act -> mul
keeps x, the fc1 output (2 H), act(g) and the product's other operand (about C + 4 H). Note that the
forward writes g and v even when no gradient will be needed (the schema has no "save" flag): inference pays
two extra (R, H) stores. FLOPs: 4 R H C forward (two GEMMs); backward 4 R H C for dx (two GEMMs) and
2 R H C for each weight gradient, when asked for, as FlopCounterMode counts mm.
"""

from __future__ import annotations

import torch

from vitkernels.backends import resolve
from vitkernels.ops.contract import OpContract, or_none
from vitkernels.ops.ln_linear import grad_like
from vitkernels.ops.validate import amp_dtype, cast, check_float, fail, same_device_dtype

OP = "glu_linear"
# The gate's activation: SiLU (SwiGLU), exact-erf GELU (GEGLU), tanh-GELU, sigmoid (GLU); timm's act_layer
# names in lower case.
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "sigmoid")


def _fake_fwd(x, gate_weight, gate_bias, value_weight, value_bias, activation):
    R, H = x.shape[0], gate_weight.shape[0]
    return x.new_empty((R, H)), x.new_empty((R, H)), x.new_empty((R, H))


def _fake_bwd(grad_h, x, gate_weight, value_weight, g, v, activation, output_mask):
    H = gate_weight.shape[0]
    return grad_like(x, gate_weight, gate_weight.new_empty((H,)), value_weight,
                     value_weight.new_empty((H,)))(output_mask)


def _setup_context(ctx, inputs, output):
    x, gate_weight, gate_bias, value_weight, value_bias, activation = inputs
    _, g, v = output
    ctx.mark_non_differentiable(g, v)
    ctx.save_for_backward(x, gate_weight, value_weight, g, v)
    ctx.activation = activation
    ctx.has_bias = (gate_bias is not None, value_bias is not None)


def _backward(bwd_op, ctx, grad_h, grad_g, grad_v):
    x, gate_weight, value_weight, g, v = ctx.saved_tensors
    nx, ngw, ngb, nvw, nvb, _ = ctx.needs_input_grad
    mask = [nx, ngw, ngb and ctx.has_bias[0], nvw, nvb and ctx.has_bias[1]]
    if not any(mask):
        return None, None, None, None, None, None
    dx, dgw, dgb, dvw, dvb = bwd_op(grad_h, x, gate_weight, value_weight, g, v, ctx.activation, mask)
    return (or_none(dx, mask[0]), or_none(dgw, mask[1]), or_none(dgb, mask[2]), or_none(dvw, mask[3]),
            or_none(dvb, mask[4]), None)


def _flops_fwd(x, gate_weight, out_shape=None, **_):
    return 4 * x[0] * gate_weight[0] * gate_weight[1]


def _flops_bwd(x, gate_weight, output_mask, out_shape=None, **_):
    gemms = 2 * int(output_mask[0]) + int(output_mask[1]) + int(output_mask[3])
    return gemms * 2 * x[0] * gate_weight[0] * gate_weight[1]


def _run(fwd_op, x, gate_weight, gate_bias, value_weight, value_bias, activation):
    C, H = x.shape[-1], gate_weight.shape[0]
    # (..., C) -> (R, C): a view whenever the leading dims flatten, one copy otherwise (as ops.linear).
    h, _, _ = fwd_op(x.reshape(-1, C), gate_weight, gate_bias, value_weight, value_bias, activation)
    return h.view(*x.shape[:-1], H)


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor x, Tensor gate_weight, Tensor? gate_bias, Tensor value_weight, Tensor? value_bias, "
               "str activation) -> (Tensor h, Tensor g, Tensor v)",
    bwd_schema="(Tensor grad_h, Tensor x, Tensor gate_weight, Tensor value_weight, Tensor g, Tensor v, "
               "str activation, bool[] output_mask) "
               "-> (Tensor dx, Tensor dgate_weight, Tensor dgate_bias, Tensor dvalue_weight, Tensor dvalue_bias)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=_flops_fwd, flops_bwd=_flops_bwd, run=_run,
)


def glu_linear(
    x: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    *,
    activation: str = "silu",
    backend: str | None = None,
) -> torch.Tensor:
    """h = act(x Wg^T + bg) * (x Wv^T + bv), the gated fc1 of SwiGLU / GEGLU / GLU MLPs, as one op.

    Args:
        x: (..., C). gate_weight, value_weight: (H, C); views (slices of a packed (2H, C) fc1 weight) are
            fine. gate_bias, value_bias: (H,) or None.
        activation: the gate's: "silu" (SwiGLU), "gelu" (exact erf), "gelu_tanh" or "sigmoid" (GLU).

    Returns:
        (..., H).
    """
    for arg, t in (("x", x), ("gate_weight", gate_weight), ("value_weight", value_weight)):
        check_float(OP, arg, t)
    if activation not in ACTIVATIONS:
        fail(OP, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    for arg, w in (("gate_weight", gate_weight), ("value_weight", value_weight)):
        if w.dim() != 2:
            fail(OP, f"{arg} must be (hidden_features, in_features), got shape {tuple(w.shape)}")
    if tuple(value_weight.shape) != tuple(gate_weight.shape):
        fail(OP, f"value_weight {tuple(value_weight.shape)} and gate_weight {tuple(gate_weight.shape)} differ")
    if x.dim() < 1:
        fail(OP, "x must have at least one dim")
    name, fn = resolve(OP, backend, x.device, x.dtype, (activation,))
    amp = amp_dtype(x.device) if name != "torch" else None
    if amp is not None:
        x, gate_weight, gate_bias, value_weight, value_bias = cast(amp, x, gate_weight, gate_bias, value_weight,
                                                                   value_bias)
    same_device_dtype(OP, "x", x, gate_weight=gate_weight, gate_bias=gate_bias, value_weight=value_weight,
                      value_bias=value_bias)
    H, C = gate_weight.shape
    if x.shape[-1] != C:
        fail(OP, f"x has {x.shape[-1]} features but the weights expect {C}")
    for arg, b in (("gate_bias", gate_bias), ("value_bias", value_bias)):
        if b is not None and tuple(b.shape) != (H,):
            fail(OP, f"{arg} must be ({H},), got {tuple(b.shape)}")
    return fn(x, gate_weight, gate_bias, value_weight, value_bias, activation)
