"""The ViT families people fine-tune today (issue #17) on vitkernels' fused ops, against timm itself.

For every family a small random timm model (depth 2, 32 x 32 images) goes through ``from_timm`` and
``patch_timm``: logits and every parameter gradient equal timm's on the torch backend (tight fp32 tolerance)
and within the fp64-oracle budget on each fused backend. Families: DINOv2 with register tokens (LayerScale,
``no_embed_class``), register tokens with a position embedding, SigLIP (no class token, the attention-pool
head ``global_pool='map'``, SigLIP2 so400m's tanh-GELU), OpenAI CLIP (QuickGELU, pre-norm, eps 1e-5), SiLU
MLPs, DeiT distilled (the distillation token and head), gated MLPs (DINOv2-giant's SwiGLUPacked, SwiGLU with
a hidden norm, GluMlp). Also: the same seeded initialisation as timm,
``create_model`` for the families' timm names (same config, keys and shapes as timm's), and the
attention-pool module against timm's on its own.
"""

from __future__ import annotations

import copy

import pytest
import torch

import vitkernels
from optional import need
from oracle import DEVICE, FUSED, assert_budget, backend_params
from vitkernels import VisionTransformer, VisionTransformerDistilled
from vitkernels.backends import OPS, get_impl
from vitkernels.nn.attention_pool import AttentionPoolLatent

timm = need("timm")
from timm.layers import GluMlp, SwiGLU, SwiGLUPacked  # noqa: E402
from timm.models.deit import VisionTransformerDistilled as TimmDistilled  # noqa: E402
from timm.models.vision_transformer import VisionTransformer as TimmViT  # noqa: E402

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
FAMILIES = {
    "dinov2_reg4": (TimmViT, dict(TINY, reg_tokens=4, no_embed_class=True, init_values=0.1)),
    "reg2_pos_on_prefix_avg": (TimmViT, dict(TINY, reg_tokens=2, global_pool="avg")),
    "siglip_map": (TimmViT, dict(TINY, class_token=False, global_pool="map")),
    "siglip2_so400m_gelu_tanh": (TimmViT, dict(TINY, class_token=False, global_pool="map", act_layer="gelu_tanh",
                                               mlp_ratio=3.7362)),
    "clip_quickgelu": (TimmViT, dict(TINY, pre_norm=True, act_layer="quick_gelu")),
    "silu_reg1_map_prefix": (TimmViT, dict(TINY, reg_tokens=1, act_layer="silu", global_pool="map",
                                           pool_include_prefix=True)),
    "deit_distilled": (TimmDistilled, dict(TINY)),
    # gated MLPs: DINOv2-giant's SwiGLUPacked (GluMlp, SiLU gate first), timm's SwiGLU with the hidden norm of
    # scale_mlp_norm (EVA-02's MLP shape), GluMlp with its default gate_last and a GELU gate
    "dinov2_giant_swiglu_packed": (TimmViT, dict(TINY, mlp_layer=SwiGLUPacked, act_layer="silu", mlp_ratio=3.0,
                                                 init_values=0.1, reg_tokens=4, no_embed_class=True)),
    "swiglu_scale_mlp_norm": (TimmViT, dict(TINY, mlp_layer=SwiGLU, act_layer="silu", scale_mlp_norm=True)),
    "glumlp_gelu_gate_last": (TimmViT, dict(TINY, mlp_layer=GluMlp, mlp_ratio=2.5, global_pool="avg")),
}
FAMILY_NAMES = list(FAMILIES)


def _timm_model(name: str, dtype=torch.float32) -> torch.nn.Module:
    cls, kw = FAMILIES[name]
    torch.manual_seed(0)
    model = cls(**kw)
    with torch.no_grad():  # away from the init (zero heads, unit norms): a wrong mapping cannot hide
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.to(device=DEVICE, dtype=dtype).eval()


def _run(model, x):
    """logits and {name: grad} of sum(logits * w) for a fixed w."""
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = model(x)
    w = torch.linspace(-1, 1, out.numel(), device=out.device, dtype=out.dtype).view_as(out)
    (out * w).sum().backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, x.grad.detach()


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("how", ["from_timm", "patch_timm"])
def test_family_matches_timm_torch_backend(name, how):
    src = _timm_model(name)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    ref = _run(src, x)
    model = vitkernels.from_timm(src, backend="torch") if how == "from_timm" else \
        vitkernels.patch_timm(copy.deepcopy(src), backend="torch")
    if how == "from_timm":
        assert model.state_dict().keys() == src.state_dict().keys()
    got = _run(model, x)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-5)
    assert got[1].keys() == ref[1].keys()
    for n in ref[1]:
        torch.testing.assert_close(got[1][n], ref[1][n], rtol=1e-4, atol=1e-5, msg=lambda m, n=n: f"grad {n}: {m}")
    torch.testing.assert_close(got[2], ref[2], rtol=1e-4, atol=1e-6)


