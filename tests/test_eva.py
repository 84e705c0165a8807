"""Eva (EVA-02 / timm rope ViTs) on vitkernels ops against timm's ``timm.models.eva.Eva`` (timm 1.0.31): the
rope table bit for bit, the module tree and state_dict keys (timm's state_dict loads with strict=True), logits
and gradients of ``eva_from_timm`` (torch backend to fp32 rounding, kernel backends within the fp32 budget of
a float64 timm oracle), and the arguments it refuses.

Small configurations of the real model names (depth 1-2, 4 x 4 patch grids, heads of 32 or 80 columns), with
every parameter perturbed so the zero-initialised biases (q / v biases, layer scale, head) matter.
"""

from __future__ import annotations

import copy

import pytest
import torch

from optional import need
from oracle import DEVICE, FUSED, assert_budget, backend_params

timm = need("timm")
from timm.layers.pos_embed_sincos import RotaryEmbeddingCat as TimmRotaryEmbeddingCat  # noqa: E402

from vitkernels.nn.eva import Eva, eva_from_timm, rope_table  # noqa: E402

# name -> (timm model, its kwargs): each covers a different block / embedding layout.
CONFIGS = {
    # GluMlp (packed SwiGLU), fused qkv with q / v bias, class token + abs pos, avg pool + fc_norm
    "eva02_tiny": ("eva02_tiny_patch14_224", dict(depth=2, img_size=56, embed_dim=64, num_heads=2)),
    # SwiGLU with its norm before fc2 (scale_mlp), separate q / k / v projections
    "eva02_base": ("eva02_base_patch14_224", dict(depth=2, img_size=56, embed_dim=64, num_heads=2)),
    # scale_attn_inner (a norm before proj), class-token pooling, patch 16
    "eva02_clip": ("eva02_base_patch16_clip_224", dict(depth=1, img_size=64, embed_dim=64, num_heads=2)),
    # GELU Mlp, one register token and no class token, no abs pos, layer scale, head dim 80
    "rope_reg1_gap": ("vit_medium_patch16_rope_reg1_gap_256", dict(depth=2, img_size=64, embed_dim=160,
                                                                    num_heads=2)),
    # four register tokens, the rotate-half rope layout, no qkv bias
    "rope_reg4_half": ("vit_mediumd_patch16_rope_reg1_gap_256", dict(depth=1, img_size=64, embed_dim=64,
                                                                     num_heads=2, num_reg_tokens=4,
                                                                     rope_rotate_half=True)),
}


def _timm_model(name):
    model_name, kw = CONFIGS[name]
    model = timm.create_model(model_name, pretrained=False, num_classes=5, **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval().to(DEVICE)


def _images(model, B=2):
    H, W = model.patch_embed.img_size
    return torch.randn(B, 3, H, W, device=DEVICE)


def _grads(model, x, g):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.backward(g.to(out.dtype))
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kw", [
    dict(feat_shape=[16, 16], ref_feat_shape=[16, 16]),
    dict(feat_shape=[4, 4], ref_feat_shape=[16, 16]),
    dict(feat_shape=[24, 24], ref_feat_shape=[16, 16], rotate_half=True),
    dict(feat_shape=[3, 5], grid_offset=0.5, grid_indexing="xy", temperature=100.0),
    dict(feat_shape=[7, 9]),
], ids=["224", "56", "336_half", "offset_xy", "no_ref"])
@pytest.mark.parametrize("dim", [32, 64, 80])
def test_rope_table_is_timms_bit_for_bit(dim, kw):
    theirs = TimmRotaryEmbeddingCat(dim, in_pixels=False, **kw).get_embed()
    ours = rope_table(dim, kw["feat_shape"], temperature=kw.get("temperature", 10000.0),
                      ref_feat_shape=kw.get("ref_feat_shape"), grid_offset=kw.get("grid_offset", 0.0),
                      grid_indexing=kw.get("grid_indexing", "ij"), rotate_half=kw.get("rotate_half", False))
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_timm_state_dict_loads_strict_into_the_constructor():
    """Eva built from timm's constructor arguments has timm's module tree: its state_dict loads strictly."""
    src = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=2, img_size=56, embed_dim=64,
                            num_heads=2, num_classes=5)
    ours = Eva(img_size=56, patch_size=14, num_classes=5, embed_dim=64, depth=2, num_heads=2, mlp_ratio=4 * 2 / 3,
               swiglu_mlp=True, use_rot_pos_emb=True, ref_feat_shape=(16, 16), backend="torch")
    assert list(ours.state_dict()) == list(src.state_dict())
    ours.load_state_dict(src.state_dict(), strict=True)
    assert torch.equal(ours.rope.get_embed(), src.rope.get_embed())


