"""Beit (BEiT / BEiT v2) on vitkernels ops against timm's ``timm.models.beit.Beit`` (timm 1.0.31): the relative
position index bit for bit, the module tree and state_dict keys (timm's state_dict loads with strict=True), the
seeded initialisation, logits and every parameter gradient of ``beit_from_timm`` -- the relative position bias
tables included -- (torch backend to fp32 rounding, kernel backends within the fp32 budget of a float64 timm
oracle), and the arguments it refuses.

Small configurations (depth 2, 32 x 32 images in 8 x 8 patches: N = 17 tokens, 4 heads of 16 columns), with
every parameter perturbed so the zero-initialised tables, q / v biases and the head matter.
"""

from __future__ import annotations

import copy

import pytest
import torch

from optional import need
from oracle import DEVICE, FUSED, assert_budget, backend_params

timm = need("timm")
from timm.models.beit import gen_relative_position_index as timm_index  # noqa: E402

from vitkernels.nn.beit import Beit, beit_from_timm, gen_relative_position_index  # noqa: E402

SMALL = dict(depth=2, img_size=32, patch_size=8, embed_dim=64, num_heads=4)

# name -> (timm model, its kwargs): each covers a different bias / embedding / MLP layout.
CONFIGS = {
    # BEiT as released: per-block tables, no absolute position embedding, layer scale, avg pool + fc_norm
    "rel": ("beit_base_patch16_224", dict(SMALL)),
    # one table shared by every block, with an absolute position embedding (BEiT pre-training's layout)
    "shared_abs": ("beit_base_patch16_224", dict(SMALL, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                                 use_abs_pos_emb=True)),
    # both tables (their sum), class-token pooling with the final norm, no qkv bias
    "both_token": ("beitv2_base_patch16_224", dict(SMALL, use_shared_rel_pos_bias=True, global_pool="token",
                                                   qkv_bias=False)),
    # SwiGLU with its norm before fc2 (scale_mlp), abs pos + per-block tables, no layer scale
    "swiglu_abs": ("beit_base_patch16_224", dict(SMALL, swiglu_mlp=True, scale_mlp=True, use_abs_pos_emb=True,
                                                 init_values=None, mlp_ratio=2.5)),
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


@pytest.mark.parametrize("window", [(4, 4), (14, 14), (3, 5), (1, 1)])
def test_relative_position_index_is_timms(window):
    ours, theirs = gen_relative_position_index(window), timm_index(window)
    assert ours.dtype == theirs.dtype and torch.equal(ours, theirs)


def test_timm_state_dict_loads_strict_into_the_constructor():
    """Beit built from timm's constructor arguments has timm's module tree and buffers: its state_dict (no
    relative_position_index: non-persistent in both) loads strictly."""
    src = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=5, use_shared_rel_pos_bias=True,
                            **SMALL)
    ours = Beit(num_classes=5, use_abs_pos_emb=False, use_rel_pos_bias=True, use_shared_rel_pos_bias=True,
                init_values=0.1, backend="torch", **SMALL)
    assert list(ours.state_dict()) == list(src.state_dict())
    assert not any("relative_position_index" in k or "k_bias" in k for k in src.state_dict())
    ours.load_state_dict(src.state_dict(), strict=True)
    theirs_buffers = dict(src.named_buffers())
    for n, b in ours.named_buffers():
        assert torch.equal(b, theirs_buffers[n]), n


@pytest.mark.parametrize("name", ["rel", "both_token", "swiglu_abs"])
def test_seeded_init_is_timms(name):
    """The same seed draws the same initial weights (timm's draw order: constructors, then init_weights)."""
    _, kw = CONFIGS[name]
    kw = dict(dict(use_abs_pos_emb=False, use_rel_pos_bias=True, init_values=0.1), **kw)
    torch.manual_seed(0)
    src = timm.models.beit.Beit(num_classes=5, **kw)
    torch.manual_seed(0)
    ours = Beit(num_classes=5, backend="torch", **kw)
    want = src.state_dict()
    for n, t in ours.state_dict().items():
        assert torch.equal(t, want[n]), n


