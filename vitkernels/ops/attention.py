"""Attention softmax(q k^T * scale + bias) v (bidirectional; an optional additive bias): the public op and its
contract.

Contract (every backend's ``<ns>::attention_fwd`` / ``attention_bwd`` has exactly these schemas):

    attention_fwd(q, k, v, bias, scale) -> (out, lse)
        q (B, H, N, D), k / v (B, H, M, D), any strides with a unit last stride (e.g. views of a fused
        (B, N, 3, H, D) qkv); bias None or a 4-D tensor broadcastable to (B, H, N, M) (see ``bias_shape_ok``),
        any strides (stride 0 along a broadcast dim: expanded views are read as they are, never copied), in
        q's dtype or fp32. Scores s = q k^T * scale + bias. out (B, H, N, D) stored as (B, N, H, D), so
        out.transpose(1, 2) flattens to (B, N, H * D) for free; lse (B, H, N) fp32, the log-sum-exp of each
        score row.
    attention_bwd(grad_out, q, k, v, bias, out, lse, scale, needs_dbias) -> (dq, dk, dv, dbias)
        Each of dq, dk, dv (B, H, L, D) stored as (B, L, H, D). dbias: when needs_dbias, dS (the score
        gradient P * (dP - rowsum(dO * O))) summed over the dims where bias has size 1, in bias's shape and
        dtype (an expanded view gets the full (B, H, N, M) gradient: autograd's expand backward reduces it);
        otherwise an empty (0,) tensor. The autograd glue asks for it only when bias requires grad, so a
        constant mask costs nothing in the backward.

Masking: -inf entries of the bias drop those keys. A row whose scores are all -inf (every key masked; with
an fp32 bias, entries below about -2.3e38 count as -inf, their log2(e) multiple overflows) has no softmax:
SDPA returns NaN there; this op returns out = 0 and lse = +inf for it, and it contributes nothing to any
gradient (dq of the row, dbias of the row, dk and dv: 0). Every backend, the torch reference included, does
the same. A bool mask is not taken: the caller converts it (True = attend -> 0.0, False -> -inf).

The forward saves q, k, v, bias, out and lse, never the N x M probabilities. FLOPs: 2 B H N M (D + D) forward
(q k^T and p v) and twice that backward, with or without a bias, as FlopCounterMode counts SDPA (a kernel
that recomputes p does more arithmetic; that is not model FLOPs).
"""

from __future__ import annotations

import math

import torch

from vitkernels.backends import resolve
from vitkernels.ops.contract import OpContract
from vitkernels.ops.validate import amp_dtype, cast, check_float, fail, same_device_dtype

OP = "attention"


def empty_bnhd(like: torch.Tensor, B: int, H: int, L: int, D: int) -> torch.Tensor:
    """A (B, H, L, D) tensor stored as (B, L, H, D) contiguous: its transpose(1, 2) is a free reshape."""
    return like.new_empty((B, L, H, D)).transpose(1, 2)


def bias_shape_ok(shape, B: int, H: int, N: int, M: int) -> bool:
    """Whether a bias of ``shape`` broadcasts to (B, H, N, M) the way the kernels read it: (B | 1, H | 1,
    N | 1, M). Size-1 dims are broadcast (read with stride 0); the key dim is always full."""
    return (len(shape) == 4 and shape[0] in (B, 1) and shape[1] in (H, 1) and shape[2] in (N, 1)
            and shape[3] == M)


def bias_strides(bias: torch.Tensor) -> tuple[int, int, int, int]:
    """bias's strides with 0 along its size-1 dims: how a kernel reads it as a (B, H, N, M) tensor."""
    return tuple(0 if n == 1 else s for n, s in zip(bias.shape, bias.stride()))


def dbias_from_scores(ds: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """ds (B, H, N, M), the score gradient, summed over bias's size-1 dims, in bias's shape and dtype (torch.sum:
    deterministic)."""
    dims = [d for d in range(4) if bias.shape[d] == 1 and ds.shape[d] != 1]
    if dims:
        ds = ds.sum(dim=dims, keepdim=True)
    return ds.to(bias.dtype)


def _fake_fwd(q, k, v, bias, scale):
    B, H, N, D = q.shape
    return empty_bnhd(q, B, H, N, D), q.new_empty((B, H, N), dtype=torch.float32)


def _fake_bwd(grad_out, q, k, v, bias, out, lse, scale, needs_dbias):
    B, H, N, D = q.shape
    M = k.shape[2]
    dbias = bias.new_empty(bias.shape) if needs_dbias and bias is not None else q.new_empty((0,))
    return empty_bnhd(q, B, H, N, D), empty_bnhd(k, B, H, M, D), empty_bnhd(v, B, H, M, D), dbias


def _setup_context(ctx, inputs, output):
    q, k, v, bias, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, bias, out, lse)
    ctx.scale = scale


