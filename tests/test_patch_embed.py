"""vitkernels.ops.patch_embed on the fused backends against a float64 oracle (Conv2d + flatten + transpose +
cat + add on double copies): the tokens and every gradient (images, weight, bias, pos_embed, prefix_tokens),
within 2x PyTorch's own error in the same precision; finite; bit-identical reruns. Odd patch grids (7x9, 3x4
from patch 14 on 42x56), P in {4, 8, 14, 16, 32}, C in {1, 3}, B in {1, 3}, K in {0, 1, 2, 5} prefix tokens
(class; class + distillation; class + 4 registers), pos_embed over N + K or N tokens (no_embed_class) or none,
strided images and gradients. Also timm's own stem with registers / no_embed_class / DeiT's distillation
token, the cls_token synonym, validation errors, opcheck of the contract's schemas, torch.compile and a
hypothesis property test over shapes.
"""

from __future__ import annotations

import pytest
import torch

from oracle import DEVICE, DTYPES, FUSED, assert_budget, backend_params, require_backend
from vitkernels import ops
from optional import hypothesis_api

given, settings, st = hypothesis_api()

BACKENDS = backend_params(*FUSED, op="patch_embed")

# (B, C, grid_h, grid_w, P, D, K, pos): K prefix tokens (0: none), pos in {None, "N+K", "N"} ("N" with prefix
# tokens is timm's no_embed_class: the prefix tokens get no position embedding).
CASES = {
    "vit_7x9_p16": (3, 3, 7, 9, 16, 64, 1, "N+K"),
    "p4_c1_nocls": (1, 1, 5, 3, 4, 32, 0, "N"),
    "p14_no_embed_class": (3, 3, 4, 5, 14, 48, 1, "N"),
    "p32_nopos": (1, 1, 3, 2, 32, 48, 1, None),
    "p8_c1_plain": (3, 1, 6, 7, 8, 80, 0, None),
    "reg4_p16": (2, 3, 3, 5, 16, 64, 5, "N+K"),  # class + 4 registers, pos_embed over all (timm default)
    "reg4_no_embed_class": (3, 1, 5, 3, 8, 40, 5, "N"),  # DINOv2-with-registers style
    "distilled_p14_42x56": (1, 3, 3, 4, 14, 48, 2, "N+K"),  # DeiT distilled: class + distillation, B = 1
    "distilled_nopos": (1, 3, 2, 3, 4, 24, 2, None),
}


def _inputs(B, C, GH, GW, P, D, K, pos, dtype, bias=True, device=DEVICE):
    N = GH * GW
    images = torch.randn(B, C, GH * P, GW * P, device=device, dtype=dtype)
    weight = (torch.randn(D, C, P, P, device=device) / (C * P * P) ** 0.5).to(dtype)
    b = torch.randn(D, device=device, dtype=dtype) if bias else None
    prefix_tokens = torch.randn(1, K, D, device=device, dtype=dtype) if K else None
    T = {None: 0, "N+K": N + K, "N": N}[pos]
    pos_embed = torch.randn(1, T, D, device=device, dtype=dtype) if pos else None
    return {"images": images, "weight": weight, "bias": b, "pos_embed": pos_embed, "prefix_tokens": prefix_tokens}


def _leaf(t, dtype=None):
    """A fresh leaf copy of t with t's exact strides (so strided / channels_last images stay strided)."""
    out = torch.empty_strided(t.shape, t.stride(), dtype=dtype or t.dtype, device=t.device)
    return out.copy_(t.detach())


