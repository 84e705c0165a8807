"""Patch embedding in Triton: patchify + projection + bias + position embedding + prefix tokens, one GEMM.

The ViT stem is a Conv2d with kernel = stride = P, i.e. a GEMM over tokens:

    tokens[b, R + n, d] = sum_k A[(b, n), k] * W[d, k] + bias[d] + pos[(R +) n, d],  k = (c, py, px), K = C*P*P
    A[(b, n), (c, py, px)] = images[b, c, ph*P + py, pw*P + px],                 n = ph * (W/P) + pw

R = num_prefix is the number of prefix tokens (timm's class token, register tokens, distillation token: 0 to 5
in practice; the op's contract calls it K, which here is the GEMM's reduction length).

The forward kernel never materializes A (no unfold / im2col tensor): each A tile is gathered from the NCHW
image by address arithmetic, separable as row_off(b, ph, pw) + col_off(c, py, px), for any image strides.
The epilogue adds bias and pos_embed in fp32 and writes row R + n of the (B, R + N, D) sequence; the prefix
rows (prefix + pos[:R], or the prefix alone for timm's no_embed_class) are B x R x D values written by one
broadcast torch op.

Backward (stride == kernel, so every pixel belongs to exactly one patch and nothing overlaps):
    dW[d, k]      = sum_(b,n) dout[(b, n), d] * A[(b, n), k]   gather A again; split over tokens into fp32
                                                                partials, summed once (no atomics)
    dimages       = (dout @ W) scattered back by the same address arithmetic (a plain store per pixel);
                    computed only when the images require grad (usually they do not)
    dbias, dpos_embed, dprefix_tokens: one fp32 reduction of dout over the batch, then slices of it (taken by
                    the shared backward of vitkernels/ops/patch_embed.py).

Supported: fp32 / fp16 / bf16 (fp32 accumulation; fp32 uses IEEE products, never TF32); any P, C, odd patch
grids; any number R of prefix tokens; pos_embed covering N + R or N tokens.

R is a runtime argument the compiler does not specialise on (``do_not_specialize``): one compiled kernel
serves every R (a constexpr, or Triton's default specialisation of 0, 1 and multiples of 16, would compile
each kernel again per distinct R, outside the autotune key).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vitkernels.backends import triton_interpreter
from vitkernels.triton import NAMESPACE, autotune, capability
from vitkernels.ops.patch_embed import CONTRACT

__all__ = ["patch_embed", "patch_embed_fwd", "patch_embed_bwd"]

_INTERPRET = triton_interpreter()


# ----------------------------------------------------------------------------------------------------------
# Address arithmetic shared by the kernels. Token and column indices are int64 from the start: image offsets
# pass 2^31 at large batches, and 64-bit index math also skips the interpreter's per-op overflow checks.
# ----------------------------------------------------------------------------------------------------------


@triton.jit
def _patch_row_offsets(m, N, GW, stride_b, stride_h, stride_w, P: tl.constexpr):
    """Token index m = b * N + n -> element offset of the patch's top-left pixel, (b, ph*P, pw*P)."""
    b = m // N
    n = m - b * N
    ph = n // GW
    pw = n - ph * GW
    return b * stride_b + (ph * P) * stride_h + (pw * P) * stride_w


@triton.jit
def _patch_col_offsets(k, stride_c, stride_h, stride_w, P: tl.constexpr):
    """Flattened weight column k = (c * P + py) * P + px -> offset of pixel (c, py, px) inside a patch."""
    c = k // (P * P)
    r = k - c * (P * P)
    py = r // P
    px = r - py * P
    return c * stride_c + py * stride_h + px * stride_w


@triton.jit
def _token_row_offsets(m, N, stride_ob, stride_ot, num_prefix):
    """Token index m = b * N + n -> offset of sequence row (b, num_prefix + n) of a (B, num_prefix + N, D)
    tensor."""
    b = m // N
    n = m - b * N
    return b * stride_ob + (n + num_prefix) * stride_ot


