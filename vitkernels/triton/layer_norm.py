"""LayerNorm over the last dim, fused with the residual add of a pre-norm transformer block, in Triton.

Forward, per row of C values (fp32 statistics whatever the storage dtype):

    s    = x + residual                   (stored, it is the next residual stream; skipped without residual)
    mean = sum(s) / C,  var = sum((s - mean)^2) / C,  rstd = 1 / sqrt(var + eps)
    y    = (s - mean) * rstd * weight + bias

Backward: dx (which is also d residual), dweight and dbias, the weight/bias gradients reduced in two stages
(per-program fp32 partial rows, then one small sum) so no atomics are used and reruns are bit-identical.

Supported: fp32 / fp16 / bf16; any leading shape (flattened to rows); widths C up to ``MAX_C`` (one row is
held in registers: BLOCK_C = next_power_of_2(C), masked; past C ~ 8192 the backward spills registers, correct
but slower); weight and bias may each be None. Non-contiguous x / residual are copied once on entry
(see ``_rows``).

GPU design (ViT widths 192..1280): the forward is one pass over HBM, several rows per program for small C so
that each program moves ~4K elements; the backward runs a few programs per SM, each looping over a contiguous
slice of rows, so the weight/bias partial buffer stays small.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitkernels.backends import triton_interpreter
from vitkernels.triton import NAMESPACE, autotune
from vitkernels.ops.layer_norm import CONTRACT

__all__ = ["layer_norm", "layer_norm_fwd", "layer_norm_bwd", "layer_norm_stats", "why_not_supported"]

# One row lives in registers; past this the kernel would spill (and nothing in a ViT is wider).
MAX_C = 16384

_INTERPRET = triton_interpreter()


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _layer_norm_fwd_kernel(
    X,  # (n_rows, C) input rows, last dim contiguous
    R,  # (n_rows, C) residual rows, or None
    W,  # (C,) weight, or None
    Bias,  # (C,) bias, or None
    Y,  # (n_rows, C) out: normalized rows, contiguous
    S,  # (n_rows, C) out: x + residual, contiguous (unused without residual)
    Mean,  # (n_rows,) out: fp32 row means
    Rstd,  # (n_rows,) out: fp32 row 1/sqrt(var + eps)
    stride_x,  # row stride of X (elements)
    stride_r,  # row stride of R
    n_rows,  # number of rows
    C,  # row width
    eps,  # variance epsilon
    HAS_RES: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    WRITE_Y: tl.constexpr,  # False: statistics only (a GEMM prologue normalises, see triton/ln_linear.py)
    BLOCK_C: tl.constexpr,  # next_power_of_2(C)
    ROWS: tl.constexpr,  # rows per program (several for small C so each program moves enough bytes)
):
    pid = tl.program_id(0)
    rows = pid * ROWS + tl.arange(0, ROWS)  # (ROWS,)
    cols = tl.arange(0, BLOCK_C)  # (BLOCK_C,)
    row_mask = rows < n_rows
    col_mask = cols < C
    mask = row_mask[:, None] & col_mask[None, :]
    rows64 = rows.to(tl.int64)  # n_rows * C can pass 2^31 (B=256, N=197, C=1280 is 64.5M, B=1024 is not)

    s = tl.load(X + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        s += tl.load(R + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(S + rows64[:, None] * C + cols[None, :], s.to(S.dtype.element_ty), mask=mask)
    # s is rounded to the storage dtype on store; y is computed from the same rounded value so that the
    # backward, which recomputes x_hat from the stored s, differentiates exactly the function evaluated here.
    if HAS_RES:
        s = s.to(S.dtype.element_ty).to(tl.float32)
    mean = tl.sum(s, axis=1) / C  # (ROWS,)
    diff = tl.where(mask, s - mean[:, None], 0.0)
    var = tl.sum(diff * diff, axis=1) / C  # two-pass variance: no cancellation for rows with a large mean
    rstd = 1.0 / tl.sqrt(var + eps)
    if WRITE_Y:
        y = diff * rstd[:, None]
        if HAS_W:
            y *= tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_B:
            y += tl.load(Bias + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + rows64[:, None] * C + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + rows, mean, mask=row_mask)
    tl.store(Rstd + rows, rstd, mask=row_mask)


# Backward derivation (per row; C = width, x_hat = (s - mean) * rstd, w = weight or 1):
#
#   y_j = w_j x_hat_j + b_j        =>  dbias_j = sum_rows dy_j,  dweight_j = sum_rows dy_j x_hat_j
#   g_j = dy_j w_j                 (gradient w.r.t. x_hat)
#   d x_hat_j / d s_i = rstd (delta_ij - 1/C - x_hat_i x_hat_j / C)   (mean and rstd both depend on s)
#   =>  ds_i = rstd * (g_i - mean_j(g_j) - x_hat_i * mean_j(g_j x_hat_j))
#
# s = x + residual, so dx = dresidual = ds + ds_out, where ds_out is the gradient arriving at the returned s
# (the residual stream continues past the norm). Masked columns load as 0 so they contribute nothing to the
# two row means; both means divide by the true C.
#
# Weight/bias gradients: program p owns a contiguous slice of rows, accumulates dy * x_hat and dy in fp32
# registers and writes one partial row to DW[p] / DB[p]; the launcher sums the (programs, C) partials.


@triton.jit
def _layer_norm_bwd_kernel(
    S,  # (n_rows, C) the normalized input s (x when there was no residual), last dim contiguous
    W,  # (C,) weight, or None
    DY,  # (n_rows, C) gradient of y, last dim contiguous
    DS,  # (n_rows, C) gradient of the returned s, or None
    DX,  # (n_rows, C) out: gradient of x (= of residual), contiguous
    DW,  # (programs, C) out: fp32 partial sums of dy * x_hat, or None
    DB,  # (programs, C) out: fp32 partial sums of dy, or None
    Mean,  # (n_rows,) fp32 saved means
    Rstd,  # (n_rows,) fp32 saved rstd
    stride_s,  # row stride of S
    stride_dy,  # row stride of DY
    stride_ds,  # row stride of DS
    n_rows,  # number of rows
    C,  # row width
    rows_per_program,  # rows handled by one program (a multiple of ROWS)
    HAS_W: tl.constexpr,
    HAS_DS: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_C: tl.constexpr,  # next_power_of_2(C)
    ROWS: tl.constexpr,  # rows processed together per loop step
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_C)
    col_mask = cols < C
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    db_acc = tl.zeros((ROWS, BLOCK_C), dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    for r0 in range(row_start, row_end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        row_mask = rows < row_end
        mask = row_mask[:, None] & col_mask[None, :]
        rows64 = rows.to(tl.int64)
        s = tl.load(S + rows64[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + rows, mask=row_mask, other=0.0)
        rstd = tl.load(Rstd + rows, mask=row_mask, other=0.0)
        x_hat = tl.where(mask, (s - mean[:, None]) * rstd[:, None], 0.0)
        if COMPUTE_DW:
            dw_acc += dy * x_hat
        if COMPUTE_DB:
            db_acc += dy
        if HAS_W:
            g = dy * w[None, :]
        else:
            g = dy
        c1 = tl.sum(g * x_hat, axis=1) / C
        c2 = tl.sum(g, axis=1) / C
        dx = (g - (x_hat * c1[:, None] + c2[:, None])) * rstd[:, None]
        if HAS_DS:
            dx += tl.load(DS + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(DX + rows64[:, None] * C + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
    if COMPUTE_DW:
        tl.store(DW + pid * C + cols, tl.sum(dw_acc, axis=0), mask=col_mask)
    if COMPUTE_DB:
        tl.store(DB + pid * C + cols, tl.sum(db_acc, axis=0), mask=col_mask)


# ----------------------------------------------------------------------------------------------------------
# Block sizes. GPU: the rows-per-program tile is fixed per width (it sets the grid and the size of the partial
# buffers) and the warp count is autotuned per width (key C, plus the dtypes the autotuner adds itself).
# Interpreter: one config with 64 rows per program: its cost is a fixed overhead per program and per op.
# ----------------------------------------------------------------------------------------------------------


def _fwd_rows(block_c: int) -> int:
    if _INTERPRET:
        return 64
    # ~4K elements per program: C=192/384 take 16/8 rows, C=768/1024 take 4, C>=4096 one row.
    return max(1, min(16, 4096 // block_c))


def _bwd_rows(block_c: int) -> int:
    if _INTERPRET:
        return 64
    # Backward holds s, dy, dx and two accumulators per element: keep the tile at ~2K elements.
    return max(1, min(16, 2048 // block_c))


def _warps(block_c: int, rows: int) -> list[int]:
    elems = block_c * rows
    if elems <= 1024:
        return [1, 2, 4]
    if elems <= 4096:
        return [4, 8]
    return [8, 16]


_TUNED: dict[tuple, object] = {}


def _kernel(which: str, block_c: int, rows: int):
    """The (autotuned on GPU) launcher of kernel ``which`` for one BLOCK_C / ROWS pair."""
    key = (which, block_c, rows)
    if key not in _TUNED:
        fn = _layer_norm_fwd_kernel if which == "fwd" else _layer_norm_bwd_kernel
        if _INTERPRET:
            configs = [triton.Config({}, num_warps=1)]
        else:
            configs = [triton.Config({}, num_warps=w) for w in _warps(block_c, rows)]
        _TUNED[key] = autotune(configs, ["C"])(fn)
    return _TUNED[key]


def _bwd_programs(n_rows: int, rows: int, device: torch.device) -> int:
    """How many programs the backward uses (= rows of the weight/bias partial buffers)."""
    if _INTERPRET or device.type != "cuda":
        target = 2
    else:
        # Several resident programs per SM keep enough loads in flight; the partial buffer stays small
        # (8 x 132 SMs x C=768 fp32 = 3.2 MB each for dw and db, against ~310 MB of activations moved at
        # ViT-B/16, B=256, with a residual).
        target = 8 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(triton.cdiv(n_rows, rows), target))


def _rows(t: torch.Tensor, C: int) -> torch.Tensor:
    """(..., C) -> (n_rows, C) with a unit column stride. A view when the strides allow it; otherwise this is
    the one deliberate copy (e.g. a transposed activation), cheaper than strided loads in every kernel."""
    if t.stride(-1) != 1:
        t = t.contiguous()
    t = t.reshape(-1, C)
    return t if t.stride(-1) == 1 else t.contiguous()


def _unit_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """weight / bias (C,): the kernels index them with unit stride (a no-op for every nn.LayerNorm)."""
    return t.contiguous() if t is not None else None


# ----------------------------------------------------------------------------------------------------------
# Launchers (no autograd: tests and benchmarks call these directly)
# ----------------------------------------------------------------------------------------------------------


def layer_norm_fwd(x, weight, bias, eps, residual):
    """x, residual: (..., C); weight, bias: (C,) or None.

    Returns (y, s, mean, rstd): y (..., C) in x's dtype; s = x + residual (..., C), or an empty tensor
    without residual (s is then x itself, which a custom op may not return); mean, rstd fp32 (n_rows,).
    """
    C = x.shape[-1]
    if C > MAX_C:
        raise ValueError(f"vitkernels triton layer_norm supports widths up to {MAX_C}, got {C}")
    x2 = _rows(x, C)
    n_rows = x2.shape[0]
    r2 = _rows(residual, C) if residual is not None else None
    weight, bias = _unit_stride(weight), _unit_stride(bias)
    y = torch.empty((n_rows, C), device=x.device, dtype=x.dtype)
    s = torch.empty((n_rows, C) if residual is not None else (0,), device=x.device, dtype=x.dtype)
    mean = torch.empty((n_rows,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((n_rows,), device=x.device, dtype=torch.float32)
    if n_rows > 0:
        block_c = triton.next_power_of_2(C)
        rows = _fwd_rows(block_c)
        _kernel("fwd", block_c, rows)[(triton.cdiv(n_rows, rows),)](
            x2, r2, weight, bias, y, s, mean, rstd,
            x2.stride(0), r2.stride(0) if r2 is not None else 0,
            n_rows, C, eps,
            HAS_RES=residual is not None, HAS_W=weight is not None, HAS_B=bias is not None, WRITE_Y=True,
            BLOCK_C=block_c, ROWS=rows,
        )
    y = y.view(x.shape)
    return y, (s.view(x.shape) if residual is not None else s), mean, rstd


def layer_norm_stats(x2d, eps):
    """x2d (R, C), unit column stride -> (mean, rstd), fp32 (R,) each: the forward's statistics, no output
    written (one read of x2d). The GEMMs of triton/ln_linear.py and triton/ln_mlp.py normalise from them."""
    R, C = x2d.shape
    if C > MAX_C:
        raise ValueError(f"vitkernels triton layer_norm supports widths up to {MAX_C}, got {C}")
    mean = torch.empty((R,), device=x2d.device, dtype=torch.float32)
    rstd = torch.empty((R,), device=x2d.device, dtype=torch.float32)
    if R > 0:
        block_c = triton.next_power_of_2(C)
        rows = _fwd_rows(block_c)
        _kernel("fwd", block_c, rows)[(triton.cdiv(R, rows),)](
            x2d, None, None, None, x2d, x2d, mean, rstd, x2d.stride(0), 0, R, C, eps,
            HAS_RES=False, HAS_W=False, HAS_B=False, WRITE_Y=False, BLOCK_C=block_c, ROWS=rows,
        )
    return mean, rstd


def layer_norm_bwd(grad_y, grad_s, s, weight, mean, rstd, compute_dw, compute_db):
    """grad_y: (..., C) gradient of y; grad_s: gradient of the returned s or None; s: the normalized input
    (x + residual, or x); mean, rstd: from the forward.

    Returns (dx, dweight, dbias): dx (..., C) in s's dtype (it is also the residual's gradient); dweight and
    dbias (C,) in s's dtype when requested, else empty tensors.
    """
    C = s.shape[-1]
    s2 = _rows(s, C)
    dy2 = _rows(grad_y, C)
    ds2 = _rows(grad_s, C) if grad_s is not None else None
    weight = _unit_stride(weight)
    n_rows = s2.shape[0]
    dx = torch.empty((n_rows, C), device=s.device, dtype=s.dtype)
    block_c = triton.next_power_of_2(C)
    rows = _bwd_rows(block_c)
    programs = _bwd_programs(n_rows, rows, s.device)
    rows_per_program = max(rows, triton.cdiv(triton.cdiv(n_rows, programs), rows) * rows)
    programs = max(1, triton.cdiv(n_rows, rows_per_program))
    dw_part = torch.empty((programs, C), device=s.device, dtype=torch.float32) if compute_dw else None
    db_part = torch.empty((programs, C), device=s.device, dtype=torch.float32) if compute_db else None
    if n_rows > 0:
        _kernel("bwd", block_c, rows)[(programs,)](
            s2, weight, dy2, ds2, dx, dw_part, db_part, mean, rstd,
            s2.stride(0), dy2.stride(0), ds2.stride(0) if ds2 is not None else 0,
            n_rows, C, rows_per_program,
            HAS_W=weight is not None, HAS_DS=grad_s is not None,
            COMPUTE_DW=compute_dw, COMPUTE_DB=compute_db,
            BLOCK_C=block_c, ROWS=rows,
        )
    # Second stage of the reduction: (programs, C) fp32 -> (C,), a few hundred rows at most. Outputs that
    # were not requested are distinct empty tensors (a custom op's outputs may not alias each other).
    dw = _finish(dw_part, n_rows, C, s) if compute_dw else s.new_empty((0,))
    db = _finish(db_part, n_rows, C, s) if compute_db else s.new_empty((0,))
    return dx.view(s.shape), dw, db


def _finish(partial, n_rows, C, s):
    if n_rows == 0:
        return torch.zeros((C,), device=s.device, dtype=s.dtype)
    return partial.sum(0).to(s.dtype)


# ----------------------------------------------------------------------------------------------------------
# Registration: the ops of vitkernels/ops/layer_norm.py's contract, on these launchers
# ----------------------------------------------------------------------------------------------------------


def why_not_supported(device: torch.device, dtype: torch.dtype, C: int) -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"triton layer_norm runs fp32/fp16/bf16, got {dtype}"
    if C > MAX_C:
        return f"triton layer_norm holds a row in registers: widths up to {MAX_C}, got {C}"
    return None


layer_norm = CONTRACT.register(NAMESPACE, fwd=layer_norm_fwd, bwd=layer_norm_bwd)
