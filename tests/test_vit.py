"""The model as a drop-in for timm: same keys, same logits, same methods; fine-tuning helpers; bad input."""

from __future__ import annotations

import pytest
import torch

import vitkernels
import vitkernels.pretrained
from optional import need
from vitkernels import VisionTransformer

resample_abs_pos_embed = need("timm.layers").resample_abs_pos_embed  # this module checks us against timm
TimmViT = need("timm.models.vision_transformer").VisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)

CONFIGS = {
    "token": TINY,
    "n197": dict(img_size=224, patch_size=16, embed_dim=32, depth=1, num_heads=2, num_classes=5),
    "avg_fcnorm": dict(TINY, global_pool="avg"),
    "no_cls_avg": dict(TINY, class_token=False, global_pool="avg"),
    "layerscale_qknorm": dict(TINY, init_values=1e-2, qk_norm=True, qkv_bias=False),
    "no_embed_class_prenorm": dict(TINY, no_embed_class=True, pre_norm=True),
    "no_final_norm_odd": dict(img_size=(24, 40), patch_size=8, embed_dim=48, depth=1, num_heads=3, mlp_ratio=2.5,
                              num_classes=7, final_norm=False),
    "headless_1ch": dict(TINY, in_chans=1, num_classes=0),
    "droppath_eval": dict(TINY, drop_path_rate=0.2, drop_rate=0.1, attn_drop_rate=0.1, proj_drop_rate=0.1),
}


def _pair(**kw):
    timm_model = TimmViT(**kw).eval()
    ours = VisionTransformer(**kw, backend="torch").eval()
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    return timm_model, ours


