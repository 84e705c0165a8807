"""``python -m vitkernels audit``: a static audit of every Triton kernel a ViT training step launches, compiled
for an H100/H200 (sm_90a) and an A100 (sm_80) on a machine without a GPU.

    python -m vitkernels audit [--arch sm_90a,sm_80] [--dtypes fp16,bf16] [--batch 256]
        [--models vit_base_patch16_224,vit_large_patch16_224] [--paths lean,per-op] [--only SUBSTR]
        [--out DIR] [--jobs N] [--cache-dir DIR]

Per (target, dtype, model, kernel launch, autotune config) it reports registers and spills (the ptxas -v log),
shared memory (the compiled kernel's metadata), the MMA / copy instructions in the PTX (``wgmma.mma_async``,
``mma.sync``, ``cp.async.bulk.tensor`` = TMA, ``cp.async``), an occupancy estimate (CTAs per SM), the grid
(tiles) and its waves on the target's SMs, with flags: SPILL, NO-WGMMA (a tl.dot kernel with >= 4 warps on
sm_90a, 16-bit inputs, whose PTX has no wgmma), SMEM (over the per-block limit), WAVES<2 (a weight-gradient GEMM
that fills fewer than two waves), ERROR (did not compile). ``--out DIR`` writes ``audit.jsonl`` (one line per
row) and ``audit.md``. It also counts what a first training step compiles (distinct kernel specialisations x
configs) and how many autotune benchmark runs it makes.

How, without hand-built argument lists (a kernel's signature, configs or launcher may change freely):

1. Capture. A real training step (forward, cross-entropy, backward) of the model runs on the meta device with
   the triton backend (``lean_blocks`` True and/or False: ``--paths``). A TorchDispatchMode catches each call
   of a ``vitkernels_triton`` op and runs that op's real launcher, the function registered for CUDA tensors, on
   FakeTensors that claim to live on a CUDA device, inside a stand-in GPU (``StandInGPU``):
   ``torch.cuda.get_device_properties`` answers for the target (its SM count sizes split-K and partial
   buffers), ``torch.cuda.device`` does nothing, and ``kernel[grid](...)`` is intercepted
   (``JITFunction.run``, ``Autotuner.run``, ``Heuristics.run``): nothing launches, nothing is allocated.
2. Bind. Per launch, the configs the autotuner would benchmark (its own ``prune_configs``: the kernel's
   ``early_config_prune``, a perf model if any), each with the kernel's heuristics applied, are bound by Triton's
   own binder for the target (``create_function_from_signature`` + ``JITFunction._pack_args``). Tensors are
   replaced by stand-ins with the tensor's dtype and a pointer aligned as a CUDA allocation is (a 2 MiB-aligned
   base plus the tensor's storage offset), so the == 1 / divisible-by-16 specialisation of every pointer, int
   and stride is the one a real launch gets; the grid function is evaluated on the bound arguments.
3. Compile every distinct specialisation once: ``triton.compile(ASTSource(...), target=GPUTarget(...))`` with
   ptxas' log on (``knobs.nvidia.dump_ptxas_log``) in a fresh Triton cache (a cache hit skips ptxas; registers
   and stack then come from ``cuobjdump --dump-resource-usage`` of the cubin instead). Identical
   specialisations (the 12 blocks of a ViT-B, the dx GEMMs of different layers, ViT-B vs ViT-L) compile once
   and are reported for each use.

Occupancy estimate per SM (both targets): 65,536 registers (allocated per warp in units of 256), 2,048 threads,
32 CTAs, shared memory 228 KB (sm_90) / 164 KB (sm_80) with 1 KB reserved per CTA; a CTA may use at most
227 KB / 163 KB. Waves = tiles / (SMs x CTAs per SM), on 132 SMs (H100 SXM / H200) or 108 (A100).

Caveats: Triton compiles with its bundled ptxas; the occupancy is an estimate (no register-file banking or
barrier limits). Autotune configs that fail to compile or exceed shared memory are, on a GPU, skipped by the
autotuner (scored as infinitely slow); here they are reported. ``GPUTarget("cuda", 90, 32)``: the third field is
the warp size, 32 as the CUDA driver reports it (it does not change NVIDIA code generation).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types
from typing import Any, Callable, Iterator

import torch

from vitkernels.experiments.cli import ArgumentParser
from vitkernels.experiments.env import DTYPES, git_commit

# -- targets and the occupancy model ---------------------------------------------------------------------------
REGS_PER_SM = 65536
REG_ALLOC_UNIT = 256  # registers are allocated per warp in units of 256 (8 per thread)
THREADS_PER_SM = 2048
CTAS_PER_SM = 32
SMEM_RESERVED_PER_CTA = 1024  # the CUDA runtime reserves 1 KB of shared memory per CTA (sm_80 and later)


@dataclasses.dataclass(frozen=True)
class Arch:
    """A compile target and the SM resources of the GPU it stands for."""

    name: str  # as on the command line: "sm_90a"
    capability: int  # GPUTarget's arch: 90 compiles for sm_90a (Triton always targets the "a" variant)
    gpu: str
    sms: int
    smem_per_sm: int  # bytes
    smem_per_cta: int  # the opt-in maximum of one CTA, bytes

    def target(self):
        from triton.backends.compiler import GPUTarget

        return GPUTarget("cuda", self.capability, 32)


ARCHS = {
    "sm_90a": Arch("sm_90a", 90, "H100 SXM / H200", 132, 228 * 1024, 227 * 1024),
    "sm_80": Arch("sm_80", 80, "A100", 108, 164 * 1024, 163 * 1024),
}
DEFAULT_MODELS = ("vit_base_patch16_224", "vit_large_patch16_224")
PATHS = {"lean": True, "per-op": False}  # --paths name -> VisionTransformer(lean_blocks=...)
FIRST_STEP_MODEL = "vit_base_patch16_224"  # whose first training step the compile count is for
FLAGS = ("ERROR", "SPILL", "NO-WGMMA", "SMEM", "WAVES<2")


def occupancy(regs: int | None, shared: int, num_warps: int, arch: Arch) -> tuple[int, str]:
    """(CTAs resident per SM, the resource that limits it) for a kernel using ``regs`` registers per thread
    (None: unknown, not counted) and ``shared`` bytes of shared memory per CTA."""
    if shared > arch.smem_per_cta:
        return 0, "smem"
    per_warp = math.ceil(max(regs or 1, 1) * 32 / REG_ALLOC_UNIT) * REG_ALLOC_UNIT
    limits = {
        "regs": (REGS_PER_SM // per_warp) // num_warps if regs else CTAS_PER_SM,
        "smem": arch.smem_per_sm // (shared + SMEM_RESERVED_PER_CTA),
        "threads": THREADS_PER_SM // (32 * num_warps),
        "ctas": CTAS_PER_SM,
    }
    limiter = min(limits, key=limits.get)
    return limits[limiter], limiter


def waves(tiles: int, ctas_per_sm: int, sms: int) -> float:
    """How many times the GPU's CTA slots are filled by ``tiles`` CTAs (inf when none fits)."""
    return tiles / (sms * ctas_per_sm) if ctas_per_sm > 0 else math.inf


