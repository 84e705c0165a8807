"""2-D rotary position embedding on q and k (EVA-02 / timm rope ViTs), forward and backward, against a float64
oracle and against timm's own ``apply_rot_embed_cat`` as EvaAttention applies it (prefix tokens skipped), with
q and k as strided views of a fused (B, T, 3, H, D) qkv and the tables built by timm's ``RotaryEmbeddingCat``;
the output layout; registration (torch.compile); the public op's validation.

Budget: err(ours) <= 2 x err(timm's expression in the same dtype) + floor, against the float64 oracle.
"""

from __future__ import annotations

import pytest
import torch

from oracle import DEVICE, FUSED, assert_budget, backend_params, require_backend
from vitkernels import ops
from vitkernels.ops import reference

from optional import missing, requires  # noqa: E402
from vitkernels.nn.eva import rope_table  # noqa: E402

timm_rope = None if missing("timm") else __import__("timm.layers.pos_embed_sincos", fromlist=["x"])

BACKENDS = backend_params("torch", *FUSED, op="rope")
DTYPES = [torch.float32, torch.float16]

# (B, H, T, D, num_prefix, patch grid): ViT-B/16-like with a class token, a 4-register-token model on a
# non-square grid, no prefix at all, and B = 1 with ViT-H's head dim.
SHAPES = [
    (2, 3, 197, 64, 1, (14, 14)),
    (1, 2, 257, 80, 5, (14, 18)),
    (2, 2, 196, 64, 0, (14, 14)),
    (1, 1, 197, 80, 1, (14, 14)),
]


def _ids(s):
    return f"B{s[0]}H{s[1]}T{s[2]}D{s[3]}P{s[4]}"


def _table(D, grid, half):
    """EVA-02's table (in_pixels=False, ref_feat_shape 16 x 16): (patches, 2 D) fp32, sin then cos; vitkernels'
    ``rope_table`` is timm's ``RotaryEmbeddingCat.get_embed()`` bit for bit (test_reference_is_timms_expression,
    tests/test_eva.py)."""
    return rope_table(D, grid, ref_feat_shape=(16, 16), rotate_half=half).to(DEVICE)


def _qk(B, H, T, D, dtype):
    """q, k as (B, H, T, D) strided views of one (B, T, 3, H, D) buffer, the model's layout."""
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE, dtype=dtype)
    q, k, _ = (t.transpose(1, 2) for t in qkv.unbind(2))
    return q, k


def _timm(q, k, table, P, half):
    """What timm's EvaAttention does to q and k (the prefix rows kept, the rest rotated)."""
    def one(x):
        return torch.cat([x[:, :, :P], timm_rope.apply_rot_embed_cat(x[:, :, P:], table, half=half)], dim=2)

    return one(q), one(k)


def _run(fn, q, k, gq, gk):
    """Outputs and (dq, dk) of ``fn`` on fresh leaf copies keeping q and k's strides."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k)]
    outs = fn(*leaves)
    torch.autograd.backward(outs, (gq.to(outs[0].dtype), gk.to(outs[1].dtype)))
    return outs, [t.grad for t in leaves]


@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rope_matches_oracle_and_timm(backend, dtype, shape, half):
    B, H, T, D, P, grid = shape
    table = _table(D, grid, half)
    sin, cos = table.chunk(2, -1)  # views with row stride 2 D, as the model passes them
    q, k = _qk(B, H, T, D, dtype)
    gq, gk = torch.randn_like(q), torch.randn_like(k)

    oracle, oracle_grads = _run(lambda a, b: reference.rope(a, b, sin.double(), cos.double(), P, half),
                                q.double(), k.double(), gq.double(), gk.double())
    lowp, lowp_grads = _run(lambda a, b: reference.rope(a, b, sin, cos, P, half), q, k, gq, gk)  # timm's expression
    ours, our_grads = _run(lambda a, b: ops.rope(a, b, sin, cos, num_prefix_tokens=P, half=half, backend=backend),
                           q, k, gq, gk)
    for name, t, t_lowp, t_oracle in zip(("q_rot", "k_rot", "dq", "dk"), [*ours, *our_grads],
                                         [*lowp, *lowp_grads], [*oracle, *oracle_grads]):
        assert t.dtype == dtype, name
        assert_budget(name, t, t_lowp, t_oracle)
    # The prefix rows are copies, in both directions.
    for x, y in ((q, ours[0]), (k, ours[1]), (gq, our_grads[0]), (gk, our_grads[1])):
        assert torch.equal(x[:, :, :P], y[:, :, :P])
    if backend == "torch":  # the reference is timm's expression: the same bits
        for a, b in zip(ours, lowp):
            assert torch.equal(a, b)
    elif dtype == torch.float32:  # fp32 in registers, one rounding: timm's result up to a last-bit FMA
        for a, b in zip(ours, lowp):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    if backend != "torch":  # written as (B, T, H, D): the attention op's layout, read without a copy
        for t in (*ours, *our_grads):
            assert t.transpose(1, 2).is_contiguous()


@requires("timm")
@pytest.mark.parametrize("half", [False, True], ids=["interleaved", "half"])
def test_reference_is_timms_expression(half):
    """The torch reference (the budgets' low-precision baseline above) is timm's EvaAttention rope bit for bit,
    on timm's own table, which ``rope_table`` reproduces exactly."""
    B, H, T, D, P, grid = SHAPES[1]
    rope = timm_rope.RotaryEmbeddingCat(D, in_pixels=False, feat_shape=list(grid), ref_feat_shape=[16, 16],
                                        rotate_half=half)
    table = rope.get_embed().to(DEVICE)
    assert torch.equal(table, _table(D, grid, half))
    sin, cos = table.chunk(2, -1)
    for dtype in DTYPES:
        q, k = _qk(B, H, T, D, dtype)
        for a, b in zip(reference.rope(q, k, sin, cos, P, half), _timm(q, k, table, P, half)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="rope"))
