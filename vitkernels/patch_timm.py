"""Swap vitkernels' fused ops into an existing timm ``VisionTransformer``, in place.

    model = timm.create_model("vit_base_patch16_224", pretrained=True)
    vitkernels.patch_timm(model)          # same object, same Parameters, optimizer state stays valid
    vitkernels.unpatch_timm(model)        # back to timm's own forward

The modules, parameters, state_dict and everything else of the timm model stay as they are; only the
forwards of the model (``forward_features``), of each ``Block`` and its ``attn`` and ``mlp``, each LayerNorm
(with or without affine weight / bias) and the classifier head are replaced (per instance, with
``types.MethodType``) by the same functions vitkernels' own modules run (``block_forward``,
``attention_forward``, ``mlp_forward`` in vitkernels/nn/), which call ``vitkernels.ops`` with the timm modules'
own parameters:

    patch embed + prefix tokens + position embedding one ops.patch_embed (class, register, distillation tokens)
    norm1 + qkv                                      ops.ln_linear (LayerNorm fused into the GEMM)
    attention                                        ops.attention on strided views of the qkv output
    proj (+ residual)                                ops.linear with the residual add in its epilogue
    norm2 + fc1 + act + fc2 (+ residual)             ops.ln_mlp, one op (only z = fc1's pre-activation is
                                                     stored between the GEMMs; exact / tanh-GELU, QuickGELU,
                                                     SiLU)
    other LayerNorms (norm_pre, norm, fc_norm, q/k norm), heads  ops.layer_norm, ops.linear
    attention-pool head (global_pool='map', SigLIP)  vitkernels/nn/attention_pool.py: ops.linear, ops.attention
                                                     (one latent query over the tokens), ops.ln_mlp

With ``lean=False`` the blocks call every submodule instead (ops.layer_norm for norm1 / norm2, ops.linear for
qkv, fc1 + GELU, fc2), saving what timm saves for the backward; see vitkernels/nn/block.py.

What no fused op computes stays timm's own module, called where timm calls it: RmsNorm layers (a block with
an RmsNorm norm1 / norm2 takes the per-op path for that half: the norm, then the fused GEMMs and attention),
patch dropout (``patch_drop``, after the embedding), and the pooling ('token', 'avg', 'max', 'avgmax',
``pool_include_prefix``) in timm's unpatched ``forward_head``. A model without a position embedding
(``pos_embed='none'``) and ``dynamic_img_pad`` run through the same fused embedding.

timm's masked forward (``attn_mask`` / ``is_causal``) runs the fused attention with the mask as its additive
bias; attention dropout during training uses PyTorch's SDPA for the attention itself (no fused kernel
implements it); the GEMMs stay fused. Configurations that ``vitkernels.from_timm`` rejects (in a
VisionTransformer: SwiGLU / GLU MLPs, 'prr' pooling, ...) are rejected here with the same errors.

timm's other ViT families run on the forwards of vitkernels' ports of them, bound the same way onto timm's
own modules (whose attribute names the ports share):

    timm.models.eva.Eva (EVA-02, rope ViTs)  vitkernels/nn/eva.py: ``eva_forward_features`` (the fused embedding,
                                             timm's rope table), ``eva_block_forward``, ``eva_attention_forward``
                                             (ops.linear, ops.rope, ops.attention), the MLP's ``mlp_forward``
                                             (ops.glu_linear for SwiGLU / packed GluMlp)
    timm.models.beit.Beit                    vitkernels/nn/beit.py: ``beit_forward_features``,
                                             ``beit_block_forward``, ``beit_attention_forward`` (the relative
                                             position bias, per block and / or shared, as ops.attention's bias)

with timm's call signatures (``EvaBlock.forward(x, rope=None, attn_mask=None, is_causal=False)``,
``Block.forward(x, shared_rel_pos_bias=None)``), so timm's own ``forward_intermediates`` (timm's patch
embedding, then the patched blocks) and ``forward_head`` run unchanged. What ``eva_from_timm`` /
``beit_from_timm`` refuse is refused here with the same ValueError, before anything is modified (their
``check_timm_eva`` / ``check_timm_beit``); as the ports, a patched Eva raises on an attention mask. ``lean``
has no effect on them (their blocks always take the per-op path of the ports).

Nothing the timm model could do is lost: ``forward_intermediates`` (and timm's ``get_intermediate_layers``,
``FeatureGetterNet``) run the fused embedding and blocks, the same code path as ``forward_features``;
torch.compile, torch.export and torch.fx symbolic tracing capture the fused ops (each a leaf call for fx);
``torch.jit.script``, which cannot compile Python-dispatched ops, compiles timm's own code on the same
parameters (a patched module's ``__prepare_scriptable__`` hands TorchScript an unpatched shallow copy).
"""