# -- the stand-in GPU: launchers run on fake CUDA tensors, kernel launches are recorded -------------------------
_BASE_PTR = 1 << 21  # a CUDA allocation's address is at least 512-byte aligned; any multiple of 16 binds the same


class _Ptr:
    """What Triton's binder sees of a tensor: its dtype and an address aligned as on a GPU (base + offset)."""

    def __init__(self, t: torch.Tensor):
        self.dtype = t.dtype
        self.shape = tuple(t.shape)
        self._stride = tuple(t.stride())
        self._ptr = _BASE_PTR + t.storage_offset() * t.element_size()

    def data_ptr(self) -> int:
        return self._ptr

    def stride(self, dim: int | None = None):
        return self._stride if dim is None else self._stride[dim]

    def element_size(self) -> int:
        return torch.empty((), dtype=self.dtype, device="meta").element_size()

    @staticmethod
    def ptr_range() -> int:
        return 0

    def __repr__(self):
        return f"ptr({str(self.dtype).replace('torch.', '')}, +{self._ptr - _BASE_PTR}B)"


def _stand_in(value):
    """A kernel argument as the binder should see it: tensors -> _Ptr (also inside a host TensorDescriptor)."""
    if isinstance(value, torch.Tensor):
        return _Ptr(value)
    base = getattr(value, "base", None)
    if isinstance(base, torch.Tensor) and dataclasses.is_dataclass(value):  # triton's host TensorDescriptor
        return dataclasses.replace(value, base=_Ptr(base))
    return value


