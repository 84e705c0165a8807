"""The gated fc1 of a GLU MLP, h = act(x Wg^T + bg) * (x Wv^T + bv), forward and backward, in Triton.

What is fused: both GEMMs of the forward and the gate. Each program of ``_glu_linear_fwd_kernel`` owns one
(BLOCK_R, BLOCK_H) tile of g, v and h: per K step it loads the x tile once and the matching tiles of Wg and
Wv, and keeps two fp32 accumulators; the epilogue adds the biases, stores g and v (the pre-activations, which
the backward needs) and h = act(g) * v. So x is read once for both GEMMs (two nn.Linear read it twice), and
the (R, 2H) fc1 output, act(g) and the chunk views of timm's eager GluMlp never exist.

Activations (ACT constexpr): SiLU (SwiGLU), exact-erf GELU (GEGLU), tanh-GELU, i.e. the device functions
``_gelu`` / ``_gelu_grad`` of triton/linear.py with its ACT_IDS, and sigmoid (the original GLU, timm
GluMlp's default), added here as ``_SIGMOID``.

Backward (derivation; a = act):
    h = a(g) * v
    dg = dh * v * a'(g),   dv = dh * a(g)
    dx = dg Wg + dv Wv,   dWg = dg^T x,   dWv = dv^T x,   dbg = sum_rows dg,   dbv = sum_rows dv
One elementwise pass (``_glu_linear_bwd_kernel``) reads dh, g and v once and writes dg and dv (each only
when a gradient needs it) together with per-row-group partial column sums of both (stage 1 of the bias
gradients; stage 2 sums the few partial rows: no atomics, bit-identical reruns). The GEMMs are then the GEMM
kernel of triton/linear.py (``_gemm``, imported): dx in two launches, dv Wv into an fp32 buffer and dg Wg
with that buffer added in its epilogue (HAS_RES; the sum is rounded once); dWg and dWv one split-K launch
each. Known limit: dg and dv make one round trip through memory (R x 2H written, read by the GEMMs); fusing
their computation as a prologue of the dx GEMM would read dh, g and v twice (once per GEMM) instead.

Shapes: x (R, C), any strides; gate_weight, value_weight (H, C), any strides (the two halves of a packed
(2H, C) fc1 weight are views with the packed tensor's strides); biases (H,). Any R >= 0, C, H >= 1 (masked
tiles). g, v and h are written contiguous, in x's dtype; accumulation is fp32 for every dtype, fp32 operands
multiply in full fp32 ("ieee", not TF32), as triton/linear.py.

Block sizes: triton.autotune on GPU, the conventions of triton/linear.py (dtype-aware pruning: FMA tiles for
fp32, tensor-core tiles for fp16/bf16; shared memory within the per-block limit; accumulator elements per
thread bounded, counting both accumulators); one small config under the interpreter. Every config the
pruning keeps, and the backward's elementwise kernel, were compiled with the audit's stand-in GPU
(vitkernels/experiments/audit.py: StandInGPU + compile_job, Triton 3.8's ptxas) for sm_90a and sm_80 at a
ViT-B SwiGLU shape (R = 256 x 197, C = 768, H = 2048) in bf16 (all four activations), fp16 and fp32 (SiLU,
GELU): 76 compiles, no spills, at most 224 registers, wgmma in every 16-bit forward tile on sm_90a. Not yet
run on a GPU (autotuning, timings) nor under Triton 3.6.

Limits: activation "silu" | "gelu" | "gelu_tanh" | "sigmoid"; inputs of one floating dtype (fp32/fp16/bf16).
bf16 is not tested under the interpreter (its tl.dot is wrong there).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from vitkernels.backends import triton_interpreter
from vitkernels.ops.glu_linear import CONTRACT
from vitkernels.triton import NAMESPACE, autotune, capability
from vitkernels.triton.linear import ACT_IDS, _gelu, _gelu_grad, _gemm, _smem_limit, interp_config

# The gate's activation ids: linear.py's, plus sigmoid under an id linear.py does not use.
_SIGMOID = 16
GLU_ACT_IDS = {"silu": ACT_IDS["silu"], "gelu": ACT_IDS["gelu"], "gelu_tanh": ACT_IDS["gelu_tanh"],
               "sigmoid": _SIGMOID}
SIGMOID = tl.constexpr(_SIGMOID)


# --------------------------------------------------------------------------------------------- kernels
@triton.jit
def _act(z, ACT: tl.constexpr):
    """The gate activation ACT (GLU_ACT_IDS) of an fp32 tile."""
    if ACT == SIGMOID:
        return tl.sigmoid(z)
    else:
        return _gelu(z, ACT)


@triton.jit
def _act_grad(z, ACT: tl.constexpr):
    """The derivative of the gate activation ACT of an fp32 tile; sigmoid: s (1 - s)."""
    if ACT == SIGMOID:
        s = tl.sigmoid(z)
        return s * (1.0 - s)
    else:
        return _gelu_grad(z, ACT)


@triton.heuristics({"EVEN_K": lambda args: args["C"] % args["BLOCK_K"] == 0})
@triton.jit
def _glu_linear_fwd_kernel(
    x_ptr,  # x: (R, C), any strides
    wg_ptr,  # gate_weight Wg: (H, C), any strides
    wv_ptr,  # value_weight Wv: (H, C), any strides
    bg_ptr,  # gate_bias: (H,), read when HAS_GATE_BIAS
    bv_ptr,  # value_bias: (H,), read when HAS_VALUE_BIAS
    h_ptr,  # h = act(g) * v: (R, H) contiguous, written
    g_ptr,  # g = x Wg^T + bg: (R, H) contiguous, written
    v_ptr,  # v = x Wv^T + bv: (R, H) contiguous, written
    R,  # rows of x
    H,  # hidden features (rows of each weight)
    C,  # in features (the reduction length)
    stride_xr, stride_xc,  # strides of x
    stride_wgh, stride_wgc,  # strides of Wg
    stride_wvh, stride_wvc,  # strides of Wv
    HAS_GATE_BIAS: tl.constexpr,  # add bg to every row of g
    HAS_VALUE_BIAS: tl.constexpr,  # add bv to every row of v
    ACT: tl.constexpr,  # the gate activation (GLU_ACT_IDS)
    IEEE: tl.constexpr,  # fp32 operands: full-precision dot (no TF32)
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_R: tl.constexpr,  # programs along R that share one band of weight tiles (L2 reuse)
    EVEN_K: tl.constexpr,  # C % BLOCK_K == 0: no mask along C in the main loop (set by the heuristic)
):
    # Grouped ordering (triton/linear.py): GROUP_R row-blocks walk down one column of weight tiles together.
    pid = tl.program_id(0)
    num_r = tl.cdiv(R, BLOCK_R)
    num_h = tl.cdiv(H, BLOCK_H)
    group_size = GROUP_R * num_h
    first_r = (pid // group_size) * GROUP_R
    group_rows = tl.minimum(num_r - first_r, GROUP_R)
    pid_r = first_r + (pid % group_size) % group_rows
    pid_h = (pid % group_size) // group_rows

    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_k = tl.arange(0, BLOCK_K)
    mask_r = offs_r < R
    mask_h = offs_h < H
    # x tiles (BLOCK_R, BLOCK_K); weight tiles read transposed, (BLOCK_K, BLOCK_H) = W^T, through the strides.
    # 64-bit offsets: R * stride can exceed 2^31 at large batch sizes.
    x_ptrs = x_ptr + offs_r[:, None].to(tl.int64) * stride_xr + offs_k[None, :].to(tl.int64) * stride_xc
    wg_ptrs = wg_ptr + offs_k[:, None].to(tl.int64) * stride_wgc + offs_h[None, :].to(tl.int64) * stride_wgh
    wv_ptrs = wv_ptr + offs_k[:, None].to(tl.int64) * stride_wvc + offs_h[None, :].to(tl.int64) * stride_wvh

    acc_g = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        if EVEN_K:
            x = tl.load(x_ptrs, mask=mask_r[:, None], other=0.0)
            wg = tl.load(wg_ptrs, mask=mask_h[None, :], other=0.0)
            wv = tl.load(wv_ptrs, mask=mask_h[None, :], other=0.0)
        else:
            mask_k = (k0 + offs_k) < C
            x = tl.load(x_ptrs, mask=mask_r[:, None] & mask_k[None, :], other=0.0)
            wg = tl.load(wg_ptrs, mask=mask_k[:, None] & mask_h[None, :], other=0.0)
            wv = tl.load(wv_ptrs, mask=mask_k[:, None] & mask_h[None, :], other=0.0)
        if IEEE:
            acc_g = tl.dot(x, wg, acc_g, input_precision="ieee")
            acc_v = tl.dot(x, wv, acc_v, input_precision="ieee")
        else:
            acc_g = tl.dot(x, wg, acc_g)
            acc_v = tl.dot(x, wv, acc_v)
        x_ptrs += BLOCK_K * stride_xc
        wg_ptrs += BLOCK_K * stride_wgc
        wv_ptrs += BLOCK_K * stride_wvc

    # Epilogue in two column halves (as triton/linear.py's): the bias loads and the activation's temporaries
    # live for half a tile at a time next to the two accumulators.
    if BLOCK_H >= 32:
        g_halves = tl.split(tl.permute(tl.reshape(acc_g, (BLOCK_R, 2, BLOCK_H // 2)), (0, 2, 1)))
        v_halves = tl.split(tl.permute(tl.reshape(acc_v, (BLOCK_R, 2, BLOCK_H // 2)), (0, 2, 1)))
        offs_half = pid_h * BLOCK_H + tl.arange(0, BLOCK_H // 2)
        _glu_epilogue(g_halves[0], v_halves[0], offs_r, offs_half, R, H, bg_ptr, bv_ptr, h_ptr, g_ptr, v_ptr,
                      HAS_GATE_BIAS, HAS_VALUE_BIAS, ACT)
        _glu_epilogue(g_halves[1], v_halves[1], offs_r, offs_half + BLOCK_H // 2, R, H, bg_ptr, bv_ptr, h_ptr,
                      g_ptr, v_ptr, HAS_GATE_BIAS, HAS_VALUE_BIAS, ACT)
    else:
        _glu_epilogue(acc_g, acc_v, offs_r, offs_h, R, H, bg_ptr, bv_ptr, h_ptr, g_ptr, v_ptr,
                      HAS_GATE_BIAS, HAS_VALUE_BIAS, ACT)


@triton.jit
def _glu_epilogue(
    g,  # (BLOCK_R, W) fp32: x Wg^T for rows offs_r and columns offs_h
    v,  # (BLOCK_R, W) fp32: x Wv^T, same rows and columns
    offs_r, offs_h,  # (BLOCK_R,), (W,) row and column indices
    R, H,  # the outputs' shape
    bg_ptr, bv_ptr, h_ptr, g_ptr, v_ptr,  # as in _glu_linear_fwd_kernel
    HAS_GATE_BIAS: tl.constexpr, HAS_VALUE_BIAS: tl.constexpr, ACT: tl.constexpr,
):
    """All in fp32: g += bg; v += bv; store g, v; store h = act(g) * v (from the unrounded g and v)."""
    mask_h = offs_h < H
    mask = (offs_r < R)[:, None] & mask_h[None, :]
    idx = offs_r[:, None].to(tl.int64) * H + offs_h[None, :].to(tl.int64)
    if HAS_GATE_BIAS:
        g = g + tl.load(bg_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    if HAS_VALUE_BIAS:
        v = v + tl.load(bv_ptr + offs_h, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    tl.store(g_ptr + idx, g.to(g_ptr.dtype.element_ty), mask=mask)
    tl.store(v_ptr + idx, v.to(v_ptr.dtype.element_ty), mask=mask)
    tl.store(h_ptr + idx, (_act(g, ACT) * v).to(h_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _glu_linear_bwd_kernel(
    dh_ptr,  # dh: (R, H), any strides (stride 0 too)
    g_ptr,  # g: (R, H) the saved gate pre-activation, any strides
    v_ptr,  # v: (R, H) the saved value pre-activation, any strides
    dg_ptr,  # dg = dh * v * act'(g): (R, H) contiguous, written when WRITE_DG
    dv_ptr,  # dv = dh * act(g): (R, H) contiguous, written when WRITE_DV
    partial_g_ptr,  # (num_row_groups, H) fp32: column sums of dg over this program's rows, when PARTIAL_G
    partial_v_ptr,  # (num_row_groups, H) fp32: column sums of dv, when PARTIAL_V
    R,  # rows
    H,  # columns (hidden features)
    stride_dhr, stride_dhh,  # strides of dh
    stride_gr, stride_gh,  # strides of g
    stride_vr, stride_vh,  # strides of v
    ROWS_PER_PROG,  # rows handled by one program, a multiple of BLOCK_R
    WRITE_DG: tl.constexpr,  # dg is needed (dx, dWg or dbg)
    WRITE_DV: tl.constexpr,  # dv is needed (dx, dWv or dbv)
    PARTIAL_G: tl.constexpr,  # accumulate and store the column sums of dg (dbg stage 1)
    PARTIAL_V: tl.constexpr,  # the same for dv (dbv stage 1)
    ACT: tl.constexpr,  # the gate activation (GLU_ACT_IDS)
    BLOCK_R: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_h = tl.program_id(1)
    offs_h = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    mask_h = offs_h < H
    cols = offs_h[None, :].to(tl.int64)
    # Column sums accumulate per (row-in-tile, column) and are reduced across rows once, after the loop.
    acc_g = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    acc_v = tl.zeros((BLOCK_R, BLOCK_H), dtype=tl.float32)
    row0 = pid_r * ROWS_PER_PROG
    for r in range(0, ROWS_PER_PROG, BLOCK_R):
        offs_r = row0 + r + tl.arange(0, BLOCK_R)
        mask = (offs_r < R)[:, None] & mask_h[None, :]
        rows = offs_r[:, None].to(tl.int64)
        dh = tl.load(dh_ptr + rows * stride_dhr + cols * stride_dhh, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + rows * stride_gr + cols * stride_gh, mask=mask, other=0.0).to(tl.float32)
        # Rounded to the stored dtype first, as the GEMMs (and a separate elementwise kernel) would see them.
        if WRITE_DG:
            v = tl.load(v_ptr + rows * stride_vr + cols * stride_vh, mask=mask, other=0.0).to(tl.float32)
            dg = (dh * v * _act_grad(g, ACT)).to(dg_ptr.dtype.element_ty)
            tl.store(dg_ptr + rows * H + cols, dg, mask=mask)
            if PARTIAL_G:
                acc_g += dg.to(tl.float32)
        if WRITE_DV:
            dv = (dh * _act(g, ACT)).to(dv_ptr.dtype.element_ty)
            tl.store(dv_ptr + rows * H + cols, dv, mask=mask)
            if PARTIAL_V:
                acc_v += dv.to(tl.float32)
    if PARTIAL_G:
        tl.store(partial_g_ptr + pid_r * H + offs_h, tl.sum(acc_g, axis=0), mask=mask_h)
    if PARTIAL_V:
        tl.store(partial_v_ptr + pid_r * H + offs_h, tl.sum(acc_v, axis=0), mask=mask_h)


# --------------------------------------------------------------------------------------------- launchers
def _gpu_configs():
    # Two (BLOCK_R, BLOCK_H) fp32 accumulators per program: the register budget of triton/linear.py's tiles
    # holds tiles half their area here, so its 128 x 256 / 256 x 128 tiles are left out. 16-bit: tensor-core
    # tiles, BLOCK_K >= 32; fp32: the FMA tiles (BLOCK_K = 16, Triton 3.6 rejects tl.dot with K = 8).
    shapes = [  # (BLOCK_R, BLOCK_H, BLOCK_K, num_stages, num_warps)
        (128, 128, 64, 3, 8),
        (128, 128, 32, 4, 8),
        (128, 64, 64, 4, 4),
        (64, 128, 64, 4, 4),
        (128, 64, 32, 4, 8),
        (64, 128, 32, 4, 8),
        (64, 64, 32, 4, 4),
        # fp32 (FMA)
        (64, 64, 16, 2, 8),
        (32, 64, 16, 3, 4),
        (64, 32, 16, 3, 4),
    ]
    return [
        triton.Config({"BLOCK_R": r, "BLOCK_H": h, "BLOCK_K": k, "GROUP_R": 8}, num_stages=st, num_warps=w)
        for r, h, k, st, w in shapes
    ]


def _prune_configs(configs, named_args, **kwargs):
    """The forward tiles for this launch's dtype, target and shape (triton/linear.py's rules, with both
    accumulators counted):
      - dtype: 16-bit operands take the tensor-core tiles, fp32 the FMA tiles (BLOCK_K = 16);
      - shared memory: num_stages x (BLOCK_R + 2 BLOCK_H) x BLOCK_K x element size within the per-block limit
        (x tile plus two weight tiles per stage);
      - accumulator elements per thread (both accumulators): <= 128 with wgmma (sm_90a: operands from shared
        memory), <= 64 on sm_80 (mma.sync fragments live in registers), <= 32 for fp32 FMA tiles (linear.py's
        bound for a tile with an activation epilogue);
      - by shape: a tile more than twice as tall (wide) as a small R (H) only computes padding."""
    x = named_args.get("x_ptr")
    elem = x.element_size() if isinstance(x, torch.Tensor) else 2
    fma = elem == 4
    configs = [c for c in configs if (c.kwargs["BLOCK_K"] <= 16) == fma]
    R, H = named_args.get("R"), named_args.get("H")
    if isinstance(R, int) and isinstance(H, int):
        fits = [c for c in configs if c.kwargs["BLOCK_R"] <= max(64, 2 * R) and c.kwargs["BLOCK_H"] <= max(64, 2 * H)]
        configs = fits or [min(configs, key=lambda c: c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_H"])]
    limit = _smem_limit(x.device) if isinstance(x, torch.Tensor) and x.is_cuda else 227 * 1024
    bound = 32 if fma else (64 if capability(x) < 90 else 128)
    keep = []
    for c in configs:
        br, bh, bk, warps = c.kwargs["BLOCK_R"], c.kwargs["BLOCK_H"], c.kwargs["BLOCK_K"], c.num_warps
        if c.num_stages * (br + 2 * bh) * bk * elem > limit:
            continue
        if 2 * br * bh // (32 * warps) > bound:
            continue
        keep.append(c)
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_R"] * c.kwargs["BLOCK_H"])]


# Autotuned on GPU; the key holds the GEMM sizes, the operands' layout and the activation (the epilogue's
# register pressure); the autotuner adds the dtypes itself. The kernel only stores, so benchmarking is harmless.
_glu_linear_fwd_kernel_tuned = autotune(
    _gpu_configs(),
    ["R", "H", "C", "stride_xc", "stride_wgc", "stride_wvc", "HAS_GATE_BIAS", "ACT"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_glu_linear_fwd_kernel)


def glu_linear_fwd(x2d, gate_weight, gate_bias, value_weight, value_bias, activation):
    """(h, g, v), each (R, H) contiguous in x2d's dtype: g = x2d Wg^T + bg, v = x2d Wv^T + bv,
    h = act(g) * v. x2d (R, C), weights (H, C): any strides; activation: a key of GLU_ACT_IDS."""
    if activation not in GLU_ACT_IDS:
        raise ValueError(f"vitkernels glu_linear: unknown activation {activation!r}")
    R, C = x2d.shape
    H = gate_weight.shape[0]
    h, g, v = (torch.empty((R, H), device=x2d.device, dtype=x2d.dtype) for _ in range(3))
    if R == 0 or H == 0:
        return h, g, v
    args = (
        x2d, gate_weight, value_weight, gate_bias if gate_bias is not None else h,
        value_bias if value_bias is not None else h, h, g, v, R, H, C,
        x2d.stride(0), x2d.stride(1), gate_weight.stride(0), gate_weight.stride(1),
        value_weight.stride(0), value_weight.stride(1),
    )
    flags = dict(HAS_GATE_BIAS=gate_bias is not None, HAS_VALUE_BIAS=value_bias is not None,
                 ACT=GLU_ACT_IDS[activation], IEEE=x2d.dtype == torch.float32)
    if triton_interpreter():
        blocks, warps = interp_config(R, H, C)
        blocks = dict(BLOCK_R=blocks["BLOCK_P"], BLOCK_H=blocks["BLOCK_Q"], BLOCK_K=blocks["BLOCK_S"],
                      GROUP_R=blocks["GROUP_P"])
        grid = (triton.cdiv(R, blocks["BLOCK_R"]) * triton.cdiv(H, blocks["BLOCK_H"]),)
        _glu_linear_fwd_kernel[grid](*args, **flags, **blocks, num_warps=warps)
    else:
        def grid(meta):
            return (triton.cdiv(R, meta["BLOCK_R"]) * triton.cdiv(H, meta["BLOCK_H"]),)

        with torch.cuda.device(x2d.device):
            _glu_linear_fwd_kernel_tuned[grid](*args, **flags)
    return h, g, v


def _dg_dv_and_dbias(dh, g, v, act, need_dg, need_dv, need_dbg, need_dbv):
    """(dg, dv, dbg, dbv): dg = dh * v * act'(g) and dv = dh * act(g), (R, H) in dh's dtype, or None when not
    needed; the bias gradients as column sums (fp32 two-stage, in dh's dtype), or None."""
    R, H = dh.shape
    if R == 0:
        empty = torch.empty((0, H), device=dh.device, dtype=dh.dtype)
        zeros = torch.zeros((H,), device=dh.device, dtype=dh.dtype)
        return (empty if need_dg else None, empty.clone() if need_dv else None,
                zeros if need_dbg else None, zeros.clone() if need_dbv else None)
    if triton_interpreter():
        block_r, block_h, warps, target_programs = 64, 128, 4, 4
    else:
        # 8 warps: 16 elements per thread of each of the two fp32 column-sum accumulators and the loaded
        # tiles (4 warps compile to 210 registers on sm_90a, two CTAs per SM for a memory-bound pass).
        block_r, block_h, warps = 32, 128, 8
        target_programs = 4 * torch.cuda.get_device_properties(dh.device).multi_processor_count
    num_h = triton.cdiv(H, block_h)
    groups = max(1, min(triton.cdiv(R, block_r), target_programs // num_h))
    rows_per_prog = triton.cdiv(triton.cdiv(R, groups), block_r) * block_r
    groups = triton.cdiv(R, rows_per_prog)
    def new(wanted, shape, dtype):
        return torch.empty(shape if wanted else (0,), device=dh.device, dtype=dtype)

    dg, dv = new(need_dg, (R, H), dh.dtype), new(need_dv, (R, H), dh.dtype)
    pg, pv = new(need_dbg, (groups, H), torch.float32), new(need_dbv, (groups, H), torch.float32)
    with torch.cuda.device(dh.device) if dh.is_cuda else contextlib.nullcontext():
        _glu_linear_bwd_kernel[(groups, num_h)](
            dh, g, v, dg if need_dg else dh, dv if need_dv else dh, pg if need_dbg else dh, pv if need_dbv else dh,
            R, H, dh.stride(0), dh.stride(1), g.stride(0), g.stride(1), v.stride(0), v.stride(1), rows_per_prog,
            WRITE_DG=need_dg, WRITE_DV=need_dv, PARTIAL_G=need_dbg, PARTIAL_V=need_dbv, ACT=act,
            BLOCK_R=block_r, BLOCK_H=block_h, num_warps=warps,
        )
    # Stage 2: a deterministic sum over the few row groups.
    return (dg if need_dg else None, dv if need_dv else None,
            pg.sum(0).to(dh.dtype) if need_dbg else None, pv.sum(0).to(dh.dtype) if need_dbv else None)


def glu_linear_bwd(grad_h, x2d, gate_weight, value_weight, g, v, activation, output_mask):
    """Gradients of glu_linear_fwd: (dx (R, C), dWg (H, C), dbg (H,), dWv (H, C), dbv (H,)); distinct empty
    (0,) tensors for those not in ``output_mask`` (an op's outputs may not alias).

    grad_h, g, v (R, H), x2d (R, C), weights (H, C): any strides.
    """
    if activation not in GLU_ACT_IDS:
        raise ValueError(f"vitkernels glu_linear: unknown activation {activation!r}")
    needs_dx, needs_dgw, needs_dgb, needs_dvw, needs_dvb = output_mask
    need_dg = needs_dx or needs_dgw or needs_dgb
    need_dv = needs_dx or needs_dvw or needs_dvb
    dg, dv, dgb, dvb = _dg_dv_and_dbias(grad_h, g, v, GLU_ACT_IDS[activation], need_dg, need_dv, needs_dgb,
                                        needs_dvb)
    dx = dgw = dvw = None
    if needs_dx:
        # dx = dg Wg + dv Wv: dv Wv into fp32, then dg Wg with it added in the epilogue, rounded once.
        dx_v = _gemm(dv, value_weight, torch.empty(x2d.shape, device=x2d.device, dtype=torch.float32))
        dx = _gemm(dg, gate_weight, torch.empty(x2d.shape, device=x2d.device, dtype=x2d.dtype), residual=dx_v)
    if needs_dgw:
        dgw = _gemm(dg.t(), x2d, torch.empty(gate_weight.shape, device=x2d.device, dtype=gate_weight.dtype),
                    split_k=True)
    if needs_dvw:
        dvw = _gemm(dv.t(), x2d, torch.empty(value_weight.shape, device=x2d.device, dtype=value_weight.dtype),
                    split_k=True)
    return tuple(t if t is not None else grad_h.new_empty((0,)) for t in (dx, dgw, dgb, dvw, dvb))


# --------------------------------------------------------------------------------------------- registration
def why_not_supported(device: torch.device, dtype: torch.dtype, activation: str = "silu") -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"triton glu_linear runs fp32/fp16/bf16 (tl.dot), got {dtype}"
    if activation not in GLU_ACT_IDS:
        return f"triton glu_linear has no activation {activation!r}"
    return None


# The ops of vitkernels/ops/glu_linear.py's contract, on these launchers.
glu_linear = CONTRACT.register(NAMESPACE, fwd=glu_linear_fwd, bwd=glu_linear_bwd)
