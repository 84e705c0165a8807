"""Weight conversion: from_timm, from_torchvision, from_hf and load_npz give the source model's logits.

Every source model is small and random (no download); parameters are perturbed away from their init (zero
heads, unit LayerNorms) so a wrong mapping cannot hide behind a symmetric value. For .npz the checkpoint is
written by an independent writer below that goes from timm's key names to the JAX layouts; timm's own reader
(``timm.models.vision_transformer._load_weights``) must reproduce the source model from it, which checks the
writer, and then vitkernels' ``load_npz`` must give timm's logits.
"""

from __future__ import annotations

import copy
import functools

import numpy as np
import pytest
import torch
from torch import nn

import vitkernels
from optional import need, requires
from oracle import DEVICE, FUSED, assert_budget, backend_params
from vitkernels import VisionTransformer
from vitkernels.backends import OPS, get_impl
from vitkernels.convert import UnsupportedModelError
from vitkernels.nn.norm import RmsNorm

timm_vit = need("timm.models.vision_transformer")  # this module checks us against timm
TimmViT = timm_vit.VisionTransformer
timm_load_npz = timm_vit._load_weights

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)


def _perturb(model: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


# -- timm ------------------------------------------------------------------------------------------------------
TIMM_CONFIGS = {
    "token": TINY,
    "avg_fc_norm": dict(TINY, global_pool="avg"),
    "no_cls_avg_norm": dict(TINY, class_token=False, global_pool="avg", fc_norm=False),
    "layerscale_qknorm_nobias": dict(TINY, init_values=0.1, qk_norm=True, qkv_bias=False),
    "no_embed_class_pre_norm": dict(TINY, no_embed_class=True, pre_norm=True),
    "odd_no_final_norm": dict(img_size=(24, 40), patch_size=8, embed_dim=48, depth=1, num_heads=3, mlp_ratio=2.5,
                              num_classes=7, final_norm=False),
    "headless_1ch_pool_none": dict(TINY, in_chans=1, num_classes=0, global_pool=""),
    # what VisionTransformer builds beyond the original ViT (issue #16): other norms, pools, no position
    "rmsnorm_qknorm_max_patch_drop": dict(TINY, norm_layer="rmsnorm", qk_norm=True, global_pool="max",
                                          patch_drop_rate=0.3),
    "ln_no_affine_pre_norm_no_pos": dict(TINY, norm_layer=functools.partial(nn.LayerNorm, elementwise_affine=False),
                                         pre_norm=True, pos_embed="none"),
    "ln_no_bias_eps1e-5_avgmax_prefix": dict(TINY, norm_layer=functools.partial(nn.LayerNorm, eps=1e-5, bias=False),
                                             global_pool="avgmax", pool_include_prefix=True),
    "nn_rmsnorm_avg_prefix_no_fc_norm": dict(TINY, norm_layer=nn.RMSNorm, global_pool="avg", pool_include_prefix=True,
                                             fc_norm=False),
    # the families of issue #17: DINOv2 with registers, SigLIP / SigLIP2 (attention-pool head, tanh-GELU),
    # OpenAI CLIP (QuickGELU, pre-norm), SiLU
    "dinov2_reg4_layerscale": dict(TINY, reg_tokens=4, no_embed_class=True, init_values=0.1),
    "reg2_with_class_pos": dict(TINY, reg_tokens=2, global_pool="avg"),
    "siglip_map_gelu_tanh": dict(TINY, class_token=False, global_pool="map", act_layer="gelu_tanh"),
    "siglip_map_reg_prefix": dict(TINY, reg_tokens=1, global_pool="map", pool_include_prefix=True),
    "clip_quickgelu_pre_norm": dict(TINY, pre_norm=True, act_layer="quick_gelu"),
    "silu_avg": dict(TINY, act_layer="silu", global_pool="avg"),
}


def _norms(model: nn.Module) -> dict[str, tuple]:
    """Every norm layer by name: (vitkernels / timm kind, eps, has weight, has bias)."""
    from vitkernels.nn.norm import _kind

    return {n: (_kind(m), m.eps, m.weight is not None, getattr(m, "bias", None) is not None)
            for n, m in model.named_modules() if _kind(m) is not None}


@pytest.mark.parametrize("name", list(TIMM_CONFIGS))
def test_from_timm_logits(name):
    kw = TIMM_CONFIGS[name]
    src = _perturb(TimmViT(**kw))
    model = vitkernels.from_timm(src, backend="torch")
    assert isinstance(model, VisionTransformer) and not model.training
    size = kw["img_size"] if isinstance(kw["img_size"], tuple) else (kw["img_size"],) * 2
    x = torch.randn(2, kw.get("in_chans", 3), *size)
    with torch.no_grad():
        assert _rel_err(model(x), src(x)) <= 1e-5
        assert _rel_err(model.forward_features(x), src.forward_features(x)) <= 1e-5
    assert _norms(model) == _norms(src)  # same kind, eps, weight and bias at every name
    # copies, not shared tensors: the source can be changed or freed independently
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(model.parameters(), src.parameters()))


