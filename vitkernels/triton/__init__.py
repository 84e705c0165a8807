"""The ``triton`` backend: fused Triton kernels, one file per op (kernels -> launchers -> registered op ->
autograd Function). Runs on CUDA tensors, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1).
"""

from __future__ import annotations

import importlib
import os

import torch

from vitkernels.backends import OPS, triton_interpreter

# Autotuning results persist on disk (Triton's cache_results): a later process with the same GPU arch, Triton,
# kernel source, tuning key and config list reuses the winner instead of benchmarking again, so two processes
# run the same configs (bit-identical results across processes, not only within one) and a second run skips
# the first step's ~130 autotune runs. Stored as <kernel>.autotune.json under Triton's cache directory
# ($TRITON_CACHE_DIR, default ~/.triton/cache); delete those files (or the directory) to tune again, e.g.
# after a driver or clock change; the key holds the arch (sm_90), not the GPU model, so an H100's choice is
# reused on an H200. VITKERNELS_AUTOTUNE_CACHE=0 turns it off.
AUTOTUNE_CACHE = os.environ.get("VITKERNELS_AUTOTUNE_CACHE", "1") not in ("", "0")


def autotune(configs, key, **kwargs):
    """``triton.autotune`` with the results cached on disk (see AUTOTUNE_CACHE)."""
    import triton

    return triton.autotune(configs=configs, key=key, cache_results=AUTOTUNE_CACHE, **kwargs)


def capability(t) -> int:
    """The compute capability (major * 10 + minor) of CUDA tensor ``t``'s device, for the autotuners' pruning
    rules (config limits differ between sm_80 and sm_90); 90 for anything else (a static audit's stand-in
    device answers for itself)."""
    if isinstance(t, torch.Tensor) and t.is_cuda:
        props = torch.cuda.get_device_properties(t.device)
        return props.major * 10 + props.minor
    return 90


def why_unavailable() -> str | None:
    try:
        import triton  # noqa: F401
    except Exception as exc:
        return f"triton is not importable ({type(exc).__name__}: {exc})"
    if torch.cuda.is_available() or triton_interpreter():
        return None
    return "no CUDA device (TRITON_INTERPRET=1 runs the kernels on CPU tensors in Triton's interpreter)"


def why_not_device(device: torch.device) -> str | None:
    if device.type == "cuda" or (device.type == "cpu" and triton_interpreter()):
        return None
    return f"triton kernels need CUDA tensors, got {device.type} (TRITON_INTERPRET=1 allows CPU tensors)"


# op name -> function (or None when its file does not exist). Filled once, when vitkernels.backends probes
# this backend, so that a traced region (torch.compile) only ever does a dict lookup, never an import.
NAMESPACE = "vitkernels_triton"  # torch.ops.vitkernels_triton.<op>_fwd / _bwd

_OPS: dict = {}
_CHECKS: dict = {}  # op name -> its file's why_not_supported(device, dtype, *key)


def get_op(name: str):
    """The op ``name`` from ``vitkernels/triton/<name>.py``, or None while that file does not exist."""
    if name not in _OPS:
        if name not in OPS:
            return None
        try:
            module = importlib.import_module(f"{__name__}.{name}")
            _OPS[name] = getattr(module, name)
            _CHECKS[name] = getattr(module, "why_not_supported", None)
        except ModuleNotFoundError as exc:
            if exc.name != f"{__name__}.{name}":
                raise
            _OPS[name] = None
    return _OPS[name]


def kernel_limits(op: str):
    """The op file's ``why_not_supported(device, dtype, *key)`` (its kernels' limits), once imported."""
    return _CHECKS.get(op)
