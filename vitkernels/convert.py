"""Weight conversion into ``vitkernels.VisionTransformer`` from timm, torchvision, Hugging Face and JAX.

    model = vitkernels.from_timm(timm_model)                 # timm.models.vision_transformer.VisionTransformer
    model = vitkernels.from_torchvision(tv_model)            # torchvision.models.VisionTransformer
    model = vitkernels.from_hf(hf_model)                     # transformers ViT, DINOv2 (+registers), SigLIP(2)
    vitkernels.load_npz(model, "ViT-B_16.npz")               # google-research/vision_transformer, big_vision

Each converter reads the source model's configuration from its modules (not from a config name), builds the
matching vitkernels model on the source's device and dtype, and loads every parameter strictly, so that the
logits are those of the source model. Norm eps is copied module by module (timm and torchvision use 1e-6,
Hugging Face's ViT 1e-12). From timm, every configuration ``vitkernels.VisionTransformer`` builds converts:
LayerNorm with or without affine weight / bias, RmsNorm, patch dropout, 'token' / 'avg' / 'max' / 'avgmax'
pooling (``pool_include_prefix``), SigLIP's attention-pool head ('map'), register tokens, DeiT's distillation
token and head (``VisionTransformerDistilled``), exact / tanh-GELU, QuickGELU and SiLU MLPs, no position
embedding, ``dynamic_img_pad``. Whatever vitkernels cannot compute exactly (SwiGLU, RoPE, a representation
layer, ...) is rejected with an error naming the feature: a converted model never gives a silently different
answer.

The JAX ``.npz`` layouts (``load_npz``):
    embedding/kernel (P, P, C, D) HWIO, embedding/bias (D,), cls (1, 1, D)
    original ViT: Transformer/posembed_input/pos_embedding (1, 1 + N, D) (the class token has a position);
        blocks Transformer/encoderblock_{i}/{LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2,
        MlpBlock_3}
    big_vision: pos_embedding (1, N, D) (patches only: the class token, if any, gets no position); blocks
        .../{LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1, MlpBlock_0}, optionally "scanned"
        (Transformer/encoderblock/... with a leading depth axis); keys often under params/ or opt/target/.
    attention: {query, key, value}/kernel (D, H, Dh), bias (H, Dh); out/kernel (H, Dh, D), out/bias (D,)
    MLP: Dense_0/kernel (D, hidden), Dense_1/kernel (hidden, D); Transformer/encoder_norm; head/kernel (D, K).
JAX Dense kernels are (in, out): a torch Linear weight is the transpose.
"""

from __future__ import annotations

import functools
import math
import warnings
from typing import Callable, NamedTuple

import torch
from torch import nn

from vitkernels.nn.block import DropPath
from vitkernels.nn.deit import VisionTransformerDistilled
from vitkernels.nn.mlp import ACTIVATIONS, GLU_ACTIVATIONS, GluMlp, SwiGLU, epilogue_activation
from vitkernels.nn.norm import LayerNorm, RmsNorm
from vitkernels.nn.norm import _kind as norm_kind
from vitkernels.nn.pos_embed import resample_pos_embed
from vitkernels.nn.vision_transformer import POOLS, VisionTransformer

__all__ = ["from_timm", "from_torchvision", "from_hf", "load_npz", "timm_vit_config", "UnsupportedModelError",
           "NpzLoadResult"]


class UnsupportedModelError(ValueError):
    """The source model uses a feature that vitkernels' VisionTransformer does not implement."""


def _unsupported(source: str, feature: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{source}: {feature} is not supported by vitkernels.VisionTransformer")


# -- shared helpers -----------------------------------------------------------------------------------------
def _mlp_ratio(dim: int, hidden: int) -> float:
    """A ratio r with int(dim * r) == hidden (the constructors compute the MLP width that way)."""
    ratio = hidden / dim
    if int(dim * ratio) != hidden:  # float rounding landed just below the integer
        ratio = (hidden + 0.5) / dim
    return ratio


def _is_layer_norm(m: nn.Module) -> bool:
    """A full LayerNorm (affine weight and bias): what vitkernels' LayerNorm computes."""
    return isinstance(m, nn.LayerNorm) and m.elementwise_affine and m.bias is not None and len(m.normalized_shape) == 1


def _check_norm(source: str, name: str, m: nn.Module, allow_identity: bool = True) -> bool:
    """True for a LayerNorm, False for Identity (when allowed); anything else is rejected by name."""
    if allow_identity and isinstance(m, nn.Identity):
        return False
    if _is_layer_norm(m):
        return True
    if isinstance(m, nn.LayerNorm):
        raise _unsupported(source, f"LayerNorm without affine weight and bias ({name})")
    raise _unsupported(source, f"normalization layer {type(m).__name__} at {name} (only LayerNorm is supported)")


def _timm_norm(source: str, name: str, m: nn.Module, required: bool = False) -> tuple[str, bool, bool] | None:
    """A timm model's norm -> (kind, affine weight, bias) for the norms vitkernels computes exactly ('layernorm':
    nn.LayerNorm or timm's LayerNorm; 'rmsnorm': timm's RmsNorm or nn.RMSNorm); None for Identity (unless
    ``required``). Anything else is rejected by name."""
    if not required and isinstance(m, nn.Identity):
        return None
    kind = norm_kind(m)
    if kind is None:
        raise _unsupported(source, f"normalization layer {type(m).__module__}.{type(m).__qualname__} at {name} "
                                   "(LayerNorm and RmsNorm are supported)")
    return kind, m.weight is not None, getattr(m, "bias", None) is not None


def _describe_norm(spec: tuple[str, bool, bool]) -> str:
    kind, affine, bias = spec
    if kind == "rmsnorm":
        return "RmsNorm" + ("" if affine else " without weight")
    return "LayerNorm" + ("" if affine else " without weight") + ("" if bias else " without bias")


def _norm_layer(spec: tuple[str, bool, bool], eps: float | None):
    """(kind, affine, bias) -> the ``norm_layer`` argument that builds it (None: vitkernels' default LayerNorm)."""
    kind, affine, bias = spec
    if kind == "rmsnorm":
        return functools.partial(RmsNorm, eps=eps, affine=affine)
    if affine and bias:
        return None
    return functools.partial(LayerNorm, eps=eps, elementwise_affine=affine, bias=bias)


def _is_exact_gelu(m: nn.Module) -> bool:  # torchvision / HF ViT MLPs
    if isinstance(m, nn.GELU):
        return m.approximate == "none"
    try:
        from timm.layers.activations import GELU as TimmGELU
    except ImportError:  # pragma: no cover - timm is installed whenever a timm model exists
        return False
    return type(m) is TimmGELU


def _build(config: dict, state_dict: dict, eps: dict[str, float], like: torch.Tensor, training: bool,
           backend: str, drop_path: list[float] | None = None, model_cls=VisionTransformer) -> VisionTransformer:
    """Construct the vitkernels model, set each norm's eps (LayerNorm, RmsNorm; ``eps`` by module name), move it
    to ``like``'s device and dtype and load ``state_dict`` (timm keys) strictly."""
    values = set(eps.values())
    if len(values) == 1 and None not in values:
        config = dict(config, norm_eps=float(values.pop()))
    model = model_cls(**config, weight_init="skip", backend=backend)
    for name, value in eps.items():  # per module as well: q/k norms, and checkpoints with mixed eps
        norm = model.get_submodule(name)
        if norm_kind(norm) is None:
            raise RuntimeError(f"vitkernels model has no norm layer at {name!r}")  # a bug in a converter
        norm.eps = None if value is None else float(value)
    if drop_path is not None:
        for blk, p in zip(model.blocks, drop_path):
            blk.drop_path1 = DropPath(p) if p > 0 else nn.Identity()
            blk.drop_path2 = DropPath(p) if p > 0 else nn.Identity()
    model.to(device=like.device, dtype=like.dtype)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:  # a converter bug, never a user error: say exactly what differs
        raise RuntimeError(f"conversion produced mismatched keys: missing {missing}, unexpected {unexpected}")
    bad = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}" for k in own
           if tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if bad:
        raise RuntimeError(f"conversion produced mismatched shapes: {bad}")
    model.load_state_dict(state_dict, strict=True)
    return model.train(training)


