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
``why_unavailable() -> str | None``, ``why_not_device(device) -> str | None``, ``get_op(name)``, which
returns the op as a function taking the public op's arguments positionally (minus ``backend=``) or None, and
``kernel_limits(op)``: the op's ``why_not_supported(device, dtype, *key) -> str | None``, whether its kernels
support these inputs (width, head dim, dtype, grid limits; ``key`` is the op's few input features that such
limits depend on, see ``vitkernels/ops/<op>.py``), or None. A backend that lacks an op, or cannot handle a device or the inputs, says so;
asking for it explicitly raises one error listing every backend's reason (as xformers' fmha dispatcher does),
``auto`` skips it and records why (``last_fallbacks()``).

Resolution is cached per (op, backend, device type, dtype, key): a call after the first is one dict lookup.

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
# The ops every backend may implement: the one list the package and the tests use.
OPS = ("patch_embed", "layer_norm", "attention", "attention_qkv", "linear", "ln_linear", "ln_mlp", "glu_linear",
       "ln_glu_mlp", "rope")
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
        for op in OPS:
            module.get_op(op)


def get_impl(name: str) -> ModuleType:
    """The implementation module of a concrete backend (raises BackendError with the reason)."""
    module, why = _probe(check_name(name))
    if module is None:
        raise BackendError(f"backend {name!r} is unavailable: {why}")
    return module


# (op, backend as asked, device type, dtype, key) -> (backend name, function). Filled by the slow path.
_RESOLVED: dict[tuple, tuple[str, Callable]] = {}
# op -> {backend: why auto passed it over} for the last resolution of each op that fell back.
_FALLBACKS: dict[str, dict[str, str]] = {}


def resolve(op: str, backend: str | None, device: torch.device, dtype: torch.dtype | None = None,
            key: tuple = ()) -> tuple[str, Callable]:
    """Pick the backend that runs ``op`` on these inputs: tensors of ``device`` and ``dtype`` with the op's
    limit-relevant features ``key``.

    Returns (name, the backend's function for ``op``). ``auto`` takes the first backend in its order that
    supports the inputs (falling back to ``torch``, which supports everything); an explicit name that cannot
    run them raises BackendError listing the reason for every backend. Cached: see the module docstring.
    """
    # backend=None is keyed by the raw $VITKERNELS_BACKEND (validated on a miss): no parsing per call.
    name = backend if backend is not None else os.environ.get("VITKERNELS_BACKEND")
    hit = _RESOLVED.get((op, name, device.type, dtype, key))
    if hit is not None:
        return hit
    picked = _resolve(op, check_name(name) if backend is not None else default_backend(), device, dtype, key)
    _RESOLVED[(op, name, device.type, dtype, key)] = picked
    return picked


def _resolve(op: str, name: str, device: torch.device, dtype: torch.dtype | None, key: tuple):
    if name == "auto":
        skipped = {}
        for candidate in (_AUTO_ORDER_CUDA if device.type == "cuda" else ("torch",)):
            why = _reason(candidate, op, device, dtype, key)
            if why is None:
                if skipped:
                    _FALLBACKS[op] = skipped
                return candidate, get_impl(candidate).get_op(op)
            skipped[candidate] = why
        return "torch", get_impl("torch").get_op(op)
    why = _reason(name, op, device, dtype, key)
    if why is not None:
        reasons = "; ".join(f"{b}: {_reason(b, op, device, dtype, key) or 'ok'}" for b in CONCRETE)
        raise BackendError(
            f"backend {name!r} cannot run {op} on {device.type} tensors ({why}). All backends: {reasons}"
        )
    return name, get_impl(name).get_op(op)


def _reason(name: str, op: str, device: torch.device, dtype: torch.dtype | None = None, key: tuple = ()
            ) -> str | None:
    why = why_not(name, device)
    if why is not None:
        return why
    impl = get_impl(name)
    if impl.get_op(op) is None:
        return f"{name} backend has no {op} op"
    check = impl.kernel_limits(op) if dtype is not None else None
    # A plain call (no import): torch.compile traces this when a new input shape resolves.
    return None if check is None else check(device, dtype, *key)


def last_fallbacks() -> dict[str, dict[str, str]]:
    """For each op that ``auto`` resolved past a backend: {backend: why it was passed over} (latest)."""
    return {op: dict(why) for op, why in _FALLBACKS.items()}


def clear_cache() -> None:
    """Forget probed backends and cached resolutions (after changing TRITON_INTERPRET, say)."""
    _PROBED.clear()
    _RESOLVED.clear()
    _FALLBACKS.clear()
