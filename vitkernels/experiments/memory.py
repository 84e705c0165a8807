"""Memory of a ViT training step, and the HBM traffic that goes with it: figures anyone can rerun.

``python -m vitkernels bench --memory`` reports, for timm eager (``timm.models.vision_transformer``), and
vitkernels' ``VisionTransformer`` with the same constructor arguments on the ``torch`` and ``triton`` backends:

- saved bytes: what one training forward keeps for the backward. Every tensor autograd packs
  (``torch.autograd.graph.saved_tensors_hooks``) is counted by its storage, each distinct storage once (q, k, v
  as views of one qkv buffer are one buffer), parameters and views of them excluded (a weight is kept anyway).
  Per block: the storages first packed between a block's forward pre-hook and its forward hook; per model: the
  whole forward (the input images included: the patch embedding keeps them).
- peak: the peak memory of one training step (forward under autocast + cross-entropy + backward + AdamW step +
  zero_grad; the second step, so the optimizer state exists), estimated without compute under
  ``FakeTensorMode`` by ``torch.distributed._tools.mem_tracker.MemTracker``; on a GPU also measured, a real
  step between ``torch.cuda.reset_peak_memory_stats`` and ``torch.cuda.max_memory_allocated``.
- traffic: an HBM-traffic proxy, the bytes every dispatched op reads + writes in forward + cross-entropy +
  backward (views, metadata and allocation ops move nothing; a fused custom op counts its inputs and outputs,
  since what it computes inside stays on chip). Per image = the slope between two batch sizes: the intercept
  is the weights' (and weight gradients') traffic, which a large batch amortises.
- checkpointing: the triton backend with gradient checkpointing none / selective / full: memory live after the
  forward, estimated peak, and the FLOPs of forward + backward (``torch.utils.flop_counter.FlopCounterMode``,
  recomputation included).

How the estimates model a GPU (stated in every report):

- Fake tensors live on CUDA when a GPU is visible. Without one they live on the CPU: autograd's backward on
  fake CUDA tensors asks the driver for a primary context (torch >= 2.11) and fails. CPU autocast casts the ops
  of a ViT as CUDA autocast does (conv, linear and attention to the autocast dtype; LayerNorm runs on the fp32
  residual stream and stays fp32), and SDPA on the CPU is a flash kernel that keeps (out, lse), as flash does on
  an H100.
- On fake CUDA tensors SDPA falls back to its math path, which keeps the N x N attention matrix, something a
  GPU never runs for timm; ``flash_sdpa`` routes it to the flash kernel (fp16/bf16) or the memory-efficient one
  (fp32), the kernels an H100 picks for head dim 64.
- Without a GPU the triton backend resolves only under Triton's interpreter (``TRITON_INTERPRET=1``, read when
  vitkernels probes its backends), so ``report`` then runs in a subprocess with it set. No kernel runs under
  ``FakeTensorMode``: the custom ops' fake functions give the outputs' shapes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import json
import os
import statistics
import subprocess
import sys
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from vitkernels.experiments.env import autocast

PROVIDERS = ("timm-eager", "vitkernels-torch", "vitkernels-triton")
CHECKPOINTING = ("none", "selective", "full")
# The peak section's extra row: the triton backend with fp32_residual=True (timm's fp32 residual stream).
FP32_RESIDUAL_ROW = "vitkernels-triton*"
BASELINE = "timm-eager"
# Defaults of the report: the peak at the training batch (no compute, so fine on a CPU); saved bytes and
# traffic at small batches in fp32, where the reference figures of issue #14 were taken.
DEFAULTS = dict(model="vit_base_patch16_224", batch_size=256, dtype="bf16")
SAVED_BATCH = 2
TRAFFIC_BATCHES = (2, 4)
SMALL_DTYPE = "fp32"
# The line of the subprocess's stdout that carries the report.
_JSON_TAG = "VITKERNELS_MEMORY_JSON "


# -- models ------------------------------------------------------------------------------------------------
def build(provider: str, cfg: dict, **kwargs) -> nn.Module:
    """``provider``'s model (one of ``PROVIDERS``) with constructor arguments ``cfg`` (+ ``kwargs``), in train
    mode on the current default device."""
    if provider == "timm-eager":
        from timm.models.vision_transformer import VisionTransformer

        return VisionTransformer(**cfg, **kwargs).train()
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; the memory report covers {', '.join(PROVIDERS)}")
    from vitkernels import VisionTransformer

    return VisionTransformer(**cfg, **kwargs, backend=provider.split("-", 1)[1]).train()


def fake_model(provider: str, cfg: dict, mode: FakeTensorMode, device: torch.device) -> nn.Module:
    """``provider``'s model whose parameters are fake tensors of ``mode`` on ``device``.

    Built on the meta device (no memory, no initialisation: a ViT-B/16 costs nothing), then materialised as
    fake tensors. Built outside fake mode (also when called inside it) because the constructors call
    ``.item()`` on their drop-path rates, which a fake tensor cannot answer.
    """
    with unset_fake_temporarily(), torch.device("meta"):
        model = build(provider, cfg, weight_init="skip")
    # to_empty reads only the meta parameters' shapes; fake mode refuses non-fake inputs unless told.
    mode.allow_non_fake_inputs = True
    try:
        with mode:
            model.to_empty(device=device)
    finally:
        mode.allow_non_fake_inputs = False
    return model


def set_checkpointing(model: nn.Module, how: str) -> None:
    """Gradient checkpointing ``how`` (one of ``CHECKPOINTING``) on a vitkernels model: ``selective`` keeps the
    GEMM and attention outputs and recomputes the rest; ``full`` keeps only each block's input. Raises
    TypeError where the model's ``set_grad_checkpointing`` has no ``selective`` argument."""
    if how not in CHECKPOINTING:
        raise ValueError(f"unknown checkpointing {how!r}; choose one of {', '.join(CHECKPOINTING)}")
    if how == "selective":
        model.set_grad_checkpointing(True, selective=True)
    else:
        model.set_grad_checkpointing(how == "full")


