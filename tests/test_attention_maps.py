"""Attention maps of a fused model agree with timm's explicit softmax; the forward is untouched; rollout."""

from __future__ import annotations

import pytest
import torch

import vitkernels
from optional import need
from oracle import DEVICE
from vitkernels import VisionTransformer
from vitkernels.attention_maps import attention_maps, attention_rollout
from vitkernels.backends import OPS, get_impl, why_not

timm_vit = need("timm.models.vision_transformer")  # this module checks us against timm
TimmViT = timm_vit.VisionTransformer

TINY = dict(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=10)
CONFIGS = {
    "tiny": TINY,
    "qknorm_layerscale": dict(TINY, qk_norm=True, init_values=0.1, qkv_bias=False),
    "avg_no_cls": dict(TINY, class_token=False, global_pool="avg", depth=3, num_heads=2),
}


def _model_backends():
    """torch always; triton when it runs here and has every op the model uses (skipped with the reason)."""
    params = [pytest.param("torch", id="torch")]
    why = why_not("triton", DEVICE)
    if why is None:
        missing = [op for op in OPS if get_impl("triton").get_op(op) is None]
        why = f"triton backend lacks ops {missing}" if missing else None
    params.append(pytest.param("triton", id="triton", marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return params


def _timm_maps(timm_model, x):
    """Plain PyTorch maps: timm's unfused attention path, the softmax output captured at attn_drop (eval)."""
    maps, handles = [], []
    for blk in timm_model.blocks:
        blk.attn.fused_attn = False
        handles.append(blk.attn.attn_drop.register_forward_hook(lambda m, a, out: maps.append(out.detach())))
    try:
        with torch.no_grad():
            timm_model(x)
    finally:
        for h in handles:
            h.remove()
    return maps


def _hook_count(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("backend", _model_backends())
def test_maps_match_timm_and_leave_model_untouched(backend, name):
    kw = CONFIGS[name]
    timm_model = TimmViT(**kw).eval()
    ours = VisionTransformer(**kw, backend=backend).eval()
    ours.load_state_dict(timm_model.state_dict(), strict=True)
    timm_model, ours = timm_model.to(DEVICE), ours.to(DEVICE)
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    with torch.no_grad():
        logits_before = ours(x)

    maps = attention_maps(ours, x)

    N = 16 + (0 if kw.get("class_token") is False else 1)
    H = kw["num_heads"]
    assert len(maps) == kw["depth"]
    expected = _timm_maps(timm_model, x)
    for layer, (a, ref) in enumerate(zip(maps, expected)):
        assert a.shape == (2, H, N, N) and a.dtype == torch.float32 and a.device == x.device
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(2, H, N, device=DEVICE), atol=1e-5, rtol=0)
        err = (a - ref).abs().max().item()
        assert err <= 1e-5, f"layer {layer}: max error {err:.3e} vs timm"
    assert _hook_count(ours) == 0
    with torch.no_grad():
        assert torch.equal(ours(x), logits_before)


def test_hooks_removed_when_forward_raises():
    model = VisionTransformer(**TINY, backend="torch").eval()
    with pytest.raises(Exception):
        attention_maps(model, torch.randn(1, 3, 24, 24))  # wrong image size
    assert _hook_count(model) == 0


def test_public_names():
    assert vitkernels.attention_maps is attention_maps
    assert vitkernels.attention_rollout is attention_rollout


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_rollout_of_identity_maps_is_identity(head_fusion):
    B, H, N = 2, 3, 9
    eye = torch.eye(N).expand(B, H, N, N)
    out = attention_rollout([eye, eye, eye], head_fusion=head_fusion)
    torch.testing.assert_close(out, torch.eye(N).expand(B, N, N))


def _random_maps(L, B, H, N):
    return [torch.softmax(torch.randn(B, H, N, N) * 2, dim=-1) for _ in range(L)]


@pytest.mark.parametrize("discard_ratio", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
def test_rollout_rows_sum_to_one(head_fusion, discard_ratio):
    maps = _random_maps(4, 2, 3, 11)
    copies = [a.clone() for a in maps]
    out = attention_rollout(maps, discard_ratio=discard_ratio, head_fusion=head_fusion)
    assert out.shape == (2, 11, 11)
    assert (out >= 0).all()
    torch.testing.assert_close(out.sum(-1), torch.ones(2, 11), atol=1e-5, rtol=0)
    for a, c in zip(maps, copies):
        assert torch.equal(a, c), "rollout modified its input"


def test_rollout_matches_explicit_product():
    """mean fusion, no discard: (0.5 A_L + 0.5 I) ... (0.5 A_1 + 0.5 I), rows already normalised."""
    maps = _random_maps(3, 2, 4, 7)
    eye = torch.eye(7, dtype=torch.float64)
    expected = torch.eye(7, dtype=torch.float64).expand(2, 7, 7)
    for a in maps:
        expected = (0.5 * a.double().mean(1) + 0.5 * eye) @ expected
    torch.testing.assert_close(attention_rollout(maps).double(), expected, atol=1e-6, rtol=0)


def test_rollout_discard_keeps_class_token_self_attention():
    N = 5
    a = torch.full((1, 1, N, N), 1.0 / N)
    a[0, 0, 0] = torch.tensor([0.01, 0.24, 0.25, 0.25, 0.25])  # class token's self-attention is the lowest
    out = attention_rollout([a], discard_ratio=0.5)
    # Kept: 0.5 * 0.01 + 0.5 on the diagonal of row 0, normalised; never zeroed.
    assert out[0, 0, 0] > 0.5


def test_rollout_rejects_bad_arguments():
    maps = _random_maps(1, 1, 1, 4)
    with pytest.raises(ValueError):
        attention_rollout([])
    with pytest.raises(ValueError):
        attention_rollout(maps, head_fusion="median")
    with pytest.raises(ValueError):
        attention_rollout(maps, discard_ratio=1.0)
    with pytest.raises(ValueError):
        attention_rollout(maps + _random_maps(1, 1, 1, 5))
