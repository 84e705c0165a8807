"""One benchmark harness for the ops (``benchmarks/bench_<op>.py``) and the model (``vitkernels bench``).

A benchmark file is its cases and their FLOP / byte formulas; this module does the rest:

    providers   "torch" (eager: the reference backend the tests use), "compile" (torch.compile of it),
                "triton" and "cuda" (the fused backends), all through ``vitkernels.ops.<op>(backend=...)``;
                a bench may add its own (SDPA restricted to one backend ...)
    modes       fwd       the forward under no_grad
                bwd       the backward alone: autograd.grad on a retained graph, w.r.t. every input that
                          requires a gradient
                fwd+bwd   forward and backward, gradients reset to None between calls
    timing      ops: ``triton.testing.do_bench``: warm-up (compilation, autotuning) outside the timing, then
                the median and the 20th / 80th percentiles in ms; a test passes its own timer.
                whole training / inference steps (the model bench, which also runs on a CPU): ``time_steps``,
                repeats of ``iters`` steps timed with CUDA events (time.perf_counter on a CPU), median
                and spread
    units       TFLOP/s from the case's FLOP formula and GB/s from its bytes moved, per mode; the speed-up
                against the "torch" provider
    metadata    one row per run: device, dtype, versions, commit, date, timing (``metadata``); every result
                row carries its case's shapes

A provider that cannot run a case (its backend unavailable here, a shape it does not support, an error) is a
row with ``skipped`` set to the reason; it never ends the benchmark. Timings come only from real kernels on
a CUDA device: a benchmark refuses to run on a CPU or under Triton's interpreter (``why_not_gpu``).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from vitkernels.experiments.env import DTYPES, device_name, git_commit, versions

MODES = ("fwd", "bwd", "fwd+bwd")
QUANTILES = (0.5, 0.2, 0.8)  # median, then the spread
# Providers run only when --providers names them: torch.compile takes tens of seconds per case and mode, more
# than a benchmark step of gpu_check has.
OPT_IN = ("compile",)
BACKENDS = ("torch", "triton", "cuda")  # providers that are vitkernels backends: vitkernels.backends says why not

# timer(fn, grad_to_none) -> (median, 20th, 80th percentile) in ms per call of fn
Timer = Callable[[Callable[[], object], list], tuple[float, float, float]]


@dataclass
class Case:
    """One shape of one op.

    ``inputs(device, dtype)`` returns the op's (args, kwargs): tensors that want a gradient require one.
    ``flops`` and ``bytes`` map a mode to the FLOPs of one call / the bytes it must move at least (a mode
    left out gets no TFLOP/s or GB/s).
    """

    name: str
    shapes: dict  # recorded in every row: B, N, C ...
    inputs: Callable[[torch.device, torch.dtype], tuple[tuple, dict]]
    flops: dict[str, float] = field(default_factory=dict)
    bytes: dict[str, float] = field(default_factory=dict)


# -- providers ---------------------------------------------------------------------------------------------
def op_providers(op: str) -> dict[str, Callable]:
    """torch / compile / triton / cuda for ``vitkernels.ops.<op>``, each called as the op is."""
    import vitkernels.ops

    fn = getattr(vitkernels.ops, op)
    reference = functools.partial(fn, backend="torch")
    return {"torch": reference, "compile": _Compiled(reference), "triton": functools.partial(fn, backend="triton"),
            "cuda": functools.partial(fn, backend="cuda")}


class _Compiled:
    """torch.compile(fn), compiled on first call (so that merely listing providers compiles nothing)."""

    def __init__(self, fn: Callable):
        self.fn, self.compiled = fn, None

    def __call__(self, *args, **kwargs):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn)
        return self.compiled(*args, **kwargs)


def why_skip(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot be timed on ``device`` (None when it can): a vitkernels backend that is
    unavailable here says why; Triton's interpreter and the extension's C++ twin are for tests, not timings."""
    if provider not in BACKENDS:
        return None
    if device.type == "cpu" and provider != "torch":
        what = "the Triton interpreter" if provider == "triton" else "the extension's C++ CPU twin"
        return f"no GPU; {what} is for tests"
    from vitkernels.backends import why_not

    return why_not(provider, device)


