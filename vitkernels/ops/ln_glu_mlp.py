"""The gated MLP with its LayerNorm, as one autograd unit: y = fc2(act(LN(x) Wg^T + bg) * (LN(x) Wv^T + bv))
[+ x]: the public op and its contract. The SwiGLU / GEGLU / GLU counterpart of ``ops.ln_mlp``, memory-lean in
the same way: only the two fc1 pre-activations g and v are stored between the GEMMs, and the backward
recomputes LN(x) (for the fc1 weight gradients) and h = act(g) * v (for fc2's) where it needs them. The gate
activations are ``ops.glu_linear``'s: SiLU (SwiGLU, EVA-02), exact-erf GELU (GEGLU), tanh-GELU, sigmoid (GLU).

Contract (every backend's ``<ns>::ln_glu_mlp_fwd`` / ``ln_glu_mlp_bwd`` has exactly these schemas):

    ln_glu_mlp_fwd(x, ln_weight?, ln_bias?, eps, gate_weight, gate_bias?, value_weight, value_bias?, fc2_weight,
                   fc2_bias?, add_input, activation) -> (y, g, v, mean, rstd)
        x (R, C); ln_weight, ln_bias (C,); gate_weight, value_weight (H, C), gate_bias, value_bias (H,);
        fc2_weight (O, H), fc2_bias (O,). g = LN(x) Wg^T + bg and v = LN(x) Wv^T + bv (R, H) in the weights'
        dtype; y = (act(g) * v) W2^T + b2 (R, O), plus x when add_input (the block's residual, O == C), in the
        weights' dtype, or x's with add_input: x may be fp32 with lower-precision parameters (an fp32 residual
        stream under autocast), normalised in fp32 and added in fp32. mean, rstd fp32 (R,).
        activation: "silu" | "gelu" | "gelu_tanh" | "sigmoid".
    ln_glu_mlp_bwd(grad_y, x, ln_weight?, ln_bias?, mean, rstd, gate_weight, value_weight, fc2_weight, g, v,
                   add_input, activation, output_mask)
        -> (dx, dln_weight, dln_bias, dgate_weight, dgate_bias, dvalue_weight, dvalue_bias, dfc2_weight,
            dfc2_bias)
        output_mask: bool[9], which gradients to compute (the others are empty (0,)); each has its input's
        dtype. dx includes grad_y when add_input (x is then also the residual).

Backward (derivation; a = act, n = LN(x), h = a(g) * v):
    dW2 = dy^T h,  db2 = sum_rows dy,  dh = dy W2
    dg = dh * v * a'(g),  dv = dh * a(g),  dbg = sum_rows dg,  dbv = sum_rows dv
    dWg = dg^T n,  dWv = dv^T n,  dn = dg Wg + dv Wv,  dx = LayerNorm backward of dn (+ dy with add_input)

The forward saves x, g, v and the statistics (C + 2 H per row, plus 8 bytes), where LayerNorm, glu_linear and
fc2 as separate ops keep x, LN(x), g, v and h (2 C + 3 H). FLOPs: 2 R (2 H C + O H) forward; backward 2 R O H
for dW2 and for dy W2, 2 R H C for each of dWg and dWv, 4 R H C for dg Wg + dv Wv, each when needed, as
FlopCounterMode counts mm.
"""

from __future__ import annotations

import torch

from vitkernels.backends import resolve
from vitkernels.ops.contract import OpContract, or_none
from vitkernels.ops.glu_linear import ACTIVATIONS
from vitkernels.ops.ln_linear import grad_like
from vitkernels.ops.validate import amp_dtype, cast, check_float, fail, same_device_dtype

OP = "ln_glu_mlp"


def _fake_fwd(x, ln_weight, ln_bias, eps, gate_weight, gate_bias, value_weight, value_bias, fc2_weight, fc2_bias,
              add_input, activation):
    R, H = x.shape[0], gate_weight.shape[0]
    stats = x.new_empty((R,), dtype=torch.float32)
    y = (x if add_input else fc2_weight).new_empty((R, fc2_weight.shape[0]))
    return y, gate_weight.new_empty((R, H)), gate_weight.new_empty((R, H)), stats, torch.empty_like(stats)


