"""The ``cuda`` backend: the compiled extension ``vitkernels._C`` (csrc/), CUDA kernels and a C++ CPU twin
behind one operator name each. Python wrappers, one file per op, mirror ``vitkernels/triton/``.
"""

from __future__ import annotations

import importlib

import torch

OPS = ("patch_embed", "layer_norm", "attention", "linear")


def why_unavailable() -> str | None:
    return "the compiled extension vitkernels._C is not built yet"


def why_not_device(device: torch.device) -> str | None:
    return None


def get_op(name: str):
    """The op ``name`` from ``vitkernels/cuda/<name>.py``, or None while that file does not exist."""
    if name not in OPS:
        return None
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            return None
        raise
    return getattr(module, name)
