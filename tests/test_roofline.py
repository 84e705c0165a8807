"""vitkernels.experiments.roofline: the roofline model of a training step (a model, not a measurement).

FLOPs against vitkernels.flops.count, bytes of a tiny case worked by hand, the lean sequence against timm's,
and docs/roofline.md against what the code prints (so the committed doc cannot drift).
"""

from pathlib import Path

import pytest
import torch

import vitkernels
from vitkernels import flops
from vitkernels.experiments import roofline as rl
from vitkernels.models import model_config

DOC = Path(__file__).resolve().parents[1] / "docs" / "roofline.md"
MODELS = ("vit_tiny_patch16_224", "vit_base_patch16_224", "vit_base_patch32_384", "vit_large_patch16_224")

# A tiny ViT: 8x8 images, patch 4 -> N = 4, T = 5 tokens; C = 8, 2 heads, hidden 32, depth 1, 3 classes.
TINY = dict(img_size=8, patch_size=4, in_chans=3, embed_dim=8, depth=1, num_heads=2, mlp_ratio=4.0,
            num_classes=3)


@pytest.mark.parametrize("seq", tuple(rl.SEQUENCES))
@pytest.mark.parametrize("name", MODELS)
def test_flops_agree_with_flops_count(name, seq):
    B = 3
    s = rl.sizes(name, B)
    ops = rl.SEQUENCES[seq](s)
    fwd = sum(o.count * o.flops for o in ops if o.phase == "fwd")
    assert fwd == flops.count(name, batch_size=B).total
    # Training: 3x forward, except the patch embedding's backward, which computes dW only (no image gradient).
    train = flops.count(name, batch_size=B, training=True, recompute=False)
    total = sum(o.count * o.flops for o in ops)
    assert total == train.total - B * s.fwd["patch_embed"], (total, train.total)
    assert rl.summarize(ops).flops == total


def test_vit_b16_training_flops_per_image():
    s = rl.sizes("vit_base_patch16_224", 256)
    per_image = rl.summarize(rl.lean_ops(s)).flops / 256
    assert abs(per_image / 1e9 - (3 * 35.13 - 0.23)) < 0.05, per_image


@pytest.mark.parametrize("overrides", [{}, {"qkv_bias": False}])
@pytest.mark.parametrize("name", ("vit_base_patch16_224", "vit_large_patch16_224"))
def test_parameter_counts_match_the_model(name, overrides):
    with torch.device("meta"):
        model = vitkernels.create_model(name, **overrides)
    s = rl.sizes({**model_config(name), **overrides}, 1)
    assert s.params() == sum(p.numel() for p in model.parameters())
    gemm = [model.patch_embed.proj, model.head] + [m for b in model.blocks
                                                   for m in (b.attn.qkv, b.attn.proj, b.mlp.fc1, b.mlp.fc2)]
    assert s.gemm_params() == sum(p.numel() for m in gemm for p in m.parameters())


def _by_name(ops):
    return {o.name: o for o in ops}


def test_tiny_lean_bytes_by_hand():
    s = rl.sizes(TINY, 2)
    assert (s.R, s.C, s.Ch, s.heads, s.L) == (10, 8, 32, 2, 1)
    ops = _by_name(rl.lean_ops(s))
    # bf16: one (R, C) activation = 10 * 8 * 2 = 160 bytes; z (R, 32) = 640; stats 8 R = 80;
    # LayerNorm weight + bias 2 * 8 * 2 = 32; lse 4 * B * heads * T = 4 * 2 * 2 * 5 = 80.
    # W_qkv + b = (3 * 8 * 8 + 24) * 2 = 432; W_proj + b = (64 + 8) * 2 = 144;
    # W1 + b1 = (32 * 8 + 32) * 2 = 576; W2 + b2 = (8 * 32 + 8) * 2 = 528.
    expected = {
        "ln_linear: norm1 + qkv GEMM": (160 + 32 + 432, 3 * 160 + 80),
        "attention (flash)": (3 * 160, 160 + 80),
        "proj GEMM + bias + residual": (160 + 144 + 160, 160),
        "ln_mlp fc1: norm2 + fc1 GEMM": (160 + 32 + 576, 640 + 80),
        "ln_mlp fc2: GELU + fc2 GEMM + residual": (640 + 528 + 160, 160),
        "ln_mlp dz = (dy W2) GELU'(z) (+db1)": (160 + 528 + 640, 640 + 32 * 2),
        "attention bwd": (5 * 160 + 80, 3 * 160),
        "stack dq, dk, dv -> d qkv": (480, 480),
        "residual: add the two gradients of x": (320, 160),
    }
    for name, (read, written) in expected.items():
        assert (ops[name].read, ops[name].written) == (read, written), name
    # Parameters: patch 8*3*16 + 8 = 392; block 432/2 + 144/2 + 576/2 + 528/2 = 840; head 3*8 + 3 = 27 -> 1,259
    # in GEMMs; + cls 8 + pos 5*8 + three LayerNorms 3*16 = 1,355 in all. AdamW: 16 bytes read, 12 written each.
    assert (s.gemm_params(), s.params()) == (1259, 1355)
    adamw = [o for o in ops.values() if o.phase == "step"]
    assert [(o.read, o.written) for o in adamw] == [(16 * 1355, 12 * 1355)]


