"""Model configurations with timm's names, and ``create_model`` / ``list_models``.

The paper's Table 1 gives Base 86M, Large 307M, Huge 632M parameters. timm's counts for the same widths and
depths (which ``create_model`` reproduces exactly) differ slightly because they include the classifier head
and the position embeddings, which depend on the number of classes and the patch grid: vit_base_patch16_224
has 86.6M (1000 classes), vit_large_patch16_224 304.3M, vit_huge_patch14_224 630.8M (timm's default for that
name has no head, num_classes=0). The paper's figures were counted for its own heads and resolutions.
"""

from __future__ import annotations

from vitkernels.nn.vision_transformer import VisionTransformer

# Width (D), depth (L), heads (H) of the paper's Table 1 plus DeiT's Ti and S.
_FAMILIES = {
    "tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "small": dict(embed_dim=384, depth=12, num_heads=6),
    "base": dict(embed_dim=768, depth=12, num_heads=12),
    "large": dict(embed_dim=1024, depth=24, num_heads=16),
    "huge": dict(embed_dim=1280, depth=32, num_heads=16),
}

# name -> (family, patch size, image size, default num_classes as in timm's default pretrained tag)
_NAMES = {
    "vit_tiny_patch16_224": ("tiny", 16, 224, 1000),
    "vit_tiny_patch16_384": ("tiny", 16, 384, 1000),
    "vit_small_patch16_224": ("small", 16, 224, 1000),
    "vit_small_patch16_384": ("small", 16, 384, 1000),
    "vit_small_patch32_224": ("small", 32, 224, 1000),
    "vit_small_patch32_384": ("small", 32, 384, 1000),
    "vit_base_patch8_224": ("base", 8, 224, 1000),
    "vit_base_patch16_224": ("base", 16, 224, 1000),
    "vit_base_patch16_384": ("base", 16, 384, 1000),
    "vit_base_patch32_224": ("base", 32, 224, 1000),
    "vit_base_patch32_384": ("base", 32, 384, 1000),
    "vit_large_patch14_224": ("large", 14, 224, 1000),
    "vit_large_patch16_224": ("large", 16, 224, 1000),
    "vit_large_patch16_384": ("large", 16, 384, 1000),
    "vit_large_patch32_224": ("large", 32, 224, 0),
    "vit_large_patch32_384": ("large", 32, 384, 1000),
    "vit_huge_patch14_224": ("huge", 14, 224, 0),
}

# The families people fine-tune today (issue #17): name -> (the model class, its arguments), as timm's entry
# points build them (timm 1.0.31). img_size / num_classes come from the pretrained config, as for the above.
_DINOV2 = dict(patch_size=14, init_values=1e-5)
_REG4 = dict(_DINOV2, reg_tokens=4, no_embed_class=True)
_GIANT = dict(embed_dim=1536, depth=40, num_heads=24, mlp_ratio=5.33334, mlp_layer="swiglupacked", act_layer="silu")
_SIGLIP = dict(class_token=False, global_pool="map")
_SO400M = dict(embed_dim=1152, depth=27, num_heads=16, mlp_ratio=3.7362)
_CLIP = dict(pre_norm=True, norm_eps=1e-5, act_layer="quick_gelu")
_BEIT = dict(patch_size=16, use_abs_pos_emb=False, use_rel_pos_bias=True)
_EVA02 = dict(img_size=224, patch_size=14, depth=12, mlp_ratio=8 / 3, swiglu_mlp=True, use_rot_pos_emb=True,
              ref_feat_shape=(16, 16))
_ROPE_REG1 = dict(img_size=256, patch_size=16, depth=12, qkv_fused=True, qkv_bias=True, init_values=1e-5,
                  class_token=False, num_reg_tokens=1, use_rot_pos_emb=True, use_abs_pos_emb=False,
                  ref_feat_shape=(16, 16))