def _fake_bwd(grad_y, x, ln_weight, ln_bias, mean, rstd, gate_weight, value_weight, fc2_weight, g, v, add_input,
              activation, output_mask):
    ln_w = ln_weight if ln_weight is not None else x.new_empty((x.shape[1],))
    ln_b = ln_bias if ln_bias is not None else ln_w
    H, O = gate_weight.shape[0], fc2_weight.shape[0]
    return grad_like(x, ln_w, ln_b, gate_weight, gate_weight.new_empty((H,)), value_weight,
                     value_weight.new_empty((H,)), fc2_weight, fc2_weight.new_empty((O,)))(output_mask)


def _setup_context(ctx, inputs, output):
    (x, ln_weight, ln_bias, eps, gate_weight, gate_bias, value_weight, value_bias, fc2_weight, fc2_bias, add_input,
     activation) = inputs
    _, g, v, mean, rstd = output
    ctx.mark_non_differentiable(g, v, mean, rstd)
    ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd, gate_weight, value_weight, fc2_weight, g, v)
    ctx.add_input = add_input
    ctx.activation = activation
    ctx.has_bias = (gate_bias is not None, value_bias is not None, fc2_bias is not None)


def _backward(bwd_op, ctx, grad_y, grad_g, grad_v, grad_mean, grad_rstd):
    x, ln_weight, ln_bias, mean, rstd, gate_weight, value_weight, fc2_weight, g, v = ctx.saved_tensors
    nx, nlw, nlb, _, ngw, ngb, nvw, nvb, nw2, nb2, _, _ = ctx.needs_input_grad
    mask = [nx, nlw and ln_weight is not None, nlb and ln_bias is not None, ngw, ngb and ctx.has_bias[0], nvw,
            nvb and ctx.has_bias[1], nw2, nb2 and ctx.has_bias[2]]
    if not any(mask):
        return (None,) * 12
    grads = bwd_op(grad_y, x, ln_weight, ln_bias, mean, rstd, gate_weight, value_weight, fc2_weight, g, v,
                   ctx.add_input, ctx.activation, mask)
    dx, dlw, dlb, dgw, dgb, dvw, dvb, dw2, db2 = (or_none(t, m) for t, m in zip(grads, mask))
    return dx, dlw, dlb, None, dgw, dgb, dvw, dvb, dw2, db2, None, None


def _flops_fwd(x, gate_weight, fc2_weight, out_shape=None, **_):
    R, (H, C), O = x[0], gate_weight, fc2_weight[0]
    return 2 * R * (2 * H * C + O * H)


def _flops_bwd(x, gate_weight, fc2_weight, output_mask, out_shape=None, **_):
    R, (H, C), O = x[0], gate_weight, fc2_weight[0]
    needs_dh = any(output_mask[:7])
    needs_dn = any(output_mask[:3])
    return 2 * R * (O * H * (int(output_mask[7]) + int(needs_dh))
                    + H * C * (int(output_mask[3]) + int(output_mask[5]) + 2 * int(needs_dn)))


def _run(fwd_op, x, ln_weight, ln_bias, eps, gate_weight, gate_bias, value_weight, value_bias, fc2_weight,
         fc2_bias, add_input, activation):
    C, O = x.shape[-1], fc2_weight.shape[0]
    # (..., C) -> (R, C): a view whenever the leading dims flatten, one copy otherwise (as ops.linear).
    y = fwd_op(x.reshape(-1, C), ln_weight, ln_bias, eps, gate_weight, gate_bias, value_weight, value_bias,
               fc2_weight, fc2_bias, add_input, activation)[0]
    return y.view(*x.shape[:-1], O)


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor x, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor gate_weight, Tensor? gate_bias, "
               "Tensor value_weight, Tensor? value_bias, Tensor fc2_weight, Tensor? fc2_bias, bool add_input, "
               "str activation) -> (Tensor y, Tensor g, Tensor v, Tensor mean, Tensor rstd)",
    bwd_schema="(Tensor grad_y, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor mean, Tensor rstd, "
               "Tensor gate_weight, Tensor value_weight, Tensor fc2_weight, Tensor g, Tensor v, bool add_input, "
               "str activation, bool[] output_mask) -> (Tensor dx, Tensor dln_weight, Tensor dln_bias, "
               "Tensor dgate_weight, Tensor dgate_bias, Tensor dvalue_weight, Tensor dvalue_bias, "
               "Tensor dfc2_weight, Tensor dfc2_bias)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=_flops_fwd, flops_bwd=_flops_bwd, run=_run,
)