def select(providers: dict[str, Callable], names: str | None) -> dict[str, Callable]:
    """The providers named in the comma-separated ``names`` (None: all but the ``OPT_IN`` ones)."""
    if names is None:
        return {k: v for k, v in providers.items() if k not in OPT_IN}
    wanted = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in wanted if n not in providers]
    if unknown:
        raise ValueError(f"unknown provider(s) {', '.join(unknown)}; choose from {', '.join(providers)}")
    return {n: providers[n] for n in wanted}


# -- timing ------------------------------------------------------------------------------------------------
def do_bench(fn: Callable[[], object], grad_to_none: list) -> tuple[float, float, float]:
    """triton.testing.do_bench's median and 20th / 80th percentiles, ms."""
    from triton.testing import do_bench as triton_do_bench

    return tuple(triton_do_bench(fn, grad_to_none=grad_to_none or None, quantiles=list(QUANTILES)))


def time_steps(step: Callable[[], object], device: torch.device, *, repeats: int, iters: int, warmup: int
               ) -> dict:
    """Time whole steps: ``warmup`` untimed calls, then ``repeats`` timings of ``iters`` calls each, with CUDA
    events on a GPU and time.perf_counter on a CPU. Returns ms_per_step (median), ms_min, ms_max,
    spread_pct, ms_all and warmup_s."""
    t0 = time.perf_counter()
    for _ in range(max(1, warmup)):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    warmup_s = time.perf_counter() - t0
    ms = [_ms_per_call(step, iters, device) for _ in range(repeats)]
    med = statistics.median(ms)
    return dict(ms_per_step=med, ms_min=min(ms), ms_max=max(ms), spread_pct=100 * (max(ms) - min(ms)) / med,
                ms_all=ms, warmup_s=warmup_s)


def _ms_per_call(fn: Callable[[], object], iters: int, device: torch.device) -> float:
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def _tensors(args: tuple, kwargs: dict) -> list[torch.Tensor]:
    return [t for t in (*args, *kwargs.values()) if isinstance(t, torch.Tensor)]


def _outputs(out) -> list[torch.Tensor]:
    """The differentiable outputs of one call (an op may return a tuple, e.g. layer_norm's (y, s))."""
    outs = list(out) if isinstance(out, (tuple, list)) else [out]
    return [o for o in outs if isinstance(o, torch.Tensor) and o.requires_grad]


def time_modes(fn: Callable, args: tuple, kwargs: dict, modes, timer: Timer) -> dict[str, tuple]:
    """{mode: (median, p20, p80) ms} of ``fn(*args, **kwargs)``; the first call of each mode (compilation,
    autotuning) is outside the timing."""

    def call():
        return fn(*args, **kwargs)

    leaves = [t for t in _tensors(args, kwargs) if t.requires_grad]
    times = {}
    if "fwd" in modes:
        with torch.no_grad():
            call()
            times["fwd"] = timer(call, [])
    if "bwd" in modes:
        outs = _outputs(call())
        grads = [torch.randn_like(o) for o in outs]
        torch.autograd.grad(outs, leaves, grads, retain_graph=True)  # backward compile / autotune
        times["bwd"] = timer(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True), [])
    if "fwd+bwd" in modes:
        grads = [torch.randn_like(o) for o in _outputs(call())]

        def step():
            torch.autograd.backward(_outputs(call()), grads)

        step()
        times["fwd+bwd"] = timer(step, leaves)
    return times