# -- timm -----------------------------------------------------------------------------------------------------
def timm_vit_config(model: nn.Module) -> dict:
    """Read the constructor arguments of a timm ``VisionTransformer`` from its modules.

    Returns a dict of ``vitkernels.VisionTransformer`` arguments. Raises TypeError for a model that is not a
    timm VisionTransformer and UnsupportedModelError naming the first feature vitkernels cannot compute.
    """
    src = "from_timm"
    try:
        from timm.layers import PatchDropout as TimmPatchDropout
        from timm.layers import PatchEmbed as TimmPatchEmbed
        from timm.layers.attention import Attention as TimmAttention
        from timm.models.vision_transformer import Block as TimmBlock
        from timm.models.vision_transformer import VisionTransformer as TimmViT
    except ImportError as exc:  # pragma: no cover
        raise ImportError(f"{src} needs timm: {exc}") from exc
    if not isinstance(model, TimmViT):
        rope = any("rope" in n for n, _ in model.named_modules())
        hint = " (RoPE position embeddings are not supported)" if rope else ""
        raise TypeError(f"{src} expects timm.models.vision_transformer.VisionTransformer, got "
                        f"{type(model).__module__}.{type(model).__name__}{hint}")
    distilled = _is_timm_distilled(model)
    if type(model) is not TimmViT and not distilled:
        raise _unsupported(src, f"{type(model).__name__} (a subclass of VisionTransformer)")
    reg_tokens = 0 if getattr(model, "reg_token", None) is None else int(model.reg_token.shape[1])
    if distilled and reg_tokens:
        raise _unsupported(src, "register tokens with a distillation token")
    if model.global_pool not in POOLS + ("map",):
        raise _unsupported(src, f"global_pool={model.global_pool!r}")
    patch_drop = getattr(model, "patch_drop", nn.Identity())
    if not isinstance(patch_drop, (nn.Identity, TimmPatchDropout)):
        raise _unsupported(src, f"patch dropout module {type(patch_drop).__name__} (timm's PatchDropout is supported)")

    pe = model.patch_embed
    if type(pe) is not TimmPatchEmbed or hasattr(pe, "backbone"):
        raise _unsupported(src, f"patch embedding {type(pe).__name__} (hybrid CNN stems are not supported)")
    if not isinstance(pe.norm, nn.Identity):
        raise _unsupported(src, "a norm layer in the patch embedding (embed_norm_layer)")
    proj = pe.proj
    if (not isinstance(proj, nn.Conv2d) or proj.kernel_size != proj.stride or proj.kernel_size[0] != proj.kernel_size[1]
            or proj.padding != (0, 0) or proj.dilation != (1, 1) or proj.groups != 1):
        raise _unsupported(src, f"patch projection {proj} (need a square Conv2d with kernel = stride)")
    if pe.img_size is None:
        raise _unsupported(src, "a patch embedding without img_size")
    norms = {"norm_pre": _timm_norm(src, "norm_pre", model.norm_pre)}  # module name -> (kind, affine, bias)
    pre_norm = norms["norm_pre"] is not None
    if (proj.bias is None) != pre_norm:
        raise _unsupported(src, "a patch projection bias that does not follow pre_norm (bias = not pre_norm)")

    D = model.embed_dim
    blocks = list(model.blocks)
    if not blocks:
        raise _unsupported(src, "depth 0")
    per_block = []
    for i, blk in enumerate(blocks):
        where = f"blocks.{i}"
        if type(blk) is not TimmBlock:
            raise _unsupported(src, f"block type {type(blk).__name__} at {where}")
        attn, mlp = blk.attn, blk.mlp
        if type(attn) is not TimmAttention:
            raise _unsupported(src, f"attention type {type(attn).__name__} at {where}.attn")
        if getattr(attn, "gate", None) is not None:
            raise _unsupported(src, f"gated attention at {where}.attn")
        if not isinstance(getattr(attn, "norm", nn.Identity()), nn.Identity):
            raise _unsupported(src, f"attention output norm (scale_attn_norm) at {where}.attn")
        if attn.num_heads * attn.head_dim != D or attn.proj.out_features != D:
            raise _unsupported(src, f"attention width {attn.num_heads} x {attn.head_dim} != embed_dim {D} at {where}")
        if not math.isclose(attn.scale, attn.head_dim ** -0.5, rel_tol=1e-12):
            raise _unsupported(src, f"attention scale {attn.scale} != head_dim ** -0.5 at {where}")
        for name in ("q_norm", "k_norm"):
            norms[f"{where}.attn.{name}"] = _timm_norm(src, f"{where}.attn.{name}", getattr(attn, name))
        qk_norm = norms[f"{where}.attn.q_norm"] is not None
        if qk_norm != (norms[f"{where}.attn.k_norm"] is not None):
            raise _unsupported(src, f"q_norm without k_norm at {where}")
        mlp_kind = _timm_mlp_kind(mlp)
        if mlp_kind is None:
            raise _unsupported(src, f"MLP type {type(mlp).__name__} at {where}.mlp (Mlp, GluMlp / SwiGLUPacked and "
                               "SwiGLU are supported)")
        act = epilogue_activation(mlp.act)
        allowed = GLU_ACTIVATIONS if mlp_kind != "mlp" else ACTIVATIONS
        if act not in allowed:
            raise _unsupported(src, f"activation {mlp.act} at {where}.mlp.act (the fused epilogue computes "
                               f"{', '.join(allowed)})")
        norms[f"{where}.mlp.norm"] = _timm_norm(src, f"{where}.mlp.norm", mlp.norm)
        fc1s = [mlp.fc1_g, mlp.fc1_x] if mlp_kind == "swiglu" else [mlp.fc1]
        if not all(isinstance(m, nn.Linear) for m in fc1s + [mlp.fc2]):
            raise _unsupported(src, f"non-Linear fc1/fc2 at {where}.mlp (use_conv)")
        proj_bias = attn.proj.bias is not None
        if any((m.bias is not None) != proj_bias for m in fc1s + [mlp.fc2]):
            raise _unsupported(src, f"MLP biases that differ from the attention projection's at {where}")
        hidden = fc1s[0].out_features
        for name in ("norm1", "norm2"):
            norms[f"{where}.{name}"] = _timm_norm(src, f"{where}.{name}", getattr(blk, name), required=True)
        layer_scale = []
        for name in ("ls1", "ls2"):
            ls = getattr(blk, name)
            if isinstance(ls, nn.Identity):
                layer_scale.append(False)
            elif isinstance(getattr(ls, "gamma", None), nn.Parameter) and ls.gamma.shape == (D,):
                layer_scale.append(True)
            else:
                raise _unsupported(src, f"{type(ls).__name__} at {where}.{name}")
        if layer_scale[0] != layer_scale[1]:
            raise _unsupported(src, f"LayerScale on one branch only at {where}")
        per_block.append(dict(num_heads=attn.num_heads, hidden=hidden, qkv_bias=attn.qkv.bias is not None,
                              proj_bias=proj_bias, qk_norm=qk_norm, layer_scale=layer_scale[0], act=act,
                              mlp=(mlp_kind, getattr(mlp, "gate_last", None)),
                              mlp_norm=not isinstance(mlp.norm, nn.Identity)))
    if any(b != per_block[0] for b in per_block[1:]):
        raise _unsupported(src, "blocks with different configurations")
    b0 = per_block[0]

    if getattr(model, "attn_pool", None) is not None:
        _check_timm_attn_pool(src, model.attn_pool, b0, D)
        norms["attn_pool.norm"] = _timm_norm(src, "attn_pool.norm", model.attn_pool.norm, required=True)
    norms["norm"] = _timm_norm(src, "norm", model.norm)
    norms["fc_norm"] = _timm_norm(src, "fc_norm", model.fc_norm)
    final_norm, fc_norm = norms["norm"] is not None, norms["fc_norm"] is not None
    norms = {name: spec for name, spec in norms.items() if spec is not None}
    kinds = {}  # VisionTransformer builds every norm with one norm_layer (as timm's constructor does)
    for name, spec in norms.items():
        kinds.setdefault(spec, name)
    if len(kinds) > 1:
        described = ", ".join(f"{name} is {_describe_norm(spec)}" for spec, name in kinds.items())
        raise _unsupported(src, f"normalization layers of different kinds ({described})")
    first = next(iter(norms))  # norm1 at least
    head = model.head
    if not isinstance(head, (nn.Linear, nn.Identity)):
        raise _unsupported(src, f"classifier head {type(head).__name__}")
    dp = blocks[-1].drop_path1
    return dict(
        img_size=tuple(pe.img_size), patch_size=proj.kernel_size[0], in_chans=proj.in_channels,
        num_classes=head.out_features if isinstance(head, nn.Linear) else 0, global_pool=model.global_pool,
        embed_dim=D, depth=len(blocks), num_heads=b0["num_heads"], mlp_ratio=_mlp_ratio(D, b0["hidden"]),
        qkv_bias=b0["qkv_bias"], qk_norm=b0["qk_norm"], proj_bias=b0["proj_bias"],
        init_values=1e-5 if b0["layer_scale"] else None, class_token=model.cls_token is not None,
        reg_tokens=reg_tokens, act_layer=b0["act"], mlp_layer=_mlp_layer(*b0["mlp"]), scale_mlp_norm=b0["mlp_norm"],
        pos_embed="learn" if model.pos_embed is not None else "none", no_embed_class=bool(model.no_embed_class),
        pre_norm=pre_norm, final_norm=final_norm or fc_norm, fc_norm=fc_norm,
        pool_include_prefix=bool(getattr(model, "pool_include_prefix", False)),
        dynamic_img_size=bool(model.dynamic_img_size), dynamic_img_pad=bool(getattr(pe, "dynamic_img_pad", False)),
        drop_rate=model.head_drop.p, pos_drop_rate=model.pos_drop.p,
        patch_drop_rate=float(getattr(patch_drop, "prob", 0.0)), proj_drop_rate=blocks[0].attn.proj_drop.p,
        attn_drop_rate=blocks[0].attn.attn_drop.p, drop_path_rate=float(getattr(dp, "drop_prob", 0.0)),
        norm_layer=_norm_layer(norms[first], model.get_submodule(first).eps),
    )


