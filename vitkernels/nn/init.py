"""Weight initialisation exactly as timm's VisionTransformer (``weight_init`` '' | 'jax' | 'jax_nlhb' | 'moco'
| 'reset' | 'skip', ``fix_init``): the same functions applied to the same modules in the same order, so a
seeded vitkernels model starts with the same tensors as the seeded timm model (tests/test_timm_compat.py).

timm 1.0.31 applies them with ``named_apply`` (children before parents, the root excluded): a Linear gets the
mode's rule; another module its ``reset_parameters()`` when ``needs_reset`` (after ``to_empty`` from the meta
device; at construction the modules have initialised themselves).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.init import _calculate_fan_in_and_fan_out

MODES = ("", "jax", "jax_nlhb", "moco", "reset", "skip")


def _trunc_normal(t: torch.Tensor, mean: float, std: float, a: float, b: float) -> torch.Tensor:
    """timm's ``_trunc_normal_``: inverse-CDF sampling of a normal truncated to [a, b]."""
    def cdf(v):
        return (1.0 + math.erf(v / math.sqrt(2.0))) / 2.0

    lo, hi = cdf((a - mean) / std), cdf((b - mean) / std)
    t.uniform_(2 * lo - 1, 2 * hi - 1)
    t.erfinv_()
    t.mul_(std * math.sqrt(2.0))
    t.add_(mean)
    t.clamp_(min=a, max=b)
    return t


@torch.no_grad()
def trunc_normal_(t: torch.Tensor, mean: float = 0.0, std: float = 1.0, a: float = -2.0, b: float = 2.0):
    return _trunc_normal(t, mean, std, a, b)


@torch.no_grad()
def lecun_normal_(t: torch.Tensor) -> torch.Tensor:
    """timm's: truncated normal (TF's bounds) with variance 1 / fan_in."""
    fan_in, _ = _calculate_fan_in_and_fan_out(t)
    _trunc_normal(t, 0.0, 1.0, -2.0, 2.0)
    return t.mul_(math.sqrt(1.0 / fan_in) / 0.87962566103423978)


def _other(m: nn.Module, needs_reset: bool) -> None:
    if hasattr(m, "init_weights"):
        m.init_weights()
    elif needs_reset and hasattr(m, "reset_parameters"):
        m.reset_parameters()


def init_timm(m: nn.Module, name: str = "", needs_reset: bool = True) -> None:
    if isinstance(m, nn.Linear):
        trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    else:
        _other(m, needs_reset)


def init_jax(m: nn.Module, name: str = "", head_bias: float = 0.0, needs_reset: bool = True) -> None:
    if isinstance(m, nn.Linear):
        if name.startswith("head"):
            nn.init.zeros_(m.weight)
            nn.init.constant_(m.bias, head_bias)
        else:
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.normal_(m.bias, std=1e-6) if "mlp" in name else nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Conv2d):
        lecun_normal_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    else:
        _other(m, needs_reset)


def init_moco(m: nn.Module, name: str = "", needs_reset: bool = True) -> None:
    if isinstance(m, nn.Linear):
        if "qkv" in name:  # q, k and v as three matrices
            val = math.sqrt(6.0 / float(m.weight.shape[0] // 3 + m.weight.shape[1]))
            nn.init.uniform_(m.weight, -val, val)
        else:
            nn.init.xavier_uniform_(m.weight)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    else:
        _other(m, needs_reset)


def init_reset(m: nn.Module, name: str = "", needs_reset: bool = True) -> None:
    if needs_reset and hasattr(m, "reset_parameters"):
        m.reset_parameters()


def named_apply(fn, module: nn.Module, name: str = "", include_root: bool = False) -> nn.Module:
    """timm's ``named_apply`` (depth first): fn(module=child, name=dotted name) for every descendant, children
    before their parent; the root too with ``include_root``."""
    for child_name, child in module.named_children():
        named_apply(fn, child, f"{name}.{child_name}" if name else child_name, include_root=True)
    if include_root:
        fn(module, name)
    return module


@torch.no_grad()
def init_vit(model: nn.Module, mode: str, needs_reset: bool = True, fix_init: bool = False) -> None:
    """timm's ``VisionTransformer.init_weights(mode, needs_reset)`` on any model with its attribute names."""
    if mode not in MODES or mode == "skip":
        raise ValueError(f"weight_init mode must be one of {', '.join(repr(m) for m in MODES if m != 'skip')}, "
                         f"got {mode!r}")
    head_bias = -math.log(model.num_classes) if "nlhb" in mode else 0.0
    if model.pos_embed is not None:
        trunc_normal_(model.pos_embed, std=0.02)
    if model.cls_token is not None:
        nn.init.normal_(model.cls_token, std=1e-6)
    if getattr(model, "reg_token", None) is not None:
        nn.init.normal_(model.reg_token, std=1e-6)
    if mode.startswith("jax"):
        fn = lambda m, n: init_jax(m, n, head_bias=head_bias, needs_reset=needs_reset)  # noqa: E731
    elif mode.startswith("moco"):
        fn = lambda m, n: init_moco(m, n, needs_reset=needs_reset)  # noqa: E731
    elif mode == "reset":
        fn = lambda m, n: init_reset(m, n, needs_reset=needs_reset)  # noqa: E731
    else:
        fn = lambda m, n: init_timm(m, n, needs_reset=needs_reset)  # noqa: E731
    named_apply(fn, model)
    if fix_init:
        fix_init_weight(model)


@torch.no_grad()
def fix_init_weight(model: nn.Module) -> None:
    """timm's ``fix_init``: divide each block's proj and fc2 weights by sqrt(2 (layer + 1))."""
    for i, blk in enumerate(model.blocks):
        scale = math.sqrt(2.0 * (i + 1))
        blk.attn.proj.weight.div_(scale)
        blk.mlp.fc2.weight.div_(scale)
