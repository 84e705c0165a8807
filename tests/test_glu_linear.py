"""vitkernels.ops.glu_linear (h = act(x Wg^T + bg) * (x Wv^T + bv), the gated fc1 of SwiGLU / GEGLU / GLU
MLPs) on the fused backends against a float64 oracle: forward and every gradient, within 2x PyTorch's own error
in the same precision; finite; bit-identical reruns. Also gradient subsets, timm's packed fc1 (GluMlp /
SwiGLUPacked: the two halves of one (2H, C) Parameter as views, both gate orders), strided operands, opcheck
on packed views, torch.compile(fullgraph=True), and FlopCounterMode against the contract's formula.

Shapes: R = 197 and 2 * 197 + 1 = 395 rows, B = 1 leading dims, C = 72 (not a multiple of the 64-wide
interpreter tiles), H = 100 / 160; each activation appears in the case list (not their full product with the
shapes, to keep the interpreter run short).
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from oracle import DEVICE, DTYPES, FUSED, assert_budget, backend_params, require_backend
from vitkernels import ops
from vitkernels.backends import BackendError

BACKENDS = backend_params(*FUSED, op="glu_linear")
ACTS = ("silu", "gelu", "gelu_tanh", "sigmoid")
NAMES = ("x", "gate_weight", "gate_bias", "value_weight", "value_bias")

# (leading shape of x, C, H, activation, biases)
CASES = [
    ((197,), 72, 100, "silu", True),  # SwiGLU, N = 197 rows
    ((2 * 197 + 1,), 72, 160, "gelu", True),  # GEGLU, 395 rows: a partial last tile of rows
    ((1, 197), 72, 100, "gelu_tanh", False),  # B = 1, no biases
    ((1, 7), 72, 160, "sigmoid", True),  # GLU (GluMlp's default), B = 1, a few rows
]


def _case_id(case):
    lead, C, H, act, bias = case
    return f"{'x'.join(map(str, lead))}-{C}to{H}-{act}-{'b' if bias else 'nob'}"


def _inputs(lead, C, H, dtype, bias=True, device=DEVICE):
    x = torch.randn(*lead, C, device=device, dtype=dtype)
    wg, wv = ((torch.randn(H, C, device=device) / C**0.5).to(dtype) for _ in range(2))  # unit-variance outputs
    bg, bv = ((0.5 * torch.randn(H, device=device)).to(dtype) if bias else None for _ in range(2))
    return {"x": x, "gate_weight": wg, "gate_bias": bg, "value_weight": wv, "value_bias": bv}


def _run(backend, inputs, activation, dh):
    """Forward + backward of ops.glu_linear; returns {name: tensor} of h and every gradient."""
    leaves = {k: t.detach().clone().requires_grad_() for k, t in inputs.items() if t is not None}
    h = ops.glu_linear(*(leaves.get(k) for k in NAMES), activation=activation, backend=backend)
    got = torch.autograd.grad(h, list(leaves.values()), dh)
    return {"h": h.detach(), **{f"d{k}": g for k, g in zip(leaves, got)}}


def _check(backend, inputs, activation, dh=None, rerun=True):
    x, H = inputs["x"], inputs["gate_weight"].shape[0]
    dh = torch.randn(*x.shape[:-1], H, device=x.device, dtype=x.dtype) if dh is None else dh
    ours = _run(backend, inputs, activation, dh)
    lowp = _run("torch", inputs, activation, dh)
    oracle = _run("torch", {k: t.double() if t is not None else None for k, t in inputs.items()}, activation,
                  dh.double())
    assert set(ours) == set(oracle)
    for name in oracle:
        assert ours[name].dtype == x.dtype, f"{name}: dtype {ours[name].dtype} != {x.dtype}"
        assert_budget(name, ours[name], lowp[name], oracle[name])
    if rerun:
        again = _run(backend, inputs, activation, dh)
        for name in ours:
            assert torch.equal(ours[name], again[name]), f"{name}: rerun is not bit-identical"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_glu_linear(backend, dtype, case):
    lead, C, H, activation, bias = case
    _check(backend, _inputs(lead, C, H, dtype, bias=bias), activation, rerun=lead == (1, 7))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("wants", [("x",), ("gate_weight",), ("value_weight",), ("gate_bias", "value_bias"),
                                   ("x", "value_bias")], ids=lambda w: "+".join(w))
def test_glu_linear_gradient_subsets(backend, wants):
    """Only the inputs that require grad get a gradient, and it is right (the others' paths are skipped)."""
    inputs = _inputs((7,), 40, 24, torch.float32)
    for name in wants:
        inputs[name].requires_grad_()
    h = ops.glu_linear(*(inputs[k] for k in NAMES), activation="silu", backend=backend)
    dh = torch.randn_like(h)
    got = torch.autograd.grad(h, [inputs[n] for n in wants], dh)
    ref = {k: v.detach().double().requires_grad_() for k, v in inputs.items()}
    h_ref = ops.glu_linear(*(ref[k] for k in NAMES), activation="silu", backend="torch")
    expected = torch.autograd.grad(h_ref, [ref[n] for n in wants], dh.double())
    for name, g, e in zip(wants, got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gate_last", [True, False], ids=["GluMlp", "SwiGLUPacked"])
def test_glu_linear_packed_fc1(backend, gate_last):
    """timm's packed fc1 (GluMlp: gate_last=True, act(second half) * first half; SwiGLUPacked: gate_last=False):
    the halves of one (2H, C) Parameter passed as views give the module's output, and the gradients flow into
    the packed weight and bias."""
    from timm.layers.mlp import GluMlp

    C, H = 72, 50
    act_layer, act = (torch.nn.Sigmoid, "sigmoid") if gate_last else (torch.nn.SiLU, "silu")
    mlp = GluMlp(C, 2 * H, act_layer=act_layer, gate_last=gate_last).to(DEVICE)
    x = torch.randn(1, 197, C, device=DEVICE)
    fc1 = mlp.fc1

    def timm_fc1(x):  # GluMlp.forward up to fc2 (drop1 and norm are identities here)
        x1, x2 = fc1(x).chunk(2, dim=-1)
        return x1 * mlp.act(x2) if gate_last else mlp.act(x1) * x2

    g, v = (slice(H, None), slice(None, H)) if gate_last else (slice(None, H), slice(H, None))
    h = ops.glu_linear(x, fc1.weight[g], fc1.bias[g], fc1.weight[v], fc1.bias[v], activation=act, backend=backend)
    dh = torch.randn_like(h)
    got = torch.autograd.grad(h, [fc1.weight, fc1.bias], dh)
    h_ref = timm_fc1(x)
    expected = torch.autograd.grad(h_ref, [fc1.weight, fc1.bias], dh)
    torch.testing.assert_close(h, h_ref, rtol=1e-4, atol=1e-4)
    for name, a, b in zip(("dfc1.weight", "dfc1.bias"), got, expected):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_glu_linear_strided(backend):
    """Non-contiguous operands: x a (B, N, C) view transposed in B and N, weights transposed views, a stride-0
    output gradient."""
    B, N, C, H = 2, 7, 40, 24
    inputs = {
        "x": torch.randn(N, B, C, device=DEVICE).transpose(0, 1),
        "gate_weight": torch.randn(C, H, device=DEVICE).t(),
        "gate_bias": torch.randn(H, device=DEVICE),
        "value_weight": torch.randn(C, H, device=DEVICE).t(),
        "value_bias": None,
    }
    dh = torch.randn(1, 1, H, device=DEVICE).expand(B, N, H)
    _check(backend, inputs, "gelu", dh=dh)


@pytest.mark.parametrize("backend", BACKENDS)
def test_glu_linear_inference_and_empty(backend):
    """No grad: the same output; zero rows give an empty output and zero bias gradients."""
    inputs = _inputs((5,), 24, 40, torch.float32)
    with torch.no_grad():
        h = ops.glu_linear(*(inputs[k] for k in NAMES), activation="silu", backend=backend)
    h_ref = ops.glu_linear(*(inputs[k].double() for k in NAMES), activation="silu", backend="torch")
    torch.testing.assert_close(h.double(), h_ref, rtol=1e-5, atol=1e-5)
    leaves = {k: t.requires_grad_() for k, t in inputs.items()}
    leaves["x"] = leaves["x"][:0]
    empty = ops.glu_linear(*(leaves[k] for k in NAMES), activation="silu", backend=backend)
    assert empty.shape == (0, 40)
    grads = torch.autograd.grad(empty.sum(), [inputs[k] for k in NAMES[1:]])
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_glu_linear_validation():
    inputs = _inputs((5,), 8, 6, torch.float32)
    args = [inputs[k] for k in NAMES]
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.glu_linear(*args, activation="relu")
    with pytest.raises(ValueError, match="differ"):
        ops.glu_linear(args[0], args[1], args[2], args[3][:5], args[4])
    with pytest.raises(ValueError, match="x has 7 features but the weights expect 8"):
        ops.glu_linear(args[0][:, :7], *args[1:])
    with pytest.raises(ValueError, match=r"value_bias must be \(6,\)"):
        ops.glu_linear(*args[:4], args[4][:5])


@pytest.mark.parametrize("backend", BACKENDS)
def test_glu_linear_opcheck_packed_views(backend):
    """opcheck (schema, autograd registration, fake tensors, AOT dispatch) with weights that are views of one
    packed (2H, C) Parameter, as timm's GluMlp passes them."""
    ns = getattr(torch.ops, {"triton": "vitkernels_triton", "cuda": "vitkernels_C"}[backend])
    require_backend(backend, "glu_linear")
    fc1_weight = torch.randn(2 * 12, 16, device=DEVICE, requires_grad=True)
    fc1_bias = torch.randn(2 * 12, device=DEVICE, requires_grad=True)
    x = torch.randn(21, 16, device=DEVICE, requires_grad=True)
    args = (x, fc1_weight[:12], fc1_bias[:12], fc1_weight[12:], fc1_bias[12:], "sigmoid")
    torch.library.opcheck(ns.glu_linear_fwd.default, args)
    with torch.no_grad():
        h, g, v = ns.glu_linear_fwd.default(*(a.detach() if isinstance(a, torch.Tensor) else a for a in args))
    torch.library.opcheck(ns.glu_linear_bwd.default,
                          (torch.randn_like(h), x.detach(), fc1_weight[:12].detach(), fc1_weight[12:].detach(), g, v,
                           "sigmoid", [True, False, True, True, False]),
                          test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_glu_linear_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces a SwiGLU MLP (glu_linear, then fc2 on ops.linear's backend function)
    with no graph break and matches eager, forward and backward."""
    glu = require_backend(backend, "glu_linear").get_op("glu_linear")
    linear = require_backend(backend, "linear").get_op("linear")
    torch._dynamo.reset()

    def swiglu(x, wg, bg, wv, bv, w2, b2):
        return linear(glu(x, wg, bg, wv, bv, "silu"), w2, b2, None, x).square().sum()

    inputs = list(_inputs((2, 7), 24, 48, torch.float32).values())
    inputs += [torch.randn(24, 48, device=DEVICE) / 48**0.5, torch.randn(24, device=DEVICE)]
    inputs = [t.requires_grad_() for t in inputs]
    compiled = torch.compile(swiglu, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*inputs)
    grads_c = torch.autograd.grad(loss_c, inputs)
    loss_e = swiglu(*inputs)
    grads_e = torch.autograd.grad(loss_e, inputs)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("input_grad", [True, False], ids=["dx", "no_dx"])
def test_glu_linear_flops(backend, input_grad):
    """FlopCounterMode counts 4 R H C forward (two GEMMs) and, backward, 4 R H C for dx (two GEMMs) plus
    2 R H C per weight gradient, as it counts mm."""
    require_backend(backend, "glu_linear")
    R, C, H = 21, 16, 12
    inputs = _inputs((R,), C, H, torch.float32)
    for name, t in inputs.items():
        t.requires_grad_(name != "x" or input_grad)
    with FlopCounterMode(display=False) as counter:
        h = ops.glu_linear(*(inputs[k] for k in NAMES), activation="silu", backend=backend)
    assert counter.get_total_flops() == 4 * R * H * C
    with FlopCounterMode(display=False) as counter:
        h.backward(torch.ones_like(h))
    assert counter.get_total_flops() == (4 * input_grad + 2 + 2) * R * H * C


def test_glu_linear_auto_on_cpu_is_torch():
    """auto runs the reference on CPU tensors, as for every op; explicit backends state their limits."""
    inputs = _inputs((3,), 8, 6, torch.float32)
    h = ops.glu_linear(*(inputs[k] for k in NAMES), activation="gelu", backend="auto")
    assert h.shape == (3, 6)
    if DEVICE.type == "cpu":
        with pytest.raises(BackendError):
            ops.glu_linear(*(inputs[k].double() for k in NAMES), backend="triton")