def _describe(value):
    """A hashable, JSON-able description of a kernel argument (for deduplicating identical launches)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", str(value.dtype), tuple(value.shape), tuple(value.stride()),
                value.storage_offset() * value.element_size() % 256)
    if isinstance(value, (int, float, bool, str, type(None))):
        return value
    if isinstance(value, torch.dtype):
        return str(value)
    return repr(value)


@dataclasses.dataclass
class Variant:
    """One config of a launch, bound for the target."""

    config: str  # "P128xQ256xS64_w8_s3": the BLOCK_* constexprs, warps, stages
    constexprs: dict  # every constexpr of the launch (config, flags, heuristics), by name
    num_warps: int
    num_stages: int
    grid: tuple
    key: str  # the compile key: equal keys compile to the same binary
    job: Any  # (jit function, signature, constexprs, attrs, options, target): what triton.compile takes


@dataclasses.dataclass
class Launch:
    """A kernel launch the launchers made, with the configs it would compile."""

    kernel: str  # the @triton.jit function's name
    op: str  # the vitkernels_triton op whose launcher launched it ("" when a launcher was called directly)
    case: str  # e.g. "fwd_qkv", "bwd_dw_fc1" (see _name_launch)
    role: str  # "fwd" | "dx" | "dw" | "bwd": dx / dw only for the tl.dot kernels of a backward op
    dims: dict  # the kernel's integer arguments other than strides, by name (its problem size)
    signature: tuple  # describes every argument: identical launches compare equal
    variants: list
    tuner: dict | None  # autotuned: {"id", "key", "configs", "pruned"}
    uses: int = 1


def _jit_chain(kernel) -> list:
    """[outermost wrapper, ..., JITFunction] of a launched kernel (Autotuner -> Heuristics -> JITFunction)."""
    from triton.runtime.jit import JITFunction

    chain = [kernel]
    while not isinstance(chain[-1], JITFunction):
        inner = getattr(chain[-1], "fn", None)
        if inner is None:
            raise RuntimeError(f"audit: cannot find the @triton.jit function under {type(kernel).__name__} "
                               f"(set TRITON_INTERPRET=0: the interpreter's kernels cannot be compiled)")
        chain.append(inner)
    return chain


_DOT_RE = re.compile(r"\btl\.dot\b|\btl\.dot_scaled\b")


def _uses_dot(fn, seen: set | None = None) -> bool:
    """Whether ``fn`` (a JITFunction) or a @triton.jit function it calls has a tl.dot: a GEMM-like kernel."""
    from triton.runtime.jit import JITFunction

    seen = set() if seen is None else seen
    if id(fn) in seen:
        return False
    seen.add(id(fn))
    if _DOT_RE.search(fn.src):
        return True
    names = set(re.findall(r"\b([A-Za-z_]\w*)\s*\(", fn.src))
    scope = fn.fn.__globals__
    return any(isinstance(scope.get(n), JITFunction) and _uses_dot(scope[n], seen) for n in names)


def _config_name(constexprs: dict, fixed: set, num_warps: int, num_stages: int) -> str:
    """"P128xQ256xS64_w8_s3": the BLOCK_* constexprs (the autotuned ones first, then those the launcher fixes),
    warps, stages."""
    blocks = [k for k, v in constexprs.items() if k.startswith("BLOCK_") and type(v) is int]
    blocks.sort(key=lambda k: k in fixed)
    tile = "x".join(f"{k[len('BLOCK_'):]}{constexprs[k]}" for k in blocks)
    return f"{tile or '-'}_w{num_warps}_s{num_stages}"


def _expand(chain: list, args: tuple, kwargs: dict, tuner: dict) -> list[dict]:
    """The keyword arguments the JITFunction at the end of ``chain`` gets, once per config the autotuner would
    try: what Autotuner.run (prune_configs, then each config's kwargs) and Heuristics.run (each rule) add."""
    from triton.runtime.autotuner import Autotuner, Heuristics

    wrapper, rest = chain[0], chain[1:]
    if not rest:
        return [kwargs]
    if isinstance(wrapper, Heuristics):
        kwargs = dict(kwargs)
        for name, rule in wrapper.values.items():
            kwargs[name] = rule({**dict(zip(wrapper.arg_names, args)), **kwargs})
        return _expand(rest, args, kwargs, tuner)
    if isinstance(wrapper, Autotuner):
        wrapper.nargs = dict(zip(wrapper.arg_names, args))  # what Autotuner.run sets before pruning
        try:
            configs = wrapper.prune_configs(dict(kwargs)) if len(wrapper.configs) > 1 else list(wrapper.configs)
            named = {k: v for k, v in {**wrapper.nargs, **kwargs}.items() if k in wrapper.arg_names}
        finally:
            wrapper.nargs = None
        key = [named[k] for k in wrapper.keys if k in named] + [str(v.dtype) for v in named.values()
                                                                if hasattr(v, "dtype")]
        tuner.update(id=id(wrapper), key=repr(tuple(key)), configs=len(wrapper.configs), pruned=len(configs))
        return [kw for c in configs for kw in _expand(rest, args, {**kwargs, **c.all_kwargs()}, tuner)]
    raise RuntimeError(f"audit: unknown kernel wrapper {type(wrapper).__name__}")


class StandInGPU:
    """A context in which vitkernels' Triton launchers run on fake CUDA tensors for ``arch`` and every kernel
    launch is recorded (``launches``) instead of run. Use ``tensor()`` for inputs, or ``run_step()``."""

    def __init__(self, arch: Arch):
        self.arch = arch
        self.launches: list[Launch] = []
        self._op: dict | None = None  # the op whose launcher is running: {"op", "params", "op_params"}
        self._binders: dict = {}
        self._stack = contextlib.ExitStack()

    # ---- entering: the patches ----
    def __enter__(self) -> "StandInGPU":
        triton = _import_triton()
        from torch._subclasses.fake_tensor import FakeTensorMode
        from triton.compiler import make_backend
        from triton.runtime.autotuner import Autotuner, Heuristics
        from triton.runtime.jit import JITFunction

        import vitkernels.triton as vt
        from vitkernels import backends

        self._triton = triton
        self._backend = make_backend(self.arch.target())
        self.fake = FakeTensorMode(allow_non_fake_inputs=False)
        props = types.SimpleNamespace(
            name=f"stand-in {self.arch.gpu} ({self.arch.name})", major=self.arch.capability // 10,
            minor=self.arch.capability % 10, multi_processor_count=self.arch.sms, warp_size=32,
            total_memory=80 * 2 ** 30, max_threads_per_multi_processor=THREADS_PER_SM,
            regs_per_multiprocessor=REGS_PER_SM, shared_memory_per_block_optin=self.arch.smem_per_cta,
            shared_memory_per_multiprocessor=self.arch.smem_per_sm)
        gpu = self

        def intercept(self_kernel, *args, grid=None, warmup=False, **kwargs):
            if warmup:
                raise RuntimeError("audit: kernel.warmup(...) is not supported under the stand-in GPU")
            gpu._record(self_kernel, args, kwargs, grid)

        patches = [
            (JITFunction, "run", intercept), (Autotuner, "run", intercept), (Heuristics, "run", intercept),
            (torch.cuda, "get_device_properties", lambda device=None: props),
            (torch.cuda, "device", lambda device=None: contextlib.nullcontext()),
            (vt, "why_unavailable", lambda: None),
            (vt, "why_not_device", lambda device: None if device.type in ("cuda", "meta") else "not cuda"),
        ]
        for owner, name, value in patches:
            self._stack.enter_context(_patched(owner, name, value))
        backends.clear_cache()
        self._stack.callback(backends.clear_cache)
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    def tensor(self, shape, dtype=torch.bfloat16, stride=None, offset: int = 0) -> torch.Tensor:
        """A fake CUDA tensor (no memory) with the given shape, strides and storage offset (elements)."""
        with self.fake:
            if stride is None:
                return torch.empty(shape, dtype=dtype, device="cuda")
            size = offset + 1 + sum((n - 1) * s for n, s in zip(shape, stride))
            return torch.empty(size, dtype=dtype, device="cuda").as_strided(shape, stride, offset)

    def call(self, launcher: Callable, *args, **kwargs):
        """Run a launcher (e.g. ``vitkernels.triton.linear.linear_fwd``) on fake tensors, recording launches."""
        with self.fake:
            return launcher(*args, **kwargs)

    # ---- a model's training step ----
    def run_step(self, model_name: str, batch: int, dtype: torch.dtype, lean: bool) -> None:
        """One training step (forward, cross-entropy, backward) of ``model_name`` on the meta device; each
        ``vitkernels_triton`` op it calls runs its launcher here (``launches`` grows)."""
        import torch.nn.functional as F
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode

        import vitkernels
        from vitkernels.triton import NAMESPACE

        with torch.device("meta"):
            model = vitkernels.create_model(model_name, backend="triton", lean_blocks=lean)
        model.to(dtype).train()
        # name -> (module, is a weight matrix, shape); pos_embed (1, N, C) and cls_token (1, 1, C) are not
        params = {StorageWeakRef(p.untyped_storage()): (_short_name(n), p.dim() >= 2 and p.shape[0] > 1,
                                                          tuple(p.shape))
                  for n, p in model.named_parameters()}
        cfg = vitkernels.models.model_config(model_name)
        img = cfg.get("img_size", 224)
        images = torch.empty((batch, cfg.get("in_chans", 3), img, img), device="meta", dtype=dtype)
        labels = torch.zeros((batch,), device="meta", dtype=torch.long)
        gpu = self

        class Catch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func.namespace == NAMESPACE:
                    gpu._run_op(func, args, kwargs, params)
                return func(*args, **kwargs)

        with Catch():
            loss = F.cross_entropy(model(images).float(), labels)
            loss.backward()

    def _run_op(self, func, args, kwargs, params) -> None:
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._pytree import tree_map

        names: dict = {}
        op_params: list = []
        converter = self.fake.fake_tensor_converter
        cuda = torch.device("cuda", 0)

        def to_fake(t):
            if not isinstance(t, torch.Tensor):
                return t
            f = converter.from_meta_and_device(self.fake, t, cuda)
            p = params.get(StorageWeakRef(t.untyped_storage()))
            if p is not None:
                names[StorageWeakRef(f.untyped_storage())] = p
                op_params.append(p)
            return f

        fake_args, fake_kwargs = tree_map(to_fake, (args, kwargs))
        self._op = {"op": func._schema.name.split("::")[-1], "names": names, "op_params": op_params}
        try:
            with self.fake:
                # The op's kernel for CUDA tensors is its Python launcher (vitkernels/ops/contract.py)
                func.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA), *fake_args, **fake_kwargs)
        finally:
            self._op = None

    # ---- one intercepted launch ----
    def _record(self, kernel, args, kwargs, grid) -> None:
        chain = _jit_chain(kernel)
        fn = chain[-1]
        tuner: dict = {}
        variants = [self._bind(fn, args, kw, grid, set(kwargs))
                    for kw in _expand(chain, args, dict(kwargs), tuner)]
        tuner = tuner or None
        op = self._op or {"op": "", "names": {}, "op_params": []}
        params = self._params_passed(args, kwargs, op["names"])
        case, role = _name_launch(op["op"], fn, params, op["op_params"], [*args, *kwargs.values()])
        ints = {p.name: v for p, v in zip(fn.params, args) if not p.is_constexpr and type(v) is int}
        dims = {k: v for k, v in ints.items() if not k.lower().startswith("stride")}
        signature = (fn.__name__, case, tuple(_describe(a) for a in args),
                     tuple(sorted((k, _describe(v)) for k, v in kwargs.items())),
                     tuple((v.key, v.grid) for v in variants))
        self.launches.append(Launch(fn.__name__, op["op"], case, role, dims, signature, variants, tuner))

    def _params_passed(self, args, kwargs, names) -> list:
        from torch.multiprocessing.reductions import StorageWeakRef

        found = []
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor):
                p = names.get(StorageWeakRef(a.untyped_storage()))
                if p is not None and p not in found:
                    found.append(p)
        return found

    def _bind(self, fn, args, kw, grid, fixed: set) -> Variant:
        """Bind like JITFunction.run does, for the target; the compile job and key."""
        from triton import knobs

        binder = self._binders.get(id(fn))
        if binder is None:
            from triton.runtime.jit import create_function_from_signature

            binder = self._binders[id(fn)] = create_function_from_signature(fn.signature, fn.params, self._backend)
        fields = self._backend.parse_options({}).__dict__
        kw = dict(kw)
        if "debug" in fields:  # as JITFunction.run sets them
            kw["debug"] = kw.get("debug", fn.debug) or knobs.runtime.debug
        if "instrumentation_mode" in fields and hasattr(knobs.compilation, "instrumentation_mode"):
            kw["instrumentation_mode"] = knobs.compilation.instrumentation_mode
        stand_ins = [_stand_in(a) for a in args]
        kw_in = {k: _stand_in(v) for k, v in kw.items()}
        bound, specialization, options = binder(*stand_ins, **kw_in)
        options, signature, constexprs, attrs = fn._pack_args(self._backend, kw_in, bound, specialization, options)
        grid = grid(bound) if callable(grid) else grid
        grid = tuple(int(g) for g in (tuple(grid) + (1, 1, 1))[:3])
        named = {fn.arg_names[path[0]]: value for path, value in constexprs.items() if len(path) == 1}
        opt_hash = options.hash() if hasattr(options, "hash") else repr(sorted(options.__dict__.items()))
        key = hashlib.sha256(repr((fn.__module__, fn.__name__, fn.cache_key, sorted(signature.items()),
                                   sorted((k, repr(v)) for k, v in constexprs.items()),
                                   sorted((k, repr(v)) for k, v in attrs.items()), opt_hash,
                                   self.arch.name)).encode()).hexdigest()[:16]
        return Variant(_config_name(named, fixed, options.num_warps, options.num_stages),
                       {k: v if isinstance(v, (int, float, bool, str, type(None))) else repr(v)
                        for k, v in named.items()},
                       options.num_warps, options.num_stages, grid, key,
                       (fn, signature, constexprs, attrs, options, self.arch.target()))


