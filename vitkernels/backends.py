"""Backends: which implementation of each op runs, and why the others cannot.

Four names, one vocabulary everywhere (``backend=`` on every op and on the model):

- ``torch``  the reference: plain PyTorch (SDPA for attention). Always available; the CPU path.
- ``triton`` fused Triton kernels (``vitkernels/triton/``). Runs on CUDA tensors; on CPU tensors only under
  Triton's interpreter (``TRITON_INTERPRET=1`` set before ``import triton``), which is how CI tests it.
- ``cuda``   the compiled extension ``vitkernels._C`` (``csrc/``): CUDA kernels for CUDA tensors and a plain
  C++ twin for CPU tensors, behind one operator name each.
- ``auto``   the fastest backend that supports the inputs: on CUDA ``triton`` > ``cuda`` > ``torch``; on CPU
  ``torch`` (the interpreter and the C++ twin exist for testing, not for speed).

Each backend (``vitkernels.triton``, ``vitkernels.cuda``, ``vitkernels.ops.reference``) is a module with
``why_unavailable() -> str | None``, ``why_not_device(device) -> str | None`` and ``get_op(name)``, which
returns the op as a function taking the public op's arguments positionally (minus ``backend=``) or None. A backend that lacks an op, or that cannot
handle a device, says so; asking for it explicitly raises one error listing every reason (as xformers' fmha
dispatcher does), ``auto`` skips it.

``VITKERNELS_BACKEND`` sets the default used when ``backend=None``.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import Callable

import torch

BACKENDS = ("auto", "triton", "cuda", "torch")
CONCRETE = ("triton", "cuda", "torch")
_OPS = ("patch_embed", "layer_norm", "attention", "linear")
# Preference order of ``auto`` for CUDA tensors.
_AUTO_ORDER_CUDA = ("triton", "cuda", "torch")

_IMPL_MODULES = {
    "torch": "vitkernels.ops.reference",
    "triton": "vitkernels.triton",
    "cuda": "vitkernels.cuda",
}


class BackendError(RuntimeError):
    """Raised when a requested backend cannot run the given op on the given inputs."""


def default_backend() -> str:
    """The backend used when ``backend=None``: ``$VITKERNELS_BACKEND`` or ``auto``."""
    name = os.environ.get("VITKERNELS_BACKEND", "auto").strip().lower() or "auto"
    return check_name(name)


def check_name(name: str) -> str:
    if not isinstance(name, str) or name.lower() not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(BACKENDS)}")
    return name.lower()


def triton_interpreter() -> bool:
    """True when Triton runs kernels on CPU tensors in its interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# name -> (module or None, reason or None). A plain dict rather than lru_cache so torch.compile traces lookups.
_PROBED: dict[str, tuple[ModuleType | None, str | None]] = {}


def _probe(name: str) -> tuple[ModuleType | None, str | None]:
    """Import a backend package once; return (module, None) or (None, why it is unusable)."""
    if name not in _PROBED:
        try:
            module = importlib.import_module(_IMPL_MODULES[name])
            why = None if name == "torch" else module.why_unavailable()
        except Exception as exc:  # a broken install must not break `import vitkernels`
            module, why = None, f"cannot import {_IMPL_MODULES[name]}: {type(exc).__name__}: {exc}"
        _PROBED[name] = (None, why) if why else (module, None)
    return _PROBED[name]


def why_not(name: str, device: torch.device | str | None = None) -> str | None:
    """Why backend ``name`` cannot run on ``device`` (None when it can)."""
    module, why = _probe(name)
    if module is None:
        return why
    if device is None or name == "torch":
        return None
    device = torch.device(device)
    return module.why_not_device(device)


def available_backends(device: torch.device | str | None = None) -> dict[str, str | None]:
    """Each concrete backend mapped to None when usable (on ``device``, if given) or the reason it is not."""
    return {name: why_not(name, device) for name in CONCRETE}


def prepare(backend: str | None) -> None:
    """Import, now, the op files that ``backend`` will run: importing is what torch.compile cannot trace, so
    models call this at construction, outside any traced region. ``auto`` prepares the backend it picks for
    CUDA tensors when a GPU is visible (on CPU it picks ``torch``). Importing the cuda backend's ops loads
    (or JIT-builds) the extension, so plain probing (``available_backends``) never does this."""
    name = default_backend() if backend is None else check_name(backend)
    if name == "auto":
        if not torch.cuda.is_available():
            return
        name = next((b for b in _AUTO_ORDER_CUDA if why_not(b) is None), "torch")
    module, _ = _probe(name)
    if module is not None:
        for op in _OPS:
            module.get_op(op)


def get_impl(name: str) -> ModuleType:
    """The implementation module of a concrete backend (raises BackendError with the reason)."""
    module, why = _probe(check_name(name))
    if module is None:
        raise BackendError(f"backend {name!r} is unavailable: {why}")
    return module


def resolve(op: str, backend: str | None, device: torch.device) -> tuple[str, Callable]:
    """Pick the backend that runs ``op`` on tensors of ``device``.

    Returns (name, the backend's function for ``op``). ``auto`` falls back to ``torch``; an explicit name that cannot run raises
    BackendError listing the reason for every backend.
    """
    name = default_backend() if backend is None else check_name(backend)
    if name == "auto":
        order = _AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)
        for candidate in order:
            if _reason(candidate, op, device) is None:
                return candidate, get_impl(candidate).get_op(op)
        return "torch", get_impl("torch").get_op(op)
    why = _reason(name, op, device)
    if why is not None:
        reasons = "; ".join(f"{b}: {_reason(b, op, device) or 'ok'}" for b in CONCRETE)
        raise BackendError(
            f"backend {name!r} cannot run {op} on {device.type} tensors ({why}). All backends: {reasons}"
        )
    return name, get_impl(name).get_op(op)


def _reason(name: str, op: str, device: torch.device) -> str | None:
    why = why_not(name, device)
    if why is not None:
        return why
    if get_impl(name).get_op(op) is None:
        return f"{name} backend has no {op} op"
    return None
