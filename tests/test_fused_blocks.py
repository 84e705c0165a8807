"""The memory-lean block's fused ops against a float64 oracle, and the lean block itself.

- ``ops.ln_linear`` (LayerNorm fused into the next GEMM) and ``ops.ln_mlp`` (norm2 -> fc1 -> GELU -> fc2
  [+ x] as one op): forward and every gradient within 2x PyTorch's own error in the same precision, finite,
  bit-identical reruns; rows N = 197, 257, 577 and 1, odd widths, LayerNorm with and without affine
  parameters, strided inputs, gradient subsets, no-grad inference, torch.compile(fullgraph=True).
- The lean block (default) against the per-op block (``lean=False``) and timm: same outputs and gradients,
  with LayerScale / stochastic depth / dropout (the paths that fall back or split), and what it saves for
  backward (the byte targets of the whole model are in tests/test_memory.py).
The two ops are tested in one file because they are one feature and share the oracle harness.
"""

from __future__ import annotations

import pytest
import torch

from oracle import DEVICE, DTYPES, FUSED, assert_budget, backend_params, require_backend
from vitkernels import ops

LN_LINEAR = backend_params(*FUSED, op="ln_linear")
LN_MLP = backend_params(*FUSED, op="ln_mlp")
EPS = 1e-6


def _ln_params(C, dtype, affine=True):
    if not affine:
        return None, None
    return (1 + 0.3 * torch.randn(C, device=DEVICE)).to(dtype), (0.2 * torch.randn(C, device=DEVICE)).to(dtype)


def _weight(M, K, dtype):
    return (torch.randn(M, K, device=DEVICE) / K**0.5).to(dtype)


def _grads(fn, tensors: dict, dy):
    """Run fn(**leaves) and return {"y": out, "d<name>": grad} for every tensor input (None inputs skipped)."""
    leaves = {k: t.detach().clone().requires_grad_() for k, t in tensors.items() if t is not None}
    y = fn(**{k: leaves.get(k) for k in tensors})
    got = torch.autograd.grad(y, list(leaves.values()), dy)
    return {"y": y.detach(), **{f"d{k}": g for k, g in zip(leaves, got)}}


def _check(fn, tensors, backend, dy=None, rerun=False):
    """fn(backend, **tensors) on ``backend`` vs the torch backend in the same dtype and in float64."""
    x = tensors["x"]
    probe = fn("torch", **{k: (t.detach() if t is not None else None) for k, t in tensors.items()})
    dy = torch.randn(probe.shape, device=x.device, dtype=x.dtype) if dy is None else dy
    ours = _grads(lambda **t: fn(backend, **t), tensors, dy)
    lowp = _grads(lambda **t: fn("torch", **t), tensors, dy)
    d = {k: (t.double() if t is not None else None) for k, t in tensors.items()}
    oracle = _grads(lambda **t: fn("torch", **t), d, dy.double())
    assert set(ours) == set(oracle)
    for name in oracle:
        assert ours[name].dtype == x.dtype, f"{name}: dtype {ours[name].dtype} != {x.dtype}"
        assert_budget(name, ours[name], lowp[name], oracle[name])
    if rerun:
        again = _grads(lambda **t: fn(backend, **t), tensors, dy)
        for name in ours:
            assert torch.equal(ours[name], again[name]), f"{name}: rerun is not bit-identical"
    return ours


def _ln_linear(backend, x, ln_weight, ln_bias, weight, bias):
    return ops.ln_linear(x, ln_weight, ln_bias, weight, bias, eps=EPS, backend=backend)


def _ln_mlp(add_input, activation="gelu"):
    def fn(backend, x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias):
        return ops.ln_mlp(x, ln_weight, ln_bias, fc1_weight, fc1_bias, fc2_weight, fc2_bias, eps=EPS,
                          add_input=add_input, activation=activation, backend=backend)

    return fn


