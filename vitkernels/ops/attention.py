"""Attention softmax(q k^T * scale) v (bidirectional, no mask): the public op and its contract.

Contract (every backend's ``<ns>::attention_fwd`` / ``attention_bwd`` has exactly these schemas):

    attention_fwd(q, k, v, scale) -> (out, lse)
        q (B, H, N, D), k / v (B, H, M, D), any strides with a unit last stride (e.g. views of a fused
        (B, N, 3, H, D) qkv); out (B, H, N, D) stored as (B, N, H, D), so out.transpose(1, 2) flattens to
        (B, N, H * D) for free; lse (B, H, N) fp32, the log-sum-exp of each score row.
    attention_bwd(grad_out, q, k, v, out, lse, scale) -> (dq, dk, dv)
        Each gradient (B, H, L, D) stored as (B, L, H, D).

The forward saves q, k, v, out and lse, never the N x M probabilities. FLOPs: 2 B H N M (D + D) forward
(q k^T and p v) and twice that backward, as FlopCounterMode counts SDPA (a kernel that recomputes p does more
arithmetic; that is not model FLOPs).
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


def _fake_fwd(q, k, v, scale):
    B, H, N, D = q.shape
    return empty_bnhd(q, B, H, N, D), q.new_empty((B, H, N), dtype=torch.float32)


def _fake_bwd(grad_out, q, k, v, out, lse, scale):
    B, H, N, D = q.shape
    M = k.shape[2]
    return empty_bnhd(q, B, H, N, D), empty_bnhd(k, B, H, M, D), empty_bnhd(v, B, H, M, D)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale


def _backward(bwd_op, ctx, grad_out, grad_lse):
    # lse is an internal statistic (the public op returns only out): its gradient is never used.
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = bwd_op(grad_out, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


def _flops_fwd(q, k, v, out_shape=None, **_):
    return 2 * math.prod(q[:-2]) * q[-2] * k[-2] * (q[-1] + v[-1])


def _flops_bwd(q, k, v, out_shape=None, **_):
    return 2 * _flops_fwd(q, k, v)


def _run(fwd_op, q, k, v, scale):
    return fwd_op(q, k, v, scale)[0]


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor out, Tensor lse)",
    bwd_schema="(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
               "-> (Tensor dq, Tensor dk, Tensor dv)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=_flops_fwd, flops_bwd=_flops_bwd, run=_run,
)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale) v without masking (ViT attention is bidirectional).

    Args:
        q: (B, H, N, D); k, v: (B, H, M, D). Any strides (e.g. views of a fused (B, N, 3, H, D) qkv).
        scale: defaults to D ** -0.5.

    Returns:
        (B, H, N, D). Fused backends may return it as a transposed view of a (B, N, H, D) buffer, so that
        ``out.transpose(1, 2).reshape(B, N, H * D)`` is free.
    """
    for arg, t in (("q", q), ("k", k), ("v", v)):
        check_float(OP, arg, t)
        if t.dim() != 4:
            fail(OP, f"{arg} must be (B, H, N, D), got shape {tuple(t.shape)}")
    name, fn = resolve(OP, backend, q.device, q.dtype, (q.shape[-1], q.shape[0] * q.shape[1]))
    amp = amp_dtype(q.device) if name != "torch" else None
    if amp is not None:
        q, k, v = cast(amp, q, k, v)
    same_device_dtype(OP, "q", q, k=k, v=v)
    if k.shape != v.shape:
        fail(OP, f"k shape {tuple(k.shape)} differs from v shape {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        fail(OP, f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D")
    if q.shape[2] == 0 or k.shape[2] == 0:
        fail(OP, "sequence length must be at least 1")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return fn(q, k, v, scale)
