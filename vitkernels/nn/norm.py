"""Normalisation layers with timm's parameter names: LayerNorm on ``vitkernels.ops.layer_norm`` (eps 1e-6 as in
ViT), RmsNorm (plain PyTorch: no fused kernel computes it yet), and the resolution of timm's ``norm_layer``
argument (a name, a class or a partial) into one of them.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vitkernels import ops


class LayerNorm(nn.LayerNorm):
    """nn.LayerNorm (same parameters and state_dict) whose forward runs on the chosen backend.

    ``forward(x, residual=None)``: x (..., C) -> LN(x); with a residual, (LN(x + residual), x + residual).
    """

    def __init__(self, normalized_shape: int, eps: float = 1e-6, elementwise_affine: bool = True,
                 bias: bool = True, backend: str = "auto", device=None, dtype=None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.backend = backend

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        return ops.layer_norm(x, self.weight, self.bias, eps=self.eps, residual=residual, backend=self.backend)


class RmsNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight over the last dim: timm's ``RmsNorm`` (key ``weight``; no bias).
    Runs in plain PyTorch on every backend (blocks with RmsNorm take the per-op path, their GEMMs and
    attention still fused). ``eps=None`` (``torch.nn.RMSNorm``'s default) means the dtype's machine epsilon."""

    def __init__(self, channels: int, eps: float | None = 1e-6, affine: bool = True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (int(channels),)
        self.eps = eps
        self.elementwise_affine = affine
        if affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(x.dtype).eps if self.eps is None else self.eps
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)  # timm's rms_norm, op for op
        return x if self.weight is None else x * self.weight

    def extra_repr(self) -> str:
        return f"{self.normalized_shape}, eps={self.eps}, affine={self.elementwise_affine}"


_SUPPORTED = ("LayerNorm with any eps / elementwise_affine / bias ('layernorm', nn.LayerNorm, timm's LayerNorm, "
              "or a functools.partial of them) and RmsNorm ('rmsnorm', timm's RmsNorm, nn.RMSNorm)")


def _kind(m: nn.Module) -> str | None:
    """'layernorm' / 'rmsnorm' for the norm classes vitkernels computes exactly, else None."""
    name = f"{type(m).__module__}.{type(m).__qualname__}"
    if isinstance(m, LayerNorm) or type(m) is nn.LayerNorm or name == "timm.layers.norm.LayerNorm":
        return "layernorm" if len(m.normalized_shape) == 1 else None
    if isinstance(m, RmsNorm) or name in ("timm.layers.norm.RmsNorm", "torch.nn.modules.normalization.RMSNorm"):
        return "rmsnorm" if len(m.normalized_shape) == 1 else None
    return None


def norm_factory(norm_layer=None, eps: float = 1e-6, backend: str = "auto"):
    """timm's ``norm_layer`` argument -> ``make(dim, device=None, dtype=None)`` building vitkernels' layer.

    None / 'layernorm': LayerNorm(eps); 'rmsnorm': RmsNorm(eps) (timm's names; ``eps`` is vitkernels'
    ``norm_eps``, timm's 1e-6 by default). A class or partial is instantiated once on the meta device and its
    type, eps, affine weight and bias are mirrored, so ``nn.LayerNorm`` (eps 1e-5, as in timm) and
    ``partial(nn.LayerNorm, eps=1e-6, bias=False)`` build what timm builds. Anything else raises ValueError
    naming the argument and the supported layers.
    """
    if norm_layer is None or (isinstance(norm_layer, str) and norm_layer.lower().replace("_", "") == "layernorm"):
        return functools.partial(LayerNorm, eps=eps, backend=backend)
    if isinstance(norm_layer, str):
        if norm_layer.lower().replace("_", "") == "rmsnorm":
            return functools.partial(RmsNorm, eps=eps)
        raise ValueError(f"norm_layer={norm_layer!r} is not supported; vitkernels supports {_SUPPORTED}")
    if not callable(norm_layer):
        raise ValueError(f"norm_layer must be a name, a class or a partial, got {norm_layer!r}")
    try:
        probe = norm_layer(8, device="meta")
    except Exception as exc:
        raise ValueError(f"norm_layer={norm_layer!r} could not be built as norm_layer(dim, device=...) ({exc}); "
                         f"vitkernels supports {_SUPPORTED}") from exc
    kind = _kind(probe)
    if kind == "layernorm":
        return functools.partial(LayerNorm, eps=probe.eps, elementwise_affine=probe.elementwise_affine,
                                 bias=probe.bias is not None, backend=backend)
    if kind == "rmsnorm":
        return functools.partial(RmsNorm, eps=probe.eps, affine=probe.weight is not None)
    raise ValueError(f"norm_layer={norm_layer!r} builds {type(probe).__module__}.{type(probe).__qualname__}, "
                     f"which vitkernels does not compute; it supports {_SUPPORTED}")
