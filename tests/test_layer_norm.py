"""vitkernels.ops.layer_norm (with and without the fused residual add) on the fused backends against a float64
oracle: forward, s = x + residual, and every gradient (x, residual, weight, bias), within 2x PyTorch's own
error in the same precision; finite; bit-identical reruns (no atomics). Also opcheck, torch.compile and a
hypothesis property test over shapes.
"""

from __future__ import annotations

import pytest
import torch

from oracle import DEVICE, DTYPES, FUSED, assert_budget, backend_params, require_backend
from vitkernels import ops
from optional import hypothesis_api

given, settings, st = hypothesis_api()

BACKENDS = backend_params(*FUSED, op="layer_norm")
EPS = 1e-6

# (leading shape, C, residual): the row counts 1, 7, 197, 394 (= 2 x 197), 577 mixed with the ViT widths,
# with and without the fused residual add.
SHAPES = [((1,), 768, True), ((7,), 1280, False), ((197,), 384, True), ((2, 197), 192, False),
          ((577,), 768, True), ((577,), 768, False), ((2, 197), 1280, True)]


def _inputs(lead, C, dtype, residual=True, weight=True, bias=True, device=DEVICE):
    x = torch.randn(*lead, C, device=device, dtype=dtype) * 2 + 0.5  # non-zero mean: exercises the centring
    r = torch.randn(*lead, C, device=device, dtype=dtype) if residual else None
    w = (1 + 0.5 * torch.randn(C, device=device, dtype=dtype)) if weight else None
    b = 0.5 * torch.randn(C, device=device, dtype=dtype) if bias else None
    return x, w, b, r


def _run(backend, x, w, b, r, dy, ds):
    """Forward + backward of ops.layer_norm; returns {name: tensor} of every output and gradient."""
    leaves = {k: t.detach().clone().requires_grad_() for k, t in (("x", x), ("weight", w), ("bias", b),
                                                                 ("residual", r)) if t is not None}
    out = ops.layer_norm(leaves["x"], leaves.get("weight"), leaves.get("bias"), eps=EPS,
                         residual=leaves.get("residual"), backend=backend)
    if r is None:
        y, outs, grads = out, {"y": out}, [dy]
        tensors = [out]
    else:
        y, s = out
        outs, grads, tensors = {"y": y, "s": s}, [dy, ds], [y, s]
    got = torch.autograd.grad(tensors, list(leaves.values()), grads)
    result = {k: v.detach() for k, v in outs.items()}
    result.update({f"d{k}": g for k, g in zip(leaves, got)})
    return result


def _check(backend, x, w, b, r):
    dy = torch.randn_like(x)
    ds = torch.randn_like(x) if r is not None else None
    ours = _run(backend, x, w, b, r, dy, ds)
    lowp = _run("torch", x, w, b, r, dy, ds)
    d = lambda t: t.double() if t is not None else None  # noqa: E731
    oracle = _run("torch", d(x), d(w), d(b), d(r), d(dy), d(ds))
    assert set(ours) == set(oracle)
    for name in oracle:
        assert ours[name].dtype == x.dtype, f"{name}: dtype {ours[name].dtype} != {x.dtype}"
        assert_budget(name, ours[name], lowp[name], oracle[name])
    again = _run(backend, x, w, b, r, dy, ds)
    for name in ours:
        assert torch.equal(ours[name], again[name]), f"{name}: rerun is not bit-identical"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lead,C,residual", SHAPES, ids=lambda v: str(v))
def test_layer_norm(backend, dtype, lead, C, residual):
    _check(backend, *_inputs(lead, C, dtype, residual=residual))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("weight,bias", [(False, False), (True, False), (False, True)],
                         ids=["no_affine", "no_bias", "no_weight"])
def test_layer_norm_without_affine(backend, dtype, weight, bias):
    _check(backend, *_inputs((3, 7), 192, dtype, residual=True, weight=weight, bias=bias))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_strided_and_wide(backend):
    """Non-contiguous x and residual (transposed views), and widths past the ViT range (masked tail)."""
    x = torch.randn(1000, 5, device=DEVICE).t()  # (5, 1000), column stride 5
    r = torch.randn(5, 2000, device=DEVICE)[:, ::2]  # (5, 1000), column stride 2
    w, b = torch.randn(1000, device=DEVICE), torch.randn(1000, device=DEVICE)
    _check(backend, x, w, b, r)
    _check(backend, *_inputs((3,), 8192, torch.float32, residual=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_only_s_used(backend):
    """When only s = x + residual feeds the loss, y's gradient is zero and dx = dresidual = ds."""
    x, w, b, r = _inputs((7,), 384, torch.float32)
    leaves = [t.clone().requires_grad_() for t in (x, w, b, r)]
    y, s = ops.layer_norm(leaves[0], leaves[1], leaves[2], eps=EPS, residual=leaves[3], backend=backend)
    ds = torch.randn_like(s)
    dx, dr = torch.autograd.grad(s, [leaves[0], leaves[3]], ds)
    assert torch.equal(dx, ds) and torch.equal(dr, ds)


@settings(max_examples=6, deadline=None)
@given(rows=st.integers(1, 40), C=st.integers(1, 1300), residual=st.booleans(), affine=st.booleans())
def test_layer_norm_property(rows, C, residual, affine):
    """Any row count and width (including C=1 and non-powers of two) matches the oracle in fp32."""
    from vitkernels.backends import why_not

    if why_not("triton", DEVICE) is not None:
        pytest.skip(str(why_not("triton", DEVICE)))
    _check("triton", *_inputs((rows,), C, torch.float32, residual=residual, weight=affine, bias=affine))


@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the registered op (no graph break), forward and backward, and
    matches eager. It calls the backend function itself: the dispatch in vitkernels.ops is compiled in the
    whole-model tests."""
    layer_norm = require_backend(backend, "layer_norm").get_op("layer_norm")

    torch._dynamo.reset()

    def block(x, r, w, b):
        y, s = layer_norm(x * 2, w, b, EPS, r)
        return (y * s).sum() + layer_norm(s, None, None, EPS, None).square().sum()

    inputs = [t.requires_grad_() for t in _inputs((3, 11), 192, torch.float32)]
    x, w, b, r = inputs
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    loss_c = compiled(x, r, w, b)
    grads_c = torch.autograd.grad(loss_c, [x, r, w, b])
    loss_e = block(x, r, w, b)
    grads_e = torch.autograd.grad(loss_e, [x, r, w, b])
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)