@contextlib.contextmanager
def _patched(owner, name: str, value) -> Iterator[None]:
    old = owner.__dict__.get(name, getattr(owner, name))
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, old)


def _short_name(param: str) -> str:
    """A parameter's module, as the cases name it: blocks.3.attn.qkv.weight -> qkv, patch_embed.proj.weight ->
    patch_embed, norm.bias -> norm."""
    path = re.sub(r"^blocks\.\d+\.", "", param)
    path = re.sub(r"\.(weight|bias)$", "", path)
    path = re.sub(r"^(attn|mlp)\.", "", path)
    return path.split(".")[0]


def _names(params) -> str:
    return "+".join(dict.fromkeys(p[0] for p in params))


def _name_launch(op: str, fn, passed: list, op_params: list, args: list) -> tuple[str, str]:
    """(case, role) of a launch: the op's phase and the model parameters it touches.

    Forward: fwd_<module>. Backward tl.dot kernels of an op with a weight (a parameter of >= 2 dims, the first
    > 1; not pos_embed / cls_token): bwd_dx_<weight> when the weight is an operand (an input gradient, dz W),
    bwd_dw_<weight> when it is not (dz^T x: the weight's gradient, named by the shape of its output or fp32
    split-K partials). Other kernels: <phase>_<modules of the parameters passed>, else of the op's.
    """
    if not op:
        return fn.__name__.strip("_"), "direct"
    phase = "fwd" if op.endswith("_fwd") else "bwd"
    weights = [p for p in op_params if p[1]]
    passed_w = [p for p in passed if p[1]]
    op_label = _names(weights) or _names(op_params) or op.rsplit("_", 1)[0]
    if phase == "bwd" and weights and _uses_dot(fn):
        if passed_w:
            return f"bwd_dx_{_names(passed_w)}", "dx"
        shapes = {tuple(a.shape[-2:]) for a in args if isinstance(a, torch.Tensor) and a.dim() >= 2}
        match = [p for p in weights if p[2][-2:] in shapes or (len(p[2]) > 2 and _flat2d(p[2]) in shapes)]
        return f"bwd_dw_{_names(match or weights)}", "dw"
    return f"{phase}_{_names(passed_w) or _names(passed) or op_label}", phase


