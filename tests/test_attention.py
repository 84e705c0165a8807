"""Fused attention (forward + dq/dk/dv) against a float64 oracle, over the sequence lengths and head dims ViTs
have, with q/k/v as strided views of a fused (B, N, 3, H, D) qkv buffer; registration (opcheck,
torch.compile); determinism; a property test over shapes. The additive bias (forward, dq/dk/dv and dbias) over
the shapes models give it: BEiT's relative position bias (1, H, N, N), full (B, H, N, M), a key-padding mask
(B, 1, 1, M) with -inf entries, expanded views, rows with every key masked.

Budget: err(ours) <= 2 x err(PyTorch SDPA in the same dtype) + floor, against SDPA on float64 copies.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oracle import DEVICE, DTYPES, FUSED, assert_budget, backend_params, require_backend
from vitkernels import ops
from vitkernels.backends import BackendError
from optional import hypothesis_api

given, settings, st = hypothesis_api()

BACKENDS = backend_params(*FUSED, op="attention")

# (B, H, N, D): a covering list rather than the full product; small B * H for the large N (interpreter time).
SHAPES = [
    (1, 1, 1, 32),  # a single token
    (3, 3, 7, 64),
    (3, 1, 50, 80),  # ViT-*/32 at 224; D = 80 pads to 128
    (1, 3, 50, 128),
    (2, 1, 197, 64),  # ViT-B/16 at 224
    (1, 1, 257, 80),  # ViT-H/14 at 224
    (1, 1, 577, 32),  # ViT at 384/16
    (1, 2, 23, 96),
]


def _qkv(B, H, N, D, dtype, requires_grad=True):
    """q, k, v as (B, H, N, D) strided views of one (B, N, 3, H, D) buffer (the model's layout), and the buffer."""
    qkv = torch.randn(B, N, 3, H, D, device=DEVICE, dtype=dtype)
    qkv.requires_grad_(requires_grad)
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return qkv, q, k, v


def _run(fn, q, k, v, grad_out):
    """Output and (dq, dk, dv) of ``fn`` on fresh leaf copies keeping q, k, v's strides."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad_out.to(out.dtype))
    return out, [t.grad for t in leaves]


def _check(backend, q, k, v, scale=None):
    """Compare the backend's output and gradients with the float64 oracle under the budget."""
    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    grad_out = torch.randn(q.shape, device=q.device, dtype=q.dtype)

    def sdpa(*t):
        return F.scaled_dot_product_attention(*t, scale=scale)

    oracle, oracle_grads = _run(sdpa, q.double(), k.double(), v.double(), grad_out.double())
    lowp, lowp_grads = _run(sdpa, q, k, v, grad_out)
    ours, our_grads = _run(lambda *t: ops.attention(*t, scale=scale, backend=backend), q, k, v, grad_out)
    assert ours.dtype == q.dtype
    assert_budget("out", ours, lowp, oracle)
    for name, g, g_lowp, g_oracle in zip(("dq", "dk", "dv"), our_grads, lowp_grads, oracle_grads):
        assert g.dtype == q.dtype
        assert_budget(name, g, g_lowp, g_oracle)
    return ours, our_grads


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_matches_oracle(backend, dtype, shape):
    _, q, k, v = _qkv(*shape, dtype)
    ours, _ = _check(backend, q, k, v)
    if backend == "triton":
        B, H, N, D = shape
        # Written in (B, N, H, D) memory: the model's reshape to (B, N, H * D) is a view.
        assert ours.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("shape", [(1, 1, 1, 32), (2, 1, 197, 64), (1, 2, 23, 96), (1, 1, 257, 80)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_three_launch_backward(monkeypatch, dtype, shape):
    """The triton backward has two forms: one launch per (batch, head) (what the interpreter and large batches
    run) and three launches (small batches on a GPU). The three-launch one on awkward shapes, forced."""
    require_backend("triton", "attention")
    from vitkernels.triton import attention as A

    monkeypatch.setattr(A, "fused_bwd_min_bh", lambda device: 2**31)
    _, q, k, v = _qkv(*shape, dtype)
    _check("triton", q, k, v)


@pytest.mark.parametrize("shape", [(1, 1, 1, 32), (2, 3, 197, 64), (1, 2, 77, 80)], ids=lambda s: "x".join(map(str, s)))
def test_attention_fp32_composed_path(monkeypatch, shape):
    """fp32 CUDA tensors take the triton backend's composed path (no fp32 tile compiles spill-free for a GPU);
    forced here on CPU, forward and backward, with the output layout of the kernels."""
    require_backend("triton", "attention")
    from vitkernels.triton import attention as A

    monkeypatch.setattr(A, "_composed", lambda q: True)
    monkeypatch.setattr(A, "_batch_chunks", lambda q, M: [slice(b, b + 1) for b in range(q.shape[0])])
    _, q, k, v = _qkv(*shape, torch.float32)
    ours, _ = _check("triton", q, k, v)
    assert ours.transpose(1, 2).is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_cross_lengths_and_layouts(backend, dtype):
    """Keys longer than queries (M != N), contiguous (B, H, N, D) inputs, a non-default scale."""
    q = torch.randn(2, 3, 7, 64, device=DEVICE, dtype=dtype)
    k = torch.randn(2, 3, 45, 64, device=DEVICE, dtype=dtype)
    v = torch.randn(2, 45, 3, 64, device=DEVICE, dtype=dtype).transpose(1, 2)  # yet another layout
    _check(backend, q, k, v, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_rerun_bit_identical(backend, dtype):
    _, q, k, v = _qkv(3, 2, 50, 64, dtype)
    grad_out = torch.randn(q.shape, device=DEVICE, dtype=dtype)

    def fn(*t):
        return ops.attention(*t, backend=backend)

    out1, grads1 = _run(fn, q, k, v, grad_out)
    out2, grads2 = _run(fn, q, k, v, grad_out)
    assert torch.equal(out1, out2)
    for g1, g2 in zip(grads1, grads2):
        assert torch.equal(g1, g2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_large_scores_stay_finite(backend):
    """Scores far beyond exp's fp32 range: the online softmax must subtract the row max (no inf / NaN)."""
    _, q, k, v = _qkv(1, 2, 37, 32, torch.float32, requires_grad=False)
    q = q * 300.0
    out = ops.attention(q, k, v, backend=backend)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double())
    assert torch.isfinite(out).all()
    assert (out.double() - ref).abs().max().item() < 1e-3


@settings(max_examples=4, deadline=None, derandomize=True)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    N=st.integers(1, 70),
    M=st.integers(1, 70),
    D=st.sampled_from([16, 32, 40, 64, 80]),
)
def test_attention_property(B, H, N, M, D):
    require_backend("triton", "attention")
    torch.manual_seed(B * 1000 + H * 100 + N * 10 + M + D)
    q = torch.randn(B, N, H, D, device=DEVICE).transpose(1, 2)
    k = torch.randn(B, H, M, D, device=DEVICE)
    v = torch.randn(B, H, M, D, device=DEVICE)
    _check("triton", q, k, v)


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="attention"))
def test_attention_lse(backend):
    """The saved statistic is the natural-log log-sum-exp of each row of the scaled scores."""
    _, q, k, v = _qkv(1, 2, 41, 32, torch.float32, requires_grad=False)
    impl = require_backend(backend, "attention")
    _, lse = getattr(torch.ops, impl.NAMESPACE).attention_fwd(q, k, v, None, 0.2)
    ref = torch.logsumexp((q.double() @ k.double().transpose(-2, -1)) * 0.2, dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 41)
    assert (lse.double() - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="attention"))