def test_tiny_timm_bytes_by_hand():
    s = rl.sizes(TINY, 2)
    ops = _by_name(rl.timm_ops(s))
    # fp32 stream: (R, C) = 320 bytes; bf16 160; z 640; LayerNorm parameters fp32 2 * 8 * 4 = 64.
    expected = {
        "norm1 (LayerNorm, fp32 out)": (320 + 64, 320 + 80),
        "norm1 output -> bf16 (the linear's autocast cast)": (320, 160),
        "residual add (fp32 + bf16 -> fp32)": (320 + 160, 320),
        "GELU": (640, 640),
        "GELU bwd": (2 * 640, 640),
        "fc1 db (column sum)": (640, 64),
        "clone (permuted -> qkv layout)": (480, 480),
    }
    for name, (read, written) in expected.items():
        assert (ops[name].read, ops[name].written) == (read, written), name


@pytest.mark.parametrize("seq, casts", [("lean", 3), ("timm", 11)])
def test_fp32_drops_exactly_the_casts(seq, casts):
    # lean: images, parameters, their gradients; timm (depth 1) also the patch tokens both ways, the two
    # LayerNorm outputs, their gradients, and the gradients of fc2's and proj's outputs.
    s = rl.sizes(TINY, 2)
    fn = rl.SEQUENCES[seq]
    mixed, fp32 = fn(s), (fn(s, a=4) if seq == "lean" else fn(s, a=4, f=4))
    gone = [o for o in mixed if o.name not in {f.name for f in fp32}]
    assert len(mixed) - len(fp32) == len(gone) == casts, [o.name for o in gone]
    assert all(o.flops == 0 and "->" in o.name for o in gone)


@pytest.mark.parametrize("name", MODELS)
def test_lean_moves_no_more_than_timm(name):
    s = rl.sizes(name, 256)
    lean, timm = rl.lean_ops(s), rl.timm_ops(s)

    def per_block(ops):
        return sum(o.bytes for o in ops if o.count == s.L)

    assert per_block(lean) <= 0.6 * per_block(timm), (per_block(lean), per_block(timm))
    for dev in rl.DEVICES:
        assert rl.summarize(lean).bound_s[dev.name] < rl.summarize(timm).bound_s[dev.name]


def test_bounds_and_devices():
    h100, h200 = rl.DEVICES
    assert (h100.tflops, h100.tbps, h200.tflops, h200.tbps) == (989.0, 3.35, 989.0, 4.8)
    ops = _by_name(rl.lean_ops(rl.sizes("vit_base_patch16_224", 256)))
    attn, qkv, proj = ops["attention (flash)"], ops["ln_linear: norm1 + qkv GEMM"], ops["proj GEMM + bias + residual"]
    assert attn.bound(h100) == attn.bound(h200) == "memory"  # ~98 FLOP/B (shared/REFERENCES.md)
    assert 97 < attn.flops / attn.bytes < 99
    assert qkv.bound(h100) == qkv.bound(h200) == "compute"
    assert (proj.bound(h100), proj.bound(h200)) == ("memory", "compute")  # 255 FLOP/B: between the ridges
    assert attn.bound_s(h100) == pytest.approx(12 * attn.bytes / 3.35e12)
    assert qkv.bound_s(h100) == pytest.approx(12 * qkv.flops / 989e12)
    # The step can never beat its FLOPs at peak.
    sm = rl.summarize(list(ops.values()))
    assert sm.bound_s[h100.name] > sm.flops / 989e12


def test_doc_is_what_the_code_prints():
    assert DOC.read_text() == rl.render_doc(), (
        f"docs/roofline.md is stale: regenerate it with `{rl.COMMAND}`")
    text = DOC.read_text()
    assert "a MODEL, not a measurement" in text and rl.DATE in text and rl.COMMAND in text


def test_main_prints_one_model(capsys):
    rl.main(["--model", "vit_tiny_patch16_224", "--batch", "8"])
    out = capsys.readouterr().out
    assert "a MODEL, not a measurement" in out and "vit_tiny_patch16_224, batch 8, lean" in out
    rl.main(["--doc"])
    assert capsys.readouterr().out == DOC.read_text()
