"""``ops.ln_glu_mlp`` (norm2 -> gated fc1 -> fc2 [+ x] as one op) against a float64 oracle.

Forward and every gradient within 2x PyTorch's own error in the same precision (tests/oracle.py), finite,
bit-identical reruns; N = 197 / 257 / 1 rows, odd widths, each gate activation, LayerNorm with and without
affine parameters, biases on and off, add_input on and off, gradient subsets; what the op saves for backward
(x, g, v, mean, rstd: C + 2 H values per token, never LN(x) or h); FLOPs as FlopCounterMode counts them.
The oracle harness is test_fused_blocks.py's (the ln_mlp tests), reused.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from oracle import DEVICE, DTYPES, FUSED, assert_budget, backend_params, require_backend
from test_fused_blocks import _check, _grads, _ln_params, _weight
from vitkernels import ops

BACKENDS = backend_params(*FUSED, op="ln_glu_mlp")
EPS = 1e-6


def _ln_glu_mlp(add_input, activation="silu"):
    def fn(backend, x, ln_weight, ln_bias, gate_weight, gate_bias, value_weight, value_bias, fc2_weight, fc2_bias):
        return ops.ln_glu_mlp(x, ln_weight, ln_bias, gate_weight, gate_bias, value_weight, value_bias, fc2_weight,
                              fc2_bias, eps=EPS, add_input=add_input, activation=activation, backend=backend)

    return fn


def _tensors(lead, C, H, dtype, affine=True, bias=True):
    lw, lb = _ln_params(C, dtype, affine)
    bias_of = lambda n: (0.5 * torch.randn(n, device=DEVICE)).to(dtype) if bias else None  # noqa: E731
    return dict(x=(torch.randn(*lead, C, device=DEVICE) * 2 + 0.5).to(dtype), ln_weight=lw, ln_bias=lb,
                gate_weight=_weight(H, C, dtype), gate_bias=bias_of(H), value_weight=_weight(H, C, dtype),
                value_bias=bias_of(H), fc2_weight=_weight(C, H, dtype), fc2_bias=bias_of(C))


# (leading shape, C, H, LN affine, biases, add_input, activation): every activation, each flag both ways.
CASES = [
    ((1, 197), 40, 96, True, True, True, "silu"),
    ((257,), 72, 160, True, False, False, "gelu"),
    ((1,), 72, 96, False, True, True, "gelu_tanh"),
    ((197,), 40, 160, False, False, True, "sigmoid"),
    ((3, 7), 40, 96, True, True, False, "silu"),
]


def _id(case):
    lead, C, H, affine, bias, add, act = case
    return (f"{'x'.join(map(str, lead))}-{C}x{H}-{'aff' if affine else 'noaff'}-{'b' if bias else 'nob'}-"
            f"{'add' if add else 'noadd'}-{act}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_ln_glu_mlp(backend, dtype, case):
    lead, C, H, affine, bias, add, act = case
    _check(_ln_glu_mlp(add, act), _tensors(lead, C, H, dtype, affine, bias), backend,
           rerun=lead in ((1,), (3, 7)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["silu", "gelu", "gelu_tanh", "sigmoid"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ln_glu_mlp_activations(backend, activation, dtype):
    """Each gate activation through the whole op, N = 197 rows, odd widths, residual on, every gradient."""
    _check(_ln_glu_mlp(True, activation), _tensors((1, 197), 40, 96, dtype), backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wants", [("x",), ("fc2_weight", "fc2_bias"), ("gate_weight", "value_bias"),
                                   ("ln_weight", "value_weight")], ids=lambda w: "+".join(w))
def test_ln_glu_mlp_gradient_subsets(backend, wants):
    """Only the asked-for gradients are computed (the mask), and they are the full op's."""
    t = _tensors((9,), 24, 40, torch.float32)
    fn = _ln_glu_mlp(True)
    full = _check(fn, t, backend)
    leaves = {k: v.detach().clone().requires_grad_(k in wants) for k, v in t.items()}
    y = fn(backend, **leaves)
    got = torch.autograd.grad(y, [leaves[k] for k in wants], torch.ones_like(y))
    ref = _grads(lambda **a: fn(backend, **a), t, torch.ones_like(y))
    for k, g in zip(wants, got):
        torch.testing.assert_close(g, ref[f"d{k}"], rtol=1e-5, atol=1e-6, msg=lambda m: f"d{k}: {m}")
    assert set(full) >= {f"d{k}" for k in wants}


@pytest.mark.parametrize("backend", BACKENDS)
def test_ln_glu_mlp_strided_and_packed(backend):
    """x a (B, N, C) view transposed in B and N; gate and value weights the two halves of one packed (2H, C)
    fc1 weight (timm's GluMlp / SwiGLUPacked), whose gradient autograd assembles; fc2 a transposed view; a
    stride-0 output gradient."""
    B, N, C, H = 2, 7, 24, 40
    t = _tensors((B, N), C, H, torch.float32)
    t["x"] = torch.randn(N, B, C, device=DEVICE).transpose(0, 1)
    t["fc2_weight"] = torch.randn(H, C, device=DEVICE).t() / H**0.5
    fc1 = torch.randn(2 * H, C, device=DEVICE) / C**0.5
    _check(_ln_glu_mlp(True), dict(t, gate_weight=fc1[:H], value_weight=fc1[H:]), backend,
           dy=torch.randn(1, 1, C, device=DEVICE).expand(B, N, C))
    packed = fc1.clone().requires_grad_()
    leaves = {k: v for k, v in t.items() if k not in ("gate_weight", "value_weight")}
    for which in ("torch", backend):
        packed.grad = None
        _ln_glu_mlp(True)(which, gate_weight=packed[H:], value_weight=packed[:H], **leaves).sum().backward()
        if which == "torch":
            ref = packed.grad
    torch.testing.assert_close(packed.grad, ref, rtol=1e-4, atol=1e-5)