_ARCHS = {
    "vit_small_patch14_dinov2": ("vit", dict(_FAMILIES["small"], **_DINOV2)),
    "vit_base_patch14_dinov2": ("vit", dict(_FAMILIES["base"], **_DINOV2)),
    "vit_large_patch14_dinov2": ("vit", dict(_FAMILIES["large"], **_DINOV2)),
    "vit_giant_patch14_dinov2": ("vit", dict(_GIANT, **_DINOV2)),
    "vit_small_patch14_reg4_dinov2": ("vit", dict(_FAMILIES["small"], **_REG4)),
    "vit_base_patch14_reg4_dinov2": ("vit", dict(_FAMILIES["base"], **_REG4)),
    "vit_large_patch14_reg4_dinov2": ("vit", dict(_FAMILIES["large"], **_REG4)),
    "vit_giant_patch14_reg4_dinov2": ("vit", dict(_GIANT, **_REG4)),
    "vit_base_patch16_siglip_224": ("vit", dict(_FAMILIES["base"], patch_size=16, **_SIGLIP)),
    "vit_base_patch16_siglip_256": ("vit", dict(_FAMILIES["base"], patch_size=16, **_SIGLIP)),
    "vit_base_patch16_siglip_384": ("vit", dict(_FAMILIES["base"], patch_size=16, **_SIGLIP)),
    "vit_large_patch16_siglip_256": ("vit", dict(_FAMILIES["large"], patch_size=16, **_SIGLIP)),
    "vit_so400m_patch14_siglip_224": ("vit", dict(_SO400M, patch_size=14, **_SIGLIP)),
    "vit_so400m_patch14_siglip_378": ("vit", dict(_SO400M, patch_size=14, **_SIGLIP)),
    "vit_so400m_patch14_siglip_384": ("vit", dict(_SO400M, patch_size=14, **_SIGLIP)),
    "vit_so400m_patch16_siglip_256": ("vit", dict(_SO400M, patch_size=16, act_layer="gelu_tanh", **_SIGLIP)),
    "vit_base_patch16_clip_quickgelu_224": ("vit", dict(_FAMILIES["base"], patch_size=16, **_CLIP)),
    "vit_base_patch32_clip_quickgelu_224": ("vit", dict(_FAMILIES["base"], patch_size=32, **_CLIP)),
    "vit_large_patch14_clip_quickgelu_224": ("vit", dict(_FAMILIES["large"], patch_size=14, **_CLIP)),
    "deit_tiny_distilled_patch16_224": ("deit_distilled", dict(_FAMILIES["tiny"], patch_size=16)),
    "deit_small_distilled_patch16_224": ("deit_distilled", dict(_FAMILIES["small"], patch_size=16)),
    "deit_base_distilled_patch16_224": ("deit_distilled", dict(_FAMILIES["base"], patch_size=16)),
    "deit_base_distilled_patch16_384": ("deit_distilled", dict(_FAMILIES["base"], patch_size=16)),
    # EVA-02 and timm's rope ViTs: vitkernels.nn.eva.Eva with timm's Eva arguments
    "eva02_tiny_patch14_224": ("eva", dict(_EVA02, embed_dim=192, num_heads=3)),
    "eva02_small_patch14_224": ("eva", dict(_EVA02, embed_dim=384, num_heads=6)),
    "eva02_base_patch14_224": ("eva", dict(_EVA02, embed_dim=768, num_heads=12, qkv_fused=False, scale_mlp=True)),
    "eva02_large_patch14_224": ("eva", dict(_EVA02, embed_dim=1024, depth=24, num_heads=16, qkv_fused=False,
                                            scale_mlp=True)),
    "eva02_base_patch14_448": ("eva", dict(_EVA02, img_size=448, embed_dim=768, num_heads=12, qkv_fused=False,
                                           scale_mlp=True)),
    "eva02_base_patch16_clip_224": ("eva", dict(_EVA02, patch_size=16, embed_dim=768, num_heads=12, qkv_fused=False,
                                                scale_mlp=True, scale_attn_inner=True, global_pool="token")),
    "vit_base_patch16_rope_reg1_gap_256": ("eva", dict(_ROPE_REG1, embed_dim=768, num_heads=12)),
    "vit_medium_patch16_rope_reg1_gap_256": ("eva", dict(_ROPE_REG1, embed_dim=512, num_heads=8)),
    # BEiT / BEiT v2: vitkernels.nn.beit.Beit (relative position bias on ops.attention's bias)
    "beit_base_patch16_224": ("beit", dict(_BEIT, **_FAMILIES["base"], init_values=0.1)),
    "beit_base_patch16_384": ("beit", dict(_BEIT, **_FAMILIES["base"], img_size=384, init_values=0.1)),
    "beit_large_patch16_224": ("beit", dict(_BEIT, **_FAMILIES["large"], init_values=1e-5)),
    "beit_large_patch16_384": ("beit", dict(_BEIT, **_FAMILIES["large"], img_size=384, init_values=1e-5)),
    "beit_large_patch16_512": ("beit", dict(_BEIT, **_FAMILIES["large"], img_size=512, init_values=1e-5)),
    "beitv2_base_patch16_224": ("beit", dict(_BEIT, **_FAMILIES["base"], init_values=1e-5)),
    "beitv2_large_patch16_224": ("beit", dict(_BEIT, **_FAMILIES["large"], init_values=1e-5)),
}
for _name, (_family, _patch, _img, _classes) in _NAMES.items():
    _ARCHS.setdefault(_name, ("vit", dict(_FAMILIES[_family], patch_size=_patch)))


