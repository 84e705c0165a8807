"""Hugging Face DINOv2 / SigLIP -> timm (vitkernels.convert_hf): timm's VisionTransformer gives HF's outputs.

Each source is a tiny random transformers model (no download) whose every parameter is perturbed away from its
init (unit LayerNorms, zero biases, constant LayerScale, zero register tokens), so that a wrong mapping cannot
hide behind a symmetric value. The converted kwargs build timm 1.0.31's own VisionTransformer, the state_dict
loads strictly, and in fp32 eval mode ``forward_features`` equals ``last_hidden_state`` and the pooled output
(``forward_head(pre_logits=True)``) equals ``pooler_output`` (or the classifier's logits). Where vitkernels'
VisionTransformer computes the configuration today (DINOv2 without registers or SwiGLU), it is checked too.
The 5.17 weight layout (the GPU image's transformers, and the checkpoint files) is checked by renaming the
5.24 keys back to it, so that both layouts are exercised whichever transformers is installed.
"""

from __future__ import annotations

import pytest
import torch

from optional import need

need("transformers")
timm_vit = need("timm.models.vision_transformer")

import transformers  # noqa: E402

from vitkernels.convert import UnsupportedModelError  # noqa: E402
from vitkernels.convert_hf import hf_state_dict_to_timm, hf_to_timm  # noqa: E402

TINY = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _timm(kwargs: dict, state_dict: dict):
    model = timm_vit.VisionTransformer(**kwargs).eval()
    model.load_state_dict(state_dict, strict=True)
    return model


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    """fp32 rounding only: a wrong mapping is off by O(1) of the output's scale. The absolute tolerance follows
    the output's magnitude (pooled SigLIP outputs reach ~10, where HF's nn.MultiheadAttention and timm's SDPA
    round apart by ~1e-5)."""
    scale = expected.abs().max().clamp_min(1.0).item()
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5 * scale)


def _dinov2(registers: bool, **kw):
    cls = transformers.Dinov2WithRegistersModel if registers else transformers.Dinov2Model
    cfg_cls = transformers.Dinov2WithRegistersConfig if registers else transformers.Dinov2Config
    cfg = dict(TINY, image_size=42, patch_size=14, layerscale_value=0.5)
    cfg.update(kw)
    return _perturb(cls(cfg_cls(**cfg)))


def _siglip_vision(**kw):
    cfg = dict(TINY, intermediate_size=160, image_size=48, patch_size=16)
    cfg.update(kw)
    return transformers.SiglipVisionConfig(**cfg)


def _vitkernels_too(src, x, ref, pooled: bool = True) -> None:
    """``vitkernels.from_hf`` on the same model: HF's outputs on the torch backend."""
    import vitkernels

    model = vitkernels.from_hf(src, backend="torch")
    assert not model.training
    with torch.no_grad():
        feats = model.forward_features(x)
        _close(feats, ref.last_hidden_state)
        if pooled:
            _close(model.forward_head(feats, pre_logits=True), ref.pooler_output)


# -- DINOv2 ----------------------------------------------------------------------------------------------------
DINOV2 = {
    "plain": dict(registers=False),
    "swiglu": dict(registers=False, use_swiglu_ffn=True, hidden_size=96, num_attention_heads=3),
    "eps_tanh_noqkvbias_patch16": dict(registers=False, layer_norm_eps=1e-5, hidden_act="gelu_pytorch_tanh",
                                       qkv_bias=False, image_size=48, patch_size=16, mlp_ratio=3),
    "reg4": dict(registers=True, image_size=56),
    "reg2_swiglu": dict(registers=True, num_register_tokens=2, use_swiglu_ffn=True, hidden_size=96,
                        num_attention_heads=6),
}


@pytest.mark.parametrize("case", list(DINOV2))
def test_dinov2(case):
    kw = dict(DINOV2[case])
    src = _dinov2(**kw)
    kwargs, sd = hf_to_timm(src)
    model = _timm(kwargs, sd)
    assert kwargs["reg_tokens"] == (src.config.num_register_tokens if kw["registers"] else 0)
    assert kwargs["no_embed_class"] is kw["registers"]
    size = src.config.image_size
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        ref = src(pixel_values=x)
        _close(model.forward_features(x), ref.last_hidden_state)
        _close(model.forward_head(model.forward_features(x), pre_logits=True), ref.pooler_output)
        _close(model(x), ref.pooler_output)  # num_classes=0: the class token after the final LayerNorm
    _vitkernels_too(src, x, ref)