def _timm_mlp_kind(mlp: nn.Module) -> str | None:
    """'mlp', 'glu' (GluMlp, SwiGLUPacked) or 'swiglu' for timm's MLP classes; None for any other."""
    from timm.layers.mlp import GluMlp as TimmGluMlp
    from timm.layers.mlp import Mlp as TimmMlp
    from timm.layers.mlp import SwiGLU as TimmSwiGLU

    return {TimmMlp: "mlp", TimmGluMlp: "glu", TimmSwiGLU: "swiglu"}.get(type(mlp))


def _mlp_layer(kind: str, gate_last: bool | None):
    """VisionTransformer's ``mlp_layer`` for a timm MLP kind (the activation comes with ``act_layer``)."""
    if kind == "glu":
        return functools.partial(GluMlp, gate_last=gate_last)
    return SwiGLU if kind == "swiglu" else None


def _is_timm_distilled(model: nn.Module) -> bool:
    try:
        from timm.models.deit import VisionTransformerDistilled as TimmDistilled
    except ImportError:  # pragma: no cover
        return False
    return type(model) is TimmDistilled


def _check_timm_attn_pool(src: str, pool: nn.Module, b0: dict, D: int) -> None:
    """timm's AttentionPoolLatent as ``global_pool='map'`` builds it (SigLIP): one latent, q projection, no
    q/k norm or position embedding, the blocks' heads, MLP ratio and activation, 'token' pooling."""
    try:
        from timm.layers.attention_pool import AttentionPoolLatent as TimmPool
    except ImportError:  # pragma: no cover
        raise _unsupported(src, "attention pooling without timm's AttentionPoolLatent") from None
    if type(pool) is not TimmPool:
        raise _unsupported(src, f"attention pool {type(pool).__name__}")
    checks = [
        (pool.latent_len == 1, f"latent_len={pool.latent_len}"),
        (pool.pos_embed is None, "an attention-pool position embedding"),
        (isinstance(pool.q, nn.Linear) and pool.q.bias is not None and pool.kv.bias is not None,
         "an attention pool without q projection or qkv bias"),
        (isinstance(pool.q_norm, nn.Identity) and isinstance(pool.k_norm, nn.Identity), "attention-pool q/k norm"),
        (pool.pool == "token", f"attention-pool pool_type={pool.pool!r}"),
        (pool.num_heads == b0["num_heads"] and pool.head_dim * pool.num_heads == D,
         f"attention-pool heads {pool.num_heads} != the blocks' {b0['num_heads']}"),
        (pool.mlp is not None and pool.mlp.fc1.out_features == b0["hidden"], "an attention-pool MLP width other than "
         "the blocks'"),
        (pool.mlp is not None and epilogue_activation(pool.mlp.act) == b0["act"], "an attention-pool activation "
         "other than the blocks'"),
    ]
    for ok, feature in checks:
        if not ok:
            raise _unsupported(src, feature)