# ---------------------------------------------------------------------------------------------------------
# ln_linear: (leading shape, K, M, LN affine, bias). N = 197 / 257 / 577 rows, B = 1, odd widths, D = 80 heads
# (qkv of C = 80: M = 240).
LN_LINEAR_CASES = [
    ((1, 197), 80, 240, True, True),
    ((257,), 48, 144, True, False),
    ((577,), 40, 120, False, True),
    ((1,), 33, 35, True, True),
    ((2, 7), 200, 72, True, True),
]


def _ln_linear_id(case):
    lead, K, M, affine, bias = case
    return f"{'x'.join(map(str, lead))}-{K}to{M}-{'aff' if affine else 'noaff'}-{'b' if bias else 'nob'}"


@pytest.mark.parametrize("backend", LN_LINEAR)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LN_LINEAR_CASES, ids=_ln_linear_id)
def test_ln_linear(backend, dtype, case):
    lead, K, M, affine, bias = case
    lw, lb = _ln_params(K, dtype, affine)
    x = (torch.randn(*lead, K, device=DEVICE) * 2 + 0.5).to(dtype)  # a non-zero mean: LN's statistics matter
    tensors = dict(x=x, ln_weight=lw, ln_bias=lb, weight=_weight(M, K, dtype),
                   bias=(0.5 * torch.randn(M, device=DEVICE)).to(dtype) if bias else None)
    _check(_ln_linear, tensors, backend, rerun=lead in ((1,), (2, 7)))


# ln_mlp: (leading shape, C, H, LN affine, biases, add_input)
LN_MLP_CASES = [
    ((1, 197), 48, 192, True, True, True),
    ((257,), 40, 160, True, True, False),
    ((577,), 24, 96, False, True, True),
    ((1,), 80, 320, True, False, True),
    ((7,), 33, 70, True, True, True),
]


def _ln_mlp_id(case):
    lead, C, H, affine, bias, add = case
    return (f"{'x'.join(map(str, lead))}-{C}x{H}-{'aff' if affine else 'noaff'}-{'b' if bias else 'nob'}-"
            f"{'add' if add else 'noadd'}")


def _ln_mlp_tensors(lead, C, H, dtype, affine=True, bias=True):
    lw, lb = _ln_params(C, dtype, affine)
    bias_of = lambda n: (0.5 * torch.randn(n, device=DEVICE)).to(dtype) if bias else None  # noqa: E731
    return dict(x=(torch.randn(*lead, C, device=DEVICE) * 2 + 0.5).to(dtype), ln_weight=lw, ln_bias=lb,
                fc1_weight=_weight(H, C, dtype), fc1_bias=bias_of(H), fc2_weight=_weight(C, H, dtype),
                fc2_bias=bias_of(C))


@pytest.mark.parametrize("backend", LN_MLP)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", LN_MLP_CASES, ids=_ln_mlp_id)
def test_ln_mlp(backend, dtype, case):
    lead, C, H, affine, bias, add = case
    _check(_ln_mlp(add), _ln_mlp_tensors(lead, C, H, dtype, affine, bias), backend, rerun=lead in ((1,), (7,)))