def test_from_timm_eps_dynamic_size_and_mode():
    src = _perturb(TimmViT(**TINY, dynamic_img_size=True))
    for m in src.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 0.25  # a checkpoint-specific eps large enough that ignoring it changes the logits
    model = vitkernels.from_timm(src.train(), backend="torch")
    assert model.training and model.dynamic_img_size
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {0.25}
    model.eval(), src.eval()
    for size in [(32, 32), (48, 24)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert _rel_err(model(x), src(x)) <= 1e-5, size


def test_from_timm_float64():
    src = _perturb(TimmViT(**TINY)).double()
    model = vitkernels.from_timm(src, backend="torch")
    assert model.pos_embed.dtype == torch.float64
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        assert _rel_err(model(x), src(x)) <= 1e-12


def test_from_timm_training_matches_timm_seeded():
    # patch dropout, stochastic depth and every dropout keep timm's rates and draw their masks in timm's order;
    # no position dropout without a position embedding (as timm); dynamic_img_pad pads odd sizes as timm
    kw = dict(TINY, norm_layer="rmsnorm", patch_drop_rate=0.4, drop_path_rate=0.3, init_values=0.1, drop_rate=0.1,
              pos_drop_rate=0.2, proj_drop_rate=0.1, attn_drop_rate=0.1, pos_embed="none", global_pool="avgmax",
              dynamic_img_size=True, dynamic_img_pad=True)
    src = _perturb(TimmViT(**kw)).train()
    src.patch_drop.ordered = True  # a setting timm's constructor does not expose: copied from the module
    model = vitkernels.from_timm(src, backend="torch")
    assert model.training and model.patch_drop.prob == 0.4 and model.patch_drop.ordered
    assert all(isinstance(m, RmsNorm) for n, m in model.named_modules() if n.endswith(("norm1", "norm2", "fc_norm")))
    x = torch.randn(3, 3, 37, 29)  # padded to 40 x 32
    outs, grads = [], []
    for m in (model, src):
        m.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = m(x)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append({n: p.grad for n, p in m.named_parameters()})
    torch.testing.assert_close(outs[0], outs[1])
    assert list(grads[0]) == list(grads[1])
    for n, g in grads[1].items():
        torch.testing.assert_close(grads[0][n], g, msg=lambda m, n=n: f"grad {n}: {m}")
    model.eval(), src.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


def test_from_timm_per_module_eps_rmsnorm():
    src = _perturb(TimmViT(**dict(TINY, norm_layer="rmsnorm", qk_norm=True)))
    names = list(_norms(src))
    assert len(names) == 2 * 4 + 1  # per block norm1, q_norm, k_norm, norm2; the final norm
    for i, n in enumerate(names):
        src.get_submodule(n).eps = 0.05 * (i + 1)  # eps large enough to matter, a different one per module
    model = vitkernels.from_timm(src, backend="torch")
    assert _norms(model) == _norms(src)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x))


MICRO = dict(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=3)
FUSED_CONFIGS = {
    "rmsnorm_qknorm_max": dict(MICRO, norm_layer="rmsnorm", qk_norm=True, global_pool="max"),
    "ln_no_affine_no_pos_avgmax_pad": dict(MICRO, norm_layer=functools.partial(nn.LayerNorm, elementwise_affine=False),
                                           pos_embed="none", global_pool="avgmax", pool_include_prefix=True,
                                           dynamic_img_size=True, dynamic_img_pad=True),
    "reg4_map_gelu_tanh": dict(MICRO, reg_tokens=4, no_embed_class=True, global_pool="map", act_layer="gelu_tanh"),
    "quickgelu_reg1": dict(MICRO, reg_tokens=1, act_layer="quick_gelu", init_values=0.1),
}


