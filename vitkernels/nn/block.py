"""The pre-norm transformer block (timm's ``Block``): x + attn(norm1(x)), then x + mlp(norm2(x)).

Two data paths, chosen per block by ``lean`` (default True):

- lean: the memory-lean fused block. ``norm1`` is fused into the qkv GEMM (``ops.ln_linear``) and
  ``norm2 -> fc1 -> act -> fc2 (+ residual)`` is one op (``ops.ln_mlp``; a gated MLP: ``ops.ln_glu_mlp``, which
  keeps x and the gate and value pre-activations), so the backward keeps per token
  x, qkv (q, k, v are views of it), the attention output and its log-sum-exp, x1 = x + attention branch, the
  fc1 pre-activation z (4 C) and fp32 LayerNorm statistics: 10 C values, where the per-op path (and timm)
  keeps 16 C (also LN1(x), LN2(x1) and GELU(z)). The LayerNorm and GELU outputs are recomputed inside the
  GEMMs of the backward, never stored. ``norm1``, ``attn``, ``norm2`` and ``mlp`` are read (parameters and
  settings), not called, so forward hooks on them do not fire.
- per-op (``lean=False``): every submodule is called, each op fused with its neighbours' elementwise work
  (bias, GELU, residual in GEMM epilogues), saving what timm saves.

Residual adds are fused: with no LayerScale and no active stochastic depth, into the epilogues of the
``proj`` and ``fc2`` GEMMs; otherwise (per-op path) the first one into ``norm2`` (LayerNorm with fused
residual), or (lean path) a plain add before ``ln_mlp``.

The residual stream under autocast: the fused ops compute in the autocast dtype, so by default the stream
(x, x1) is bf16 / fp16 from the patch embedding on. ``fp32_residual`` (timm's behaviour: its adds promote to
fp32) keeps it fp32: the LayerNorms read it in fp32 (``ln_linear`` / ``ln_mlp`` normalise an fp32 x and
round LN(x) to the autocast dtype for the GEMM, as autocast's LayerNorm -> Linear does), ``ln_mlp`` adds it
in fp32 in its epilogue, and the attention branch is added by an fp32 PyTorch add (``proj``'s epilogue
computes in the autocast dtype). The saved x and x1 are then fp32, as in timm.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from vitkernels import ops
from vitkernels.nn.attention import Attention, attention_from_qkv
from vitkernels.nn.mlp import ACTIVATIONS, GLU_ACTIVATIONS, epilogue_activation, glu_parts, is_gated, mlp_factory
from vitkernels.nn.norm import LayerNorm
from vitkernels.nn.patch_embed import is_fx_tracing


class LayerScale(nn.Module):
    """x * gamma, gamma (C,) initialised to ``init_values`` (CaiT); timm's key is ``gamma``."""

    def __init__(self, dim: int, init_values: float = 1e-5, device=None, dtype=None):
        super().__init__()
        self.init_values = init_values
        self.gamma = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.gamma, self.init_values)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: zero a sample's residual branch with probability p, scale the rest by 1/(1-p)."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep = 1.0 - self.drop_prob
        # One draw per sample: a (B, 1, ..., 1) mask; under torch.fx x.dim() is unknown: tokens (B, N, C).
        shape = (x.shape[0], 1, 1) if is_fx_tracing() else (x.shape[0],) + (1,) * (x.dim() - 1)
        mask = x.new_empty(shape).bernoulli_(keep)
        return x * mask / keep

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob:.3f}"


