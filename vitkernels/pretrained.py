"""Pretrained configurations (timm's ``pretrained_cfg``) and pretrained-weight loading, without timm.

Every model ``vitkernels.create_model`` builds carries ``model.pretrained_cfg`` (alias ``default_cfg``), the same
dict timm 1.0.31 attaches for the same ``name.tag``: input size, interpolation, crop_pct, mean / std,
num_classes, first_conv, classifier, weight locations. timm's data helpers (``timm.data.resolve_data_config``,
``create_transform``) read it, so a vitkernels model gets a ViT's 0.5 / 0.5 normalisation and crop 0.9, not
ImageNet's defaults. The table below is timm's ``default_cfgs`` for vitkernels' architectures (tags in timm's
priority order: the first is the default); tests/test_timm_compat.py checks it entry by entry against timm.

``pretrained=True`` loads weights, offline only (vitkernels downloads nothing), from, in timm's order:
``pretrained_cfg['state_dict']``, ``pretrained_cfg['file']`` (``pretrained_cfg_overlay=dict(file=path)``),
then the Hugging Face cache of ``pretrained_cfg['hf_hub_id']`` (``cache_dir``, else ``$HF_HUB_CACHE``,
``$HF_HOME/hub``, ``~/.cache/huggingface/hub``). Anything else raises ``PretrainedWeightsError`` naming what
was tried and how to supply the weights.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import torch
from torch import nn

# timm's PretrainedCfg fields and defaults, in its order (timm/models/_pretrained.py).
FIELDS = dict(
    url=None, file=None, state_dict=None, hf_hub_id=None, hf_hub_filename=None, source=None, architecture=None,
    tag=None, custom_load=False, input_size=(3, 224, 224), test_input_size=None, min_input_size=None,
    fixed_input_size=False, interpolation="bicubic", crop_pct=0.875, test_crop_pct=None, crop_mode="center",
    mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=1000, label_offset=None, label_names=None,
    label_descriptions=None, pool_size=None, test_pool_size=None, first_conv=None, classifier=None, license=None,
    description=None, origin_url=None, paper_name=None, paper_ids=None, notes=None,
)
_KEEP_NULL = ("pool_size", "first_conv", "classifier")  # kept in to_dict even when None (timm)
_SOURCE_KEYS = ("file", "url", "hf_hub_id", "hf_hub_filename")
INCEPTION_MEAN = INCEPTION_STD = (0.5, 0.5, 0.5)


def _cfg(hub: bool = True, **kwargs) -> dict:
    """timm's vision_transformer ``_cfg``: a ViT's data settings (0.5 mean / std, crop 0.9, bicubic)."""
    base = dict(url="", num_classes=1000, input_size=(3, 224, 224), pool_size=None, crop_pct=0.9,
                interpolation="bicubic", fixed_input_size=True, mean=INCEPTION_MEAN, std=INCEPTION_STD,
                first_conv="patch_embed.proj", classifier="head", license="apache-2.0")
    return {**FIELDS, **base, **kwargs, "_hub": hub}


# "architecture.tag" -> fields that differ from _cfg(); generated from timm 1.0.31's registry.
_TABLE = {
    "vit_base_patch16_224.augreg2_in21k_ft_in1k": _cfg(),
    "vit_base_patch16_224.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
    "vit_base_patch16_224.orig_in21k_ft_in1k": _cfg(url='https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/jx_vit_base_p16_224-80ecf9dd.pth'),
    "vit_base_patch16_224.augreg_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
    "vit_base_patch16_224.orig_in21k": _cfg(num_classes=0),
    "vit_base_patch16_224.augreg_in21k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
    "vit_base_patch16_224.sam_in1k": _cfg(url='https://storage.googleapis.com/vit_models/sam/ViT-B_16.npz', custom_load=True),
    "vit_base_patch16_224.bamboo": _cfg(crop_pct=1.0, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=115217, license=None, origin_url='https://github.com/ZhangYuanhan-AI/Bamboo', paper_ids='arXiv:2203.07845'),
    "vit_base_patch16_224.dino": _cfg(url='https://dl.fbaipublicfiles.com/dino/dino_vitbase16_pretrain/dino_vitbase16_pretrain.pth', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_base_patch16_224.mae": _cfg(url='https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_base.pth', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0, license='cc-by-nc-4.0'),
    "vit_base_patch16_384.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    "vit_base_patch16_384.orig_in21k_ft_in1k": _cfg(url='https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/jx_vit_base_p16_384-83fb41ba.pth', input_size=(3, 384, 384), crop_pct=1.0),
    "vit_base_patch16_384.augreg_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_16-i1k-300ep-lr_0.001-aug_strong2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    "vit_base_patch32_224.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz', custom_load=True),
    "vit_base_patch32_224.augreg_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
    "vit_base_patch32_224.orig_in21k": _cfg(num_classes=0),
    "vit_base_patch32_224.augreg_in21k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
    "vit_base_patch32_224.sam_in1k": _cfg(url='https://storage.googleapis.com/vit_models/sam/ViT-B_32.npz', custom_load=True),
    "vit_base_patch32_384.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_32-i21k-300ep-lr_0.001-aug_light1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    "vit_base_patch32_384.augreg_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_32-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    "vit_base_patch8_224.augreg2_in21k_ft_in1k": _cfg(),
    "vit_base_patch8_224.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
    "vit_base_patch8_224.augreg_in21k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
    "vit_base_patch8_224.dino": _cfg(url='https://dl.fbaipublicfiles.com/dino/dino_vitbase8_pretrain/dino_vitbase8_pretrain.pth', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_huge_patch14_224.orig_in21k": _cfg(num_classes=0),
    "vit_huge_patch14_224.untrained": _cfg(hub=False),
    "vit_huge_patch14_224.mae": _cfg(url='https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_huge.pth', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0, license='cc-by-nc-4.0'),
    "vit_large_patch14_224.untrained": _cfg(hub=False),
    "vit_large_patch16_224.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
    "vit_large_patch16_224.orig_in21k": _cfg(num_classes=0),
    "vit_large_patch16_224.augreg_in21k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1.npz', custom_load=True, num_classes=21843),
    "vit_large_patch16_224.mae": _cfg(url='https://dl.fbaipublicfiles.com/mae/pretrain/mae_pretrain_vit_large.pth', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0, license='cc-by-nc-4.0'),
    "vit_large_patch16_384.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1--imagenet2012-steps_20k-lr_0.01-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    "vit_large_patch32_224.orig_in21k": _cfg(num_classes=0),
    "vit_large_patch32_384.orig_in21k_ft_in1k": _cfg(url='https://github.com/rwightman/pytorch-image-models/releases/download/v0.1-vitjx/jx_vit_large_p32_384-9b920ba8.pth', input_size=(3, 384, 384), crop_pct=1.0),
    "vit_small_patch16_224.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz', custom_load=True),
    "vit_small_patch16_224.augreg_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz', custom_load=True),
    "vit_small_patch16_224.augreg_in21k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
    "vit_small_patch16_224.dino": _cfg(url='https://dl.fbaipublicfiles.com/dino/dino_deitsmall16_pretrain/dino_deitsmall16_pretrain.pth', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_small_patch16_384.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    "vit_small_patch16_384.augreg_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/S_16-i1k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    "vit_small_patch32_224.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz', custom_load=True),
    "vit_small_patch32_224.augreg_in21k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
    "vit_small_patch32_384.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    "vit_tiny_patch16_224.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_224.npz', custom_load=True),
    "vit_tiny_patch16_224.augreg_in21k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0.npz', custom_load=True, num_classes=21843),
    "vit_tiny_patch16_384.augreg_in21k_ft_in1k": _cfg(url='https://storage.googleapis.com/vit_models/augreg/Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.03-res_384.npz', custom_load=True, input_size=(3, 384, 384), crop_pct=1.0),
    # the families of issue #17: DINOv2 (with registers), SigLIP / SigLIP2 (v2_webli tags), CLIP QuickGELU, DeiT distilled
    "vit_small_patch14_dinov2.lvd142m": _cfg(url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_pretrain.pth', input_size=(3, 518, 518), crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_base_patch14_dinov2.lvd142m": _cfg(url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_pretrain.pth', input_size=(3, 518, 518), crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_large_patch14_dinov2.lvd142m": _cfg(url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth', input_size=(3, 518, 518), crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_giant_patch14_dinov2.lvd142m": _cfg(url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_pretrain.pth', input_size=(3, 518, 518), crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_small_patch14_reg4_dinov2.lvd142m": _cfg(url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vits14/dinov2_vits14_reg4_pretrain.pth', input_size=(3, 518, 518), crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_base_patch14_reg4_dinov2.lvd142m": _cfg(url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vitb14/dinov2_vitb14_reg4_pretrain.pth', input_size=(3, 518, 518), crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_large_patch14_reg4_dinov2.lvd142m": _cfg(url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_reg4_pretrain.pth', input_size=(3, 518, 518), crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_giant_patch14_reg4_dinov2.lvd142m": _cfg(url='https://dl.fbaipublicfiles.com/dinov2/dinov2_vitg14/dinov2_vitg14_reg4_pretrain.pth', input_size=(3, 518, 518), crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=0),
    "vit_base_patch16_siglip_224.v2_webli": _cfg(num_classes=0),
    "vit_base_patch16_siglip_224.webli": _cfg(num_classes=0),
    "vit_base_patch16_siglip_256.v2_webli": _cfg(input_size=(3, 256, 256), num_classes=0),
    "vit_base_patch16_siglip_256.webli": _cfg(input_size=(3, 256, 256), num_classes=0),
    "vit_base_patch16_siglip_256.webli_i18n": _cfg(input_size=(3, 256, 256), num_classes=0),
    "vit_base_patch16_siglip_384.v2_webli": _cfg(input_size=(3, 384, 384), num_classes=0),
    "vit_base_patch16_siglip_384.webli": _cfg(input_size=(3, 384, 384), num_classes=0),
    "vit_large_patch16_siglip_256.v2_webli": _cfg(input_size=(3, 256, 256), num_classes=0),
    "vit_large_patch16_siglip_256.webli": _cfg(input_size=(3, 256, 256), num_classes=0),
    "vit_so400m_patch14_siglip_224.v2_webli": _cfg(num_classes=0),
    "vit_so400m_patch14_siglip_224.webli": _cfg(num_classes=0),
    "vit_so400m_patch14_siglip_378.v2_webli": _cfg(input_size=(3, 378, 378), num_classes=0),
    "vit_so400m_patch14_siglip_378.webli": _cfg(input_size=(3, 378, 378), num_classes=0),
    "vit_so400m_patch14_siglip_378.webli_ft_in1k": _cfg(input_size=(3, 378, 378), crop_pct=1.0, crop_mode='squash'),
    "vit_so400m_patch14_siglip_384.webli": _cfg(input_size=(3, 384, 384), num_classes=0),
    "vit_so400m_patch16_siglip_256.v2_webli": _cfg(input_size=(3, 256, 256), num_classes=0),
    "vit_so400m_patch16_siglip_256.webli_i18n": _cfg(input_size=(3, 256, 256), num_classes=0),
    "vit_base_patch16_clip_quickgelu_224.metaclip_2pt5b": _cfg(hub=False, hf_hub_id='timm/vit_base_patch16_clip_224.metaclip_2pt5b', crop_pct=1.0, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=512, license='cc-by-nc-4.0', notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "vit_base_patch16_clip_quickgelu_224.metaclip_400m": _cfg(hub=False, hf_hub_id='timm/vit_base_patch16_clip_224.metaclip_400m', crop_pct=1.0, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=512, license='cc-by-nc-4.0', notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "vit_base_patch16_clip_quickgelu_224.openai": _cfg(hub=False, hf_hub_id='timm/vit_base_patch16_clip_224.openai', mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=512, notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "vit_base_patch32_clip_quickgelu_224.laion400m_e32": _cfg(hub=False, hf_hub_id='timm/vit_base_patch32_clip_224.laion400m_e32', mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=512, license='mit', notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "vit_base_patch32_clip_quickgelu_224.metaclip_2pt5b": _cfg(hub=False, hf_hub_id='timm/vit_base_patch32_clip_224.metaclip_2pt5b', crop_pct=1.0, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=512, license='cc-by-nc-4.0', notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "vit_base_patch32_clip_quickgelu_224.metaclip_400m": _cfg(hub=False, hf_hub_id='timm/vit_base_patch32_clip_224.metaclip_400m', crop_pct=1.0, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=512, license='cc-by-nc-4.0', notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "vit_base_patch32_clip_quickgelu_224.openai": _cfg(hub=False, hf_hub_id='timm/vit_base_patch32_clip_224.openai', mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=512, notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "vit_large_patch14_clip_quickgelu_224.dfn2b": _cfg(hub=False, hf_hub_id='timm/vit_large_patch14_clip_224.dfn2b', crop_pct=1.0, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=768, license='apple-ascl', notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "vit_large_patch14_clip_quickgelu_224.metaclip_2pt5b": _cfg(hub=False, hf_hub_id='timm/vit_large_patch14_clip_224.metaclip_2pt5b', crop_pct=1.0, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=768, license='cc-by-nc-4.0', notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "vit_large_patch14_clip_quickgelu_224.metaclip_400m": _cfg(hub=False, hf_hub_id='timm/vit_large_patch14_clip_224.metaclip_400m', crop_pct=1.0, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=768, license='cc-by-nc-4.0', notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "vit_large_patch14_clip_quickgelu_224.openai": _cfg(hub=False, hf_hub_id='timm/vit_large_patch14_clip_224.openai', crop_pct=1.0, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=768, notes=('natively QuickGELU, use quickgelu model variant for original results',)),
    "deit_tiny_distilled_patch16_224.fb_in1k": _cfg(url='https://dl.fbaipublicfiles.com/deit/deit_tiny_distilled_patch16_224-b40b3cf7.pth', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), classifier=('head', 'head_dist')),
    "deit_small_distilled_patch16_224.fb_in1k": _cfg(url='https://dl.fbaipublicfiles.com/deit/deit_small_distilled_patch16_224-649709d9.pth', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), classifier=('head', 'head_dist')),
    "deit_base_distilled_patch16_224.fb_in1k": _cfg(url='https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_224-df68dfff.pth', mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), classifier=('head', 'head_dist')),
    "deit_base_distilled_patch16_384.fb_in1k": _cfg(url='https://dl.fbaipublicfiles.com/deit/deit_base_distilled_patch16_384-d0272ac0.pth', input_size=(3, 384, 384), crop_pct=1.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), classifier=('head', 'head_dist')),

    # EVA-02 and timm's rope ViTs (vitkernels.nn.eva.Eva)
    "eva02_tiny_patch14_224.mim_in22k": _cfg(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=0, license='mit'),
    "eva02_small_patch14_224.mim_in22k": _cfg(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=0, license='mit'),
    "eva02_base_patch14_224.mim_in22k": _cfg(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=0, license='mit'),
    "eva02_large_patch14_224.mim_in22k": _cfg(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=0, license='mit'),
    "eva02_large_patch14_224.mim_m38m": _cfg(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=0, license='mit'),
    "eva02_base_patch14_448.mim_in22k_ft_in22k_in1k": _cfg(input_size=(3, 448, 448), crop_pct=1.0, crop_mode='squash', mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), license='mit'),
    "eva02_base_patch14_448.mim_in22k_ft_in1k": _cfg(input_size=(3, 448, 448), crop_pct=1.0, mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), license='mit'),
    "eva02_base_patch14_448.mim_in22k_ft_in22k": _cfg(input_size=(3, 448, 448), crop_pct=1.0, crop_mode='squash', mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=21841, license='mit'),
    "eva02_base_patch16_clip_224.merged2b": _cfg(mean=(0.48145466, 0.4578275, 0.40821073), std=(0.26862954, 0.26130258, 0.27577711), num_classes=512, license='mit'),
    "vit_base_patch16_rope_reg1_gap_256.sbb_in1k": _cfg(input_size=(3, 256, 256), crop_pct=0.95, license='mit'),
    "vit_medium_patch16_rope_reg1_gap_256.sbb_in1k": _cfg(input_size=(3, 256, 256), crop_pct=0.95, license='mit'),
    # BEiT, BEiT v2 (vitkernels.nn.beit.Beit)
    "beit_base_patch16_224.in22k_ft_in22k_in1k": _cfg(),
    "beit_base_patch16_224.in22k_ft_in22k": _cfg(num_classes=21841),
    "beit_base_patch16_384.in22k_ft_in22k_in1k": _cfg(input_size=(3, 384, 384), crop_pct=1.0),
    "beit_large_patch16_224.in22k_ft_in22k_in1k": _cfg(),
    "beit_large_patch16_224.in22k_ft_in22k": _cfg(num_classes=21841),
    "beit_large_patch16_384.in22k_ft_in22k_in1k": _cfg(input_size=(3, 384, 384), crop_pct=1.0),
    "beit_large_patch16_512.in22k_ft_in22k_in1k": _cfg(input_size=(3, 512, 512), crop_pct=1.0),
    "beitv2_base_patch16_224.in1k_ft_in22k_in1k": _cfg(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "beitv2_base_patch16_224.in1k_ft_in1k": _cfg(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "beitv2_base_patch16_224.in1k_ft_in22k": _cfg(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=21841),
    "beitv2_large_patch16_224.in1k_ft_in22k_in1k": _cfg(crop_pct=0.95, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "beitv2_large_patch16_224.in1k_ft_in1k": _cfg(crop_pct=0.95, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
    "beitv2_large_patch16_224.in1k_ft_in22k": _cfg(mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225), num_classes=21841),
}


def _register(table: dict) -> dict:
    out = {}
    for key, cfg in table.items():
        arch, tag = key.split(".", 1)
        cfg = dict(cfg)
        hub = cfg.pop("_hub")
        cfg.update(architecture=arch, tag=tag)
        if hub:  # timm/<arch.tag>; else none, or the one given (CLIP QuickGELU shares another name's weights)
            cfg["hf_hub_id"] = f"timm/{key}"
        out[key] = {k: cfg[k] for k in FIELDS}
    return out


PRETRAINED_CFGS: dict[str, dict] = _register(_TABLE)
DEFAULT_TAGS: dict[str, str] = {}
for _key in PRETRAINED_CFGS:
    DEFAULT_TAGS.setdefault(_key.split(".", 1)[0], _key.split(".", 1)[1])


class PretrainedWeightsError(RuntimeError):
    """``pretrained=True`` found no weights it may load (vitkernels never downloads)."""


def split_model_name_tag(name: str) -> tuple[str, str]:
    """'vit_base_patch16_224.augreg_in21k' -> ('vit_base_patch16_224', 'augreg_in21k'); no tag -> ''."""
    arch, _, tag = name.partition(".")
    return arch, tag


def list_pretrained(arch: str | None = None) -> list[str]:
    """Every 'architecture.tag' with a pretrained config (of ``arch`` only, when given), timm's order."""
    return [k for k in PRETRAINED_CFGS if arch is None or k.split(".", 1)[0] == arch]


