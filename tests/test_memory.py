"""vitkernels/experiments/memory.py: the counting on hand-checkable cases, then the targets of issue #14.

Saved bytes, peak and traffic are counted under FakeTensorMode (no compute), so even ViT-B/16 at batch 256
takes a second or two. The target tests compare the triton backend with timm eager at ViT-B/16 shapes.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from optional import requires
from vitkernels.experiments import bench, memory

F32 = 4  # bytes per fp32 value
TINY = dict(img_size=32, patch_size=8, in_chans=3, num_classes=10, embed_dim=32, depth=2, num_heads=2)
VIT_B = dict(img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768, depth=12, num_heads=12)
CPU = torch.device("cpu")


def _vit_b(depth):
    return dict(VIT_B, depth=depth)


# -- saved for backward: hand-checkable ----------------------------------------------------------------------
def test_linear_gelu_saved_bytes_by_hand():
    """Linear saves its input (the weight is a parameter), GELU saves its input (the Linear's output)."""
    model = nn.Sequential(nn.Linear(7, 13), nn.GELU())
    x = torch.randn(5, 7)
    assert memory.saved_bytes(model, x) == (5 * 7 + 5 * 13) * F32


def test_views_of_one_storage_count_once():
    """q, k, v as chunks of one buffer (as attention keeps them) are one storage, counted with its full size."""

    class Chunks(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3 * 6, bias=False)

        def forward(self, x):
            q, k, v = self.lin(x).chunk(3, dim=-1)  # views of one (B, 18) buffer
            return q * k * v  # each mul saves two views

    x = torch.randn(5, 4)
    # saved: x (by the Linear), the (5, 18) buffer (q, k, v: one storage), q * k (a new buffer, 5 x 6)
    assert memory.saved_bytes(Chunks(), x) == (5 * 4 + 5 * 18 + 5 * 6) * F32


def test_parameters_and_their_views_are_excluded():
    class Scale(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 6))

        def forward(self, x):
            return (x * self.w) @ self.w.t()  # mul saves w; mm saves w.t(), a view of a parameter

    x = torch.randn(6, 6)
    assert memory.saved_bytes(Scale(), x) == (6 * 6 + 6 * 6) * F32  # x, and x * w


def test_block_attribution_equals_depth_difference():
    """What the hooks attribute to one block is what one more block adds to the whole forward."""
    with FakeTensorMode() as mode:
        one = memory.fake_model("vitkernels-torch", dict(TINY, depth=1), mode, CPU)
        two = memory.fake_model("vitkernels-torch", dict(TINY, depth=2), mode, CPU)
        x = torch.randn(3, 3, 32, 32)
        blocks = memory.block_saved_bytes(two, x)
        diff = memory.saved_bytes(two, x) - memory.saved_bytes(one, x)
    assert blocks[0] == blocks[1] == diff > 0


def test_fake_mode_counts_what_real_tensors_save():
    torch.manual_seed(0)
    real = memory.build("vitkernels-torch", TINY)
    x = torch.randn(3, 3, 32, 32)
    with FakeTensorMode() as mode:
        fake = memory.fake_model("vitkernels-torch", TINY, mode, CPU)
        fake_bytes = memory.block_saved_bytes(fake, torch.randn(3, 3, 32, 32))
    assert memory.block_saved_bytes(real, x) == fake_bytes


def test_flash_sdpa_keeps_no_attention_matrix():
    """On fake CUDA tensors SDPA falls back to math (keeps the (B, H, N, N) probabilities); flash_sdpa models
    the fused kernel a GPU runs, which keeps (out, lse). A forward needs no GPU, even on fake CUDA tensors."""

    class SelfAttention(nn.Module):
        def forward(self, qkv):  # (3, B, H, N, D) -> (B, H, N, D)
            return F.scaled_dot_product_attention(*qkv.unbind(0))

    B, H, N, D = 2, 3, 50, 16
    for dtype in (torch.bfloat16, torch.float32):  # flash, memory-efficient kernel
        size = dtype.itemsize
        with FakeTensorMode():
            qkv = torch.randn(3, B, H, N, D, device="cuda", dtype=dtype, requires_grad=True)
            math_path = memory.saved_bytes(SelfAttention(), qkv)
            with memory.flash_sdpa():
                fused = memory.saved_bytes(SelfAttention(), qkv)
        assert math_path - fused >= B * H * N * N * size, dtype  # at least the probabilities
        # qkv (one storage), out, fp32 lse (the efficient kernel pads N to 32), rng state
        assert 4 * B * H * N * D * size + B * H * N * F32 <= fused <= 4 * B * H * N * D * size + B * H * 64 * F32 + 64


# -- peak and traffic --------------------------------------------------------------------------------------
def test_estimate_peak_positive_and_grows_with_batch():
    small = memory.estimate_peak("vitkernels-torch", TINY, batch=2, amp="fp32", device=CPU)
    large = memory.estimate_peak("vitkernels-torch", TINY, batch=8, amp="fp32", device=CPU)
    params = sum(p.numel() for p in memory.build("vitkernels-torch", TINY).parameters()) * F32
    # fp32 AdamW: parameters, gradients and two moments are live at the peak
    assert 4 * params <= small["peak"] < large["peak"]
    assert 0 < small["activations"] < large["activations"]
    assert large["flops"] == 4 * small["flops"] > 0


