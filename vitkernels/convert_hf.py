"""Hugging Face DINOv2 and SigLIP vision towers -> timm ``VisionTransformer`` constructor kwargs and state_dict.

    kwargs, state_dict = hf_to_timm(hf_model)                         # a transformers model
    kwargs, state_dict = hf_state_dict_to_timm(state_dict, hf_config)  # a raw checkpoint and its config
    model = timm.models.vision_transformer.VisionTransformer(**kwargs)
    model.load_state_dict(state_dict)                                 # strict: every key matches

The result is timm's own layout (timm 1.0.31), the one timm's ``vit_*_dinov2``, ``vit_*_reg4_dinov2`` and
``vit_*_siglip_*`` models load, so that (in eval mode, at the checkpoint's native resolution)
``forward_features`` equals HF's ``last_hidden_state`` and ``forward_head(pre_logits=True)`` (``num_classes=0``)
equals HF's ``pooler_output``.

Supported classes (transformers 5.x; both weight layouts: 5.17's ``attention.attention.query`` /
``attention.output.dense`` / ``mlp.weights_in`` and 5.24's ``attention.q_proj`` / ``o_proj`` / ``gate_proj`` +
``up_proj``, and a checkpoint file in either):

    Dinov2Model                 class_token, pos_embed (1, 1 + N, D) with the class token's position;
                                LayerScale (init_values); global_pool='token' (pooler_output = class token)
    Dinov2WithRegistersModel    + reg_tokens=R, no_embed_class=True (as timm's vit_*_reg4_dinov2): HF adds the
                                class token's position before inserting the registers, so the class token
                                absorbs pos[:, 0] and pos_embed keeps the N patch positions
    use_swiglu_ffn              mlp_layer=SwiGLUPacked, act_layer='silu': fc1 = [gate; up] packed (timm's
                                GluMlp with gate_last=False computes silu(first half) * second half)
    SiglipVisionModel, SiglipModel (the vision tower), SiglipForImageClassification
                                class_token=False, pos_embed (1, N, D); post_layernorm -> norm; HF's
                                MultiheadAttentionPoolingHead -> attn_pool (global_pool='map'); 'avg' pooling
                                with fc_norm=False for the classifier (HF averages the post-LayerNormed tokens)
    Siglip2VisionModel, Siglip2Model (the vision tower), Siglip2ForImageClassification
                                NaFlex: the patch embedding is a Linear over (P, P, C)-flattened patches, which
                                is the Conv2d (D, C, P, P) after a permute; HF resizes the position grid to each
                                image's ``spatial_shapes`` (bilinear, antialias), which at the checkpoint's own
                                square grid (sqrt(num_patches) patches a side, no padding) is the identity. The
                                conversion is exact for that fixed resolution only (img_size = grid * P);
                                there the classifier's masked mean is the plain mean ('avg', as SigLIP's).

Rejected with ``UnsupportedModelError`` (a ValueError) naming the feature: Dinov2ForImageClassification and its
registers twin (the classifier reads concat(class token, mean of patch tokens), which timm has no pool for:
convert ``model.dinov2`` / ``model.dinov2_with_registers``), an activation timm has no equivalent of, layer
widths that timm's single ``mlp_ratio`` cannot express, and any checkpoint key the conversion did not use.
Dropped on purpose: DINOv2's ``mask_token`` (only used with ``bool_masked_pos`` in pre-training) and, for
SiglipForImageClassification, the attention-pooling head its logits do not use.

Resolution. The conversion keeps the checkpoint's grid. At other sizes the libraries differ: HF's Dinov2Model
resizes the patch positions bicubic, align_corners=False, *without* antialias (and also whenever H != W, even
at the native patch count); Dinov2WithRegistersModel resizes bicubic *with* antialias, as timm's
``resample_abs_pos_embed`` (what ``dynamic_img_size=True`` and timm's checkpoint filter use); SiglipVisionModel
refuses other sizes unless ``interpolate_pos_encoding=True``, then bicubic without antialias; Siglip2 resizes
bilinear with antialias per image. So only the registers model keeps matching timm off its native grid.

Activation. HF's SigLIP uses hidden_act='gelu_pytorch_tanh' (big_vision's default), so the kwargs say
act_layer='gelu_tanh'; timm's registered ``vit_*_siglip_*`` models are built with exact GELU instead, so loading
this state_dict into ``timm.create_model('vit_base_patch16_siglip_224')`` gives nearly, not exactly, HF's output.

Training mode is not claimed equal: HF's DINOv2 applies one drop-path rate to every layer where timm's
``drop_path_rate`` rises linearly over depth, and the dropout placements differ.
"""

