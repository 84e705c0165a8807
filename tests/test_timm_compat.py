"""vitkernels as a timm drop-in (issue #16), each point held against timm itself (random weights, tiny models):

- model configs: ``pretrained_cfg`` of every name and tag, tagged names, timm's create_model kwargs, timm's
  data helpers, pretrained weights from a local file or the Hugging Face cache (offline);
- the constructor: every argument of timm's VisionTransformer either builds what timm builds (same seeded
  initial tensors, same logits in eval and, with the same seed, in training) or raises naming the argument;
- feature extraction: forward_intermediates / get_intermediate_layers / prune_intermediate_layers /
  features_only against timm's, and bit for bit against forward_features on every backend, also on patched
  timm models;
- graph capture: torch.fx (plain and timm's create_feature_extractor), torch.export on every backend, and
  torch.jit.script (a clear error for vitkernels models; patched timm models still script).
"""

from __future__ import annotations

import copy
import functools
import inspect

import pytest
import torch
from torch import nn

import vitkernels
from oracle import DEVICE, FUSED, backend_params
from optional import need, requires
from vitkernels import VisionTransformer
from vitkernels.backends import OPS, get_impl, why_not
from vitkernels.pretrained import PretrainedWeightsError

# Every test here compares against timm: each is skipped, naming it, when timm is absent (a per-test mark, so
# the module still collects).
pytestmark = requires("timm")
try:
    import timm
    import timm.data
    from timm.models.vision_transformer import VisionTransformer as TimmViT
except ImportError:  # pragma: no cover - the mark above skips every test
    timm = TimmViT = None

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
# The smallest model for the fused backends (Triton's interpreter is slow): N = 4 + 1 tokens, head dim 16.
MICRO = dict(img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=3)
ARCHS = vitkernels.list_models()


def _all_ops(backend):
    why = why_not(backend, DEVICE)
    if why is None:
        missing = [op for op in OPS if get_impl(backend).get_op(op) is None]
        why = f"{backend} backend lacks {missing}" if missing else None
    if why:
        pytest.skip(why)


def _images(kw, batch=2, size=None):
    size = size or (kw["img_size"] if isinstance(kw["img_size"], tuple) else (kw["img_size"],) * 2)
    return torch.randn(batch, kw.get("in_chans", 3), *size, device=DEVICE)


def _seeded_pair(**kw):
    """timm's model and ours built from the same seed: their initial tensors must be identical."""
    torch.manual_seed(0)
    ref = TimmViT(**kw)
    torch.manual_seed(0)
    ours = VisionTransformer(**kw, backend="torch")
    return ref, ours


def _assert_same_state(ours, ref):
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in b:
        assert torch.equal(a[k], b[k]), k


# -- 1. model configs --------------------------------------------------------------------------------------
def test_every_pretrained_cfg_equals_timms():
    from timm.models import get_arch_pretrained_cfgs
    from vitkernels.pretrained import list_pretrained, resolve_pretrained_cfg

    expected = [k for arch in ARCHS for k in get_arch_pretrained_cfgs(arch)]
    assert sorted(list_pretrained()) == sorted(expected) == vitkernels.list_models(pretrained=True)
    for key in expected:
        arch, tag = key.split(".")
        assert resolve_pretrained_cfg(arch, tag) == timm.models.get_pretrained_cfg(key).to_dict(), key
    for arch in ARCHS:  # the default tag of each name
        assert resolve_pretrained_cfg(arch) == timm.models._builder.resolve_pretrained_cfg(arch).to_dict(), arch


@pytest.mark.parametrize("name", ["vit_base_patch16_224.augreg_in21k", "vit_base_patch16_224.orig_in21k",
                                  "vit_base_patch16_224.bamboo", "vit_base_patch16_384", "vit_large_patch32_224",
                                  "vit_small_patch16_224.dino"])
def test_create_model_tagged_names_as_timm(name):
    from timm.data import create_transform, resolve_model_data_config

    with torch.device("meta"):
        ref = timm.create_model(name)
        ours = vitkernels.create_model(name)
    assert ours.pretrained_cfg == ref.pretrained_cfg and ours.default_cfg is ours.pretrained_cfg
    assert ours.num_classes == ref.num_classes and ours.patch_embed.img_size == ref.patch_embed.img_size
    assert ours._traits == ref._traits and ours._model_args == ref._model_args
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    config = resolve_model_data_config(ours)
    assert config == resolve_model_data_config(ref)
    assert config["mean"] == ref.pretrained_cfg["mean"] and config["crop_pct"] == ref.pretrained_cfg["crop_pct"]
    assert str(create_transform(**config)) == str(create_transform(**resolve_model_data_config(ref)))


