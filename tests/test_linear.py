"""vitkernels.ops.linear (y = act(x W^T + b) + residual) on the fused backends against a float64 oracle:
forward and every gradient (x, weight, bias, residual), within 2x PyTorch's own error in the same precision;
finite; bit-identical reruns (no atomics). Also non-contiguous inputs and gradients, gradient subsets,
opcheck, torch.compile(fullgraph=True) and a hypothesis property test over shapes.

The epilogue variants (no act / GELU) x (bias / none) x (residual / none) are covered by a list of cases
rather than their cartesian product with the shapes, to keep the interpreter run short.
"""

from __future__ import annotations

import pytest
import torch

from oracle import DEVICE, DTYPES, FUSED, assert_budget, backend_params, require_backend
from vitkernels import ops
from optional import hypothesis_api

given, settings, st = hypothesis_api()

BACKENDS = backend_params(*FUSED, op="linear")

# (leading shape of x, K, M, activation, bias, residual): rows 1, 7, 197, 394 (= 2 x 197); (K, M) from the
# ViT-like (192, 768), the awkward (200, 72) and (388, 200), and fc1/fc2-like (96, 384) / (384, 96).
CASES = [
    ((1,), 192, 768, "gelu", True, False),  # fc1, one row
    ((7,), 200, 72, None, True, True),  # fc2/proj epilogue, odd widths
    ((197,), 96, 384, "gelu", True, False),  # fc1
    ((394,), 384, 96, None, True, True),  # fc2
    ((2, 7), 96, 384, "gelu", False, True),  # 3-D x, GELU + residual, no bias
    ((3, 7), 200, 72, None, False, False),  # plain GEMM
    ((7,), 388, 200, "gelu", True, True),  # every epilogue stage at once, K = 388
    ((2, 197), 200, 72, None, True, False),  # 3-D x with N = 197, qkv-like: bias only
]


def _case_id(case):
    lead, K, M, act, bias, res = case
    return f"{'x'.join(map(str, lead))}-{K}to{M}-{act or 'noact'}-{'b' if bias else 'nob'}-{'r' if res else 'nor'}"


def _inputs(lead, K, M, dtype, bias=True, residual=False, device=DEVICE):
    x = torch.randn(*lead, K, device=device, dtype=dtype)
    w = (torch.randn(M, K, device=device) / K**0.5).to(dtype)  # unit-variance outputs, as nn.Linear's init
    b = (0.5 * torch.randn(M, device=device)).to(dtype) if bias else None
    r = torch.randn(*lead, M, device=device, dtype=dtype) if residual else None
    return x, w, b, r


def _run(backend, x, w, b, r, activation, dy):
    """Forward + backward of ops.linear; returns {name: tensor} of the output and every gradient."""
    leaves = {k: t.detach().clone().requires_grad_() for k, t in (("x", x), ("weight", w), ("bias", b),
                                                                 ("residual", r)) if t is not None}
    y = ops.linear(leaves["x"], leaves["weight"], leaves.get("bias"), activation=activation,
                   residual=leaves.get("residual"), backend=backend)
    got = torch.autograd.grad(y, list(leaves.values()), dy)
    result = {"y": y.detach()}
    result.update({f"d{k}": g for k, g in zip(leaves, got)})
    return result