def test_attention_compile_fullgraph(backend):
    """The public op on each backend traces without a graph break (dispatch, fake impls, autograd) and
    computes the same thing."""
    from vitkernels.backends import prepare
    from vitkernels.ops import attention

    prepare(backend)  # probing imports modules: done outside the traced region, as the model does
    torch._dynamo.reset()
    qkv, q, k, v = _qkv(2, 2, 13, 32, torch.float32)

    def block(qkv):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        o = attention(q, k, v, backend=backend)
        return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1).sin().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    out = compiled(qkv)
    (grad,) = torch.autograd.grad(out, qkv)
    ref_qkv = qkv.detach().clone().requires_grad_(True)
    ref = block(ref_qkv)
    (ref_grad,) = torch.autograd.grad(ref, ref_qkv)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, ref_grad)


def test_attention_huge_head_dim_is_refused_with_the_reason():
    require_backend("triton", "attention")
    q = torch.randn(1, 1, 2, 264, device=DEVICE)
    with pytest.raises(BackendError, match="head dims up to 256"):
        ops.attention(q, q, q, backend="triton")


# ---------------------------------------------------------------------------------------------------------
# Additive bias
# ---------------------------------------------------------------------------------------------------------
def _bias(shape, dtype, masked=None, expand_to=None):
    """A bias leaf of ``shape`` (values ~ N(0, 1), the scale of a learnt relative position bias); ``masked``:
    "keys" sets every third key to -inf, "rows" also masks every key of query row 1 (of each (b, h));
    ``expand_to``: the bias is handed to the op as an expanded (stride-0) view of the leaf. Returns
    (leaf, what the op gets as a function of the leaf)."""
    leaf = torch.randn(shape, device=DEVICE).to(dtype)
    if masked is not None:
        leaf[..., ::3] = float("-inf")
        if masked == "rows":
            leaf[..., 1, :] = float("-inf")
    leaf.requires_grad_(True)
    return leaf, (lambda b: b.expand(expand_to)) if expand_to is not None else (lambda b: b)