def test_create_model_kwargs_as_timm():
    kw = dict(img_size=32, depth=1, drop_path_rate=None, fc_norm=None)  # None values are dropped, as in timm
    overlay = dict(mean=(0.1, 0.2, 0.3), crop_pct=1.0)
    ref = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained_cfg_overlay=overlay, scriptable=True,
                            exportable=True, no_jit=True, **kw)
    ours = vitkernels.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained_cfg_overlay=overlay,
                                   scriptable=True, exportable=True, no_jit=True, **kw)
    assert ours.pretrained_cfg == ref.pretrained_cfg and ours._model_args == ref._model_args
    assert ours.num_classes == 21843 and ours.patch_embed.img_size == (32, 32)
    cfg = dict(ref.pretrained_cfg, num_classes=7, input_size=(1, 48, 48))
    ref = timm.create_model("vit_tiny_patch16_224", pretrained_cfg=cfg, depth=1)
    ours = vitkernels.create_model("vit_tiny_patch16_224", pretrained_cfg=cfg, depth=1)
    assert (ours.num_classes, ours.in_chans, ours.patch_embed.img_size) == (7, 1, (48, 48)) == \
           (ref.num_classes, ref.in_chans, ref.patch_embed.img_size)
    assert ours.pretrained_cfg == ref.pretrained_cfg
    ours = vitkernels.create_model("vit_tiny_patch16_224", pretrained_cfg="augreg_in21k", depth=1, img_size=32)
    assert ours.pretrained_cfg["tag"] == "augreg_in21k" and ours.num_classes == 21843
    with pytest.raises(ValueError, match="invalid pretrained tag 'nope' for vit_tiny_patch16_224; its tags: "
                                         "augreg_in21k_ft_in1k, augreg_in21k"):
        vitkernels.create_model("vit_tiny_patch16_224.nope")
    with pytest.raises(ValueError, match="reads no model configs from the Hugging Face hub"):
        vitkernels.create_model("hf-hub:timm/vit_tiny_patch16_224.augreg_in21k")
    with pytest.raises(ValueError, match="feature_cls='hook' is not supported"):
        vitkernels.create_model("vit_tiny_patch16_224", features_only=True, feature_cls="hook", depth=1)


def _tiny_checkpoint(tmp_path, **kw):
    """A timm model of vit_tiny's family shrunk by ``kw``, saved as a timm-format safetensors file."""
    from safetensors.torch import save_file

    src = timm.create_model("vit_tiny_patch16_224.augreg_in21k", **kw).eval()
    path = tmp_path / "model.safetensors"
    save_file(src.state_dict(), str(path))
    return src, path


