"""Validation shared by the public ops: every backend receives inputs of agreed shapes, dtypes and devices.

Under ``torch.autocast`` the fused backends receive inputs cast the way autocast casts the PyTorch ops they
replace (GEMM-like ops to the autocast dtype; LayerNorm keeps the activation dtype and computes its
statistics in fp32). The ``torch`` backend runs the PyTorch ops themselves, so autocast applies as usual.
"""

from __future__ import annotations

import torch


def fail(op: str, msg: str):
    raise ValueError(f"vitkernels.ops.{op}: {msg}")


def same_device_dtype(op: str, ref_name: str, ref: torch.Tensor, **others: torch.Tensor | None) -> None:
    # Under autocast the torch backend's PyTorch ops reconcile mixed dtypes themselves (and the fused
    # backends get uniformly cast inputs before this check), so only devices must agree then.
    check_dtype = amp_dtype(ref.device) is None
    for name, t in others.items():
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            fail(op, f"{name} must be a tensor, got {type(t).__name__}")
        if t.device != ref.device:
            fail(op, f"{name} is on {t.device} but {ref_name} is on {ref.device}")
        if check_dtype and t.dtype != ref.dtype:
            fail(op, f"{name} has dtype {t.dtype} but {ref_name} has dtype {ref.dtype}")


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        fail(op, f"{name} must be a tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        fail(op, f"{name} must be a floating-point tensor, got {t.dtype}")


def amp_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast dtype when autocast is on for this device type, else None."""
    kind = device.type
    if kind not in ("cuda", "cpu") or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


def cast(dtype: torch.dtype | None, *tensors):
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)
