"""Patch embedding (timm's PatchEmbed + prefix tokens + position embedding): the public op and its contract.

Contract (every backend's ``<ns>::patch_embed_fwd`` / ``patch_embed_bwd`` has exactly these schemas):

    patch_embed_fwd(images, weight, bias?, pos_embed?, prefix_tokens?) -> tokens
        images (B, C, H, W), weight (D, C, P, P), bias (D,), prefix_tokens (1, K, D), pos_embed (1, T, D) with
        T = N + K (it covers the prefix tokens too) or T = N (timm's no_embed_class: the prefix tokens get no
        position embedding) -> tokens (B, K + N, D): rows [0, K) the prefix tokens (+ pos_embed[:, :K] when
        T = N + K), rows K.. the patches in row-major order (+ pos_embed[:, T - N:]). K = 0 without
        prefix_tokens. timm's order of the prefix: [cls, reg_1 .. reg_R] (ViT), [cls, dist] (DeiT distilled).
    patch_embed_bwd(grad_out, images, weight, num_prefix, needs_dimages, needs_dw) -> (dimages, dw)
        The two GEMM gradients, each empty (0,) unless asked for; the patch rows of grad_out are rows
        num_prefix.. (num_prefix = K). The bias, pos_embed and prefix_tokens gradients are batch sums of
        grad_out: taken here, once, for every backend.

The forward saves images and weight only (the backward gathers the patches again). FLOPs: 2 B N D C P^2
forward (the prefix rows are copies); the backward counts the weight gradient (and the image gradient when
asked for), as FlopCounterMode counts a conv backward.
"""

from __future__ import annotations

import torch

from vitkernels.backends import resolve
from vitkernels.ops.contract import OpContract, or_none
from vitkernels.ops.validate import amp_dtype, cast, check_float, fail, same_device_dtype

OP = "patch_embed"


def _num_prefix(prefix_tokens: torch.Tensor | None) -> int:
    return prefix_tokens.shape[1] if prefix_tokens is not None else 0


