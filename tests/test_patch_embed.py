"""vitkernels.ops.patch_embed on the fused backends against a float64 oracle (Conv2d + flatten + transpose +
cat + add on double copies): the tokens and every gradient (images, weight, bias, pos_embed, cls_token),
within 2x PyTorch's own error in the same precision; finite; bit-identical reruns. Odd patch grids (7x9),
P in {4, 8, 14, 16, 32}, C in {1, 3}, B in {1, 3}, pos_embed over N + 1 or N tokens, strided images and
gradients. Also opcheck, torch.compile and a hypothesis property test over shapes.
"""

from __future__ import annotations

import pytest
import torch

from oracle import DEVICE, DTYPES, FUSED, assert_budget, backend_params, require_backend
from vitkernels import ops
from optional import hypothesis_api

given, settings, st = hypothesis_api()

BACKENDS = backend_params(*FUSED, op="patch_embed")

# (B, C, grid_h, grid_w, P, D, cls, pos) with pos in {None, "N+1", "N"} ("N" with a cls token is timm's
# no_embed_class: the class token gets no position embedding).
CASES = {
    "vit_7x9_p16": (3, 3, 7, 9, 16, 64, True, "N+1"),
    "p4_c1_nocls": (1, 1, 5, 3, 4, 32, False, "N"),
    "p14_no_embed_class": (3, 3, 4, 5, 14, 48, True, "N"),
    "p32_nopos": (1, 1, 3, 2, 32, 48, True, None),
    "p8_c1_plain": (3, 1, 6, 7, 8, 80, False, None),
}


def _inputs(B, C, GH, GW, P, D, cls, pos, dtype, bias=True, device=DEVICE):
    N = GH * GW
    images = torch.randn(B, C, GH * P, GW * P, device=device, dtype=dtype)
    weight = (torch.randn(D, C, P, P, device=device) / (C * P * P) ** 0.5).to(dtype)
    b = torch.randn(D, device=device, dtype=dtype) if bias else None
    cls_token = torch.randn(1, 1, D, device=device, dtype=dtype) if cls else None
    T = {None: 0, "N+1": N + 1, "N": N}[pos]
    pos_embed = torch.randn(1, T, D, device=device, dtype=dtype) if pos else None
    return {"images": images, "weight": weight, "bias": b, "pos_embed": pos_embed, "cls_token": cls_token}


def _leaf(t, dtype=None):
    """A fresh leaf copy of t with t's exact strides (so strided / channels_last images stay strided)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)
    return out.copy_(t.detach())


def _run(backend, inputs, grad_out, images_grad=True):
    """Forward + backward of ops.patch_embed; returns {name: tensor} of the tokens and every gradient."""
    leaves = {k: _leaf(t).requires_grad_(k != "images" or images_grad) for k, t in inputs.items()
              if t is not None}
    out = ops.patch_embed(leaves["images"], leaves["weight"], leaves.get("bias"),
                          pos_embed=leaves.get("pos_embed"), cls_token=leaves.get("cls_token"), backend=backend)
    wrt = {k: t for k, t in leaves.items() if t.requires_grad}
    grads = torch.autograd.grad(out, list(wrt.values()), grad_out)
    result = {"tokens": out.detach()}
    result.update({f"d{k}": g for k, g in zip(wrt, grads)})
    return result


def _check(backend, inputs, images_grad=True, grad_out=None):
    dtype = inputs["images"].dtype
    if grad_out is None:
        B, _, H, W = inputs["images"].shape
        D, _, P, _ = inputs["weight"].shape
        T = (H // P) * (W // P) + (1 if inputs["cls_token"] is not None else 0)
        grad_out = torch.randn(B, T, D, device=inputs["images"].device, dtype=dtype)
    ours = _run(backend, inputs, grad_out, images_grad)
    lowp = _run("torch", inputs, grad_out, images_grad)
    double = {k: (_leaf(t, torch.float64) if t is not None else None) for k, t in inputs.items()}
    oracle = _run("torch", double, grad_out.double(), images_grad)
    assert set(ours) == set(oracle)
    for name in oracle:
        assert ours[name].dtype == dtype, f"{name}: dtype {ours[name].dtype} != {dtype}"
        assert_budget(name, ours[name], lowp[name], oracle[name])
    again = _run(backend, inputs, grad_out, images_grad)
    for name in ours:
        assert torch.equal(ours[name], again[name]), f"{name}: rerun is not bit-identical"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_patch_embed(backend, dtype, case):
    B, C, GH, GW, P, D, cls, pos = CASES[case]
    _check(backend, _inputs(B, C, GH, GW, P, D, cls, pos, dtype, bias=case != "p8_c1_plain"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_frozen_images_strided(backend):
    """Images that do not require grad (the usual case: no dimages GEMM), channels_last images, and an
    expanded (stride-0) incoming gradient such as the one ``out.sum()`` produces."""
    inputs = _inputs(3, 3, 7, 9, 8, 40, True, "N+1", torch.float32)
    inputs["images"] = inputs["images"].contiguous(memory_format=torch.channels_last)
    _check(backend, inputs, images_grad=False)
    B, T, D = 3, 64, 40
    _check(backend, inputs, grad_out=torch.randn(1, 1, D, device=DEVICE).expand(B, T, D))
    # a strided view of a larger image: (B, C, H, W) with row stride > W
    big = torch.randn(1, 3, 16, 40, device=DEVICE)
    inputs = _inputs(1, 3, 2, 3, 8, 24, False, "N", torch.float32)
    inputs["images"] = big[:, :, :, 4:28]
    assert not inputs["images"].is_contiguous()
    _check(backend, inputs)


@settings(max_examples=4, deadline=None)
@given(B=st.integers(1, 2), C=st.sampled_from([1, 3]), GH=st.integers(1, 4), GW=st.integers(1, 4),
       P=st.sampled_from([2, 4, 8]), D=st.integers(1, 70), cls=st.booleans(),
       pos=st.sampled_from([None, "N+1", "N"]))
def test_patch_embed_property(B, C, GH, GW, P, D, cls, pos):
    """Any grid, patch size, embed dim (including D=1 and non-multiples of 16) matches the oracle in fp32."""
    from vitkernels.backends import why_not

    if why_not("triton", DEVICE) is not None:
        pytest.skip(str(why_not("triton", DEVICE)))
    if pos == "N+1" and not cls:
        pos = "N"
    _check("triton", _inputs(B, C, GH, GW, P, D, cls, pos, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the registered op (no graph break), forward and backward, and
    matches eager. It calls the backend function itself: the dispatch in vitkernels.ops is compiled in the
    whole-model tests."""
    patch_embed = require_backend(backend, "patch_embed").get_op("patch_embed")

    torch._dynamo.reset()

    def stem(images, weight, bias, pos_embed, cls_token):
        return patch_embed(images * 0.5, weight, bias, pos_embed, cls_token).square().mean()

    x = _inputs(2, 3, 3, 2, 8, 16, True, "N+1", torch.float32)
    args = [x[k].requires_grad_() for k in ("images", "weight", "bias", "pos_embed", "cls_token")]
    compiled = torch.compile(stem, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    loss_e = stem(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)