def _fused_backends():
    params = []
    for p in backend_params(*FUSED):
        name = p.values[0]
        lacking = [op for op in OPS if get_impl(name).get_op(op) is None] if not p.marks else []
        marks = list(p.marks) + ([pytest.mark.skip(reason=f"{name} lacks {lacking}")] if lacking else [])
        params.append(pytest.param(name, id=name, marks=marks))
    return params


@pytest.mark.parametrize("name", FAMILY_NAMES)
@pytest.mark.parametrize("backend", _fused_backends())
def test_family_fused_backend_within_budget(backend, name):
    """Each family on each kernel backend: logits and every gradient within the budget of a float64 timm
    oracle (2x timm's own fp32 error plus the fp32 floor)."""
    src = _timm_model(name)
    oracle = copy.deepcopy(src).double()
    model = vitkernels.from_timm(src, backend=backend)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    ours, lowp, ref = _run(model, x), _run(src, x), _run(oracle, x.double())
    assert_budget("logits", ours[0], lowp[0], ref[0])
    for n in ref[1]:
        assert_budget(f"d{n}", ours[1][n], lowp[1][n], ref[1][n])
    assert_budget("dimages", ours[2], lowp[2], ref[2])


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_family_seeded_init_as_timm(name):
    """vitkernels' constructor draws the same initial tensors as timm's (register tokens, distillation token,
    attention-pool latent), so a seeded run from scratch starts where timm's does."""
    cls, kw = FAMILIES[name]
    ours_cls = VisionTransformerDistilled if cls is TimmDistilled else VisionTransformer
    torch.manual_seed(3)
    ref = cls(**kw)
    torch.manual_seed(3)
    ours = ours_cls(**kw, backend="torch")
    a, b = ours.state_dict(), ref.state_dict()
    assert list(a) == list(b)
    for k in b:
        assert torch.equal(a[k], b[k]), k


CREATE_NAMES = ["vit_giant_patch14_dinov2", "vit_giant_patch14_reg4_dinov2", "vit_small_patch14_reg4_dinov2",
                "vit_base_patch14_reg4_dinov2", "vit_base_patch14_dinov2", "vit_base_patch16_siglip_224",
                "vit_so400m_patch14_siglip_378", "vit_so400m_patch16_siglip_256.v2_webli",
                "vit_base_patch16_siglip_224.v2_webli", "vit_base_patch16_clip_quickgelu_224",
                "deit_base_distilled_patch16_224", "eva02_base_patch14_224", "eva02_tiny_patch14_224",
                "vit_base_patch16_rope_reg1_gap_256", "beit_base_patch16_224", "beitv2_large_patch16_224"]


@pytest.mark.parametrize("name", CREATE_NAMES)
def test_create_model_family_names_as_timm(name):
    with torch.device("meta"):
        ref = timm.create_model(name)
        ours = vitkernels.create_model(name)
    assert type(ours).__name__ == type(ref).__name__
    assert ours.pretrained_cfg == ref.pretrained_cfg
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert ours.num_prefix_tokens == ref.num_prefix_tokens and ours.global_pool == ref.global_pool
    acts = {type(b.mlp.act).__name__ for b in ref.blocks}
    ours_acts = {vitkernels.nn.mlp.epilogue_activation(b.mlp.act) for b in ours.blocks}
    assert ours_acts == {vitkernels.nn.mlp.epilogue_activation(b.mlp.act) for b in ref.blocks}, acts
    eps = {m.eps for m in ref.modules() if isinstance(m, torch.nn.LayerNorm)}
    assert {m.eps for m in ours.modules() if isinstance(m, torch.nn.LayerNorm)} == eps


@pytest.mark.parametrize("backend", backend_params("torch", *FUSED))
@pytest.mark.parametrize("tokens", [197, 50], ids=["N197", "N50"])
def test_attention_pool_matches_timm(backend, tokens):
    """The 'map' head alone: one latent query over N tokens (ops.attention with 1 x N scores), its projection
    and the fused norm + MLP + residual, against timm's AttentionPoolLatent with the same weights."""
    from timm.layers.attention_pool import AttentionPoolLatent as TimmPool

    torch.manual_seed(0)
    ref = TimmPool(80, num_heads=1, mlp_ratio=2.0, norm_layer=torch.nn.LayerNorm).to(DEVICE)  # head dim 80
    ours = AttentionPoolLatent(80, num_heads=1, mlp_ratio=2.0, norm_layer=torch.nn.LayerNorm, backend=backend).to(DEVICE)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, tokens, 80, device=DEVICE)
    got, want = _run_pool(ours, x), _run_pool(ref, x)
    oracle = _run_pool(copy.deepcopy(ref).double(), x.double())
    for (n, a), b, c in zip(got.items(), want.values(), oracle.values()):
        assert_budget(n, a, b, c)