def from_timm(model: nn.Module, backend: str = "auto") -> VisionTransformer:
    """A vitkernels VisionTransformer equal to a timm ``VisionTransformer`` (same config, weights, mode); a timm
    ``VisionTransformerDistilled`` gives a ``VisionTransformerDistilled``, a timm ``Eva`` (EVA-02, the rope ViTs)
    a ``vitkernels.Eva`` (``eva_from_timm``), a timm ``Beit`` a ``vitkernels.Beit`` (``beit_from_timm``).

    Args:
        model: ``timm.models.vision_transformer.VisionTransformer``, e.g.
            ``timm.create_model("vit_base_patch16_224")``; timm's DeiT distilled, Eva or Beit.
        backend: the vitkernels backend of the new model.

    The new model owns copies of the weights, on the source's device and dtype, in the source's train/eval mode.
    Its norms are the source's kind (LayerNorm with or without weight / bias, RmsNorm) with each module's eps;
    patch dropout, stochastic depth and every dropout keep their rates, so a seeded training step draws the
    same masks as timm's.
    """
    if type(model).__module__ == "timm.models.eva" and type(model).__name__ == "Eva":
        from vitkernels.nn.eva import eva_from_timm  # EVA-02 and timm's rope ViTs

        return eva_from_timm(model, backend=backend)
    if type(model).__module__ == "timm.models.beit" and type(model).__name__ == "Beit":
        from vitkernels.nn.beit import beit_from_timm  # BEiT: relative position bias on ops.attention's bias

        return beit_from_timm(model, backend=backend)
    config = timm_vit_config(model)
    eps = {name: m.eps for name, m in model.named_modules() if norm_kind(m) is not None}
    drop_path = [float(getattr(blk.drop_path1, "drop_prob", 0.0)) for blk in model.blocks]
    state_dict = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model_cls = VisionTransformerDistilled if _is_timm_distilled(model) else VisionTransformer
    new = _build(config, state_dict, eps, model.patch_embed.proj.weight, model.training, backend, drop_path,
                 model_cls)
    if model_cls is VisionTransformerDistilled:
        new.distilled_training = bool(model.distilled_training)
    if config["patch_drop_rate"] > 0:  # the source module's settings (timm's constructor leaves ordered False)
        new.patch_drop.ordered = bool(model.patch_drop.ordered)
        new.patch_drop.num_prefix_tokens = int(model.patch_drop.num_prefix_tokens)
    return new