def _check(backend, x, w, b, r, activation, dy=None, rerun=True):
    dy = torch.randn(*x.shape[:-1], w.shape[0], device=x.device, dtype=x.dtype) if dy is None else dy
    ours = _run(backend, x, w, b, r, activation, dy)
    lowp = _run("torch", x, w, b, r, activation, dy)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    oracle = _run("torch", d(x), d(w), d(b), d(r), activation, d(dy))
    assert set(ours) == set(oracle)
    for name in oracle:
        assert ours[name].dtype == x.dtype, f"{name}: dtype {ours[name].dtype} != {x.dtype}"
        assert_budget(name, ours[name], lowp[name], oracle[name])
    if rerun:
        again = _run(backend, x, w, b, r, activation, dy)
        for name in ours:
            assert torch.equal(ours[name], again[name]), f"{name}: rerun is not bit-identical"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_linear(backend, dtype, case):
    lead, K, M, activation, bias, residual = case
    x, w, b, r = _inputs(lead, K, M, dtype, bias=bias, residual=residual)
    # The bit-identical rerun on a subset keeps the interpreter time down; every kernel path is in it.
    _check(backend, x, w, b, r, activation, rerun=lead in ((7,), (2, 7)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu_tanh", "quick_gelu", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_other_activations(backend, activation, dtype):
    """The epilogue activations of the other ViT families (tanh-GELU, QuickGELU, SiLU) on each fused backend
    (triton's GEMM epilogue; the cuda backend's epilogue kernel, csrc/activations.h), forward and every
    gradient, N = 197 rows, odd widths, bias + residual."""
    x, w, b, r = _inputs((197,), 200, 72, dtype, bias=True, residual=True)
    _check(backend, x, w, b, r, activation, rerun=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_linear_strided(backend, activation):
    """Non-contiguous operands: x a (B, N, K) view transposed in B and N (reshape copies it once) and a view
    with a non-unit stride along K, weight and residual transposed views, and a stride-0 output gradient."""
    B, N, K, M = 2, 7, 40, 24
    x = torch.randn(N, B, K, device=DEVICE).transpose(0, 1)  # (B, N, K), not flattenable to (B*N, K)
    w = torch.randn(K, M, device=DEVICE).t()  # (M, K), strides (1, M)
    b = torch.randn(M, device=DEVICE)
    r = torch.randn(M, B, N, device=DEVICE).permute(1, 2, 0)  # (B, N, M), strides (N, 1, B*N)
    dy = torch.randn(1, 1, M, device=DEVICE).expand(B, N, M)  # stride 0 in B and N, e.g. from a broadcast
    _check(backend, x, w, b, r, activation, dy=dy)
    xt = torch.randn(K, B * N, device=DEVICE).t()  # (R, K), stride 1 along R: no copy, strided loads
    _check(backend, xt, w, b, None, activation, dy=None)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", [None, "gelu"])
@pytest.mark.parametrize("wants", [("x",), ("weight",), ("bias",), ("residual",), ("weight", "bias")],
                         ids=lambda w: "+".join(w))
def test_linear_gradient_subsets(backend, activation, wants):
    """Only the inputs that require grad get a gradient, and it is right (the others' paths are skipped)."""
    x, w, b, r = _inputs((7,), 40, 24, torch.float32, bias=True, residual=True)
    leaves = {"x": x, "weight": w, "bias": b, "residual": r}
    for name in wants:
        leaves[name].requires_grad_()
    y = ops.linear(x, w, b, activation=activation, residual=r, backend=backend)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [leaves[n] for n in wants], dy)
    ref = {k: v.detach().double().requires_grad_() for k, v in leaves.items()}
    y_ref = ops.linear(ref["x"], ref["weight"], ref["bias"], activation=activation, residual=ref["residual"],
                       backend="torch")
    expected = torch.autograd.grad(y_ref, [ref[n] for n in wants], dy.double())
    for name, g, e in zip(wants, got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")
    if "residual" in wants:
        assert torch.equal(got[wants.index("residual")], dy), "dresidual must be dy itself"


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_inference_and_empty(backend):
    """No grad needed: same output (GELU's pre-activation is not kept); zero rows give an empty output."""
    x, w, b, r = _inputs((5,), 24, 40, torch.float32, residual=True)
    with torch.no_grad():
        y = ops.linear(x, w, b, activation="gelu", residual=r, backend=backend)
    y_ref = ops.linear(x.double(), w.double(), b.double(), activation="gelu", residual=r.double(), backend="torch")
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)
    empty = ops.linear(x[:0], w, b, activation="gelu", backend=backend)
    assert empty.shape == (0, 40)


@settings(max_examples=8, deadline=None)
@given(rows=st.integers(1, 70), K=st.integers(1, 100), M=st.integers(1, 100),
       gelu=st.booleans(), bias=st.booleans(), residual=st.booleans())
def test_linear_property(rows, K, M, gelu, bias, residual):
    """Any (R, K, M), including 1 and non-multiples of the tile sizes, matches the oracle in fp32."""
    require_backend("triton", "linear")
    x, w, b, r = _inputs((rows,), K, M, torch.float32, bias=bias, residual=residual)
    _check("triton", x, w, b, r, "gelu" if gelu else None, rerun=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the op (no graph break) and matches eager, forward and backward."""
    # The backend function itself (the dispatch in vitkernels.ops is not part of this test).
    linear = require_backend(backend, "linear").get_op("linear")
    torch._dynamo.reset()

    def mlp(x, w1, b1, w2, b2):  # timm's Mlp with the block's residual: fc1 + GELU, fc2 + residual
        h = linear(x, w1, b1, "gelu", None)
        return linear(h, w2, b2, None, x).square().sum()

    x, w1, b1, _ = _inputs((2, 7), 24, 48, torch.float32)
    _, w2, b2, _ = _inputs((1,), 48, 24, torch.float32)
    inputs = [t.requires_grad_() for t in (x, w1, b1, w2, b2)]
    compiled = torch.compile(mlp, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*inputs)
    grads_c = torch.autograd.grad(loss_c, inputs)
    loss_e = mlp(*inputs)
    grads_e = torch.autograd.grad(loss_e, inputs)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)
