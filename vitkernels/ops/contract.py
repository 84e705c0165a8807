"""One contract per op, shared by every kernel backend.

An op's contract (``vitkernels/ops/<op>.py`` builds one ``OpContract``) is everything about it that is not a
kernel: the forward and backward schemas (argument order, flag names and meanings, outputs), their fake
(shape) functions, the autograd glue (what the forward saves, how the backward is called), the FLOP formulas
read by ``torch.utils.flop_counter.FlopCounterMode``, and the public op's validation. A backend then holds
only kernels, launchers, the limits of its kernels, and one call that binds them to the contract:

    CONTRACT.register("vitkernels_triton", fwd=layer_norm_fwd, bwd=layer_norm_bwd)   # defines the ops
    CONTRACT.register("vitkernels_C", prepare=contiguous)   # C++ defined them: schemas are checked
    fn = CONTRACT.entry("vitkernels_C")   # the backend's function with the public op's arguments

``prepare`` is the one launcher concern a backend may add on the Python side: it maps the arguments of both
ops before the call (the C++ kernels take contiguous tensors).

Each backend gets its own namespace (two backends may both run CUDA tensors, and one dispatcher key holds one
kernel per op), but the ops in every namespace have the same schema, the same fake function, the same
autograd formula and the same FLOP formula.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

# Dispatch keys a Python-defined backend registers its kernels under: CUDA tensors, and CPU tensors (Triton's
# interpreter, the tests' path). The launchers guard the device themselves.
PY_DISPATCH_KEYS = ("CPU", "CUDA")


@dataclass
class OpContract:
    """The backend-independent half of one op (see the module docstring).

    Attributes:
        name: the op's name, e.g. "linear"; its ops are ``<namespace>::<name>_fwd`` and ``_bwd``.
        fwd_schema, bwd_schema: schemas without the name, e.g. "(Tensor x, float eps) -> (Tensor y)".
        fake_fwd, fake_bwd: shape functions with the schemas' arguments.
        setup_context: ``(ctx, inputs, output)`` of ``torch.library.register_autograd``.
        backward: ``(bwd_op, ctx, *grads) -> input grads``; ``bwd_op`` is the namespace's backward op.
        flops_fwd, flops_bwd: FLOPs from the arguments by name (tensors given as shapes) and ``out_shape``.
        run: ``(fwd_op, *public args) -> public result``: calls the forward op with the public op's
            (validated) arguments and returns what the public op returns.
    """

    name: str
    fwd_schema: str
    bwd_schema: str
    fake_fwd: Callable
    fake_bwd: Callable
    setup_context: Callable
    backward: Callable
    flops_fwd: Callable
    flops_bwd: Callable
    run: Callable
    namespaces: dict[str, Callable] = field(default_factory=dict)  # namespace -> its entry function

    def qualname(self, namespace: str, which: str) -> str:
        return f"{namespace}::{self.name}_{which}"

    def register(self, namespace: str, fwd: Callable | None = None, bwd: Callable | None = None,
                 prepare: Callable | None = None) -> Callable:
        """Bind a backend to this contract: define its ops (when ``fwd``/``bwd`` are Python kernels) or check
        the schemas of ops the C++ extension defined, then register the shared fake, autograd and FLOP
        formula. Returns the backend's entry function (see ``entry``). Idempotent per namespace."""
        if namespace in self.namespaces:
            return self.namespaces[namespace]
        if fwd is not None:
            lib = torch.library.Library(namespace, "FRAGMENT")
            _LIBRARIES.append(lib)  # a Library's registrations live as long as the object
            for which, schema, impl in (("fwd", self.fwd_schema, fwd), ("bwd", self.bwd_schema, bwd)):
                lib.define(f"{self.name}_{which}{schema}")
                for key in PY_DISPATCH_KEYS:
                    lib.impl(f"{self.name}_{which}", _on_inputs_device(impl), key)
        else:
            for which, schema in (("fwd", self.fwd_schema), ("bwd", self.bwd_schema)):
                check_schema(self.qualname(namespace, which), f"{self.name}_{which}{schema}")
        torch.library.register_fake(self.qualname(namespace, "fwd"))(self.fake_fwd)
        torch.library.register_fake(self.qualname(namespace, "bwd"))(self.fake_bwd)
        ops = getattr(torch.ops, namespace)
        fwd_op, bwd_op = getattr(ops, f"{self.name}_fwd").default, getattr(ops, f"{self.name}_bwd").default
        if prepare is not None:
            fwd_op, bwd_op = _prepared(fwd_op, prepare), _prepared(bwd_op, prepare)

        def backward(ctx, *grads):
            return self.backward(bwd_op, ctx, *grads)

        def entry(*args):
            return self.run(fwd_op, *args)

        torch.library.register_autograd(self.qualname(namespace, "fwd"), backward,
                                        setup_context=self.setup_context)
        _register_flops(self, namespace)
        entry.__name__ = entry.__qualname__ = f"{self.name}[{namespace}]"
        self.namespaces[namespace] = entry
        return entry

    def entry(self, namespace: str) -> Callable:
        """The registered backend's function taking the public op's arguments (minus ``backend=``)."""
        return self.namespaces[namespace]


def _on_inputs_device(impl: Callable) -> Callable:
    """Run a Python launcher with its inputs' GPU as the current device (Triton launches on the current
    device), so that tensors on cuda:1 never run on cuda:0's stream. The C++ launchers guard themselves."""

    def launch(*args):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is None or first.device.type != "cuda":
            return impl(*args)
        with torch.cuda.device(first.device):
            return impl(*args)

    launch.__name__ = getattr(impl, "__name__", "launch")
    return launch


def _prepared(op, prepare: Callable) -> Callable:
    def call(*args):
        return op(*prepare(*args))

    return call


def contiguous(*args):
    """A ``prepare`` for kernels that take contiguous tensors: each tensor argument made contiguous."""
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


_LIBRARIES: list = []


def check_schema(qualname: str, expected: str) -> None:
    """Raise when the registered op ``qualname`` does not have the contract's schema ``expected``."""
    ns, name = qualname.split("::")
    packet = getattr(getattr(torch.ops, ns), name)
    have = packet.default._schema
    want = torch._C.parse_schema(f"{ns}::{expected}")
    sig = lambda s: ([(a.name, str(a.type)) for a in s.arguments], [str(r.type) for r in s.returns])  # noqa: E731
    if sig(have) != sig(want):
        raise RuntimeError(f"{qualname} does not follow the op contract: it is {have}, the contract says {want} "
                           f"(rebuild the extension: pip install --no-build-isolation -e .)")


def _register_flops(contract: OpContract, namespace: str) -> None:
    """FlopCounterMode formulas for both ops, reading the arguments by name (so a backend can never count a
    flag at another backend's position)."""
    from torch.utils.flop_counter import register_flop_formula

    for which, formula in (("fwd", contract.flops_fwd), ("bwd", contract.flops_bwd)):
        packet = getattr(getattr(torch.ops, namespace), f"{contract.name}_{which}")
        names = [a.name for a in packet.default._schema.arguments]

        def by_name(*args, out_shape=None, _names=names, _formula=formula, **kwargs):
            return _formula(**dict(zip(_names, args)), **kwargs, out_shape=out_shape)

        try:
            register_flop_formula(packet)(by_name)
        except RuntimeError as exc:  # the same op registered by an earlier import (tests re-import)
            if "duplicate" not in str(exc).lower():
                raise


def or_none(t: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    return t if wanted else None
