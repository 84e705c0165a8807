"""Every tile the GPU autotuner may pick for the linear GEMM, checked numerically on the CPU.

Under TRITON_INTERPRET the launchers use one small interpreter config (``linear.interp_config``); here it is
replaced by each of ``linear._gpu_configs()`` in turn (after the autotuner's own pruning for the epilogue),
so each tile shape's tail masks, grouped ordering, subtiled epilogue and split-K arithmetic run against a
float64 oracle: every GEMM variant the ops launch (epilogues, LayerNorm / GELU prologues on either operand,
GELU' + column sums, split-K), on shapes with a tail in every dimension. fp32 operands ("ieee" dots, exact
in the interpreter) and fp16.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from oracle import require_backend

P, Q, S = 130, 140, 70  # one partial tile along every dimension for every config (tiles 64..256, BLOCK_S 32/64)
P_DW, Q_DW, S_DW = 40, 50, 300  # a weight-gradient GEMM: small output, long reduction (split-K)


def _configs():
    from vitkernels.triton.linear import _gpu_configs

    return _gpu_configs()


def _config_id(c):
    k = c.kwargs
    return f"{k['BLOCK_P']}x{k['BLOCK_Q']}x{k['BLOCK_S']}_w{c.num_warps}"


def _gelu_grad(z):
    return 0.5 * (1 + torch.erf(z / 2**0.5)) + z * torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5


def _ln(t, stats_dim):
    """LayerNorm statistics of t's rows (stats_dim=1) or columns (stats_dim=0), fp32, as the op computes them."""
    t = t.double()
    mean = t.mean(stats_dim)
    rstd = (t.var(stats_dim, unbiased=False) + 1e-6).rsqrt()
    return mean.float(), rstd.float()


VARIANTS = ("bias_residual", "gelu_save_z", "ln_prologue_a", "gelu_prologue_a_residual", "dgelu_colsum",
            "ln_prologue_b_split", "gelu_prologue_b_split")