@requires("safetensors")
def test_pretrained_from_file_hf_cache_and_checkpoint(tmp_path):
    kw = dict(img_size=32, depth=2, embed_dim=64, num_heads=4)
    src, path = _tiny_checkpoint(tmp_path, **kw)
    x = torch.randn(2, 3, 32, 32)
    ref = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=True,
                            pretrained_cfg_overlay=dict(file=str(path)), **kw).eval()
    ours = vitkernels.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=True,
                                   pretrained_cfg_overlay=dict(file=str(path)), backend="torch", **kw).eval()
    _assert_same_state(ours, ref)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))
    # the Hugging Face cache, offline: models--timm--<name.tag>/refs/main -> snapshots/<rev>/model.safetensors
    repo = tmp_path / "hub" / "models--timm--vit_tiny_patch16_224.augreg_in21k"
    (repo / "snapshots" / "0123abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abc")
    (repo / "snapshots" / "0123abc" / "model.safetensors").write_bytes(path.read_bytes())
    cached = vitkernels.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=True,
                                     cache_dir=tmp_path / "hub", **kw)
    _assert_same_state(cached, ref)
    # another head: the classifier is dropped, the rest loads (timm's rule); a higher resolution resamples
    ref10 = timm.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=True, num_classes=10,
                              pretrained_cfg_overlay=dict(file=str(path)), **dict(kw, img_size=48))
    ours10 = vitkernels.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=True, num_classes=10,
                                     cache_dir=tmp_path / "hub", **dict(kw, img_size=48))
    sd, ref_sd = ours10.state_dict(), ref10.state_dict()
    for k in ref_sd:
        if not k.startswith("head."):
            torch.testing.assert_close(sd[k], ref_sd[k], rtol=0, atol=0, msg=k)
    # in_chans=1: timm's adapt_input_conv sums the RGB filters
    ours1 = vitkernels.create_model("vit_tiny_patch16_224.augreg_in21k", pretrained=True, in_chans=1,
                                    cache_dir=tmp_path / "hub", **kw)
    torch.testing.assert_close(ours1.patch_embed.proj.weight, src.patch_embed.proj.weight.sum(1, keepdim=True))
    # checkpoint_path: timm's load_checkpoint, a wrapped checkpoint with a DDP prefix
    torch.save({"state_dict": {"module." + k: v for k, v in src.state_dict().items()}}, tmp_path / "ckpt.pth")
    ck = vitkernels.create_model("vit_tiny_patch16_224.augreg_in21k", checkpoint_path=tmp_path / "ckpt.pth", **kw)
    _assert_same_state(ck, src)
    # nothing offline: one clear error
    with pytest.raises(PretrainedWeightsError, match=r"no pretrained weights for vit_tiny_patch16_224 are available "
                                                     r"offline: the Hugging Face cache .* has no model.safetensors"):
        vitkernels.create_model("vit_tiny_patch16_224", pretrained=True, cache_dir=tmp_path / "empty", **kw)


# -- 2. the constructor ------------------------------------------------------------------------------------
def test_constructor_takes_every_timm_argument_in_timms_order():
    timm_args = list(inspect.signature(TimmViT.__init__).parameters)[1:]
    ours = list(inspect.signature(VisionTransformer.__init__).parameters)[1:]
    assert len(timm_args) == 42 and ours[:len(timm_args)] == timm_args
    for name in timm_args:  # and timm's defaults, where they are values (not layer classes)
        d = inspect.signature(TimmViT.__init__).parameters[name].default
        if isinstance(d, (bool, int, float, str)) or d is None:
            assert inspect.signature(VisionTransformer.__init__).parameters[name].default == d, name


ARGS = {
    "default": dict(),
    "weight_init_jax": dict(weight_init="jax"),
    "weight_init_jax_nlhb": dict(weight_init="jax_nlhb"),
    "weight_init_moco": dict(weight_init="moco"),
    "weight_init_reset": dict(weight_init="reset"),
    "fix_init_layerscale_qknorm": dict(fix_init=True, init_values=0.1, qk_norm=True),
    "rmsnorm_qknorm": dict(norm_layer="rmsnorm", qk_norm=True),
    "timm_rmsnorm_avg": dict(norm_layer="timm.layers.RmsNorm", global_pool="avg"),
    "layernorm_eps1e-5_nobias": dict(norm_layer=functools.partial(nn.LayerNorm, eps=1e-5, bias=False)),
    "nn_layernorm_eps": dict(norm_layer=nn.LayerNorm),
    "layernorm_no_affine_prenorm": dict(norm_layer=functools.partial(nn.LayerNorm, elementwise_affine=False),
                                        pre_norm=True),
    "pool_max": dict(global_pool="max"),
    "pool_avgmax_include_prefix": dict(global_pool="avgmax", pool_include_prefix=True),
    "pool_avg_include_prefix_no_fc_norm": dict(global_pool="avg", pool_include_prefix=True, fc_norm=False),
    "no_pos_embed": dict(pos_embed="none", pos_drop_rate=0.2),  # timm skips pos_drop without a pos_embed
    "dynamic_img_pad": dict(dynamic_img_size=True, dynamic_img_pad=True),
    "patch_drop_drop_path": dict(patch_drop_rate=0.5, drop_path_rate=0.2, init_values=0.1),
    "timm_layer_classes": dict(embed_layer="timm.layers.PatchEmbed", block_fn="timm.models.vision_transformer.Block",
                               mlp_layer="timm.layers.Mlp", attn_layer="timm.layers.attention.Attention",
                               act_layer="gelu"),
}


def _resolve(value):
    if isinstance(value, str) and value.startswith("timm."):
        module, _, name = value.rpartition(".")
        return getattr(__import__(module, fromlist=[name]), name)
    return value