from __future__ import annotations

import functools
import math
import re

import torch
from torch import nn

from vitkernels.convert import UnsupportedModelError, _mlp_ratio

__all__ = ["hf_to_timm", "hf_state_dict_to_timm", "HF_ACTIVATIONS"]

# HF ``hidden_act`` -> timm ``act_layer`` (None: timm's default nn.GELU, exact erf). 'gelu_new' is HF's tanh
# formula written out; it equals torch's approximate='tanh' to rounding.
HF_ACTIVATIONS = {"gelu": None, "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
                  "quick_gelu": "quick_gelu", "silu": "silu", "swish": "silu", "relu": "relu"}
TIMM_LN_EPS = 1e-6  # timm's LayerNorm default: no norm_layer argument needed at this eps

_DINOV2_ANCHOR = "embeddings.patch_embeddings.projection.weight"
_SIGLIP_ANCHOR = "embeddings.patch_embedding.weight"
# keys outside the vision tower that a dual-tower checkpoint carries and the conversion ignores
_OTHER_TOWER = ("text_model.", "logit_scale", "logit_bias")


def _unsupported(feature: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"hf_to_timm: {feature} is not supported")


class _Keys:
    """The checkpoint's vision-tower keys (prefix stripped); ``take`` consumes them, so that whatever is left
    at the end is a feature the conversion does not know, reported by name instead of silently dropped."""

    def __init__(self, state_dict: dict, prefix: str):
        self.prefix = prefix
        self.left = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}

    def has(self, key: str) -> bool:
        return key in self.left

    def take(self, *names: str) -> torch.Tensor:
        """The first of ``names`` present (aliases across transformers versions), consumed."""
        for name in names:
            if name in self.left:
                return self.left.pop(name).detach()
        raise KeyError(f"hf_to_timm: the checkpoint has none of {[self.prefix + n for n in names]}")

    def take_linear(self, out: dict, timm_name: str, *names: str, bias: bool = True) -> None:
        """Linear weight (+ bias) under any alias in ``names`` -> ``timm_name``.weight / .bias."""
        name = next((n for n in names if n + ".weight" in self.left), names[0])
        out[timm_name + ".weight"] = self.take(name + ".weight")
        if bias:
            out[timm_name + ".bias"] = self.take(name + ".bias")

    def finish(self) -> None:
        rest = sorted(self.left)
        if rest:
            raise _unsupported(f"checkpoint keys the conversion does not map ({[self.prefix + k for k in rest][:8]}"
                               f"{' ...' if len(rest) > 8 else ''}): a configuration option this converter "
                               "does not know")


def _prefix(state_dict: dict, anchor: str) -> str:
    """The one prefix under which ``anchor`` appears ('', 'dinov2.', 'vision_model.', ...)."""
    found = sorted({k[: -len(anchor)] for k in state_dict if k.endswith(anchor)})
    found = [p for p in found if p == "" or p.endswith(".")]
    if len(found) != 1:
        raise ValueError(f"hf_state_dict_to_timm: expected one '*{anchor}' key in the state_dict, found "
                         f"{[p + anchor for p in found]}")
    return found[0]


def _depth(keys: _Keys, layer_path: str) -> int:
    pattern = re.compile(re.escape(layer_path) + r"(\d+)\.")
    layers = {int(m.group(1)) for k in keys.left if (m := pattern.match(k))}
    if layers != set(range(len(layers))):
        raise ValueError(f"hf_state_dict_to_timm: layers {sorted(layers)} under {keys.prefix + layer_path} "
                         "are not numbered 0..L-1")
    if not layers:
        raise _unsupported("a vision tower with no layers")
    return len(layers)


def _pair(value) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"hf_state_dict_to_timm: expected an int or a pair, got {value}")
    return value


def _act(hidden_act) -> str | None:
    if not isinstance(hidden_act, str) or hidden_act not in HF_ACTIVATIONS:
        raise _unsupported(f"hidden_act={hidden_act!r} (supported: {sorted(HF_ACTIVATIONS)})")
    return HF_ACTIVATIONS[hidden_act]