class Block(nn.Module):
    """x (B, N, C) -> (B, N, C). Arguments as timm's Block, plus ``backend``, ``lean`` (the memory-lean
    fused path) and ``fp32_residual`` (an fp32 residual stream under autocast); see the module docstring."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_norm=False, proj_bias=True,
                 proj_drop=0.0, attn_drop=0.0, init_values=None, drop_path=0.0, norm_eps=1e-6,
                 backend: str = "auto", lean: bool = True, fp32_residual: bool = False, norm_layer=None,
                 act_layer=None, mlp_layer=None, scale_mlp_norm: bool = False, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        norm_layer = norm_layer or functools.partial(LayerNorm, eps=norm_eps, backend=backend)
        self.norm1 = norm_layer(dim, **dd)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
                              attn_drop=attn_drop, proj_drop=proj_drop, norm_eps=norm_eps, backend=backend,
                              norm_layer=norm_layer, **dd)
        self.ls1 = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = norm_layer(dim, **dd)
        # mlp_layer: timm's argument, or mlp_factory's (class, fixed arguments); timm passes the block's
        # act_layer (default GELU) over a partial's, and a norm over the hidden width with scale_mlp_norm.
        mlp_cls, mlp_kwargs = mlp_layer if isinstance(mlp_layer, tuple) else mlp_factory(mlp_layer)
        mlp_kwargs = dict(mlp_kwargs, act_layer=act_layer if act_layer is not None else "gelu",
                          norm_layer=norm_layer if scale_mlp_norm else None, bias=proj_bias)
        self.mlp = mlp_cls(dim, hidden_features=int(dim * mlp_ratio), drop=proj_drop, backend=backend, **mlp_kwargs,
                           **dd)
        self.ls2 = LayerScale(dim, init_values, **dd) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.backend = backend
        self.lean = lean
        self.fp32_residual = fp32_residual

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        return block_forward(self, x, self.backend, self.lean, attn_mask, is_causal)


def _layer_scale(ls: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if isinstance(ls, nn.Identity) else x * ls.gamma  # never timm's in-place variant


def _is_layer_norm(m: nn.Module) -> bool:
    return isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1


def lean_parts(blk: nn.Module) -> tuple[bool, bool]:
    """Which halves of ``blk`` the lean path can fuse: (norm1 into qkv, norm2 + MLP as one op). The MLP half
    needs timm's plain Mlp (an activation of the fused epilogue, no inner norm, no active dropout); a gated
    MLP (GluMlp / SwiGLU, a gate the GLU epilogue computes) is one ``ops.ln_glu_mlp`` in the same way."""
    mlp = blk.mlp
    act = getattr(mlp, "act", None)
    allowed = GLU_ACTIVATIONS if is_gated(mlp) else ACTIVATIONS
    mlp_ok = (_is_layer_norm(blk.norm2) and act is not None and epilogue_activation(act) in allowed
              and isinstance(getattr(mlp, "norm", nn.Identity()), nn.Identity)
              and not (blk.training and (mlp.drop1.p > 0 or mlp.drop2.p > 0)))
    return _is_layer_norm(blk.norm1), mlp_ok


def keeps_fp32_stream(blk: nn.Module, x: torch.Tensor) -> bool:
    """Whether ``blk`` keeps an fp32 residual stream here: asked for, x is fp32 and autocast is on."""
    return (getattr(blk, "fp32_residual", False) and x.dtype == torch.float32
            and torch.is_autocast_enabled(x.device.type))


def _ln_mlp(blk: nn.Module, x: torch.Tensor, backend: str, add_input: bool) -> torch.Tensor:
    if is_gated(blk.mlp):  # norm2 + gated fc1 + fc2 [+ x]: saves x, the gate and value pre-activations
        n2, fc2 = blk.norm2, blk.mlp.fc2
        gw, gb, vw, vb, act = glu_parts(blk.mlp)
        return ops.ln_glu_mlp(x, n2.weight, n2.bias, gw, gb, vw, vb, fc2.weight, fc2.bias, eps=n2.eps,
                              add_input=add_input, activation=act, backend=backend)
    n2, fc1, fc2 = blk.norm2, blk.mlp.fc1, blk.mlp.fc2
    return ops.ln_mlp(x, n2.weight, n2.bias, fc1.weight, fc1.bias, fc2.weight, fc2.bias, eps=n2.eps,
                      add_input=add_input, activation=epilogue_activation(blk.mlp.act), backend=backend)


def block_forward(blk: nn.Module, x: torch.Tensor, backend: str, lean: bool = True,
                  attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    """x (B, N, C) -> (B, N, C) for any module with timm's Block attribute names (``norm1``, ``attn``, ``ls1``,
    ``drop_path1``, ``norm2``, ``mlp``, ``ls2``, ``drop_path2``): this Block, and timm's own under
    ``vitkernels.patch_timm``, whose ``attn`` and ``mlp`` take ``residual=``. ``lean``: the memory-lean path
    where the block allows it (module docstring); otherwise the submodules are called, so hooks on them fire.
    The residual adds are fused where the math allows. ``attn_mask`` / ``is_causal``: timm's masked attention
    (the fused attention with the mask as its additive bias). No Python control flow on tensor shapes or values:
    torch.fx traces it (the ops are leaf calls)."""
    plain = (isinstance(blk.ls1, nn.Identity) and isinstance(blk.ls2, nn.Identity)
             and (not blk.training or (isinstance(blk.drop_path1, nn.Identity)
                                       and isinstance(blk.drop_path2, nn.Identity))))
    # An fp32 stream is not added in the proj / per-op epilogues (they compute in the autocast dtype);
    # ln_mlp adds its fp32 input in fp32 and returns fp32.
    fp32_stream = keeps_fp32_stream(blk, x)
    lean_attn, lean_mlp = lean_parts(blk) if lean else (False, False)
    h = None  # norm2's output, when the per-op path fuses it with the first residual add

    # attention half: x <- x + drop_path1(ls1(attn(norm1(x))))
    if lean_attn:
        n1, qkv = blk.norm1, blk.attn.qkv
        qkv = ops.ln_linear(x, n1.weight, n1.bias, qkv.weight, qkv.bias, eps=n1.eps, backend=backend)  # (B, N, 3C)
    masked = attn_mask is not None or is_causal
    kw = dict(attn_mask=attn_mask, is_causal=is_causal) if masked else {}  # timm's Attention takes them too
    if plain and not fp32_stream:  # the residual add in proj's epilogue
        x = attention_from_qkv(blk.attn, qkv, x, backend, attn_mask, is_causal) if lean_attn \
            else blk.attn(blk.norm1(x), residual=x, **kw)
    else:
        a = attention_from_qkv(blk.attn, qkv, None, backend, attn_mask, is_causal) if lean_attn \
            else blk.attn(blk.norm1(x), **kw)
        branch = blk.drop_path1(_layer_scale(blk.ls1, a))
        if lean_mlp or fp32_stream or not _is_layer_norm(blk.norm2):
            x = x + branch
        else:  # x <- x + branch fused into norm2
            n2 = blk.norm2
            h, x = ops.layer_norm(branch, n2.weight, n2.bias, eps=n2.eps, residual=x, backend=backend)

    # MLP half: x <- x + drop_path2(ls2(mlp(norm2(x))))
    if lean_mlp:
        if plain:
            return _ln_mlp(blk, x, backend, add_input=True)
        return x + blk.drop_path2(_layer_scale(blk.ls2, _ln_mlp(blk, x, backend, add_input=False)))
    if plain and not fp32_stream:  # the residual add in fc2's epilogue
        return blk.mlp(blk.norm2(x), residual=x)
    h = blk.norm2(x) if h is None else h
    return x + blk.drop_path2(_layer_scale(blk.ls2, blk.mlp(h)))