def _run_pool(pool, x):
    pool.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    out = pool(x)
    (out * torch.linspace(-1, 1, out.numel(), device=x.device, dtype=x.dtype).view_as(out)).sum().backward()
    return {"out": out.detach(), "dx": x.grad, **{f"d{n}": p.grad for n, p in pool.named_parameters()}}


@pytest.mark.parametrize("backend", backend_params("torch", *FUSED))
@pytest.mark.parametrize("kind", ["bool", "float_grad", "causal"])
def test_masked_forward_on_the_fused_attention(backend, kind):
    """timm's ``forward(x, attn_mask=...)`` / ``is_causal``: the mask becomes the fused attention op's additive
    bias (bool: 0 / -inf; float: as given, its gradient computed when it requires one), with register tokens
    (T = 1 + 4 + 16 = 21 rows), against the float64 timm oracle."""
    src = _timm_model("dinov2_reg4")
    oracle = copy.deepcopy(src).double()
    model = vitkernels.from_timm(src, backend=backend)
    T = 21
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    if kind == "bool":
        mask = torch.rand(T, T, device=DEVICE) > 0.3
        mask.fill_diagonal_(True)
    elif kind == "float_grad":
        mask = torch.randn(2, 1, T, T, device=DEVICE)
    kw = dict(is_causal=True) if kind == "causal" else dict(attn_mask=mask)

    def run(m, images, dtype):
        m.zero_grad(set_to_none=True)
        images = images.detach().to(dtype).requires_grad_()
        extra = dict(kw)
        if kind == "float_grad":
            extra["attn_mask"] = mask.detach().to(dtype).requires_grad_()
        out = m.forward_features(images, **extra)
        (out * torch.linspace(-1, 1, out.numel(), device=DEVICE, dtype=dtype).view_as(out)).sum().backward()
        grads = {"out": out.detach(), "dimages": images.grad}
        if kind == "float_grad":
            grads["dmask"] = extra["attn_mask"].grad
        return grads

    ours, lowp, ref = run(model, x, torch.float32), run(src, x, torch.float32), run(oracle, x, torch.float64)
    for name in ref:
        assert_budget(name, ours[name], lowp[name], ref[name])


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_gated_mlp_lean_block_keeps_less(backend):
    """The lean block runs a gated MLP half as one ops.ln_glu_mlp: per token it keeps x and the gate and value
    pre-activations (C + 2H) where the per-op path keeps norm2's input and output, both pre-activations and fc2's
    input (2C + 3H): the bytes saved for backward by the whole model, both paths, same logits."""
    src = _timm_model("dinov2_giant_swiglu_packed")
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    saved, logits = {}, {}
    for lean in (True, False):
        model = vitkernels.from_timm(src, backend=backend)
        for blk in model.blocks:
            blk.lean = lean
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits[lean] = model(x)
        saved[lean] = total
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-4, atol=1e-5)
    T, C, H, depth = 21, 64, 96, 2  # 4 registers + class token + 16 patches; GluMlp of width 2H = 192
    fewer = depth * 2 * T * (C + H) * 4  # per block: norm2's output (C) and fc2's input (H), fp32
    assert saved[False] - saved[True] >= fewer, saved


@pytest.mark.parametrize("no_embed_class", [True, False], ids=["no_embed_class", "pos_on_prefix"])
def test_register_tokens_at_another_resolution(no_embed_class):
    """dynamic_img_size with register tokens: the position embedding is resampled to the new grid with the
    prefix rows (class + registers) kept apart when it covers them, as timm does."""
    torch.manual_seed(0)
    src = TimmViT(**dict(TINY, reg_tokens=3, no_embed_class=no_embed_class, dynamic_img_size=True)).eval()
    with torch.no_grad():
        src.pos_embed.add_(torch.randn_like(src.pos_embed))
    model = vitkernels.from_timm(src, backend="torch")
    x = torch.randn(2, 3, 48, 24)
    with torch.no_grad():
        torch.testing.assert_close(model(x), src(x), rtol=1e-5, atol=1e-5)
