"""The transformer MLP with its LayerNorm, as one autograd unit: y = fc2(act(fc1(LN(x)))) [+ x]: the public
op and its contract. Nothing but the fc1 pre-activation z is stored between the GEMMs: fc1 normalises x on
the fly, fc2 applies the activation to z as it loads it, and the backward recomputes LN(x) and act(z) where
the weight gradients need them. "GELU" below stands for the activation: exact-erf GELU (the default, the
paper's and timm's), tanh-GELU (SigLIP2 so400m), QuickGELU (OpenAI CLIP) or SiLU, as ``ops.linear``.

Contract (every backend's ``<ns>::ln_mlp_fwd`` / ``ln_mlp_bwd`` has exactly these schemas):

    ln_mlp_fwd(x, ln_weight?, ln_bias?, eps, fc1_weight, fc1_bias?, fc2_weight, fc2_bias?, add_input,
               activation) -> (y, z, mean, rstd)
        x (R, C); ln_weight, ln_bias (C,); fc1_weight (H, C), fc1_bias (H,); fc2_weight (O, H), fc2_bias (O,).
        z = LN(x) W1^T + b1 (R, H); y = GELU(z) W2^T + b2 (R, O), plus x when add_input (the block's
        residual, O == C); mean, rstd fp32 (R,). activation: "gelu" | "gelu_tanh" | "quick_gelu" | "silu". z has the weights' dtype, y
        too, or x's with add_input: x may be fp32 with lower-precision parameters (an fp32 residual stream
        under autocast), normalised in fp32 and added in fp32.
    ln_mlp_bwd(grad_y, x, ln_weight?, ln_bias?, mean, rstd, fc1_weight, fc2_weight, z, add_input, activation,
               output_mask) -> (dx, dln_weight, dln_bias, dfc1_weight, dfc1_bias, dfc2_weight, dfc2_bias)
        output_mask: bool[7], which gradients to compute (the others are empty (0,)); each has its input's
        dtype. dx includes grad_y when add_input (x is then also the residual).

Backward:  dW2 = dy^T GELU(z),  db2 = sum_rows dy,  dz = (dy W2) * GELU'(z),  db1 = sum_rows dz,
           dW1 = dz^T LN(x),  d LN(x) = dz W1,  dx = LayerNorm backward (+ dy with add_input).

The forward saves x, z and the statistics (C + H per row, plus 8 bytes), where LayerNorm, fc1 + GELU and fc2
as separate ops keep x, LN(x), z and GELU(z) (2 C + 2 H). FLOPs: 2 R (H C + O H) forward; backward 2 R O H
for dW2 and for dy W2, 2 R H C for dW1 and for dz W1, each when needed, as FlopCounterMode counts mm.
"""

from __future__ import annotations

import torch

from vitkernels.backends import resolve
from vitkernels.ops.contract import OpContract, or_none
from vitkernels.ops.linear import ACTIVATIONS
from vitkernels.ops.ln_linear import grad_like
from vitkernels.ops.validate import amp_dtype, cast, check_float, fail, same_device_dtype

OP = "ln_mlp"


def _fake_fwd(x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, add_input, activation):
    R = x.shape[0]
    stats = x.new_empty((R,), dtype=torch.float32)
    y = (x if add_input else fc2_weight).new_empty((R, fc2_weight.shape[0]))
    return y, fc1_weight.new_empty((R, fc1_weight.shape[0])), stats, torch.empty_like(stats)


def _fake_bwd(grad_y, x, ln_weight, ln_bias, mean, rstd, fc1_weight, fc2_weight, z, add_input, activation,
              output_mask):
    ln_w = ln_weight if ln_weight is not None else x.new_empty((x.shape[1],))
    ln_b = ln_bias if ln_bias is not None else ln_w
    b1, b2 = fc1_weight.new_empty((fc1_weight.shape[0],)), fc2_weight.new_empty((fc2_weight.shape[0],))
    return grad_like(x, ln_w, ln_b, fc1_weight, b1, fc2_weight, b2)(output_mask)


def _setup_context(ctx, inputs, output):
    x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, add_input, activation = inputs
    _, z, mean, rstd = output
    ctx.mark_non_differentiable(z, mean, rstd)
    ctx.save_for_backward(x, ln_weight, ln_bias, mean, rstd, fc1_weight, fc2_weight, z)
    ctx.add_input = add_input
    ctx.activation = activation
    ctx.has_bias = (fc1_bias is not None, fc2_bias is not None)


def _backward(bwd_op, ctx, grad_y, grad_z, grad_mean, grad_rstd):
    x, ln_weight, ln_bias, mean, rstd, fc1_weight, fc2_weight, z = ctx.saved_tensors
    nx, nlw, nlb, _, nw1, nb1, nw2, nb2, _, _ = ctx.needs_input_grad
    mask = [nx, nlw and ln_weight is not None, nlb and ln_bias is not None, nw1, nb1 and ctx.has_bias[0], nw2,
            nb2 and ctx.has_bias[1]]
    if not any(mask):
        return (None,) * 10
    grads = bwd_op(grad_y, x, ln_weight, ln_bias, mean, rstd, fc1_weight, fc2_weight, z, ctx.add_input,
                   ctx.activation, mask)
    dx, dlw, dlb, dw1, db1, dw2, db2 = (or_none(g, m) for g, m in zip(grads, mask))
    return dx, dlw, dlb, None, dw1, db1, dw2, db2, None, None