# -- torchvision ----------------------------------------------------------------------------------------------
def from_torchvision(model: nn.Module, backend: str = "auto") -> VisionTransformer:
    """A vitkernels VisionTransformer equal to a ``torchvision.models.VisionTransformer`` (vit_b_16, ...).

    torchvision's layout: conv_proj, class_token, encoder.pos_embedding (class token included),
    encoder.layers.encoder_layer_{i}.{ln_1, self_attention (nn.MultiheadAttention, packed in_proj = qkv),
    ln_2, mlp (Linear, GELU, Dropout, Linear, Dropout)}, encoder.ln, heads.head; classification on the
    class token after the final LayerNorm. A conv stem or a representation layer (``representation_size``)
    is rejected.
    """
    src = "from_torchvision"
    try:
        from torchvision.models.vision_transformer import VisionTransformer as TvViT
    except ImportError as exc:
        raise ImportError(f"{src} needs torchvision: {exc}") from exc
    if not isinstance(model, TvViT):
        raise TypeError(f"{src} expects torchvision.models.VisionTransformer, got "
                        f"{type(model).__module__}.{type(model).__name__}")
    conv = model.conv_proj
    if not isinstance(conv, nn.Conv2d):
        raise _unsupported(src, "a convolutional stem (conv_stem_configs)")
    heads = dict(model.heads.named_children())
    if set(heads) != {"head"} or not isinstance(heads["head"], nn.Linear):
        raise _unsupported(src, f"classifier layers {list(heads)} (representation_size / pre_logits)")
    D = model.hidden_dim
    layers = list(model.encoder.layers)
    if not layers:
        raise _unsupported(src, "num_layers 0")
    sd = {
        "patch_embed.proj.weight": conv.weight, "patch_embed.proj.bias": conv.bias,
        "cls_token": model.class_token, "pos_embed": model.encoder.pos_embedding,
        "norm.weight": model.encoder.ln.weight, "norm.bias": model.encoder.ln.bias,
        "head.weight": model.heads.head.weight, "head.bias": model.heads.head.bias,
    }
    _check_norm(src, "encoder.ln", model.encoder.ln, allow_identity=False)
    eps = {"norm": model.encoder.ln.eps}
    num_heads = layers[0].self_attention.num_heads
    hidden = None
    for i, layer in enumerate(layers):
        where = f"encoder.layers.{i}"
        mha = layer.self_attention
        if not isinstance(mha, nn.MultiheadAttention) or not mha._qkv_same_embed_dim:
            raise _unsupported(src, f"attention {type(mha).__name__} without packed in_proj at {where}")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise _unsupported(src, f"add_bias_kv / add_zero_attn at {where}")
        if mha.in_proj_bias is None or mha.out_proj.bias is None or mha.num_heads != num_heads:
            raise _unsupported(src, f"an attention layer without biases or with different heads at {where}")
        linears = [m for m in layer.mlp.modules() if isinstance(m, nn.Linear)]
        acts = [m for m in layer.mlp.children() if not isinstance(m, (nn.Linear, nn.Dropout))]
        if len(linears) != 2 or len(acts) != 1 or not _is_exact_gelu(acts[0]):
            raise _unsupported(src, f"MLP {layer.mlp} at {where} (need Linear, exact GELU, Linear)")
        fc1, fc2 = linears
        if fc1.bias is None or fc2.bias is None:
            raise _unsupported(src, f"an MLP without biases at {where}")
        if hidden is not None and fc1.out_features != hidden:
            raise _unsupported(src, "layers with different MLP widths")
        hidden = fc1.out_features
        _check_norm(src, f"{where}.ln_1", layer.ln_1, allow_identity=False)
        _check_norm(src, f"{where}.ln_2", layer.ln_2, allow_identity=False)
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": layer.ln_1.weight, b + "norm1.bias": layer.ln_1.bias,
            b + "attn.qkv.weight": mha.in_proj_weight, b + "attn.qkv.bias": mha.in_proj_bias,  # rows q, k, v
            b + "attn.proj.weight": mha.out_proj.weight, b + "attn.proj.bias": mha.out_proj.bias,
            b + "norm2.weight": layer.ln_2.weight, b + "norm2.bias": layer.ln_2.bias,
            b + "mlp.fc1.weight": fc1.weight, b + "mlp.fc1.bias": fc1.bias,
            b + "mlp.fc2.weight": fc2.weight, b + "mlp.fc2.bias": fc2.bias,
        })
        eps[b + "norm1"], eps[b + "norm2"] = layer.ln_1.eps, layer.ln_2.eps
    config = dict(
        img_size=model.image_size, patch_size=model.patch_size, in_chans=conv.in_channels,
        num_classes=model.heads.head.out_features, global_pool="token", embed_dim=D, depth=len(layers),
        num_heads=num_heads, mlp_ratio=_mlp_ratio(D, hidden), qkv_bias=True, class_token=True,
        pos_drop_rate=model.dropout, proj_drop_rate=model.dropout, attn_drop_rate=model.attention_dropout,
    )
    sd = {k: v.detach().clone() for k, v in sd.items()}
    return _build(config, sd, eps, model.class_token, model.training, backend)


# -- Hugging Face transformers -------------------------------------------------------------------------------
def _hf_layers(vit: nn.Module) -> list[dict]:
    """Per layer: the modules under both transformers layouts (4.x: encoder.layer.{i}.attention.attention.
    query ...; 5.x: layers.{i}.attention.q_proj ...)."""
    if hasattr(vit, "layers"):
        return [dict(ln1=l.layernorm_before, q=l.attention.q_proj, k=l.attention.k_proj, v=l.attention.v_proj,
                     o=l.attention.o_proj, ln2=l.layernorm_after, fc1=l.mlp.fc1, fc2=l.mlp.fc2) for l in vit.layers]
    return [dict(ln1=l.layernorm_before, q=l.attention.attention.query, k=l.attention.attention.key,
                 v=l.attention.attention.value, o=l.attention.output.dense, ln2=l.layernorm_after,
                 fc1=l.intermediate.dense, fc2=l.output.dense) for l in vit.encoder.layer]


