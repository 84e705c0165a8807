"""2-D rotary position embedding (EVA-02 / timm rope ViTs) on q and k together: the public op and its contract.

timm's ``EvaAttention`` rotates the patch tokens of q and k, never the ``num_prefix_tokens`` class / register
tokens in front of them, with ``apply_rot_embed_cat``: per row t >= P (P = num_prefix) and column d,

    x_rot[t, d] = x[t, d] * cos[t - P, d] + rot(x)[t, d] * sin[t - P, d]

where rot pairs columns up, rot(x)[d0] = -x[d1] and rot(x)[d1] = x[d0], for the pairs (d0, d1) =
(2i, 2i + 1) (``half=False``, timm's default ``rot``, interleaved tables [f0, f0, f1, f1, ...]) or
(i, i + D/2) (``half=True``, timm's ``rope_rotate_half``, tables [f0, f1, ..., f0, f1, ...]). Rows t < P are
copied unchanged. The tables are per column, in timm's layout (``RotaryEmbeddingCat.get_embed()`` chunked in
two: ``sin, cos = table.chunk(2, -1)``), so any table timm builds is applied exactly as timm applies it.

Contract (every backend's ``<ns>::rope_fwd`` / ``rope_bwd`` has exactly these schemas):

    rope_fwd(q, k, sin, cos, num_prefix, half) -> (q_out, k_out)
        q, k (B, H, T, D), any strides with a unit last stride (views of a (B, T, 3, H, D) qkv GEMM output);
        sin, cos (T - num_prefix, D) float32 (row stride free, unit column stride: the halves of timm's
        (T - P, 2 D) table are views). Computed in fp32 and rounded once to q's dtype, which is what timm's
        fp32 tables do to fp16 / bf16 q and k (type promotion, then ``.to(x.dtype)``). q_out, k_out
        (B, H, T, D) stored as (B, T, H, D), the layout ``attention`` writes its outputs in (``empty_bnhd``).
    rope_bwd(grad_q, grad_k, sin, cos, num_prefix, half) -> (dq, dk)
        The transpose rotation. rot is antisymmetric (rot^T = -rot), so dx = dy * cos - rot(dy * sin):
        dx[d0] = dy[d0] cos[d0] + dy[d1] sin[d1],  dx[d1] = dy[d1] cos[d1] - dy[d0] sin[d0];
        rows t < P pass dy through. dq, dk (B, H, T, D) stored as (B, T, H, D).

The tables get no gradient (timm's rope tables are buffers; learnable frequencies, ``rope_type='mixed'``, are
refused). The forward saves only the tables. Rope is elementwise: 0 FLOPs, as FlopCounterMode counts aten's
mul and add.
"""

from __future__ import annotations

import torch

from vitkernels.backends import resolve
from vitkernels.ops.attention import empty_bnhd
from vitkernels.ops.contract import OpContract
from vitkernels.ops.validate import amp_dtype, cast, check_float, fail, same_device_dtype

OP = "rope"


def pair_columns(D: int, half: bool):
    """The column pairs (d0, d1) that rot mixes: (2i, 2i + 1), or (i, i + D/2) with ``half``; i < D/2."""
    i = torch.arange(D // 2)
    return (i, i + D // 2) if half else (2 * i, 2 * i + 1)


def _fake_fwd(q, k, sin, cos, num_prefix, half):
    return empty_bnhd(q, *q.shape), empty_bnhd(k, *k.shape)


def _fake_bwd(grad_q, grad_k, sin, cos, num_prefix, half):
    return empty_bnhd(grad_q, *grad_q.shape), empty_bnhd(grad_k, *grad_k.shape)


def _setup_context(ctx, inputs, output):
    q, k, sin, cos, num_prefix, half = inputs
    ctx.save_for_backward(sin, cos)
    ctx.num_prefix, ctx.half = num_prefix, half


def _backward(bwd_op, ctx, grad_q, grad_k):
    sin, cos = ctx.saved_tensors
    dq, dk = bwd_op(grad_q, grad_k, sin, cos, ctx.num_prefix, ctx.half)
    return dq, dk, None, None, None, None


def _run(fwd_op, q, k, sin, cos, num_prefix, half):
    return fwd_op(q, k, sin, cos, num_prefix, half)


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor q, Tensor k, Tensor sin, Tensor cos, int num_prefix, bool half) "
               "-> (Tensor q_out, Tensor k_out)",
    bwd_schema="(Tensor grad_q, Tensor grad_k, Tensor sin, Tensor cos, int num_prefix, bool half) "
               "-> (Tensor dq, Tensor dk)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=lambda **kw: 0, flops_bwd=lambda **kw: 0, run=_run,
)


def rope(
    q: torch.Tensor,
    k: torch.Tensor,
    sin: torch.Tensor,
    cos: torch.Tensor,
    *,
    num_prefix_tokens: int = 0,
    half: bool = False,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate the patch tokens of q and k by 2-D rotary position embeddings, as timm's EvaAttention does.

    Args:
        q, k: (B, H, T, D), T = num_prefix_tokens + patches; any strides (e.g. views of a fused qkv).
        sin, cos: (T - num_prefix_tokens, D) tables in timm's layout (``table.chunk(2, -1)`` of
            ``RotaryEmbeddingCat.get_embed()``); computed in fp32 (fp16 / bf16 tables are upcast; float64
            stays float64 on the torch backend, the tests' oracle). They get no gradient.
        num_prefix_tokens: leading class / register tokens, copied unrotated.
        half: timm's rotate-half pairing (``rope_rotate_half=True``) instead of interleaved pairs.

    Returns:
        (q_rot, k_rot), each (B, H, T, D) in q's dtype. Fused backends return transposed views of
        (B, T, H, D) buffers, which ``attention`` reads as they are.
    """
    for arg, t in (("q", q), ("k", k), ("sin", sin), ("cos", cos)):
        check_float(OP, arg, t)
    if q.dim() != 4:
        fail(OP, f"q must be (B, H, T, D), got shape {tuple(q.shape)}")
    if k.shape != q.shape:
        fail(OP, f"k shape {tuple(k.shape)} differs from q shape {tuple(q.shape)}")
    B, H, T, D = q.shape
    if D % 2:
        fail(OP, f"head dim D must be even (rot pairs columns up), got {D}")
    P = int(num_prefix_tokens)
    if not 0 <= P <= T:
        fail(OP, f"num_prefix_tokens must be in [0, T = {T}], got {num_prefix_tokens}")
    for arg, t in (("sin", sin), ("cos", cos)):
        if tuple(t.shape) != (T - P, D):
            fail(OP, f"{arg} must be (T - num_prefix_tokens, D) = {(T - P, D)}, got {tuple(t.shape)}")
        if t.requires_grad and torch.is_grad_enabled():
            fail(OP, f"{arg} requires grad: the rope tables get no gradient (timm's are buffers; learnable "
                     f"frequencies, rope_type='mixed', are not supported)")
    name, fn = resolve(OP, backend, q.device, q.dtype, (D,))
    amp = amp_dtype(q.device) if name != "torch" else None
    if amp is not None:
        q, k = cast(amp, q, k)
    same_device_dtype(OP, "q", q, k=k)
    table = torch.float64 if q.dtype == torch.float64 else torch.float32
    sin, cos = sin.to(table), cos.to(table)
    for arg, t in (("sin", sin), ("cos", cos)):
        if t.device != q.device:
            fail(OP, f"{arg} is on {t.device} but q is on {q.device}")
    return fn(q, k, sin, cos, P, bool(half))