@pytest.mark.parametrize("backend", LN_MLP)
@pytest.mark.parametrize("activation", ["gelu_tanh", "quick_gelu", "silu"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_ln_mlp_other_activations(backend, activation, dtype):
    """The other families' activations (SigLIP2's tanh-GELU, CLIP's QuickGELU, SiLU) through the whole fused
    MLP: the fc1 epilogue, the activation prologue of fc2 and of dW2, and act'(z) in the dz GEMM's epilogue;
    N = 197 rows, odd widths, every gradient."""
    _check(_ln_mlp(True, activation), _ln_mlp_tensors((1, 197), 40, 72, dtype), backend)


def test_ln_mlp_rejects_unknown_activation():
    t = _ln_mlp_tensors((3,), 8, 16, torch.float32)
    with pytest.raises(ValueError, match="activation must be one of"):
        ops.ln_mlp(*t.values(), activation="relu", backend="torch")


@pytest.mark.parametrize("backend", LN_MLP)
def test_ln_mlp_fc2_bias_gradient_with_many_row_slices(backend):
    """The fc1 bias gradient is summed in the dz GEMM's epilogue per 64-row slice, then over slices: rows
    past one slice (and a partial last slice) must all count."""
    _check(_ln_mlp(True), _ln_mlp_tensors((3, 65), 16, 40, torch.float32), backend)


@pytest.mark.parametrize("backend", LN_LINEAR)
def test_fused_ops_strided_inputs(backend):
    """x a (B, N, C) view transposed in B and N, weights transposed views, a stride-0 output gradient."""
    B, N, C, H = 2, 7, 24, 40
    x = torch.randn(N, B, C, device=DEVICE).transpose(0, 1)
    tensors = dict(x=x, ln_weight=torch.randn(C, device=DEVICE), ln_bias=torch.randn(C, device=DEVICE),
                   weight=torch.randn(C, H, device=DEVICE).t(), bias=torch.randn(H, device=DEVICE))
    _check(_ln_linear, tensors, backend, dy=torch.randn(1, 1, H, device=DEVICE).expand(B, N, H))
    tensors = _ln_mlp_tensors((B, N), C, H, torch.float32)
    tensors["x"] = x
    tensors["fc1_weight"] = torch.randn(C, H, device=DEVICE).t() / C**0.5
    _check(_ln_mlp(True), tensors, backend, dy=torch.randn(1, 1, C, device=DEVICE).expand(B, N, C))


@pytest.mark.parametrize("backend", LN_MLP)
@pytest.mark.parametrize("wants", [("x",), ("ln_weight", "ln_bias"), ("fc1_weight",), ("fc1_bias",),
                                   ("fc2_weight", "fc2_bias"), ("weight",)], ids=lambda w: "+".join(w))
def test_fused_ops_gradient_subsets(backend, wants):
    """Only the inputs that require grad get a gradient, and it is right (the other GEMMs are skipped)."""
    if wants == ("weight",):  # ln_linear's GEMM weight alone
        t = dict(x=torch.randn(9, 24, device=DEVICE), ln_weight=torch.randn(24, device=DEVICE),
                 ln_bias=torch.randn(24, device=DEVICE), weight=torch.randn(40, 24, device=DEVICE),
                 bias=torch.randn(40, device=DEVICE))
        fn = _ln_linear
    else:
        t, fn = _ln_mlp_tensors((9,), 24, 40, torch.float32), _ln_mlp(True)
    for name in wants:
        t[name].requires_grad_()
    y = fn(backend, **t)
    dy = torch.randn_like(y)
    got = torch.autograd.grad(y, [t[n] for n in wants], dy)
    ref = {k: v.detach().double().requires_grad_() for k, v in t.items()}
    expected = torch.autograd.grad(fn("torch", **ref), [ref[n] for n in wants], dy.double())
    for name, g, e in zip(wants, got, expected):
        torch.testing.assert_close(g.double(), e, rtol=1e-4, atol=1e-4, msg=lambda m: f"d{name}: {m}")


@pytest.mark.parametrize("backend", LN_MLP)
def test_fused_ops_inference_and_empty(backend):
    """No grad: the same outputs; zero rows give empty outputs."""
    t = _ln_mlp_tensors((5,), 24, 40, torch.float32)
    with torch.no_grad():
        y = _ln_mlp(True)(backend, **t)
        ref = _ln_mlp(True)("torch", **{k: v.double() for k, v in t.items()})
        torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)
        assert _ln_mlp(True)(backend, **dict(t, x=t["x"][:0])).shape == (0, 24)
        lin = dict(x=t["x"][:0], ln_weight=None, ln_bias=None, weight=t["fc1_weight"], bias=None)
        assert _ln_linear(backend, **lin).shape == (0, 40)


@pytest.mark.parametrize("backend", LN_MLP)
def test_fused_ops_compile_fullgraph(backend):
    """torch.compile(fullgraph=True) traces a lean block's ops (no graph break) and matches eager; the MLP with
    QuickGELU (CLIP): the activation is a string argument of the op, part of its schema."""
    impl = require_backend(backend, "ln_mlp")
    ln_linear, ln_mlp = impl.get_op("ln_linear"), impl.get_op("ln_mlp")
    torch._dynamo.reset()

    def half_block(x, lw, lb, w1, b1, w2, b2, wq):
        q = ln_linear(x, lw, lb, EPS, wq, None)
        return (ln_mlp(x, lw, lb, EPS, w1, b1, w2, b2, True, "quick_gelu") + q).square().sum()

    t = _ln_mlp_tensors((2, 7), 24, 48, torch.float32)
    inputs = [v.requires_grad_() for v in t.values()] + [_weight(24, 24, torch.float32).requires_grad_()]
    compiled = torch.compile(half_block, fullgraph=True, backend="aot_eager")
    loss_c = compiled(*inputs)
    grads_c = torch.autograd.grad(loss_c, inputs)
    loss_e = half_block(*inputs)
    grads_e = torch.autograd.grad(loss_e, inputs)
    torch.testing.assert_close(loss_c, loss_e)
    for gc, ge in zip(grads_c, grads_e):
        torch.testing.assert_close(gc, ge)


# ---------------------------------------------------------------------------------------------------------
# The lean block
def _vit(backend, lean, **kw):
    import vitkernels

    torch.manual_seed(0)
    cfg = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5, backend=backend,
               lean_blocks=lean)
    return vitkernels.VisionTransformer(**{**cfg, **kw}).to(DEVICE)


