"""One contract per op: every kernel backend registers the same schemas, and the shared fake, autograd and
FLOP formulas hold for each (torch.library.opcheck); ``auto`` is input-aware and its resolution is cached."""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import vitkernels
from oracle import DEVICE, backend_params
from vitkernels import backends, flops
from vitkernels.backends import OPS, BackendError, get_impl
from vitkernels.ops.contract import check_schema

NAMESPACES = {"triton": "vitkernels_triton", "cuda": "vitkernels_C"}
KERNEL_BACKENDS = tuple(NAMESPACES)


def _ns(backend: str, op: str):
    get_impl(backend).get_op(op)  # imports the op file, which binds the backend to the contract
    return getattr(torch.ops, NAMESPACES[backend])


def _leaf(*shape):
    return torch.randn(*shape, device=DEVICE).requires_grad_()


# Arguments of each op's forward (leaf tensors: opcheck also checks the autograd registration), and a function
# giving the backward's arguments from the forward's outputs. The same for every backend: one contract.
def _layer_norm_case(affine, residual):
    x, w, b = _leaf(2, 5, 24), _leaf(24) if affine else None, _leaf(24) if affine else None
    r = _leaf(2, 5, 24) if residual else None

    def bwd(out):
        y, s, mean, rstd = out
        g = torch.randn_like(y)
        return (g, g if residual else None, (s if residual else x).detach(), None if w is None else w.detach(),
                mean, rstd, affine, affine)

    return (x, w, b, 1e-5, r), bwd


def _linear_case(gelu, bias, residual):
    x, w = _leaf(21, 16), _leaf(12, 16)
    b, r = _leaf(12) if bias else None, _leaf(21, 12) if residual else None
    act = "gelu" if gelu else "none"

    def bwd(out):
        y, z = out
        return (torch.randn_like(y), x.detach(), w.detach(), z if gelu else None, act, True, True, bias)

    return (x, w, b, r, act, gelu), bwd


def _attention_case(bias):
    qkv = torch.randn(2, 19, 3, 2, 32, device=DEVICE)  # q, k, v as strided views of a fused qkv
    q, k, v = (t.transpose(1, 2).requires_grad_() for t in qkv.unbind(2))
    b = _leaf(1, 2, 19, 19) if bias else None  # BEiT's relative position bias: broadcast over the batch

    def bwd(out):
        o, lse = out
        return (torch.randn_like(o), q.detach(), k.detach(), v.detach(), None if b is None else b.detach(), o, lse,
                0.2, bias)

    return (q, k, v, b, 0.2), bwd


def _attention_qkv_case():
    qkv = _leaf(2, 19, 3 * 2 * 32)

    def bwd(out):
        o, lse = out
        return (torch.randn_like(o), qkv.detach(), o, lse, 2, 0.2)

    return (qkv, 2, 0.2), bwd