from __future__ import annotations

import copy
import functools
import types

import torch
from torch import nn

from vitkernels import ops
from vitkernels.backends import OPS, BackendError, check_name, resolve
from vitkernels.convert import timm_vit_config
from vitkernels.features import forward_intermediates, trunk
from vitkernels.nn.attention import attention_forward, causal_mask
from vitkernels.nn.attention_pool import attention_pool_forward
from vitkernels.nn.beit import beit_attention_forward, beit_block_forward, beit_forward_features, check_timm_beit
from vitkernels.nn.block import block_forward
from vitkernels.nn.eva import check_timm_eva, eva_attention_forward, eva_block_forward, eva_forward_features
from vitkernels.nn.mlp import mlp_forward
from vitkernels.nn.vision_transformer import embed_tokens

__all__ = ["patch_timm", "unpatch_timm", "is_patched"]

_BACKEND = "_vitkernels_backend"  # attribute set on every patched module
_PATCHED = "_vitkernels_patched"  # names of the methods bound on a patched module
_LEAN = "_vitkernels_lean"  # set on every patched Block: run vitkernels' memory-lean block path


def _bind(module: nn.Module, name: str, fn, backend: str) -> None:
    setattr(module, name, types.MethodType(fn, module))
    setattr(module, _BACKEND, backend)
    setattr(module, _PATCHED, getattr(module, _PATCHED, ()) + (name,))