def _flat2d(shape: tuple) -> tuple:
    return (shape[0], math.prod(shape[1:]))


# -- compiling ---------------------------------------------------------------------------------------------------
def _import_triton():
    """triton, for compiling; one-line errors when it is missing, too old, or its interpreter already holds
    vitkernels' kernels in this process."""
    # The launchers pick their GPU configs only without the interpreter, and kernels decorated under it
    # cannot be compiled: the audit always runs without it.
    os.environ.pop("TRITON_INTERPRET", None)
    try:
        import triton
        from triton import knobs  # noqa: F401 (Triton >= 3.4)
        from triton.compiler import ASTSource  # noqa: F401
        from triton.runtime.jit import create_function_from_signature  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name == "triton":
            raise ImportError("the audit needs the package 'triton', which is not installed (pip install "
                              "triton)") from None
        raise
    except ImportError as exc:
        raise ImportError(f"the audit needs Triton >= 3.4's compiler API (knobs, ASTSource, "
                          f"create_function_from_signature), got Triton {_version()}: {exc}") from None
    interpreted = [name for name, module in list(sys.modules.items())
                   if name.startswith("vitkernels.triton.") and getattr(module, "_INTERPRET", False)]
    if interpreted:
        raise ValueError(f"{interpreted[0]} was imported under TRITON_INTERPRET=1 in this process: run the audit "
                         f"in a fresh process without it")
    return triton


def _version() -> str:
    try:
        import triton

        return triton.__version__
    except Exception:  # noqa: BLE001
        return "unknown"


_JOBS: dict[str, Any] = {}  # compile key -> job: read by forked workers


def _parse_ptxas(log: str) -> dict:
    out = {}
    if m := re.search(r"Used (\d+) registers", log):
        out["regs"] = int(m.group(1))
    if m := re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", log):
        out["stack"], out["spill_stores"], out["spill_loads"] = map(int, m.groups())
    return out


def _resource_usage(cubin: bytes) -> dict:
    """Registers and stack from cuobjdump (the cubin came from the cache: no ptxas log). A stack frame in a
    Triton kernel means spills (it has no local arrays), so it stands for the spill bytes."""
    import triton

    exe = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([exe, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    out = {"usage_from": "cuobjdump"}
    if m := re.search(r"REG:(\d+)", text):
        out["regs"] = int(m.group(1))
    if m := re.search(r"STACK:(\d+)", text):
        out["stack"] = out["spill_stores"] = out["spill_loads"] = int(m.group(1))
    return out


def _ptx_counts(ptx: str) -> dict:
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "mma_sync": len(re.findall(r"\bmma\.sync", ptx)),
        "tma": len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)),
        "cp_async": len(re.findall(r"\bcp\.async\.c[ag]\.shared", ptx)),
    }