@pytest.mark.parametrize("registers", [False, True], ids=["dinov2", "reg4"])
def test_dinov2_517_layout(registers):
    """Keys as transformers 5.17 and the hub files have them (attention.attention.query, attention.output.dense,
    mlp.weights_in packed [gate; up], mlp.weights_out), under the classification model's prefix."""
    src = _dinov2(registers, use_swiglu_ffn=True, hidden_size=96, num_attention_heads=3)
    prefix = "dinov2_with_registers." if registers else "dinov2."
    old = {}
    for k, v in src.state_dict().items():
        for new, before in ((".attention.q_proj.", ".attention.attention.query."),
                            (".attention.k_proj.", ".attention.attention.key."),
                            (".attention.v_proj.", ".attention.attention.value."),
                            (".attention.o_proj.", ".attention.output.dense."),
                            (".mlp.down_proj.", ".mlp.weights_out.")):
            k = k.replace(new, before)
        if ".mlp.up_proj." in k:
            continue
        if ".mlp.gate_proj." in k:
            up = src.state_dict()[k.replace("gate_proj", "up_proj")]
            k, v = k.replace("gate_proj", "weights_in"), torch.cat([v, up])
        old[prefix + k] = v
    assert any(".mlp.weights_in." in k for k in old) and any(".attention.attention.query." in k for k in old)
    kwargs, sd = hf_state_dict_to_timm(old, src.config)
    model = _timm(kwargs, sd)
    x = torch.randn(2, 3, 42, 42)
    with torch.no_grad():
        _close(model.forward_features(x), src(pixel_values=x).last_hidden_state)


def test_dinov2_vitkernels():
    """What vitkernels' VisionTransformer computes today (no registers, no SwiGLU) takes the same kwargs and
    state_dict and gives HF's outputs on its torch backend."""
    import vitkernels

    src = _dinov2(False, image_size=28)
    kwargs, sd = hf_to_timm(src)
    model = vitkernels.VisionTransformer(**kwargs, backend="torch").eval()
    model.load_state_dict(sd, strict=True)
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        ref = src(pixel_values=x)
        _close(model.forward_features(x), ref.last_hidden_state)
        _close(model(x), ref.pooler_output)


# -- SigLIP / SigLIP2 ---------------------------------------------------------------------------------------------
SIGLIP = {
    "map_gelu_tanh": dict(),
    "map_quick_gelu_eps": dict(hidden_act="quick_gelu", layer_norm_eps=1e-5, patch_size=12),
    "no_head_gelu": dict(vision_use_head=False, hidden_act="gelu"),
}


@pytest.mark.parametrize("case", list(SIGLIP))
def test_siglip_vision(case):
    src = _perturb(transformers.SiglipVisionModel(_siglip_vision(**SIGLIP[case])))
    kwargs, sd = hf_to_timm(src)
    assert not kwargs["class_token"] and kwargs["act_layer"] == {
        "gelu_pytorch_tanh": "gelu_tanh", "quick_gelu": "quick_gelu", "gelu": None}[src.config.hidden_act]
    model = _timm(kwargs, sd)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = src(pixel_values=x)
        feats = model.forward_features(x)
        _close(feats, ref.last_hidden_state)
        if getattr(src.config, "vision_use_head", True):  # 5.17's config has no attribute when True
            assert kwargs["global_pool"] == "map"
            _close(model.forward_head(feats, pre_logits=True), ref.pooler_output)
        else:
            assert ref.pooler_output is None and kwargs["global_pool"] == ""
    _vitkernels_too(src, x, ref, pooled=ref.pooler_output is not None)


def test_siglip_dual_tower_and_classifier():
    """SiglipModel: the vision tower (its text tower and logit scale are ignored); SiglipForImageClassification:
    the logits (mean of the post-LayerNormed tokens -> classifier; HF's unused pooling head is dropped)."""
    text = transformers.SiglipTextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                         num_attention_heads=2, max_position_embeddings=8)
    cfg = transformers.SiglipConfig(text_config=text.to_dict(), vision_config=_siglip_vision().to_dict())
    dual = _perturb(transformers.SiglipModel(cfg))
    kwargs, sd = hf_to_timm(dual)
    model = _timm(kwargs, sd)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        ref = dual.vision_model(pixel_values=x)
        _close(model.forward_features(x), ref.last_hidden_state)
        _close(model(x), ref.pooler_output)

    cfg.num_labels = 5
    clf = _perturb(transformers.SiglipForImageClassification(cfg))
    kwargs, sd = hf_to_timm(clf)
    assert (kwargs["global_pool"], kwargs["fc_norm"], kwargs["num_classes"]) == ("avg", False, 5)
    model = _timm(kwargs, sd)
    with torch.no_grad():
        _close(model(x), clf(pixel_values=x).logits)