def _rel_err(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_timm(name):
    kw = CONFIGS[name]
    timm_model, ours = _pair(**kw)
    assert list(ours.state_dict()) == list(timm_model.state_dict())
    size = kw["img_size"] if isinstance(kw["img_size"], tuple) else (kw["img_size"],) * 2
    x = torch.randn(3, kw.get("in_chans", 3), *size)
    with torch.no_grad():
        ref, out = timm_model(x), ours(x)
        assert _rel_err(out, ref) <= 1e-5
        assert _rel_err(ours.forward_features(x), timm_model.forward_features(x)) <= 1e-5
        feats = ours.forward_features(x)
        assert _rel_err(ours.forward_head(feats, pre_logits=True),
                        timm_model.forward_head(timm_model.forward_features(x), pre_logits=True)) <= 1e-5


def test_training_mode_gradients_match_timm():
    kw = dict(TINY, init_values=0.1)
    timm_model, ours = _pair(**kw)
    timm_model.train(), ours.train()
    x = torch.randn(2, 3, 32, 32)
    timm_model(x).square().sum().backward()
    ours(x).square().sum().backward()
    for (name, p), q in zip(timm_model.named_parameters(), ours.parameters()):
        assert _rel_err(q.grad, p.grad) <= 1e-4, name


def test_dynamic_img_size_matches_timm():
    kw = dict(TINY, dynamic_img_size=True)
    timm_model, ours = _pair(**kw)
    for size in [(32, 32), (48, 40), (16, 56)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            assert _rel_err(ours(x), timm_model(x)) <= 1e-5, size


def test_timm_methods():
    model = VisionTransformer(**TINY)
    assert model.no_weight_decay() == TimmViT(**TINY).no_weight_decay()
    assert model.get_classifier() is model.head
    model.reset_classifier(3)
    head = model.get_classifier()
    assert head.weight.shape == (3, 64) and torch.count_nonzero(head.weight) == 0 and torch.count_nonzero(head.bias) == 0
    x = torch.randn(2, 3, 32, 32)
    logits = model(x)
    assert logits.shape == (2, 3) and torch.count_nonzero(logits) == 0  # zero head: uniform predictions
    model.reset_classifier(0, global_pool="avg")
    assert model(x).shape == (2, 64) and model.global_pool == "avg"
    with pytest.raises(ValueError, match="cannot add attention pooling"):
        model.reset_classifier(2, global_pool="map")


def test_grad_checkpointing_same_gradients():
    torch.manual_seed(1)
    a = VisionTransformer(**TINY, drop_path_rate=0.0)
    b = VisionTransformer(**TINY)
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    a(x).logsumexp(-1).sum().backward()
    b(x).logsumexp(-1).sum().backward()
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("prefix", [0, 1])
@pytest.mark.parametrize("new,old", [((6, 6), None), ((5, 7), None), ((3, 3), (4, 6)), ((8, 4), (2, 2))])
@pytest.mark.parametrize("mode", ["bicubic", "bilinear"])
def test_resample_pos_embed_matches_timm(prefix, new, old, mode):
    grid = old or (4, 4)
    pe = torch.randn(1, prefix + grid[0] * grid[1], 16)
    ours = vitkernels.resample_pos_embed(pe, new, old_size=old, num_prefix_tokens=prefix, interpolation=mode)
    ref = resample_abs_pos_embed(pe, new, old_size=old, num_prefix_tokens=prefix, interpolation=mode)
    torch.testing.assert_close(ours, ref, rtol=0, atol=0)


def test_load_pretrained_resamples_to_higher_resolution():
    low = VisionTransformer(**TINY)
    high = VisionTransformer(**dict(TINY, img_size=48))
    vitkernels.load_pretrained(high, low.state_dict())
    expected = vitkernels.resample_pos_embed(low.pos_embed, (6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(high.pos_embed, expected, rtol=0, atol=0)
    torch.testing.assert_close(high.blocks[0].attn.qkv.weight, low.blocks[0].attn.qkv.weight, rtol=0, atol=0)
    assert high(torch.randn(1, 3, 48, 48)).shape == (1, 10)


def test_load_pretrained_reports_key_mismatch():
    model = VisionTransformer(**TINY)
    sd = model.state_dict()
    sd.pop("head.bias")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"missing keys \['head.bias'\].*unexpected keys \['extra.weight'\]"):
        vitkernels.load_pretrained(model, sd)
    with pytest.raises(RuntimeError, match="Missing key"):
        model.load_state_dict({k: v for k, v in model.state_dict().items() if k != "norm.weight"})


NAMES = ["vit_tiny_patch16_224", "vit_small_patch16_224", "vit_small_patch32_224", "vit_base_patch16_224",
         "vit_base_patch32_224", "vit_base_patch16_384", "vit_large_patch16_224", "vit_large_patch16_384",
         "vit_huge_patch14_224"]


def test_list_models_has_the_required_names():
    assert set(NAMES) <= set(vitkernels.list_models())
    assert vitkernels.list_models("vit_huge*") == ["vit_huge_patch14_224"]


@pytest.mark.parametrize("name", vitkernels.list_models())
def test_create_model_parameter_count_and_keys_match_timm(name):
    import timm

    with torch.device("meta"):
        ref = timm.create_model(name)
        ours = vitkernels.create_model(name)
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == \
           {k: tuple(v.shape) for k, v in ref.state_dict().items()}


def test_paper_table_sizes():
    # The paper's Table 1 counts (86M / 307M / 632M) are for its own heads; with timm's heads:
    counts = {}
    for name in ["vit_base_patch16_224", "vit_large_patch16_224", "vit_huge_patch14_224"]:
        with torch.device("meta"):
            counts[name] = sum(p.numel() for p in vitkernels.create_model(name).parameters()) / 1e6
    assert round(counts["vit_base_patch16_224"]) == 87 and round(counts["vit_large_patch16_224"]) == 304
    assert round(counts["vit_huge_patch14_224"]) == 631


def test_create_model_overrides_and_errors(tmp_path):
    m = vitkernels.create_model("vit_tiny_patch16_224", img_size=32, num_classes=4, depth=1, patch_size=8)
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4) and m.patch_embed.grid_size == (4, 4)
    with pytest.raises(ValueError, match="unknown model 'vit_gigantic'"):
        vitkernels.create_model("vit_gigantic")
    with pytest.raises(vitkernels.pretrained.PretrainedWeightsError, match="vitkernels downloads nothing"):
        vitkernels.create_model("vit_tiny_patch16_224", pretrained=True, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        vitkernels.create_model("vit_tiny_patch16_224", backend="cudnn")


@pytest.mark.parametrize("shape,match", [
    ((2, 3, 40, 40), "does not match the model's 32x32"),
    ((2, 1, 32, 32), "expected 3 input channels, got 1"),
    ((3, 32, 32), r"expected images of shape \(B, C, H, W\)"),
])
def test_bad_images(shape, match):
    model = VisionTransformer(**TINY)
    with pytest.raises(ValueError, match=match):
        model(torch.randn(*shape))


def test_bad_images_dynamic_size_not_divisible():
    model = VisionTransformer(**TINY, dynamic_img_size=True)
    with pytest.raises(ValueError, match="not divisible by the patch size 8"):
        model(torch.randn(1, 3, 36, 32))


def test_bad_dtype_and_device():
    model = VisionTransformer(**TINY)
    with pytest.raises(ValueError, match="dtype"):
        model(torch.randn(1, 3, 32, 32, dtype=torch.float64))
    with pytest.raises(ValueError, match="weight is on cpu but images is on meta"):
        model(torch.randn(1, 3, 32, 32, device="meta"))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        VisionTransformer(**dict(TINY, num_heads=5))
    with pytest.raises(ValueError, match="global_pool"):
        VisionTransformer(**dict(TINY, global_pool="prr"))
    with pytest.raises(ValueError, match="needs class_token"):
        VisionTransformer(**dict(TINY, class_token=False))


def test_img_size_not_a_multiple_of_the_patch_drops_the_remainder_as_timm():
    """SigLIP so400m/14 at 384 (27 x 27 patches, 6 pixels dropped): timm's stride-P Conv2d ignores the last
    rows and columns of a fixed img_size that is not a multiple of P; so does the fused patch embedding (a view
    of the images, no copy). Other sizes still have to be multiples of P."""
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    torch.manual_seed(0)
    ref = TimmViT(**dict(TINY, img_size=36)).eval()
    ours = VisionTransformer(**dict(TINY, img_size=36), backend="torch").eval()
    ours.load_state_dict(ref.state_dict())
    assert ours.patch_embed.grid_size == ref.patch_embed.grid_size
    x = torch.randn(2, 3, 36, 36)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    with pytest.raises(ValueError, match="does not match"):
        ours(torch.randn(1, 3, 33, 33))


def test_autocast_cpu_bf16_runs_reference():
    model = VisionTransformer(**TINY, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(torch.randn(2, 3, 32, 32))
    assert y.shape == (2, 10) and torch.isfinite(y).all()