def compile_job(key: str) -> dict:
    """Compile ``_JOBS[key]`` for its target; a dict of what the audit reports (never raises)."""
    import triton
    from triton import knobs
    from triton.compiler import ASTSource

    fn, signature, constexprs, attrs, options, target = _JOBS[key]
    knobs.nvidia.dump_ptxas_log = True
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                    options=options.__dict__)
    except Exception as exc:  # noqa: BLE001 - a kernel that does not compile is a finding, not a crash
        first = " ".join(str(exc).split())[:500]
        return {"ok": False, "error": f"{type(exc).__name__}: {first}",
                "compile_s": round(time.perf_counter() - start, 2)}
    rec = {"ok": True, "compile_s": round(time.perf_counter() - start, 2)}
    rec.update(_parse_ptxas(log.getvalue()))
    if "regs" not in rec:
        rec.update(_resource_usage(kernel.asm["cubin"]))
    rec.setdefault("spill_stores", 0)
    rec.setdefault("spill_loads", 0)
    rec["shared"] = int(kernel.metadata.shared)
    rec["num_warps"] = int(kernel.metadata.num_warps)
    rec["dot"] = "tt.dot" in kernel.asm.get("ttir", "")
    rec.update(_ptx_counts(kernel.asm["ptx"]))
    return rec


def compile_all(keys: list[str], jobs: int, progress: Callable[[int, str, dict], None]) -> dict[str, dict]:
    """Compile every key (``jobs`` forked workers when > 1); {key: result}."""
    results: dict[str, dict] = {}
    if jobs > 1 and len(keys) > 1 and "fork" in __import__("multiprocessing").get_all_start_methods():
        import concurrent.futures
        import multiprocessing

        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            futures = {pool.submit(compile_job, k): k for k in keys}
            for fut in concurrent.futures.as_completed(futures):
                key = futures[fut]
                results[key] = fut.result()
                progress(len(results), key, results[key])
    else:
        for key in keys:
            results[key] = compile_job(key)
            progress(len(results), key, results[key])
    return results


# -- the audit ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Step:
    arch: str
    dtype: str
    model: str
    path: str
    launches: list


def capture(arch: Arch, model: str, batch: int, dtype: str, path: str) -> Step:
    """The launches of one training step, identical launches merged (``uses`` counts them)."""
    with StandInGPU(arch) as gpu:
        gpu.run_step(model, batch, DTYPES[dtype], PATHS[path])
    merged: dict = {}
    for launch in gpu.launches:
        if launch.signature in merged:
            merged[launch.signature].uses += 1
        else:
            merged[launch.signature] = launch
            _JOBS.update({v.key: v.job for v in launch.variants})
    return Step(arch.name, dtype, model, path, list(merged.values()))


def first_step_counts(step: Step) -> dict:
    """What a first training step compiles on a GPU: distinct (kernel, specialisation, config) binaries, and
    the autotuner's benchmark runs (the pruned configs of each new key; Triton >= 3.7 skips a lone one)."""
    keys = {v.key for launch in step.launches for v in launch.variants}
    tuned = {}
    for launch in step.launches:
        if launch.tuner:
            tuned[(launch.tuner["id"], launch.tuner["key"])] = launch.tuner["pruned"]
    runs = sum(n for n in tuned.values() if n > 1)
    return {"arch": step.arch, "dtype": step.dtype, "model": step.model, "path": step.path,
            "launches": sum(launch.uses for launch in step.launches), "compiles": len(keys),
            "autotune_keys": len(tuned), "benchmark_runs": runs}


def rows_of(step: Step, results: dict, only: str | None) -> list[dict]:
    """One row per (launch, config) of a step, with its compile result and flags."""
    arch = ARCHS[step.arch]
    rows = []
    for launch in step.launches:
        for v in launch.variants:
            tag = ".".join((launch.kernel, launch.case, v.config, step.dtype, step.arch, step.model, step.path))
            if only and only not in tag:
                continue
            rec = results.get(v.key)
            if rec is None:
                continue
            tiles = math.prod(v.grid)
            row = {"arch": step.arch, "dtype": step.dtype, "model": step.model, "path": step.path,
                   "op": launch.op, "case": launch.case, "role": launch.role, "kernel": launch.kernel,
                   "config": v.config, "num_warps": v.num_warps, "num_stages": v.num_stages,
                   "uses": launch.uses, "dims": launch.dims, "grid": list(v.grid), "tiles": tiles,
                   "autotune": ({k: launch.tuner[k] for k in ("configs", "pruned")} if launch.tuner else None),
                   "compile_key": v.key, **{k: val for k, val in rec.items() if k != "num_warps"},
                   "constexprs": v.constexprs, "tag": tag}
            if rec.get("ok"):
                ctas, limiter = occupancy(rec.get("regs"), rec["shared"], rec["num_warps"], arch)
                row.update(ctas_per_sm=ctas, occupancy_limit=limiter,
                           waves=round(waves(tiles, ctas, arch.sms), 2) if ctas else None)
            row["flags"] = flags(row, arch)
            rows.append(row)
    return rows


def flags(row: dict, arch: Arch) -> list[str]:
    if not row.get("ok"):
        return ["ERROR"]
    out = []
    if row.get("spill_stores") or row.get("spill_loads"):
        out.append("SPILL")
    if (arch.capability >= 90 and row.get("dot") and row["num_warps"] >= 4 and row["dtype"] != "fp32"
            and not row.get("wgmma")):
        out.append("NO-WGMMA")
    if row["shared"] > arch.smem_per_cta:
        out.append("SMEM")
    if row.get("role") == "dw" and (row.get("waves") is None or row["waves"] < 2):
        out.append("WAVES<2")
    return out


# -- reports ------------------------------------------------------------------------------------------------------
_COLUMNS = ("kernel", "case", "dims", "config", "uses", "regs", "spill st/ld B", "smem KB",
            "wgmma / mma.sync / TMA / cp.async", "CTAs/SM (limit)", "tiles", "waves", "flags")
_TABLE_HEAD = "| " + " | ".join(_COLUMNS) + " |\n|" + "---|" * len(_COLUMNS)