# ----------------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["num_prefix", "POS_OFF"])
def _patch_embed_fwd_kernel(
    IMG,  # (B, C, H, W) images, any strides
    Wt,  # (D, K) projection weight, K = C*P*P in (c, py, px) order
    Bias,  # (D,) bias, or None
    Pos,  # (1, T, D) position embedding, or None
    Out,  # (B, T_out, D) out: token sequence, contiguous; rows num_prefix.. are written here
    stride_ib, stride_ic, stride_ih, stride_iw,  # image strides
    stride_wd, stride_wk,  # weight strides
    stride_pt, stride_pd,  # pos_embed strides (token, channel)
    M,  # B * N tokens
    D,  # embed dim
    K,  # C * P * P
    N,  # patches per image
    GW,  # patches per image row (W / P)
    T_out,  # sequence length of Out, num_prefix + N
    num_prefix,  # prefix rows of Out (written by the launcher): its patch rows start here
    POS_OFF,  # pos_embed row of patch 0: num_prefix when pos_embed also covers the prefix tokens, else 0
    P: tl.constexpr,  # patch size
    HAS_BIAS: tl.constexpr,
    HAS_POS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,  # "ieee" for fp32 inputs (no TF32), default otherwise
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    # D tiles vary fastest: consecutive programs share the gathered image rows (they hit in L2).
    pid = tl.program_id(0)
    n_d = tl.cdiv(D, BLOCK_D)
    pid_m = pid // n_d
    pid_d = pid - pid_m * n_d
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    m_mask = m < M
    d_mask = d < D
    row_off = _patch_row_offsets(m, N, GW, stride_ib, stride_ih, stride_iw, P)  # (BLOCK_M,)

    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        k_mask = k < K
        col_off = _patch_col_offsets(k, stride_ic, stride_ih, stride_iw, P)  # (BLOCK_K,)
        a = tl.load(IMG + row_off[:, None] + col_off[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(Wt + d[None, :] * stride_wd + k[:, None] * stride_wk, mask=k_mask[:, None] & d_mask[None, :],
                    other=0.0)  # (BLOCK_K, BLOCK_D) = W^T tile
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION)

    # Epilogue in two column halves (as the linear GEMM's): the position-embedding loads live for half a tile
    # at a time, which keeps the 128 x 256 tile within the register file on sm_90a.
    if BLOCK_D >= 32:
        halves = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_D // 2)), (0, 2, 1)))
        d_half = pid_d * BLOCK_D + tl.arange(0, BLOCK_D // 2)
        _fwd_epilogue(halves[0], m, d_half, m_mask, D, N, T_out, num_prefix, POS_OFF, Bias, Pos, Out, stride_pt,
                      stride_pd, HAS_BIAS, HAS_POS)
        _fwd_epilogue(halves[1], m, d_half + BLOCK_D // 2, m_mask, D, N, T_out, num_prefix, POS_OFF, Bias, Pos,
                      Out, stride_pt, stride_pd, HAS_BIAS, HAS_POS)
    else:
        _fwd_epilogue(acc, m, d, m_mask, D, N, T_out, num_prefix, POS_OFF, Bias, Pos, Out, stride_pt, stride_pd,
                      HAS_BIAS, HAS_POS)


@triton.jit
def _fwd_epilogue(acc, m, d, m_mask, D, N, T_out, num_prefix, POS_OFF, Bias, Pos, Out, stride_pt, stride_pd,
                  HAS_BIAS: tl.constexpr, HAS_POS: tl.constexpr):
    """acc (BLOCK_M, W) fp32 for tokens m, channels d -> Out, one rounding after + bias[d] + pos[POS_OFF + n, d]."""
    d_mask = d < D
    mask = m_mask[:, None] & d_mask[None, :]
    if HAS_BIAS:
        acc += tl.load(Bias + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_POS:
        n = m % N
        pos = tl.load(Pos + (n + POS_OFF)[:, None] * stride_pt + d[None, :] * stride_pd, mask=mask, other=0.0)
        acc += pos.to(tl.float32)
    out_row = _token_row_offsets(m, N, T_out * D, D, num_prefix)
    tl.store(Out + out_row[:, None] + d[None, :], acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit(do_not_specialize=["num_prefix"])
def _patch_embed_bwd_dw_kernel(
    DOUT,  # (B, num_prefix + N, D) gradient of the tokens, any strides
    IMG,  # (B, C, H, W) images, any strides
    DW,  # (SPLIT, D, K) out: fp32 partial weight gradients, one slice per token split
    stride_ob, stride_ot, stride_od,  # dout strides
    stride_ib, stride_ic, stride_ih, stride_iw,  # image strides
    M,  # B * N tokens
    D,  # embed dim
    K,  # C * P * P
    N,  # patches per image
    GW,  # patches per image row
    num_prefix,  # prefix rows of dout (not part of this GEMM): its patch rows start here
    rows_per_split,  # tokens reduced by one program along grid axis 1
    P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_M: tl.constexpr,  # tokens per reduction step
):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    n_k = tl.cdiv(K, BLOCK_K)
    pid_d = pid // n_k
    pid_k = pid - pid_d * n_k
    d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    d_mask = d < D
    k_mask = k < K
    col_off = _patch_col_offsets(k, stride_ic, stride_ih, stride_iw, P)  # (BLOCK_K,)
    m_start = split.to(tl.int64) * rows_per_split
    m_end = tl.minimum(m_start + rows_per_split, M)

    acc = tl.zeros((BLOCK_D, BLOCK_K), dtype=tl.float32)
    for m0 in range(m_start, m_end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        m_mask = m < m_end
        tok = _token_row_offsets(m, N, stride_ob, stride_ot, num_prefix)
        g = tl.load(DOUT + tok[None, :] + d[:, None] * stride_od, mask=d_mask[:, None] & m_mask[None, :],
                    other=0.0)  # (BLOCK_D, BLOCK_M) = dout^T tile
        row_off = _patch_row_offsets(m, N, GW, stride_ib, stride_ih, stride_iw, P)
        a = tl.load(IMG + row_off[:, None] + col_off[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        acc = tl.dot(g, a, acc, input_precision=DOT_PRECISION)
    dw_ptr = DW + split.to(tl.int64) * D * K + d[:, None] * K + k[None, :]
    tl.store(dw_ptr, acc, mask=d_mask[:, None] & k_mask[None, :])


@triton.jit(do_not_specialize=["num_prefix"])
def _patch_embed_bwd_dx_kernel(
    DOUT,  # (B, num_prefix + N, D) gradient of the tokens, any strides
    Wt,  # (D, K) projection weight
    DIMG,  # (B, C, H, W) out: image gradient, contiguous
    stride_ob, stride_ot, stride_od,  # dout strides
    stride_wd, stride_wk,  # weight strides
    M, D, K, N, GW,  # as in the forward
    num_prefix,  # prefix rows of dout (not part of this GEMM): its patch rows start here
    H,  # image height
    Wimg,  # image width
    P: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # reduction step over the embed dim
):
    # dimages[(b, n), k] = sum_d dout[(b, n), d] W[d, k]; every (token, k) pair is one distinct pixel.
    pid = tl.program_id(0)
    n_k = tl.cdiv(K, BLOCK_K)
    pid_m = pid // n_k
    pid_k = pid - pid_m * n_k
    m = pid_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = pid_k.to(tl.int64) * BLOCK_K + tl.arange(0, BLOCK_K)
    m_mask = m < M
    k_mask = k < K
    tok = _token_row_offsets(m, N, stride_ob, stride_ot, num_prefix)

    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        d_mask = d < D
        g = tl.load(DOUT + tok[:, None] + d[None, :] * stride_od, mask=m_mask[:, None] & d_mask[None, :],
                    other=0.0)  # (BLOCK_M, BLOCK_D)
        w = tl.load(Wt + d[:, None] * stride_wd + k[None, :] * stride_wk, mask=d_mask[:, None] & k_mask[None, :],
                    other=0.0)  # (BLOCK_D, BLOCK_K)
        acc = tl.dot(g, w, acc, input_precision=DOT_PRECISION)

    C = K // (P * P)
    row_off = _patch_row_offsets(m, N, GW, C * H * Wimg, Wimg, 1, P)
    col_off = _patch_col_offsets(k, H * Wimg, Wimg, 1, P)
    tl.store(DIMG + row_off[:, None] + col_off[None, :], acc.to(DIMG.dtype.element_ty),
             mask=m_mask[:, None] & k_mask[None, :])


# ----------------------------------------------------------------------------------------------------------
# Block sizes: autotuned on GPU (key: the GEMM shape; the autotuner adds the dtypes), one config under the
# interpreter, where the cost is a fixed overhead per program and per op, so the tiles are large.
# ----------------------------------------------------------------------------------------------------------


def _configs(names: tuple[str, str, str], gpu: list[tuple[int, int, int, int, int]]):
    if _INTERPRET:
        # Large tiles, and the longest one along K = C*P*P (768 for P=16, C=3): fewest programs and loop steps.
        tiles = {"BLOCK_M": 128, "BLOCK_D": 128, "BLOCK_K": 256}
        return [triton.Config({name: tiles[name] for name in names}, num_warps=4)]
    return [triton.Config(dict(zip(names, blocks)), num_warps=w, num_stages=s) for *blocks, w, s in gpu]


# (first, second, reduction block, warps, stages), three families; _prune keeps one per launch:
# - tensor-core tiles for 16-bit inputs, the usual GEMM tiles for K and D in the hundreds;
_GEMM_TILES = [
    (128, 128, 64, 8, 3),
    (128, 256, 64, 8, 3),
    (128, 64, 64, 4, 4),
    (64, 128, 64, 4, 4),
    (128, 128, 32, 4, 4),
    (64, 64, 64, 4, 3),
]
# - 16-bit with a patch size that is not a power of two (14: DINOv2, ViT-H/14): a patch row is 14 pixels, so
#   the image loads cannot be vectorised and each element carries its own 64-bit address; every tile above
#   spills there (130-4,852 B per thread). These compile spill-free with Triton 3.6 and 3.8 for sm_80 and
#   sm_90a; the weight gradient (the gathered operand is its reduction side) keeps _GATHER_DW_TILES;
_GATHER_TILES = [
    (128, 128, 32, 8, 3),
    (64, 128, 32, 4, 3),
    (128, 64, 32, 8, 3),
    (64, 64, 32, 4, 3),
    (128, 128, 16, 8, 3),
    (128, 64, 16, 4, 3),
    (64, 64, 16, 4, 3),
]
_GATHER_DW_TILES = {(128, 64, 32, 8, 3), (128, 128, 16, 8, 3), (128, 64, 16, 4, 3), (64, 64, 16, 4, 3)}
# - fp32: its dots ("ieee") run on the FMA units, where each thread holds its rows and columns of the operands
#   for the whole reduction block, so that block is the shortest tl.dot takes (16); the weight gradient keeps
#   _FMA_DW_TILES (its larger tiles spill 4-1,928 B).
_FMA_TILES = [
    (128, 64, 16, 8, 3),
    (64, 128, 16, 8, 3),
    (32, 64, 16, 4, 3),
]
_FMA_DW_TILES = {(32, 64, 16, 4, 3)}
_TILES = _GEMM_TILES + _GATHER_TILES + _FMA_TILES
_FAMILY = {**{t: "gemm" for t in _GEMM_TILES}, **{t: "gather" for t in _GATHER_TILES},
           **{t: "fma" for t in _FMA_TILES}}


def _prune(names: tuple[str, str, str], weight_gradient: bool = False):
    """The autotuner's ``early_config_prune`` for one kernel (``names``: its blocks, reduction last): the tile
    family of this launch, and what compiling every config for sm_90a and sm_80 with Triton 3.6 and 3.8
    (``python -m vitkernels audit``, ViT-B/16, ViT-L/16, ViT-H/14) showed to spill: on sm_80 the 128 x 256
    tile (28-52 B per thread); with gathered loads, the weight gradient's other tiles (8-7,820 B)."""
    def prune(configs, named_args, **kwargs):
        p = kwargs.get("P", 16)
        family = ("fma" if kwargs.get("DOT_PRECISION") == "ieee" else
                  "gemm" if p & (p - 1) == 0 else "gather")
        sm80 = capability(next((v for v in named_args.values() if isinstance(v, torch.Tensor)), None)) < 90
        keep = []
        for c in configs:
            tile = (*(c.kwargs[n] for n in names), c.num_warps, c.num_stages)
            if _FAMILY.get(tile) != family:
                continue
            if family == "gemm" and sm80 and tile[0] * tile[1] >= 128 * 256:
                continue
            if family == "gather" and weight_gradient and tile not in _GATHER_DW_TILES:
                continue
            if family == "fma" and weight_gradient and tile not in _FMA_DW_TILES:
                continue
            keep.append(c)
        return keep or configs  # (the interpreter's one config)

    return prune


_FWD_BLOCKS, _DW_BLOCKS, _DX_BLOCKS = ("BLOCK_M", "BLOCK_D", "BLOCK_K"), ("BLOCK_D", "BLOCK_K", "BLOCK_M"), \
    ("BLOCK_M", "BLOCK_K", "BLOCK_D")
_fwd_kernel = autotune(_configs(_FWD_BLOCKS, _TILES), ["M", "D", "K"],
                       prune_configs_by={"early_config_prune": _prune(_FWD_BLOCKS)})(_patch_embed_fwd_kernel)
_bwd_dw_kernel = autotune(_configs(_DW_BLOCKS, _TILES), ["M", "D", "K"],
                          prune_configs_by={"early_config_prune": _prune(_DW_BLOCKS, weight_gradient=True)})(
    _patch_embed_bwd_dw_kernel)
_bwd_dx_kernel = autotune(_configs(_DX_BLOCKS, _TILES), ["M", "D", "K"],
                          prune_configs_by={"early_config_prune": _prune(_DX_BLOCKS)})(_patch_embed_bwd_dx_kernel)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter only names the default; unused for 16-bit


def _dw_splits(M: int, D: int, K: int, device: torch.device) -> int:
    """How many token splits the weight-gradient reduction uses (slices of the fp32 partial buffer)."""
    if _INTERPRET or device.type != "cuda":
        return 2 if M > 64 else 1  # exercises the two-stage reduction in CI
    # Output tiles alone cannot fill the GPU; split the token reduction until even the largest tile (128 x 256,
    # one CTA per SM) makes two waves, keeping >= 1024 tokens per split. At ViT-B/16, B=256: 15 splits, a
    # 35 MB fp32 partial buffer against 155 MB of dout and images read.
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    tiles = max(1, D * K // max(d * k for d, k, *_ in _GEMM_TILES))
    return max(1, min(triton.cdiv(2 * sms, tiles), triton.cdiv(M, 1024), 64))


def _weight_2d(weight: torch.Tensor) -> torch.Tensor:
    """(D, C, P, P) -> (D, K) in (c, py, px) order; a copy only for an oddly strided weight (it is small)."""
    return weight.reshape(weight.shape[0], -1)


# ----------------------------------------------------------------------------------------------------------
# Launchers (no autograd)
# ----------------------------------------------------------------------------------------------------------


def patch_embed_fwd(images, weight, bias, pos_embed, prefix_tokens):
    """images (B, C, H, W), weight (D, C, P, P), prefix_tokens (1, R, D) or None -> tokens (B, R + N, D) in the
    images' dtype."""
    B, C, H, W = images.shape
    D, _, P, _ = weight.shape
    GH, GW = H // P, W // P
    N, K = GH * GW, C * P * P
    num_prefix = prefix_tokens.shape[1] if prefix_tokens is not None else 0
    T_out = num_prefix + N
    out = torch.empty((B, T_out, D), device=images.device, dtype=images.dtype)
    # pos_embed covers the prefix too (T = R + N) or only the patches (no_embed_class, T = N); R = 0: the same.
    pos_off = num_prefix if pos_embed is not None and pos_embed.shape[1] == T_out else 0
    w2 = _weight_2d(weight)
    bias = bias.contiguous() if bias is not None else None  # indexed with unit stride; a no-op for nn.Conv2d
    M = B * N
    if M > 0:

        def fwd_grid(meta):  # token x D tiles
            return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(D, meta["BLOCK_D"]),)

        _fwd_kernel[fwd_grid](
            images, w2, bias, pos_embed, out,
            *images.stride(), *w2.stride(),
            pos_embed.stride(1) if pos_embed is not None else 0, pos_embed.stride(2) if pos_embed is not None else 0,
            M, D, K, N, GW, T_out, num_prefix, pos_off,
            P=P, HAS_BIAS=bias is not None, HAS_POS=pos_embed is not None,
            DOT_PRECISION=_dot_precision(images.dtype),
        )
    if num_prefix:
        # The prefix rows are B x R x D values, the same for every image: one broadcast torch copy. A kernel
        # branch for them would cost more code (a second row space in the grid, a load path with no GEMM) than
        # the copy costs time (R x 0.4 MB at ViT-B/16, B=256, against 77 MB of tokens written by the GEMM).
        prefix = prefix_tokens[0].float()  # (R, D)
        if pos_off:
            prefix = prefix + pos_embed[0, :num_prefix].float()
        out[:, :num_prefix] = prefix.to(out.dtype)
    return out


def patch_embed_bwd(grad_out, images, weight, num_prefix, needs_dimages, needs_dw):
    """Gradients of the two GEMMs. grad_out (B, num_prefix + N, D), any strides; its first num_prefix rows
    (the prefix tokens') take no part.

    Returns (dimages (B, C, H, W) contiguous, or empty; dweight (D, C, P, P), or empty), in the input dtype.
    """
    B, C, H, W = images.shape
    D, _, P, _ = weight.shape
    GW = W // P
    N, K = (H // P) * GW, C * P * P
    M = B * N
    precision = _dot_precision(images.dtype)
    dimages = images.new_empty((0,))
    dweight = weight.new_empty((0,))
    if needs_dimages:
        dimages = torch.empty((B, C, H, W), device=images.device, dtype=images.dtype)
        if M > 0:
            w2 = _weight_2d(weight)

            def dx_grid(meta):  # token x K tiles
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(K, meta["BLOCK_K"]),)

            _bwd_dx_kernel[dx_grid](
                grad_out, w2, dimages, *grad_out.stride(), *w2.stride(),
                M, D, K, N, GW, num_prefix, H, W,
                P=P, DOT_PRECISION=precision,
            )
    if needs_dw:
        if M == 0:
            dweight = torch.zeros_like(weight)
        else:
            splits = _dw_splits(M, D, K, images.device)
            rows_per_split = triton.cdiv(M, splits)
            splits = triton.cdiv(M, rows_per_split)
            partial = torch.empty((splits, D, K), device=images.device, dtype=torch.float32)

            def dw_grid(meta):  # (D x K output tiles, token splits)
                return (triton.cdiv(D, meta["BLOCK_D"]) * triton.cdiv(K, meta["BLOCK_K"]), splits)

            _bwd_dw_kernel[dw_grid](
                grad_out, images, partial, *grad_out.stride(), *images.stride(),
                M, D, K, N, GW, num_prefix, rows_per_split,
                P=P, DOT_PRECISION=precision,
            )
            # Second stage: (splits, D, K) fp32 -> (D, K), then the weight's shape and dtype.
            dweight = partial.sum(0).view(weight.shape).to(weight.dtype)
    return dimages, dweight


# ----------------------------------------------------------------------------------------------------------
# torch.library registration + autograd
# ----------------------------------------------------------------------------------------------------------


# ----------------------------------------------------------------------------------------------------------
# Registration: the ops of vitkernels/ops/patch_embed.py's contract, on these launchers
# ----------------------------------------------------------------------------------------------------------
def why_not_supported(device: torch.device, dtype: torch.dtype, D: int, P: int) -> str | None:
    """The kernels' limits (None when these inputs run here)."""
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        return f"triton patch_embed runs fp32/fp16/bf16 (tl.dot), got {dtype}"
    return None


patch_embed = CONTRACT.register(NAMESPACE, fwd=patch_embed_fwd, bwd=patch_embed_bwd)