# Autocast: an fp32 residual stream (fp32 x) with low-precision parameters. The C++ CPU twin has no fp16
# kernels, so the cuda backend joins on a GPU only (as in test_fused_blocks.py).
AMP_DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
AMP_BACKENDS = backend_params(*(FUSED if DEVICE.type == "cuda" else ("triton",)), op="ln_glu_mlp")


@pytest.mark.parametrize("backend", AMP_BACKENDS)
def test_ln_glu_mlp_fp32_input_under_autocast(backend):
    """Under autocast an fp32 x stays fp32: LayerNorm in fp32, the GEMMs in the autocast dtype, the residual
    add in fp32 (fp32 output); every gradient within 2x of PyTorch's autocast error."""
    t = _tensors((2, 33), 24, 40, torch.float32)

    def run(backend, tensors, amp):
        with torch.autocast(DEVICE.type, dtype=AMP_DTYPE, enabled=amp):
            return _ln_glu_mlp(True)(backend, **tensors)

    dy = torch.randn(run("torch", t, False).shape, device=DEVICE)
    ours = _grads(lambda **a: run(backend, a, True), t, dy)
    lowp = _grads(lambda **a: run("torch", a, True), t, dy)
    oracle = _grads(lambda **a: run("torch", a, False), {k: v.double() for k, v in t.items()}, dy.double())
    assert ours["y"].dtype == torch.float32
    for name in oracle:
        assert name == "y" or ours[name].dtype == torch.float32, name  # gradients of the fp32 leaves
        assert_budget(name, ours[name], lowp[name], oracle[name], floor=1e-3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ln_glu_mlp_inference_and_empty(backend):
    t = _tensors((5,), 24, 40, torch.float32)
    with torch.no_grad():
        y = _ln_glu_mlp(True)(backend, **t)
        ref = _ln_glu_mlp(True)("torch", **{k: v.double() for k, v in t.items()})
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        assert _ln_glu_mlp(True)(backend, **dict(t, x=t["x"][:0])).shape == (0, 24)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ln_glu_mlp_saves_x_g_v_and_statistics(backend, dtype):
    """Saved for backward besides the parameters: x (R, C), g and v (R, H), fp32 mean and rstd (R,) -- C + 2 H
    values per token; nothing else of R x H (no h) and no LN(x)."""
    R, C, H = 197, 40, 96
    t = _tensors((1, R), C, H, dtype)
    leaves = {k: v.requires_grad_() for k, v in t.items() if v is not None}
    params = {v.untyped_storage().data_ptr() for k, v in leaves.items() if k != "x"}
    saved = []

    def pack(s):
        if s.untyped_storage().data_ptr() not in params:
            saved.append(s)
        return s

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda s: s):
        y = _ln_glu_mlp(True)(backend, **leaves)
    kinds = sorted((tuple(s.shape), s.dtype) for s in saved)
    want = sorted([((R, C), dtype), ((R, H), dtype), ((R, H), dtype), ((R,), torch.float32),
                   ((R,), torch.float32)])
    assert kinds == want, kinds
    assert any(s.data_ptr() == leaves["x"].data_ptr() for s in saved)  # x itself, not a copy
    y.sum().backward()  # the saved tensors are enough for every gradient


@pytest.mark.parametrize("backend", BACKENDS)
def test_ln_glu_mlp_flops(backend):
    """FlopCounterMode counts the contract's formula: forward 2 R (2 H C + O H), a full backward twice that,
    the same as the torch reference's GEMMs."""
    R, C, H = 13, 24, 40
    t = _tensors((R,), C, H, torch.float32)
    counts = {}
    for name in ("torch", backend):
        leaves = {k: v.detach().clone().requires_grad_() for k, v in t.items()}
        with FlopCounterMode(display=False) as counter:
            _ln_glu_mlp(True)(name, **leaves).sum().backward()
        counts[name] = counter.get_total_flops()
    assert counts[backend] == counts["torch"] == 3 * 2 * R * (2 * H * C + C * H)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ln_glu_mlp_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the op (no graph break) and matches eager."""
    op = require_backend(backend, "ln_glu_mlp").get_op("ln_glu_mlp")
    torch._dynamo.reset()

    def mlp_half(x, lw, lb, wg, bg, wv, bv, w2, b2):
        return op(x, lw, lb, EPS, wg, bg, wv, bv, w2, b2, True, "silu").square().sum()

    inputs = [v.requires_grad_() for v in _tensors((2, 7), 24, 48, torch.float32).values()]
    loss_c = torch.compile(mlp_half, fullgraph=True, backend="aot_eager")(*inputs)
    grads_c = torch.autograd.grad(loss_c, inputs)
    loss_e = mlp_half(*inputs)
    grads_e = torch.autograd.grad(loss_e, inputs)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


def test_ln_glu_mlp_rejects_bad_inputs():
    t = _tensors((3,), 8, 16, torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.ln_glu_mlp(*t.values(), activation="quick_gelu", backend="torch")
    with pytest.raises(ValueError, match="differ"):
        ops.ln_glu_mlp(*dict(t, value_weight=t["value_weight"][:8]).values(), backend="torch")
    with pytest.raises(ValueError, match="add_input"):
        ops.ln_glu_mlp(*dict(t, fc2_weight=t["fc2_weight"][:5], fc2_bias=None).values(), add_input=True,
                       backend="torch")
