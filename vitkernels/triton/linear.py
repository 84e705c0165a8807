"""Linear layer with a fused epilogue: y = act(x W^T + b) + residual, forward and backward, in Triton.

What is fused (the ViT uses three variants):
    fc1:       y = GELU(x W^T + b)            bias + exact-erf GELU in the GEMM epilogue
    fc2, proj: y = x W^T + b + residual       bias + residual add in the GEMM epilogue
    qkv:       y = x W^T + b                  bias only
GELU is the exact one, GELU(z) = 0.5 z (1 + erf(z / sqrt(2))) (torch.nn.GELU(approximate="none")); the same
epilogue (and its backward) also takes tanh-GELU, QuickGELU z sigmoid(1.702 z) and SiLU (``activation``,
ACT_IDS), the activations of SigLIP2, OpenAI CLIP and SwiGLU-style MLPs. "GELU" below stands for the
launch's activation.

Shapes: x (..., K) is flattened to (R, K) (a view whenever the leading dims flatten; one deliberate copy
otherwise, e.g. a (B, N, K) view transposed in B and N); weight (M, K) is read through its strides (no
transpose copy); bias (M,); residual (..., M). Any R >= 0 and any K, M >= 1 (masked tiles; no multiple-of-16
requirement). x, weight, residual and the incoming gradient may have any strides (including stride 0).

One GEMM kernel does all three products of forward and backward: out[P, Q] = sum_S a[P, S] b[S, Q], with a
and b addressed through strides, so transposes cost nothing:
    forward  y  (R, M) = x  (R, K) @ W^T (K, M)      P=R, Q=M, S=K   epilogue: +b, save z, GELU, +residual
    backward dx (R, K) = dz (R, M) @ W   (M, K)      P=R, Q=K, S=M
    backward dW (M, K) = dz^T (M, R) @ x (R, K)      P=M, Q=K, S=R
Accumulation is fp32 for every input dtype (fp32, fp16, bf16); results are rounded once to the input dtype.
fp32 inputs multiply in full fp32 ("ieee" input precision, not TF32), matching PyTorch's default fp32 matmul
(torch.backends.cuda.matmul.allow_tf32 = False); the interpreter computes fp32 dots exactly anyway.

Backward (derivation):
    z = x W^T + b,  y = g(z) + residual,  g = GELU or identity
    dz = dy * g'(z),   g'(z) = Phi(z) + z phi(z),  Phi(z) = 0.5 (1 + erf(z / sqrt 2)),
                                                   phi(z) = exp(-z^2 / 2) / sqrt(2 pi)
    dx = dz W,  dW = dz^T x,  db = sum_rows dz,  dresidual = dy (returned as is, no copy)
One elementwise pass (``_linear_bwd_dz_kernel``) computes dz = dy * g'(z) and, in the same pass, per-row-block
partial column sums of dz (stage 1 of db); stage 2 sums the few partial rows (no atomics, so bit-identical
reruns). Without activation dz is dy itself and the pass only produces the db partials (it is skipped when no
bias gradient is needed; fusing that case into the dW GEMM as row sums of its dz^T tiles would save one read
of dy at the price of a reduction in the GEMM's main loop). dx and dW are then two launches of the GEMM
kernel, each only when needed. Prologue-fusing dz into both GEMMs instead would read dy and z twice.

z is saved in the input dtype by the forward (only when a gradient will be needed). The alternative,
recomputing z = x W^T + b in the backward, saves R*M stored elements but costs one more GEMM (+50% backward
FLOPs); saving z is what eager PyTorch does too (F.gelu saves its input) and is the cheaper trade on a GPU.
GELU'(z) of the rounded z is what eager PyTorch computes as well.

Block sizes: triton.autotune on GPU over a handful of configs keyed on the GEMM sizes and operand layout; a
single small config under Triton's interpreter (TRITON_INTERPRET=1), where autotuning would only cost time.
Programs are ordered in groups along P (the "grouped ordering" of Triton's matmul tutorial) so that
consecutive programs reuse the same b tiles from L2.

Limits: activation None, "gelu", "gelu_tanh", "quick_gelu" or "silu"; inputs of one floating dtype (fp32/fp16/bf16; fp64 is not supported by
tl.dot on GPU). bf16 is not tested under the interpreter (its tl.dot is wrong there).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from vitkernels.backends import triton_interpreter
from vitkernels.triton import NAMESPACE, autotune, capability
from vitkernels.ops.linear import CONTRACT


# --------------------------------------------------------------------------------------------- kernels
# Operand prologues (what a tile becomes between its load and the dot), shared with triton/ln_linear.py and
# triton/ln_mlp.py, which never write the LayerNorm output or GELU(z) that a GEMM can recompute on load:
PRO_NONE = 0
PRO_LN = 1  # (t - mean) * rstd * gamma + beta: row statistics along the operand's rows, affine along its columns
PRO_GELU = 2  # GELU(t)
# Partial column sums (COLSUM epilogue) are written per slice of this many rows, whatever the tile height, so
# the partial buffer's size does not depend on the autotuned BLOCK_P (and no stale rows of a config tried by
# the autotuner survive: every config writes every row). GPU tiles are at least this tall.
_COLSUM_ROWS = 64
COLSUM_ROWS = tl.constexpr(_COLSUM_ROWS)


# Activation ids (the ACT constexpr of the kernels): what "GELU" below stands for in a launch.
ACT_IDS = {"gelu": 1, "gelu_tanh": 2, "quick_gelu": 3, "silu": 4}


@triton.jit
def _gelu(z, ACT: tl.constexpr = 1):
    """The activation ACT of an fp32 tile: exact-erf GELU (1), tanh-GELU (2), QuickGELU z sigmoid(1.702 z)
    (3), SiLU z sigmoid(z) (4)."""
    if ACT == 2:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)  # sqrt(2/pi) (z + 0.044715 z^3)
        return 0.5 * z * (1.0 + (2.0 * tl.sigmoid(2.0 * u) - 1.0))  # tanh(u) = 2 sigmoid(2u) - 1
    elif ACT == 3:
        return z * tl.sigmoid(1.702 * z)
    elif ACT == 4:
        return z * tl.sigmoid(z)
    else:
        return 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))  # 1/sqrt(2)


@triton.jit
def _gelu_grad(z, ACT: tl.constexpr = 1):
    """The derivative of activation ACT (see _gelu) of an fp32 tile; exact GELU: Phi(z) + z phi(z)."""
    if ACT == 2:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        t = 2.0 * tl.sigmoid(2.0 * u) - 1.0
        return 0.5 * (1.0 + t) + 0.5 * z * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 0.134145 * z * z)
    elif ACT == 3:
        sg = tl.sigmoid(1.702 * z)
        return sg + 1.702 * z * sg * (1.0 - sg)
    elif ACT == 4:
        sg = tl.sigmoid(z)
        return sg * (1.0 + z * (1.0 - sg))
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))  # 1/sqrt(2)
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327  # 1/sqrt(2 pi)
        return cdf + z * pdf


@triton.heuristics({"EVEN_S": lambda args: args["S"] % args["BLOCK_S"] == 0})
@triton.jit
def _linear_gemm_kernel(
    a_ptr,  # a: (P, S), any strides
    b_ptr,  # b: (S, Q), any strides
    out_ptr,  # out: (P, Q), written in out's dtype
    bias_ptr,  # bias: (Q,), read when HAS_BIAS
    res_ptr,  # residual: (P, Q), read when HAS_RES
    z_ptr,  # z: (P, Q), pre-activation: written when SAVE_Z, read (to multiply by GELU'(z)) when DGELU
    mean_ptr,  # (rows of the PRO_LN operand,) fp32 row means: a's rows (P) or b's rows (S)
    rstd_ptr,  # (same,) fp32 row 1/sqrt(var + eps)
    gamma_ptr,  # (columns of the PRO_LN operand,) LayerNorm weight: a's columns (S) or b's columns (Q)
    beta_ptr,  # (same,) LayerNorm bias
    partial_ptr,  # (cdiv(P, COLSUM_ROWS), Q) fp32: column sums of out per slice of rows, written when COLSUM
    P,  # rows of out
    Q,  # columns of out
    S,  # reduction length
    s_per_split,  # reduction rows per program along grid axis 1 (split-K; S when not split), a multiple of 64
    stride_split,  # out's stride between split-K partials (out is then (splits, P, Q) fp32); 0 when not split
    stride_ap, stride_as,  # strides of a
    stride_bs, stride_bq,  # strides of b
    stride_op, stride_oq,  # strides of out
    stride_rp, stride_rq,  # strides of residual
    stride_zp, stride_zq,  # strides of z
    A_PRO: tl.constexpr,  # prologue of a tiles: PRO_NONE | PRO_LN | PRO_GELU
    B_PRO: tl.constexpr,  # prologue of b tiles: PRO_NONE | PRO_LN | PRO_GELU
    DGELU: tl.constexpr,  # multiply the product by GELU'(z) first (dz = (dy W2) * GELU'(z))
    HAS_BIAS: tl.constexpr,  # add bias[q] to every row
    SAVE_Z: tl.constexpr,  # store the pre-activation (for the GELU backward)
    GELU: tl.constexpr,  # apply the activation after the bias
    HAS_RES: tl.constexpr,  # add residual after the activation
    ACT: tl.constexpr,  # which activation GELU, DGELU and PRO_GELU mean (ACT_IDS; 1: exact-erf GELU)
    COLSUM: tl.constexpr,  # write partial column sums of out (a bias gradient, stage 1)
    IEEE: tl.constexpr,  # fp32 operands: full-precision dot (no TF32)
    BLOCK_P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_S: tl.constexpr,
    GROUP_P: tl.constexpr,  # programs along P that share one band of b tiles (L2 reuse)
    EVEN_S: tl.constexpr,  # S % BLOCK_S == 0: no mask along S in the main loop (set by the heuristic)
):
    # Grouped ordering: walk GROUP_P row-blocks down a column of tiles before moving right, so that the
    # programs running together read the same b tiles (and few distinct a tiles) from L2.
    pid = tl.program_id(0)
    pid_split = tl.program_id(1)  # split-K: this program reduces rows [s_begin, s_end) of S
    num_p = tl.cdiv(P, BLOCK_P)
    num_q = tl.cdiv(Q, BLOCK_Q)
    group_size = GROUP_P * num_q
    first_p = (pid // group_size) * GROUP_P
    group_rows = tl.minimum(num_p - first_p, GROUP_P)
    pid_p = first_p + (pid % group_size) % group_rows
    pid_q = (pid % group_size) // group_rows

    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_s = tl.arange(0, BLOCK_S)
    mask_p = offs_p < P
    mask_q = offs_q < Q
    s_begin = pid_split * s_per_split
    s_end = tl.minimum(S, s_begin + s_per_split)
    # 64-bit row/column offsets: P * stride can exceed 2^31 at large batch sizes.
    a_ptrs = (a_ptr + offs_p[:, None].to(tl.int64) * stride_ap
              + (s_begin + offs_s[None, :]).to(tl.int64) * stride_as)
    b_ptrs = (b_ptr + (s_begin + offs_s[:, None]).to(tl.int64) * stride_bs
              + offs_q[None, :].to(tl.int64) * stride_bq)
    # The statistics or affine parameters that stay fixed along the loop are loaded once.
    if A_PRO == 1:
        mean_a = tl.load(mean_ptr + offs_p, mask=mask_p, other=0.0)
        rstd_a = tl.load(rstd_ptr + offs_p, mask=mask_p, other=0.0)
    if B_PRO == 1:
        gamma_b = tl.load(gamma_ptr + offs_q, mask=mask_q, other=0.0).to(tl.float32)
        beta_b = tl.load(beta_ptr + offs_q, mask=mask_q, other=0.0).to(tl.float32)

    acc = tl.zeros((BLOCK_P, BLOCK_Q), dtype=tl.float32)
    for s0 in range(s_begin, s_end, BLOCK_S):
        mask_s = (s0 + offs_s) < s_end
        if EVEN_S:
            a = tl.load(a_ptrs, mask=mask_p[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=mask_q[None, :], other=0.0)
        else:
            a = tl.load(a_ptrs, mask=mask_p[:, None] & mask_s[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=mask_s[:, None] & mask_q[None, :], other=0.0)
        # Prologues run in fp32 and round once to the other operand's dtype: the value a separate LayerNorm /
        # GELU kernel would have stored (an fp32 residual stream normalised for bf16 weights is rounded to
        # bf16, as autocast's LayerNorm -> Linear does). Masked (zero) elements must stay zero: a padded
        # column of a gets gamma = beta = 0; a padded row of b is zeroed explicitly (beta would make it
        # non-zero).
        if A_PRO == 1:
            gamma_a = tl.load(gamma_ptr + s0 + offs_s, mask=mask_s, other=0.0).to(tl.float32)
            beta_a = tl.load(beta_ptr + s0 + offs_s, mask=mask_s, other=0.0).to(tl.float32)
            a = ((a.to(tl.float32) - mean_a[:, None]) * rstd_a[:, None] * gamma_a[None, :]
                 + beta_a[None, :]).to(b_ptr.dtype.element_ty)
        if A_PRO == 2:
            a = _gelu(a.to(tl.float32), ACT).to(b_ptr.dtype.element_ty)
        if B_PRO == 1:
            mean_b = tl.load(mean_ptr + s0 + offs_s, mask=mask_s, other=0.0)
            rstd_b = tl.load(rstd_ptr + s0 + offs_s, mask=mask_s, other=0.0)
            b = (b.to(tl.float32) - mean_b[:, None]) * rstd_b[:, None] * gamma_b[None, :] + beta_b[None, :]
            b = tl.where(mask_s[:, None], b, 0.0).to(a_ptr.dtype.element_ty)
        if B_PRO == 2:
            b = _gelu(b.to(tl.float32), ACT).to(a_ptr.dtype.element_ty)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_S * stride_as
        b_ptrs += BLOCK_S * stride_bs

    # Epilogue in two column halves (Triton tutorial 09's epilogue subtiling): the residual / z / bias loads
    # and the GELU temporaries then live for half a tile at a time, which keeps the large Hopper tiles under
    # the 255-register cap (no spills; the audit in vitkernels/experiments/audit.py checks it).
    out_ptr += pid_split.to(tl.int64) * stride_split
    if BLOCK_Q >= 32:
        halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_P, 2, BLOCK_Q // 2)), (0, 2, 1)))
        offs_half = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q // 2)
        _epilogue(halves[0], offs_p, offs_half, pid_p, P, Q, out_ptr, bias_ptr, res_ptr, z_ptr, partial_ptr,
                  stride_op, stride_oq, stride_rp, stride_rq, stride_zp, stride_zq,
                  DGELU, HAS_BIAS, SAVE_Z, GELU, HAS_RES, COLSUM, BLOCK_P, ACT)
        _epilogue(halves[1], offs_p, offs_half + BLOCK_Q // 2, pid_p, P, Q, out_ptr, bias_ptr, res_ptr, z_ptr,
                  partial_ptr, stride_op, stride_oq, stride_rp, stride_rq, stride_zp, stride_zq,
                  DGELU, HAS_BIAS, SAVE_Z, GELU, HAS_RES, COLSUM, BLOCK_P, ACT)
    else:
        _epilogue(acc, offs_p, offs_q, pid_p, P, Q, out_ptr, bias_ptr, res_ptr, z_ptr, partial_ptr,
                  stride_op, stride_oq, stride_rp, stride_rq, stride_zp, stride_zq,
                  DGELU, HAS_BIAS, SAVE_Z, GELU, HAS_RES, COLSUM, BLOCK_P, ACT)


@triton.jit
def _epilogue(
    acc,  # (BLOCK_P, W) fp32: the product for rows offs_p and columns offs_q
    offs_p, offs_q,  # (BLOCK_P,), (W,) row and column indices of acc
    pid_p,  # the tile's index along P (its COLSUM partial rows)
    P, Q,  # out's shape
    out_ptr, bias_ptr, res_ptr, z_ptr, partial_ptr,  # as in _linear_gemm_kernel
    stride_op, stride_oq, stride_rp, stride_rq, stride_zp, stride_zq,
    DGELU: tl.constexpr, HAS_BIAS: tl.constexpr, SAVE_Z: tl.constexpr, GELU: tl.constexpr,
    HAS_RES: tl.constexpr, COLSUM: tl.constexpr, BLOCK_P: tl.constexpr, ACT: tl.constexpr,
):
    """All in fp32: [z = acc * GELU'(z_saved)]; z += bias; [store z]; y = GELU(z); y += residual; store y;
    [partial column sums of the stored y]."""
    mask_p = offs_p < P
    mask_q = offs_q < Q
    mask = mask_p[:, None] & mask_q[None, :]
    rows = offs_p[:, None].to(tl.int64)
    cols = offs_q[None, :].to(tl.int64)
    z = acc
    if DGELU:
        zs = tl.load(z_ptr + rows * stride_zp + cols * stride_zq, mask=mask, other=0.0).to(tl.float32)
        z = z * _gelu_grad(zs, ACT)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_q, mask=mask_q, other=0.0).to(tl.float32)
        z = z + bias[None, :]
    if SAVE_Z:
        tl.store(z_ptr + rows * stride_zp + cols * stride_zq, z.to(z_ptr.dtype.element_ty), mask=mask)
    if GELU:
        y = _gelu(z, ACT)
    else:
        y = z
    if HAS_RES:
        res = tl.load(res_ptr + rows * stride_rp + cols * stride_rq, mask=mask, other=0.0).to(tl.float32)
        y = y + res
    y = y.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows * stride_op + cols * stride_oq, y, mask=mask)
    if COLSUM:
        # Sums of the stored (rounded) values, as a separate reduction over out would see them.
        y = tl.where(mask, y.to(tl.float32), 0.0)
        if BLOCK_P > COLSUM_ROWS:
            n_slices = tl.cdiv(P, COLSUM_ROWS)
            parts = tl.sum(tl.reshape(y, (BLOCK_P // COLSUM_ROWS, COLSUM_ROWS, y.shape[1])), axis=1)
            prow = pid_p * (BLOCK_P // COLSUM_ROWS) + tl.arange(0, BLOCK_P // COLSUM_ROWS)
            tl.store(partial_ptr + prow[:, None].to(tl.int64) * Q + cols, parts,
                     mask=(prow < n_slices)[:, None] & mask_q[None, :])
        else:  # one slice per tile (BLOCK_P == COLSUM_ROWS, or a single tile along P under the interpreter)
            tl.store(partial_ptr + pid_p * Q + offs_q, tl.sum(y, axis=0), mask=mask_q)


@triton.jit
def _linear_bwd_dz_kernel(
    dy_ptr,  # dy: (R, M), any strides (stride 0 too)
    z_ptr,  # z: (R, M) pre-activation, read when GELU
    dz_ptr,  # dz: (R, M) contiguous, written when GELU
    partial_ptr,  # (num_row_groups, M) fp32: column sums of dz over this program's rows (db stage 1)
    R,  # rows
    M,  # columns (out features)
    stride_dyr, stride_dym,  # strides of dy
    stride_zr, stride_zm,  # strides of z
    ROWS_PER_PROG,  # rows handled by one program, a multiple of BLOCK_R
    GELU: tl.constexpr,  # dz = dy * GELU'(z) (else dz = dy, nothing written)
    PARTIAL: tl.constexpr,  # accumulate and store the column sums
    ACT: tl.constexpr,  # which activation (ACT_IDS)
    BLOCK_R: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_m = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    mask_m = offs_m < M
    cols = offs_m[None, :].to(tl.int64)
    # Column sums accumulate per (row-in-tile, column) and are reduced across rows once, after the loop.
    acc = tl.zeros((BLOCK_R, BLOCK_M), dtype=tl.float32)
    row0 = pid_r * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        offs_r = row0 + r + tl.arange(0, BLOCK_R)
        mask = (offs_r < R)[:, None] & mask_m[None, :]
        rows = offs_r[:, None].to(tl.int64)
        dz = tl.load(dy_ptr + rows * stride_dyr + cols * stride_dym, mask=mask, other=0.0).to(tl.float32)
        if GELU:
            z = tl.load(z_ptr + rows * stride_zr + cols * stride_zm, mask=mask, other=0.0).to(tl.float32)
            dz = dz * _gelu_grad(z, ACT)
            tl.store(dz_ptr + rows * M + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if PARTIAL:
            acc += dz
    if PARTIAL:
        tl.store(partial_ptr + pid_r * M + offs_m, tl.sum(acc, axis=0), mask=mask_m)


# --------------------------------------------------------------------------------------------- launchers
def _gpu_configs():
    # 16-bit: Hopper/Ampere-sized tensor-core tiles (Triton matmul tutorial), BLOCK_S >= 32. fp32: tl.dot with
    # input_precision="ieee" runs on the FMA units, where every thread holds its rows of a and columns of b
    # for the whole BLOCK_S: those tiles have the shortest reduction block tl.dot takes (BLOCK_S = 16).
    # _prune_configs keeps one family or the other by the operands' dtype.
    shapes = [  # (BLOCK_P, BLOCK_Q, BLOCK_S, num_stages, num_warps)
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 128, 32, 4, 4),
        (64, 256, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 64, 4, 4),
        (64, 64, 32, 4, 2),
        # fp32 (FMA): the tiles that compile spill-free for sm_80 and sm_90a with Triton 3.6 and 3.8
        (64, 128, 16, 3, 8),
        (64, 64, 16, 2, 4),
        (32, 64, 16, 3, 4),
    ]
    return [
        triton.Config({"BLOCK_P": p, "BLOCK_Q": q, "BLOCK_S": s, "GROUP_P": 8}, num_stages=st, num_warps=w)
        for p, q, s, st, w in shapes
    ]


# Autotuned on GPU; the key holds the GEMM sizes, the operand layout (a transposed operand may favour another
# tile) and the prologue / epilogue flags (they change register pressure, so the best tile); the autotuner adds
# the dtypes itself. The kernel only stores, so benchmarking runs are harmless. The first call per new key
# spends ~1 s benchmarking (warm up before CUDA-graph capture); the winner is kept on disk for later processes
# (vitkernels/triton/__init__.py: AUTOTUNE_CACHE).
def _smem_limit(device) -> int:
    """Shared memory one block may use on ``device`` (opt-in maximum); H100's 227 KB when unknown."""
    try:
        return int(torch.cuda.get_device_properties(device).shared_memory_per_block_optin)
    except Exception:  # noqa: BLE001 - no device (a static audit), or a property this torch lacks
        return 227 * 1024


def _prune_configs(configs, named_args, **kwargs):
    """The tiles that compile within the target's limits, without spills, for this launch's dtype, target,
    prologues and epilogue. The rules come from compiling every config for sm_90a and sm_80 (ptxas -v,
    ``python -m vitkernels audit``, Triton 3.6 and 3.8) at ViT-B/16, ViT-L/16 and ViT-H/14 shapes, with the
    subtiled epilogue:
      - dtype: 16-bit operands take the tensor-core tiles, fp32 the FMA tiles (BLOCK_S = 16, _gpu_configs);
      - shared memory: num_stages x (BLOCK_P + BLOCK_Q) x BLOCK_S x element size within the per-block limit
        (Triton's pipelining allocates exactly this for these kernels);
      - GELU'(z) or column sums in the epilogue (DGELU, COLSUM): at most 2,048 accumulator elements per warp
        (larger tiles spill 52-152 B per thread);
      - a GELU prologue on a 256-long side of the tile (fc2's z tiles, dW2's b tiles): spills 84-236 B;
      - GELU + saving z with 256-row tiles: spills 8 B.
    sm_80 (mma.sync: operand fragments live in registers next to the accumulator, where wgmma reads them
    from shared memory) adds:
      - at most 64 accumulator elements per thread (128 spill 8-916 B with a prologue or an epilogue beyond
        the bias, and 40 B even with a bias alone under Triton 3.6);
      - a GELU prologue on a: BLOCK_S = 32 (64 spills 612-8,544 B);
      - no 64 x 128 x 64 4-warp tile (spills 12 B in the dx GEMMs; 128 x 64 x 32 takes its place).
    fp32 (FMA), both targets: <= 32 accumulator elements per thread with a prologue or a GELU / DGELU
    epilogue, <= 64 otherwise.
    Each 16-bit variant keeps at least one 128 x 256 or 256 x 128 (or 128 x 128 x 64, 8-warp) tile on
    sm_90a. By shape: a tile more than twice as tall (wide) as a small P (Q) only computes padding, so it is
    not tried (the smallest tile stays when nothing else does)."""
    a = named_args.get("a_ptr")
    elem = a.element_size() if isinstance(a, torch.Tensor) else 2
    fma = elem == 4
    configs = [c for c in configs if (c.kwargs["BLOCK_S"] <= 16) == fma]
    P, Q = named_args.get("P"), named_args.get("Q")
    if isinstance(P, int) and isinstance(Q, int):
        fits = [c for c in configs if c.kwargs["BLOCK_P"] <= max(64, 2 * P) and c.kwargs["BLOCK_Q"] <= max(64, 2 * Q)]
        configs = fits or [min(configs, key=lambda c: c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"])]
    limit = _smem_limit(a.device) if isinstance(a, torch.Tensor) and a.is_cuda else 227 * 1024
    sm80 = capability(a) < 90
    prologue = bool(kwargs.get("A_PRO") or kwargs.get("B_PRO"))
    keep = []
    for c in configs:
        bp, bq, bs, warps = c.kwargs["BLOCK_P"], c.kwargs["BLOCK_Q"], c.kwargs["BLOCK_S"], c.num_warps
        per_thread = bp * bq // (32 * warps)  # fp32 accumulator elements per thread
        if c.num_stages * (bp + bq) * bs * elem > limit:
            continue
        if kwargs.get("COLSUM") and bp < _COLSUM_ROWS and not (isinstance(P, int) and P <= bp):
            continue  # the partial sums are per COLSUM_ROWS rows (or one tile holds every row)
        if fma:
            heavy = prologue or kwargs.get("GELU") or kwargs.get("DGELU")
            if per_thread > (32 if heavy else 64):
                continue
            keep.append(c)
            continue
        if (kwargs.get("DGELU") or kwargs.get("COLSUM")) and bp * bq > 2048 * warps:
            continue
        if (kwargs.get("A_PRO") == PRO_GELU and bp >= 256) or (kwargs.get("B_PRO") == PRO_GELU and bq >= 256):
            continue
        if kwargs.get("GELU") and kwargs.get("SAVE_Z") and bp >= 256:
            continue
        if sm80:
            if per_thread > 64:
                continue
            if kwargs.get("A_PRO") == PRO_GELU and bs > 32:
                continue
            if (bp, bq, bs, warps) == (64, 128, 64, 4):
                continue
        keep.append(c)
    return keep


_linear_gemm_kernel_tuned = autotune(
    _gpu_configs(),
    ["P", "Q", "S", "stride_as", "stride_bq", "A_PRO", "B_PRO", "DGELU", "GELU", "HAS_RES", "COLSUM", "ACT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_linear_gemm_kernel)


def interp_config(P, Q, S):
    """(block sizes, num_warps) of the one config used under the interpreter (no autotuning): 64-wide tiles,
    shrunk to the next power of two >= 16 for tiny dims, because the interpreter's cost is per program and per
    element of padded tile (its dots and erf run in numpy loops). Tiles stay larger than the tail of every
    test shape, so the masks and the grouped ordering are exercised. tests/test_gpu_configs.py replaces
    it with each GPU config in turn, so the tiles a GPU runs are checked numerically on the CPU too."""
    def fit(n):
        return min(64, max(16, triton.next_power_of_2(n)))

    return {"BLOCK_P": fit(P), "BLOCK_Q": fit(Q), "BLOCK_S": fit(S), "GROUP_P": 4}, 4


def colsum_buffer(P, Q, device):
    """The partial buffer of a COLSUM epilogue: (cdiv(P, COLSUM_ROWS), Q) fp32; ``.sum(0)`` finishes it."""
    return torch.empty((triton.cdiv(P, _COLSUM_ROWS), Q), device=device, dtype=torch.float32)


# Split-K for the weight-gradient GEMMs (dW = dz^T x: a small output, 768..4096 squared, reduced over all
# B * N token rows): without it a ViT-B/16 dW launches 18 to 216 tiles on 132 SMs, under one wave. The
# reduction is split into row ranges, each program writes an fp32 partial, and one torch.sum over the splits
# (a fixed order: no atomics, bit-identical reruns) finishes it.
_SPLIT_ALIGN = 64  # split boundaries are multiples of every BLOCK_S, so EVEN_S holds per split
_SPLIT_MIN_ROWS = 512  # each split reduces at least this many rows (GPU); fewer is not worth a partial
_SPLIT_MAX = 32
_LARGEST_TILE = max(c.kwargs["BLOCK_P"] * c.kwargs["BLOCK_Q"] for c in _gpu_configs())


def split_count(P, Q, S, device) -> int:
    """Splits of the reduction so that even the largest tile fills two waves: ceil(2 * SMs / tiles), tiles
    counted with the largest tile at one CTA per SM (smaller tiles come with proportionally more tiles and
    more CTAs per SM). Under the interpreter: 2 "SMs" and 64-row splits, so small test shapes split too."""
    if triton_interpreter():
        sms, min_rows, largest = 2, _SPLIT_ALIGN, 64 * 64
    else:
        sms, min_rows, largest = (torch.cuda.get_device_properties(device).multi_processor_count, _SPLIT_MIN_ROWS,
                                  _LARGEST_TILE)
    tiles = max(1, P * Q // largest)
    return max(1, min(triton.cdiv(2 * sms, tiles), S // min_rows, _SPLIT_MAX))


def _gemm(a, b, out, bias=None, residual=None, z=None, gelu=False, a_pro=PRO_NONE, b_pro=PRO_NONE, ln=None,
          dgelu_z=None, colsum=None, split_k=False, act=1):
    """out[P, Q] = epilogue(a'[P, S] @ b'[S, Q]); returns out.

    a, b: read through their strides; a' / b' are a / b after their prologue (``a_pro`` / ``b_pro``: PRO_NONE,
    PRO_LN with ``ln = (mean, rstd, gamma, beta)`` of that operand, or PRO_GELU), rounded to the other
    operand's dtype (so an fp32 operand with a prologue may meet a bf16 one; without prologues both operands
    have one dtype). Epilogue, in order: times GELU'(dgelu_z) (dgelu_z (P, Q)); + bias (Q,); z (P, Q) <- the
    pre-activation; GELU when ``gelu``; + residual (P, Q); store; column sums of the stored values into
    ``colsum`` (from ``colsum_buffer``). ``split_k``: reduce S in ``split_count`` ranges into fp32 partials
    and sum them (weight gradients; no epilogue then).
    """
    P, S = a.shape
    Q = b.shape[1]
    if P == 0 or Q == 0:
        if colsum is not None:
            colsum.zero_()
        return out
    if z is not None and dgelu_z is not None:
        raise ValueError("_gemm: z is either written (SAVE_Z) or read (DGELU), not both")
    splits = split_count(P, Q, S, a.device) if split_k else 1
    if splits > 1 and any(t is not None for t in (bias, residual, z, dgelu_z, colsum)) or splits > 1 and gelu:
        raise ValueError("_gemm: split-K runs without an epilogue")
    s_per_split = S if splits == 1 else triton.cdiv(triton.cdiv(S, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    splits = triton.cdiv(S, s_per_split) if splits > 1 else 1  # aligned ranges may need one split fewer
    target = out if splits == 1 else torch.empty((splits, P, Q), device=out.device, dtype=torch.float32)
    dummy = out
    res = residual if residual is not None else dummy
    zt = z if z is not None else (dgelu_z if dgelu_z is not None else dummy)
    mean, rstd, gamma, beta = ln if ln is not None else (dummy,) * 4
    args = (
        a, b, target, bias if bias is not None else dummy, res, zt, mean, rstd, gamma, beta,
        colsum if colsum is not None else dummy,
        P, Q, S, s_per_split, target.stride(0) if target.dim() == 3 else 0,
        a.stride(0), a.stride(1), b.stride(0), b.stride(1), target.stride(-2), target.stride(-1),
        res.stride(0), res.stride(1), zt.stride(0), zt.stride(1),
    )
    flags = dict(A_PRO=a_pro, B_PRO=b_pro, DGELU=dgelu_z is not None, HAS_BIAS=bias is not None,
                 SAVE_Z=z is not None, GELU=gelu, HAS_RES=residual is not None, COLSUM=colsum is not None, ACT=act,
                 IEEE=a.dtype == torch.float32 and b.dtype == torch.float32)
    if triton_interpreter():
        blocks, warps = interp_config(P, Q, S)
        assert colsum is None or blocks["BLOCK_P"] >= _COLSUM_ROWS or P <= blocks["BLOCK_P"]
        grid = (triton.cdiv(P, blocks["BLOCK_P"]) * triton.cdiv(Q, blocks["BLOCK_Q"]), splits)
        _linear_gemm_kernel[grid](*args, **flags, **blocks, num_warps=warps)
    else:
        def grid(meta):
            return (triton.cdiv(P, meta["BLOCK_P"]) * triton.cdiv(Q, meta["BLOCK_Q"]), splits)

        with torch.cuda.device(a.device):
            _linear_gemm_kernel_tuned[grid](*args, **flags)
    if target is not out:
        torch.sum(target, dim=0, out=out) if out.dtype == torch.float32 else out.copy_(target.sum(0))
    return out


def linear_fwd(x2d, weight, bias, residual, activation, save_z):
    """y (R, M) = act(x2d @ weight^T + bias) + residual, and z (R, M) when save_z (else an empty tensor).

    x2d (R, K) and weight (M, K), residual (R, M) or None: any strides. activation: "none" or a key of
    ACT_IDS.
    """
    R = x2d.shape[0]
    M = weight.shape[0]
    act = ACT_IDS.get(activation, 0)
    y = torch.empty((R, M), device=x2d.device, dtype=x2d.dtype)
    z = torch.empty((R, M) if act and save_z else (0,), device=x2d.device, dtype=x2d.dtype)
    _gemm(x2d, weight.t(), y, bias=bias, residual=residual, z=z if z.numel() else None, gelu=act != 0,
          act=max(act, 1))
    return y, z


def _dz_and_dbias(dy, z, gelu, need_db, act=1):
    """dz = dy * GELU'(z) (or dy itself) and db = column sums of dz (fp32 two-stage, or None)."""
    R, M = dy.shape
    if not gelu and not need_db:
        return dy, None
    if R == 0:
        db = torch.zeros((M,), device=dy.device, dtype=dy.dtype) if need_db else None
        return (torch.empty_like(dy) if gelu else dy), db
    dz = torch.empty((R, M), device=dy.device, dtype=dy.dtype) if gelu else dy
    if triton_interpreter():
        block_r, block_m, warps, target_programs = 64, 128, 4, 4
    else:
        block_r, block_m, warps = 32, 128, 4
        target_programs = 4 * torch.cuda.get_device_properties(dy.device).multi_processor_count
    num_m = triton.cdiv(M, block_m)
    groups = max(1, min(triton.cdiv(R, block_r), target_programs // num_m))
    rows_per_prog = triton.cdiv(triton.cdiv(R, groups), block_r) * block_r
    groups = triton.cdiv(R, rows_per_prog)
    partial = torch.empty((groups, M) if need_db else (0,), device=dy.device, dtype=torch.float32)
    zt = z if gelu else dy
    with torch.cuda.device(dy.device) if dy.is_cuda else contextlib.nullcontext():
        _linear_bwd_dz_kernel[(groups, num_m)](
            dy, zt, dz, partial if need_db else dy, R, M,
            dy.stride(0), dy.stride(1), zt.stride(0), zt.stride(1), rows_per_prog,
            GELU=gelu, PARTIAL=need_db, ACT=act, BLOCK_R=block_r, BLOCK_M=block_m, num_warps=warps,
        )
    # Stage 2: a deterministic sum over the few row groups.
    db = partial.sum(0).to(dy.dtype) if need_db else None
    return dz, db


def linear_bwd(dy, x2d, weight, z, activation, needs_dx, needs_dw, needs_db):
    """Gradients of linear_fwd: (dx (R, K), dW (M, K), db (M,)); distinct empty (0,) tensors for those not
    asked for (an op's outputs may not alias).

    dy (R, M), x2d (R, K), weight (M, K): any strides. z (R, M): the saved pre-activation when
    activation is not "none" (else unused).
    """
    act = ACT_IDS.get(activation, 0)
    if act and (z is None or z.shape != dy.shape):
        raise RuntimeError(f"vitkernels linear backward with {activation} needs the saved pre-activation z")
    dz, db = _dz_and_dbias(dy, z, act != 0, needs_db, max(act, 1))
    dx = dw = None
    if needs_dx:
        dx = _gemm(dz, weight, torch.empty(x2d.shape, device=x2d.device, dtype=x2d.dtype))
    if needs_dw:
        dw = _gemm(dz.t(), x2d, torch.empty(weight.shape, device=weight.device, dtype=weight.dtype), split_k=True)
    return tuple(t if t is not None else dy.new_empty((0,)) for t in (dx, dw, db))


# --------------------------------------------------------------------------------------------- registration
def why_not_supported(device: torch.device, dtype: torch.dtype, activation: str = "none") -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"triton linear runs fp32/fp16/bf16 (tl.dot), got {dtype}"
    return None


# The ops of vitkernels/ops/linear.py's contract, on these launchers.
linear = CONTRACT.register(NAMESPACE, fwd=linear_fwd, bwd=linear_bwd)
