"""Fused attention (forward + dq/dk/dv) against a float64 oracle, over the sequence lengths and head dims ViTs
have, with q/k/v as strided views of a fused (B, N, 3, H, D) qkv buffer; registration (opcheck,
torch.compile); determinism; a property test over shapes.

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
    _, lse = getattr(torch.ops, impl.NAMESPACE).attention_fwd(q, k, v, 0.2)
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