@pytest.mark.parametrize("name", list(CONFIGS))
def test_eva_from_timm_logits_and_grads_torch_backend(name):
    src = _timm_model(name)
    ours = eva_from_timm(src, backend="torch")
    assert list(ours.state_dict()) == list(src.state_dict())
    if src.rope is not None:
        assert torch.equal(ours.rope.get_embed(), src.rope.get_embed())
    x = _images(src)
    g = torch.randn(2, 5, device=DEVICE)
    want, want_grads = _grads(src, x, g)
    got, got_grads = _grads(ours, x, g)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert set(got_grads) == set(want_grads)
    for n, gw in want_grads.items():
        torch.testing.assert_close(got_grads[n], gw, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", ["eva02_tiny", "eva02_base", "rope_reg1_gap", "rope_reg4_half"])
@pytest.mark.parametrize("backend", backend_params(*FUSED, op="rope"))
def test_eva_from_timm_fused_backend_within_budget(backend, name):
    """Logits and every parameter gradient within the fp32 budget of a float64 timm oracle."""
    src = _timm_model(name)
    oracle = copy.deepcopy(src).double()
    ours = eva_from_timm(src, backend=backend)
    x = _images(src)
    g = torch.randn(2, 5, device=DEVICE)
    want, want_grads = _grads(src, x, g)
    ref, ref_grads = _grads(oracle, x.double(), g.double())
    got, got_grads = _grads(ours, x, g)
    assert_budget("logits", got, want, ref)
    for n in ref_grads:
        assert_budget(f"grad {n}", got_grads[n], want_grads[n], ref_grads[n])


@pytest.mark.parametrize("kw, match", [
    (dict(qk_norm=True), "qk_norm"),
    (dict(num_kv_heads=1), "num_kv_heads"),
    (dict(use_rot_pos_emb=True, rope_type="mixed"), "rope_type"),
    (dict(patch_drop_rate=0.1), "patch_drop_rate"),
    (dict(attn_drop_rate=0.1), "attn_drop_rate"),
    (dict(use_post_norm=True), "use_post_norm"),
    (dict(global_pool="map"), "global_pool"),
    (dict(dynamic_img_size=True), "dynamic_img_size"),
    (dict(use_rot_pos_emb=True, rope_jitter_coords=2.0), "rope_jitter_coords"),
])
def test_eva_refuses_what_it_does_not_compute(kw, match):
    with pytest.raises(ValueError, match=match):
        Eva(img_size=32, patch_size=16, embed_dim=32, depth=1, num_heads=2, backend="torch", **kw)


def test_eva_from_timm_refuses_qk_norm():
    src = timm.create_model("eva02_tiny_patch14_224", pretrained=False, depth=1, img_size=28, embed_dim=32,
                            num_heads=2, qk_norm=True)
    with pytest.raises(ValueError, match="qk_norm"):
        eva_from_timm(src, backend="torch")


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="rope"))
def test_eva_compile_fullgraph(backend):
    """The whole model traces without a graph break (rope table views, the rope op's fake and autograd)."""
    src = _timm_model("eva02_tiny")
    model = eva_from_timm(src, backend=backend)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    x = _images(src)
    g = torch.randn(2, 5, device=DEVICE)
    got = compiled(x)
    got.backward(g)
    got_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    want, want_grads = _grads(model, x, g)
    torch.testing.assert_close(got, want)
    for n, gw in want_grads.items():
        torch.testing.assert_close(got_grads[n], gw, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="rope"))
def test_eva_from_timm_fp16_logits_within_budget(backend):
    """A half-precision timm model (its rope table fp16 too, which the rope op upcasts): logits within the fp16
    budget of the float64 oracle."""
    src = _timm_model("eva02_tiny")
    oracle = copy.deepcopy(src).double()
    half = copy.deepcopy(src).half()
    ours = eva_from_timm(half, backend=backend)
    x = _images(src)
    with torch.no_grad():
        got, want, ref = ours(x.half()), half(x.half()), oracle(x.double())
    assert got.dtype == torch.float16
    assert_budget("logits", got, want, ref)