def _flops_fwd(x, fc1_weight, fc2_weight, out_shape=None, **_):
    R, (H, C), O = x[0], fc1_weight, fc2_weight[0]
    return 2 * R * (H * C + O * H)


def _flops_bwd(x, fc1_weight, fc2_weight, output_mask, out_shape=None, **_):
    R, (H, C), O = x[0], fc1_weight, fc2_weight[0]
    needs_dz = any(output_mask[:5])
    return 2 * R * (O * H * (int(output_mask[5]) + int(needs_dz))
                    + H * C * (int(output_mask[3]) + int(any(output_mask[:3]))))


def _run(fwd_op, x, ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias, add_input, activation):
    C, O = x.shape[-1], fc2_weight.shape[0]
    y, _, _, _ = fwd_op(x.reshape(-1, C), ln_weight, ln_bias, eps, fc1_weight, fc1_bias, fc2_weight, fc2_bias,
                        add_input, activation)
    return y.view(*x.shape[:-1], O)


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor x, Tensor? ln_weight, Tensor? ln_bias, float eps, Tensor fc1_weight, Tensor? fc1_bias, "
               "Tensor fc2_weight, Tensor? fc2_bias, bool add_input, str activation) -> (Tensor y, Tensor z, "
               "Tensor mean, Tensor rstd)",
    bwd_schema="(Tensor grad_y, Tensor x, Tensor? ln_weight, Tensor? ln_bias, Tensor mean, Tensor rstd, "
               "Tensor fc1_weight, Tensor fc2_weight, Tensor z, bool add_input, str activation, bool[] output_mask) "
               "-> (Tensor dx, Tensor dln_weight, Tensor dln_bias, Tensor dfc1_weight, Tensor dfc1_bias, "
               "Tensor dfc2_weight, Tensor dfc2_bias)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=_flops_fwd, flops_bwd=_flops_bwd, run=_run,
)


def ln_mlp(
    x: torch.Tensor,
    ln_weight: torch.Tensor | None,
    ln_bias: torch.Tensor | None,
    fc1_weight: torch.Tensor,
    fc1_bias: torch.Tensor | None,
    fc2_weight: torch.Tensor,
    fc2_bias: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    add_input: bool = False,
    activation: str = "gelu",
    backend: str | None = None,
) -> torch.Tensor:
    """fc2(act(fc1(LN(x)))) [+ x]: a pre-norm block's MLP half as one fused unit.

    Args:
        x: (..., C). ln_weight, ln_bias: (C,) or None. fc1_weight: (H, C), fc1_bias: (H,) or None.
        fc2_weight: (O, H), fc2_bias: (O,) or None. eps: LayerNorm epsilon.
        add_input: add x to the result (the block's residual; needs O == C).
        activation: "gelu" (exact erf), "gelu_tanh", "quick_gelu" or "silu" (as ``ops.linear``).

    Returns:
        (..., O).
    """
    check_float(OP, "x", x)
    for arg, w in (("fc1_weight", fc1_weight), ("fc2_weight", fc2_weight)):
        check_float(OP, arg, w)
        if w.dim() != 2:
            fail(OP, f"{arg} must be (out_features, in_features), got shape {tuple(w.shape)}")
    if x.dim() < 1 or x.shape[-1] == 0:
        fail(OP, f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    if activation is None or activation not in ACTIVATIONS:
        fail(OP, f"activation must be one of {ACTIVATIONS[1:]}, got {activation!r}")
    name, fn = resolve(OP, backend, x.device, x.dtype, (x.shape[-1], activation))
    amp = amp_dtype(x.device) if name != "torch" else None
    if amp is not None:  # as ops.ln_linear: an fp32 x stays fp32 (LayerNorm and the residual add in fp32)
        x = x if x.dtype == torch.float32 else x.to(amp)
        ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias = cast(
            amp, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias)
    same_device_dtype(OP, "x", x, ln_weight=ln_weight, ln_bias=ln_bias, fc1_weight=fc1_weight,
                      fc1_bias=fc1_bias, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    C = x.shape[-1]
    H, O = fc1_weight.shape[0], fc2_weight.shape[0]
    if fc1_weight.shape[1] != C:
        fail(OP, f"x has {C} features but fc1_weight expects {fc1_weight.shape[1]}")
    if fc2_weight.shape[1] != H:
        fail(OP, f"fc2_weight expects {fc2_weight.shape[1]} features but fc1 gives {H}")
    if add_input and O != C:
        fail(OP, f"add_input needs fc2's output width {O} to equal x's {C}")
    for arg, t, n in (("ln_weight", ln_weight, C), ("ln_bias", ln_bias, C), ("fc1_bias", fc1_bias, H),
                      ("fc2_bias", fc2_bias, O)):
        if t is not None and tuple(t.shape) != (n,):
            fail(OP, f"{arg} must be ({n},), got {tuple(t.shape)}")
    if not eps > 0:
        fail(OP, f"eps must be positive, got {eps}")
    return fn(x, ln_weight, ln_bias, float(eps), fc1_weight, fc1_bias, fc2_weight, fc2_bias, bool(add_input),
              activation)