def filter_cfg(cfg: dict) -> dict:
    """timm's ``PretrainedCfg.to_dict()``: drop None fields except pool_size, first_conv, classifier."""
    return {k: v for k, v in cfg.items() if v is not None or k in _KEEP_NULL}


def get_pretrained_cfg(name: str) -> dict | None:
    """The full config (every field) of 'architecture[.tag]' (default tag when none), a copy; None for an
    architecture without configs. Raises ValueError for a tag the architecture does not have."""
    arch, tag = split_model_name_tag(name)
    if arch not in DEFAULT_TAGS:
        return None
    key = f"{arch}.{tag or DEFAULT_TAGS[arch]}"
    if key not in PRETRAINED_CFGS:
        raise ValueError(f"invalid pretrained tag {tag!r} for {arch}; its tags: "
                         f"{', '.join(k.split('.', 1)[1] for k in list_pretrained(arch))}")
    return copy.deepcopy(PRETRAINED_CFGS[key])


def resolve_pretrained_cfg(arch: str, pretrained_cfg=None, pretrained_cfg_overlay: dict | None = None) -> dict:
    """timm's ``resolve_pretrained_cfg(...).to_dict()``: ``pretrained_cfg`` is None (the name's default tag),
    a tag (str), a dict of fields, or an object with ``to_dict()`` (timm's PretrainedCfg); the overlay's
    fields replace the config's (a weight source in the overlay sets ``custom_load=False``)."""
    cfg = None
    name = arch
    if pretrained_cfg:
        if isinstance(pretrained_cfg, str):
            name = f"{arch}.{pretrained_cfg}"
        else:
            given = pretrained_cfg.to_dict() if hasattr(pretrained_cfg, "to_dict") else dict(pretrained_cfg)
            unknown = sorted(set(given) - set(FIELDS))
            if unknown:
                raise ValueError(f"unknown pretrained_cfg fields {unknown}; fields: {', '.join(FIELDS)}")
            cfg = dict(FIELDS, **given)
    if cfg is None:
        cfg = get_pretrained_cfg(name) or dict(FIELDS)
    overlay = dict(pretrained_cfg_overlay or {})
    unknown = sorted(set(overlay) - set(FIELDS))
    if unknown:
        raise ValueError(f"unknown pretrained_cfg_overlay fields {unknown}; fields: {', '.join(FIELDS)}")
    if not cfg["architecture"]:
        overlay.setdefault("architecture", arch)
    if any(overlay.get(k) for k in _SOURCE_KEYS):
        overlay.setdefault("custom_load", False)
    cfg.update(overlay)
    return filter_cfg(cfg)