def _patch_embed_case(num_prefix, pos_rows):
    images = torch.randn(2, 8, 12, 3, device=DEVICE).permute(0, 3, 1, 2).requires_grad_()  # NHWC strides
    w, b = _leaf(10, 3, 4, 4), _leaf(10)
    N = (8 // 4) * (12 // 4)
    pos = None if pos_rows is None else _leaf(1, N + num_prefix if pos_rows == "N+K" else N, 10)
    c = _leaf(1, num_prefix, 10) if num_prefix else None

    def bwd(out):
        return (torch.randn_like(out), images.detach(), w.detach(), num_prefix, True, True)

    return (images, w, b, pos, c), bwd


def _ln_linear_case(affine, bias):
    x, w = _leaf(21, 16), _leaf(12, 16)
    lw, lb = (_leaf(16), _leaf(16)) if affine else (None, None)
    b = _leaf(12) if bias else None

    def bwd(out):
        y, mean, rstd = out
        mask = [True, affine, affine, True, bias]
        return (torch.randn_like(y), x.detach(), None if lw is None else lw.detach(),
                None if lb is None else lb.detach(), mean, rstd, w.detach(), mask)

    return (x, lw, lb, 1e-5, w, b), bwd


def _ln_mlp_case(affine, bias, add_input, activation="gelu"):
    x, w1, w2 = _leaf(21, 16), _leaf(40, 16), _leaf(16, 40)
    lw, lb = (_leaf(16), _leaf(16)) if affine else (None, None)
    b1, b2 = (_leaf(40), _leaf(16)) if bias else (None, None)

    def bwd(out):
        y, z, mean, rstd = out
        mask = [True, affine, affine, True, bias, True, bias]
        return (torch.randn_like(y), x.detach(), None if lw is None else lw.detach(),
                None if lb is None else lb.detach(), mean, rstd, w1.detach(), w2.detach(), z, add_input, activation,
                mask)

    return (x, lw, lb, 1e-5, w1, b1, w2, b2, add_input, activation), bwd


def _glu_linear_case(bias, activation):
    x, wg, wv = _leaf(21, 16), _leaf(12, 16), _leaf(12, 16)
    bg, bv = (_leaf(12), _leaf(12)) if bias else (None, None)

    def bwd(out):
        h, g, v = out
        return (torch.randn_like(h), x.detach(), wg.detach(), wv.detach(), g, v, activation,
                [True, True, bias, True, bias])

    return (x, wg, bg, wv, bv, activation), bwd


def _ln_glu_mlp_case(affine, bias, add_input, activation):
    x, wg, wv, w2 = _leaf(21, 16), _leaf(40, 16), _leaf(40, 16), _leaf(16, 40)
    lw, lb = (_leaf(16), _leaf(16)) if affine else (None, None)
    bg, bv, b2 = (_leaf(40), _leaf(40), _leaf(16)) if bias else (None, None, None)

    def bwd(out):
        y, g, v, mean, rstd = out
        mask = [True, affine, affine, True, bias, True, bias, True, bias]
        return (torch.randn_like(y), x.detach(), None if lw is None else lw.detach(),
                None if lb is None else lb.detach(), mean, rstd, wg.detach(), wv.detach(), w2.detach(), g, v,
                add_input, activation, mask)

    return (x, lw, lb, 1e-5, wg, bg, wv, bv, w2, b2, add_input, activation), bwd


def _rope_case(half):
    qkv = torch.randn(2, 9, 3, 2, 8, device=DEVICE)  # q, k as strided views of a fused qkv, 1 prefix token
    q, k = (t.transpose(1, 2).requires_grad_() for t in qkv.unbind(2)[:2])
    sin, cos = torch.randn(8, 16, device=DEVICE).chunk(2, -1)  # views of one (T - 1, 2 D) table

    def bwd(out):
        return (torch.randn_like(out[0]), torch.randn_like(out[1]), sin, cos, 1, half)

    return (q, k, sin, cos, 1, half), bwd


CASES = {
    "layer_norm": [(_layer_norm_case, (True, True)), (_layer_norm_case, (False, False))],
    "linear": [(_linear_case, (True, True, True)), (_linear_case, (False, False, False))],
    "attention": [(_attention_case, (False,)), (_attention_case, (True,))],
    "attention_qkv": [(_attention_qkv_case, ())],
    "patch_embed": [(_patch_embed_case, (1, "N+K")), (_patch_embed_case, (0, None)), (_patch_embed_case, (2, "N"))],
    "ln_linear": [(_ln_linear_case, (True, True)), (_ln_linear_case, (False, False))],
    "ln_mlp": [(_ln_mlp_case, (True, True, True)), (_ln_mlp_case, (False, False, False, "quick_gelu"))],
    "glu_linear": [(_glu_linear_case, (True, "silu")), (_glu_linear_case, (False, "sigmoid"))],
    "ln_glu_mlp": [(_ln_glu_mlp_case, (True, True, True, "silu")),
                   (_ln_glu_mlp_case, (False, False, False, "sigmoid"))],
    "rope": [(_rope_case, (False,)), (_rope_case, (True,))],
}
# test_aot_dispatch_dynamic costs seconds per call on a small CPU: the first case of each op runs it.
FULL = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
QUICK = ("test_schema", "test_autograd_registration", "test_faketensor")
BWD = ("test_schema", "test_faketensor")  # the backward ops have no autograd of their own


def test_one_op_list():
    assert set(CASES) == set(OPS) == set(vitkernels.ops.__all__)
    for name in backends.CONCRETE:
        assert all(get_impl(name).get_op(op) is not None for op in OPS), name


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", backend_params(*KERNEL_BACKENDS))
def test_opcheck(backend, op):
    ns = _ns(backend, op)
    fwd, bwd = getattr(ns, f"{op}_fwd").default, getattr(ns, f"{op}_bwd").default
    for i, (make, params) in enumerate(CASES[op]):
        torch.manual_seed(i)
        args, bwd_args = make(*params)
        torch.library.opcheck(fwd, args, test_utils=FULL if i == 0 else QUICK)
        with torch.no_grad():
            out = fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
        torch.library.opcheck(bwd, bwd_args(out), test_utils=BWD)


@pytest.mark.parametrize("op", OPS)
def test_every_backend_has_the_contracts_schemas(op):
    from importlib import import_module

    contract = import_module(f"vitkernels.ops.{op}").CONTRACT
    for backend in KERNEL_BACKENDS:
        if backends.why_not(backend) is None:
            _ns(backend, op)
            assert NAMESPACES[backend] in contract.namespaces
    for which, schema in (("fwd", contract.fwd_schema), ("bwd", contract.bwd_schema)):
        for ns in contract.namespaces:  # check_schema raises on any difference of names, types or outputs
            check_schema(f"{ns}::{op}_{which}", f"{op}_{which}{schema}")


# ---------------------------------------------------------------------------------------------------------
# FlopCounterMode counts the same FLOPs for a training step on every backend, equal to flops.count.
@pytest.mark.parametrize("qkv_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("input_grad", [False, True], ids=["no_input_grad", "input_grad"])
@pytest.mark.parametrize("backend", backend_params("torch", *KERNEL_BACKENDS))
def test_training_step_flops_agree(backend, qkv_bias, input_grad):
    model = vitkernels.VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3,
                                         num_classes=5, qkv_bias=qkv_bias, backend=backend).to(DEVICE)
    images = torch.randn(2, 3, 32, 32, device=DEVICE, requires_grad=input_grad)
    # SDPA's math path for the torch backend: FlopCounterMode has no formula for the CPU flash kernel.
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        model(images).sum().backward()
    counted = counter.get_total_flops()
    # flops.count's training step is 3x the forward (model FLOPs). FlopCounterMode counts what ran: without an
    # image gradient the patch embedding's backward is its weight gradient alone (2x, not 3x).
    expected = flops.count(model, batch_size=2, training=True).total
    if not input_grad:
        expected -= flops.count(model, batch_size=2).by_part["patch_embed"]
    assert abs(counted - expected) <= 0.01 * expected, (backend, counted, expected)


# ---------------------------------------------------------------------------------------------------------
# auto is input-aware: a backend whose kernel cannot take the inputs is passed over, with the reason recorded.
def test_auto_falls_back_when_a_kernel_cannot_take_the_inputs(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setattr(backends, "_RESOLVED", {})
    monkeypatch.setattr(backends, "_FALLBACKS", {})
    cuda = torch.device("cuda")  # only resolved, never launched: the device need not exist
    monkeypatch.setitem(backends._PROBED, "cuda", (None, "no CUDA kernels (test)"))
    if backends.why_not("triton", cuda) is not None:
        pytest.skip(backends.why_not("triton", cuda))
    name, _ = backends.resolve("layer_norm", "auto", cuda, torch.float32, (768,))
    assert name == "triton"
    name, _ = backends.resolve("layer_norm", "auto", cuda, torch.float32, (20000,))
    assert name == "torch"
    assert "widths up to 16384" in backends.last_fallbacks()["layer_norm"]["triton"]
    # Triton attention puts B * H on CUDA grid axis 0 (2^31 - 1): ViT-B inference at batch 5,462 (B * H past
    # axis 1's 65,535) stays on triton; past 2^31 - 1 it falls back.
    assert backends.resolve("attention", "auto", cuda, torch.float16, (64, 5462 * 12))[0] == "triton"
    assert backends.resolve("attention", "auto", cuda, torch.float16, (64, 2**31))[0] == "torch"
    assert "grid axis 0" in backends.last_fallbacks()["attention"]["triton"]
    with pytest.raises(BackendError, match=r"widths up to 16384.*All backends: triton: .*torch: ok"):
        backends.resolve("layer_norm", "triton", cuda, torch.float32, (20000,))


def test_explicit_backend_beyond_its_kernel_raises():
    if backends.why_not("triton", DEVICE) is not None:
        pytest.skip(backends.why_not("triton", DEVICE))
    x = torch.randn(2, 16385, device=DEVICE)
    with pytest.raises(BackendError, match="widths up to 16384"):
        vitkernels.ops.layer_norm(x, None, None, backend="triton")
    assert vitkernels.ops.layer_norm(x, None, None, backend="auto").shape == x.shape


def test_resolution_is_cached(monkeypatch):
    monkeypatch.setattr(backends, "_RESOLVED", {})
    calls = []
    slow = backends._resolve
    monkeypatch.setattr(backends, "_resolve", lambda *a: calls.append(a) or slow(*a))
    x, w = torch.randn(3, 8), torch.randn(4, 8)
    for _ in range(3):
        vitkernels.ops.linear(x, w, backend="torch")
    assert len(calls) == 1