@contextlib.contextmanager
def flash_sdpa() -> Iterator[None]:
    """Route ``F.scaled_dot_product_attention`` on CUDA tensors without a mask to the kernel an H100 runs.

    Under fake CUDA tensors SDPA takes its math path (it cannot ask the device which fused kernel applies),
    which keeps the (B, H, N, N) attention matrix for the backward. Inside this context it calls the flash
    kernel (fp16/bf16) or the memory-efficient one (fp32), which keep (out, lse); both have autograd. Inputs are
    cast as autocast would cast SDPA. timm and the torch backend look the function up at call time, so
    replacing the module attribute reaches them.
    """
    original = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if attn_mask is not None or enable_gqa or query.device.type != "cuda":
            return original(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                            scale=scale, enable_gqa=enable_gqa)
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else query.dtype
        q, k, v = (t.to(dtype) for t in (query, key, value))
        if dtype in (torch.float16, torch.bfloat16):
            return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, dropout_p, is_causal,
                                                                        scale=scale)[0]
        return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, dropout_p, is_causal,
                                                                       scale=scale)[0]

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


@contextlib.contextmanager
def fake_step(device: torch.device) -> Iterator[FakeTensorMode]:
    """A FakeTensorMode (entered) in which a training step on ``device`` is modelled as a GPU runs it: with
    ``flash_sdpa`` on CUDA (on the CPU, SDPA is already a flash kernel). See the module docstring."""
    mode = FakeTensorMode()
    with mode, (flash_sdpa() if device.type == "cuda" else contextlib.nullcontext()):
        yield mode


def fake_device() -> torch.device:
    """Where the fake tensors of an estimate live: CUDA when a GPU is visible, else the CPU (module docstring)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _batch(cfg: dict, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random images (batch, in_chans, img, img) and labels (batch,) on ``device`` (fake under fake mode)."""
    img = cfg["img_size"]
    images = torch.randn(batch, cfg.get("in_chans", 3), img, img, device=device)
    labels = torch.randint(0, max(1, cfg.get("num_classes", 1000)), (batch,), device=device)
    return images, labels