@pytest.mark.parametrize("backend", backend_params("torch", *FUSED, op="ln_mlp"))
@pytest.mark.parametrize("extra", [{}, {"init_values": 0.1, "drop_path_rate": 0.2},
                                   {"proj_drop_rate": 0.1, "attn_drop_rate": 0.1}],
                         ids=["plain", "layerscale_droppath", "dropout"])
def test_lean_block_matches_per_op_block(backend, extra):
    """Lean and per-op blocks compute the same function and gradients (training mode, same RNG draws)."""
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    results = []
    for lean in (True, False):
        model = _vit(backend, lean, **extra).train()
        torch.manual_seed(1)
        loss = model(images).square().sum()
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_l, g_l), (loss_p, g_p) = results
    torch.testing.assert_close(loss_l, loss_p, rtol=1e-5, atol=1e-5)
    for n in g_p:
        torch.testing.assert_close(g_l[n], g_p[n], rtol=1e-4, atol=1e-5, msg=lambda m: f"{n}: {m}")


def _saved_storages(model, images):
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    kept = {}

    def pack(t):
        st = t.untyped_storage()
        if st._cdata not in params:
            kept[st._cdata] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(images)
    return sum(kept.values())


@pytest.mark.parametrize("backend", backend_params(*FUSED, op="ln_mlp"))
def test_lean_block_keeps_ten_values_per_token(backend):
    """Per block the lean path keeps x, qkv (3 C), o, x1, z (4 C): 10 C per token, plus fp32 statistics
    (2 LayerNorms x (mean, rstd)) and the attention's fp32 log-sum-exp; the per-op path keeps 16 C."""
    B, N, C, H = 2, 17, 48, 3  # 32 px / patch 8: 16 patches + class token
    images = torch.randn(B, 3, 32, 32, device=DEVICE)
    per_block = {}
    for lean in (True, False):
        one, two = (_saved_storages(_vit(backend, lean, depth=d), images) for d in (1, 2))
        per_block[lean] = two - one
    stats = 4 * B * N * 4 + B * H * N * 4
    assert per_block[True] == 10 * B * N * C * 4 + stats
    assert per_block[False] == 16 * B * N * C * 4 + stats