@pytest.mark.parametrize("name", list(ARGS))
def test_constructor_argument_matches_timm(name):
    kw = dict(TINY, **{k: _resolve(v) for k, v in ARGS[name].items()})
    ref, ours = _seeded_pair(**kw)
    _assert_same_state(ours, ref)  # same keys, and the same initial tensors from the same seed
    size = (37, 29) if kw.get("dynamic_img_pad") else None
    x = _images(kw, size=size)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x))
        ref.train(), ours.train()
        torch.manual_seed(3)
        expected = ref(x)
        torch.manual_seed(3)  # patch dropout / stochastic depth draw their masks in timm's order
        torch.testing.assert_close(ours(x), expected)


@pytest.mark.parametrize("mode", ["", "jax", "moco"])
def test_meta_device_init_then_to_empty_as_timm(mode):
    ref = TimmViT(**TINY, weight_init=mode, device="meta")
    ours = VisionTransformer(**TINY, weight_init=mode, device="meta", backend="torch")
    assert all(p.is_meta for p in ours.parameters())
    ref.to_empty(device="cpu"), ours.to_empty(device="cpu")
    torch.manual_seed(5)
    ref.init_weights()
    torch.manual_seed(5)
    ours.init_weights()
    _assert_same_state(ours, ref)
    ours64 = VisionTransformer(**TINY, dtype=torch.float64, backend="torch")
    assert {p.dtype for p in ours64.parameters()} == {torch.float64}


@pytest.mark.parametrize("kw,match", [
    (dict(global_pool="prr"), r"global_pool='prr'"),
    (dict(act_layer="relu"), r"act_layer='relu' is not supported: .*exact-erf GELU, tanh-GELU, QuickGELU and SiLU"),
    (dict(act_layer=nn.Mish), r"act_layer=.*Mish.* is not supported"),
    (dict(mlp_layer="timm.layers.GatedMlp"), r"mlp_layer=.*GatedMlp.* is not supported: .*accepted: Mlp"),
    (dict(block_fn="timm.models.vision_transformer.ResPostBlock"), r"block_fn=.*ResPostBlock.* is not supported"),
    (dict(attn_layer="diff"), r"attn_layer='diff' is not supported"),
    (dict(embed_layer="timm.layers.PatchEmbedWithSize"), r"embed_layer=.* is not supported"),
    (dict(embed_norm_layer="layernorm"), r"embed_norm_layer='layernorm' is not supported yet"),
    (dict(scale_attn_norm=True), r"scale_attn_norm=True is not supported yet"),
    (dict(norm_layer="batchnorm"), r"norm_layer='batchnorm' is not supported; vitkernels supports LayerNorm"),
    (dict(norm_layer="timm.layers.LayerNorm2d"), r"norm_layer=.* builds timm.layers.norm.LayerNorm2d"),
    (dict(pos_embed="rope"), r"pos_embed must be 'learn' or 'none'"),
    (dict(weight_init="xavier"), r"weight_init must be"),
])
def test_unsupported_arguments_raise_naming_them(kw, match):
    kw = {k: _resolve(v) for k, v in kw.items()}
    with pytest.raises(ValueError, match=match):
        VisionTransformer(**dict(TINY, **kw))


def test_timm_methods_around_the_forward():
    ref, ours = _seeded_pair(**TINY)
    assert ours.group_matcher() == ref.group_matcher() and ours.no_weight_decay() == ref.no_weight_decay()
    assert ours.feature_info == ref.feature_info
    x = _images(TINY)
    with torch.no_grad():
        torch.testing.assert_close(ours.pool(ref.forward_features(x), "max"), ref.pool(ref.forward_features(x), "max"))
        # masked attention (timm's forward(x, attn_mask, is_causal))
        T = 1 + 16
        mask = torch.rand(T, T) > 0.3
        mask.fill_diagonal_(True)
        torch.testing.assert_close(ours(x, attn_mask=mask), ref(x, attn_mask=mask))
        torch.testing.assert_close(ours(x, is_causal=True), ref(x, is_causal=True))
    for m in (ref, ours):
        m.set_input_size(img_size=(48, 40))
    _assert_same_state(ours, ref)
    x = _images(TINY, size=(48, 40))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x))
    assert ours._traits == ref._traits and ours.patch_embed.grid_size == ref.patch_embed.grid_size
    for m in (ref, ours):
        m.reset_classifier(5, global_pool="avgmax")
    assert ours.head.out_features == 5 and ours.global_pool == ref.global_pool == "avgmax"
    # Different on purpose: vitkernels zero-initialises the new head (the paper's fine-tuning recipe)
    assert torch.count_nonzero(ours.head.weight) == 0 and torch.count_nonzero(ref.head.weight) > 0