def _train_step(model: nn.Module, opt, images: torch.Tensor, labels: torch.Tensor, amp: str,
                after_forward: Callable[[], None] | None = None) -> None:
    """forward (autocast ``amp``) + cross-entropy + backward (+ AdamW step + zero_grad when ``opt``), as bench
    times it."""
    with autocast(images.device, amp):
        logits = model(images)
    if after_forward is not None:
        after_forward()
    F.cross_entropy(logits.float(), labels).backward()
    if opt is not None:
        opt.step()
        opt.zero_grad(set_to_none=True)


# -- saved for backward ------------------------------------------------------------------------------------
def storage_key(t: torch.Tensor) -> int:
    """The identity of ``t``'s storage, equal for every view of it; works for FakeTensors (whose data_ptr is
    deprecated) as for real ones."""
    return t.untyped_storage()._cdata


class SavedTensors:
    """Context manager recording what autograd saves for the backward inside it.

    Each distinct storage counts once, with its full size (a view keeps its whole storage alive), parameters'
    storages excluded. With ``blocks``, a storage is attributed to the block that was running when it was
    first packed (between the block's forward pre-hook and forward hook), else to ``None`` (outside blocks).

    Attributes:
        by_block: {block index or None: bytes}.
        total: bytes of all distinct storages saved.
    """

    def __init__(self, model: nn.Module, blocks: list[nn.Module] | None = None):
        self._params = {storage_key(p) for p in model.parameters()}
        self._blocks = list(blocks or [])
        self._current: int | None = None
        self._seen: set[int] = set()
        self.by_block: dict[int | None, int] = collections.Counter()
        self._stack = contextlib.ExitStack()

    @property
    def total(self) -> int:
        return sum(self.by_block.values())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key not in self._params and key not in self._seen:
            self._seen.add(key)
            self.by_block[self._current] += t.untyped_storage().nbytes()
        return t  # kept as is: the hooks observe, they change nothing

    def __enter__(self) -> "SavedTensors":
        for i, blk in enumerate(self._blocks):
            self._stack.enter_context(blk.register_forward_pre_hook(lambda *_, i=i: setattr(self, "_current", i)))
            self._stack.enter_context(blk.register_forward_hook(lambda *_: setattr(self, "_current", None)))
        self._stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def saved_bytes(model: nn.Module, images: torch.Tensor, amp: str = "fp32") -> int:
    """Bytes one training forward of ``model`` on ``images`` (B, C, H, W) saves for the backward (autocast
    ``amp``): distinct storages, parameters excluded (see ``SavedTensors``). Real or fake tensors."""
    with SavedTensors(model) as saved, autocast(images.device, amp):
        model(images)
    return saved.total


def block_saved_bytes(model: nn.Module, images: torch.Tensor, amp: str = "fp32") -> list[int]:
    """Bytes saved for the backward while each of ``model.blocks`` runs, one entry per block (autocast
    ``amp``). A block's input counts in the block that saves it (its first LayerNorm), so every block of a
    ViT reports the same figure, which equals saved_bytes(depth 2) - saved_bytes(depth 1)."""
    blocks = list(model.blocks)
    with SavedTensors(model, blocks) as saved, autocast(images.device, amp):
        model(images)
    return [saved.by_block.get(i, 0) for i in range(len(blocks))]


def provider_saved_bytes(provider: str, cfg: dict, batch: int = SAVED_BATCH, amp: str = SMALL_DTYPE,
                         device: torch.device | None = None) -> dict:
    """Saved bytes of ``provider``'s model under fake mode: {per_block (median over blocks), blocks (each),
    per_model, values_per_token (per block, in fp32 values of width C per token: timm keeps 16)}."""
    device = device or fake_device()
    with fake_step(device) as mode:
        model = fake_model(provider, cfg, mode, device)
        images, _ = _batch(cfg, batch, device)
        blocks = block_saved_bytes(model, images, amp)
        total = saved_bytes(model, images, amp)
    tokens = batch * (model.patch_embed.num_patches + model.num_prefix_tokens)
    per_block = int(statistics.median(blocks)) if blocks else 0
    return dict(per_block=per_block, blocks=blocks, per_model=total,
                values_per_token=per_block / (tokens * cfg["embed_dim"] * 4))