def _model_class(kind: str):
    if kind == "beit":
        from vitkernels.nn.beit import Beit

        return Beit
    if kind == "eva":
        from vitkernels.nn.eva import Eva

        return Eva
    if kind == "deit_distilled":
        from vitkernels.nn.deit import VisionTransformerDistilled

        return VisionTransformerDistilled
    return VisionTransformer


def list_models(pattern: str = "*", pretrained: bool = False) -> list[str]:
    """Model names known to ``create_model`` (fnmatch ``pattern``), sorted; with ``pretrained``, every
    'name.tag' that has a pretrained config (timm's ``list_models(pretrained=True)``)."""
    import fnmatch

    from vitkernels.pretrained import list_pretrained

    names = list_pretrained() if pretrained else _ARCHS
    return sorted(n for n in names if fnmatch.fnmatch(n, pattern))


def _arch(name: str) -> tuple[str, str]:
    from vitkernels.pretrained import split_model_name_tag

    if not isinstance(name, str) or ":" in name:
        raise ValueError(f"model name {name!r}: vitkernels builds its own architectures by timm name (optionally "
                         "'name.tag'); it reads no model configs from the Hugging Face hub or local directories")
    arch, tag = split_model_name_tag(name)
    if arch not in _ARCHS:
        close = [n for n in _ARCHS if arch.split("_")[0] in n][:5]
        raise ValueError(f"unknown model {arch!r}; known models: {', '.join(list_models())}"
                         + (f" (did you mean one of {close}?)" if close else ""))
    return arch, tag


def model_config(name: str) -> dict:
    """The constructor arguments ``create_model(name)`` uses (before overrides): the architecture's, with
    img_size, in_chans and num_classes from the name's (or tag's) pretrained config, as in timm."""
    from vitkernels.pretrained import resolve_pretrained_cfg

    arch, tag = _arch(name)
    cfg = resolve_pretrained_cfg(arch, tag or None)
    H, W = cfg["input_size"][-2:]
    return dict(_ARCHS[arch][1], img_size=H if H == W else (H, W), in_chans=cfg["input_size"][0],
                num_classes=cfg["num_classes"])


_FEATURE_CFG_KEYS = ("out_indices", "feature_cls", "output_fmt", "norm", "prune", "flatten_sequential", "no_rewrite")