def _table_row(r: dict) -> str:
    dims = " ".join(f"{k}={v}" for k, v in list(r["dims"].items())[:4])
    if not r.get("ok"):
        return (f"| `{r['kernel']}` | {r['case']} | {dims} | {r['config']} | {r['uses']} | | | | | | {r['tiles']} | "
                f"| ERROR: {r.get('error', '')[:160].replace('|', '/')} |")
    waves_ = "-" if r.get("waves") is None else f"{r['waves']:.2f}"
    return (f"| `{r['kernel']}` | {r['case']} | {dims} | {r['config']} | {r['uses']} | {r.get('regs', '?')} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {r['shared'] / 1024:.1f} | "
            f"{r['wgmma']} / {r['mma_sync']} / {r['tma']} / {r['cp_async']} | "
            f"{r['ctas_per_sm']} ({r['occupancy_limit']}) | {r['tiles']} | {waves_} | {' '.join(r['flags'])} |")


def markdown(rows: list[dict], counts: list[dict], meta: dict) -> str:
    out = ["# Static kernel audit (generated by `python -m vitkernels audit`)", ""]
    out += [f"- {k}: {v}" for k, v in meta.items()]
    out += ["", "Columns: regs per thread and spill bytes (ptxas -v), shared memory per CTA (Triton's metadata), "
            "instruction counts in the PTX, CTAs resident per SM and the limiting resource, tiles = CTAs in the "
            "grid, waves = tiles / (SMs x CTAs per SM); uses = launches per training step. Flags: "
            "SPILL, NO-WGMMA (tl.dot, >= 4 warps, 16-bit, sm_90a, no wgmma in the PTX), SMEM (over the "
            "per-CTA limit), WAVES<2 (weight-gradient GEMM under two waves), ERROR.", ""]
    out += ["## Summary", "", "| arch | dtype | model | path | rows | distinct compiles | " + " | ".join(FLAGS)
            + " |", "|" + "---|" * (6 + len(FLAGS))]
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["arch"], r["dtype"], r["model"], r["path"]), []).append(r)
    for (arch, dtype, model, path), rs in groups.items():
        n = {f: sum(f in r["flags"] for r in rs) for f in FLAGS}
        out.append(f"| {arch} | {dtype} | {model} | {path} | {len(rs)} | {len({r['compile_key'] for r in rs})} | "
                   + " | ".join(str(n[f]) for f in FLAGS) + " |")
    if counts:
        out += ["", "## First training step: compiles and autotune runs", "",
                "Distinct binaries (kernel x specialisation x config) a first training step compiles on a GPU "
                "(every config the autotuner benchmarks is compiled), and the benchmark runs (pruned configs "
                "per new autotune key; Triton 3.6 also benchmarks a lone pruned config).", "",
                "| arch | dtype | model | path | kernel launches | compiles | autotune keys | benchmark runs |",
                "|---|---|---|---|---|---|---|---|"]
        out += [f"| {c['arch']} | {c['dtype']} | {c['model']} | {c['path']} | {c['launches']} | {c['compiles']} | "
                f"{c['autotune_keys']} | {c['benchmark_runs']} |" for c in counts]
    flagged: dict = {}  # the same config flagged in several dtypes / models / paths: one row
    for r in rows:
        if r["flags"]:
            key = (r["arch"], r["kernel"], r["case"], r["config"], tuple(r["flags"]))
            flagged.setdefault(key, []).append(r)
    out += ["", f"## Flagged ({sum(map(len, flagged.values()))} rows, {len(flagged)} distinct)", "",
            "One line per (arch, kernel, case, config, flags); the figures are those of its first row."]
    if flagged:
        out += ["", "| arch | kernel | case | config | dtypes | models (paths) | regs | spill st/ld B | smem KB | "
                "wgmma / mma.sync | CTAs/SM | waves | flags |", "|" + "---|" * 13]
        for (arch, kernel, case, config, fl), rs in flagged.items():
            r = rs[0]
            where = ", ".join(f"{m} ({'/'.join(dict.fromkeys(x['path'] for x in rs if x['model'] == m))})"
                              for m in dict.fromkeys(x["model"] for x in rs))
            figures = (f"{r.get('regs', '?')} | {r['spill_stores']}/{r['spill_loads']} | {r['shared'] / 1024:.1f} | "
                       f"{r['wgmma']} / {r['mma_sync']} | {r['ctas_per_sm']} | "
                       f"{'-' if r.get('waves') is None else r['waves']}" if r.get("ok")
                       else f"| | | | | ERROR: {r.get('error', '')[:160].replace('|', '/')}")
            out.append(f"| {arch} | `{kernel}` | {case} | {config} | {','.join(dict.fromkeys(x['dtype'] for x in rs))} "
                       f"| {where} | {figures} | {' '.join(fl)} |")
    else:
        out.append("None.")
    tables: dict = {}  # (arch, dtype, model) -> rows, a launch of both paths once
    for r in rows:
        same = (r["kernel"], r["case"], r["config"], r["compile_key"], tuple(r["grid"]), r["uses"])
        tables.setdefault((r["arch"], r["dtype"], r["model"]), {}).setdefault(same, []).append(r)
    for (arch, dtype, model), merged in tables.items():
        out += ["", f"## {arch}, {dtype}, {model}", "", _TABLE_HEAD.replace("| case |", "| case | paths |", 1)
                + "---|"]
        for rs in merged.values():
            paths = "/".join(dict.fromkeys(r["path"] for r in rs))
            out.append(_table_row(rs[0]).replace(f" | {rs[0]['case']} | ", f" | {rs[0]['case']} | {paths} | ", 1))
    return "\n".join(out) + "\n"


