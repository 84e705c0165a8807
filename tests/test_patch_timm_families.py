"""patch_timm on timm's other ViT families: ``timm.models.eva.Eva`` (EVA-02, rope ViTs) and ``timm.models.beit.Beit``
run in place on the forwards of vitkernels/nn/eva.py and nn/beit.py, with timm's logits and gradients.

The reference is an unpatched deep copy of the same timm model (torch backend: to fp32 rounding); the kernel
backends are checked within the fp32 budget of a float64 copy (tests/oracle.py). Small configurations of the
real model names (as tests/test_eva.py and tests/test_beit.py), every parameter perturbed so the
zero-initialised biases, tables and layer scales matter.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitkernels
import vitkernels.ops
from oracle import DEVICE, FUSED, assert_budget, backend_params
from optional import need
from vitkernels.backends import OPS
from vitkernels.patch_timm import is_patched, unpatch_timm

timm = need("timm")

BEIT_SMALL = dict(depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=4)

# name -> (timm model, its kwargs): each covers a different attention / MLP / embedding layout.
CONFIGS = {
    # Eva: GluMlp (packed SwiGLU), fused qkv with q / v bias, class token + abs pos, avg pool + fc_norm
    "eva02_tiny": ("eva02_tiny_patch14_224", dict(depth=2, img_size=56, embed_dim=64, num_heads=2)),
    # Eva: SwiGLU with its norm before fc2 (scale_mlp), separate q / k / v projections
    "eva02_base": ("eva02_base_patch14_224", dict(depth=2, img_size=56, embed_dim=64, num_heads=2)),
    # Eva: scale_attn_inner (a norm before proj), class-token pooling, patch 16
    "eva02_clip": ("eva02_base_patch16_clip_224", dict(depth=1, img_size=64, embed_dim=64, num_heads=2)),
    # Eva: GELU Mlp, one register token and no class token, no abs pos, layer scale, head dim 80
    "rope_reg1_gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(depth=2, img_size=64, embed_dim=160,
                                                                    num_heads=2)),
    # Beit as released: per-block tables, no absolute position embedding, layer scale, avg pool + fc_norm
    "beit_rel": ("beit_base_patch16_224", dict(BEIT_SMALL)),
    # Beit: one table shared by every block, with an absolute position embedding
    "beit_shared_abs": ("beit_base_patch16_224", dict(BEIT_SMALL, use_rel_pos_bias=False,
                                                      use_shared_rel_pos_bias=True, use_abs_pos_emb=True)),
    # Beit: both tables (their sum), class-token pooling with the final norm, no qkv bias
    "beit_both_token": ("beitv2_base_patch16_224", dict(BEIT_SMALL, use_shared_rel_pos_bias=True,
                                                        global_pool="token", qkv_bias=False)),
}
EVA = [n for n in CONFIGS if not n.startswith("beit")]
BEIT = [n for n in CONFIGS if n.startswith("beit")]


def _timm_model(name, **extra):
    model_name, kw = CONFIGS[name]
    model = timm.create_model(model_name, pretrained=False, num_classes=5, **dict(kw, **extra))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval().to(DEVICE)


def _images(model, B=2):
    H, W = model.patch_embed.img_size
    return torch.randn(B, 3, H, W, device=DEVICE)


def _grads(model, x, g, seed=None):
    model.zero_grad(set_to_none=True)
    if seed is not None:  # dropout masks drawn in timm's order
        torch.manual_seed(seed)
    out = model(x)
    out.backward(g.to(out.dtype))
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _instance_attrs(model) -> dict:
    """Every module's instance attributes (names -> ids): what patching changes and unpatching restores."""
    return {name: {k: id(v) for k, v in m.__dict__.items()} for name, m in model.named_modules()}


def _count_ops(monkeypatch) -> dict:
    calls = {}
    for op in OPS:
        fn = getattr(vitkernels.ops, op)

        def counted(*args, _fn=fn, _op=op, **kwargs):
            calls[_op] = calls.get(_op, 0) + 1
            return _fn(*args, **kwargs)

        monkeypatch.setattr(vitkernels.ops, op, counted)
    return calls


