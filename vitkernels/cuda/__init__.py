"""The ``cuda`` backend: the compiled extension ``vitkernels._C`` (csrc/), CUDA kernels and a C++ CPU twin
behind one operator name each (``torch.ops.vitkernels_C.<op>_fwd`` / ``_bwd``). Python wrappers, one file per
op, mirror ``vitkernels/triton/``; importing one loads the extension (built by setup.py, else JIT-built on
first use, see ``vitkernels/cuda/build.py``).
"""

from __future__ import annotations

import importlib
import os

import torch

from vitkernels.backends import OPS
from vitkernels.cuda import build



def why_unavailable() -> str | None:
    """None when ``vitkernels._C`` is built or can be JIT-built here, else the reason (nothing is built here)."""
    if build.load_error() is not None:
        return build.load_error()
    if build._EXTENSION is not None or build.prebuilt_available():
        return None
    why = build.why_no_jit()
    if why is not None:
        return f"vitkernels._C is not built (pip install --no-build-isolation . builds it) and a JIT build needs {why}"
    return None


def _has_cuda_kernels() -> tuple[bool, str]:
    """(whether CUDA kernels are (or would be) compiled in, why not)."""
    if build._EXTENSION is not None:
        return bool(build._EXTENSION.has_cuda()), "vitkernels._C was built without CUDA kernels"
    if build.prebuilt_available():
        return bool(build.load_extension().has_cuda()), "vitkernels._C was built without CUDA kernels"
    why = build.cuda_toolkit()
    return why is None, f"a JIT build cannot compile CUDA kernels here: {why}"


def why_not_device(device: torch.device) -> str | None:
    """CPU tensors run the C++ CPU twin; CUDA tensors need the CUDA kernels compiled in."""
    device = torch.device(device)
    if device.type == "cpu":
        return None
    if device.type != "cuda":
        return f"the cuda backend runs CPU and CUDA tensors, got {device.type}"
    ok, why = _has_cuda_kernels()
    return None if ok else why


def extension_info() -> dict:
    """What ``python -m vitkernels info`` shows: is the extension built, where, for which GPU archs."""
    info = {
        "prebuilt": build.prebuilt_available(),
        "loaded": build._EXTENSION is not None,
        "path": None,
        "archs": None,
        "has_cuda": None,
        "csrc": build.csrc_dir(),
        "why_unavailable": why_unavailable(),
    }
    ext = build._EXTENSION
    if ext is None and info["prebuilt"]:
        try:
            ext = build.load_extension()
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            info["why_unavailable"] = f"{type(exc).__name__}: {exc}"
    if ext is not None:
        info.update(loaded=True, path=os.path.abspath(ext.__file__), has_cuda=bool(ext.has_cuda()),
                    archs=ext.compiled_targets())
    info["built"] = info["loaded"]
    return info


def get_op(name: str):
    """The op ``name`` from ``vitkernels/cuda/<name>.py``, or None while that file does not exist.

    Importing the op's file loads (or JIT-builds) the extension.
    """
    if name in _LOADED:  # a plain dict lookup, which torch.compile traces (importlib it cannot)
        return _LOADED[name]
    if name not in OPS:
        return None
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as exc:
        if exc.name == f"{__name__}.{name}":
            return None
        raise
    _LOADED[name] = getattr(module, name)
    _CHECKS[name] = getattr(module, "why_not_supported", None)
    return _LOADED[name]


NAMESPACE = "vitkernels_C"  # torch.ops.vitkernels_C.<op>_fwd / _bwd, defined by csrc/<op>.cpp
_LOADED: dict = {}  # op name -> function, once its file imported (and the extension loaded)
_CHECKS: dict = {}  # op name -> its file's why_not_supported(device, dtype, *key)


def kernel_limits(op: str):
    """The op file's ``why_not_supported(device, dtype, *key)`` (its kernels' limits), once imported."""
    return _CHECKS.get(op)