def _run(backend, inputs, grad_out, images_grad=True):
    """Forward + backward of ops.patch_embed; returns {name: tensor} of the tokens and every gradient."""
    leaves = {k: _leaf(t).requires_grad_(k != "images" or images_grad) for k, t in inputs.items()
              if t is not None}
    out = ops.patch_embed(leaves["images"], leaves["weight"], leaves.get("bias"),
                          pos_embed=leaves.get("pos_embed"), prefix_tokens=leaves.get("prefix_tokens"),
                          backend=backend)
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
        prefix = inputs["prefix_tokens"]
        T = (H // P) * (W // P) + (prefix.shape[1] if prefix is not None else 0)
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
    B, C, GH, GW, P, D, K, pos = CASES[case]
    _check(backend, _inputs(B, C, GH, GW, P, D, K, pos, dtype, bias=case not in ("p8_c1_plain", "distilled_nopos")))


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_frozen_images_strided(backend):
    """Images that do not require grad (the usual case: no dimages GEMM), channels_last images, and an
    expanded (stride-0) incoming gradient such as the one ``out.sum()`` produces."""
    inputs = _inputs(3, 3, 7, 9, 8, 40, 1, "N+K", torch.float32)
    inputs["images"] = inputs["images"].contiguous(memory_format=torch.channels_last)
    _check(backend, inputs, images_grad=False)
    B, T, D = 3, 64, 40
    _check(backend, inputs, grad_out=torch.randn(1, 1, D, device=DEVICE).expand(B, T, D))
    # a strided view of a larger image: (B, C, H, W) with row stride > W
    big = torch.randn(1, 3, 16, 40, device=DEVICE)
    inputs = _inputs(1, 3, 2, 3, 8, 24, 2, "N", torch.float32)
    inputs["images"] = big[:, :, :, 4:28]
    assert not inputs["images"].is_contiguous()
    _check(backend, inputs)


@settings(max_examples=4, deadline=None)
@given(B=st.integers(1, 2), C=st.sampled_from([1, 3]), GH=st.integers(1, 4), GW=st.integers(1, 4),
       P=st.sampled_from([2, 4, 8]), D=st.integers(1, 70), K=st.sampled_from([0, 1, 2, 5]),
       pos=st.sampled_from([None, "N+K", "N"]))
def test_patch_embed_property(B, C, GH, GW, P, D, K, pos):
    """Any grid, patch size, embed dim (including D=1 and non-multiples of 16) matches the oracle in fp32."""
    from vitkernels.backends import why_not

    if why_not("triton", DEVICE) is not None:
        pytest.skip(str(why_not("triton", DEVICE)))
    _check("triton", _inputs(B, C, GH, GW, P, D, K, pos, torch.float32))


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces the registered op (no graph break), forward and backward, and
    matches eager. It calls the backend function itself: the dispatch in vitkernels.ops is compiled in the
    whole-model tests."""
    patch_embed = require_backend(backend, "patch_embed").get_op("patch_embed")

    torch._dynamo.reset()

    def stem(images, weight, bias, pos_embed, prefix_tokens):
        return patch_embed(images * 0.5, weight, bias, pos_embed, prefix_tokens).square().mean()

    x = _inputs(2, 3, 3, 2, 8, 16, 2, "N+K", torch.float32)
    args = [x[k].requires_grad_() for k in ("images", "weight", "bias", "pos_embed", "prefix_tokens")]
    compiled = torch.compile(stem, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*args)
    grads_c = torch.autograd.grad(loss_c, args)
    loss_e = stem(*args)
    grads_e = torch.autograd.grad(loss_e, args)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


@pytest.mark.parametrize("backend", BACKENDS)
def test_patch_embed_cls_token_synonym(backend):
    """``cls_token=`` is ``prefix_tokens=`` with one token: the same tokens and gradients, bit for bit."""
    x = _inputs(2, 3, 3, 4, 8, 24, 1, "N+K", torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in x.items()}
    a = ops.patch_embed(x["images"], leaves["weight"], leaves["bias"], pos_embed=leaves["pos_embed"],
                        cls_token=leaves["prefix_tokens"], backend=backend)
    b = ops.patch_embed(x["images"], x["weight"], x["bias"], pos_embed=x["pos_embed"],
                        prefix_tokens=x["prefix_tokens"], backend=backend)
    assert torch.equal(a, b)
    g = torch.randn_like(a)
    dcls, dpos = torch.autograd.grad(a, [leaves["prefix_tokens"], leaves["pos_embed"]], g)
    assert dcls.shape == (1, 1, 24)
    torch.testing.assert_close(dcls, g.sum(0)[None, :1])
    torch.testing.assert_close(dpos, g.sum(0, keepdim=True))


def test_patch_embed_prefix_validation():
    x = _inputs(2, 3, 3, 4, 8, 24, 2, "N+K", torch.float32)  # N = 12
    img, w = x["images"], x["weight"]
    with pytest.raises(ValueError, match="give prefix_tokens or cls_token"):
        ops.patch_embed(img, w, None, prefix_tokens=x["prefix_tokens"], cls_token=x["prefix_tokens"][:, :1])
    with pytest.raises(ValueError, match=r"cls_token must be \(1, 1, 24\), got \(1, 2, 24\)"):
        ops.patch_embed(img, w, None, cls_token=x["prefix_tokens"])
    with pytest.raises(ValueError, match=r"prefix_tokens must be \(1, K, 24\), got \(2, 2, 24\)"):
        ops.patch_embed(img, w, None, prefix_tokens=x["prefix_tokens"].expand(2, 2, 24))
    with pytest.raises(ValueError, match=r"prefix_tokens must be \(1, K, 24\), got \(2, 24\)"):
        ops.patch_embed(img, w, None, prefix_tokens=x["prefix_tokens"][0])
    with pytest.raises(ValueError, match=r"pos_embed must be \(1, T, 24\) with T in \[12, 14\] .* 2 prefix"):
        ops.patch_embed(img, w, None, pos_embed=torch.randn(1, 13, 24), prefix_tokens=x["prefix_tokens"])
    with pytest.raises(ValueError, match=r"pos_embed must be \(1, T, 24\) with T in \[12\]"):
        ops.patch_embed(img, w, None, pos_embed=torch.randn(1, 13, 24))
    for T in (12, 14):  # both layouts are accepted
        out = ops.patch_embed(img, w, None, pos_embed=torch.randn(1, T, 24), prefix_tokens=x["prefix_tokens"],
                              backend="torch")
        assert out.shape == (2, 14, 24)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("K, pos", [(2, "N+K"), (5, "N")], ids=["distilled", "reg4_no_embed_class"])
def test_patch_embed_opcheck(backend, K, pos):
    """The contract's schemas (int num_prefix), fake shapes and autograd registration hold for K > 1."""
    ns = getattr(torch.ops, require_backend(backend, "patch_embed").NAMESPACE)
    x = _inputs(2, 3, 2, 3, 4, 10, K, pos, torch.float32)
    x["images"] = x["images"].permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)  # NHWC strides
    args = [x[k].requires_grad_() for k in ("images", "weight", "bias", "pos_embed", "prefix_tokens")]
    torch.library.opcheck(ns.patch_embed_fwd.default, args,
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    with torch.no_grad():
        out = ns.patch_embed_fwd(*(a.detach() for a in args))
    assert out.shape == (2, K + 6, 10)
    bwd_args = (torch.randn_like(out), x["images"].detach(), x["weight"].detach(), K, True, True)
    torch.library.opcheck(ns.patch_embed_bwd.default, bwd_args, test_utils=("test_schema", "test_faketensor"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["reg4", "reg4_no_embed_class", "distilled"])
def test_patch_embed_matches_timm_prefix_layouts(backend, layout):
    """timm's own stem (patch_embed + _pos_embed) with register tokens (pos_embed over the prefix, or
    no_embed_class) and DeiT's distillation token equals the op given torch.cat of the prefix tokens."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    kw = dict(img_size=(24, 40), patch_size=8, embed_dim=24, depth=1, num_heads=2)
    if layout == "distilled":
        model = VisionTransformerDistilled(**kw)
        prefix = [model.cls_token, model.dist_token]
    else:
        model = VisionTransformer(**kw, reg_tokens=4, no_embed_class=layout.endswith("no_embed_class"))
        prefix = [model.cls_token, model.reg_token]
    model = model.to(DEVICE).eval()
    with torch.no_grad():
        for p in [*prefix, model.pos_embed]:
            p.normal_()
    images = torch.randn(2, 3, 24, 40, device=DEVICE)
    with torch.no_grad():
        expected = model._pos_embed(model.patch_embed(images))
        proj = model.patch_embed.proj
        ours = ops.patch_embed(images, proj.weight, proj.bias, pos_embed=model.pos_embed,
                               prefix_tokens=torch.cat(prefix, 1), backend=backend)
    K = sum(t.shape[1] for t in prefix)  # 2 (class + distillation) or 5 (class + 4 registers)
    assert ours.shape == expected.shape == (2, K + 3 * 5, 24)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