# -- 3. feature extraction -----------------------------------------------------------------------------------
FI_CALLS = {
    "all_nchw": dict(),
    "last2_nlc_norm": dict(indices=2, output_fmt="NLC", norm=True),
    "list_prefix_stop": dict(indices=[0, -1], return_prefix_tokens=True, stop_early=True),
    "only_norm": dict(indices=[1], norm=True, intermediates_only=True),
    "dict": dict(indices=[0], output_dict=True, return_prefix_tokens=True),
}


def _flat(out):
    if isinstance(out, dict):
        return [t for k in sorted(out) for t in _flat(out[k])]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat(o)]
    return [out]


@pytest.mark.parametrize("call", list(FI_CALLS))
@pytest.mark.parametrize("cfg", ["token", "no_cls_avg_dynamic"])
def test_forward_intermediates_matches_timm(cfg, call):
    kw = dict(TINY) if cfg == "token" else dict(TINY, class_token=False, global_pool="avg", dynamic_img_size=True)
    ref, ours = _seeded_pair(**kw)
    ref.eval(), ours.eval()
    x = _images(kw, size=(40, 24) if kw.get("dynamic_img_size") else None)
    with torch.no_grad():
        expected, got = _flat(ref.forward_intermediates(x, **FI_CALLS[call])), \
            _flat(ours.forward_intermediates(x, **FI_CALLS[call]))
        assert len(got) == len(expected)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
        for n, reshape in ((1, False), ([0, 1], True)):
            for a, b in zip(ours.get_intermediate_layers(x, n, reshape=reshape, norm=True),
                            ref.get_intermediate_layers(x, n, reshape=reshape, norm=True)):
                torch.testing.assert_close(a, b)


def test_features_only_and_pruning_match_timm():
    kw = dict(img_size=32, depth=4, embed_dim=64, num_heads=4)
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(1, -1), **kw).eval()
    ours = vitkernels.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(1, -1), backend="torch",
                                   **kw).eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    assert ours.out_indices == ref.out_indices == [1, 3] and len(ours.model.blocks) == 4
    assert ours.feature_info.channels() == ref.feature_info.channels()
    assert ours.feature_info.reduction() == ref.feature_info.reduction() == [16, 16]
    assert ours.feature_info.module_name() == ref.feature_info.module_name() == ["blocks.1", "blocks.3"]
    assert ours.pretrained_cfg == ref.pretrained_cfg and ours.in_chans == ref.in_chans
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        for a, b in zip(ours(x), ref(x), strict=True):
            assert a.shape == (2, 64, 2, 2)
            torch.testing.assert_close(a, b)
    # the default: the last three blocks, the rest pruned (blocks, norm, head)
    ours = vitkernels.create_model("vit_tiny_patch16_224", features_only=True, **dict(kw, depth=5),
                                   feature_cfg=dict(output_fmt="NLC"))
    assert ours.out_indices == [2, 3, 4] and isinstance(ours.model.norm, nn.Identity)
    assert isinstance(ours.model.head, nn.Identity) and ours(x)[0].shape == (2, 4, 64)
    _, model = _seeded_pair(**dict(TINY, depth=4))
    assert model.prune_intermediate_layers([0, 1], prune_norm=True) == [0, 1] and len(model.blocks) == 2


def _fused_params():
    return backend_params("torch", *FUSED)


@pytest.mark.parametrize("backend", _fused_params())
@pytest.mark.parametrize("kind", ["vitkernels", "patched_timm"])
def test_intermediates_equal_forward_features_bit_for_bit(backend, kind):
    _all_ops(backend)
    kw = dict(MICRO, init_values=0.1) if kind == "vitkernels" else MICRO
    if kind == "vitkernels":
        model = VisionTransformer(**kw, backend=backend).to(DEVICE).eval()
    else:
        model = vitkernels.patch_timm(TimmViT(**kw).to(DEVICE).eval(), backend=backend)
    x = _images(kw)
    with torch.no_grad():
        features = model.forward_features(x)
        final, inter = model.forward_intermediates(x, norm=True, output_fmt="NLC")
        assert torch.equal(final, features)
        assert torch.equal(inter[-1], features[:, 1:])  # the last block's output, normalised
        raw = model.forward_intermediates(x, indices=[0], output_fmt="NLC", intermediates_only=True,
                                          stop_early=True)[0]
        block0 = model.blocks[0](model.norm_pre(model.patch_drop(model._embed(x) if kind == "vitkernels"
                                                                    else _patched_embed(model, x))))
        assert torch.equal(raw, block0[:, 1:])
    if kind == "patched_timm":  # the patched embedding and blocks, not timm's (they differ in rounding only)
        calls = []
        model.blocks[0].forward = functools.partial(_count, calls, model.blocks[0].forward)
        model.forward_intermediates(x, indices=1)
        assert calls == [1]


