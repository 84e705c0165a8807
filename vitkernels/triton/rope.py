"""2-D rotary position embedding on q and k together (EVA-02 / timm rope ViTs), forward and backward, in Triton.

One launch rotates q and k: a program owns a tile of BLOCK_T rows x BLOCK_P column pairs of one (batch, head)
and does it for both tensors (the tables are loaded once for the two). Per column pair (d0, d1) =
(2i, 2i + 1), or (i, i + D/2) with ``HALF`` (timm's rotate-half layout), and patch row t >= P:

    forward   y0 = x0 c0 - x1 s0          y1 = x1 c1 + x0 s1
    backward  dx0 = dy0 c0 + dy1 s1       dx1 = dy1 c1 - dy0 s0

with c = cos[t - P], s = sin[t - P] at the pair's two columns (see the derivation in vitkernels/ops/rope.py:
rot is antisymmetric, so the backward is the forward with the sine columns swapped and negated). Rows t < P
(class / register tokens) are copied. Everything is fp32 in registers, rounded once to the storage dtype.

Layout: q, k are read through all their strides (views of a (B, T, 3, H, D) qkv; the last stride must be 1,
else the launcher copies), the outputs are written as (B, T, H, D) and returned as (B, H, T, D) views, the
layout ``attention`` writes and reads best. The tables are read through their row stride (the sin and cos
halves of timm's (T - P, 2 D) table are views).

Supported: fp32 / fp16 / bf16 q and k, fp32 tables, any B, H, T, any even D up to ``MAX_D``; any P <= T.
Memory-bound: it moves 2 x (read + write) B H T D elements plus the tables (L2-resident). Checked without a
GPU (``triton.compile`` for sm_90a and sm_80, Triton 3.8): 56-64 registers, no spill, every dtype, both
pairings, both directions; not yet timed on a GPU (benchmarks/bench_rope.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitkernels.triton import NAMESPACE
from vitkernels.ops.attention import empty_bnhd
from vitkernels.ops.rope import CONTRACT

__all__ = ["rope", "rope_fwd", "rope_bwd", "why_not_supported"]

MAX_D = 2048  # a tile holds at least one row of D / 2 pairs per tensor in registers
# BLOCK_T x BLOCK_P pairs per program, over 8 warps: 4 pairs per thread of each tensor. Compiled for sm_90a
# (Triton 3.8) that is 64 registers, no spill, for every dtype and both pairings; 2048 pairs took 200-250
# registers (a quarter of the occupancy) for the same bytes in flight per SM.
_PAIRS_PER_TILE = 1024
_NUM_WARPS = 8


@triton.jit
def _rope_kernel(
    Q,  # (B, H, T, D) q (forward) or grad of q_out (backward), unit last stride
    K,  # (B, H, T, D) k or grad of k_out, unit last stride
    Sin,  # (T - P, D) fp32 sine table, unit column stride
    Cos,  # (T - P, D) fp32 cosine table, unit column stride
    QO,  # (B, H, T, D) out: rotated q (or dq), written through its strides ((B, T, H, D) storage)
    KO,  # (B, H, T, D) out: rotated k (or dk), same strides as QO
    stride_qb, stride_qh, stride_qt,  # strides of Q (elements)
    stride_kb, stride_kh, stride_kt,  # strides of K
    stride_ob, stride_oh, stride_ot,  # strides of QO and KO
    stride_s,  # row stride of Sin
    stride_c,  # row stride of Cos
    H,  # heads
    T,  # tokens, prefix included
    P,  # prefix (class / register) tokens, copied unrotated
    HALF_D,  # D / 2: column pairs per row
    HALF: tl.constexpr,  # pairs (i, i + D/2) (timm's rotate-half) instead of (2i, 2i + 1)
    BACKWARD: tl.constexpr,  # apply the transpose rotation (gradients)
    BLOCK_T: tl.constexpr,  # rows per program
    BLOCK_P: tl.constexpr,  # next_power_of_2(D / 2)
):
    bh = tl.program_id(0).to(tl.int64)  # B * H can be large: int64 offsets
    b, h = bh // H, bh % H
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # (BLOCK_T,)
    i = tl.arange(0, BLOCK_P)  # (BLOCK_P,)
    if HALF:
        d0, d1 = i, i + HALF_D
    else:
        d0, d1 = 2 * i, 2 * i + 1
    mask = (t < T)[:, None] & (i < HALF_D)[None, :]
    patch = t >= P  # (BLOCK_T,)
    table_mask = mask & patch[:, None]
    # Tables: prefix rows load as cos 1, sin 0 (masked), and are replaced by the input below anyway.
    row = (t - P).to(tl.int64)
    s0 = tl.load(Sin + row[:, None] * stride_s + d0[None, :], mask=table_mask, other=0.0).to(tl.float32)
    s1 = tl.load(Sin + row[:, None] * stride_s + d1[None, :], mask=table_mask, other=0.0).to(tl.float32)
    c0 = tl.load(Cos + row[:, None] * stride_c + d0[None, :], mask=table_mask, other=1.0).to(tl.float32)
    c1 = tl.load(Cos + row[:, None] * stride_c + d1[None, :], mask=table_mask, other=1.0).to(tl.float32)
    if BACKWARD:  # dx0 = dy0 c0 + dy1 s1, dx1 = dy1 c1 - dy0 s0: the forward with -s1, -s0
        s0, s1 = -s1, -s0
    t64 = t.to(tl.int64)
    o_off = b * stride_ob + h * stride_oh + t64[:, None] * stride_ot

    q_off = b * stride_qb + h * stride_qh + t64[:, None] * stride_qt
    x0 = tl.load(Q + q_off + d0[None, :], mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(Q + q_off + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    y0 = tl.where(patch[:, None], x0 * c0 - x1 * s0, x0)
    y1 = tl.where(patch[:, None], x1 * c1 + x0 * s1, x1)
    tl.store(QO + o_off + d0[None, :], y0.to(QO.dtype.element_ty), mask=mask)
    tl.store(QO + o_off + d1[None, :], y1.to(QO.dtype.element_ty), mask=mask)

    k_off = b * stride_kb + h * stride_kh + t64[:, None] * stride_kt
    x0 = tl.load(K + k_off + d0[None, :], mask=mask, other=0.0).to(tl.float32)
    x1 = tl.load(K + k_off + d1[None, :], mask=mask, other=0.0).to(tl.float32)
    y0 = tl.where(patch[:, None], x0 * c0 - x1 * s0, x0)
    y1 = tl.where(patch[:, None], x1 * c1 + x0 * s1, x1)
    tl.store(KO + o_off + d0[None, :], y0.to(KO.dtype.element_ty), mask=mask)
    tl.store(KO + o_off + d1[None, :], y1.to(KO.dtype.element_ty), mask=mask)


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _launch(q, k, sin, cos, num_prefix: int, half: bool, backward: bool):
    q, k, sin, cos = _unit_last(q), _unit_last(k), _unit_last(sin), _unit_last(cos)
    B, H, T, D = q.shape
    qo, ko = empty_bnhd(q, B, H, T, D), empty_bnhd(k, B, H, T, D)
    if q.numel() == 0:
        return qo, ko
    block_p = triton.next_power_of_2(max(D // 2, 1))
    block_t = max(1, min(triton.next_power_of_2(T), _PAIRS_PER_TILE // block_p))
    grid = (B * H, triton.cdiv(T, block_t))
    _rope_kernel[grid](
        q, k, sin, cos, qo, ko,
        q.stride(0), q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        qo.stride(0), qo.stride(1), qo.stride(2),
        sin.stride(0), cos.stride(0),
        H, T, num_prefix, D // 2,
        HALF=half, BACKWARD=backward, BLOCK_T=block_t, BLOCK_P=block_p,
        num_warps=_NUM_WARPS,
    )
    return qo, ko


def rope_fwd(q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, num_prefix: int,
             half: bool):
    """(q_rot, k_rot), each (B, H, T, D) stored as (B, T, H, D); see the module docstring."""
    return _launch(q, k, sin, cos, num_prefix, half, backward=False)


def rope_bwd(grad_q: torch.Tensor, grad_k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, num_prefix: int,
             half: bool):
    """(dq, dk), each (B, H, T, D) stored as (B, T, H, D): the transpose rotation of the gradients."""
    return _launch(grad_q, grad_k, sin, cos, num_prefix, half, backward=True)


def why_not_supported(device: torch.device, dtype: torch.dtype, D: int) -> str | None:
    """The kernel's limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"triton rope runs fp32/fp16/bf16, got {dtype}"
    if D > MAX_D:
        return f"triton rope supports head dims up to {MAX_D}, got {D}"
    return None


rope = CONTRACT.register(NAMESPACE, fwd=rope_fwd, bwd=rope_bwd)