@pytest.mark.parametrize("backend", backend_params("torch", *FUSED, op="ln_mlp"))
@pytest.mark.parametrize("lean", [True, False], ids=["lean", "per_op"])
def test_grad_checkpointing_composes(backend, lean):
    """none / selective / full checkpointing: the same loss and gradients; full recomputes one forward of the
    blocks (FlopCounterMode counts it), selective recomputes no GEMM or attention."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    results = {}
    for mode in ("none", "selective", "full"):
        model = _vit(backend, lean)
        if mode != "none":
            model.set_grad_checkpointing(True, selective=mode == "selective")
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            loss = model(images).square().sum()
            loss.backward()
        results[mode] = (loss.detach(), {n: p.grad for n, p in model.named_parameters()},
                         counter.get_total_flops())
    loss0, grads0, flops0 = results["none"]
    for mode in ("selective", "full"):
        loss, grads, _ = results[mode]
        torch.testing.assert_close(loss, loss0)
        for n in grads0:
            torch.testing.assert_close(grads[n], grads0[n], rtol=1e-5, atol=1e-6, msg=lambda m: f"{mode} {n}: {m}")
    from vitkernels import flops

    model = _vit(backend, lean)
    recomputed = (flops.count(model, batch_size=2, training=True, recompute=True).total
                  - flops.count(model, batch_size=2, training=True, recompute=False).total)
    assert results["selective"][2] == flops0
    # At most one forward of the blocks more: torch's non-reentrant checkpoint stops recomputing once every
    # saved tensor is back, so the torch backend skips fc2 (nothing saves its output); the fused ops return
    # what they save, so they are rerun to the end.
    assert flops0 < results["full"][2] <= flops0 + 1.01 * recomputed
    if backend != "torch":
        assert abs(results["full"][2] - flops0 - recomputed) <= 0.01 * recomputed


# ---------------------------------------------------------------------------------------------------------
# Autocast: an fp32 residual stream (fp32 x) with low-precision parameters. The C++ CPU twin has no fp16
# kernels, so the cuda backend joins on a GPU only.
AMP_DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float16
AMP_BACKENDS = backend_params(*(FUSED if DEVICE.type == "cuda" else ("triton",)), op="ln_mlp")


@pytest.mark.parametrize("backend", AMP_BACKENDS)
@pytest.mark.parametrize("op", ["ln_linear", "ln_mlp"])
def test_fused_ops_fp32_input_under_autocast(backend, op):
    """Under autocast an fp32 x stays fp32: LayerNorm in fp32, the GEMMs in the autocast dtype, ln_mlp's
    residual add in fp32 (fp32 output); every gradient within 2x of PyTorch's autocast error."""
    t = _ln_mlp_tensors((2, 33), 24, 40, torch.float32)
    fn = _ln_mlp(True)
    if op == "ln_linear":
        t = dict(x=t["x"], ln_weight=t["ln_weight"], ln_bias=t["ln_bias"], weight=t["fc1_weight"],
                 bias=t["fc1_bias"])
        fn = _ln_linear

    def run(backend, tensors, amp):
        with torch.autocast(DEVICE.type, dtype=AMP_DTYPE, enabled=amp):
            return fn(backend, **tensors)

    dy = torch.randn(run("torch", t, False).shape, device=DEVICE)
    ours = _grads(lambda **a: run(backend, a, True), t, dy)
    lowp = _grads(lambda **a: run("torch", a, True), t, dy)
    oracle = _grads(lambda **a: run("torch", a, False), {k: v.double() for k, v in t.items()}, dy.double())
    assert ours["y"].dtype == (torch.float32 if op == "ln_mlp" else AMP_DTYPE)
    for name in oracle:
        assert name == "y" or ours[name].dtype == torch.float32, name  # gradients of the fp32 leaves
        assert_budget(name, ours[name], lowp[name], oracle[name], floor=1e-3)