def _from_hf_family(model: nn.Module, backend: str) -> VisionTransformer:
    """DINOv2 (with registers) and SigLIP / SigLIP2 vision towers: vitkernels.convert_hf maps them to timm's
    arguments and keys, which VisionTransformer takes as they are."""
    from vitkernels.convert_hf import hf_to_timm

    kwargs, state_dict = hf_to_timm(model)
    like = next(iter(state_dict.values()))
    new = VisionTransformer(**kwargs, weight_init="skip", backend=backend).to(device=like.device, dtype=like.dtype)
    new.load_state_dict(state_dict, strict=True)
    return new.train(model.training)


def from_hf(model: nn.Module, backend: str = "auto") -> VisionTransformer:
    """A vitkernels VisionTransformer equal to a transformers ``ViTModel`` / ``ViTForImageClassification``, or
    to a DINOv2 (``Dinov2Model``, ``Dinov2WithRegistersModel``) or SigLIP / SigLIP2 vision model
    (``SiglipVisionModel``, ``Siglip2VisionModel``, the vision tower of ``SiglipModel`` / ``Siglip2Model``,
    ``Siglip*ForImageClassification``; vitkernels/convert_hf.py): for those, forward_features equals
    ``last_hidden_state`` and the attention-pool head's output ``pooler_output``.

    For ``ViTModel`` the result has no head (num_classes=0): its ``forward_features`` equals
    ``last_hidden_state``. HF's pooler (dense + tanh on the class token, ``pooler_output``) has no
    vitkernels equivalent and is dropped with a warning. For ``ViTForImageClassification`` the logits equal
    HF's (classifier on the final-LayerNormed class token). The LayerNorm eps is the checkpoint's
    (``config.layer_norm_eps``, 1e-12 by default in HF, not timm's 1e-6).
    """
    src = "from_hf"
    from vitkernels.convert_hf import _CLASSES, _REJECTED

    if type(model).__name__ in _CLASSES + tuple(_REJECTED):
        return _from_hf_family(model, backend)
    try:
        from transformers import ViTForImageClassification, ViTModel
    except ImportError as exc:
        raise ImportError(f"{src} needs transformers: {exc}") from exc
    if isinstance(model, ViTForImageClassification):
        vit, classifier = model.vit, model.classifier
    elif isinstance(model, ViTModel):
        vit, classifier = model, None
    else:
        raise TypeError(f"{src} expects transformers ViTModel or ViTForImageClassification, got "
                        f"{type(model).__module__}.{type(model).__name__}")
    cfg = model.config
    if cfg.hidden_act != "gelu":
        raise _unsupported(src, f"hidden_act={cfg.hidden_act!r} (only exact-erf 'gelu' is supported)")
    if classifier is None and getattr(vit, "pooler", None) is not None:
        warnings.warn(f"{src}: the ViTModel pooler (dense + tanh, pooler_output) is not converted; the vitkernels "
                      "model returns the final-LayerNormed class token (forward_features gives last_hidden_state)",
                      stacklevel=2)
    emb = vit.embeddings
    conv = emb.patch_embeddings.projection
    if conv.kernel_size != conv.stride or conv.kernel_size[0] != conv.kernel_size[1] or conv.bias is None:
        raise _unsupported(src, f"patch projection {conv}")
    D = conv.out_channels
    layers = _hf_layers(vit)
    if not layers:
        raise _unsupported(src, "num_hidden_layers 0")
    num_heads = cfg.num_attention_heads
    if layers[0]["q"].out_features != D or D % num_heads:
        raise _unsupported(src, f"attention width {layers[0]['q'].out_features} != hidden_size {D} (head_dim)")
    sd = {
        "patch_embed.proj.weight": conv.weight, "patch_embed.proj.bias": conv.bias,
        "cls_token": emb.cls_token, "pos_embed": emb.position_embeddings,
        "norm.weight": vit.layernorm.weight, "norm.bias": vit.layernorm.bias,
    }
    _check_norm(src, "layernorm", vit.layernorm, allow_identity=False)
    eps = {"norm": vit.layernorm.eps}
    qkv_bias = layers[0]["q"].bias is not None
    for i, p in enumerate(layers):
        where = f"layer {i}"
        for name in ("ln1", "ln2"):
            _check_norm(src, f"{where} {name}", p[name], allow_identity=False)
        if any((p[n].bias is not None) != qkv_bias for n in "qkv") or p["o"].bias is None:
            raise _unsupported(src, f"inconsistent attention biases at {where}")
        if p["fc1"].bias is None or p["fc2"].bias is None:
            raise _unsupported(src, f"an MLP without biases at {where}")
        b = f"blocks.{i}."
        sd.update({
            b + "norm1.weight": p["ln1"].weight, b + "norm1.bias": p["ln1"].bias,
            b + "attn.qkv.weight": torch.cat([p["q"].weight, p["k"].weight, p["v"].weight]),
            b + "attn.proj.weight": p["o"].weight, b + "attn.proj.bias": p["o"].bias,
            b + "norm2.weight": p["ln2"].weight, b + "norm2.bias": p["ln2"].bias,
            b + "mlp.fc1.weight": p["fc1"].weight, b + "mlp.fc1.bias": p["fc1"].bias,
            b + "mlp.fc2.weight": p["fc2"].weight, b + "mlp.fc2.bias": p["fc2"].bias,
        })
        if qkv_bias:
            sd[b + "attn.qkv.bias"] = torch.cat([p["q"].bias, p["k"].bias, p["v"].bias])
        eps[b + "norm1"], eps[b + "norm2"] = p["ln1"].eps, p["ln2"].eps
    num_classes = 0
    if isinstance(classifier, nn.Linear):
        num_classes = classifier.out_features
        sd["head.weight"], sd["head.bias"] = classifier.weight, classifier.bias
    elif classifier is not None and not isinstance(classifier, nn.Identity):
        raise _unsupported(src, f"classifier {type(classifier).__name__}")
    img = emb.patch_embeddings.image_size
    img = (img, img) if isinstance(img, int) else tuple(img)
    hidden = layers[0]["fc1"].out_features
    config = dict(
        img_size=img, patch_size=conv.kernel_size[0], in_chans=conv.in_channels, num_classes=num_classes,
        global_pool="token", embed_dim=D, depth=len(layers), num_heads=num_heads, mlp_ratio=_mlp_ratio(D, hidden),
        qkv_bias=qkv_bias, class_token=True, pos_drop_rate=cfg.hidden_dropout_prob,
        proj_drop_rate=cfg.hidden_dropout_prob, attn_drop_rate=cfg.attention_probs_dropout_prob,
    )
    sd = {k: v.detach().clone() for k, v in sd.items()}
    return _build(config, sd, eps, emb.cls_token, model.training, backend)