def test_traffic_of_a_linear_by_hand():
    """addmm reads x, W, b and writes y; the transpose of W is a view and moves nothing."""
    lin, x = nn.Linear(7, 13), torch.randn(5, 7)
    with torch.no_grad(), memory.Traffic() as traffic:
        lin(x)
    assert dict(traffic.by_op) == {"aten.addmm": (5 * 7 + 13 * 7 + 13 + 5 * 13) * F32}


def test_traffic_per_image_is_a_slope():
    r = memory.traffic_per_image("vitkernels-torch", TINY, batches=(2, 4), device=CPU)
    assert r["per_image"] > 0 and r["intercept"] > 0
    assert r["totals"]["4"] - r["totals"]["2"] == pytest.approx(2 * r["per_image"])


def test_checkpointing_trades_memory_for_flops():
    rows = {how: memory.estimate_peak("vitkernels-torch", TINY, batch=4, amp="fp32", checkpointing=how,
                                      device=CPU) for how in ("none", "full")}
    assert rows["full"]["activations"] < rows["none"]["activations"]
    assert rows["full"]["flops"] > rows["none"]["flops"]
    try:
        selective = memory.estimate_peak("vitkernels-torch", TINY, batch=4, amp="fp32", checkpointing="selective",
                                         device=CPU)
    except TypeError as exc:
        pytest.skip(f"selective checkpointing not implemented: {exc}")
    assert selective["activations"] <= rows["none"]["activations"]
    assert rows["none"]["flops"] <= selective["flops"] <= rows["full"]["flops"]


def test_bench_memory_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "memory.json"
    argv = ["--memory", "--model", "vit_tiny_patch16_224", "--img-size", "32", "--patch-size", "8", "--depth", "2",
            "--embed-dim", "32", "--num-heads", "2", "--batch-size", "4", "--providers", "vitkernels-torch",
            "--out", str(out)]
    assert bench.main(argv) == 0
    rep = json.loads(out.read_text())
    assert rep["report"] == "memory" and {"device", "commit", "versions"} <= set(rep)
    for section in ("saved", "peak", "traffic"):
        (row,) = rep[section]["rows"]
        assert row["provider"] == "vitkernels-torch" and row["skipped"] is None, row
        assert rep[section]["ran"]
    assert rep["peak"]["rows"][0]["peak"] > 0 and rep["peak"]["batch_size"] == 4
    printed = capsys.readouterr().out
    assert "saved for backward" in printed and "vitkernels-torch" in printed
    assert bench.main(argv[:-2] + ["--providers", "timm-compile"]) == 2
    assert "--memory covers" in capsys.readouterr().err


# -- issue #14's figures and targets, at ViT-B/16 shapes -----------------------------------------------------
def _need_triton():
    why = memory._skip_reason("vitkernels-triton")
    if why is not None:
        pytest.skip(f"the triton backend cannot be modelled here: {why}")


@requires("timm")
def test_timm_block_keeps_the_issue_figure():
    """ViT-B/16, batch 2, fp32: 16 C per token + LayerNorm mean/rstd + attention lse = 19,391,104 bytes per
    block (the issue's reference), counted on real CPU tensors and under fake mode alike."""
    expected = 2 * 197 * (16 * 768 + 2 * 2) * F32 + 2 * 12 * 197 * F32
    assert expected == 19_391_104
    torch.manual_seed(0)
    real = memory.block_saved_bytes(memory.build("timm-eager", _vit_b(1)), torch.randn(2, 3, 224, 224))
    assert real == [expected]
    assert memory.provider_saved_bytes("timm-eager", _vit_b(2), batch=2, device=CPU)["blocks"] == [expected] * 2


def _ratio(what, fn, budget):
    timm, ours = fn("timm-eager"), fn("vitkernels-triton")
    ratio = ours / timm
    print(f"{what}: vitkernels-triton {ours:,.0f} vs timm eager {timm:,.0f} -> {ratio:.3f}x (target <= {budget}x)")
    assert ratio <= budget, f"{what}: {ratio:.3f}x timm eager, target <= {budget}x"


@requires("timm")
def test_target_saved_bytes_per_block():
    _need_triton()
    _ratio("saved bytes per block (ViT-B/16, batch 2, fp32)",
           lambda p: memory.provider_saved_bytes(p, _vit_b(2), batch=2, amp="fp32")["per_block"], 0.65)


@requires("timm")
def test_target_peak_estimate():
    _need_triton()
    _ratio("estimated peak (ViT-B/16, depth 12, batch 256, bf16)",
           lambda p: memory.estimate_peak(p, VIT_B, batch=256, amp="bf16")["peak"], 0.62)


@requires("timm")
def test_target_traffic_per_image():
    _need_triton()
    _ratio("traffic per image (ViT-B/16, depth 2, fp32)",
           lambda p: memory.traffic_per_image(p, _vit_b(2), batches=(2, 4), amp="fp32")["per_image"], 0.55)