def _run(L, variant, dtype):
    """(ours, oracle) pairs of one _gemm launch of ``variant``."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g).to(dtype)  # noqa: E731
    split = variant.endswith("split")
    p, q, s = (P_DW, Q_DW, S_DW) if split else (P, Q, S)
    a, b = rnd(s, p).t() if split else rnd(p, s), rnd(s, q)  # dW's a is a transposed view, as dz.t()
    bias, res, zin = rnd(q), rnd(p, q), rnd(p, q)
    out = torch.empty(p, q, dtype=dtype)
    A, B = a.double(), b.double()
    if variant == "bias_residual":
        L._gemm(a, b, out, bias=bias, residual=res)
        return [(out, A @ B + bias.double() + res.double())]
    if variant == "gelu_save_z":
        z = torch.empty(p, q, dtype=dtype)
        L._gemm(a, b, out, bias=bias, z=z, gelu=True)
        zr = A @ B + bias.double()
        return [(z, zr), (out, F.gelu(zr))]
    if variant == "ln_prologue_a":
        mean, rstd = _ln(a, 1)
        gamma, beta = rnd(s), rnd(s)
        L._gemm(a, b, out, bias=bias, a_pro=L.PRO_LN, ln=(mean, rstd, gamma, beta))
        an = F.layer_norm(A, (s,), gamma.double(), beta.double(), 1e-6)
        return [(out, an.to(dtype).double() @ B + bias.double())]
    if variant == "gelu_prologue_a_residual":
        L._gemm(a, b, out, bias=bias, residual=res, a_pro=L.PRO_GELU)
        return [(out, F.gelu(A).to(dtype).double() @ B + bias.double() + res.double())]
    if variant == "dgelu_colsum":
        partial = L.colsum_buffer(p, q, a.device)
        L._gemm(a, b, out, dgelu_z=zin, colsum=partial)
        dz = (A @ B) * _gelu_grad(zin.double())
        return [(out, dz), (partial.sum(0), dz.to(dtype).double().sum(0))]
    if variant == "ln_prologue_b_split":
        mean, rstd = _ln(b, 1)
        gamma, beta = rnd(q), rnd(q)
        L._gemm(a, b, out, b_pro=L.PRO_LN, ln=(mean, rstd, gamma, beta), split_k=True)
        bn = F.layer_norm(B, (q,), gamma.double(), beta.double(), 1e-6)
        return [(out, A @ bn.to(dtype).double())]
    L._gemm(a, b, out, b_pro=L.PRO_GELU, split_k=True)
    return [(out, A @ F.gelu(B).to(dtype).double())]


_FLAGS = {"dgelu_colsum": dict(DGELU=True, COLSUM=True), "gelu_save_z": dict(GELU=True, SAVE_Z=True),
          "gelu_prologue_a_residual": dict(A_PRO=2), "gelu_prologue_b_split": dict(B_PRO=2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("config", _configs(), ids=_config_id)
def test_gpu_config_in_the_interpreter(monkeypatch, config, variant, dtype):
    require_backend("triton", "linear")
    from vitkernels.triton import linear as L

    if config not in L._prune_configs([config], {"a_ptr": torch.empty(0, dtype=dtype)}, **_FLAGS.get(variant, {})):
        pytest.skip("the autotuner prunes this tile for this launch and dtype (other family, or it spills)")
    monkeypatch.setattr(L, "interp_config", lambda *_: (dict(config.kwargs), config.num_warps))
    if variant.endswith("split"):
        assert L.split_count(P_DW, Q_DW, S_DW, torch.device("cpu")) > 1  # the split path is what runs
    for ours, oracle in _run(L, variant, dtype):
        assert torch.isfinite(ours).all()
        scale = oracle.abs().max().item()
        tol = (2e-5 if dtype == torch.float32 else 4e-3) * max(scale, 1.0) * (S_DW / 64 if variant.endswith("split") else 1)
        err = (ours.double() - oracle).abs().max().item()
        assert err <= tol, f"{variant} {_config_id(config)} {dtype}: max error {err:.3e} > {tol:.3e}"


# ---------------------------------------------------------------------------------------------------------
# Attention: each kernel's GPU configs in turn (the other kernels keep the interpreter's blocks).
def _attention_configs():
    from vitkernels.triton import attention as A

    return [(name, c) for name, configs in (("fwd", A._FWD_CONFIGS), ("dkdv", A._BWD_DKDV_CONFIGS),
                                            ("dq", A._BWD_DQ_CONFIGS), ("fused", A._BWD_FUSED_CONFIGS))
            for c in configs]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("which,config", _attention_configs(),
                         ids=[f"{w}-{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}" for w, c in _attention_configs()])
def test_attention_gpu_config_in_the_interpreter(monkeypatch, which, config, dtype):
    """Forward and backward with one GPU config of one kernel, N = 77 and M = 77 (a tail for every block
    size), against float64. The dK/dV and dQ configs run the three-launch backward,
    the others the one-launch backward."""
    require_backend("triton", "attention")
    from vitkernels.triton import attention as A

    # D = 80 (padded to 128), or 64 for a tile pruned at wider heads (where it spills on sm_90a)
    prune = {"fwd": A._prune_fwd, "dkdv": A._prune_dkdv, "dq": A._prune_dq, "fused": A._prune_wide_heads}
    D = 80 if prune[which]([config], {"Q": torch.empty(0, dtype=dtype)}, BLOCK_D=128) else 64
    plain = {"fwd": A._attention_fwd_kernel, "dkdv": A._attention_bwd_dkdv_kernel, "dq": A._attention_bwd_dq_kernel,
             "fused": A._attention_bwd_fused_kernel}
    default = A._kernel
    monkeypatch.setattr(A, "fused_bwd_min_bh", lambda device: 2**31 if which in ("dkdv", "dq") else 1)

    def kernel(tuned, plain_kernel):
        if plain_kernel is plain[which]:
            return plain_kernel, dict(config.kwargs)
        return default(tuned, plain_kernel)

    monkeypatch.setattr(A, "_kernel", kernel)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 77, D, generator=g).to(dtype) for _ in range(3))
    do = torch.randn(1, 2, 77, D, generator=g).to(dtype)
    o, lse = A.attention_fwd(q, k, v, None, D ** -0.5)
    grads = A.attention_bwd(do, q, k, v, None, o, lse, D ** -0.5, False)[:3]
    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    ref = F.scaled_dot_product_attention(*leaves, scale=D ** -0.5)
    ref_grads = torch.autograd.grad(ref, leaves, do.double())
    tol = 2e-5 if dtype == torch.float32 else 1e-2
    for name, ours, oracle in zip(("o", "dq", "dk", "dv"), (o, *grads), (ref, *ref_grads)):
        err = (ours.double() - oracle).abs().max().item()
        assert err <= tol * max(1.0, oracle.abs().max().item()), f"{which} {name}: {err:.3e}"


# ---------------------------------------------------------------------------------------------------------
# Patch embedding: the GEMM tiles of its three kernels.
def _patch_tiles():
    from vitkernels.triton import patch_embed as PE

    return PE._TILES


@pytest.mark.parametrize("tile", _patch_tiles(), ids=lambda t: "x".join(map(str, t[:3])) + f"_w{t[3]}_s{t[4]}")
def test_patch_embed_gpu_config_in_the_interpreter(monkeypatch, tile):
    """Forward and both gradients with one GPU tile for all three kernels, fp32: 3 x 40 x 56 images, patch
    8 (K = 192), D = 136 (3 x 42 x 70, patch 14, K = 588 for the gathered-load tiles): a tail along every
    dimension for every tile; class token and position embedding."""
    require_backend("triton", "patch_embed")
    import triton

    from vitkernels import ops
    from vitkernels.triton import patch_embed as PE

    *blocks, warps, stages = tile
    for kernel, names in ((PE._fwd_kernel, ("BLOCK_M", "BLOCK_D", "BLOCK_K")),
                          (PE._bwd_dw_kernel, ("BLOCK_D", "BLOCK_K", "BLOCK_M")),
                          (PE._bwd_dx_kernel, ("BLOCK_M", "BLOCK_K", "BLOCK_D"))):
        monkeypatch.setattr(kernel, "configs", [triton.Config(dict(zip(names, blocks)), num_warps=warps,
                                                              num_stages=stages)])
    g = torch.Generator().manual_seed(0)
    # The tiles for gathered loads serve patch sizes that are not a power of two: run them at patch 14.
    D, P = 136, (14 if PE._FAMILY[tuple(tile)] == "gather" else 8)
    H, W = (5 * P, 7 * P) if P == 8 else (3 * P, 5 * P)
    N = (H // P) * (W // P)
    t = dict(images=torch.randn(2, 3, H, W, generator=g), weight=torch.randn(D, 3, P, P, generator=g) / 14,
             bias=torch.randn(D, generator=g), pos=torch.randn(1, N + 1, D, generator=g),
             cls=torch.randn(1, 1, D, generator=g))
    dy = torch.randn(2, N + 1, D, generator=g)

    def run(backend, tensors):
        leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
        y = ops.patch_embed(leaves["images"], leaves["weight"], leaves["bias"], pos_embed=leaves["pos"],
                            cls_token=leaves["cls"], backend=backend)
        return [y, *torch.autograd.grad(y, list(leaves.values()), dy.to(y.dtype))]

    ours = run("triton", t)
    oracle = run("torch", {k: v.double() for k, v in t.items()})
    for i, (a, b) in enumerate(zip(ours, oracle)):
        err = (a.double() - b).abs().max().item()
        assert err <= 2e-5 * max(1.0, b.abs().max().item()), f"output {i}: {err:.3e}"