@pytest.mark.parametrize("name", list(FUSED_CONFIGS))
@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_from_timm_fused_backend_within_budget(backend, name):
    """The converted model on a kernel backend: logits within the fp32 budget of a float64 timm oracle."""
    lacking = [op for op in OPS if get_impl(backend).get_op(op) is None]
    if lacking:
        pytest.skip(f"{backend} backend has no {', '.join(lacking)} op yet")
    kw = FUSED_CONFIGS[name]
    src = _perturb(TimmViT(**kw)).to(DEVICE)
    oracle = copy.deepcopy(src).double()
    model = vitkernels.from_timm(src, backend=backend)
    x = torch.randn(2, 3, 13, 19, device=DEVICE) if kw.get("dynamic_img_pad") else torch.randn(2, 3, 16, 16,
                                                                                               device=DEVICE)
    with torch.no_grad():
        assert_budget("logits", model(x), src(x), oracle(x.double()))


@pytest.mark.parametrize("kw, feature", [
    (dict(global_pool="prr"), "global_pool='prr'"),
    (dict(act_layer="relu"), "the fused epilogue computes"),
    (dict(scale_attn_norm=True), "scale_attn_norm"),
    (dict(norm_layer="batchnorm"), r"normalization layer torch.nn.modules.batchnorm.BatchNorm2d at blocks.0.norm1"),
])
def test_from_timm_rejects_unsupported(kw, feature):
    src = TimmViT(**dict(TINY, **kw))
    with pytest.raises(UnsupportedModelError, match=feature):
        vitkernels.from_timm(src)


def test_from_timm_rejects_mixed_norms():
    from timm.layers import RmsNorm as TimmRmsNorm

    src = TimmViT(**TINY)
    src.norm = TimmRmsNorm(TINY["embed_dim"])  # one norm_layer builds every norm: this model has two kinds
    with pytest.raises(UnsupportedModelError, match=r"normalization layers of different kinds \(blocks.0.norm1 is "
                                                    r"LayerNorm, norm is RmsNorm\)"):
        vitkernels.from_timm(src)


def test_from_timm_rejects_other_models():
    with pytest.raises(TypeError, match="timm.models.vision_transformer.VisionTransformer"):
        vitkernels.from_timm(torch.nn.Linear(3, 3))
    from timm.models.eva import Eva

    eva = Eva(img_size=32, patch_size=8, embed_dim=64, depth=1, num_heads=2, use_rot_pos_emb=True)
    assert vitkernels.patch_timm(eva, backend="torch") is eva  # patched in place (tests/test_patch_timm_families.py)
    vitkernels.unpatch_timm(eva)
    assert isinstance(vitkernels.from_timm(eva, backend="torch"), vitkernels.Eva)
    from timm.layers import GatedMlp

    gated = TimmViT(**dict(TINY, mlp_layer=GatedMlp))
    with pytest.raises(UnsupportedModelError, match="MLP type GatedMlp"):
        vitkernels.from_timm(gated)


def test_from_timm_deit_distilled():
    """DeiT's distillation token (a second prefix row of the fused patch embedding) and head: the mean of both
    heads in eval and in plain training, the pair with distilled_training; gradients reach both tokens."""
    from timm.models.deit import VisionTransformerDistilled as TimmDistilled

    src = _perturb(TimmDistilled(**TINY))
    model = vitkernels.from_timm(src, backend="torch")
    assert isinstance(model, vitkernels.VisionTransformerDistilled) and model.num_prefix_tokens == 2
    assert model.state_dict().keys() == src.state_dict().keys()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel_err(model(x), src(x)) <= 1e-5
        assert _rel_err(model.forward_head(model.forward_features(x), pre_logits=True),
                        src.forward_head(src.forward_features(x), pre_logits=True)) <= 1e-5
    for m in (model, src):
        m.train().set_distilled_training(True)
    out, ref = model(x), src(x)
    assert isinstance(out, tuple) and len(out) == 2
    for a, b in zip(out, ref):
        assert _rel_err(a, b) <= 1e-5
    (out[0].sum() + 2 * out[1].sum()).backward()
    (ref[0].sum() + 2 * ref[1].sum()).backward()
    for name in ("cls_token", "dist_token", "pos_embed", "head_dist.weight"):
        torch.testing.assert_close(model.get_parameter(name).grad, src.get_parameter(name).grad, rtol=1e-4,
                                   atol=1e-6)