def _naflex(x: torch.Tensor, patch: int) -> torch.Tensor:
    """images (B, C, H, W) -> (B, N, P * P * C), as Siglip2's image processor patchifies."""
    B, C, H, W = x.shape
    x = x.reshape(B, C, H // patch, patch, W // patch, patch).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def test_siglip2_native_grid():
    """Siglip2 (NaFlex) at its own square grid, no padding: a plain ViT with a conv patch embedding; the
    classifier's masked mean is then the plain mean."""
    cfg = transformers.Siglip2VisionConfig(**TINY, intermediate_size=160, patch_size=16, num_patches=9)
    src = _perturb(transformers.Siglip2VisionModel(cfg))
    kwargs, sd = hf_to_timm(src)
    assert kwargs["img_size"] == 48
    model = _timm(kwargs, sd)
    x = torch.randn(2, 3, 48, 48)
    naflex = dict(pixel_values=_naflex(x, 16), pixel_attention_mask=torch.ones(2, 9, dtype=torch.long),
                  spatial_shapes=torch.tensor([[3, 3], [3, 3]]))
    with torch.no_grad():
        ref = src(**naflex)
        feats = model.forward_features(x)
        _close(feats, ref.last_hidden_state)
        _close(model.forward_head(feats, pre_logits=True), ref.pooler_output)

    text = transformers.Siglip2TextConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                          num_attention_heads=2, max_position_embeddings=8)
    clf_cfg = transformers.Siglip2Config(text_config=text.to_dict(), vision_config=cfg.to_dict())
    clf_cfg.num_labels = 3
    clf = _perturb(transformers.Siglip2ForImageClassification(clf_cfg))
    kwargs, sd = hf_to_timm(clf)
    model = _timm(kwargs, sd)
    with torch.no_grad():
        _close(model(x), clf(**naflex).logits)


def test_dinov2_registers_off_grid():
    """Off the native grid only the registers model still matches timm: both resize the patch positions
    bicubic with antialias (timm's dynamic_img_size); HF's Dinov2Model and SigLIP resize without antialias."""
    src = _dinov2(True)
    kwargs, sd = hf_to_timm(src)
    model = _timm(dict(kwargs, dynamic_img_size=True), sd)
    for size in ((56, 56), (28, 42)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            _close(model.forward_features(x), src(pixel_values=x).last_hidden_state)


# -- the real sizes ----------------------------------------------------------------------------------------------
HUB = {  # timm model name: (HF class, HF config kwargs of the hub checkpoint timm converts from)
    "vit_small_patch14_dinov2": ("Dinov2Model", "Dinov2Config",
                                 dict(hidden_size=384, num_attention_heads=6, image_size=518, patch_size=14)),
    "vit_giant_patch14_dinov2": ("Dinov2Model", "Dinov2Config",
                                 dict(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, image_size=518,
                                      patch_size=14, use_swiglu_ffn=True)),
    "vit_base_patch14_reg4_dinov2": ("Dinov2WithRegistersModel", "Dinov2WithRegistersConfig",
                                     dict(hidden_size=768, image_size=518, patch_size=14)),
    "vit_base_patch16_siglip_224": ("SiglipVisionModel", "SiglipVisionConfig", dict()),
    "vit_so400m_patch14_siglip_384": ("SiglipVisionModel", "SiglipVisionConfig",
                                      dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                                           num_attention_heads=16, image_size=384, patch_size=14)),
    "vit_base_patch16_siglip_256": ("Siglip2VisionModel", "Siglip2VisionConfig", dict()),  # NaFlex, 16 x 16
}


@pytest.mark.parametrize("name", list(HUB))
def test_timm_hub_layout(name):
    """At the hub checkpoints' sizes (built on the meta device: no memory, no download), the converted
    state_dict has exactly the keys and shapes of timm's own model of that name, so the kwargs describe it."""
    import timm

    cls, cfg_cls, cfg = HUB[name]
    with torch.device("meta"):
        src = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**cfg))
    kwargs, sd = hf_to_timm(src)
    own = timm.create_model(name, pretrained=False, num_classes=0, device="meta").state_dict()
    assert sorted(sd) == sorted(own)
    assert [k for k in own if own[k].shape != sd[k].shape] == []
    with torch.device("meta"):
        assert {k: v.shape for k, v in timm_vit.VisionTransformer(**kwargs).state_dict().items()} == \
            {k: v.shape for k, v in own.items()}


# -- errors ---------------------------------------------------------------------------------------------------
def test_errors():
    cfg = transformers.Dinov2Config(**TINY, image_size=28, patch_size=14)
    with pytest.raises(UnsupportedModelError, match="concat"):
        hf_to_timm(transformers.Dinov2ForImageClassification(cfg))
    with pytest.raises(UnsupportedModelError, match="concat"):  # the raw state_dict path says the same
        hf_state_dict_to_timm(transformers.Dinov2ForImageClassification(cfg).state_dict(), cfg)
    with pytest.raises(UnsupportedModelError, match="hidden_act='relu6'"):
        hf_to_timm(transformers.Dinov2Model(transformers.Dinov2Config(**TINY, image_size=28, patch_size=14,
                                                                      hidden_act="relu6")))
    vit = transformers.ViTModel(transformers.ViTConfig(**TINY, image_size=32, patch_size=16, intermediate_size=64))
    with pytest.raises(ValueError, match="from_hf"):
        hf_to_timm(vit)
    with pytest.raises(ValueError, match="from_hf"):
        hf_state_dict_to_timm(vit.state_dict(), vit.config)
    src = transformers.SiglipVisionModel(_siglip_vision())
    sd = dict(src.state_dict(), **{"encoder.layers.0.self_attn.q_norm.weight": torch.ones(16)})
    with pytest.raises(UnsupportedModelError, match="q_norm"):  # a key it does not know is never dropped
        hf_state_dict_to_timm(sd, src.config)