# -- rows --------------------------------------------------------------------------------------------------
def run(cases: list[Case], providers: dict[str, Callable], modes=MODES, *, dtype: str = "bf16",
        device: torch.device | str = "cuda", timer: Timer = do_bench, baseline: str = "torch") -> list[dict]:
    """One row per case x provider x mode (``ms``, ``ms_p20``, ``ms_p80``, ``tflops``, ``gbs``, ``speedup``
    against ``baseline``, or ``skipped`` with the reason)."""
    device = torch.device(device)
    rows = []
    for case in cases:
        args, kwargs = case.inputs(device, DTYPES[dtype])
        measured: dict[str, dict[str, tuple] | str] = {}
        for name, fn in providers.items():
            why = why_skip(name, device)
            if why is None:
                try:
                    measured[name] = time_modes(fn, args, kwargs, modes, timer)
                except Exception as exc:  # noqa: BLE001 - one provider failing must not end the benchmark
                    first = str(exc).splitlines()[0][:300] if str(exc) else ""
                    why = f"failed: {type(exc).__name__}: {first}"
            if why is not None:
                measured[name] = why
            for t in _tensors(args, kwargs):
                t.grad = None
        for name, result in measured.items():
            for mode in modes:
                row = {"case": case.name, **case.shapes, "provider": name, "mode": mode, "ms": None,
                       "ms_p20": None, "ms_p80": None, "tflops": None, "gbs": None, "speedup": None,
                       "skipped": result if isinstance(result, str) else None}
                if not isinstance(result, str):
                    ms, p20, p80 = result[mode]
                    row.update(ms=ms, ms_p20=p20, ms_p80=p80)
                    if mode in case.flops:
                        row["tflops"] = case.flops[mode] / (ms * 1e-3) / 1e12
                    if mode in case.bytes:
                        row["gbs"] = case.bytes[mode] / (ms * 1e-3) / 1e9
                    base = measured.get(baseline)
                    if isinstance(base, dict):
                        row["speedup"] = base[mode][0] / ms
                rows.append(row)
        del args, kwargs
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def metadata(device: torch.device | str | None = None, **fields) -> dict:
    """The one metadata row of a run: device, date, commit, versions, and ``fields`` (op, dtype, timing ...)."""
    return {"device": device_name(device), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), "commit": git_commit(), "versions": versions(), **fields}


def format_row(row: dict) -> str:
    if row["skipped"]:
        return f"{row['case']:10s} {row['provider']:16s} {row['mode']:7s} skipped: {row['skipped']}"

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    return (f"{row['case']:10s} {row['provider']:16s} {row['mode']:7s} {row['ms']:9.3f} "
            f"{row['ms_p20']:7.3f}-{row['ms_p80']:<7.3f} {fmt(row['tflops'], '8.1f'):>8s} "
            f"{fmt(row['gbs'], '7.0f'):>7s} {fmt(row['speedup'], '6.2f'):>6s}x")


HEADER = (f"{'case':10s} {'provider':16s} {'mode':7s} {'ms':>9s} {'p20-p80':15s} {'TFLOP/s':>8s} {'GB/s':>7s} "
          f"{'vs torch':>7s}")


# -- a benchmark script ------------------------------------------------------------------------------------
def why_not_gpu(script: str) -> str | None:
    """Why ``script`` cannot time anything here (None on a usable GPU). Timings come only from real kernels
    on a CUDA device: never from the CPU, never from Triton's interpreter."""
    if not torch.cuda.is_available():
        return f"{script} needs a CUDA GPU (none visible); nothing was measured."
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "unset TRITON_INTERPRET: the interpreter is for tests, not timings."
    return None


def parser(description: str, providers: dict[str, Callable]) -> argparse.ArgumentParser:
    """The options every op benchmark has: --dtype, --providers, --modes, --out."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16")
    p.add_argument("--providers", help=f"comma-separated, of {','.join(providers)} "
                                       f"(default: all but compile, which takes minutes)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    p.add_argument("--out", help="write {meta, rows} as JSON to this file (e.g. benchmarks/results/<op>_<date>.json)")
    return p


def main(op: str, script: str, cases: list[Case], providers: dict[str, Callable], args: argparse.Namespace,
         setup: Callable[[torch.device, torch.dtype], dict] | None = None) -> int:
    """A benchmark script's main after parsing: refuse without a GPU (exit 2), time every case, print the
    table, write ``{"meta": ..., "rows": [...]}`` to --out. ``setup`` measures what goes into the metadata
    row (a bandwidth ceiling ...)."""
    why = why_not_gpu(script)
    if why is not None:
        print(why, file=sys.stderr)
        return 2
    try:
        chosen = select(providers, args.providers)
    except ValueError as exc:
        print(f"{script}: error: {exc}", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 runs compare against full-precision cuBLAS / cuDNN
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device("cuda")
    meta = metadata(device, op=op, dtype=args.dtype, providers=list(chosen), modes=args.modes,
                    timing="triton.testing.do_bench: median, 20th and 80th percentile")
    if setup is not None:
        meta.update(setup(device, DTYPES[args.dtype]))
    print(" ".join(f"{k}={v}" for k, v in meta.items() if k not in ("versions", "providers", "modes")))
    print(HEADER, flush=True)
    rows = []
    for case in cases:
        for row in run([case], chosen, args.modes, dtype=args.dtype, device=device):
            print(format_row(row), flush=True)
            rows.append(row)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {len(rows)} rows to {args.out}")
    return 0