@pytest.mark.parametrize("name", list(CONFIGS))
def test_beit_from_timm_logits_and_grads_torch_backend(name):
    src = _timm_model(name)
    ours = beit_from_timm(src, backend="torch")
    assert list(ours.state_dict()) == list(src.state_dict())
    x = _images(src)
    g = torch.randn(2, 5, device=DEVICE)
    want, want_grads = _grads(src, x, g)
    got, got_grads = _grads(ours, x, g)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert set(got_grads) == set(want_grads)
    assert any("relative_position_bias_table" in n for n in want_grads)
    for n, gw in want_grads.items():
        torch.testing.assert_close(got_grads[n], gw, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")


def test_beit_from_timm_training_mode_torch_backend():
    """In training mode (position / projection / head dropout, drop path) the same seed draws the same masks:
    timm's logits and gradients; gradient checkpointing changes nothing."""
    src = timm.create_model("beit_base_patch16_224", pretrained=False, num_classes=5, drop_rate=0.1,
                            pos_drop_rate=0.1, proj_drop_rate=0.1, drop_path_rate=0.2,
                            use_shared_rel_pos_bias=True, **SMALL).to(DEVICE)
    ours = beit_from_timm(src, backend="torch")
    assert ours.training and ours.blocks[1].drop_path1.drop_prob == pytest.approx(0.2)
    x = _images(src, B=4)
    g = torch.randn(4, 5, device=DEVICE)
    torch.manual_seed(1)
    want, want_grads = _grads(src, x, g)
    torch.manual_seed(1)
    got, got_grads = _grads(ours, x, g)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for n, gw in want_grads.items():
        torch.testing.assert_close(got_grads[n], gw, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    ours.eval().set_grad_checkpointing(True)
    ckpt, ckpt_grads = _grads(ours, x, g)
    ours.set_grad_checkpointing(False)
    plain, plain_grads = _grads(ours, x, g)
    torch.testing.assert_close(ckpt, plain, rtol=0, atol=0)
    for n, gp in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[n], gp, rtol=0, atol=0, msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", backend_params(*FUSED, op="attention"))
def test_beit_from_timm_fused_backend_within_budget(backend, name):
    """Logits and every parameter gradient (the tables' through the attention's dbias) within the fp32 budget
    of a float64 timm oracle."""
    src = _timm_model(name)
    oracle = copy.deepcopy(src).double()
    ours = beit_from_timm(src, backend=backend)
    x = _images(src)
    g = torch.randn(2, 5, device=DEVICE)
    want, want_grads = _grads(src, x, g)
    ref, ref_grads = _grads(oracle, x.double(), g.double())
    got, got_grads = _grads(ours, x, g)
    assert_budget("logits", got, want, ref)
    for n in ref_grads:
        assert_budget(f"grad {n}", got_grads[n], want_grads[n], ref_grads[n])


@pytest.mark.parametrize("kw, match", [
    (dict(attn_drop_rate=0.1), "attn_drop_rate"),
    (dict(global_pool="max"), "global_pool"),
    (dict(embed_dim=30), "embed_dim"),
    (dict(norm_layer="batchnorm"), "norm_layer"),
])
def test_beit_refuses_what_it_does_not_compute(kw, match):
    with pytest.raises(ValueError, match=match):
        Beit(**dict(dict(SMALL, backend="torch"), **kw))


def test_beit_from_timm_refuses_attention_dropout_and_other_models():
    src = timm.create_model("beit_base_patch16_224", pretrained=False, attn_drop_rate=0.1, **SMALL)
    with pytest.raises(ValueError, match="attn_drop_rate"):
        beit_from_timm(src, backend="torch")
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, depth=1, img_size=32)
    with pytest.raises(ValueError, match="Beit"):
        beit_from_timm(vit, backend="torch")


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="attention"))
def test_beit_compile_fullgraph(backend):
    """The whole model traces without a graph break (the table gather, the biased attention's fake and
    autograd)."""
    src = _timm_model("both_token")
    model = beit_from_timm(src, backend=backend)
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


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="attention"))
def test_beit_from_timm_fp16_logits_within_budget(backend):
    """A half-precision timm model (fp16 tables: an fp16 bias): logits within the fp16 budget of the float64
    oracle."""
    src = _timm_model("rel")
    oracle = copy.deepcopy(src).double()
    half = copy.deepcopy(src).half()
    ours = beit_from_timm(half, backend=backend)
    x = _images(src)
    with torch.no_grad():
        got, want, ref = ours(x.half()), half(x.half()), oracle(x.double())
    assert got.dtype == torch.float16
    assert_budget("logits", got, want, ref)
