"""Public functional ops: validate the inputs, then dispatch to a backend.

Every op takes ``backend=`` (``auto | triton | cuda | torch``; None means ``$VITKERNELS_BACKEND`` or
``auto``). All validation lives here, so every backend receives inputs of agreed shapes, dtypes and devices
and never sees a case it would answer wrongly; backends stay free to copy a non-contiguous input once.

Under ``torch.autocast`` the fused backends receive inputs cast the way autocast casts the PyTorch ops they
replace (GEMM-like ops to the autocast dtype; LayerNorm keeps the activation dtype and computes its
statistics in fp32). The ``torch`` backend runs the PyTorch ops themselves, so autocast applies as usual.
"""

from __future__ import annotations

import torch

from vitkernels.backends import resolve

__all__ = ["patch_embed", "layer_norm", "attention", "linear"]


def _fail(op: str, msg: str):
    raise ValueError(f"vitkernels.ops.{op}: {msg}")


def _same_device_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    # Under autocast the torch backend's PyTorch ops reconcile mixed dtypes themselves (and the fused
    # backends get uniformly cast inputs before this check), so only devices must agree then.
    check_dtype = _amp_dtype(ref.device) is None
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != ref.device:
            _fail(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}")
        if check_dtype and t.dtype != ref.dtype:
            _fail(op, f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def _check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        _fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        _fail(op, f"{name} must be a floating-point tensor, got {t.dtype}")


def _amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype when autocast is on for this device type, else None."""
    kind = device.type
    if kind not in ("cuda", "cpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def _cast(dtype: torch.dtype | None, *tensors):
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


def patch_embed(
    images: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    *,
    pos_embed: torch.Tensor | None = None,
    cls_token: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Patchify, project, prepend the class token and add the position embedding (timm semantics).

    Args:
        images: (B, C, H, W); H and W divisible by the patch size P.
        weight: (D, C, P, P), the Conv2d weight of timm's ``patch_embed.proj``.
        bias: (D,) or None.
        pos_embed: (1, T, D) with T = N + 1 when ``cls_token`` is given (the class token gets pos_embed[:, 0])
            or T = N (timm's ``no_embed_class``: the class token gets no position embedding). N = H*W / P^2.
        cls_token: (1, 1, D) or None.

    Returns:
        tokens (B, T_out, D) with T_out = N + (1 if cls_token is not None), patches in row-major order.
    """
    op = "patch_embed"
    _check_float(op, "images", images)
    _check_float(op, "weight", weight)
    if images.dim() != 4:
        _fail(op, f"images must be (B, C, H, W), got shape {tuple(images.shape)}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3]:
        _fail(op, f"weight must be (D, C, P, P), got shape {tuple(weight.shape)}")
    name, fn = resolve(op, backend, images.device)
    amp = _amp_dtype(images.device) if name != "torch" else None
    if amp is not None:
        images, weight, bias, pos_embed, cls_token = _cast(amp, images, weight, bias, pos_embed, cls_token)
    _same_device_dtype(op, "images", images, weight=weight, bias=bias, pos_embed=pos_embed, cls_token=cls_token)
    B, C, H, W = images.shape
    D, Cw, P, _ = weight.shape
    if C != Cw:
        _fail(op, f"images have {C} channels but weight expects {Cw}")
    if H % P or W % P:
        _fail(op, f"image size {H}x{W} is not divisible by the patch size {P}")
    N = (H // P) * (W // P)
    if bias is not None and tuple(bias.shape) != (D,):
        _fail(op, f"bias must be ({D},), got {tuple(bias.shape)}")
    if cls_token is not None and tuple(cls_token.shape) != (1, 1, D):
        _fail(op, f"cls_token must be (1, 1, {D}), got {tuple(cls_token.shape)}")
    if pos_embed is not None:
        allowed = {N + 1, N} if cls_token is not None else {N}
        if pos_embed.dim() != 3 or pos_embed.shape[0] != 1 or pos_embed.shape[2] != D or pos_embed.shape[1] not in allowed:
            _fail(
                op,
                f"pos_embed must be (1, T, {D}) with T in {sorted(allowed)} for a {H // P}x{W // P} patch grid, "
                f"got {tuple(pos_embed.shape)} (resample it with vitkernels.resample_pos_embed)",
            )
    return fn(images, weight, bias, pos_embed, cls_token)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    *,
    eps: float = 1e-6,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
):
    """LayerNorm over the last dim, optionally fused with a residual add.

    Args:
        x: (..., C). weight, bias: (C,) or None. residual: same shape as x, or None.

    Returns:
        y = LN(x) when ``residual`` is None, else the pair (LN(s), s) with s = x + residual.
    """
    op = "layer_norm"
    _check_float(op, "x", x)
    if x.dim() < 1 or x.shape[-1] == 0:
        _fail(op, f"x must have a non-empty last dim, got shape {tuple(x.shape)}")
    name, fn = resolve(op, backend, x.device)
    amp = _amp_dtype(x.device) if name != "torch" else None
    if amp is not None:
        # LayerNorm under autocast: keep the activation's dtype, bring parameters to it.
        x = x if x.dtype in (torch.float16, torch.bfloat16) else x.to(amp)
        weight, bias, residual = _cast(x.dtype, weight, bias, residual)
    _same_device_dtype(op, "x", x, weight=weight, bias=bias, residual=residual)
    C = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (C,):
            _fail(op, f"{name} must be ({C},), got {tuple(t.shape)}")
    if residual is not None and residual.shape != x.shape:
        _fail(op, f"residual shape {tuple(residual.shape)} differs from x shape {tuple(x.shape)}")
    if not eps > 0:
        _fail(op, f"eps must be positive, got {eps}")
    return fn(x, weight, bias, float(eps), residual)


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
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_float(op, name, t)
        if t.dim() != 4:
            _fail(op, f"{name} must be (B, H, N, D), got shape {tuple(t.shape)}")
    name, fn = resolve(op, backend, q.device)
    amp = _amp_dtype(q.device) if name != "torch" else None
    if amp is not None:
        q, k, v = _cast(amp, q, k, v)
    _same_device_dtype(op, "q", q, k=k, v=v)
    if k.shape != v.shape:
        _fail(op, f"k shape {tuple(k.shape)} differs from v shape {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[1] != k.shape[1] or q.shape[3] != k.shape[3]:
        _fail(op, f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D")
    if q.shape[2] == 0 or k.shape[2] == 0:
        _fail(op, "sequence length must be at least 1")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    return fn(q, k, v, scale)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    residual: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """y = act(x W^T + b) + residual, the MLP / projection GEMM with its epilogue fused.

    Args:
        x: (..., K). weight: (M, K). bias: (M,) or None. activation: None or "gelu" (exact erf).
        residual: (..., M) or None, added after the activation.

    Returns:
        (..., M).
    """
    op = "linear"
    _check_float(op, "x", x)
    _check_float(op, "weight", weight)
    if activation not in (None, "gelu"):
        _fail(op, f"activation must be None or 'gelu', got {activation!r}")
    if weight.dim() != 2:
        _fail(op, f"weight must be (out_features, in_features), got shape {tuple(weight.shape)}")
    if x.dim() < 1:
        _fail(op, "x must have at least one dim")
    name, fn = resolve(op, backend, x.device)
    amp = _amp_dtype(x.device) if name != "torch" else None
    if amp is not None:
        x, weight, bias, residual = _cast(amp, x, weight, bias, residual)
    _same_device_dtype(op, "x", x, weight=weight, bias=bias, residual=residual)
    M, K = weight.shape
    if x.shape[-1] != K:
        _fail(op, f"x has {x.shape[-1]} features but weight expects {K}")
    if bias is not None and tuple(bias.shape) != (M,):
        _fail(op, f"bias must be ({M},), got {tuple(bias.shape)}")
    if residual is not None and tuple(residual.shape) != (*x.shape[:-1], M):
        _fail(op, f"residual must be {(*x.shape[:-1], M)}, got {tuple(residual.shape)}")
    return fn(x, weight, bias, activation, residual)