# -- JAX / big_vision .npz ------------------------------------------------------------------------------------
class NpzLoadResult(NamedTuple):
    """What ``load_npz(strict=False)`` could not fill (model keys) or did not use (npz keys)."""
    missing_keys: list[str]
    unexpected_keys: list[str]


_NPZ_PREFIXES = ("", "opt/target/", "params/", "params/img/")


def _dense(a: torch.Tensor) -> torch.Tensor:  # JAX Dense kernel (in, out) -> torch Linear weight (out, in)
    return a.t()


def _heads_in(a: torch.Tensor) -> torch.Tensor:  # query/key/value kernel (D, H, Dh) -> weight (H * Dh, D)
    return a.reshape(a.shape[0], -1).t()


def _heads_out(a: torch.Tensor) -> torch.Tensor:  # out kernel (H, Dh, D) -> weight (D, H * Dh)
    return a.reshape(-1, a.shape[-1]).t()


def _npz_specs(model: VisionTransformer, files: set[str], prefix: str) -> dict[str, tuple[list[str], Callable]]:
    """model key -> (npz keys, function of those arrays giving the torch tensor), for the model's layout."""
    p = prefix
    ident = lambda a: a  # noqa: E731
    specs = {
        "patch_embed.proj.weight": ([p + "embedding/kernel"], lambda a: a.permute(3, 2, 0, 1)),  # HWIO -> OIHW
        "patch_embed.proj.bias": ([p + "embedding/bias"], ident),
        "cls_token": ([p + "cls"], ident),
        "norm.weight": ([p + "Transformer/encoder_norm/scale"], ident),
        "norm.bias": ([p + "Transformer/encoder_norm/bias"], ident),
        "head.weight": ([p + "head/kernel"], _dense),
        "head.bias": ([p + "head/bias"], ident),
    }
    scanned = p + "Transformer/encoderblock/LayerNorm_0/scale" in files
    for i in range(len(model.blocks)):
        bp = p + ("Transformer/encoderblock/" if scanned else f"Transformer/encoderblock_{i}/")

        def pick(index: int | None, fn: Callable) -> Callable:  # scanned arrays carry a leading depth axis
            return (lambda *arrays: fn(*arrays)) if index is None else (lambda *arrays: fn(*(a[index] for a in arrays)))

        idx = i if scanned else None
        # original ViT: MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3; big_vision: _0, _1, _0
        mha = bp + ("MultiHeadDotProductAttention_0/" if bp + "MultiHeadDotProductAttention_0/query/kernel" in files
                    else "MultiHeadDotProductAttention_1/")
        ln2 = bp + ("LayerNorm_1/" if bp + "LayerNorm_1/scale" in files else "LayerNorm_2/")
        mlp = bp + ("MlpBlock_0/" if bp + "MlpBlock_0/Dense_0/kernel" in files else "MlpBlock_3/")
        b = f"blocks.{i}."
        specs.update({
            b + "norm1.weight": ([bp + "LayerNorm_0/scale"], pick(idx, ident)),
            b + "norm1.bias": ([bp + "LayerNorm_0/bias"], pick(idx, ident)),
            b + "attn.qkv.weight": ([mha + n + "/kernel" for n in ("query", "key", "value")],
                                    pick(idx, lambda q, k, v: torch.cat([_heads_in(q), _heads_in(k), _heads_in(v)]))),
            b + "attn.qkv.bias": ([mha + n + "/bias" for n in ("query", "key", "value")],
                                  pick(idx, lambda q, k, v: torch.cat([q.reshape(-1), k.reshape(-1), v.reshape(-1)]))),
            b + "attn.proj.weight": ([mha + "out/kernel"], pick(idx, _heads_out)),
            b + "attn.proj.bias": ([mha + "out/bias"], pick(idx, ident)),
            b + "norm2.weight": ([ln2 + "scale"], pick(idx, ident)),
            b + "norm2.bias": ([ln2 + "bias"], pick(idx, ident)),
            b + "mlp.fc1.weight": ([mlp + "Dense_0/kernel"], pick(idx, _dense)),
            b + "mlp.fc1.bias": ([mlp + "Dense_0/bias"], pick(idx, ident)),
            b + "mlp.fc2.weight": ([mlp + "Dense_1/kernel"], pick(idx, _dense)),
            b + "mlp.fc2.bias": ([mlp + "Dense_1/bias"], pick(idx, ident)),
        })
    return specs