# -- replacement forwards -------------------------------------------------------------------------------------
def _layer_norm_forward(self: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return ops.layer_norm(x, self.weight, self.bias, eps=self.eps, backend=getattr(self, _BACKEND))


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.compiler.is_exporting():
        # The head's input is the pooled class token x[:, 0] (not contiguous) after timm's head_drop. torch 2.11's
        # export traces eval-mode dropout as a copy (contiguous) but runs it as an alias, so a backend's
        # contiguity step traced as a no-op would be missing at run time: copy the (B, C) input explicitly.
        x = x.clone(memory_format=torch.contiguous_format)
    return ops.linear(x, self.weight, self.bias, backend=getattr(self, _BACKEND))


def _attention_forward(self: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    return attention_forward(self, x, residual, getattr(self, _BACKEND), attn_mask, is_causal)


def _mlp_forward(self: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    return mlp_forward(self, x, residual, getattr(self, _BACKEND))


def _attention_pool_forward(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    return attention_pool_forward(self, x, getattr(self, _BACKEND), attn_mask)


def _block_forward(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                   is_causal: bool = False) -> torch.Tensor:
    return block_forward(self, x, getattr(self, _BACKEND), getattr(self, _LEAN, True), attn_mask, is_causal)


def _embed(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """images (B, C, H, W) -> tokens (B, prefix + N, D): patchify, project, class token, position, one op."""
    return embed_tokens(self, x, getattr(self, _BACKEND))


def _forward_features(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                      is_causal: bool = False) -> torch.Tensor:
    x, _ = trunk(self, x, functools.partial(_embed, self), attn_mask=attn_mask, is_causal=is_causal)
    return self.norm(x)


def _forward_intermediates(self: nn.Module, x: torch.Tensor, indices=None, return_prefix_tokens: bool = False,
                           norm: bool = False, stop_early: bool = False, output_fmt: str = "NCHW",
                           intermediates_only: bool = False, output_dict: bool = False,
                           attn_mask: torch.Tensor | None = None, is_causal: bool = False):
    """timm's forward_intermediates through the fused embedding and blocks: the same code path as the
    patched forward_features (vitkernels/features.py), so the two agree bit for bit."""
    return forward_intermediates(self, x, functools.partial(_embed, self), indices, return_prefix_tokens, norm,
                                 stop_early, output_fmt, intermediates_only, output_dict, attn_mask, is_causal)


# -- timm's Eva (EVA-02, rope ViTs) and Beit: the forwards of vitkernels/nn/eva.py and nn/beit.py ----------------
def _causal(x: torch.Tensor, attn_mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor | None:
    """timm's Eva blocks take ``is_causal`` beside ``attn_mask``: the fused attention takes it as a bool mask."""
    if not is_causal:
        return attn_mask
    if attn_mask is not None:
        raise ValueError("attn_mask and is_causal=True together: give one")
    return causal_mask(x.shape[1], x.shape[1], x.device)


def _eva_forward_features(self: nn.Module, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                          is_causal: bool = False) -> torch.Tensor:
    return eva_forward_features(self, x, getattr(self, _BACKEND), attn_mask, is_causal)


def _eva_block_forward(self: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
                       attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    return eva_block_forward(self, x, rope, getattr(self, _BACKEND), _causal(x, attn_mask, is_causal))


def _eva_attention_forward(self: nn.Module, x: torch.Tensor, rope: torch.Tensor | None = None,
                           attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
    return eva_attention_forward(self, x, rope, getattr(self, _BACKEND), _causal(x, attn_mask, is_causal))


def _beit_forward_features(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return beit_forward_features(self, x, getattr(self, _BACKEND))


def _beit_block_forward(self: nn.Module, x: torch.Tensor,
                        shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    return beit_block_forward(self, x, shared_rel_pos_bias, getattr(self, _BACKEND))


def _beit_attention_forward(self: nn.Module, x: torch.Tensor,
                            shared_rel_pos_bias: torch.Tensor | None = None) -> torch.Tensor:
    return beit_attention_forward(self, x, shared_rel_pos_bias, getattr(self, _BACKEND))


# timm's model class (module, name) -> (the port's check, forward_features, block forward, attention forward).
_FAMILIES = {
    ("timm.models.eva", "Eva"): (check_timm_eva, _eva_forward_features, _eva_block_forward, _eva_attention_forward),
    ("timm.models.beit", "Beit"): (check_timm_beit, _beit_forward_features, _beit_block_forward,
                                   _beit_attention_forward),
}


def _family(model: nn.Module):
    return _FAMILIES.get((type(model).__module__, type(model).__name__))


def _unpatched_copy(module: nn.Module) -> nn.Module:
    """A shallow copy of the module tree without vitkernels' bound methods: the same Parameter and buffer
    objects, timm's own forwards. What torch.jit.script compiles for a patched model."""
    copy_ = copy.copy(module)
    for name in copy_.__dict__.pop(_PATCHED, ()):
        copy_.__dict__.pop(name, None)
    for name in (_BACKEND, _LEAN):
        copy_.__dict__.pop(name, None)
    copy_._modules = {k: None if m is None else _unpatched_copy(m) for k, m in module._modules.items()}
    return copy_


def _prepare_scriptable(self: nn.Module) -> nn.Module:
    """torch.jit.script calls this first: TorchScript cannot compile vitkernels' Python ops, so scripting a
    patched model compiles timm's own code on the same parameters (the model itself stays patched)."""
    return _unpatched_copy(self)


# -- public API -----------------------------------------------------------------------------------------------
def is_patched(model: nn.Module) -> bool:
    return _PATCHED in model.__dict__


def patch_timm(model: nn.Module, backend: str = "auto", lean: bool = True) -> nn.Module:
    """Run a timm ``VisionTransformer``, ``Eva`` or ``Beit`` on vitkernels ops, in place; returns the same model.

    Args:
        model: ``timm.models.vision_transformer.VisionTransformer`` (or ``VisionTransformerDistilled``), or
            timm's ``timm.models.eva.Eva`` / ``timm.models.beit.Beit`` (see the module docstring).
        backend: 'auto' | 'triton' | 'cuda' | 'torch' for every op. Patching a patched model changes the backend.
        lean: the memory-lean blocks (vitkernels/nn/block.py: norm1 fused into qkv, norm2 + MLP one op; hooks
            on norm1 / attn / norm2 / mlp do not fire). False: every submodule's forward is called.

    Raises:
        TypeError for another model type; ``vitkernels.convert.UnsupportedModelError`` naming an unsupported
        feature (for an Eva / Beit, the ValueError of ``eva_from_timm`` / ``beit_from_timm``). Nothing is
        modified when it raises.
    """
    backend = check_name(backend)
    family = _family(model)
    if family is not None:
        family[0](model)  # eva_from_timm's / beit_from_timm's ValueError for what the port does not compute
    else:
        timm_vit_config(model)  # validates everything the replacement forwards rely on
    if is_patched(model):
        unpatch_timm(model)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            _bind(m, "forward", _layer_norm_forward, backend)
    if family is not None:
        _patch_family(model, family, backend)
    else:
        _patch_vit(model, backend, lean)
    # Probe the backends now, outside any torch.compile trace (probing imports modules, which dynamo cannot
    # trace). A backend that cannot run here raises at the first forward, with its reason.
    device = model.patch_embed.proj.weight.device
    for op in OPS:
        try:
            resolve(op, backend, device)
        except BackendError:
            pass
    return model


def _patch_family(model: nn.Module, family, backend: str) -> None:
    """timm's Eva / Beit: the port's forward_features (fused embedding, then the blocks called as modules with
    timm's signatures), block and attention forwards; the MLP through mlp_forward (bound too, for direct
    calls); the head's Linear. forward_head (pooling) and forward_intermediates stay timm's: the latter runs
    timm's patch embedding, then the patched blocks."""
    _, forward_features, block_forward_, attention_forward_ = family
    for blk in model.blocks:
        _bind(blk, "forward", block_forward_, backend)
        _bind(blk.attn, "forward", attention_forward_, backend)
        _bind(blk.mlp, "forward", _mlp_forward, backend)
    if isinstance(model.head, nn.Linear):
        _bind(model.head, "forward", _linear_forward, backend)
    _bind(model, "forward_features", forward_features, backend)
    _bind(model, "__prepare_scriptable__", _prepare_scriptable, backend)


def _patch_vit(model: nn.Module, backend: str, lean: bool) -> None:
    for blk in model.blocks:
        _bind(blk, "forward", _block_forward, backend)
        setattr(blk, _LEAN, lean)
        _bind(blk.attn, "forward", _attention_forward, backend)
        _bind(blk.mlp, "forward", _mlp_forward, backend)
    for head in (model.head, getattr(model, "head_dist", None)):
        if isinstance(head, nn.Linear):
            _bind(head, "forward", _linear_forward, backend)
    if getattr(model, "attn_pool", None) is not None:
        _bind(model.attn_pool, "forward", _attention_pool_forward, backend)
    _bind(model, "forward_features", _forward_features, backend)
    _bind(model, "forward_intermediates", _forward_intermediates, backend)
    _bind(model, "__prepare_scriptable__", _prepare_scriptable, backend)


def unpatch_timm(model: nn.Module) -> nn.Module:
    """Undo ``patch_timm``: every module runs timm's own forward again. Returns the same model."""
    for m in model.modules():
        for name in m.__dict__.pop(_PATCHED, ()):
            m.__dict__.pop(name, None)
        m.__dict__.pop(_BACKEND, None)
        m.__dict__.pop(_LEAN, None)
    return model
