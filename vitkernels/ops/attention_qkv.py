"""Attention on the fused qkv projection's output, softmax(q k^T * scale) v with q, k, v read from one
(B, N, 3 * H * D) tensor: the public op and its contract. Its backward returns d(qkv) as one tensor, so the
three gradients are written where q, k, v were read, with no stack copy (``ops.attention`` on the
q, k, v views of qkv gets three gradients, which autograd's unbind backward stacks: one more read and
write of the whole d(qkv)).

Contract (every backend's ``<ns>::attention_qkv_fwd`` / ``attention_qkv_bwd`` has exactly these schemas):

    attention_qkv_fwd(qkv, num_heads, scale) -> (out, lse)
        qkv (B, N, 3 * H * D), read as (B, N, 3, H, D) (timm's qkv layout; unit last stride);
        out (B, H, N, D) stored as (B, N, H, D) (so out.transpose(1, 2) flattens for free); lse (B, H, N) fp32.
    attention_qkv_bwd(grad_out, qkv, out, lse, num_heads, scale) -> (dqkv)
        dqkv (B, N, 3 * H * D) contiguous, in qkv's layout.

The forward saves qkv (one storage), out and lse. FLOPs: as ``ops.attention``: 4 B H N^2 D forward, twice that
backward.
"""

from __future__ import annotations

import torch

from vitkernels.backends import resolve
from vitkernels.ops.attention import empty_bnhd
from vitkernels.ops.contract import OpContract
from vitkernels.ops.validate import amp_dtype, cast, check_float, fail

OP = "attention_qkv"


def split_qkv(qkv: torch.Tensor, num_heads: int):
    """qkv (B, N, 3 H D) -> q, k, v: (B, H, N, D) strided views (a reshape copies only a non-viewable qkv)."""
    B, N, C3 = qkv.shape
    q, k, v = qkv.reshape(B, N, 3, num_heads, C3 // (3 * num_heads)).unbind(2)
    return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)


def _fake_fwd(qkv, num_heads, scale):
    B, N, C3 = qkv.shape
    D = C3 // (3 * num_heads)
    return empty_bnhd(qkv, B, num_heads, N, D), qkv.new_empty((B, num_heads, N), dtype=torch.float32)


def _fake_bwd(grad_out, qkv, out, lse, num_heads, scale):
    return qkv.new_empty(qkv.shape)


def _setup_context(ctx, inputs, output):
    qkv, num_heads, scale = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.scale = num_heads, scale


def _backward(bwd_op, ctx, grad_out, grad_lse):
    qkv, out, lse = ctx.saved_tensors
    return bwd_op(grad_out, qkv, out, lse, ctx.num_heads, ctx.scale), None, None


def _flops_fwd(qkv, out_shape=None, **_):
    B, N, C3 = qkv
    return 4 * B * N * N * (C3 // 3)


def _flops_bwd(qkv, out_shape=None, **_):
    return 2 * _flops_fwd(qkv)


def _run(fwd_op, qkv, num_heads, scale):
    return fwd_op(qkv, num_heads, scale)[0]


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor qkv, int num_heads, float scale) -> (Tensor out, Tensor lse)",
    bwd_schema="(Tensor grad_out, Tensor qkv, Tensor out, Tensor lse, int num_heads, float scale) -> (Tensor dqkv)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=_flops_fwd, flops_bwd=_flops_bwd, run=_run,
)


def attention_qkv(qkv: torch.Tensor, num_heads: int, *, scale: float | None = None,
                  backend: str | None = None) -> torch.Tensor:
    """Bidirectional multi-head attention on a fused qkv projection's output.

    Args:
        qkv: (B, N, 3 * H * D), laid out as (B, N, 3, H, D) (timm's Attention.qkv output).
        num_heads: H. scale: defaults to D ** -0.5.

    Returns:
        (B, H, N, D); fused backends return a transposed view of a (B, N, H, D) buffer.
    """
    check_float(OP, "qkv", qkv)
    if qkv.dim() != 3:
        fail(OP, f"qkv must be (B, N, 3 * H * D), got shape {tuple(qkv.shape)}")
    if not isinstance(num_heads, int) or num_heads < 1 or qkv.shape[-1] % (3 * num_heads):
        fail(OP, f"qkv's last dim {qkv.shape[-1]} is not 3 * num_heads * D for num_heads={num_heads!r}")
    if qkv.shape[1] == 0:
        fail(OP, "sequence length must be at least 1")
    D = qkv.shape[-1] // (3 * num_heads)
    name, fn = resolve(OP, backend, qkv.device, qkv.dtype, (D, qkv.shape[0] * num_heads))
    amp = amp_dtype(qkv.device) if name != "torch" else None
    if amp is not None:
        (qkv,) = cast(amp, qkv)
    scale = D ** -0.5 if scale is None else float(scale)
    return fn(qkv, num_heads, scale)