# -- torchvision -------------------------------------------------------------------------------------------
def _torchvision_vit(**kw):
    from torchvision.models.vision_transformer import VisionTransformer as TvViT

    cfg = dict(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=64, mlp_dim=128, num_classes=10)
    cfg.update(kw)
    return _perturb(TvViT(**cfg))


@pytest.mark.parametrize("kw", [{}, dict(hidden_dim=56, mlp_dim=61, num_heads=4)], ids=["ratio2", "ratio61_56"])
@requires("torchvision")
def test_from_torchvision_logits(kw):
    src = _torchvision_vit(**kw)
    model = vitkernels.from_torchvision(src, backend="torch")
    assert model.blocks[0].mlp.fc1.out_features == src.mlp_dim
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {1e-6}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        assert _rel_err(model(x), src(x)) <= 1e-5


@requires("torchvision")
def test_from_torchvision_old_mlp_names_and_errors():
    # torchvision < 0.13 built the MLP as linear_1, act, dropout_1, linear_2, dropout_2: same modules, other names
    from collections import OrderedDict

    src = _torchvision_vit()
    for layer in src.encoder.layers:
        fc1, act, drop1, fc2, drop2 = layer.mlp
        layer.mlp = torch.nn.Sequential(OrderedDict(linear_1=fc1, act=act, dropout_1=drop1, linear_2=fc2,
                                                    dropout_2=drop2))
    assert "encoder.layers.encoder_layer_0.mlp.linear_1.weight" in src.state_dict()
    model = vitkernels.from_torchvision(src, backend="torch")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel_err(model(x), src(x)) <= 1e-5

    with pytest.raises(UnsupportedModelError, match="representation_size"):
        vitkernels.from_torchvision(_torchvision_vit(representation_size=32))
    tanh_mlp = _torchvision_vit()
    tanh_mlp.encoder.layers[1].mlp[1] = torch.nn.GELU(approximate="tanh")
    with pytest.raises(UnsupportedModelError, match="exact GELU"):
        vitkernels.from_torchvision(tanh_mlp)
    with pytest.raises(TypeError, match="torchvision.models.VisionTransformer"):
        vitkernels.from_torchvision(TimmViT(**TINY))


# -- Hugging Face ---------------------------------------------------------------------------------------------
def _hf_config(**kw):
    from transformers import ViTConfig

    cfg = dict(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, num_labels=10)
    cfg.update(kw)
    return ViTConfig(**cfg)


@pytest.mark.parametrize("kw", [{}, dict(layer_norm_eps=0.25, qkv_bias=False, intermediate_size=96)],
                         ids=["default_eps", "eps0.25_noqkvbias"])
@requires("transformers")
def test_from_hf_classification_logits(kw):
    from transformers import ViTForImageClassification

    src = _perturb(ViTForImageClassification(_hf_config(**kw)))
    model = vitkernels.from_hf(src, backend="torch")
    eps = src.config.layer_norm_eps
    assert {m.eps for m in model.modules() if isinstance(m, torch.nn.LayerNorm)} == {eps}
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        ref = src(pixel_values=x)
        assert _rel_err(model(x), ref.logits) <= 1e-5


@requires("transformers")
def test_from_hf_backbone_features():
    from transformers import ViTModel

    src = _perturb(ViTModel(_hf_config(layer_norm_eps=0.25), add_pooling_layer=False))
    model = vitkernels.from_hf(src, backend="torch")
    assert model.num_classes == 0
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = src(pixel_values=x).last_hidden_state
        assert _rel_err(model.forward_features(x), ref) <= 1e-5
        assert _rel_err(model(x), ref[:, 0]) <= 1e-5
    with pytest.warns(UserWarning, match="pooler"):
        vitkernels.from_hf(ViTModel(_hf_config()))


