"""Fused multi-head attention (FlashAttention-2 style), forward and backward, for every ViT shape.

    o = softmax(q k^T * scale + bias) v     q: (B, H, N, D), k, v: (B, H, M, D), o: (B, H, N, D)
                                            bias (optional): broadcastable to (B, H, N, M)

Forward: one program per (block of BLOCK_M query rows, batch x head). It streams over the keys in blocks of
BLOCK_N with the online softmax (running row max m and row sum l, rescaling the accumulator), in fp32, with
log2(e) folded into the scale so every exponential is an ``exp2``. No N x M matrix ever reaches memory. It
saves the log-sum-exp ``lse = log(sum_j exp(s_ij))`` of every score row (fp32, (B, H, N)) for the backward.

Backward (derivation in the comment block above the backward kernels), with ``delta = rowsum(dO * O)``
(fp32), either
- one launch, one program per (batch, head) (when B * H fills the GPU: ``fused_bwd_min_bh``): delta first,
  then for each key block, for each query block, the 5 GEMMs of FlashAttention-2 (S, dV, dP, dK, dQ), dQ
  accumulated in an fp32 buffer that only this program touches; or
- three launches (small batches): a preprocess kernel for delta, one kernel per key block accumulating dk, dv
  over all query blocks, one per query block accumulating dq over all key blocks (7 GEMMs: S and dP are
  computed by both).
Every output element has exactly one writer: deterministic, no atomics, reruns are bit-identical. The
gradients are written through their strides, so d(qkv) can be one buffer (triton/attention_qkv.py).

Supported range and limits:
- Any sequence lengths N (queries) and M (keys) >= 1: ViT has N = 197, 257, 577, 50, or any value with
  dynamic image sizes. Ragged blocks are masked (scores of out-of-range keys are set to -inf before the row
  max; out-of-range query rows are masked on load and store), so there is no N % BLOCK requirement.
- Head dims D <= 256; the D axis is padded to BLOCK_D = next_power_of_2(D) (>= 16) and masked, so 80 (ViT-H)
  and 96 run in 128-wide tiles. 32, 64, 80, 96 and 128 are the tested ones.
- Any strides for q, k, v and the output gradient (typically (B, H, N, D) views of the fused (B, N, 3, H, D)
  qkv buffer): all four strides of each are passed, nothing is copied. The output is written into a
  (B, N, H, D)-contiguous buffer and returned as its (B, H, N, D) transposed view, so the model's
  ``o.transpose(1, 2).reshape(B, N, C)`` before ``proj`` is free. dq, dk, dv come back in the same layout.
- fp16 / bf16 inputs: fp16 / bf16 tensor-core GEMMs with fp32 accumulation and fp32 softmax statistics; the
  probabilities P and dS are rounded to the input dtype before their GEMMs, as in FlashAttention-2.
- fp32 inputs: every GEMM runs with ``input_precision="ieee"`` (no TF32), so fp32 results are accurate to
  fp32 rounding (within 2x PyTorch's own fp32 error in the tests), at fp32 FMA speed, not tensor-core speed.
  That holds for CPU tensors (the interpreter). Compiled for a GPU, every fp32 tile spills registers on
  sm_80 and sm_90a (an FMA dot holds each thread's row of q and columns of k over the whole head dim: 28 B
  to 160 KB per thread in ``python -m vitkernels audit --dtypes fp32``), so no fp32 tile is offered there:
  fp32 CUDA tensors take a composed path with the same contract (fp32 cuBLAS GEMMs, scores materialised
  per batch chunk; ``_composed_fwd`` / ``_composed_bwd``). Under autocast attention runs in bf16 / fp16.
- An optional additive bias (BEiT's relative position bias (1, H, N, N), a timm attn_mask, a key-padding mask
  (B, 1, 1, M)), any strides: each kernel loads its (BLOCK_M, BLOCK_N) tile through the bias's strides, 0
  along the dims it broadcasts (an expanded view is never copied), adds it times log2(e) to the log2-domain
  scores, and the kernels stay unchanged without one (HAS_BIAS is a constexpr, in the autotune key). -inf
  entries mask keys; a row masked entirely gets out = 0, lse = +inf and no gradient (ops/attention.py).
  Its gradient dbias, when asked for, is dS written per (b, h) into an fp32 (B, H, N, M) buffer (4 B H N M
  bytes: 477 MB for BEiT-B/16 at batch 256, N = M = 197; none when the bias is full-size, whose gradient is
  written directly in its dtype), reduced over the broadcast dims by torch.sum: deterministic.
- Non-causal, no dropout: what ViT attention needs.

Block sizes: on a GPU a few configurations are autotuned per (N, M, D, dtype). N = 197 (ViT-B/16) matters
most: with 64-row query blocks it splits into 4 blocks (256 rows, 23% padding), the same padding as two
128-row blocks but twice the programs, which keeps all SMs busy at smaller batches; 32-key blocks pad the
keys only to 224 (12%). Under Triton's interpreter a single 64 x 64 configuration is used, no autotuning
(it is a test vehicle, not a speed path; larger blocks mean fewer interpreted steps).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitkernels.backends import triton_interpreter
from vitkernels.triton import NAMESPACE, autotune, capability
from vitkernels.ops.attention import CONTRACT, bias_strides, dbias_from_scores, empty_bnhd

__all__ = ["attention", "attention_fwd", "attention_bwd", "attention_bwd_into", "launch_grid"]

LOG2E = 1.4426950408889634  # log2(e): exp(x) = exp2(x * log2(e))
MAX_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attention_fwd_inner(
    acc,  # (BLOCK_M, BLOCK_D) fp32 running numerator sum_j p_ij v_j
    m_i,  # (BLOCK_M,) fp32 running row max of the scores, log2 domain
    l_i,  # (BLOCK_M,) fp32 running row sum of exp2(s - m_i)
    q,  # (BLOCK_M, BLOCK_D) the query tile, input dtype
    K_ptrs,  # (BLOCK_D, BLOCK_N) pointers to k^T for the key block starting at key `start`
    V_ptrs,  # (BLOCK_N, BLOCK_D) pointers to v for the same key block
    stride_kn,  # k stride along keys
    stride_vn,  # v stride along keys
    Bias_rows,  # (BLOCK_M,) pointers to key 0 of the bias rows of the query block (unused without a bias)
    stride_biask,  # bias stride along keys
    offs_n,  # (BLOCK_N,) 0..BLOCK_N-1
    mask_m,  # (BLOCK_M,) query rows < N_Q
    mask_d,  # (BLOCK_D,) head-dim lanes < D
    qk_scale,  # scale * log2(e)
    start,  # first key of the range
    end,  # one past the last key of the range
    N_K,  # number of keys M
    BLOCK_N: tl.constexpr,
    MASK_N: tl.constexpr,  # the range contains keys >= N_K (the ragged tail block)
    HAS_BIAS: tl.constexpr,  # add the bias tile to the scores
    INPUT_PRECISION: tl.constexpr,
):
    K_ptrs += start * stride_kn
    V_ptrs += start * stride_vn
    for start_n in range(start, end, BLOCK_N):
        if MASK_N:
            mask_n = (start_n + offs_n) < N_K
            k = tl.load(K_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
            v = tl.load(V_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        else:
            k = tl.load(K_ptrs, mask=mask_d[:, None], other=0.0)
            v = tl.load(V_ptrs, mask=mask_d[None, :], other=0.0)
        s = tl.dot(q, k, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if HAS_BIAS:
            # The tile's pointers are formed here from the (BLOCK_M,) row pointers: a (BLOCK_M, BLOCK_N) pointer
            # tile carried across iterations costs 64-bit registers per score and spills on sm_90a.
            bias_ptrs = Bias_rows[:, None] + (start_n + offs_n)[None, :] * stride_biask
            if MASK_N:
                bias = tl.load(bias_ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            else:
                bias = tl.load(bias_ptrs, mask=mask_m[:, None], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634  # the bias is in natural-log units: * log2(e) too
        if MASK_N:
            # Out-of-range keys must not enter the max or the sum: -inf before the max.
            s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # without a bias finite: every block has at least one valid key
        if HAS_BIAS:
            # A bias can mask every key of a block so far (m_new = -inf): subtract 0 then, so that p and alpha
            # come out 0 instead of exp2(-inf - -inf) = NaN. m_i itself stays the true max.
            m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_sub = m_new
        alpha = tl.exp2(m_i - m_sub)  # rescales the old statistics; 0 on the first block (m_i = -inf)
        p = tl.exp2(s - m_sub[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=INPUT_PRECISION)
        m_i = m_new
        K_ptrs += BLOCK_N * stride_kn
        V_ptrs += BLOCK_N * stride_vn
    return acc, m_i, l_i


@triton.jit
def _attention_fwd_kernel(
    Q,  # (B, H, N, D) queries, any strides
    K,  # (B, H, M, D) keys, any strides
    V,  # (B, H, M, D) values, any strides
    O,  # (B, H, N, D) output (a transposed view of a (B, N, H, D) buffer)
    LSE,  # (B, H, N) fp32 contiguous: natural-log log-sum-exp of each row of scale * q k^T + bias
    BIAS,  # (B, H, N, M) additive bias read through its strides (0 along broadcast dims); q when HAS_BIAS=False
    qk_scale,  # scale * log2(e)
    stride_qb, stride_qh, stride_qn, stride_qd,  # q strides (elements)
    stride_kb, stride_kh, stride_kn, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # v strides
    stride_ob, stride_oh, stride_on, stride_od,  # o strides
    stride_biasb, stride_biash, stride_biasq, stride_biask,  # bias strides (batch, head, query, key)
    H,  # number of heads
    N_Q,  # number of queries N
    N_K,  # number of keys M
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next_power_of_2(D), >= 16
    HAS_BIAS: tl.constexpr,  # a bias is given
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs, "tf32" (unused by fp16/bf16 dots) otherwise
    BLOCK_M: tl.constexpr,  # query rows per program
    BLOCK_N: tl.constexpr,  # keys per inner step
):
    pid_bh = tl.program_id(0)  # B * H on grid axis 0 (up to 2^31 - 1 programs)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM

    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    O += b * stride_ob + h * stride_oh
    q = tl.load(Q + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    K_ptrs = K + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd  # k^T tile, (BLOCK_D, BLOCK_N)
    V_ptrs = V + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd  # (BLOCK_N, BLOCK_D)
    Bias_rows = BIAS + b * stride_biasb + h * stride_biash + offs_m * stride_biasq  # (BLOCK_M,)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    # Full key blocks without the key mask, then the ragged tail (if any) with it.
    n_full = (N_K // BLOCK_N) * BLOCK_N
    acc, m_i, l_i = _attention_fwd_inner(acc, m_i, l_i, q, K_ptrs, V_ptrs, stride_kn, stride_vn, Bias_rows,
                                         stride_biask, offs_n, mask_m, mask_d, qk_scale, 0, n_full, N_K, BLOCK_N,
                                         False, HAS_BIAS, INPUT_PRECISION)
    if n_full < N_K:
        acc, m_i, l_i = _attention_fwd_inner(acc, m_i, l_i, q, K_ptrs, V_ptrs, stride_kn, stride_vn, Bias_rows,
                                             stride_biask, offs_n, mask_m, mask_d, qk_scale, n_full, N_K, N_K,
                                             BLOCK_N, True, HAS_BIAS, INPUT_PRECISION)

    # Out-of-range query rows saw q = 0 and bias 0 (scores 0 on valid keys), so l_i > 0 there: no 0/0.
    if HAS_BIAS:
        # A row whose every key the bias masked has l_i = 0 (and m_i = -inf): out 0 and lse +inf, so that the
        # backward's P = exp(s - lse) is 0 on the whole row (no gradient from it, no NaN).
        masked_row = l_i == 0.0
        l_i = tl.where(masked_row, 1.0, l_i)
    acc = acc / l_i[:, None]
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453  # back to natural log
    if HAS_BIAS:
        lse = tl.where(masked_row, float("inf"), lse)
    tl.store(LSE + (b * H + h) * N_Q + offs_m, lse, mask=mask_m)
    tl.store(O + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od, acc.to(O.dtype.element_ty),
             mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------------------
# Backward
#
# Per (batch, head), with S = scale * Q K^T + bias (N x M), P = softmax(S) row-wise, O = P V, and dO given:
#
#   dV = P^T dO                                   (O is linear in V)
#   dP = dO V^T                                   (O is linear in P)
#   dS_ij = P_ij (dP_ij - delta_i),  delta_i = sum_j P_ij dP_ij
#           (softmax Jacobian: dP_ij/dS_ik = P_ij (1[j=k] - P_ik))
#   delta_i = sum_j P_ij (dO_i . V_j) = dO_i . (sum_j P_ij V_j) = dO_i . O_i = rowsum(dO * O)_i
#   dQ = scale * dS K,   dK = scale * dS^T Q,   dbias = dS summed over the dims the bias broadcasts along
#
# P is never stored: each kernel recomputes a tile of it from the saved log-sum-exp,
#   P_ij = exp(S_ij - lse_i) = exp2(scale * log2(e) * q_i . k_j + log2(e) * bias_ij - log2(e) * lse_i),
# which is exactly the normalised probability (no second online pass); a row the bias masked entirely has
# lse = +inf, so P = 0 on it. dS is complete in each tile (delta is known), so the kernel that visits each
# (query block, key block) pair once (dK/dV, or the one-launch backward) stores it into an fp32
# (B, H, N, M) buffer when dbias is wanted; torch.sum reduces that over the broadcast dims (deterministic).
# delta is computed once by the preprocess kernel (it needs all of O's row, a (N,) vector per head). The
# key-block kernel holds k_j, v_j and loops over all query blocks accumulating dK_j, dV_j; the query-block
# kernel holds q_i, dO_i and loops over all key blocks accumulating dQ_i. Each output tile has one writer: no
# atomics, deterministic.
# Out-of-range query rows get P = 0 (masked after the exp2); out-of-range keys get P = 0 in the dq kernel
# and are never stored by the dk/dv kernel.
# ----------------------------------------------------------------------------------------------------------
@triton.jit
def _attention_bwd_preprocess_kernel(
    O,  # (B, H, N, D) forward output, any strides
    DO,  # (B, H, N, D) output gradient, any strides
    DELTA,  # (B, H, N) fp32 contiguous: rowsum(dO * O)
    stride_ob, stride_oh, stride_on, stride_od,  # o strides
    stride_dob, stride_doh, stride_don, stride_dod,  # do strides
    H,  # heads
    N_Q,  # queries N
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next_power_of_2(D)
    BLOCK_M: tl.constexpr,  # rows per program
):
    pid_bh = tl.program_id(0)  # B * H on grid axis 0 (up to 2^31 - 1 programs)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(DELTA + (b * H + h) * N_Q + offs_m, delta, mask=offs_m < N_Q)


@triton.jit
def _attention_bwd_dkdv_kernel(
    Q,  # (B, H, N, D) queries, any strides
    K,  # (B, H, M, D) keys, any strides
    V,  # (B, H, M, D) values, any strides
    DO,  # (B, H, N, D) output gradient, any strides
    LSE,  # (B, H, N) fp32 contiguous, natural log (from the forward)
    DELTA,  # (B, H, N) fp32 contiguous, rowsum(dO * O)
    DK,  # (B, H, M, D) key gradient (view of a (B, M, H, D) buffer)
    DV,  # (B, H, M, D) value gradient (same layout)
    BIAS,  # (B, H, N, M) additive bias through its strides (0 along broadcast dims); q when HAS_BIAS=False
    DBIAS,  # (B, H, N, M) out: dS, written when STORE_DBIAS (fp32, or bias's dtype when bias is full-size)
    qk_scale,  # scale * log2(e)
    scale,  # softmax scale
    stride_qb, stride_qh, stride_qn, stride_qd,  # q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # v strides
    stride_dob, stride_doh, stride_don, stride_dod,  # do strides
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,  # dk strides
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,  # dv strides
    stride_biasb, stride_biash, stride_biasq, stride_biask,  # bias strides (batch, head, query, key)
    stride_dbb, stride_dbh, stride_dbq, stride_dbk,  # dbias buffer strides
    H,  # heads
    N_Q,  # queries N
    N_K,  # keys M
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next_power_of_2(D)
    HAS_BIAS: tl.constexpr,  # a bias is given
    STORE_DBIAS: tl.constexpr,  # write dS to DBIAS
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # keys per program
):
    pid_bh = tl.program_id(0)  # B * H on grid axis 0 (up to 2^31 - 1 programs)
    pid_n = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < N_K
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]

    Q += b * stride_qb + h * stride_qh
    DO += b * stride_dob + h * stride_doh
    LSE += (b * H + h) * N_Q
    DELTA += (b * H + h) * N_Q
    BIAS += b * stride_biasb + h * stride_biash
    DBIAS += b * stride_dbb + h * stride_dbh
    k = tl.load(K + b * stride_kb + h * stride_kh + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=mask_nd, other=0.0)  # (BLOCK_N, BLOCK_D)
    v = tl.load(V + b * stride_vb + h * stride_vh + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                mask=mask_nd, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N_Q
        qT = tl.load(Q + rows[None, :] * stride_qn + offs_d[:, None] * stride_qd,
                     mask=mask_d[:, None] & mask_m[None, :], other=0.0)  # (BLOCK_D, BLOCK_M)
        do = tl.load(DO + rows[:, None] * stride_don + offs_d[None, :] * stride_dod,
                     mask=mask_m[:, None] & mask_d[None, :], other=0.0)  # (BLOCK_M, BLOCK_D)
        lse2 = tl.load(LSE + rows, mask=mask_m, other=0.0) * 1.4426950408889634  # log2 domain
        delta = tl.load(DELTA + rows, mask=mask_m, other=0.0)
        sT = tl.dot(k, qT, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M) = S^T, log2 domain
        mask_nm = mask_n[:, None] & mask_m[None, :]
        if HAS_BIAS:
            biasT = tl.load(BIAS + rows[None, :] * stride_biasq + offs_n[:, None] * stride_biask, mask=mask_nm,
                            other=0.0)
            sT += biasT.to(tl.float32) * 1.4426950408889634
        pT = tl.exp2(sT - lse2[None, :])
        pT = tl.where(mask_m[None, :], pT, 0.0)  # padded query rows contribute nothing
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)  # dV += P^T dO
        dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (dO V^T)^T
        dsT = pT * (dpT - delta[None, :])
        if STORE_DBIAS:
            tl.store(DBIAS + rows[None, :] * stride_dbq + offs_n[:, None] * stride_dbk,
                     dsT.to(DBIAS.dtype.element_ty), mask=mask_nm)
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=INPUT_PRECISION)  # dK += dS^T Q
    dk = dk * scale
    tl.store(DK + b * stride_dkb + h * stride_dkh + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + b * stride_dvb + h * stride_dvh + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _attention_bwd_dq_kernel(
    Q,  # (B, H, N, D) queries, any strides
    K,  # (B, H, M, D) keys, any strides
    V,  # (B, H, M, D) values, any strides
    DO,  # (B, H, N, D) output gradient, any strides
    LSE,  # (B, H, N) fp32 contiguous, natural log
    DELTA,  # (B, H, N) fp32 contiguous, rowsum(dO * O)
    DQ,  # (B, H, N, D) query gradient (view of a (B, N, H, D) buffer)
    BIAS,  # (B, H, N, M) additive bias through its strides (0 along broadcast dims); q when HAS_BIAS=False
    qk_scale,  # scale * log2(e)
    scale,  # softmax scale
    stride_qb, stride_qh, stride_qn, stride_qd,  # q strides
    stride_kb, stride_kh, stride_kn, stride_kd,  # k strides
    stride_vb, stride_vh, stride_vn, stride_vd,  # v strides
    stride_dob, stride_doh, stride_don, stride_dod,  # do strides
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,  # dq strides
    stride_biasb, stride_biash, stride_biasq, stride_biask,  # bias strides (batch, head, query, key)
    H,  # heads
    N_Q,  # queries N
    N_K,  # keys M
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next_power_of_2(D)
    HAS_BIAS: tl.constexpr,  # a bias is given
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32
    BLOCK_M: tl.constexpr,  # queries per program
    BLOCK_N: tl.constexpr,  # keys per inner step
):
    pid_bh = tl.program_id(0)  # B * H on grid axis 0 (up to 2^31 - 1 programs)
    pid_m = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]

    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    BIAS += b * stride_biasb + h * stride_biash
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=mask_md, other=0.0)  # (BLOCK_M, BLOCK_D)
    do = tl.load(DO + b * stride_dob + h * stride_doh + offs_m[:, None] * stride_don + offs_d[None, :] * stride_dod,
                 mask=mask_md, other=0.0)
    lse2 = tl.load(LSE + (b * H + h) * N_Q + offs_m, mask=mask_m, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + (b * H + h) * N_Q + offs_m, mask=mask_m, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N_K
        mask_dn = mask_d[:, None] & mask_n[None, :]
        kT = tl.load(K + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd, mask=mask_dn, other=0.0)
        vT = tl.load(V + cols[None, :] * stride_vn + offs_d[:, None] * stride_vd, mask=mask_dn, other=0.0)
        s = tl.dot(q, kT, input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_M, BLOCK_N), log2 domain
        if HAS_BIAS:
            bias = tl.load(BIAS + offs_m[:, None] * stride_biasq + cols[None, :] * stride_biask,
                           mask=mask_m[:, None] & mask_n[None, :], other=0.0)
            s += bias.to(tl.float32) * 1.4426950408889634
        p = tl.exp2(s - lse2[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)  # padded keys have probability 0
        dp = tl.dot(do, vT, input_precision=INPUT_PRECISION)  # dO V^T
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=INPUT_PRECISION)  # dQ += dS K
    dq = dq * scale
    tl.store(DQ + b * stride_dqb + h * stride_dqh + offs_m[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=mask_md)


@triton.jit
def _attention_bwd_fused_kernel(
    Q, K, V, DO,  # (B, H, N | M, D) any strides, as in the kernels above
    O,  # (B, H, N, D) forward output, any strides
    LSE,  # (B, H, N) fp32 contiguous, natural log
    DELTA,  # (B, H, N) fp32 contiguous, out: rowsum(dO * O), computed here first
    DQACC,  # (B, H, N, BLOCK_D) fp32 contiguous, zeroed: dQ / scale accumulated over the key blocks
    DQ, DK, DV,  # (B, H, N | M, D) gradients, any strides (e.g. the slices of one d(qkv) buffer)
    BIAS,  # (B, H, N, M) additive bias through its strides (0 along broadcast dims); q when HAS_BIAS=False
    DBIAS,  # (B, H, N, M) out: dS, written when STORE_DBIAS (fp32, or bias's dtype when bias is full-size)
    qk_scale,  # scale * log2(e)
    scale,  # softmax scale
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dqb, stride_dqh, stride_dqn, stride_dqd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_biasb, stride_biash, stride_biasq, stride_biask,  # bias strides (batch, head, query, key)
    stride_dbb, stride_dbh, stride_dbq, stride_dbk,  # dbias buffer strides
    H,  # heads
    N_Q,  # queries N
    N_K,  # keys M
    HEAD_DIM: tl.constexpr,  # D
    BLOCK_D: tl.constexpr,  # next_power_of_2(D)
    HAS_BIAS: tl.constexpr,  # a bias is given
    STORE_DBIAS: tl.constexpr,  # write dS to DBIAS
    INPUT_PRECISION: tl.constexpr,  # "ieee" for fp32
    BLOCK_M: tl.constexpr,  # queries per inner step
    BLOCK_N: tl.constexpr,  # keys per outer step
):
    """The whole backward of one (batch, head) in one program, 5 GEMMs per tile pair (FlashAttention-2's):
    for each key block j (k_j, v_j and the dK_j, dV_j accumulators held), for each query block i:
    S^T = k_j q_i^T, P^T, dV_j += P^T dO_i, dP^T = v_j dO_i^T, dS^T, dK_j += dS^T q_i, and dQ_i += dS k_j
    into an fp32 accumulator in memory. The program owns its (batch, head) outright, so that read-modify-write
    needs no atomics (deterministic); a barrier between key blocks orders it. A first pass computes
    delta = rowsum(dO * O) (no preprocess launch), a last one scales dQ and stores it in the output dtype. ViT
    sequences (N <= 577) keep the accumulator in L2."""
    pid_bh = tl.program_id(0)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    Q += b * stride_qb + h * stride_qh
    K += b * stride_kb + h * stride_kh
    V += b * stride_vb + h * stride_vh
    DO += b * stride_dob + h * stride_doh
    LSE += (b * H + h) * N_Q
    DELTA += (b * H + h) * N_Q
    DQACC += (b * H + h) * N_Q * BLOCK_D
    BIAS += b * stride_biasb + h * stride_biash
    DBIAS += b * stride_dbb + h * stride_dbh
    for start_m in range(0, N_Q, BLOCK_M):  # delta first: every key block needs all of it
        rows = start_m + offs_m
        mask_md = (rows < N_Q)[:, None] & mask_d[None, :]
        o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_on + offs_d[None, :] * stride_od,
                    mask=mask_md, other=0.0).to(tl.float32)
        do = tl.load(DO + rows[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask_md,
                     other=0.0).to(tl.float32)
        tl.store(DELTA + rows, tl.sum(o * do, 1), mask=rows < N_Q)
    tl.debug_barrier()  # delta stored before any thread reads it back
    for start_n in range(0, N_K, BLOCK_N):
        cols = start_n + offs_n
        mask_n = cols < N_K
        mask_nd = mask_n[:, None] & mask_d[None, :]
        k = tl.load(K + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=mask_nd, other=0.0)
        v = tl.load(V + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=mask_nd, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        for start_m in range(0, N_Q, BLOCK_M):
            rows = start_m + offs_m
            mask_m = rows < N_Q
            mask_md = mask_m[:, None] & mask_d[None, :]
            q = tl.load(Q + rows[:, None] * stride_qn + offs_d[None, :] * stride_qd, mask=mask_md, other=0.0)
            do = tl.load(DO + rows[:, None] * stride_don + offs_d[None, :] * stride_dod, mask=mask_md, other=0.0)
            lse2 = tl.load(LSE + rows, mask=mask_m, other=0.0) * 1.4426950408889634  # log2 domain
            delta = tl.load(DELTA + rows, mask=mask_m, other=0.0)
            sT = tl.dot(k, tl.trans(q), input_precision=INPUT_PRECISION) * qk_scale  # (BLOCK_N, BLOCK_M)
            mask_nm = mask_n[:, None] & mask_m[None, :]
            if HAS_BIAS:
                biasT = tl.load(BIAS + rows[None, :] * stride_biasq + cols[:, None] * stride_biask, mask=mask_nm,
                                other=0.0)
                sT += biasT.to(tl.float32) * 1.4426950408889634
            pT = tl.exp2(sT - lse2[None, :])
            pT = tl.where(mask_nm, pT, 0.0)  # padded rows / keys contribute nothing
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=INPUT_PRECISION)  # dV += P^T dO
            dpT = tl.dot(v, tl.trans(do), input_precision=INPUT_PRECISION)  # (dO V^T)^T
            dsT = pT * (dpT - delta[None, :])
            if STORE_DBIAS:
                tl.store(DBIAS + rows[None, :] * stride_dbq + cols[:, None] * stride_dbk,
                         dsT.to(DBIAS.dtype.element_ty), mask=mask_nm)
            dsT = dsT.to(q.dtype)
            dk = tl.dot(dsT, q, dk, input_precision=INPUT_PRECISION)  # dK += dS^T Q
            acc_ptrs = DQACC + rows[:, None] * BLOCK_D + offs_d[None, :]
            dq = tl.load(acc_ptrs, mask=mask_m[:, None], other=0.0)
            dq = tl.dot(tl.trans(dsT), k, dq, input_precision=INPUT_PRECISION)  # dQ += dS K
            tl.store(acc_ptrs, dq, mask=mask_m[:, None])
        tl.store(DK + b * stride_dkb + h * stride_dkh + cols[:, None] * stride_dkn + offs_d[None, :] * stride_dkd,
                 (dk * scale).to(DK.dtype.element_ty), mask=mask_nd)
        tl.store(DV + b * stride_dvb + h * stride_dvh + cols[:, None] * stride_dvn + offs_d[None, :] * stride_dvd,
                 dv.to(DV.dtype.element_ty), mask=mask_nd)
        tl.debug_barrier()  # this key block's dQ updates land before the next block reads them
    for start_m in range(0, N_Q, BLOCK_M):
        rows = start_m + offs_m
        mask_m = rows < N_Q
        dq = tl.load(DQACC + rows[:, None] * BLOCK_D + offs_d[None, :], mask=mask_m[:, None], other=0.0)
        tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqn + offs_d[None, :] * stride_dqd,
                 (dq * scale).to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------------------------------------
# Block sizes
# ----------------------------------------------------------------------------------------------------------
def _configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


# (BLOCK_M, BLOCK_N, num_warps, num_stages). 64-row query blocks are the default for N = 197 (see the module
# docstring); 128-row ones win at larger N and batch. Configurations that do not fit in shared memory (large
# blocks at D = 128) are dropped by the autotuner.
# The last, small configuration of each list fits in shared memory for every dtype and head dim (fp32 at
# D = 256 included), so the autotuner always has a candidate.
_FWD_CONFIGS = _configs([(64, 64, 4, 3), (64, 32, 4, 4), (128, 64, 8, 3), (128, 32, 4, 3), (128, 128, 8, 2),
                         (32, 32, 4, 1)])
# dk/dv: BLOCK_N keys held, BLOCK_M query rows streamed; dq: the other way round (FA2 / Triton tutorial).
_BWD_DKDV_CONFIGS = _configs([(32, 64, 4, 3), (32, 128, 4, 3), (64, 64, 4, 3), (64, 128, 8, 2), (32, 32, 4, 1)])
_BWD_DQ_CONFIGS = _configs([(64, 32, 4, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2), (32, 32, 4, 1)])
# The one-launch backward: (BLOCK_M queries, BLOCK_N keys) per step. It holds k, v, dK, dV and a dQ tile, so
# it takes 8 warps: compiled for sm_90a, every 4-warp config but 32 x 32 spills (60-580 B per thread), and
# with 8 warps everything compiles spill-free at D = 64; at BLOCK_D = 128 (D = 80, 96, 128) only tiles of
# at most 2,048 scores do (_prune_wide_heads).
_BWD_FUSED_CONFIGS = _configs([(64, 64, 8, 2), (64, 128, 8, 1), (32, 64, 8, 2), (64, 32, 8, 2)])


def _prune_wide_heads(configs, named_args, **kwargs):
    """At BLOCK_D > 64 keep the tiles of at most 2,048 scores (BLOCK_M x BLOCK_N): larger ones spill on sm_90a
    (the one-launch backward's 64 x 64 and 64 x 128, the dK/dV kernel's 32 x 128: 28-1,348 B per thread)."""
    if kwargs.get("BLOCK_D", 64) <= 64:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 2048]


def _prune_fused_bwd(configs, named_args, **kwargs):
    """_prune_wide_heads, and on sm_80 (mma.sync keeps the operand fragments of five GEMMs in registers) only
    32-query blocks: 64 x 64, 64 x 128 and 64 x 32 spill 8-128 B per thread at D = 64 and 128. With a bias at
    BLOCK_D = 128 also only 32-query blocks: 64 x 32 spills 84 B on sm_90a with an fp32 bias."""
    configs = _prune_wide_heads(configs, named_args, **kwargs)
    wide_biased = kwargs.get("HAS_BIAS", False) and kwargs.get("BLOCK_D", 64) > 64
    if capability(named_args.get("Q")) < 90 or wide_biased:
        configs = [c for c in configs if c.kwargs["BLOCK_M"] <= 32]
    return configs
_TUNE_KEY = ["N_Q", "N_K", "HEAD_DIM", "HAS_BIAS"]  # the autotuner adds the tensors' dtypes to the key
_TUNE_KEY_DBIAS = _TUNE_KEY + ["STORE_DBIAS"]  # the kernels that may store dS

def _prune_fwd(configs, named_args, **kwargs):
    """Drop the 32 x 32 fallback where the others fit (16-bit inputs, BLOCK_D <= 128): on sm_90a it is the one
    forward tile without wgmma (32 rows cannot feed a warpgroup's 64-row MMA); fp32 or wider heads keep it.
    At BLOCK_D = 128 (D = 80, 96, 128) keep the tiles whose output and score accumulators, BLOCK_M x
    (BLOCK_D + BLOCK_N) fp32, come to at most 96 elements per thread (80 on sm_80): 128 x 32 (4 warps) and
    128 x 128 spill 52-100 B on sm_90a, and on sm_80 also 64 x 64 and 128 x 64 (4-8 B).
    With a bias its (BLOCK_M, BLOCK_N) tile counts as BLOCK_N more columns, at every BLOCK_D <= 128: on sm_90a
    (fp16, N = 197) 128 x 32 (4 warps) and 128 x 128 spill 0.5-4.7 KB at D = 64, and 64 x 64 and 128 x 64
    0.02-1.7 KB at D = 80; the tiles this keeps compile spill-free. Where none passes, the smallest stays."""
    q = named_args.get("Q")
    block_d = kwargs.get("BLOCK_D", 64)
    if block_d > 128 or getattr(q, "dtype", torch.float16) == torch.float32:
        return configs
    configs = [c for c in configs if c.kwargs["BLOCK_M"] >= 64]
    has_bias = kwargs.get("HAS_BIAS", False)
    if block_d > 64 or has_bias:
        budget = 96 if capability(q) >= 90 else 80
        cols = (lambda c: block_d + 2 * c.kwargs["BLOCK_N"]) if has_bias else (lambda c: block_d + c.kwargs["BLOCK_N"])
        fitting = [c for c in configs if c.kwargs["BLOCK_M"] * cols(c) <= budget * 32 * c.num_warps]
        configs = fitting or sorted(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])[:1]
    return configs


_fwd_tuned = autotune(_FWD_CONFIGS, _TUNE_KEY, prune_configs_by={"early_config_prune": _prune_fwd})(
    _attention_fwd_kernel)
def _prune_dkdv(configs, named_args, **kwargs):
    """_prune_wide_heads, and with a bias on sm_80 only 32-query tiles of at most 2,048 scores (1,024 at
    BLOCK_D = 128): there 64 x 64, 64 x 128 and 32 x 128 spill 0.15-5.4 KB per thread at D = 64, and 32 x 64
    8-44 B at D = 80 (fp16, N = 197)."""
    configs = _prune_wide_heads(configs, named_args, **kwargs)
    if kwargs.get("HAS_BIAS", False) and capability(named_args.get("Q")) < 90:
        most = 2048 if kwargs.get("BLOCK_D", 64) <= 64 else 1024
        configs = [c for c in configs
                   if c.kwargs["BLOCK_M"] <= 32 and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= most]
    return configs


_bwd_dkdv_tuned = autotune(_BWD_DKDV_CONFIGS, _TUNE_KEY_DBIAS,
                           prune_configs_by={"early_config_prune": _prune_dkdv})(_attention_bwd_dkdv_kernel)
def _prune_dq(configs, named_args, **kwargs):
    """At BLOCK_D > 64, or with a bias, the dQ kernel keeps query blocks of at most 64 rows (128 x 32 and
    128 x 64 spill 172-736 B per thread on sm_80; with a bias 128 x 32 spills 12 B on sm_90a at D = 64). With
    a bias on sm_80 also key blocks of at most 32 (64 x 64 spills 12-204 B there)."""
    has_bias = kwargs.get("HAS_BIAS", False)
    if kwargs.get("BLOCK_D", 64) <= 64 and not has_bias:
        return configs
    configs = [c for c in configs if c.kwargs["BLOCK_M"] <= 64]
    if has_bias and capability(named_args.get("Q")) < 90:
        configs = [c for c in configs if c.kwargs["BLOCK_N"] <= 32]
    return configs


_bwd_dq_tuned = autotune(_BWD_DQ_CONFIGS, _TUNE_KEY, prune_configs_by={"early_config_prune": _prune_dq})(
    _attention_bwd_dq_kernel)
_bwd_fused_tuned = autotune(_BWD_FUSED_CONFIGS, _TUNE_KEY_DBIAS, reset_to_zero=["DQACC"],
                            prune_configs_by={"early_config_prune": _prune_fused_bwd})(_attention_bwd_fused_kernel)

# The one-launch backward runs one program per (batch, head): it is chosen when B * H fills the GPU (at least
# FUSED_BWD_PROGRAMS_PER_SM programs per SM); smaller batches keep the three-launch one (a program per block
# of keys, then per block of queries). Under the interpreter the one-launch backward runs unless a test
# asks for the other (fused_bwd_min_bh).
FUSED_BWD_PROGRAMS_PER_SM = 4


def fused_bwd_min_bh(device: torch.device) -> int:
    """The smallest B * H that takes the one-launch backward on ``device``."""
    if triton_interpreter():
        return 1
    return FUSED_BWD_PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count


def fused_bwd_compiles(q: torch.Tensor, block_d: int) -> bool:
    """Whether a one-launch backward tile compiles spill-free for q's device: not on sm_80 at BLOCK_D = 128,
    where its two 2,048-score tiles spill 56-128 B per thread (the three-launch form runs there)."""
    return block_d <= 64 or capability(q) >= 90

# Under the interpreter: one small configuration, no autotuning (num_warps/num_stages are ignored there).
_INTERPRETER_BLOCKS = {"BLOCK_M": 64, "BLOCK_N": 64}


def _kernel(tuned, plain):
    """(kernel, extra launch kwargs): the autotuned kernel on a GPU, the plain one with fixed blocks else."""
    if triton_interpreter():
        return plain, dict(_INTERPRETER_BLOCKS)
    return tuned, {}


def _block_d(D: int) -> int:
    if D > MAX_HEAD_DIM:
        raise ValueError(f"vitkernels triton attention supports head dims up to {MAX_HEAD_DIM}, got {D}")
    return max(16, triton.next_power_of_2(D))


def _precision(dtype: torch.dtype) -> str:
    # fp32: exact fp32 products (no TF32). fp16/bf16 dots ignore the setting.
    return "ieee" if dtype == torch.float32 else "tf32"


# ----------------------------------------------------------------------------------------------------------
# fp32 on a GPU: the same contract in fp32 PyTorch GEMMs (see the module docstring: every fp32 tile of the
# kernels above spills registers once compiled for sm_80 / sm_90a, so none is offered there). Scores are
# materialised per chunk of the batch so that they stay under 64 Mi elements (256 MB).
# ----------------------------------------------------------------------------------------------------------
GPU_DTYPES = (torch.float16, torch.bfloat16)  # what the kernels take on a GPU


def _composed(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype not in GPU_DTYPES


def _batch_chunks(q: torch.Tensor, M: int):
    """Slices of the batch whose (chunk, H, N, M) fp32 scores hold at most 64 Mi elements."""
    B, H, N, _ = q.shape
    per = max(1, (64 << 20) // max(1, H * N * M))
    return [slice(b, min(b + per, B)) for b in range(0, B, per)]


def _scores(q, k, bias, scale, c):
    """scale * q k^T + bias on batch chunk c: (chunk, H, N, M) fp32 (a bias of batch 1 is broadcast)."""
    s = torch.matmul(q[c], k[c].transpose(-1, -2)) * scale
    if bias is not None:
        s = s + (bias if bias.shape[0] == 1 else bias[c])
    return s


def _composed_fwd(q, k, v, bias, scale, o, lse):
    for c in _batch_chunks(q, k.shape[2]):
        s = _scores(q, k, bias, scale, c)  # (chunk, H, N, M)
        lse_c = torch.logsumexp(s, dim=-1)
        if bias is not None:  # a row the bias masked entirely: lse +inf, so P = exp(s - lse) = 0 (out 0)
            lse_c = lse_c.masked_fill(torch.isneginf(lse_c), float("inf"))
        lse[c] = lse_c
        o[c] = torch.matmul(torch.exp(s - lse[c, ..., None]), v[c])
    return o, lse


def _composed_bwd(grad_out, q, k, v, bias, o, lse, scale, dq, dk, dv, ds_all):
    for c in _batch_chunks(q, k.shape[2]):
        p = torch.exp(_scores(q, k, bias, scale, c) - lse[c, ..., None])  # (chunk, H, N, M)
        ds = p * (torch.matmul(grad_out[c], v[c].transpose(-1, -2))
                  - (grad_out[c] * o[c]).sum(-1, keepdim=True))  # P * (dO V^T - rowsum(dO * O))
        dq[c] = torch.matmul(ds, k[c]) * scale
        dk[c] = torch.matmul(ds.transpose(-1, -2), q[c]) * scale
        dv[c] = torch.matmul(p.transpose(-1, -2), grad_out[c])
        if ds_all is not None:
            ds_all[c] = ds
    return dq, dk, dv


# ----------------------------------------------------------------------------------------------------------
# Launchers (no autograd; tests and benchmarks call them directly)
# ----------------------------------------------------------------------------------------------------------
def _bias_args(bias: torch.Tensor | None, like: torch.Tensor):
    """(pointer, 4 strides) by which the kernels read the bias as (B, H, N, M): stride 0 along its size-1 dims;
    ``like`` and zeros without one (HAS_BIAS=False never dereferences it)."""
    return (like, (0, 0, 0, 0)) if bias is None else (bias, bias_strides(bias))


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None, scale: float):
    """q (B, H, N, D), k/v (B, H, M, D), any strides, bias None or (B | 1, H | 1, N | 1, M) any strides
    -> (o (B, H, N, D) view of (B, N, H, D), lse (B, H, N) fp32)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    BLOCK_D = _block_d(D)
    o = empty_bnhd(q, B, H, N, D)
    lse = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    if o.numel() == 0 or M == 0:
        return o, lse
    if _composed(q):
        return _composed_fwd(q, k, v, bias, scale, o, lse)
    kernel, blocks = _kernel(_fwd_tuned, _attention_fwd_kernel)
    bias_ptr, bias_stride = _bias_args(bias, q)

    def grid(meta):
        return launch_grid(B * H, N, meta["BLOCK_M"])

    kernel[grid](
        q, k, v, o, lse, bias_ptr, scale * LOG2E,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(), *bias_stride,
        H, N, M,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, HAS_BIAS=bias is not None, INPUT_PRECISION=_precision(q.dtype), **blocks,
    )
    return o, lse


def attention_bwd(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  bias: torch.Tensor | None, o: torch.Tensor, lse: torch.Tensor, scale: float, needs_dbias: bool):
    """Gradients (dq, dk, dv, dbias) of ``attention_fwd``; dq, dk, dv each a (B, H, *, D) view of a (B, *, H, D)
    buffer; dbias in bias's shape and dtype when ``needs_dbias``, else empty (0,)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    return attention_bwd_into(grad_out, q, k, v, bias, o, lse, scale, empty_bnhd(q, B, H, N, D),
                              empty_bnhd(k, B, H, M, D), empty_bnhd(v, B, H, M, D), needs_dbias)


def _dbias_buffer(bias: torch.Tensor | None, B: int, H: int, N: int, M: int, needs_dbias: bool):
    """Where the kernels write dS: None when dbias is not wanted; bias's own gradient (its dtype) when bias is
    full-size (B, H, N, M) (nothing to reduce); else an fp32 (B, H, N, M) buffer, reduced afterwards."""
    if bias is None or not needs_dbias:
        return None
    dtype = bias.dtype if tuple(bias.shape) == (B, H, N, M) else torch.float32
    return torch.empty((B, H, N, M), device=bias.device, dtype=dtype)


def attention_bwd_into(grad_out, q, k, v, bias, o, lse, scale, dq, dk, dv, needs_dbias=False):
    """``attention_bwd`` writing dq, dk, dv into given (B, H, *, D) tensors of any strides (e.g. the three views
    of one d(qkv) buffer, see triton/attention_qkv.py); returns (dq, dk, dv, dbias)."""
    B, H, N, D = q.shape
    M = k.shape[2]
    BLOCK_D = _block_d(D)
    grad_out = grad_out.to(q.dtype)
    no_dbias = q.new_empty((0,))
    if q.numel() == 0 or M == 0:
        dbias = torch.zeros_like(bias) if bias is not None and needs_dbias else no_dbias
        return dq.zero_(), dk.zero_(), dv.zero_(), dbias
    lse = lse.contiguous()
    ds = _dbias_buffer(bias, B, H, N, M, needs_dbias)

    def result():
        return dq, dk, dv, (no_dbias if ds is None else dbias_from_scores(ds, bias))

    if _composed(q):
        _composed_bwd(grad_out, q, k, v, bias, o, lse, scale, dq, dk, dv, ds)
        return result()
    delta = torch.empty((B, H, N), device=q.device, dtype=torch.float32)
    precision = _precision(q.dtype)
    strides = (*q.stride(), *k.stride(), *v.stride(), *grad_out.stride())
    bias_ptr, bias_stride = _bias_args(bias, q)
    ds_ptr, ds_stride = (q, (0, 0, 0, 0)) if ds is None else (ds, ds.stride())
    flags = dict(HAS_BIAS=bias is not None, STORE_DBIAS=ds is not None)

    if B * H >= fused_bwd_min_bh(q.device) and fused_bwd_compiles(q, BLOCK_D):  # one launch, 5 GEMMs per tile pair
        dq_acc = torch.zeros((B, H, N, BLOCK_D), device=q.device, dtype=torch.float32)
        kernel, blocks = _kernel(_bwd_fused_tuned, _attention_bwd_fused_kernel)
        kernel[(B * H,)](
            q, k, v, grad_out, o, lse, delta, dq_acc, dq, dk, dv, bias_ptr, ds_ptr, scale * LOG2E, scale,
            *strides, *o.stride(), *dq.stride(), *dk.stride(), *dv.stride(), *bias_stride, *ds_stride,
            H, N, M,
            HEAD_DIM=D, BLOCK_D=BLOCK_D, **flags, INPUT_PRECISION=precision, **blocks,
        )
        return result()

    PRE_BLOCK_M = 32 if BLOCK_D <= 128 else 16
    _attention_bwd_preprocess_kernel[launch_grid(B * H, N, PRE_BLOCK_M)](
        o, grad_out, delta, *o.stride(), *grad_out.stride(), H, N,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, BLOCK_M=PRE_BLOCK_M,
    )

    kernel, blocks = _kernel(_bwd_dkdv_tuned, _attention_bwd_dkdv_kernel)
    kernel[lambda meta: launch_grid(B * H, M, meta["BLOCK_N"])](
        q, k, v, grad_out, lse, delta, dk, dv, bias_ptr, ds_ptr, scale * LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(), *bias_stride,
        *ds_stride,
        H, N, M,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, **flags, INPUT_PRECISION=precision, **blocks,
    )
    kernel, blocks = _kernel(_bwd_dq_tuned, _attention_bwd_dq_kernel)
    kernel[lambda meta: launch_grid(B * H, N, meta["BLOCK_M"])](
        q, k, v, grad_out, lse, delta, dq, bias_ptr, scale * LOG2E, scale,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(), *bias_stride,
        H, N, M,
        HEAD_DIM=D, BLOCK_D=BLOCK_D, HAS_BIAS=bias is not None, INPUT_PRECISION=precision, **blocks,
    )
    return result()


# ----------------------------------------------------------------------------------------------------------
# Registration: the ops of vitkernels/ops/attention.py's contract, on these launchers
# ----------------------------------------------------------------------------------------------------------
# CUDA grid limits: axis 0 takes 2^31 - 1 blocks, axes 1 and 2 65,535. B * H goes on axis 0 (a ViT-B at
# batch 100,000 is 1.2 M), the blocks along the sequence on axis 1 (65,535 blocks of >= 16 rows: N up to 1 M).
MAX_GRID_X = 2**31 - 1
MAX_GRID_Y = 65535


def launch_grid(BH: int, L: int, block: int) -> tuple[int, int]:
    """The grid of every attention kernel: (B * H, blocks along a sequence of length L)."""
    return (BH, triton.cdiv(L, block))


def why_not_supported(device: torch.device, dtype: torch.dtype, D: int, BH: int, has_bias: bool = False
                      ) -> str | None:
    """The kernels' limits (None when these inputs run here); a bias adds none."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"triton attention runs fp32/fp16/bf16 (tl.dot), got {dtype}"
    if D > MAX_HEAD_DIM:
        return f"triton attention supports head dims up to {MAX_HEAD_DIM}, got {D}"
    if device.type == "cuda" and BH > MAX_GRID_X:
        return f"triton attention launches B * H = {BH} programs on grid axis 0, at most {MAX_GRID_X} on CUDA"
    return None


attention = CONTRACT.register(NAMESPACE, fwd=attention_fwd, bwd=attention_bwd)
