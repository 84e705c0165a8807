"""patch_timm: a timm VisionTransformer runs on vitkernels ops in place, with timm's logits and gradients.

The reference is an unpatched deep copy of the same timm model. Tests run on the ``torch`` backend here
(every op's reference); the fused backends are checked against a float64 oracle when all four of their ops
exist and can run on this machine.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
from torch import nn

import vitkernels
from vitkernels.backends import OPS
from optional import need
import vitkernels.ops
from vitkernels.convert import UnsupportedModelError
from vitkernels.patch_timm import is_patched, unpatch_timm

from oracle import DEVICE, FUSED, assert_budget

timm_vit = need("timm.models.vision_transformer")  # this module checks us against timm
TimmViT = timm_vit.VisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)

CONFIGS = {
    "token": TINY,
    "avg_fc_norm": dict(TINY, global_pool="avg"),
    "layerscale_qknorm": dict(TINY, init_values=0.1, qk_norm=True, qkv_bias=False),
    "no_embed_class_pre_norm": dict(TINY, no_embed_class=True, pre_norm=True),
    "no_cls_headless": dict(TINY, class_token=False, global_pool="avg", num_classes=0),
    "odd_grid_no_final_norm": dict(img_size=(24, 40), patch_size=8, embed_dim=48, depth=1, num_heads=3,
                                   mlp_ratio=2.5, num_classes=7, final_norm=False),
    # beyond the original ViT (issue #16): RmsNorm, LayerNorm without weight / bias, patch dropout, max / avgmax
    # pooling, pooling over the class token, no position embedding, dynamic_img_pad
    "rmsnorm_qknorm_max_patch_drop": dict(TINY, norm_layer="rmsnorm", qk_norm=True, global_pool="max",
                                          patch_drop_rate=0.3, drop_path_rate=0.2),
    "ln_no_affine_pre_norm_no_pos": dict(TINY, norm_layer=functools.partial(nn.LayerNorm, elementwise_affine=False),
                                         pre_norm=True, pos_embed="none", pos_drop_rate=0.2),
    "ln_no_bias_avgmax_prefix_pad": dict(TINY, norm_layer=functools.partial(nn.LayerNorm, eps=1e-5, bias=False),
                                         global_pool="avgmax", pool_include_prefix=True, dynamic_img_size=True,
                                         dynamic_img_pad=True),
}


def _timm(**kw) -> TimmViT:
    model = TimmViT(**kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _images(kw, batch=2, dtype=torch.float32):
    size = kw["img_size"] if isinstance(kw["img_size"], tuple) else (kw["img_size"],) * 2
    if kw.get("dynamic_img_pad"):  # a size that is not a multiple of the patch: padded as timm pads it
        size = (size[0] + 5, size[1] - 3)
    return torch.randn(batch, kw.get("in_chans", 3), *size, dtype=dtype)


def _loss_and_grads(model, x, seed=None):
    model.zero_grad(set_to_none=True)
    if seed is not None:  # dropout masks (patch dropout, stochastic depth) drawn in timm's order
        torch.manual_seed(seed)
    out = model(x)
    out.square().sum().backward()
    return out.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_patched_logits_and_grads_match_timm(name):
    kw = CONFIGS[name]
    model = _timm(**kw)
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    keys = list(model.state_dict())
    assert vitkernels.patch_timm(model, backend="torch") is model
    assert is_patched(model)
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert list(model.state_dict()) == keys
    x = _images(kw)
    for mode in ("eval", "train"):
        model.train(mode == "train"), ref.train(mode == "train")
        out, grads = _loss_and_grads(model, x, seed=0)
        ref_out, ref_grads = _loss_and_grads(ref, x, seed=0)
        assert _rel_err(out, ref_out) <= 1e-5, mode
        for n, g in ref_grads.items():
            assert _rel_err(grads[n], g) <= 1e-4, (mode, n)


def _count_ops(monkeypatch) -> dict:
    calls = {}
    for op in OPS:
        fn = getattr(vitkernels.ops, op)

        def counted(*args, _fn=fn, _op=op, **kwargs):
            calls[_op] = calls.get(_op, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(vitkernels.ops, op, counted)
    return calls


@pytest.mark.parametrize("lean", [True, False], ids=["lean", "per_op"])
def test_forward_runs_through_vitkernels_ops(monkeypatch, lean):
    model = vitkernels.patch_timm(_timm(**dict(TINY, global_pool="avg")).eval(), backend="torch", lean=lean)
    calls = _count_ops(monkeypatch)
    with torch.no_grad():
        model(_images(TINY))
    depth = TINY["depth"]
    if lean:  # per block: norm1 + qkv, attention, proj, norm2 + MLP; plus the embedding, fc_norm and the head
        assert calls == {"patch_embed": 1, "layer_norm": 1, "ln_linear": depth, "attention_qkv": depth,
                         "linear": depth + 1, "ln_mlp": depth}
    else:  # per block: 2 LayerNorms, qkv/proj/fc1/fc2; plus the embedding, fc_norm and the head
        assert calls == {"patch_embed": 1, "layer_norm": 2 * depth + 1, "attention_qkv": depth,
                         "linear": 4 * depth + 1}

    calls.clear()
    unpatch_timm(model)
    assert not is_patched(model)
    with torch.no_grad():
        model(_images(TINY))
    assert calls == {}




def test_rmsnorm_patch_dropout_and_pooling_stay_timms(monkeypatch):
    # RmsNorm, patch dropout and the pooling have no fused op: timm's own modules run, where timm runs them;
    # blocks with RmsNorm take the per-op path (even with lean=True), their GEMMs and attention fused
    from timm.layers import PatchDropout, RmsNorm

    kw = dict(TINY, norm_layer="rmsnorm", global_pool="avgmax", pool_include_prefix=True, patch_drop_rate=0.5)
    model = vitkernels.patch_timm(_timm(**kw), backend="torch", lean=True)
    ref = copy.deepcopy(model)
    unpatch_timm(ref)
    norms = [m for m in model.modules() if isinstance(m, RmsNorm)]
    assert len(norms) == 2 * TINY["depth"] + 1 and not any(is_patched(m) for m in norms)
    assert isinstance(model.patch_drop, PatchDropout) and not is_patched(model.patch_drop)
    assert "forward_head" not in model.__dict__  # timm's pooling, fc_norm and head_drop
    tokens = []
    model.patch_drop.register_forward_hook(lambda m, args, out: tokens.append(out.shape[1]))
    calls = _count_ops(monkeypatch)
    x = _images(kw)
    out, grads = _loss_and_grads(model.train(), x, seed=3)
    depth = TINY["depth"]
    assert calls == {"patch_embed": 1, "attention_qkv": depth, "linear": 4 * depth + 1}  # no ln_linear / ln_mlp
    assert tokens == [1 + 8]  # the class token and half of the 16 patches
    ref_out, ref_grads = _loss_and_grads(ref.train(), x, seed=3)
    torch.testing.assert_close(out, ref_out)
    for n, g in ref_grads.items():
        torch.testing.assert_close(grads[n], g, msg=lambda m, n=n: f"grad {n}: {m}")


def test_layer_norm_without_affine_takes_the_lean_path(monkeypatch):
    kw = dict(TINY, norm_layer=functools.partial(nn.LayerNorm, elementwise_affine=False), global_pool="max")
    model = vitkernels.patch_timm(_timm(**kw).eval(), backend="torch")
    ref = copy.deepcopy(model)
    unpatch_timm(ref)
    assert model.blocks[0].norm1.weight is None and model.blocks[0].norm1.bias is None
    calls = _count_ops(monkeypatch)
    x = _images(kw)
    with torch.no_grad():
        out = model(x)
        depth = TINY["depth"]
        assert calls == {"patch_embed": 1, "ln_linear": depth, "attention_qkv": depth, "linear": depth + 1,
                         "ln_mlp": depth, "layer_norm": 1}  # fc_norm (max pooling) after timm's pool
        torch.testing.assert_close(out, ref(x))


def test_unpatch_restores_timm_and_repatch_changes_backend():
    model = _timm(**TINY).eval()
    x = _images(TINY)
    with torch.no_grad():
        ref = model(x)
        vitkernels.patch_timm(model, backend="torch")
        vitkernels.patch_timm(model, backend="auto")  # patching twice just changes the backend
        assert model.blocks[0]._vitkernels_backend == "auto"
        assert _rel_err(model(x), ref) <= 1e-5
        unpatch_timm(model)
        assert "forward" not in model.blocks[0].__dict__ and "forward_features" not in model.__dict__
        assert torch.equal(model(x), ref)


def test_optimizer_state_survives_patching():
    kw = dict(TINY, init_values=0.1)
    model = _timm(**kw)
    ref = copy.deepcopy(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    x = _images(kw)
    for step in range(3):
        if step == 1:
            vitkernels.patch_timm(model, backend="torch")  # between optimizer steps: state keyed by Parameter
        for m, o in ((model, opt), (ref, ref_opt)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    assert all(len(opt.state[p]) > 0 for p in model.parameters())
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert _rel_err(p.detach(), q.detach()) <= 1e-4, n


def test_training_with_dropout_and_drop_path_matches_timm():
    # same RNG stream: the patched forward draws its dropout / stochastic-depth masks in timm's order
    kw = dict(TINY, drop_rate=0.1, pos_drop_rate=0.1, proj_drop_rate=0.1, attn_drop_rate=0.1, drop_path_rate=0.3)
    model = _timm(**kw).train()
    ref = copy.deepcopy(model)
    vitkernels.patch_timm(model, backend="torch")
    x = _images(kw, batch=4)
    torch.manual_seed(1)
    out, grads = _loss_and_grads(model, x)
    torch.manual_seed(1)
    ref_out, ref_grads = _loss_and_grads(ref, x)
    assert _rel_err(out, ref_out) <= 1e-5
    for n, g in ref_grads.items():
        assert _rel_err(grads[n], g) <= 1e-4, n


def test_dynamic_size_checkpointing_and_masks():
    kw = dict(TINY, dynamic_img_size=True)
    model = _timm(**kw)
    ref = copy.deepcopy(model)
    vitkernels.patch_timm(model, backend="torch")
    model.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 48, 24)
    out, grads = _loss_and_grads(model, x)
    ref_out, ref_grads = _loss_and_grads(ref, x)
    assert _rel_err(out, ref_out) <= 1e-5
    for n, g in ref_grads.items():
        assert _rel_err(grads[n], g) <= 1e-4, n
    # timm's masked forward falls back to timm's block code and still agrees
    T = 1 + 6 * 3
    mask = torch.rand(T, T) > 0.3
    mask.fill_diagonal_(True)
    with torch.no_grad():
        assert _rel_err(model.forward_features(x, attn_mask=mask), ref.forward_features(x, attn_mask=mask)) <= 1e-5


def test_bad_input_and_unsupported_models():
    model = vitkernels.patch_timm(_timm(**TINY), backend="torch")
    with pytest.raises(ValueError, match="does not match"):
        model(torch.randn(1, 3, 40, 40))
    with pytest.raises(ValueError, match="input channels"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="unknown backend"):
        vitkernels.patch_timm(_timm(**TINY), backend="tpu")
    from timm.layers import GatedMlp

    for kw, feature in ((dict(global_pool="prr"), "global_pool='prr'"),
                        (dict(norm_layer="batchnorm"), "normalization layer .*BatchNorm2d"),
                        (dict(act_layer="relu"), "the fused epilogue computes"),
                        (dict(mlp_layer=GatedMlp), "MLP type GatedMlp")):
        bad = TimmViT(**dict(TINY, **kw))
        with pytest.raises(UnsupportedModelError, match=feature):
            vitkernels.patch_timm(bad)
        assert not is_patched(bad) and not any(is_patched(m) for m in bad.modules())
    with pytest.raises(TypeError, match="VisionTransformer"):
        vitkernels.patch_timm(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def _fused_params():
    """Fused backends whose four ops all exist and run on DEVICE; others skipped with the reason."""
    from vitkernels.backends import get_impl, why_not

    params = []
    for name in FUSED:
        why = why_not(name, DEVICE)
        if why is None:
            try:
                lacking = [op for op in OPS
                           if get_impl(name).get_op(op) is None]
            except Exception as exc:  # a backend being written must not break collection of this file
                lacking, why = [], f"cannot load its ops: {type(exc).__name__}: {exc}"
            if lacking:
                why = f"{name} backend has no {', '.join(lacking)} op yet"
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return params


FUSED_CONFIGS = {
    "layerscale": dict(TINY, init_values=0.1, depth=1),
    "rmsnorm_qknorm_max_patch_drop": dict(TINY, depth=1, norm_layer="rmsnorm", qk_norm=True, global_pool="max",
                                          patch_drop_rate=0.3),
    "ln_no_affine_no_pos_avgmax_pad": dict(TINY, depth=1, norm_layer=functools.partial(nn.LayerNorm,
                                                                                       elementwise_affine=False),
                                           pos_embed="none", global_pool="avgmax", pool_include_prefix=True,
                                           dynamic_img_size=True, dynamic_img_pad=True),
}


@pytest.mark.parametrize("name", list(FUSED_CONFIGS))
@pytest.mark.parametrize("backend", _fused_params())
def test_fused_backend_within_budget(backend, name):
    kw = FUSED_CONFIGS[name]
    model = _timm(**kw).to(DEVICE)  # training mode: patch dropout draws the same patches in all three (seeded)
    oracle = copy.deepcopy(model).double()
    lowp = copy.deepcopy(model)
    vitkernels.patch_timm(model, backend=backend)
    x = _images(kw).to(DEVICE)
    out, grads = _loss_and_grads(model, x, seed=0)
    lowp_out, lowp_grads = _loss_and_grads(lowp, x, seed=0)
    ref_out, ref_grads = _loss_and_grads(oracle, x.double(), seed=0)
    assert_budget("logits", out, lowp_out, ref_out)
    for n, g in ref_grads.items():
        assert_budget(f"grad {n}", grads[n], lowp_grads[n], g)