# -- peak memory -------------------------------------------------------------------------------------------
def _total(snapshot: dict) -> int:
    return sum(dev["Total"] for dev in snapshot.values())


def estimate_peak(provider: str, cfg: dict, batch: int, amp: str = "bf16", checkpointing: str = "none",
                  device: torch.device | None = None) -> dict:
    """Estimated peak memory of one training step of ``provider``'s model, without compute.

    Two steps run under ``FakeTensorMode`` (fake parameters, images (batch, 3, img, img), labels (batch,)):
    the first creates AdamW's state (and is counted by FlopCounterMode), the second runs under MemTracker.

    Returns:
        peak: bytes at the step's peak (parameters, gradients, optimizer state, activations, temporaries).
        activations: bytes live after the forward beyond what was live before it (parameters, optimizer state,
            the batch): what the backward keeps, checkpoint inputs and autocast's weight copies included.
        peak_by_kind: MemTracker's breakdown of the peak (Parameter, Gradient, Optstate, Activation, Temp ...).
        flops: FLOPs of the step (forward + backward, recomputation included; FlopCounterMode).
    Raises TypeError when ``checkpointing`` is not supported by the model (see ``set_checkpointing``).
    """
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.utils.flop_counter import FlopCounterMode

    device = device or fake_device()
    with fake_step(device) as mode:
        model = fake_model(provider, cfg, mode, device)
        if checkpointing != "none":
            set_checkpointing(model, checkpointing)
        images, labels = _batch(cfg, batch, device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        with FlopCounterMode(display=False) as counter:
            _train_step(model, opt, images, labels, amp)
        tracker = MemTracker()
        tracker.track_external(model, opt, images, labels)
        live = {}
        with tracker:
            live["before"] = _total(tracker.get_tracker_snapshot("current"))
            _train_step(model, opt, images, labels, amp,
                        after_forward=lambda: live.setdefault("after", _total(tracker.get_tracker_snapshot("current"))))
        peak = tracker.get_tracker_snapshot("peak")
    kinds = collections.Counter()
    for dev in peak.values():
        kinds.update({getattr(k, "value", str(k)): v for k, v in dev.items() if k != "Total" and v})
    return dict(peak=_total(peak), activations=live["after"] - live["before"], peak_by_kind=dict(kinds),
                flops=int(counter.get_total_flops()))


def measure_peak(provider: str, cfg: dict, batch: int, amp: str = "bf16", device: str = "cuda") -> int:
    """Measured peak memory (bytes, ``torch.cuda.max_memory_allocated``) of one real training step on a GPU:
    bench's step, run once first (optimizer state, autotuning), then once between the peak reset and read."""
    from vitkernels.experiments.bench import make_step

    device = torch.device(device)
    step = make_step(provider, "train", cfg, batch, amp, device)
    try:
        step()
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return int(torch.cuda.max_memory_allocated(device))
    finally:
        del step
        gc.collect()
        torch.cuda.empty_cache()


# -- HBM traffic proxy -------------------------------------------------------------------------------------
# Ops that allocate or describe without moving bytes (views are recognised by their schema).
_MOVES_NOTHING = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh",
                  "_local_scalar_dense", "sym_size", "sym_stride", "sym_numel", "sym_storage_offset",
                  "is_same_size", "_has_compatible_shallow_copy_type"}