@pytest.mark.parametrize("name", list(CONFIGS))
def test_patched_logits_and_grads_match_timm(name):
    model = _timm_model(name)
    ref = copy.deepcopy(model)
    params = list(model.parameters())
    keys = list(model.state_dict())
    assert vitkernels.patch_timm(model, backend="torch") is model
    assert is_patched(model)
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert list(model.state_dict()) == keys
    x = _images(model)
    g = torch.randn(2, 5, device=DEVICE)
    want, want_grads = _grads(ref, x, g)
    got, got_grads = _grads(model, x, g)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert set(got_grads) == set(want_grads)
    for n, gw in want_grads.items():
        torch.testing.assert_close(got_grads[n], gw, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["eva02_tiny", "beit_both_token"])
def test_training_checkpointing_and_intermediates_match_timm(name):
    """Training mode (projection / head dropout, drop path: the same seed draws timm's masks), gradient
    checkpointing (the patched forward_features checkpoints the patched blocks), and timm's own
    forward_intermediates (timm's patch embedding, then the patched blocks with timm's call signatures)."""
    model = _timm_model(name, drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2).train()
    ref = copy.deepcopy(model)
    vitkernels.patch_timm(model, backend="torch")
    x = _images(model, B=3)
    g = torch.randn(3, 5, device=DEVICE)
    want, want_grads = _grads(ref, x, g, seed=1)
    got, got_grads = _grads(model, x, g, seed=1)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for n, gw in want_grads.items():
        torch.testing.assert_close(got_grads[n], gw, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    model.eval().set_grad_checkpointing(True)
    ckpt, ckpt_grads = _grads(model, x, g)
    model.set_grad_checkpointing(False)
    plain, plain_grads = _grads(model, x, g)
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)
    for n, gp in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[n], gp, rtol=0, atol=0, msg=lambda m: f"{n}: {m}")
    ref.eval()
    with torch.no_grad():
        got_final, got_inter = model.forward_intermediates(x)
        want_final, want_inter = ref.forward_intermediates(x)
    torch.testing.assert_close(got_final, want_final, rtol=0, atol=1e-6)
    for a, b in zip(got_inter, want_inter, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_forward_runs_through_vitkernels_ops(monkeypatch):
    """Every GEMM, norm, rope and attention of the patched models is a vitkernels op; unpatched, none is."""
    calls = _count_ops(monkeypatch)
    eva = vitkernels.patch_timm(_timm_model("eva02_tiny"), backend="torch")
    beit = vitkernels.patch_timm(_timm_model("beit_both_token"), backend="torch")
    with torch.no_grad():
        eva(_images(eva))
    # per block: norm1, norm2, qkv + proj + fc2, the packed SwiGLU, rope, attention; the embedding; fc_norm, head
    assert calls == {"patch_embed": 1, "layer_norm": 2 * 2 + 1, "linear": 3 * 2 + 1, "glu_linear": 2, "rope": 2,
                     "attention": 2}
    calls.clear()
    with torch.no_grad():
        beit(_images(beit))
    # per block: norm1, norm2, qkv + proj + fc1 + fc2, attention (with the bias); the embedding; norm, head
    assert calls == {"patch_embed": 1, "layer_norm": 2 * 2 + 1, "linear": 4 * 2 + 1, "attention": 2}
    calls.clear()
    for model in (unpatch_timm(eva), unpatch_timm(beit)):
        assert not is_patched(model)
        with torch.no_grad():
            model(_images(model))
    assert calls == {}


@pytest.mark.parametrize("name", ["eva02_base", "rope_reg1_gap", "beit_rel", "beit_shared_abs"])
def test_unpatch_restores_timm_exactly(name):
    model = _timm_model(name)
    before = _instance_attrs(model)
    ref = copy.deepcopy(model)
    x = _images(model)
    vitkernels.patch_timm(model, backend="torch")
    vitkernels.patch_timm(model, backend="torch")  # re-patching unpatches first: nothing bound twice
    assert _instance_attrs(model) != before
    with torch.no_grad():
        model(x)
    assert unpatch_timm(model) is model and not is_patched(model)
    assert _instance_attrs(model) == before
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
        assert torch.equal(model.forward_features(x), ref.forward_features(x))


@pytest.mark.parametrize("name, kw, match", [
    ("eva02_tiny", dict(qk_norm=True), "qk_norm"),
    ("eva02_tiny", dict(attn_drop_rate=0.1), "attn_drop_rate"),
    ("eva02_tiny", dict(use_post_norm=True), "EvaBlockPostNorm"),
    ("eva02_tiny", dict(dynamic_img_size=True), "dynamic_img_size"),
    ("rope_reg1_gap", dict(patch_drop_rate=0.2), "patch_drop_rate"),
    ("beit_rel", dict(attn_drop_rate=0.1), "attn_drop_rate"),
    ("beit_rel", dict(norm_layer=timm.layers.RmsNorm), "RmsNorm"),
])
def test_refused_configs_leave_the_model_untouched(name, kw, match):
    """What eva_from_timm / beit_from_timm refuse, patch_timm refuses with the same error, modifying nothing."""
    model = _timm_model(name, **kw)
    before = _instance_attrs(model)
    with pytest.raises(ValueError, match=match) as patched:
        vitkernels.patch_timm(model, backend="torch")
    with pytest.raises(ValueError) as converted:
        vitkernels.from_timm(model, backend="torch")
    assert type(patched.value) is type(converted.value) and str(patched.value) == str(converted.value)
    assert not is_patched(model) and _instance_attrs(model) == before


@pytest.mark.parametrize("kind", ["bool", "float", "causal"])
def test_eva_attention_masks_on_the_fused_attention(kind):
    """timm's Eva takes attn_mask / is_causal; the patched model and vitkernels.Eva run them on the fused
    attention as its additive bias, with timm's logits."""
    src = _timm_model("eva02_tiny")
    x = _images(src)
    T = src.patch_embed.num_patches + src.num_prefix_tokens
    if kind == "bool":
        mask = torch.rand(T, T, device=DEVICE) > 0.3
        mask.fill_diagonal_(True)
        kw = dict(attn_mask=mask)
    elif kind == "float":
        kw = dict(attn_mask=torch.randn(1, 1, T, T, device=DEVICE))
    else:
        kw = dict(is_causal=True)
    with torch.no_grad():
        want = src.forward_features(x, **kw)
        port = vitkernels.from_timm(src, backend="torch").forward_features(x, **kw)
        patched = vitkernels.patch_timm(copy.deepcopy(src), backend="torch").forward_features(x, **kw)
    torch.testing.assert_close(port, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(patched, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["eva02_tiny", "beit_both_token"])
@pytest.mark.parametrize("backend", backend_params("triton", op="rope"))
def test_compile_fullgraph(backend, name):
    """The patched model traces without a graph break (the bound forwards, timm's rope table and bias gather)."""
    model = _timm_model(name)
    vitkernels.patch_timm(model, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    x = _images(model)
    g = torch.randn(2, 5, device=DEVICE)
    got = compiled(x)
    got.backward(g)
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    want, want_grads = _grads(model, x, g)
    torch.testing.assert_close(got, want)
    for n, gw in want_grads.items():
        torch.testing.assert_close(got_grads[n], gw, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["eva02_tiny", "eva02_base", "rope_reg1_gap", "beit_rel", "beit_both_token"])
@pytest.mark.parametrize("backend", backend_params(*FUSED, op="rope"))
def test_kernel_backend_within_budget(backend, name):
    """Logits and every parameter gradient (the bias tables' through the attention's dbias) within the fp32
    budget of a float64 copy of the timm model."""
    model = _timm_model(name)
    lowp = copy.deepcopy(model)
    oracle = copy.deepcopy(model).double()
    vitkernels.patch_timm(model, backend=backend)
    x = _images(model)
    g = torch.randn(2, 5, device=DEVICE)
    want, want_grads = _grads(lowp, x, g)
    ref, ref_grads = _grads(oracle, x.double(), g.double())
    got, got_grads = _grads(model, x, g)
    assert_budget("logits", got, want, ref)
    for n in ref_grads:
        assert_budget(f"grad {n}", got_grads[n], want_grads[n], ref_grads[n])