@requires("transformers")
def test_from_hf_errors():
    from transformers import ViTModel

    with pytest.raises(UnsupportedModelError, match="hidden_act='gelu_new'"):
        vitkernels.from_hf(ViTModel(_hf_config(hidden_act="gelu_new"), add_pooling_layer=False))
    with pytest.raises(TypeError, match="ViTModel or ViTForImageClassification"):
        vitkernels.from_hf(TimmViT(**TINY))


# -- JAX .npz -----------------------------------------------------------------------------------------------
def write_jax_npz(path, model: TimmViT, layout: str = "original", scanned: bool = False, prefix: str = "",
                  drop=()):
    """Write a timm ViT's weights as a JAX checkpoint, going from timm's key names to the JAX layout.

    layout "original": google-research/vision_transformer (pos embedding with the class position,
    MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3); "big_vision": top-level pos_embedding (patches
    only), _0 / _1 / _0 indices, optionally scanned (one array per name with a leading depth axis).
    """
    sd = {k: v.detach().double().numpy() for k, v in model.state_dict().items()}
    H = model.blocks[0].attn.num_heads
    out = {
        "embedding/kernel": sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0),  # OIHW -> HWIO
        "embedding/bias": sd["patch_embed.proj.bias"],
    }
    if "cls_token" in sd:
        out["cls"] = sd["cls_token"]
    if layout == "original":
        out["Transformer/posembed_input/pos_embedding"] = sd["pos_embed"]
        mha, ln2, mlp = "MultiHeadDotProductAttention_1", "LayerNorm_2", "MlpBlock_3"
    else:
        out["pos_embedding"] = sd["pos_embed"]
        mha, ln2, mlp = "MultiHeadDotProductAttention_0", "LayerNorm_1", "MlpBlock_0"
    if "norm.weight" in sd:
        out["Transformer/encoder_norm/scale"] = sd["norm.weight"]
        out["Transformer/encoder_norm/bias"] = sd["norm.bias"]
    if "head.weight" in sd:
        out["head/kernel"] = sd["head.weight"].T
        out["head/bias"] = sd["head.bias"]
    blocks = []
    for i in range(len(model.blocks)):
        g = lambda name: sd[f"blocks.{i}.{name}"]  # noqa: E731
        D = g("norm1.weight").shape[0]
        qw, kw, vw = np.split(g("attn.qkv.weight"), 3)
        qb, kb, vb = np.split(g("attn.qkv.bias"), 3)
        blk = {
            "LayerNorm_0/scale": g("norm1.weight"), "LayerNorm_0/bias": g("norm1.bias"),
            f"{ln2}/scale": g("norm2.weight"), f"{ln2}/bias": g("norm2.bias"),
            f"{mha}/out/kernel": g("attn.proj.weight").T.reshape(H, D // H, D),
            f"{mha}/out/bias": g("attn.proj.bias"),
            f"{mlp}/Dense_0/kernel": g("mlp.fc1.weight").T, f"{mlp}/Dense_0/bias": g("mlp.fc1.bias"),
            f"{mlp}/Dense_1/kernel": g("mlp.fc2.weight").T, f"{mlp}/Dense_1/bias": g("mlp.fc2.bias"),
        }
        for name, w, b in (("query", qw, qb), ("key", kw, kb), ("value", vw, vb)):
            blk[f"{mha}/{name}/kernel"] = w.T.reshape(D, H, D // H)
            blk[f"{mha}/{name}/bias"] = b.reshape(H, D // H)
        blocks.append(blk)
    if scanned:
        for name in blocks[0]:
            out[f"Transformer/encoderblock/{name}"] = np.stack([b[name] for b in blocks])
    else:
        for i, blk in enumerate(blocks):
            out.update({f"Transformer/encoderblock_{i}/{name}": a for name, a in blk.items()})
    out = {prefix + k: v.astype(np.float32) for k, v in out.items() if k not in drop}
    np.savez(path, **out)
    return path


def _timm_from_npz(path, **kw):
    model = TimmViT(**kw).eval()
    timm_load_npz(model, str(path))
    return model


def _check_npz(path, src, timm_kw, vk_kw, size=32):
    """timm's reader reproduces ``src`` (when the configs agree), and load_npz gives timm's logits."""
    ref = _timm_from_npz(path, **timm_kw)
    model = VisionTransformer(**vk_kw, backend="torch").eval()
    result = vitkernels.load_npz(model, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = ref(x)
        if src is not None:
            assert _rel_err(out, src(x)) <= 1e-5, "the test's npz writer disagrees with timm's reader"
        assert _rel_err(model(x), out) <= 1e-5


def test_load_npz_original_layout(tmp_path):
    kw = dict(TINY, num_classes=5)
    src = _perturb(TimmViT(**kw))
    path = write_jax_npz(tmp_path / "vit.npz", src)
    _check_npz(path, src, kw, kw)
    # a no_embed_class model loads it exactly too: the class position folds into the class token
    model = VisionTransformer(**kw, no_embed_class=True, backend="torch").eval()
    vitkernels.load_npz(model, path)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert _rel_err(model(x), src(x)) <= 1e-5


def test_load_npz_resamples_pos_embed(tmp_path):
    src = _perturb(TimmViT(**TINY))
    path = write_jax_npz(tmp_path / "vit.npz", src, prefix="opt/target/")
    kw48 = dict(TINY, img_size=48)  # 4x4 grid in the checkpoint, 6x6 in the model
    _check_npz(path, None, kw48, kw48, size=48)


@pytest.mark.parametrize("scanned", [False, True], ids=["per_block", "scanned"])
def test_load_npz_big_vision_gap(tmp_path, scanned):
    kw = dict(TINY, class_token=False, global_pool="avg", fc_norm=False)
    src = _perturb(TimmViT(**kw))
    path = write_jax_npz(tmp_path / "bv.npz", src, layout="big_vision", scanned=scanned, prefix="params/")
    _check_npz(path, src, kw, kw)


def test_load_npz_big_vision_token(tmp_path):
    # big_vision 'tok' pooling: the class token gets no position (timm: no_embed_class=True); a vitkernels
    # model whose class token has a position slot loads it exactly with a zero class position
    kw = dict(TINY, no_embed_class=True)
    src = _perturb(TimmViT(**kw))
    path = write_jax_npz(tmp_path / "bv.npz", src, layout="big_vision", prefix="params/")
    _check_npz(path, src, kw, kw)
    _check_npz(path, src, kw, TINY)


def test_load_npz_errors(tmp_path):
    src = _perturb(TimmViT(**TINY))
    model = VisionTransformer(**TINY, backend="torch")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    key = "Transformer/encoderblock_1/MlpBlock_3/Dense_0/bias"
    path = write_jax_npz(tmp_path / "missing.npz", src, drop=(key,))
    with pytest.raises(KeyError, match=key):
        vitkernels.load_npz(model, path)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "a failed load changed weights"
    result = vitkernels.load_npz(model, path, strict=False)
    assert result.missing_keys == ["blocks.1.mlp.fc1.bias"]

    full = write_jax_npz(tmp_path / "full.npz", src)
    with pytest.raises(KeyError, match="fc_norm=False"):
        vitkernels.load_npz(VisionTransformer(**dict(TINY, global_pool="avg")), full)
    with pytest.raises(KeyError, match="head.weight"):
        vitkernels.load_npz(VisionTransformer(**dict(TINY, num_classes=3)), full)
    headless = VisionTransformer(**dict(TINY, num_classes=0), backend="torch").eval()
    assert vitkernels.load_npz(headless, full).unexpected_keys == []  # dropping the classifier is fine
    with pytest.raises(TypeError, match="vitkernels.VisionTransformer"):
        vitkernels.load_npz(src, full)

    np.savez(tmp_path / "other.npz", weight=np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="not a JAX ViT checkpoint"):
        vitkernels.load_npz(model, tmp_path / "other.npz")
    (tmp_path / "junk.npz").write_bytes(b"not an archive")
    with pytest.raises(ValueError, match="cannot read"):
        vitkernels.load_npz(model, tmp_path / "junk.npz")
    np.savez(tmp_path / "map.npz", **{"embedding/kernel": np.zeros(1, np.float32),
                                       "MAPHead_0/probe": np.zeros(1, np.float32)})
    with pytest.raises(UnsupportedModelError, match="MAPHead"):
        vitkernels.load_npz(model, tmp_path / "map.npz")