def _norm_layer(eps: float) -> dict:
    """timm's LayerNorm is eps 1e-6; any other eps travels as a norm_layer partial (timm and vitkernels both
    build it)."""
    eps = float(eps)
    return {} if eps == TIMM_LN_EPS else {"norm_layer": functools.partial(nn.LayerNorm, eps=eps)}


def _heads(cfg, dim: int) -> int:
    heads = int(cfg.num_attention_heads)
    head_dim = getattr(cfg, "head_dim", None)
    if dim % heads or (head_dim is not None and int(head_dim) * heads != dim):
        raise _unsupported(f"attention width != hidden_size ({heads} heads, head_dim {head_dim}, hidden {dim})")
    return heads


# -- DINOv2 ----------------------------------------------------------------------------------------------------
def _dinov2(state_dict: dict, cfg, registers: bool) -> tuple[dict, dict]:
    keys = _Keys(state_dict, _prefix(state_dict, _DINOV2_ANCHOR))
    for name in ("classifier.weight", "classifier.bias"):
        if name in state_dict:
            raise _unsupported("Dinov2ForImageClassification's classifier (a Linear on concat(class token, mean of "
                               "the patch tokens): timm has no such pool); convert the backbone (model.dinov2 / "
                               "model.dinov2_with_registers, or the state_dict without 'classifier.*')")
    sd = {}
    sd["patch_embed.proj.weight"] = conv = keys.take(_DINOV2_ANCHOR)
    sd["patch_embed.proj.bias"] = keys.take("embeddings.patch_embeddings.projection.bias")
    dim = conv.shape[0]
    cls = keys.take("embeddings.cls_token")
    pos = keys.take("embeddings.position_embeddings")  # (1, 1 + N, D): the class token has a position
    if keys.has("embeddings.mask_token"):
        keys.take("embeddings.mask_token")  # masked-image pre-training only
    if registers:
        reg = keys.take("embeddings.register_tokens")  # (1, R, D), no position
        # HF: [cls + pos[0], registers, patches + pos[1:]]; timm no_embed_class: [cls, reg, patches + pos]
        sd["cls_token"], sd["reg_token"], sd["pos_embed"] = cls + pos[:, :1], reg, pos[:, 1:]
    else:
        sd["cls_token"], sd["pos_embed"] = cls, pos
    depth = _depth(keys, "encoder.layer.")
    swiglu = bool(getattr(cfg, "use_swiglu_ffn", False))
    qkv_bias = keys.has("encoder.layer.0.attention.q_proj.bias") or \
        keys.has("encoder.layer.0.attention.attention.query.bias")
    hidden = None
    for i in range(depth):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2")):
            keys.take_linear(sd, b + ours, h + theirs)
        q, k, v = ({} for _ in range(3))
        keys.take_linear(q, "x", h + "attention.q_proj", h + "attention.attention.query", bias=qkv_bias)
        keys.take_linear(k, "x", h + "attention.k_proj", h + "attention.attention.key", bias=qkv_bias)
        keys.take_linear(v, "x", h + "attention.v_proj", h + "attention.attention.value", bias=qkv_bias)
        sd[b + "attn.qkv.weight"] = torch.cat([q["x.weight"], k["x.weight"], v["x.weight"]])
        if qkv_bias:
            sd[b + "attn.qkv.bias"] = torch.cat([q["x.bias"], k["x.bias"], v["x.bias"]])
        keys.take_linear(sd, b + "attn.proj", h + "attention.o_proj", h + "attention.output.dense")
        sd[b + "ls1.gamma"] = keys.take(h + "layer_scale1.lambda1")
        sd[b + "ls2.gamma"] = keys.take(h + "layer_scale2.lambda1")
        if swiglu:
            if keys.has(h + "mlp.weights_in.weight"):  # 5.17 and the checkpoints: already [gate; up]
                keys.take_linear(sd, b + "mlp.fc1", h + "mlp.weights_in")
            else:  # 5.24 splits weights_in into gate_proj, up_proj (Chunk(dim=0) in its conversion mapping)
                gate, up = {}, {}
                keys.take_linear(gate, "x", h + "mlp.gate_proj")
                keys.take_linear(up, "x", h + "mlp.up_proj")
                sd[b + "mlp.fc1.weight"] = torch.cat([gate["x.weight"], up["x.weight"]])
                sd[b + "mlp.fc1.bias"] = torch.cat([gate["x.bias"], up["x.bias"]])
            keys.take_linear(sd, b + "mlp.fc2", h + "mlp.down_proj", h + "mlp.weights_out")
        else:
            keys.take_linear(sd, b + "mlp.fc1", h + "mlp.fc1")
            keys.take_linear(sd, b + "mlp.fc2", h + "mlp.fc2")
        width = sd[b + "mlp.fc1.weight"].shape[0]  # packed: 2 x the SwiGLU hidden width
        if hidden is not None and width != hidden:
            raise _unsupported("layers with different MLP widths")
        hidden = width
    keys.take_linear(sd, "norm", "layernorm")
    keys.finish()
    if swiglu:
        try:
            from timm.layers import SwiGLUPacked
        except ImportError as exc:
            raise ImportError(f"hf_to_timm: the SwiGLU MLP converts to timm's SwiGLUPacked, which needs timm: "
                              f"{exc}") from exc
        mlp = dict(mlp_layer=SwiGLUPacked, act_layer="silu")
    else:
        mlp = dict(act_layer=_act(cfg.hidden_act))
    img, patch = _pair(cfg.image_size), _pair(cfg.patch_size)
    grid = (img[0] // patch[0]) * (img[1] // patch[1])
    if pos.shape[1] != 1 + grid:
        raise ValueError(f"hf_state_dict_to_timm: image_size {cfg.image_size} / patch_size {cfg.patch_size} give "
                         f"{grid} patches, the checkpoint has {pos.shape[1] - 1} patch positions")
    kwargs = dict(
        img_size=img if img[0] != img[1] else img[0], patch_size=patch if patch[0] != patch[1] else patch[0],
        in_chans=conv.shape[1], num_classes=0, global_pool="token", embed_dim=dim, depth=depth,
        num_heads=_heads(cfg, dim), mlp_ratio=_mlp_ratio(dim, hidden), qkv_bias=qkv_bias,
        # HF always has LayerScale; any non-zero init builds timm's (the loaded gamma replaces it)
        init_values=float(getattr(cfg, "layerscale_value", 1.0)) or 1.0,
        class_token=True, no_embed_class=registers, reg_tokens=int(sd["reg_token"].shape[1]) if registers else 0,
        pos_drop_rate=float(cfg.hidden_dropout_prob), proj_drop_rate=float(cfg.hidden_dropout_prob),
        attn_drop_rate=float(cfg.attention_probs_dropout_prob), drop_path_rate=float(cfg.drop_path_rate),
        **mlp, **_norm_layer(cfg.layer_norm_eps),
    )
    return kwargs, sd


# -- SigLIP / SigLIP2 --------------------------------------------------------------------------------------
def _siglip(state_dict: dict, cfg, v2: bool) -> tuple[dict, dict]:
    keys = _Keys(state_dict, _prefix(state_dict, _SIGLIP_ANCHOR))
    sd = {}
    w = keys.take(_SIGLIP_ANCHOR)
    dim = w.shape[0]
    if v2:  # Linear over patches flattened (P, P, C) by the image processor -> Conv2d (D, C, P, P)
        patch = int(cfg.patch_size)
        chans = int(cfg.num_channels)
        if w.shape[1] != patch * patch * chans:
            raise ValueError(f"hf_state_dict_to_timm: patch embedding {tuple(w.shape)} is not "
                             f"(D, {patch} * {patch} * {chans})")
        w = w.reshape(dim, patch, patch, chans).permute(0, 3, 1, 2).contiguous()
    sd["patch_embed.proj.weight"] = w
    sd["patch_embed.proj.bias"] = keys.take("embeddings.patch_embedding.bias")
    patch, chans = w.shape[-1], w.shape[1]
    if w.shape[-2] != patch:
        raise _unsupported(f"a non-square patch {tuple(w.shape[-2:])}")
    pos = keys.take("embeddings.position_embedding.weight")  # (N, D), patches only
    sd["pos_embed"] = pos.unsqueeze(0)
    for name in ("embeddings.position_ids",):  # a buffer some older checkpoints saved
        if keys.has(name):
            keys.take(name)
    grid = math.isqrt(pos.shape[0])
    if grid * grid != pos.shape[0]:
        raise _unsupported(f"{pos.shape[0]} position embeddings (not a square grid)")
    if v2:
        img = grid * patch
    else:
        img = _pair(cfg.image_size)
        if img[0] != img[1] or (img[0] // patch) != grid:
            raise ValueError(f"hf_state_dict_to_timm: image_size {cfg.image_size} / patch {patch} does not give "
                             f"the checkpoint's {grid} x {grid} position grid")
        img = img[0]
    depth = _depth(keys, "encoder.layers.")
    hidden = None
    for i in range(depth):
        h, b = f"encoder.layers.{i}.", f"blocks.{i}."
        keys.take_linear(sd, b + "norm1", h + "layer_norm1")
        keys.take_linear(sd, b + "norm2", h + "layer_norm2")
        q, k, v = ({} for _ in range(3))
        for part, name in ((q, "q_proj"), (k, "k_proj"), (v, "v_proj")):
            keys.take_linear(part, "x", h + "self_attn." + name)
        sd[b + "attn.qkv.weight"] = torch.cat([q["x.weight"], k["x.weight"], v["x.weight"]])
        sd[b + "attn.qkv.bias"] = torch.cat([q["x.bias"], k["x.bias"], v["x.bias"]])
        keys.take_linear(sd, b + "attn.proj", h + "self_attn.out_proj")
        keys.take_linear(sd, b + "mlp.fc1", h + "mlp.fc1")
        keys.take_linear(sd, b + "mlp.fc2", h + "mlp.fc2")
        width = sd[b + "mlp.fc1.weight"].shape[0]
        if hidden is not None and width != hidden:
            raise _unsupported("layers with different MLP widths")
        hidden = width
    keys.take_linear(sd, "norm", "post_layernorm")

    classifier = state_dict.get("classifier.weight")
    has_head = keys.has("head.probe")
    if classifier is not None:
        # SiglipForImageClassification: mean of the post-LayerNormed tokens -> classifier; the attention-pooling
        # head is built but its output (pooler_output) is not what the logits read
        for name in [k for k in keys.left if k.startswith("head.")]:
            keys.take(name)
        sd["head.weight"], sd["head.bias"] = classifier.detach(), state_dict["classifier.bias"].detach()
        pool, num_classes = dict(global_pool="avg", fc_norm=False), classifier.shape[0]
    elif has_head:
        # HF's MultiheadAttentionPoolingHead: probe attends to the tokens (nn.MultiheadAttention, in_proj rows
        # [q; k; v]), out_proj, then x + mlp(layernorm(x)); timm's AttentionPoolLatent computes the same with
        # latent, q, kv (rows [k; v]), proj, norm, mlp
        ap = "attn_pool."
        sd[ap + "latent"] = keys.take("head.probe")  # (1, 1, D)
        in_w, in_b = keys.take("head.attention.in_proj_weight"), keys.take("head.attention.in_proj_bias")
        sd[ap + "q.weight"], sd[ap + "kv.weight"] = in_w[:dim], in_w[dim:]
        sd[ap + "q.bias"], sd[ap + "kv.bias"] = in_b[:dim], in_b[dim:]
        keys.take_linear(sd, ap + "proj", "head.attention.out_proj")
        keys.take_linear(sd, ap + "norm", "head.layernorm")
        keys.take_linear(sd, ap + "mlp.fc1", "head.mlp.fc1")
        keys.take_linear(sd, ap + "mlp.fc2", "head.mlp.fc2")
        if sd[ap + "mlp.fc1.weight"].shape[0] != hidden:
            raise _unsupported("a pooling-head MLP wider or narrower than the blocks' (timm shares mlp_ratio)")
        pool, num_classes = dict(global_pool="map"), 0
    else:  # vision_use_head=False: no pooled output in HF either
        pool, num_classes = dict(global_pool=""), 0
    keys.finish()
    kwargs = dict(
        img_size=img, patch_size=patch, in_chans=chans, num_classes=num_classes, **pool, embed_dim=dim,
        depth=depth, num_heads=_heads(cfg, dim), mlp_ratio=_mlp_ratio(dim, hidden), qkv_bias=True,
        class_token=False, no_embed_class=False, reg_tokens=0, act_layer=_act(cfg.hidden_act),
        attn_drop_rate=float(getattr(cfg, "attention_dropout", 0.0)), **_norm_layer(cfg.layer_norm_eps),
    )
    return kwargs, sd


# -- dispatch ---------------------------------------------------------------------------------------------------
_BY_MODEL_TYPE = {
    "dinov2": functools.partial(_dinov2, registers=False),
    "dinov2_with_registers": functools.partial(_dinov2, registers=True),
    "siglip_vision_model": functools.partial(_siglip, v2=False),
    "siglip2_vision_model": functools.partial(_siglip, v2=True),
}
_DUAL_TOWER = {"siglip": "siglip_vision_model", "siglip2": "siglip2_vision_model"}


def hf_state_dict_to_timm(state_dict: dict, config) -> tuple[dict, dict]:
    """A transformers state_dict (or checkpoint file's tensors) and its config -> (timm kwargs, timm state_dict).

    Args:
        state_dict: the model's ``state_dict()`` or a checkpoint's tensors, with any prefix ('dinov2.',
            'vision_model.', ...); a SigLIP dual-tower checkpoint's text tower and logit scale/bias are ignored.
        config: the transformers config (Dinov2Config, Dinov2WithRegistersConfig, SiglipVisionConfig,
            SiglipConfig, Siglip2VisionConfig, Siglip2Config), read by ``model_type``.

    Returns:
        kwargs for ``timm.models.vision_transformer.VisionTransformer(**kwargs)`` and a state_dict that loads
        into it strictly. Tensors keep their dtype and may share storage with ``state_dict``.
    """
    model_type = getattr(config, "model_type", None)
    if model_type in _DUAL_TOWER:
        config, model_type = config.vision_config, _DUAL_TOWER[model_type]
    if model_type not in _BY_MODEL_TYPE:
        hint = " (use vitkernels.from_hf for ViTModel)" if model_type == "vit" else ""
        raise _unsupported(f"config model_type={model_type!r}{hint}; supported: "
                           f"{sorted(_BY_MODEL_TYPE) + sorted(_DUAL_TOWER)}")
    ignore = {k: v for k, v in state_dict.items() if not k.startswith(_OTHER_TOWER)}
    return _BY_MODEL_TYPE[model_type](ignore, config)


_CLASSES = ("Dinov2Model", "Dinov2WithRegistersModel", "SiglipVisionModel", "SiglipModel",
            "SiglipForImageClassification", "Siglip2VisionModel", "Siglip2Model", "Siglip2ForImageClassification")
_REJECTED = {
    "Dinov2ForImageClassification": "the classifier on concat(class token, mean of patch tokens), which timm has "
                                    "no pool for; convert model.dinov2",
    "Dinov2WithRegistersForImageClassification": "the classifier on concat(class token, mean of patch tokens), "
                                                 "which timm has no pool for; convert model.dinov2_with_registers",
    "Dinov2Backbone": "feature-map outputs (a backbone, not a VisionTransformer); convert a Dinov2Model",
    "Dinov2WithRegistersBackbone": "feature-map outputs (a backbone); convert a Dinov2WithRegistersModel",
}


def hf_to_timm(model: nn.Module) -> tuple[dict, dict]:
    """A transformers DINOv2 / SigLIP model -> (timm VisionTransformer kwargs, timm-keyed state_dict).

    Dispatches on the class name (any of ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``SiglipVisionModel``,
    ``SiglipModel``, ``SiglipForImageClassification``, ``Siglip2VisionModel``, ``Siglip2Model``,
    ``Siglip2ForImageClassification``); the dual-tower
    models give their vision tower. Anything else, or a configuration timm cannot compute exactly, raises
    ``UnsupportedModelError`` (a ValueError) naming the feature. See the module docstring for the layout.
    """
    name = type(model).__name__
    if name in _REJECTED:
        raise _unsupported(f"{name}: {_REJECTED[name]}")
    if name not in _CLASSES:
        hint = " (use vitkernels.from_hf for ViTModel / ViTForImageClassification)" if name.startswith("ViT") else ""
        raise _unsupported(f"model class {type(model).__module__}.{name}{hint}; supported: {list(_CLASSES)}")
    return hf_state_dict_to_timm(model.state_dict(), model.config)