def _check_bias(backend, q, k, v, bias, as_given, scale=None):
    """Output, dq, dk, dv and dbias of the backend against the float64 oracle (the torch reference, SDPA with
    fully masked rows returning 0) under the budget; the low-precision reference is the same in q's dtype."""
    from vitkernels.ops.reference import attention as reference

    D = q.shape[-1]
    scale = D ** -0.5 if scale is None else scale
    grad_out = torch.randn(q.shape, device=q.device, dtype=q.dtype)

    def run(fn, dtype):
        leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
        b = bias.detach().to(dtype if bias.dtype != torch.float32 or dtype == torch.float64 else torch.float32)
        b.requires_grad_(True)
        out = fn(*leaves, as_given(b))
        out.backward(grad_out.to(out.dtype))
        return out, [t.grad for t in leaves] + [b.grad]

    oracle, oracle_grads = run(lambda q, k, v, b: reference(q, k, v, b, scale), torch.float64)
    lowp, lowp_grads = run(lambda q, k, v, b: reference(q, k, v, b, scale), q.dtype)
    ours, our_grads = run(lambda q, k, v, b: ops.attention(q, k, v, bias=b, scale=scale, backend=backend), q.dtype)
    assert ours.dtype == q.dtype
    assert_budget("out", ours, lowp, oracle)
    for name, g, g_lowp, g_oracle in zip(("dq", "dk", "dv", "dbias"), our_grads, lowp_grads, oracle_grads):
        assert g.dtype == (bias.dtype if name == "dbias" else q.dtype), (name, g.dtype)
        assert_budget(name, g, g_lowp, g_oracle)
    return ours, our_grads


# (name, (B, H, N, M, D), bias shape, masked, expanded to (B, H, N, M), bias dtype fp32 for fp16 inputs)
BIAS_CASES = [
    ("rel_pos", (2, 2, 197, 197, 64), (1, 2, 197, 197), None, False, False),  # BEiT-B/16 at 224
    ("full", (2, 2, 50, 50, 80), (2, 2, 50, 50), "keys", False, False),
    ("key_padding", (2, 2, 23, 45, 64), (2, 1, 1, 45), "keys", False, True),
    ("attn_pool", (2, 2, 1, 257, 80), (1, 2, 1, 257), None, False, True),  # one pooling query over 257 tokens
    ("masked_rows", (2, 2, 37, 37, 64), (2, 1, 37, 37), "rows", False, False),
    ("expanded", (2, 2, 37, 70, 64), (1, 2, 37, 70), "rows", True, False),
]