def test_rope_contiguous_inputs_and_fp16_tables(backend):
    """Plain contiguous q / k, contiguous tables, and fp16 tables (upcast, as the public op documents)."""
    B, H, T, D, P = 1, 2, 50, 32, 1
    table = _table(D, (7, 7), False)
    sin, cos = (t.contiguous() for t in table.chunk(2, -1))
    q, k = torch.randn(B, H, T, D, device=DEVICE), torch.randn(B, H, T, D, device=DEVICE)
    want = reference.rope(q, k, sin, cos, P, False)
    got = ops.rope(q, k, sin, cos, num_prefix_tokens=P, backend=backend)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    got16 = ops.rope(q, k, sin.half(), cos.half(), num_prefix_tokens=P, backend=backend)
    want16 = reference.rope(q, k, sin.half().float(), cos.half().float(), P, False)
    for a, b in zip(got16, want16):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="rope"))
def test_rope_compile_fullgraph(backend):
    """The public op traces without a graph break (dispatch, fake impls, autograd) and computes the same."""
    from vitkernels.backends import prepare

    prepare(backend)  # probing imports modules: done outside the traced region, as the model does
    torch._dynamo.reset()
    B, T, H, D, P = 2, 17, 2, 16, 1
    table = _table(D, (4, 4), False)
    sin, cos = table.chunk(2, -1)
    qkv = torch.randn(B, T, 3, H, D, device=DEVICE, requires_grad=True)

    def block(qkv):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        q, k = ops.rope(q, k, sin, cos, num_prefix_tokens=P, backend=backend)
        return (q * k).sin().sum() + v.sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    out = compiled(qkv)
    (grad,) = torch.autograd.grad(out, qkv)
    ref_qkv = qkv.detach().clone().requires_grad_(True)
    ref = block(ref_qkv)
    (ref_grad,) = torch.autograd.grad(ref, ref_qkv)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


@pytest.mark.parametrize("kwargs, match", [
    (dict(D=7), "must be even"),
    (dict(rows=10), r"must be \(T - num_prefix_tokens, D\)"),
    (dict(P=30), "num_prefix_tokens must be in"),
    (dict(grad_table=True), "get no gradient"),
])
def test_rope_validation(kwargs, match):
    T, D, P = 20, kwargs.get("D", 8), kwargs.get("P", 1)
    q = torch.randn(1, 2, T, D)
    rows = kwargs.get("rows", max(T - P, 0))
    sin = torch.randn(rows, D, requires_grad=kwargs.get("grad_table", False))
    with pytest.raises(ValueError, match=match):
        ops.rope(q, q, sin, sin, num_prefix_tokens=P, backend="torch")


def test_rope_flops_are_zero():
    from torch.utils.flop_counter import FlopCounterMode

    q = torch.randn(1, 2, 10, 8, requires_grad=True)
    sin = torch.randn(9, 8)
    with FlopCounterMode(display=False) as counter:
        out = ops.rope(q, q, sin, sin, num_prefix_tokens=1)
        (out[0].sum() + out[1].sum()).backward()
    assert counter.get_total_flops() == 0


def test_rope_cuda_op_checks_its_arguments():
    """The extension's own checks (the op called directly, past the public op's validation)."""
    require_backend("cuda", "rope")
    ns = torch.ops.vitkernels_C
    q, sin = torch.randn(1, 2, 5, 8, device=DEVICE), torch.randn(4, 8, device=DEVICE)
    with pytest.raises(RuntimeError, match="sin/cos must be float32"):
        ns.rope_fwd(q, q, sin.double(), sin.double(), 1, False)
    with pytest.raises(RuntimeError, match="num_prefix must be in"):
        ns.rope_fwd(q, q, sin, sin, 6, False)
    with pytest.raises(RuntimeError, match="must be even"):
        ns.rope_fwd(q[..., :7], q[..., :7], sin[:, :7], sin[:, :7], 1, False)
    with pytest.raises(RuntimeError, match=r"must be \(4, 8\) with a unit last stride"):
        ns.rope_fwd(q, q, sin.t().contiguous().t(), sin, 1, False)