def create_model(model_name: str, pretrained: bool = False, pretrained_cfg=None, pretrained_cfg_overlay=None,
                 checkpoint_path=None, cache_dir=None, scriptable=None, exportable=None, no_jit=None, **kwargs):
    """Build ``model_name`` as ``timm.create_model`` does (same arguments, configs, parameter counts and keys),
    e.g. ``create_model("vit_base_patch16_224.augreg_in21k", num_classes=10, backend="triton")``.

    Args (timm's):
        model_name: 'name' or 'name.tag' (``list_models(pretrained=True)``); the tag picks the pretrained
            config, which sets the defaults of num_classes, in_chans and img_size and is attached as
            ``model.pretrained_cfg`` / ``default_cfg``.
        pretrained: load the config's weights, from local sources only (``vitkernels.pretrained``): its
            ``state_dict``, its ``file`` (``pretrained_cfg_overlay=dict(file=path)``) or the Hugging Face cache
            (``cache_dir``); otherwise ``PretrainedWeightsError`` says what was tried.
        pretrained_cfg: a tag, a dict of config fields or timm's PretrainedCfg. pretrained_cfg_overlay: fields
            that replace the config's.
        checkpoint_path: a checkpoint loaded after construction (timm's ``load_checkpoint``: a state_dict
            file, 'state_dict' / 'model' wrappers and a DDP 'module.' prefix removed; .npz via load_npz).
        cache_dir: the Hugging Face cache to look in. scriptable, exportable, no_jit: accepted, no effect
            (vitkernels has no jit-scripted layers; see VisionTransformer for torch.jit / fx / export).
        features_only, out_indices (default 3: the last three blocks), feature_cls ('getter'), feature_cfg
            (a dict with any of output_fmt, norm, prune, out_indices): a ``vitkernels.features.FeatureGetterNet``
            returning the block outputs, as timm's.
        pretrained_strict: strict loading of pretrained weights (default True).
        **kwargs: VisionTransformer arguments (None values are dropped, as timm does), plus vitkernels'
            ``backend``, ``lean_blocks``, ``fp32_residual``, ``norm_eps``.
    """
    from vitkernels.features import FeatureGetterNet
    from vitkernels.pretrained import load_pretrained_weights, pretrained_cfg_for_features, resolve_pretrained_cfg

    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    arch, tag = _arch(model_name)
    if tag and not pretrained_cfg:
        pretrained_cfg = tag
    cfg = resolve_pretrained_cfg(arch, pretrained_cfg, pretrained_cfg_overlay)
    if kwargs.pop("use_naflex", False):
        raise ValueError("use_naflex=True (timm's NaFlexVit) is not supported: vitkernels builds VisionTransformer")
    if kwargs.pop("pruned", False):
        raise ValueError("pruned=True (timm's pruned-model definitions) is not supported")
    kwargs.pop("pretrained_model_args", None)
    strict = kwargs.pop("pretrained_strict", True)
    feature_cfg = dict(kwargs.pop("feature_cfg", None) or {})
    unknown = sorted(set(feature_cfg) - set(_FEATURE_CFG_KEYS))
    if unknown:
        raise ValueError(f"unknown feature_cfg keys {unknown}; known: {', '.join(_FEATURE_CFG_KEYS)}")
    features = kwargs.pop("features_only", False)
    feature_cfg["out_indices"] = kwargs.pop("out_indices", feature_cfg.get("out_indices", 3))
    feature_cls = kwargs.pop("feature_cls", feature_cfg.pop("feature_cls", "getter"))
    user_args = {k: v for k, v in kwargs.items() if k not in ("device", "dtype")}

    kind, arch_args = _ARCHS[arch]
    args = {**arch_args, **kwargs}
    # timm's _update_default_model_kwargs: defaults from the pretrained config.
    if cfg.get("num_classes") is not None and cfg["num_classes"] >= 0:
        args.setdefault("num_classes", cfg["num_classes"])
    if cfg.get("input_size") is not None:
        args.setdefault("in_chans", cfg["input_size"][0])
        if cfg.get("fixed_input_size", False):
            args.setdefault("img_size", tuple(cfg["input_size"][-2:]))
    model = _model_class(kind)(**args)
    model.pretrained_cfg = model.default_cfg = cfg
    model.pretrained_model_args = {}
    model._model_args = dict(user_args)
    # timm's _init_model_traits: the current input size, whether it is fixed, the input conv.
    model._traits = dict(img_size=model.patch_embed.img_size, first_conv=cfg.get("first_conv"),
                         fixed_input_size=bool(model.patch_embed.strict_img_size
                                                    and not getattr(model, "dynamic_img_size", False)))
    if pretrained:
        load_pretrained_weights(model, cfg, num_classes=0 if features else model.num_classes,
                                in_chans=args.get("in_chans", 3), strict=strict, cache_dir=cache_dir)
    if checkpoint_path:
        load_checkpoint(model, checkpoint_path)
    if features:
        if str(feature_cls).lower() != "getter" and feature_cls is not FeatureGetterNet:
            raise ValueError(f"feature_cls={feature_cls!r} is not supported: vitkernels' ViTs extract features "
                             "with 'getter' (forward_intermediates), timm's default for ViTs")
        for key in ("flatten_sequential", "no_rewrite"):
            feature_cfg.pop(key, None)
        traits = dict(model._traits)
        model = FeatureGetterNet(model, **feature_cfg)
        model.in_chans = args["in_chans"]
        model._traits = traits
        model.pretrained_cfg = model.default_cfg = pretrained_cfg_for_features(cfg)
    return model


def load_checkpoint(model, checkpoint_path, strict: bool = True):
    """timm's ``load_checkpoint``: a state_dict file into ``model`` (wrappers and a 'module.' prefix removed;
    an .npz through ``model.load_pretrained``). Returns ``load_state_dict``'s result (None for .npz)."""
    from vitkernels.pretrained import load_state_dict

    if str(checkpoint_path).endswith(".npz"):
        model.load_pretrained(checkpoint_path)
        return None
    return model.load_state_dict(load_state_dict(checkpoint_path), strict=strict)
