"""Test oracles shared by every op test: which backends to run, on which device, and error budgets.

Budget rule (flash-attention's tests): a fused result passes when its max error against a float64 oracle is
at most ``FACTOR`` x PyTorch's own max error in the same low precision plus a small absolute floor, i.e. we
may be twice as inexact as eager PyTorch, never more.
"""

from __future__ import annotations

import pytest
import torch

from vitkernels.backends import CONCRETE, why_not

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# dtypes the kernels are tested in here. bf16 `tl.dot` is wrong in Triton's interpreter (upstream:
# unsupported), so bf16 runs only on a GPU.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if DEVICE.type == "cuda" else [])

FACTOR = 2.0
FLOOR = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def backend_params(*names: str, op: str | None = None):
    """pytest params for backends, each skipped with its reason when it cannot run on DEVICE."""
    params = []
    for name in names:
        why = why_not(name, DEVICE)
        if why is None and op is not None:
            from vitkernels.backends import get_impl

            if get_impl(name).get_op(op) is None:
                why = f"{name} backend has no {op} op"
        params.append(pytest.param(name, id=name, marks=pytest.mark.skipif(why is not None, reason=str(why))))
    return params


# The kernel backends (every concrete backend but the torch reference), from the package's one list.
FUSED = tuple(name for name in CONCRETE if name != "torch")


def require_backend(name: str, op: str | None = None):
    """Skip the calling test with the reason when backend ``name`` cannot run on DEVICE (or lacks ``op``);
    else return its implementation module, with ``op``'s file imported (which registers its ops)."""
    from vitkernels.backends import get_impl

    why = why_not(name, DEVICE)
    if why is not None:
        pytest.skip(why)
    impl = get_impl(name)
    if op is not None and impl.get_op(op) is None:
        pytest.skip(f"{name} backend has no {op} op")
    return impl


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def assert_budget(name: str, ours: torch.Tensor, lowp_ref: torch.Tensor, oracle: torch.Tensor,
                  factor: float = FACTOR, floor: float | None = None) -> None:
    """Assert ``ours`` is within factor x err(lowp_ref) + floor of the float64 ``oracle`` (and finite)."""
    assert ours.shape == oracle.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(oracle.shape)}"
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    floor = FLOOR[lowp_ref.dtype] if floor is None else floor
    ref_err = max_err(lowp_ref, oracle)
    scale = max(oracle.abs().max().item(), 1.0)
    budget = factor * ref_err + floor * scale
    err = max_err(ours, oracle)
    assert err <= budget, (f"{name}: max error {err:.3e} exceeds budget {budget:.3e} "
                           f"(pytorch {lowp_ref.dtype} error {ref_err:.3e}, factor {factor}, floor {floor})")