def _npz_pos_embed(model: VisionTransformer, pos: torch.Tensor, state_dict: dict, interpolation: str,
                   antialias: bool) -> torch.Tensor:
    """Checkpoint position embeddings (1, [1+]n, D) -> the model's (1, [1+]N, D), resampling the grid.

    A checkpoint whose class token has a position (original ViT) loads into a ``no_embed_class`` model by
    adding that position to the class token; a big_vision checkpoint (patches only) loads into a model whose
    class token has a position by giving it a zero one. Both are exact.
    """
    if pos.dim() == 2:
        pos = pos.unsqueeze(0)
    if pos.dim() != 3 or pos.shape[0] != 1:
        raise ValueError(f"load_npz: position embedding must be (1, T, D), got {tuple(pos.shape)}")
    T, D = pos.shape[1], pos.shape[2]
    if math.isqrt(T) ** 2 == T:
        ckpt_prefix = 0
    elif math.isqrt(T - 1) ** 2 == T - 1:
        ckpt_prefix = 1
    else:
        raise ValueError(f"load_npz: cannot infer a square patch grid from {T} position embeddings")
    grid = pos[:, ckpt_prefix:]
    g = math.isqrt(grid.shape[1])
    new_grid = tuple(model.patch_embed.grid_size)
    if (g, g) != new_grid:
        grid = resample_pos_embed(grid, new_grid, old_size=(g, g), num_prefix_tokens=0,
                                  interpolation=interpolation, antialias=antialias)
    model_prefix = 0 if model.no_embed_class else model.num_prefix_tokens
    if model_prefix == 1:
        cls_pos = pos[:, :1] if ckpt_prefix else pos.new_zeros(1, 1, D)
        return torch.cat([cls_pos, grid], dim=1)
    if ckpt_prefix and model.cls_token is not None and "cls_token" in state_dict:
        state_dict["cls_token"] = state_dict["cls_token"] + pos[:, :1]
    return grid


def load_npz(model: VisionTransformer, path, prefix: str = "", strict: bool = True,
             interpolation: str = "bilinear", antialias: bool = False) -> NpzLoadResult:
    """Load a JAX ``.npz`` checkpoint (google-research/vision_transformer or big_vision) into ``model``.

    Args:
        model: a ``vitkernels.VisionTransformer`` whose configuration matches the checkpoint (the patch grid
            may differ: position embeddings are resampled, as for fine-tuning at a higher resolution).
        path: the .npz file.
        prefix: the key prefix; "" detects "", "opt/target/", "params/" and "params/img/".
        strict: raise KeyError when a model parameter has no array in the checkpoint (e.g. ``fc_norm``,
            LayerScale, qk-norm, a head of another size) or a checkpoint array is not used. A classifier head
            in the checkpoint is never required to be used (loading a backbone into ``num_classes=0``).
        interpolation, antialias: position-embedding resampling, as timm's .npz reader (bilinear, no antialias).

    Returns:
        NpzLoadResult(missing_keys, unexpected_keys): empty lists under ``strict``.
    """
    import numpy as np

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"load_npz expects a vitkernels.VisionTransformer, got {type(model).__name__} "
                        "(convert a timm model with vitkernels.from_timm first)")
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"load_npz: cannot read {path!r} as a NumPy .npz archive: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise ValueError(f"load_npz: {path!r} is a single NumPy array, not an .npz archive of named weights")
    with archive:
        files = set(archive.files)
        if not prefix:
            prefix = next((p for p in _NPZ_PREFIXES if p + "embedding/kernel" in files), None)
            if prefix is None:
                raise ValueError(f"load_npz: {path!r} has no 'embedding/kernel' under any of the prefixes "
                                 f"{list(_NPZ_PREFIXES)}: not a JAX ViT checkpoint (keys: {sorted(files)[:8]} ...)")
        elif prefix + "embedding/kernel" not in files:
            raise ValueError(f"load_npz: {path!r} has no {prefix + 'embedding/kernel'!r}")
        if any(k.startswith(prefix + "MAPHead_0/") for k in files):
            raise UnsupportedModelError("load_npz: the checkpoint uses attention pooling (MAPHead), which "
                                        "vitkernels.VisionTransformer does not implement")
        arrays: dict[str, torch.Tensor] = {}

        def get(key: str) -> torch.Tensor:
            if key not in arrays:
                arrays[key] = torch.from_numpy(np.asarray(archive[key], dtype=np.float32))
            return arrays[key]

        own = model.state_dict()
        specs = _npz_specs(model, files, prefix)
        big_vision_pos = prefix + "pos_embedding"
        pos_key = big_vision_pos if big_vision_pos in files else prefix + "Transformer/posembed_input/pos_embedding"
        specs["pos_embed"] = ([pos_key], None)
        state_dict, missing, used = {}, [], set()
        for key in own:
            if key not in specs:
                hint = " (the checkpoint's encoder_norm comes before pooling: build the model with fc_norm=False)" \
                    if key.startswith("fc_norm.") else ""
                missing.append(f"{key} (no .npz equivalent){hint}")
                continue
            names, fn = specs[key]
            absent = [n for n in names if n not in files]
            if absent:
                missing.append(f"{key} (needs {', '.join(absent)})")
                continue
            used.update(names)
            if key == "pos_embed":
                state_dict[key] = get(names[0])  # resampled below, once cls_token is known
                continue
            tensor = fn(*(get(n) for n in names))
            if tuple(tensor.shape) != tuple(own[key].shape):
                missing.append(f"{key} (checkpoint shape {tuple(tensor.shape)}, model {tuple(own[key].shape)})")
                continue
            state_dict[key] = tensor
        if "pos_embed" in state_dict:
            pos = _npz_pos_embed(model, state_dict["pos_embed"], state_dict, interpolation, antialias)
            if tuple(pos.shape) != tuple(own["pos_embed"].shape):
                missing.append(f"pos_embed (checkpoint shape {tuple(pos.shape)} after resampling, "
                               f"model {tuple(own['pos_embed'].shape)})")
                del state_dict["pos_embed"]
            else:
                state_dict["pos_embed"] = pos
        optional = (prefix + "head/", prefix + "pre_logits/")  # dropping a classifier is deliberate
        unexpected = sorted(k for k in files - used if k.startswith(prefix) and not k.startswith(optional))
    if strict and (missing or unexpected):
        raise KeyError(f"load_npz: {path!r} does not match the model: model parameters without a value {missing}; "
                       f"checkpoint arrays not used {unexpected}")
    with torch.no_grad():
        for key, tensor in state_dict.items():
            target = own[key]
            target.copy_(tensor.to(device=target.device, dtype=target.dtype))
    return NpzLoadResult([m.split(" ")[0] for m in missing], unexpected)