@pytest.mark.parametrize("backend", AMP_BACKENDS)
def test_fp32_residual_stream_under_autocast(backend):
    """fp32_residual=True keeps the stream fp32 under autocast (timm's behaviour): block outputs are fp32, and
    on a stream of large magnitude (|x| ~ 100, where a 16-bit float's spacing is 0.06) the block's output
    keeps what the branches add, while the default low-precision stream rounds it away."""
    torch.manual_seed(0)
    images = torch.randn(2, 3, 32, 32, device=DEVICE)
    x = 100 * torch.randn(2, 17, 48, device=DEVICE)  # a block's input: the stream
    errs = {}
    for fp32 in (False, True):
        model = _vit(backend, True, fp32_residual=fp32)
        block = model.blocks[0]
        oracle = _vit("torch", True).double().blocks[0](x.double())
        with torch.autocast(DEVICE.type, dtype=AMP_DTYPE):
            y = block(x if fp32 else x.to(AMP_DTYPE))
            out = model(images)
        assert y.dtype == (torch.float32 if fp32 else AMP_DTYPE)
        out.float().sum().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        errs[fp32] = (y.double() - oracle).abs().max().item()
    assert errs[True] < 0.2 * errs[False], errs


# ---------------------------------------------------------------------------------------------------------
# Attention on the fused qkv: d(qkv) in one buffer
ATTN_QKV = backend_params(*FUSED, op="attention_qkv")


@pytest.mark.parametrize("backend", ATTN_QKV)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 197, 2, 64), (2, 257, 1, 80), (1, 50, 3, 32)], ids=lambda s: "x".join(map(str, s)))
def test_attention_qkv(backend, dtype, shape):
    """Forward and d(qkv) within budget against float64, bit-identical reruns; q, k, v read through their
    strides in qkv, d(qkv) returned whole, contiguous, in qkv's layout."""
    B, N, H, D = shape
    qkv = torch.randn(B, N, 3 * H * D, device=DEVICE).to(dtype)

    def fn(backend, x):
        return ops.attention_qkv(x, H, backend=backend)

    ours = _check(lambda backend, x, **_: fn(backend, x), dict(x=qkv), backend, rerun=True)
    assert ours["dx"].is_contiguous() and ours["dx"].shape == qkv.shape


def test_attention_grid_holds_for_any_batch():
    """B * H rides on grid axis 0 (2^31 - 1 blocks), the sequence blocks on axis 1 (65,535): ViT-B inference at
    batch 100,000 (B * H = 1.2 M, past axis 1's limit) is launchable; checked on the grid arithmetic alone."""
    pytest.importorskip("triton")
    from vitkernels.triton.attention import MAX_GRID_X, MAX_GRID_Y, launch_grid, why_not_supported

    x, y = launch_grid(100_000 * 12, 197, 32)
    assert x == 1_200_000 <= MAX_GRID_X and y == 7 <= MAX_GRID_Y
    assert why_not_supported(torch.device("cuda"), torch.bfloat16, 64, 100_000 * 12) is None
    assert "grid axis 0" in why_not_supported(torch.device("cuda"), torch.bfloat16, 64, 2**31)


@pytest.mark.parametrize("backend", ATTN_QKV)
def test_lean_block_attention_saves_one_qkv_and_stacks_nothing(backend):
    """The block's attention goes through attention_qkv: its backward dispatches no stack (the unbind backward
    of q, k, v views would stack dq, dk, dv into d(qkv))."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    model = _vit(backend, True)
    loss = model(torch.randn(2, 3, 32, 32, device=DEVICE)).sum()
    with Ops() as seen:
        loss.backward()
    assert not [n for n in seen.names if "stack" in n], seen.names