def ln_glu_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor | None,
    value_weight: torch.Tensor,
    value_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    add_input: bool = False,
    activation: str = "silu",
    backend: str | None = None,
) -> torch.Tensor:
    """fc2(act(LN(x) Wg^T + bg) * (LN(x) Wv^T + bv)) [+ x]: a pre-norm block's gated MLP half as one unit.

    Args:
        x: (..., C). ln_weight, ln_bias: (C,) or None. gate_weight, value_weight: (H, C) (views, e.g. the
            halves of a packed (2H, C) fc1 weight, are fine); gate_bias, value_bias: (H,) or None.
        fc2_weight: (O, H), fc2_bias: (O,) or None. eps: LayerNorm epsilon.
        add_input: add x to the result (the block's residual; needs O == C).
        activation: the gate's: "silu" (SwiGLU), "gelu" (exact erf), "gelu_tanh" or "sigmoid" (GLU).

    Returns:
        (..., O).
    """
    check_float(OP, "x", x)
    for arg, w in (("gate_weight", gate_weight), ("value_weight", value_weight), ("fc2_weight", fc2_weight)):
        check_float(OP, arg, w)
        if w.dim() != 2:
            fail(OP, f"{arg} must be (out_features, in_features), got shape {tuple(w.shape)}")
    if x.dim() < 1 or x.shape[-1] == 0:
        fail(OP, f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        fail(OP, f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    name, fn = resolve(OP, backend, x.device, x.dtype, (x.shape[-1], activation))
    amp = amp_dtype(x.device) if name != "torch" else None
    if amp is not None:  # as ops.ln_mlp: an fp32 x stays fp32 (LayerNorm and the residual add in fp32)
        x = x if x.dtype == torch.float32 else x.to(amp)
        ln_weight, ln_bias, gate_weight, gate_bias, value_weight, value_bias, fc2_weight, fc2_bias = cast(
            amp, ln_weight, ln_bias, gate_weight, gate_bias, value_weight, value_bias, fc2_weight, fc2_bias)
    same_device_dtype(OP, "x", x, ln_weight=ln_weight, ln_bias=ln_bias, gate_weight=gate_weight,
                      gate_bias=gate_bias, value_weight=value_weight, value_bias=value_bias, fc2_weight=fc2_weight,
                      fc2_bias=fc2_bias)
    C = x.shape[-1]
    H, O = gate_weight.shape[0], fc2_weight.shape[0]
    if tuple(value_weight.shape) != tuple(gate_weight.shape):
        fail(OP, f"value_weight {tuple(value_weight.shape)} and gate_weight {tuple(gate_weight.shape)} differ")
    if gate_weight.shape[1] != C:
        fail(OP, f"x has {C} features but gate_weight expects {gate_weight.shape[1]}")
    if fc2_weight.shape[1] != H:
        fail(OP, f"fc2_weight expects {fc2_weight.shape[1]} features but the gated fc1 gives {H}")
    if add_input and O != C:
        fail(OP, f"add_input needs fc2's output width {O} to equal x's {C}")
    for arg, t, n in (("ln_weight", ln_weight, C), ("ln_bias", ln_bias, C), ("gate_bias", gate_bias, H),
                      ("value_bias", value_bias, H), ("fc2_bias", fc2_bias, O)):
        if t is not None and tuple(t.shape) != (n,):
            fail(OP, f"{arg} must be ({n},), got {tuple(t.shape)}")
    if not eps > 0:
        fail(OP, f"eps must be positive, got {eps}")
    return fn(x, ln_weight, ln_bias, float(eps), gate_weight, gate_bias, value_weight, value_bias, fc2_weight,
              fc2_bias, bool(add_input), activation)