@pytest.mark.parametrize("case", BIAS_CASES, ids=lambda c: c[0])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bias_matches_oracle(backend, dtype, case):
    _, (B, H, N, M, D), shape, masked, expand, fp32_bias = case
    _, q, _, _ = _qkv(B, H, N, D, dtype)
    _, _, k, v = _qkv(B, H, M, D, dtype)
    bias_dtype = torch.float32 if fp32_bias else dtype
    bias, as_given = _bias(shape, bias_dtype, masked, (B, H, N, M) if expand else None)
    ours, grads = _check_bias(backend, q, k, v, bias, as_given)
    if masked == "rows":  # query row 1 sees no key: output 0, no gradient from it (and no NaN anywhere)
        assert (ours[:, :, 1] == 0).all()
        assert (grads[0][:, :, 1] == 0).all()
        assert (grads[3][..., 1, :] == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_attention_bias_three_launch_backward(monkeypatch, dtype):
    """The three-launch triton backward (dK/dV kernel storing dS, dQ kernel) with a bias, forced."""
    require_backend("triton", "attention")
    from vitkernels.triton import attention as A

    monkeypatch.setattr(A, "fused_bwd_min_bh", lambda device: 2**31)
    _, q, k, v = _qkv(1, 2, 77, 80, dtype)
    bias, as_given = _bias((1, 2, 77, 77), dtype, "rows")
    _check_bias("triton", q, k, v, bias, as_given)
    bias, as_given = _bias((1, 1, 1, 77), torch.float32, "keys")  # an fp32 key-padding mask
    _check_bias("triton", q, k, v, bias, as_given)


def test_attention_bias_fp32_composed_path(monkeypatch):
    """fp32 CUDA tensors' composed path (forced on CPU) with a bias, masked rows included."""
    require_backend("triton", "attention")
    from vitkernels.triton import attention as A

    monkeypatch.setattr(A, "_composed", lambda q: True)
    monkeypatch.setattr(A, "_batch_chunks", lambda q, M: [slice(b, b + 1) for b in range(q.shape[0])])
    _, q, k, v = _qkv(2, 2, 37, 64, torch.float32)
    for shape in ((2, 1, 37, 37), (1, 2, 37, 37)):
        bias, as_given = _bias(shape, torch.float32, "rows")
        ours, _ = _check_bias("triton", q, k, v, bias, as_given)
        assert ours.transpose(1, 2).is_contiguous()
        assert (ours[:, :, 1] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_bias_rerun_bit_identical_and_constant_mask(backend):
    """Reruns are bit-identical, dbias included (dS has one writer, torch.sum reduces it); a bias that does not
    require grad gets no dbias (the backward op is asked for none)."""
    _, q, k, v = _qkv(2, 2, 50, 64, torch.float32)
    bias = torch.randn(1, 2, 50, 50, device=DEVICE)
    grad_out = torch.randn(q.shape, device=DEVICE)

    def run():
        leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, bias)]
        ops.attention(*leaves[:3], bias=leaves[3], backend=backend).backward(grad_out)
        return [t.grad for t in leaves]

    for g1, g2 in zip(run(), run()):
        assert torch.equal(g1, g2)
    impl = require_backend(backend, "attention")
    ns = getattr(torch.ops, impl.NAMESPACE)
    out, lse = ns.attention_fwd(q, k, v, bias, 0.125)
    *_, dbias = ns.attention_bwd(grad_out, q, k, v, bias, out, lse, 0.125, False)
    assert dbias.shape == (0,)
    constant = bias.clone()  # requires no grad: a mask
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    ops.attention(*leaves, bias=constant, backend=backend).sum().backward()
    assert constant.grad is None and all(t.grad is not None for t in leaves)


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="attention"))
def test_attention_bias_lse_and_masked_rows(backend):
    """lse is the log-sum-exp of scale * q k^T + bias; +inf on a row the bias masked entirely (out 0 there)."""
    _, q, k, v = _qkv(1, 2, 41, 32, torch.float32, requires_grad=False)
    impl = require_backend(backend, "attention")
    bias = torch.randn(1, 1, 41, 41)
    bias[0, 0, 3] = float("-inf")
    out, lse = getattr(torch.ops, impl.NAMESPACE).attention_fwd(q, k, v, bias.to(DEVICE), 0.2)
    s = (q.double() @ k.double().transpose(-2, -1)) * 0.2 + bias.double().to(DEVICE)
    ref = torch.logsumexp(s, dim=-1)
    keep = torch.ones(41, dtype=torch.bool)
    keep[3] = False
    assert (lse[..., keep].double() - ref[..., keep]).abs().max().item() < 1e-5
    assert torch.isposinf(lse[..., 3]).all() and (out[:, :, 3] == 0).all()


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="attention"))
def test_attention_bias_compile_fullgraph(backend):
    """ops.attention with a bias (BEiT's relative position bias gathered from a learnt table, broadcast over the
    batch) traces without a graph break and matches eager, dbias included."""
    from vitkernels.backends import prepare
    from vitkernels.ops import attention

    prepare(backend)
    torch._dynamo.reset()
    qkv, _, _, _ = _qkv(2, 2, 13, 32, torch.float32)
    table = torch.randn(2, 13, 13, device=DEVICE, requires_grad=True)  # (H, N, N)

    def block(qkv, table):
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        o = attention(q, k, v, bias=table.unsqueeze(0), backend=backend)
        return o.transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1).sin().sum()

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager" if DEVICE.type == "cpu" else "inductor")
    out = compiled(qkv, table)
    grads = torch.autograd.grad(out, (qkv, table))
    leaves = (qkv.detach().clone().requires_grad_(True), table.detach().clone().requires_grad_(True))
    ref = block(*leaves)
    ref_grads = torch.autograd.grad(ref, leaves)
    torch.testing.assert_close(out, ref)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r)