def _csv(value: str, known, what: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    bad = [v for v in items if v not in known]
    if not items or bad:
        raise ValueError(f"unknown {what} {', '.join(bad) or repr(value)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(items))


def parse_args(argv: list[str] | None):
    p = ArgumentParser(prog="vitkernels audit", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="sm_90a,sm_80", help="compile targets (default: %(default)s)")
    p.add_argument("--dtypes", default="fp16,bf16", help="fp16, bf16, fp32 (default: %(default)s)")
    p.add_argument("--models", default=",".join(DEFAULT_MODELS), help="model names (default: %(default)s)")
    p.add_argument("--batch", type=int, default=256, help="batch size of the training step (default: 256)")
    p.add_argument("--paths", default="lean,per-op",
                   help="block paths: lean (the default model), per-op (lean_blocks=False) (default: %(default)s)")
    p.add_argument("--only", default=None, help="compile only rows whose kernel.case.config.dtype.arch.model.path "
                   "contains this substring")
    p.add_argument("--out", default=None, help="directory for audit.jsonl and audit.md")
    p.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1), help="parallel compiles")
    p.add_argument("--cache-dir", default=None, help="Triton cache (default: a fresh temporary one, so that "
                   "ptxas runs and reports spills)")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args(argv)
    a.arch = _csv(a.arch, ARCHS, "arch")
    a.dtypes = _csv(a.dtypes, DTYPES, "dtype")
    a.paths = _csv(a.paths, PATHS, "path")
    from vitkernels.models import list_models, model_config

    a.models = _csv(a.models, list_models(), "model")
    for m in a.models:
        model_config(m)
    if a.batch < 1:
        raise ValueError(f"--batch must be a positive integer, got {a.batch}")
    if a.jobs < 1:
        raise ValueError(f"--jobs must be a positive integer, got {a.jobs}")
    return a


def run(args) -> tuple[list[dict], list[dict], dict]:
    """Capture, compile, report: (rows, first-step counts, metadata)."""
    start = time.time()
    triton = _import_triton()
    cache = args.cache_dir or tempfile.mkdtemp(prefix="vitkernels-audit-triton-")
    os.environ["TRITON_CACHE_DIR"] = cache
    from triton import knobs

    knobs.cache.dir = cache
    log = (lambda *a: None) if args.quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    steps = []
    for arch in args.arch:
        for dtype in args.dtypes:
            for model in args.models:
                for path in args.paths:
                    t0 = time.time()
                    steps.append(capture(ARCHS[arch], model, args.batch, dtype, path))
                    s = steps[-1]
                    log(f"captured {arch} {dtype} {model} {path}: {sum(x.uses for x in s.launches)} launches, "
                        f"{len(s.launches)} distinct, {sum(len(x.variants) for x in s.launches)} configs "
                        f"({time.time() - t0:.1f} s)")
    wanted = []
    for s in steps:
        for launch in s.launches:
            for v in launch.variants:
                tag = ".".join((launch.kernel, launch.case, v.config, s.dtype, s.arch, s.model, s.path))
                if (not args.only or args.only in tag) and v.key not in wanted:
                    wanted.append(v.key)
    names = {v.key: f"{s.arch} {s.dtype} {launch.kernel} {launch.case} {v.config}"
             for s in steps for launch in s.launches for v in launch.variants}
    log(f"compiling {len(wanted)} distinct specialisations with {args.jobs} job(s), Triton {triton.__version__}, "
        f"cache {cache}")

    def progress(i, key, rec):
        brief = (f"regs {rec.get('regs')} spill {rec.get('spill_stores')} smem {rec.get('shared')} "
                 f"wgmma {rec.get('wgmma')} mma.sync {rec.get('mma_sync')}" if rec["ok"] else rec["error"][:200])
        log(f"[{i}/{len(wanted)}] {names[key]}: {brief} ({rec['compile_s']} s)")

    try:
        results = compile_all(wanted, args.jobs, progress)
    finally:
        if not args.cache_dir:
            shutil.rmtree(cache, ignore_errors=True)
    rows = [r for s in steps for r in rows_of(s, results, args.only)]
    first_row: dict = {}
    for i, r in enumerate(rows):  # the first row with the same binary: its line in audit.jsonl
        r["dedup_of"] = first_row.get(r["compile_key"])
        first_row.setdefault(r["compile_key"], i)
        if r["dedup_of"] is not None:
            del r["constexprs"]  # that row has them
    first = [s for s in steps if s.model == FIRST_STEP_MODEL and s.path == "lean"] or steps[:1]
    counts = [first_step_counts(s) for s in first]
    meta = {"command": "python -m vitkernels audit " + " ".join(args.argv),
            "commit": git_commit() or "unknown",
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": f"torch {torch.__version__}, triton {triton.__version__}",
            "targets": ", ".join(f"{a} = GPUTarget('cuda', {ARCHS[a].capability}, 32), {ARCHS[a].sms} SMs "
                                 f"({ARCHS[a].gpu})" for a in args.arch),
            "scope": f"batch {args.batch}; dtypes {','.join(args.dtypes)}; models {','.join(args.models)}; "
                     f"paths {','.join(args.paths)}" + (f"; only {args.only!r}" if args.only else ""),
            "distinct compiles": len(wanted),
            "seconds": round(time.time() - start, 1)}
    return rows, counts, meta


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.argv = argv
    rows, counts, meta = run(args)
    md = markdown(rows, counts, meta)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "audit.jsonl"), "w") as f:
            for r in rows:
                f.write(json.dumps({k: v for k, v in r.items() if k != "tag"}) + "\n")
            for c in counts:
                f.write(json.dumps({"first_step": c}) + "\n")
            f.write(json.dumps({"meta": meta}) + "\n")
        with open(os.path.join(args.out, "audit.md"), "w") as f:
            f.write(md)
        print(f"wrote {os.path.join(args.out, 'audit.jsonl')} and audit.md ({len(rows)} rows, "
              f"{sum(bool(r['flags']) for r in rows)} flagged, {meta['seconds']} s)")
    else:
        print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