def _fake_fwd(images, weight, bias, pos_embed, prefix_tokens):
    B, _, H, W = images.shape
    D, P = weight.shape[0], weight.shape[-1]
    return images.new_empty((B, _num_prefix(prefix_tokens) + (H // P) * (W // P), D))


def _fake_bwd(grad_out, images, weight, num_prefix, needs_dimages, needs_dw):
    return images.new_empty(images.shape if needs_dimages else (0,)), weight.new_empty(weight.shape if needs_dw else (0,))


def _setup_context(ctx, inputs, output):
    images, weight, bias, pos_embed, prefix_tokens = inputs
    ctx.save_for_backward(images, weight)
    ctx.has_bias = bias is not None
    ctx.pos_len = pos_embed.shape[1] if pos_embed is not None else 0
    ctx.num_prefix = _num_prefix(prefix_tokens)


def _backward(bwd_op, ctx, grad_out):
    images, weight = ctx.saved_tensors
    needs_dimages, needs_dw, needs_db, needs_dpos, needs_dprefix = ctx.needs_input_grad
    dimages = dw = db = dpos = dprefix = None
    K = ctx.num_prefix
    if needs_dimages or needs_dw:
        dimages, dw = bwd_op(grad_out, images, weight, K, needs_dimages, needs_dw)
    if needs_db or needs_dpos or needs_dprefix:
        # One fp32 pass over grad_out: its batch sum, (K + N, D). Every small gradient is a slice of it.
        per_token = grad_out.sum(0, dtype=torch.float32)
        patches = per_token[K:]  # (N, D)
        dtype = grad_out.dtype
        if needs_db:
            db = patches.sum(0).to(dtype)
        if needs_dpos:  # pos_embed covers every output row (T = K + N), or only the patches (no_embed_class)
            dpos = (per_token if ctx.pos_len == per_token.shape[0] else patches).unsqueeze(0).to(dtype)
        if needs_dprefix:
            dprefix = per_token[:K].unsqueeze(0).to(dtype)  # (1, K, D)
    return or_none(dimages, needs_dimages), or_none(dw, needs_dw), db, dpos, dprefix


def _flops_fwd(images, weight, out_shape=None, **_):
    B, _, H, W = images
    D, C, P, _ = weight
    return 2 * B * (H // P) * (W // P) * D * C * P * P


def _flops_bwd(images, weight, needs_dimages, needs_dw, out_shape=None, **_):
    return (int(needs_dimages) + int(needs_dw)) * _flops_fwd(images, weight)


def _run(fwd_op, images, weight, bias, pos_embed, prefix_tokens):
    return fwd_op(images, weight, bias, pos_embed, prefix_tokens)


CONTRACT = OpContract(
    name=OP,
    fwd_schema="(Tensor images, Tensor weight, Tensor? bias, Tensor? pos_embed, Tensor? prefix_tokens) -> Tensor",
    bwd_schema="(Tensor grad_out, Tensor images, Tensor weight, int num_prefix, bool needs_dimages, bool needs_dw) "
               "-> (Tensor dimages, Tensor dw)",
    fake_fwd=_fake_fwd, fake_bwd=_fake_bwd, setup_context=_setup_context, backward=_backward,
    flops_fwd=_flops_fwd, flops_bwd=_flops_bwd, run=_run,
)


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    pos_embed: torch.Tensor | None = None,
    prefix_tokens: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Patchify, project, prepend the prefix tokens and add the position embedding (timm semantics).

    Args:
        images: (B, C, H, W); H and W divisible by the patch size P.
        weight: (D, C, P, P), the Conv2d weight of timm's ``patch_embed.proj``.
        bias: (D,) or None.
        pos_embed: (1, T, D) with T = N + K (the prefix tokens get pos_embed[:, :K], timm's default) or T = N
            (timm's ``no_embed_class``: the prefix tokens get no position embedding). N = H*W / P^2.
        prefix_tokens: (1, K, D) or None: the tokens before the patches, in timm's order, e.g.
            torch.cat([cls_token, reg_token], 1) (ViT with registers) or torch.cat([cls_token, dist_token], 1)
            (DeiT distilled).
        cls_token: (1, 1, D) or None: a synonym for ``prefix_tokens`` holding one token (give one, not both).

    Returns:
        tokens (B, K + N, D) (K = 0 without prefix tokens): the prefix tokens, then the patches in row-major
        order.
    """
    prefix_name = "prefix_tokens"
    if cls_token is not None:
        if prefix_tokens is not None:
            fail(OP, "give prefix_tokens or cls_token (a synonym for a single prefix token), not both")
        prefix_tokens, prefix_name = cls_token, "cls_token"
    check_float(OP, "images", images)
    check_float(OP, "weight", weight)
    if images.dim() != 4:
        fail(OP, f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        fail(OP, f"weight must be (D, C, P, P), got shape {tuple(weight.shape)}")
    name, fn = resolve(OP, backend, images.device, images.dtype, (weight.shape[0], weight.shape[2]))
    amp = amp_dtype(images.device) if name != "torch" else None
    if amp is not None:
        images, weight, bias, pos_embed, prefix_tokens = cast(amp, images, weight, bias, pos_embed, prefix_tokens)
    same_device_dtype(OP, "images", images, weight=weight, bias=bias, pos_embed=pos_embed,
                      **{prefix_name: prefix_tokens})
    B, C, H, W = images.shape
    D, Cw, P, _ = weight.shape
    if C != Cw:
        fail(OP, f"images have {C} channels but weight expects {Cw}")
    if H % P or W % P:
        fail(OP, f"image size {H}x{W} is not divisible by the patch size {P}")
    N = (H // P) * (W // P)
    if bias is not None and tuple(bias.shape) != (D,):
        fail(OP, f"bias must be ({D},), got {tuple(bias.shape)}")
    K = 0
    if prefix_tokens is not None:
        shape = tuple(prefix_tokens.shape)
        if prefix_name == "cls_token" and shape != (1, 1, D):
            fail(OP, f"cls_token must be (1, 1, {D}), got {shape} (several prefix tokens: pass prefix_tokens)")
        if len(shape) != 3 or shape[0] != 1 or shape[2] != D:
            fail(OP, f"prefix_tokens must be (1, K, {D}), got {shape}")
        K = shape[1]
    if pos_embed is not None:
        allowed = sorted({N + K, N})
        if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != D or pos_embed.shape[1] not in allowed:
            fail(
                OP,
                f"pos_embed must be (1, T, {D}) with T in {allowed} for a {H // P}x{W // P} patch grid and {K} "
                f"prefix tokens, got {tuple(pos_embed.shape)} (resample it with vitkernels.resample_pos_embed)",
            )
    return fn(images, weight, bias, pos_embed, prefix_tokens)