def test_attention_bias_is_validated():
    q = torch.randn(2, 3, 5, 8, device=DEVICE)
    k = torch.randn(2, 3, 7, 8, device=DEVICE)
    with pytest.raises(ValueError, match="bool mask.*True = attend -> 0.0, False -> -inf"):
        ops.attention(q, k, k, bias=torch.ones(2, 1, 5, 7, dtype=torch.bool, device=DEVICE), backend="torch")
    with pytest.raises(ValueError, match=r"does not broadcast to \(B, H, N, M\)"):
        ops.attention(q, k, k, bias=torch.zeros(2, 2, 5, 7, device=DEVICE), backend="torch")
    with pytest.raises(ValueError, match="does not broadcast"):
        ops.attention(q, k, k, bias=torch.zeros(2, 3, 5, 1, device=DEVICE), backend="torch")  # keys are full
    with pytest.raises(ValueError, match="dtype"):
        ops.attention(q, k, k, bias=torch.zeros(5, 7, dtype=torch.float64, device=DEVICE), backend="torch")
    out = ops.attention(q, k, k, bias=torch.zeros(5, 7, device=DEVICE), backend="torch")  # 2-D: (1, 1, N, M)
    torch.testing.assert_close(out, ops.attention(q, k, k, backend="torch"))


@pytest.mark.parametrize("cap", [80, 90])
def test_attention_pruning_leaves_a_config_with_or_without_bias(monkeypatch, cap):
    """Every autotuner pruning rule leaves at least one configuration for every head-dim tile, dtype, target and
    bias flag (the bias rules drop the tiles that spill; an empty list would fail the launch)."""
    require_backend("triton", "attention")
    from vitkernels.triton import attention as A

    monkeypatch.setattr(A, "capability", lambda t: cap)
    rules = [(A._prune_fwd, A._FWD_CONFIGS), (A._prune_dkdv, A._BWD_DKDV_CONFIGS), (A._prune_dq, A._BWD_DQ_CONFIGS),
             (A._prune_fused_bwd, A._BWD_FUSED_CONFIGS)]
    for dtype in (torch.float16, torch.float32):
        for block_d in (16, 32, 64, 128, 256):
            for has_bias in (False, True):
                for prune, configs in rules:
                    kept = prune(configs, {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=block_d, HAS_BIAS=has_bias)
                    assert kept, (prune.__name__, dtype, block_d, has_bias, cap)