class Traffic(TorchDispatchMode):
    """Bytes each dispatched op reads + writes, summed per op (``by_op``) and in all (``total``).

    An op counts every distinct tensor among its inputs and outputs once, numel x element size (an in-place
    op's buffer once); views and allocation ops count nothing. Tensors are told apart by (storage, offset,
    shape, stride, dtype), which fake tensors answer. Ops nested inside a custom op's implementation are not
    dispatched through this mode, so a fused op counts as the one kernel it is.
    """

    def __init__(self):
        super().__init__()
        self.by_op: collections.Counter = collections.Counter()

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket.__name__ in _MOVES_NOTHING:
            return out
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if not outputs and not func._schema.is_mutable:  # a query (prim.device, sizes): no kernel runs
            return out
        seen, moved = set(), 0
        for t in tree_flatten((args, kwargs, out))[0]:
            if isinstance(t, torch.Tensor) and t.numel() > 0:
                key = (storage_key(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
                if key not in seen:
                    seen.add(key)
                    moved += t.numel() * t.element_size()
        self.by_op[str(func.overloadpacket)] += moved
        return out


def step_traffic(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, amp: str = "fp32") -> Traffic:
    """The traffic proxy of forward + cross-entropy + backward of ``model`` on ``images`` (gradients set to
    None first, so every step writes them afresh)."""
    model.zero_grad(set_to_none=True)
    with Traffic() as traffic:
        _train_step(model, None, images, labels, amp)
    return traffic


def traffic_per_image(provider: str, cfg: dict, batches: tuple[int, int] = TRAFFIC_BATCHES,
                      amp: str = SMALL_DTYPE, device: torch.device | None = None) -> dict:
    """Per-image traffic proxy of ``provider``'s training step: the slope between ``batches`` (under fake mode).

    Returns {per_image: bytes per image, intercept: bytes at batch 0 (weights and their gradients), totals:
    {batch: bytes}, top_ops: the 8 ops moving the most bytes per image}. The AdamW step is left out: its
    traffic does not grow with the batch.
    """
    device = device or fake_device()
    b0, b1 = batches
    if not 0 < b0 < b1:
        raise ValueError(f"traffic needs two batch sizes 0 < b0 < b1, got {batches}")
    with fake_step(device) as mode:
        model = fake_model(provider, cfg, mode, device)
        runs = {b: step_traffic(model, *_batch(cfg, b, device), amp=amp) for b in (b0, b1)}
    per_image = (runs[b1].total - runs[b0].total) / (b1 - b0)
    ops = {op: (runs[b1].by_op[op] - runs[b0].by_op[op]) / (b1 - b0) for op in runs[b1].by_op}
    top = dict(sorted(ops.items(), key=lambda kv: -kv[1])[:8])
    return dict(per_image=per_image, intercept=runs[b0].total - b0 * per_image,
                totals={str(b): r.total for b, r in runs.items()}, top_ops=top)


# -- the report --------------------------------------------------------------------------------------------
def _ratio(value, base):
    return None if value is None or not base else value / base


def _skip_reason(provider: str) -> str | None:
    """Why ``provider`` cannot be modelled here (None when it can)."""
    if provider == "timm-eager":
        try:
            import timm.models.vision_transformer  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"timm is not importable ({type(exc).__name__}: {exc})"
        return None
    from vitkernels.backends import why_not

    return why_not(provider.split("-", 1)[1], fake_device())


def _attach_ratios(rows: list[dict], fields: tuple[str, ...]) -> None:
    base = next((r for r in rows if r["provider"] == BASELINE and not r.get("skipped")), None)
    for row in rows:
        for f in fields:
            row[f"{f}_vs_timm"] = _ratio(row.get(f), base and base.get(f))


def _guard(fn: Callable[[], dict]) -> dict:
    """Run ``fn``; a failure becomes {skipped: "failed: ..."} so one provider cannot end the report."""
    try:
        return dict(fn(), skipped=None)
    except Exception as exc:  # noqa: BLE001
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        return dict(skipped=f"failed: {type(exc).__name__}: {first}")


def _resolve(args: argparse.Namespace) -> tuple[dict, list[str], int, str]:
    from vitkernels.experiments.bench import model_kwargs

    for key, value in DEFAULTS.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    providers = args.providers
    if isinstance(providers, str):
        providers = [p.strip() for p in providers.split(",") if p.strip()]
    providers = list(providers or PROVIDERS)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"--memory covers the providers {', '.join(PROVIDERS)}; got {', '.join(unknown)}")
    if args.batch_size < 1:
        raise ValueError("--batch-size must be at least 1")
    cfg = model_kwargs(args)
    return cfg, providers, args.batch_size, args.dtype


def _needs_interpreter(providers: list[str]) -> bool:
    """True when the triton provider can only be modelled in a process with TRITON_INTERPRET=1."""
    import importlib.util

    from vitkernels.backends import triton_interpreter

    return ("vitkernels-triton" in providers and not torch.cuda.is_available() and not triton_interpreter()
            and importlib.util.find_spec("triton") is not None)


def _report_in_subprocess(args: argparse.Namespace) -> dict:
    """``report(args)`` in ``python -m vitkernels.experiments.memory`` with TRITON_INTERPRET=1."""
    keys = ("model", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes", "batch_size",
            "dtype", "providers", "device")
    payload = json.dumps({k: getattr(args, k, None) for k in keys})
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run([sys.executable, "-m", "vitkernels.experiments.memory", payload], env=env,
                          capture_output=True, text=True, timeout=900)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(_JSON_TAG):
            rep = json.loads(line[len(_JSON_TAG):])
            break
    else:
        err = " ".join(proc.stderr.strip().splitlines()[-1:]) or f"exit code {proc.returncode}"
        if proc.returncode == 2:
            raise ValueError(err.removeprefix("error: "))
        raise RuntimeError(f"the memory report's subprocess failed: {err}")
    rep["ran_in"] = ("a subprocess (python -m vitkernels.experiments.memory) with TRITON_INTERPRET=1: without a GPU "
                     "the triton backend resolves only under Triton's interpreter; no kernel runs in fake mode")
    return rep


def report(args: argparse.Namespace) -> dict:
    """The memory report for bench's parsed ``args`` (model options, ``--batch-size`` and ``--dtype`` for the
    peak, ``--providers``): saved bytes, peak, traffic and checkpointing, each row with its ratio to timm eager
    and what ran. Without a GPU it runs in a subprocess with TRITON_INTERPRET=1 (module docstring)."""
    from vitkernels.experiments import harness

    cfg, providers, batch, amp = _resolve(args)
    if _needs_interpreter(providers):
        return _report_in_subprocess(args)
    device = fake_device()
    estimate = (f"estimate (FakeTensorMode + MemTracker) on fake {device.type} tensors"
                + ("" if device.type == "cuda" else
                   " (no GPU: fake CUDA tensors cannot run autograd's backward; CPU autocast casts a ViT's ops "
                   "as CUDA autocast does)"))
    attention = ("timm and the torch backend: SDPA as "
                 + ("the flash kernel (fp16/bf16) or memory-efficient kernel (fp32) an H100 picks for head dim 64, "
                    "in place of fake mode's math fallback" if device.type == "cuda" else
                    "the CPU flash kernel, which keeps (out, lse) as flash on an H100 does")
                 + "; the triton backend: its fused attention")
    skip = {p: _skip_reason(p) for p in providers}

    def rows() -> list[dict]:
        return [dict(provider=p, skipped=skip[p]) for p in providers]

    saved = rows()
    for row in saved:
        if not row["skipped"]:
            row.update(_guard(lambda: provider_saved_bytes(row["provider"], cfg, SAVED_BATCH, SMALL_DTYPE, device)))
    _attach_ratios(saved, ("per_block", "per_model"))

    peak = rows()
    for row in peak:
        if not row["skipped"]:
            row.update(_guard(lambda: estimate_peak(row["provider"], cfg, batch, amp, "none", device)))
            row["measured"] = None
            if torch.cuda.is_available() and not row["skipped"]:  # a real step on the GPU as well
                try:
                    row["measured"] = measure_peak(row["provider"], cfg, batch, amp)
                except Exception as exc:  # noqa: BLE001 - an OOM, say: the estimate stands alone
                    row["measured_failed"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    if "vitkernels-triton" in providers and not skip["vitkernels-triton"]:
        # timm's numerics under autocast: the residual stream in fp32 (vitkernels' default: the autocast dtype)
        row = dict(provider=FP32_RESIDUAL_ROW, measured=None)
        row.update(_guard(lambda: estimate_peak("vitkernels-triton", dict(cfg, fp32_residual=True), batch, amp,
                                                "none", device)))
        peak.append(row)
    _attach_ratios(peak, ("peak", "activations", "measured"))

    traffic = rows()
    for row in traffic:
        if not row["skipped"]:
            row.update(_guard(lambda: traffic_per_image(row["provider"], cfg, TRAFFIC_BATCHES, SMALL_DTYPE, device)))
    _attach_ratios(traffic, ("per_image",))

    ckpt = []
    if "vitkernels-triton" in providers:
        for how in CHECKPOINTING:
            row = dict(provider="vitkernels-triton", checkpointing=how, skipped=skip["vitkernels-triton"])
            if not row["skipped"]:
                try:
                    row.update(estimate_peak("vitkernels-triton", cfg, batch, amp, how, device), skipped=None)
                except TypeError as exc:  # set_grad_checkpointing(True, selective=True) not there yet
                    row["skipped"] = f"not supported by this vitkernels: {exc}"
                except Exception as exc:  # noqa: BLE001
                    row["skipped"] = f"failed: {type(exc).__name__}: {str(exc)[:200]}"
            ckpt.append(row)
        base = ckpt[0] if not ckpt[0]["skipped"] else {}
        for row in ckpt:
            for f in ("activations", "peak", "flops"):
                row[f"{f}_vs_none"] = _ratio(row.get(f), base.get(f))

    return dict(
        **harness.metadata(device), report="memory", ran_in="this process",
        config=dict(model=args.model, model_kwargs=cfg, providers=providers, fake_device=device.type),
        saved=dict(what="bytes one training forward saves for the backward (saved_tensors_hooks; distinct "
                        "storages; parameters excluded); per block: median over the blocks",
                   batch_size=SAVED_BATCH, dtype=SMALL_DTYPE,
                   ran=f"saved_tensors_hooks under FakeTensorMode on fake {device.type} tensors; {attention}",
                   rows=saved),
        peak=dict(what="peak memory of one training step: forward + cross-entropy + backward + AdamW step",
                  batch_size=batch, dtype=amp, ran=f"{estimate}; {attention}",
                  measured="torch.cuda.max_memory_allocated of a real step" if torch.cuda.is_available()
                  else "not measured: no GPU", rows=peak),
        traffic=dict(what="HBM-traffic proxy: bytes every dispatched op reads + writes in forward + cross-entropy "
                          "+ backward; per image = slope between the two batch sizes",
                     batch_sizes=list(TRAFFIC_BATCHES), dtype=SMALL_DTYPE,
                     ran=f"TorchDispatchMode under FakeTensorMode on fake {device.type} tensors; {attention}",
                     rows=traffic),
        checkpointing=dict(what="vitkernels-triton with gradient checkpointing: memory live after the forward, "
                                "estimated peak, FLOPs of forward + backward (recompute included)",
                           batch_size=batch, dtype=amp, ran=f"{estimate} + FlopCounterMode", rows=ckpt),
    )


# -- the table ---------------------------------------------------------------------------------------------
def _mb(v) -> str:
    return "-" if v is None else f"{v / 1e6:,.2f}"


def _gb(v) -> str:
    return "-" if v is None else f"{v / 1e9:,.2f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def format_table(rep: dict) -> str:
    """The report as a printed table (MB = 10^6 bytes, GB = 10^9 bytes)."""
    k = rep["config"]["model_kwargs"]
    out = [f"memory report: {rep['config']['model']} (embed {k['embed_dim']}, depth {k['depth']}, heads "
           f"{k['num_heads']}, patch {k['patch_size']}, {k['img_size']} px); {rep['device']}, {rep['date']}",
           f"ran in {rep['ran_in']}"]

    s = rep["saved"]
    out += ["", f"saved for backward, {s['dtype']}, batch {s['batch_size']}: {s['what']}", f"  ran: {s['ran']}",
            f"  {'provider':18s} {'block MB':>10s} {'vs timm':>8s} {'C/token':>8s} {'model MB':>10s} {'vs timm':>8s}"]
    for r in s["rows"]:
        out.append(f"  {r['provider']:18s} skipped: {r['skipped']}" if r["skipped"] else
                   f"  {r['provider']:18s} {_mb(r['per_block']):>10s} {_x(r['per_block_vs_timm']):>8s} "
                   f"{r['values_per_token']:8.2f} {_mb(r['per_model']):>10s} {_x(r['per_model_vs_timm']):>8s}")

    p = rep["peak"]
    out += ["", f"peak of one training step, {p['dtype']} autocast, batch {p['batch_size']}: {p['what']}",
            f"  ran: {p['ran']}", f"  measured: {p['measured']}",
            f"  {'provider':18s} {'peak GB':>9s} {'vs timm':>8s} {'activ. GB':>10s} {'vs timm':>8s} "
            f"{'measured GB':>12s} {'vs timm':>8s}"]
    for r in p["rows"]:
        out.append(f"  {r['provider']:18s} skipped: {r['skipped']}" if r["skipped"] else
                   f"  {r['provider']:18s} {_gb(r['peak']):>9s} {_x(r['peak_vs_timm']):>8s} "
                   f"{_gb(r['activations']):>10s} {_x(r['activations_vs_timm']):>8s} "
                   f"{_gb(r['measured']):>12s} {_x(r['measured_vs_timm']):>8s}")
    if any(r["provider"] == FP32_RESIDUAL_ROW for r in p["rows"]):
        out.append(f"  {FP32_RESIDUAL_ROW}: fp32_residual=True, the residual stream kept in fp32 under autocast as "
                   "timm keeps it (the default keeps it in the autocast dtype)")

    t = rep["traffic"]
    out += ["", f"traffic per image, {t['dtype']}, batches {t['batch_sizes']}: {t['what']}", f"  ran: {t['ran']}",
            f"  {'provider':18s} {'MB/image':>10s} {'vs timm':>8s} {'weights MB':>11s}"]
    for r in t["rows"]:
        out.append(f"  {r['provider']:18s} skipped: {r['skipped']}" if r["skipped"] else
                   f"  {r['provider']:18s} {_mb(r['per_image']):>10s} {_x(r['per_image_vs_timm']):>8s} "
                   f"{_mb(r['intercept']):>11s}")

    c = rep["checkpointing"]
    if c["rows"]:
        out += ["", f"gradient checkpointing, {c['dtype']} autocast, batch {c['batch_size']}: {c['what']}",
                f"  ran: {c['ran']}",
                f"  {'checkpointing':18s} {'activ. GB':>10s} {'vs none':>8s} {'peak GB':>9s} {'vs none':>8s} "
                f"{'TFLOP':>8s} {'vs none':>8s}"]
        for r in c["rows"]:
            out.append(f"  {r['checkpointing']:18s} skipped: {r['skipped']}" if r["skipped"] else
                       f"  {r['checkpointing']:18s} {_gb(r['activations']):>10s} {_x(r['activations_vs_none']):>8s} "
                       f"{_gb(r['peak']):>9s} {_x(r['peak_vs_none']):>8s} {r['flops'] / 1e12:8.2f} "
                       f"{_x(r['flops_vs_none']):>8s}")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """``python -m vitkernels.experiments.memory '<json of bench args>'``: the report as one tagged JSON line
    (how ``report`` runs itself under TRITON_INTERPRET=1)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        rep = report(argparse.Namespace(**json.loads(argv[0])))
    except ValueError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    print(_JSON_TAG + json.dumps(rep, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