def default_cfg_for(model: nn.Module) -> dict:
    """The config of a model built without a name (``VisionTransformer(...)``): a ViT's data settings
    (timm's vision_transformer ``_cfg``) at the model's input size and classes, no weights."""
    H, W = model.patch_embed.img_size
    cfg = _cfg(hub=False, input_size=(model.in_chans, H, W), num_classes=model.num_classes)
    cfg.pop("_hub")
    return filter_cfg(cfg)


def pretrained_cfg_for_features(cfg: dict) -> dict:
    """timm's: the config of a features_only model drops num_classes, classifier and global_pool."""
    cfg = copy.deepcopy(cfg)
    for key in ("num_classes", "classifier", "global_pool"):
        cfg.pop(key, None)
    return cfg


# -- weights ---------------------------------------------------------------------------------------------------
def _hf_cache_dirs(cache_dir) -> list[Path]:
    if cache_dir is not None:
        return [Path(cache_dir)]
    dirs = []
    if os.environ.get("HF_HUB_CACHE"):
        dirs.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        dirs.append(Path(os.environ["HF_HOME"]) / "hub")
    dirs.append(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "huggingface" / "hub")
    return dirs


def find_in_hf_cache(repo_id: str, filenames=("model.safetensors", "pytorch_model.bin"), cache_dir=None,
                     revision: str = "main") -> Path | None:
    """The cached file of a Hugging Face model repo (the layout huggingface_hub writes:
    ``models--org--name/refs/<revision>`` names a snapshot), or None. Reads the disk only."""
    for root in _hf_cache_dirs(cache_dir):
        repo = root / ("models--" + repo_id.replace("/", "--"))
        ref = repo / "refs" / revision
        snapshots = [repo / "snapshots" / ref.read_text().strip()] if ref.is_file() else \
            sorted((repo / "snapshots").glob("*")) if (repo / "snapshots").is_dir() else []
        for snap in snapshots:
            for name in filenames:
                if (snap / name).is_file():
                    return snap / name
    return None