def _backward(bwd_op, ctx, grad_out, grad_lse):
    # lse is an internal statistic (the public op returns only out): its gradient is never used.
    q, k, v, bias, out, lse = ctx.saved_tensors
    needs_dbias = bias is not None and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = bwd_op(grad_out, q, k, v, bias, out, lse, ctx.scale, needs_dbias)
    return dq, dk, dv, dbias if needs_dbias else None, None


def _flops_fwd(q, k, v, out_shape=None, **_):
    return 2 * math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _flops_bwd(q, k, v, out_shape=None, **_):
    return 2 * _flops_fwd(q, k, v)


def _run(fwd_op, q, k, v, bias, scale):
    return fwd_op(q, k, v, bias, scale)[0]


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor q, Tensor k, Tensor v, Tensor? bias, float scale) -> (Tensor out, Tensor lse)",
    bwd_schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor? bias, Tensor out, Tensor lse, float scale, "
               "bool needs_dbias) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dbias)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=_flops_fwd, flops_bwd=_flops_bwd, run=_run,
)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + bias) v, bidirectional (ViT attention), with an optional additive bias.

    Args:
        q: (B, H, N, D); k, v: (B, H, M, D). Any strides (e.g. views of a fused (B, N, 3, H, D) qkv).
        bias: None, or an additive float bias broadcastable to (B, H, N, M): (B | 1, H | 1, N | 1, M), e.g.
            BEiT's relative position bias (1, H, N, N), a timm ``attn_mask`` (B, 1, N, M) or a key-padding
            mask (B, 1, 1, M); fewer than 4 dims are aligned to the right (as SDPA broadcasts). Any strides
            (expanded views are read in place). q's dtype or fp32. -inf masks a key; a row with every key
            masked returns 0 (see the module docstring: SDPA would return NaN). A bool mask is refused:
            convert it with ``torch.zeros_like(mask, dtype=q.dtype).masked_fill(~mask, float("-inf"))``.
            Differentiable (dbias is computed only when bias requires grad).
        scale: defaults to D ** -0.5.

    Returns:
        (B, H, N, D). Fused backends may return it as a transposed view of a (B, N, H, D) buffer, so that
        ``out.transpose(1, 2).reshape(B, N, H * D)`` is free.
    """
    for arg, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, arg, t)
        if t.dim() != 4:
            fail(OP, f"{arg} must be (B, H, N, D), got shape {tuple(t.shape)}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            fail(OP, f"bias must be a tensor, got {type(bias).__name__}")
        if bias.dtype == torch.bool:
            fail(OP, "bias must be an additive float tensor, got a bool mask; convert it first "
                     "(True = attend -> 0.0, False -> -inf), e.g. "
                     "torch.zeros_like(mask, dtype=q.dtype).masked_fill(~mask, float('-inf'))")
        check_float(OP, "bias", bias)
        if bias.dim() > 4:
            fail(OP, f"bias must have at most 4 dims (B, H, N, M), got shape {tuple(bias.shape)}")
        bias = bias.view((1,) * (4 - bias.dim()) + tuple(bias.shape))
    name, fn = resolve(OP, backend, q.device, q.dtype, (q.shape[-1], q.shape[0] * q.shape[1], bias is not None))
    amp = amp_dtype(q.device) if name != "torch" else None
    if amp is not None:
        q, k, v = cast(amp, q, k, v)
        if bias is not None and bias.dtype not in (amp, torch.float32):
            bias = bias.to(amp)
    same_device_dtype(OP, "q", q, k=k, v=v)
    if k.shape != v.shape:
        fail(OP, f"k shape {tuple(k.shape)} differs from v shape {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        fail(OP, f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D")
    if q.shape[2] == 0 or k.shape[2] == 0:
        fail(OP, "sequence length must be at least 1")
    if bias is not None:
        B, H, N, _ = q.shape
        M = k.shape[2]
        if bias.device != q.device:
            fail(OP, f"bias is on {bias.device} but q is on {q.device}")
        if bias.dtype not in (q.dtype, torch.float32) and (name != "torch" or amp_dtype(q.device) is None):
            fail(OP, f"bias has dtype {bias.dtype}; it must be q's dtype ({q.dtype}) or torch.float32")
        if not bias_shape_ok(bias.shape, B, H, N, M):
            fail(OP, f"bias shape {tuple(bias.shape)} does not broadcast to (B, H, N, M) = {(B, H, N, M)} "
                     f"as (B or 1, H or 1, N or 1, M)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return fn(q, k, v, bias, scale)
