"""A ViT on each fused backend matches the torch backend (logits and every parameter gradient), and compiles
with torch.compile(fullgraph=True). On CPU the triton backend runs in Triton's interpreter and the cuda
backend on the extension's C++ twin; a backend missing an op is skipped with its reason."""

from __future__ import annotations

import copy

import pytest
import torch

from oracle import DEVICE, DTYPES, FUSED, assert_budget, backend_params
from vitkernels import VisionTransformer
from vitkernels.backends import OPS, get_impl, why_not

CONFIGS = {
    # N = 197 tokens (224 / 16), head dim 32, odd MLP width
    "n197": dict(img_size=224, patch_size=16, embed_dim=64, depth=1, num_heads=2, mlp_ratio=1.5, num_classes=5),
    # odd grid 3x5 + cls, head dim 80 (ViT-H/14's), LayerScale + avg pooling (the LN+residual path)
    "d80_layerscale": dict(img_size=(24, 40), patch_size=8, embed_dim=160, depth=2, num_heads=2, num_classes=3,
                           init_values=0.1, global_pool="avg", in_chans=1),
}


def _needs_all_ops(backend):
    why = why_not(backend, DEVICE)
    if why is None:
        missing = [op for op in OPS
                   if get_impl(backend).get_op(op) is None]
        why = f"{backend} backend lacks {missing}" if missing else None
    if why:
        pytest.skip(why)


def _run(model, x):
    model.zero_grad(set_to_none=True)
    out = model(x)
    out.float().square().sum().backward()
    return out, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_model_matches_torch_backend(backend, cfg, dtype):
    _needs_all_ops(backend)
    kw = CONFIGS[cfg]
    base = VisionTransformer(**kw, backend="torch").to(DEVICE).train()
    size = kw["img_size"] if isinstance(kw["img_size"], tuple) else (kw["img_size"],) * 2
    x = torch.randn(2, kw.get("in_chans", 3), *size, device=DEVICE)

    oracle_out, oracle_grads = _run(copy.deepcopy(base).double(), x.double())
    ref_out, ref_grads = _run(copy.deepcopy(base).to(dtype), x.to(dtype))
    fused = copy.deepcopy(base).to(dtype).set_backend(backend)
    out, grads = _run(fused, x.to(dtype))

    assert out.dtype == dtype
    assert_budget(f"{backend} logits", out, ref_out, oracle_out)
    for name in oracle_grads:
        assert_budget(f"{backend} grad {name}", grads[name], ref_grads[name], oracle_grads[name])


@pytest.mark.parametrize("backend", backend_params(*FUSED))
def test_model_compiles_fullgraph(backend):
    _needs_all_ops(backend)
    torch._dynamo.reset()
    kw = CONFIGS["d80_layerscale"]
    model = VisionTransformer(**kw, backend=backend).to(DEVICE)
    eager = copy.deepcopy(model)
    x = torch.randn(2, 1, 24, 40, device=DEVICE)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.square().sum().backward()
    ref = eager(x)
    ref.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