def load_state_dict(path, map_location="cpu") -> dict:
    """A state_dict from a .safetensors / .pth / .bin / .pt file (``weights_only``), unwrapping the
    'state_dict' / 'model' / 'state_dict_ema' entries training scripts save and a 'module.' prefix (DDP)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint file at {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as exc:  # pragma: no cover
            raise ImportError(f"loading {path} needs the safetensors package (pip install safetensors)") from exc
        sd = load_file(str(path), device=str(map_location))
    else:
        sd = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(sd, dict):
        for key in ("state_dict", "model", "state_dict_ema"):
            if key in sd and isinstance(sd[key], dict):
                sd = sd[key]
                break
    return {(k[7:] if k.startswith("module.") else k): v for k, v in sd.items()}


def adapt_input_conv(in_chans: int, conv_weight: torch.Tensor, base_chans: int = 3) -> torch.Tensor:
    """timm's ``adapt_input_conv``: pretrained (O, base_chans, P, P) patch weights for ``in_chans`` inputs
    (1 channel: the sum; more: repeated and scaled by base_chans / in_chans)."""
    if in_chans == base_chans:
        return conv_weight
    dtype = conv_weight.dtype
    w = conv_weight.float()
    O, I, J, K = w.shape
    if in_chans == 1:
        w = w.reshape(O, I // base_chans, base_chans, J, K).sum(dim=2) if I > base_chans else w.sum(1, keepdim=True)
    else:
        if I != base_chans:
            raise NotImplementedError("weight format not supported by conversion")
        w = w.repeat(1, int(math.ceil(in_chans / base_chans)), 1, 1)[:, :in_chans] * (base_chans / float(in_chans))
    return w.to(dtype)


def load_pretrained_weights(model: nn.Module, pretrained_cfg: dict, num_classes: int, in_chans: int,
                            strict: bool = True, cache_dir=None) -> None:
    """Load the weights ``pretrained_cfg`` locates into ``model`` as timm's ``load_pretrained`` does (input
    conv adapted to ``in_chans``, classifier dropped when ``num_classes`` differs, position embeddings
    resampled to the model's grid), from local sources only (module docstring)."""
    from vitkernels.nn.vision_transformer import load_pretrained

    arch = pretrained_cfg.get("architecture") or "this model"
    sd = pretrained_cfg.get("state_dict")
    tried = []
    if sd is None and pretrained_cfg.get("file"):
        path = Path(pretrained_cfg["file"])
        if pretrained_cfg.get("custom_load") or path.suffix == ".npz":
            from vitkernels.convert import load_npz

            load_npz(model, path, strict=strict)
            return
        sd = load_state_dict(path)
    if sd is None and pretrained_cfg.get("hf_hub_id"):
        repo = pretrained_cfg["hf_hub_id"]
        names = (pretrained_cfg["hf_hub_filename"],) if pretrained_cfg.get("hf_hub_filename") else \
            ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
        path = find_in_hf_cache(repo, names, cache_dir)
        if path is not None:
            sd = load_state_dict(path)
        else:
            tried.append(f"the Hugging Face cache ({', '.join(str(d) for d in _hf_cache_dirs(cache_dir))}) has no "
                         f"{' / '.join(names)} of {repo}")
    if sd is None:
        if pretrained_cfg.get("url"):
            tried.append(f"its url {pretrained_cfg['url']} (vitkernels downloads nothing)")
        raise PretrainedWeightsError(
            f"no pretrained weights for {arch} are available offline: "
            + ("; ".join(tried) if tried else "its pretrained_cfg names no weight source")
            + ". Pass pretrained_cfg_overlay=dict(file='path/to/weights.safetensors') (timm-format keys, "
            ".safetensors / .pth / .npz), fill the Hugging Face cache (e.g. `huggingface-cli download "
            f"{pretrained_cfg.get('hf_hub_id') or 'timm/<name>'}`), or load a timm model with "
            "vitkernels.from_timm.")
    sd = dict(sd)
    first_conv = pretrained_cfg.get("first_conv")
    pretrained_chans = (pretrained_cfg.get("input_size") or (3,))[0]
    for conv in ((first_conv,) if isinstance(first_conv, str) else (first_conv or ())):
        key = conv + ".weight"
        if key in sd and in_chans != pretrained_chans and sd[key].shape[1] != in_chans:
            sd[key] = adapt_input_conv(in_chans, sd[key], base_chans=pretrained_chans)
    classifiers = pretrained_cfg.get("classifier")
    if classifiers is not None:
        classifiers = (classifiers,) if isinstance(classifiers, str) else classifiers
        if num_classes != pretrained_cfg.get("num_classes"):
            for name in classifiers:
                sd.pop(name + ".weight", None)
                sd.pop(name + ".bias", None)
            strict = False
        elif (pretrained_cfg.get("label_offset") or 0) > 0:
            off = pretrained_cfg["label_offset"]
            for name in classifiers:
                sd[name + ".weight"], sd[name + ".bias"] = sd[name + ".weight"][off:], sd[name + ".bias"][off:]
    load_pretrained(model, sd, strict=strict)
