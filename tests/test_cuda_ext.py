"""The compiled extension (vitkernels._C or its JIT build): build description, registration, C++ argument
checks, torch.library.opcheck on the CPU twin, torch.compile(fullgraph=True), extension_info().

The per-op numerics against the float64 oracle live in tests/test_<op>.py (parametrized over backends); the
checks here are a quick fp32 sanity pass so a broken twin fails here too. The first run may JIT-build the
extension (minutes on a small CPU; cached afterwards in torch's extensions directory).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import vitkernels.cuda as vk_cuda
from vitkernels.cuda import build
from vitkernels.ops import reference

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MY_OPS = ("layer_norm", "linear", "patch_embed")  # attention's own file tests attention_{fwd,bwd}
DEVICE = torch.device("cuda" if torch.cuda.is_available() and vk_cuda.why_not_device("cuda") is None else "cpu")


@pytest.fixture(scope="module")
def ops():
    why = vk_cuda.why_unavailable()
    if why is not None:
        pytest.skip(f"cuda backend unavailable: {why}")
    build.load_extension()
    for name in MY_OPS:
        vk_cuda.get_op(name)  # imports vitkernels/cuda/<op>.py: fake and autograd registrations
    return torch.ops.vitkernels_C


# ---------------------------------------------------------------------------------------------------------
# Build description (no compiler needed)


def test_extension_kwargs_lists_sources_and_archs(monkeypatch):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
    kw = build.extension_kwargs(root=REPO, relative=True, with_cuda=True)
    cpp = sorted(f for f in os.listdir(os.path.join(REPO, "csrc")) if f.endswith(".cpp"))
    cu = sorted(f for f in os.listdir(os.path.join(REPO, "csrc")) if f.endswith(".cu"))
    assert kw["with_cuda"] is True
    assert kw["sources"] == [f"csrc/{f}" for f in cpp] + [f"csrc/{f}" for f in cu]
    assert {"csrc/module.cpp", "csrc/layer_norm_kernel.cu", "csrc/linear_kernel.cu"} <= set(kw["sources"])
    nvcc = kw["extra_compile_args"]["nvcc"]
    assert "-gencode=arch=compute_80,code=sm_80" in nvcc
    assert "-gencode=arch=compute_90a,code=sm_90a" in nvcc  # "9.0" builds the arch-specific sm_90a
    assert "-gencode=arch=compute_90,code=compute_90" in nvcc  # +PTX
    assert "-DVK_CUDA_ARCHS=80,90" in kw["extra_compile_args"]["cxx"]

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST")
    assert build.cuda_arch_list() == ["8.0", "9.0"]  # the default
    cpu_only = build.extension_kwargs(root=REPO, relative=False, with_cuda=False)
    assert cpu_only["with_cuda"] is False
    assert all(s.endswith(".cpp") and os.path.isabs(s) for s in cpu_only["sources"])
    assert not any("VK_CUDA_ARCHS" in f for f in cpu_only["extra_compile_args"]["cxx"])


def test_missing_toolchain_is_reported(monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "C++ compiler" in build.why_no_jit()


# ---------------------------------------------------------------------------------------------------------
# The built extension


def test_extension_info(ops):
    info = vk_cuda.extension_info()
    assert info["built"] is True and info["loaded"] is True
    assert os.path.exists(info["path"])
    assert isinstance(info["has_cuda"], bool)
    assert isinstance(info["archs"], list)
    assert info["has_cuda"] == bool(info["archs"])
    assert all(a.startswith(("sm_", "compute_")) for a in info["archs"])  # compiled_targets()
    assert info["why_unavailable"] is None
    assert vk_cuda.why_unavailable() is None
    assert vk_cuda.why_not_device(torch.device("cpu")) is None
    if not info["has_cuda"]:
        assert "without CUDA" in vk_cuda.why_not_device(torch.device("cuda"))


def test_ops_registered(ops):
    for name in MY_OPS:
        for suffix in ("fwd", "bwd"):
            assert hasattr(ops, f"{name}_{suffix}"), f"torch.ops.vitkernels_C.{name}_{suffix} missing"
    for name in MY_OPS:
        assert callable(vk_cuda.get_op(name))


# ---------------------------------------------------------------------------------------------------------
# Readable C++ errors on bad input, raised before any kernel runs


def _raises(match, fn, *args):
    with pytest.raises(RuntimeError, match=match):
        fn(*args)


def test_layer_norm_bad_inputs(ops):
    x = torch.randn(3, 8)
    w = torch.randn(8)
    _raises(r"vitkernels._C: x must be float32, float16 or bfloat16, got Int", ops.layer_norm_fwd,
            x.int(), None, None, 1e-6, None)
    _raises(r"weight has dtype Half but x has dtype Float", ops.layer_norm_fwd, x, w.half(), None, 1e-6, None)
    _raises(r"weight must have shape \[8\], got \[7\]", ops.layer_norm_fwd, x, w[:7], None, 1e-6, None)
    _raises(r"residual must have shape \[3, 8\]", ops.layer_norm_fwd, x, None, None, 1e-6, x[:2])
    _raises(r"x must be contiguous", ops.layer_norm_fwd, x.t(), None, None, 1e-6, None)
    _raises(r"eps must be positive", ops.layer_norm_fwd, x, None, None, 0.0, None)
    mean = torch.zeros(3)
    _raises(r"mean/rstd must be contiguous \(3,\)", ops.layer_norm_bwd, x, None, x, w, mean[:2], mean, True, False)
    _raises(r"mean/rstd must be float32", ops.layer_norm_bwd, x, None, x, w, mean.double(), mean, True, False)


def test_linear_bad_inputs(ops):
    x, w, b = torch.randn(4, 8), torch.randn(5, 8), torch.randn(5)
    _raises(r"x has 7 features but weight \(out, in\) has shape \[5, 8\]", ops.linear_fwd, x[:, :7].contiguous(),
            w, b, None, "none", False)
    _raises(r"weight has dtype BFloat16 but x has dtype Float", ops.linear_fwd, x, w.bfloat16(), b, None, "none",
            False)
    _raises(r"bias must have shape \[5\], got \[4\]", ops.linear_fwd, x, w, b[:4], None, "none", False)
    _raises(r"residual must have shape \[4, 5\]", ops.linear_fwd, x, w, b, torch.randn(4, 8), "gelu", True)
    _raises(r"weight must have 2 dims", ops.linear_fwd, x, w[None], b, None, "none", False)
    _raises(r"activation must be 'none', 'gelu', 'gelu_tanh', 'quick_gelu' or 'silu', got relu", ops.linear_fwd,
            x, w, b, None, "relu", False)
    _raises(r"grad_out must have shape \[4, 5\]", ops.linear_bwd, torch.randn(4, 4), x, w, None, "none", True, True,
            True)
    _raises(r"linear_bwd with an activation needs the saved pre-activation z", ops.linear_bwd, torch.randn(4, 5), x,
            w, None, "gelu", True, True, True)


def test_patch_embed_bad_inputs(ops):
    img, w = torch.randn(2, 3, 8, 8), torch.randn(6, 3, 4, 4)
    _raises(r"image size 8x8 is not divisible by the patch size 3", ops.patch_embed_fwd, img,
            torch.randn(6, 3, 3, 3), None, None, None)
    _raises(r"weight must be \(D, 3, P, P\)", ops.patch_embed_fwd, img, torch.randn(6, 2, 4, 4), None, None, None)
    _raises(r"images must be float32, float16 or bfloat16, got Double", ops.patch_embed_fwd, img.double(),
            w.double(), None, None, None)
    _raises(r"prefix_tokens must be \(1, R, 6\), got shape \[1, 6\]", ops.patch_embed_fwd, img, w, None, None,
            torch.randn(1, 6))
    _raises(r"prefix_tokens must have shape \[1, 2, 6\]", ops.patch_embed_fwd, img, w, None, None,
            torch.randn(2, 2, 6))
    _raises(r"pos_embed must be \(1, 4, 6\) for 4 patches", ops.patch_embed_fwd, img, w, None,
            torch.randn(1, 5, 6), None)  # N + 1 rows need a prefix token
    _raises(r"pos_embed must be \(1, 4 or 6, 6\) for 4 patches and 2 prefix tokens", ops.patch_embed_fwd, img, w,
            None, torch.randn(1, 5, 6), torch.randn(1, 2, 6))
    _raises(r"grad_out must have shape \[2, 4, 6\]", ops.patch_embed_bwd, torch.randn(2, 5, 6), img, w, 0, True,
            True)
    _raises(r"grad_out must have shape \[2, 6, 6\]", ops.patch_embed_bwd, torch.randn(2, 5, 6), img, w, 2, True,
            True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to mix devices")
def test_mixed_devices_rejected(ops):
    x = torch.randn(3, 8, device="cuda")
    _raises(r"weight is on cpu but x is on cuda", ops.layer_norm_fwd, x, torch.randn(8), None, 1e-6, None)
    _raises(r"weight is on cpu but x is on cuda", ops.linear_fwd, x, torch.randn(5, 8), None, None, "none", False)
    _raises(r"weight is on cpu but images is on cuda", ops.patch_embed_fwd, torch.randn(1, 3, 8, 8, device="cuda"),
            torch.randn(6, 3, 4, 4), None, None, None)


def _leaf(*shape, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype, device=DEVICE).requires_grad_()


# ---------------------------------------------------------------------------------------------------------
# Quick fp32 numerics of the twin (the full oracle tests are tests/test_<op>.py)


def _grads(fn, *inputs):
    out = fn(*inputs)
    out = out if isinstance(out, tuple) else (out,)
    torch.manual_seed(1)  # the same cotangents, drawn in float64, for our outputs and the reference's
    loss = sum((o * torch.randn(o.shape, dtype=torch.float64).to(o)).sum() for o in out)
    return out, torch.autograd.grad(loss, [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad])


def _compare(ours, ref, tol):
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == torch.float32
        assert torch.isfinite(a).all()
        err = (a.double() - b).abs().max().item()
        assert err <= tol * max(1.0, b.abs().max().item()), f"max error {err:.3e}"


def _check_against_reference(name, args, tol=2e-5):
    ours_out, ours_grads = _grads(vk_cuda.get_op(name), *args)
    ref_args = [a.detach().double().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
                for a in args]
    ref_out, ref_grads = _grads(reference.get_op(name), *ref_args)
    _compare(ours_out, ref_out, tol)
    _compare(ours_grads, ref_grads, tol)


def test_layer_norm_matches_reference(ops):
    _check_against_reference("layer_norm", [_leaf(3, 7, 50), _leaf(50), _leaf(50), 1e-6, _leaf(3, 7, 50)])
    _check_against_reference("layer_norm", [_leaf(5, 33), None, None, 1e-5, None])


def test_linear_matches_reference(ops):
    _check_against_reference("linear", [_leaf(2, 9, 40), _leaf(24, 40), _leaf(24), "gelu", _leaf(2, 9, 24)])
    _check_against_reference("linear", [_leaf(9, 40), _leaf(24, 40), None, None, None])


def test_patch_embed_matches_reference(ops):
    images = torch.randn(2, 8, 12, 3, device=DEVICE).permute(0, 3, 1, 2).requires_grad_()  # NHWC strides
    _check_against_reference("patch_embed", [images, _leaf(16, 3, 4, 4), _leaf(16), _leaf(1, 7, 16), _leaf(1, 1, 16)])
    _check_against_reference("patch_embed", [_leaf(1, 3, 8, 8), _leaf(16, 3, 4, 4), None, _leaf(1, 4, 16),
                                             _leaf(1, 1, 16)])


def test_half_precision_twin_and_bit_exact_rerun(ops):
    x = torch.randn(4, 13, 96, device=DEVICE, dtype=torch.float16)
    w = torch.randn(96, device=DEVICE, dtype=torch.float16)
    y1 = vk_cuda.get_op("layer_norm")(x, w, None, 1e-6, None)
    y2 = vk_cuda.get_op("layer_norm")(x, w, None, 1e-6, None)
    assert y1.dtype == torch.float16 and torch.equal(y1, y2)
    ref = F.layer_norm(x.double(), (96,), w.double(), None, 1e-6)
    assert (y1.double() - ref).abs().max().item() <= 2e-3 * ref.abs().max().item()


# ---------------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True) over the cuda-backend ops: fake implementations + autograd, no graph break


def test_torch_compile_fullgraph(ops):
    import vitkernels.ops as vk_ops

    def block(images, pw, pb, pos, cls, nw, nb, w1, b1, w2, b2):
        t = vk_ops.patch_embed(images, pw, pb, pos_embed=pos, cls_token=cls, backend="cuda")
        h = vk_ops.layer_norm(t, nw, nb, eps=1e-6, backend="cuda")
        h = vk_ops.linear(h, w1, b1, activation="gelu", backend="cuda")
        return vk_ops.linear(h, w2, b2, residual=t, backend="cuda")

    args = [_leaf(2, 3, 8, 8), _leaf(16, 3, 4, 4), _leaf(16), _leaf(1, 5, 16), _leaf(1, 1, 16), _leaf(16),
            _leaf(16), _leaf(32, 16), _leaf(32), _leaf(16, 32), _leaf(16)]
    torch._dynamo.reset()
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager", dynamic=False)
    eager_out, eager_grads = _grads(block, *args)  # eager first: the backend probe imports modules
    out, grads = _grads(compiled, *args)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(grads, eager_grads)