def _count(calls, fn, *args, **kwargs):
    calls.append(1)
    return fn(*args, **kwargs)


def _patched_embed(model, x):
    from vitkernels.patch_timm import _embed

    return _embed(model, x)


# -- 4. graph capture ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", _fused_params())
@pytest.mark.parametrize("kind", ["vitkernels", "patched_timm"])
def test_fx_and_export_capture_the_fused_ops(backend, kind):
    _all_ops(backend)
    kw = dict(MICRO, dynamic_img_size=True)
    if kind == "vitkernels":
        model = VisionTransformer(**kw, backend=backend).to(DEVICE).eval()
    else:
        model = vitkernels.patch_timm(TimmViT(**kw).to(DEVICE).eval(), backend=backend)
    x, other = _images(kw), _images(kw, size=(24, 16))
    with torch.no_grad():
        ref, ref_other = model(x), model(other)
        traced = torch.fx.symbolic_trace(model)
        targets = {getattr(n.target, "__name__", str(n.target)) for n in traced.graph.nodes if n.op == "call_function"}
        assert {"patch_embed", "ln_linear", "attend_qkv", "linear", "ln_mlp"} <= targets  # leaf calls
        assert torch.equal(traced(x), ref) and torch.equal(traced(other), ref_other)
        exported = torch.export.export(model, (x,)).module()
        assert torch.equal(exported(x), ref)


def test_fx_feature_extractor_path():
    need("torchvision")
    from timm.models import create_feature_extractor

    model = VisionTransformer(**TINY, backend="torch").eval()
    extractor = create_feature_extractor(model, return_nodes={"blocks.0": "b0", "norm": "out"})
    x = _images(TINY)
    with torch.no_grad():
        feats = extractor(x)
        final, (b0,) = model.forward_intermediates(x, indices=[0], output_fmt="NLC")
    assert torch.equal(feats["out"], final) and torch.equal(feats["b0"][:, 1:], b0)


def test_torchscript():
    ours = VisionTransformer(**TINY, backend="torch")
    with pytest.raises(RuntimeError, match="torch.jit.script cannot compile a vitkernels VisionTransformer.*"
                                           "Use torch.export.export"):
        torch.jit.script(ours)
    ref = TimmViT(**TINY).eval()
    scripted_ref = torch.jit.script(ref)
    model = vitkernels.patch_timm(copy.deepcopy(ref), backend="torch")
    scripted = torch.jit.script(model)  # timm's own code on the same parameters; the model stays patched
    assert vitkernels.patch_timm.__globals__["is_patched"](model) and "forward" in model.blocks[0].__dict__
    assert scripted.blocks[0].attn.qkv.weight.data_ptr() == model.blocks[0].attn.qkv.weight.data_ptr()
    x = _images(TINY)
    with torch.no_grad():
        torch.testing.assert_close(scripted(x), scripted_ref(x))
        torch.testing.assert_close(scripted(x), model(x))


def test_fx_in_training_mode_and_fp32_residual():
    kw = dict(MICRO, drop_path_rate=0.3, patch_drop_rate=0.3, attn_drop_rate=0.1, init_values=0.1)
    model = VisionTransformer(**kw, backend="torch").train()
    traced = torch.fx.symbolic_trace(model)  # stochastic depth, patch dropout (a leaf), attention dropout
    x = _images(kw)
    torch.manual_seed(1)
    out = traced(x)
    torch.manual_seed(1)
    torch.testing.assert_close(out, model(x), rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="torch.fx cannot trace a model built with fp32_residual=True"):
        torch.fx.symbolic_trace(VisionTransformer(**MICRO, backend="torch", fp32_residual=True))
