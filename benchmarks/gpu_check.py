"""One command for a (rarely lent) GPU machine: build, test, benchmark and sanitize within a time budget, and
write one dated JSON.

    bash benchmarks/gpu_check.sh [--budget 540] [--steps a,b | --skip a,b] [--dry-run]
    python benchmarks/gpu_check.py ...          (the same, with this python as it is)

Steps, most valuable first; each gets min(its own cap, what is left of --budget), and a step that no longer
fits (less left than its minimum) is recorded as skipped with the reason:
  build        the extension for this GPU's arch only (--build-library <arch>, into build/gpu/),
               unless a prebuilt library for this arch and this torch is there: $VITKERNELS_LIBRARY,
               build/gpu/_C.abi3.so (carried from a CPU machine, see docs/gpu_day.md) or vitkernels/_C*.so
  tests_bf16   the per-op and model tests in bf16 on CUDA (pytest -k bfloat16)
  bench_model  python -m vitkernels bench: the ViT against timm eager and timm + torch.compile
  bench_memory python -m vitkernels bench --memory: saved bytes, peak (estimated and measured), traffic
  bench_<op>   benchmarks/bench_<op>.py, one step per op
  tests_full   the whole test suite on CUDA
  memcheck     compute-sanitizer --tool memcheck over one small fwd+bwd case per op and fused backend
  racecheck    the same under --tool racecheck
A missing tool (nvcc, compute-sanitizer, or a sanitizer that says it does not support the device) skips
its step with the reason; a step that crashes or times out is recorded; neither stops the others. Tests run
in parallel (pytest -n) when pytest-xdist is installed.

The JSON (benchmarks/results/<UTC date>_<gpu>.json; a second run on the same day adds the time) holds the
device, versions, commit, environment checks, every step (status, rc, wall_s, limit_s, the tail of its log,
the reason when skipped) and the benchmark rows. It is rewritten after every step, so a run killed from
outside still leaves what it did. With $OUT set (the device tool returns files under $OUT) it is copied
there too, with the full logs and, when the build step built one, the library (gzip) to carry next time.

--dry-run lists the steps with their caps and checks the environment in seconds (python, torch/triton, GPU,
nvcc against torch's CUDA major, compute-sanitizer, the prebuilt library, tests/ and benchmarks/); it runs
nothing heavy and exits 0 when the environment is consistent, 1 otherwise, on a CPU machine too. Without
--dry-run a machine with no GPU exits 2: no CPU figure can pass for a GPU one.

--build-library ARCH builds only the extension library, for TORCH_CUDA_ARCH_LIST=ARCH, with this python's
torch, into build/gpu/_C.abi3.so (--library-out changes the folder); no GPU needed. For the H200 (sm_90a),
on a CPU machine with the GPU image's torch, then carried to the GPU machine (< 64 MiB):
    .venv-gpuimage/bin/python benchmarks/gpu_check.py --build-library 9.0a
    device tool: run(carry=["build/gpu"], command="bash benchmarks/gpu_check.sh", timeout_s=600)
The library is plain libtorch (no Python bindings), so a build with Python 3.11 loads under 3.12; it must
match the torch release (2.11.0), which loading checks. docs/gpu_day.md has the whole procedure.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import glob
import gzip
import importlib.util
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# backends.OPS (held equal by tests/test_gpu_check.py), the ViT ops first: the steps run in this order
OPS = ("layer_norm", "linear", "attention", "attention_qkv", "patch_embed", "ln_linear", "ln_mlp", "glu_linear",
       "ln_glu_mlp", "rope")
DEFAULT_BUDGET_S = 540  # one 10-minute device call, less the shell setup and a margin
RESERVE_S = 10  # kept back from the budget for writing the results
PREBUILT = os.path.join("build", "gpu", "_C.abi3.so")  # where a carried library is looked for (from ROOT)
OUT_FILE_LIMIT = 16 * 2**20  # the device tool returns files under $OUT up to this size
LOG_TAIL = 4000  # characters of each step's log kept in the JSON
# compute-sanitizer's own lines ("========= ...") that say it cannot run here: not a finding about the kernels.
SANITIZER_UNSUPPORTED = re.compile(r"^=+ .*(not supported|unsupported|Unable to find injection|before first "
                                   r"instrumented API call|Internal Sanitizer Error)", re.I | re.M)


# ---------------------------------------------------------------------------------------------------------
# Steps and the budget


@dataclasses.dataclass
class Step:
    """One step of the check; ``run(check, limit_s)`` returns its record (see ``Check.command``)."""

    name: str
    cap_s: float  # its own time limit
    min_s: float  # not started with less than this left of the budget
    what: str  # one line for --help and --dry-run
    run: Callable[["Check", float], dict]


def time_limit(step: Step, left_s: float) -> tuple[float | None, str | None]:
    """(the step's time limit, None), or (None, why it is skipped) when less than its minimum is left."""
    if left_s < step.min_s:
        return None, (f"does not fit: {max(left_s, 0.0):.0f} s left of the budget, the step needs at least "
                      f"{step.min_s:.0f} s")
    return min(step.cap_s, left_s), None


def run_steps(steps: list[Step], check: "Check", budget_s: float, t0: float,
              clock: Callable[[], float] = time.time,
              on_step: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """Run ``steps`` in order within ``budget_s`` seconds counted from ``t0`` (on ``clock``). Every step gets
    a record, whether it ran, crashed, timed out or was skipped; ``on_step`` is called with the records so
    far after each one."""
    records: list[dict] = []
    for step in steps:
        left = budget_s - (clock() - t0) - RESERVE_S
        limit, why = time_limit(step, left)
        if limit is None:
            record = skipped(step.name, why)
        else:
            print(f"[gpu_check] {step.name}: up to {limit:.0f} s ({left:.0f} s left of the budget)", flush=True)
            started = clock()
            try:
                record = step.run(check, limit)
            except Exception as exc:  # noqa: BLE001 - a crashing step is recorded, never fatal
                record = {"step": step.name, "status": "crashed", "rc": None,
                          "error": f"{type(exc).__name__}: {exc}", "log_tail": traceback.format_exc()[-LOG_TAIL:]}
            record.setdefault("step", step.name)
            record.setdefault("wall_s", round(clock() - started, 1))
            record["limit_s"] = round(limit)
        records.append(record)
        print(f"[gpu_check] {step.name}: {summary(record)}", flush=True)
        if on_step is not None:
            on_step(records)
    return records


def skipped(name: str, why: str, **extra) -> dict:
    return {"step": name, "status": "skipped", "rc": None, "wall_s": 0.0, "skipped": why, **extra}


def summary(record: dict) -> str:
    """One line about a step's record."""
    if record["status"] == "skipped":
        return f"skipped: {record['skipped']}"
    extra = record.get("pytest_summary") or record.get("note") or record.get("error") or ""
    return f"{record['status']} (rc={record['rc']}) in {record.get('wall_s', 0)} s {extra}".rstrip()


def has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def find_sanitizer() -> str | None:
    """compute-sanitizer on PATH, else in $CUDA_HOME/bin or /usr/local/cuda/bin; None when absent."""
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        path = os.path.join(home, "bin", "compute-sanitizer")
        if home and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


# ---------------------------------------------------------------------------------------------------------
# Running commands


class Check:
    """What the steps share: the python, the environment of child processes, the logs, the benchmark rows,
    the extension library in use."""

    def __init__(self, workers: int | None = None, log_dir: str | None = None,
                 capability: tuple[int, int] | None = None):
        self.python = sys.executable
        self.env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # real kernels only
        self.env["PYTHONUNBUFFERED"] = "1"
        self.workers = workers if workers is not None else min(8, os.cpu_count() or 1)
        self.log_dir = log_dir or tempfile.mkdtemp(prefix="gpu_check_")
        os.makedirs(self.log_dir, exist_ok=True)
        self.capability = capability
        self.benchmarks: dict[str, object] = {}
        self.library: str | None = None  # the extension library the later steps load ($VITKERNELS_LIBRARY)
        self.built_library: str | None = None  # set when the build step built one here
        self._child: subprocess.Popen | None = None

    def use_library(self, path: str) -> None:
        self.library = path
        self.env["VITKERNELS_LIBRARY"] = path

    def command(self, name: str, cmd: list[str], limit_s: float, env: dict | None = None) -> dict:
        """Run ``cmd`` in ROOT (in its own process group, killed whole on timeout), its output in a log file.

        Returns the record: status ok | failed | timeout, rc (124 on timeout), wall_s, cmd, log, log_tail,
        and pytest's summary line when there is one.
        """
        log = os.path.join(self.log_dir, f"{name}.log")
        print(f"[gpu_check] {name}: {shlex.join(cmd)}", flush=True)
        t0 = time.time()
        timed_out = False
        with open(log, "w") as f:
            try:
                self._child = subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                                               env={**self.env, **(env or {})}, start_new_session=True)
            except OSError as exc:
                return {"step": name, "status": "crashed", "rc": None, "cmd": cmd, "error": str(exc)}
            try:
                rc = self._child.wait(timeout=limit_s)
            except subprocess.TimeoutExpired:
                self.kill_child()
                rc, timed_out = 124, True
            except BaseException:  # SIGTERM / Ctrl-C: take the child down with us
                self.kill_child()
                raise
            finally:
                self._child = None
        with open(log, errors="replace") as f:
            out = f.read()
        if timed_out:
            out += f"\n[gpu_check] killed after {limit_s:.0f} s\n"
        record = {"step": name, "status": "timeout" if timed_out else ("ok" if rc == 0 else "failed"), "rc": rc,
                  "wall_s": round(time.time() - t0, 1), "cmd": cmd, "log": log, "log_tail": out[-LOG_TAIL:]}
        found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|errors?|deselected)\b.*?)\s*=*$", out, flags=re.M)
        if found:
            record["pytest_summary"] = found[-1]
        return record

    def kill_child(self) -> None:
        """SIGTERM, then SIGKILL, the running child's whole process group (pytest-xdist workers too)."""
        child = self._child
        if child is None or child.poll() is not None:
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(child.pid, sig)
            except ProcessLookupError:
                return
            try:
                child.wait(timeout=5)
                return
            except subprocess.TimeoutExpired:
                continue

    def pytest(self, name: str, args: list[str], limit_s: float) -> dict:
        """pytest in parallel (``-n workers``) when pytest-xdist is installed, else serially."""
        cmd = [self.python, "-m", "pytest", *args, "-q", "-rfE", "-p", "no:cacheprovider"]
        if self.workers > 1 and has_module("xdist"):
            cmd += ["-n", str(self.workers)]
        record = self.command(name, cmd, limit_s)
        if record["rc"] == 5:
            record["note"] = "pytest collected no tests"
        return record


# ---------------------------------------------------------------------------------------------------------
# The extension library


def _vk_build():
    """``vitkernels.cuda.build`` from this checkout (whether or not vitkernels is installed)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    from vitkernels.cuda import build

    return build


def library_candidates() -> list[tuple[str, str]]:
    """(path, where it comes from) of every built library a run could use, best first."""
    found = []
    if os.environ.get("VITKERNELS_LIBRARY"):
        found.append((os.path.abspath(os.environ["VITKERNELS_LIBRARY"]), "$VITKERNELS_LIBRARY"))
    if os.path.exists(os.path.join(ROOT, PREBUILT)):
        found.append((os.path.join(ROOT, PREBUILT), "carried"))
    package = sorted(glob.glob(os.path.join(ROOT, "vitkernels", "_C*.so")), key=os.path.getmtime, reverse=True)
    found += [(p, "setup.py") for p in package]
    return found


def judge_library(path: str, capability: tuple[int, int] | None) -> tuple[dict | None, str | None]:
    """(what the library holds, None) when it can serve this GPU (any CUDA build when no GPU is given), else
    (what it holds or None, why not). Loads it in a separate process: seconds."""
    try:
        info = _vk_build().describe_library(path)
    except (RuntimeError, subprocess.SubprocessError, ValueError) as exc:
        return None, str(exc)
    if not info["has_cuda"]:
        return info, f"{path} has no CUDA kernels (built for the CPU twin only)"
    if capability is not None:
        targets = info.get("targets") or [f"sm_{a}" for a in info["archs"]]
        why = _vk_build().why_not_for_gpu(targets, tuple(capability))
        if why is not None:
            return info, f"{path}: {why}"
    return info, None


def _archs(info: dict) -> str:
    return ", ".join(info.get("targets") or [f"sm_{a}" for a in info["archs"]]) or "no GPU arch"


def build_library(arch: str, out_dir: str) -> int:
    """--build-library: the extension library for ``arch`` into ``out_dir``; JSON about it on the last line."""
    return _vk_build().build_and_describe(out_dir, arch, jobs=os.cpu_count())


def step_build(check: Check, limit_s: float) -> dict:
    """Use a prebuilt library that fits, else build one for this GPU's arch only (into build/gpu/)."""
    notes = []
    for path, origin in library_candidates():
        info, why = judge_library(path, check.capability)
        if why is None:
            check.use_library(path)
            return {"step": "build", "status": "ok", "rc": 0, "library": info,
                    "note": f"used the {origin} library {path} ({_archs(info)}, torch {info['torch']}); nothing built"}
        notes.append(why)
    why = _vk_build().cuda_toolkit()
    if why is not None:
        check.env["VITKERNELS_JIT"] = "0"  # no JIT build inside the tests either: the cuda backend skips, saying why
        return skipped("build", f"cannot build CUDA kernels here: {why}", unusable_libraries=notes)
    major, minor = check.capability or (0, 0)
    record = check.command("build", [check.python, os.path.abspath(__file__), "--build-library",
                                     f"{major}.{minor}"], limit_s)
    record["unusable_libraries"] = notes
    if record["rc"] != 0:
        check.env["VITKERNELS_JIT"] = "0"  # a JIT build in every test worker would only fail again, slowly
    else:
        try:
            info = json.loads(record["log_tail"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            info = None
        if not info or major * 10 + minor not in info.get("archs", []):
            record.update(status="failed", note=f"the build did not report sm_{major}{minor} kernels: {info}")
            check.env["VITKERNELS_JIT"] = "0"
        else:
            record.update(library=info, note=f"built {info['path']} ({info['size_mib']} MiB)")
            check.use_library(info["path"])
            check.built_library = info["path"]
    return record


# ---------------------------------------------------------------------------------------------------------
# The other steps


def step_tests_bf16(check: Check, limit_s: float) -> dict:
    names = [f"test_{op}.py" for op in OPS] + ["test_fused_blocks.py", "test_vit.py", "test_model_backends.py"]
    files = [os.path.join("tests", n) for n in names if os.path.exists(os.path.join(ROOT, "tests", n))]
    if not files:
        return skipped("tests_bf16", "none of tests/" + ", ".join(names) + " exists")
    return check.pytest("tests_bf16", [*files, "-k", "bfloat16 or bf16"], limit_s)


def step_bench_memory(check: Check, limit_s: float) -> dict:
    out = os.path.join(check.log_dir, "bench_memory.json")
    record = check.command("bench_memory", [check.python, "-m", "vitkernels", "bench", "--memory", "--out", out],
                           limit_s)
    _keep_rows(check, "memory", out)
    return record


def step_bench_model(check: Check, limit_s: float) -> dict:
    out = os.path.join(check.log_dir, "bench_model.json")
    record = check.command("bench_model", [check.python, "-m", "vitkernels", "bench", "--out", out], limit_s)
    _keep_rows(check, "model", out)
    return record


def bench_op_step(op: str) -> Callable[[Check, float], dict]:
    def run(check: Check, limit_s: float) -> dict:
        script = os.path.join("benchmarks", f"bench_{op}.py")
        if not os.path.exists(os.path.join(ROOT, script)):
            return skipped(f"bench_{op}", f"{script} does not exist")
        out = os.path.join(check.log_dir, f"bench_{op}.json")
        record = check.command(f"bench_{op}", [check.python, script, "--out", out], limit_s)
        _keep_rows(check, op, out)
        return record

    return run


def _keep_rows(check: Check, key: str, path: str) -> None:
    if os.path.exists(path):
        try:
            with open(path) as f:
                check.benchmarks[key] = json.load(f)
        except ValueError as exc:
            check.benchmarks[key] = f"unreadable: {exc}"


def step_tests_full(check: Check, limit_s: float) -> dict:
    return check.pytest("tests_full", ["tests"], limit_s)


def sanitizer_step(tool: str) -> Callable[[Check, float], dict]:
    """compute-sanitizer --tool ``tool`` over ``gpu_check.py --sanitize-cases`` (one small case per kernel)."""

    def run(check: Check, limit_s: float) -> dict:
        exe = find_sanitizer()
        if exe is None:
            return skipped(tool, "compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin)")
        cmd = [exe, "--tool", tool, "--error-exitcode", "3", check.python, os.path.abspath(__file__),
               "--sanitize-cases"]
        # Without the caching allocator every tensor is its own allocation, so memcheck sees overruns.
        record = check.command(tool, cmd, limit_s, env={"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"})
        unsupported = SANITIZER_UNSUPPORTED.search(record.get("log_tail", ""))
        if record["rc"] != 0 and unsupported:
            return skipped(tool, f"compute-sanitizer cannot run here: {unsupported.group(0).strip()}",
                           rc=record["rc"], wall_s=record["wall_s"], log_tail=record["log_tail"])
        if record["rc"] == 3:
            record["note"] = f"compute-sanitizer {tool} reported errors (see the log)"
        return record

    return run


STEPS = [
    Step("build", 300, 60, "build the extension for this GPU's arch only (none when a prebuilt one fits)", step_build),
    Step("tests_bf16", 150, 45, "bf16 op and model tests on CUDA", step_tests_bf16),
    Step("bench_model", 240, 60, "python -m vitkernels bench: vs timm eager and timm + torch.compile", step_bench_model),
    Step("bench_memory", 120, 60, "python -m vitkernels bench --memory: estimated and measured peak vs timm eager",
         step_bench_memory),
    *[Step(f"bench_{op}", 60, 20, f"benchmarks/bench_{op}.py", bench_op_step(op)) for op in OPS],
    Step("tests_full", 300, 90, "the whole test suite on CUDA", step_tests_full),
    Step("memcheck", 120, 40, "compute-sanitizer memcheck, one small fwd+bwd case per op and backend",
         sanitizer_step("memcheck")),
    Step("racecheck", 90, 30, "compute-sanitizer racecheck over the same cases", sanitizer_step("racecheck")),
]


def select_steps(only: str | None, skip: str | None) -> list[Step]:
    """The steps named in ``only`` (default all) minus those in ``skip``, in the order of STEPS."""
    names = [s.name for s in STEPS]
    wanted = [n for n in (only or "").split(",") if n] or names
    unwanted = [n for n in (skip or "").split(",") if n]
    unknown = sorted(set(wanted + unwanted) - set(names))
    if unknown:
        raise SystemExit(f"gpu_check: unknown step(s) {', '.join(unknown)}; the steps: {', '.join(names)}")
    return [s for s in STEPS if s.name in wanted and s.name not in unwanted]


# ---------------------------------------------------------------------------------------------------------
# One small case per kernel, for compute-sanitizer


def run_sanitize_cases(device: str = "cuda", dtype: str = "bfloat16") -> int:
    """Forward + backward of every op on each fused backend, small awkward shapes (bf16 on CUDA under
    compute-sanitizer; the tests run them on CPU). Prints one line per case; returns 1 if any case raised
    (an unavailable backend is reported, not an error)."""
    import torch

    _vk_build()  # puts this checkout on sys.path
    import vitkernels.ops as vk_ops
    from vitkernels.backends import why_not

    if device == "cuda" and not torch.cuda.is_available():
        print("sanitize cases need a CUDA GPU", file=sys.stderr)
        return 2
    dev, dt = torch.device(device), getattr(torch, dtype)

    def leaf(*shape):
        return torch.randn(*shape, device=dev, dtype=dt).requires_grad_()

    cases = {
        "patch_embed": lambda b: vk_ops.patch_embed(leaf(2, 3, 32, 32), leaf(48, 3, 8, 8), leaf(48),
                                                    pos_embed=leaf(1, 17, 48), cls_token=leaf(1, 1, 48), backend=b),
        "layer_norm": lambda b: vk_ops.layer_norm(leaf(3, 7, 80), leaf(80), leaf(80), residual=leaf(3, 7, 80),
                                                  backend=b),
        "attention": lambda b: vk_ops.attention(leaf(2, 3, 13, 64), leaf(2, 3, 13, 64), leaf(2, 3, 13, 64),
                                                backend=b),
        "linear": lambda b: vk_ops.linear(leaf(3, 7, 40), leaf(24, 40), leaf(24), activation="gelu",
                                          residual=leaf(3, 7, 24), backend=b),
        "attention_qkv": lambda b: vk_ops.attention_qkv(leaf(2, 13, 3 * 3 * 64), 3, backend=b),
        "ln_linear": lambda b: vk_ops.ln_linear(leaf(3, 7, 40), leaf(40), leaf(40), leaf(24, 40), leaf(24),
                                                backend=b),
        "ln_mlp": lambda b: vk_ops.ln_mlp(leaf(3, 67, 40), leaf(40), leaf(40), leaf(72, 40), leaf(72),
                                          leaf(40, 72), leaf(40), add_input=True, backend=b),
    }
    failures = 0
    for backend in ("triton", "cuda"):
        why = why_not(backend, dev)
        if why is not None:
            print(f"[sanitize] {backend}: unavailable: {why}", flush=True)
            continue
        for op, case in cases.items():
            try:
                torch.manual_seed(0)
                out = case(backend)
                outs = out if isinstance(out, tuple) else (out,)
                sum((o.float() * torch.randn_like(o, dtype=torch.float32)).sum() for o in outs).backward()
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                print(f"[sanitize] {backend} {op}: ran fwd+bwd", flush=True)
            except Exception as exc:  # noqa: BLE001 - reported per case
                failures += 1
                print(f"[sanitize] {backend} {op}: {type(exc).__name__}: {exc}", flush=True)
    return 1 if failures else 0


# ---------------------------------------------------------------------------------------------------------
# The environment (--dry-run, and the JSON)


def _run_text(cmd: list[str], timeout: float = 30) -> str | None:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return (p.stdout + p.stderr).strip()


def environment(judge_libraries: bool = True) -> list[dict]:
    """Checks of what a GPU run needs: each {"name", "level": ok | note | warn | error, "value"}. Fast: the
    only subprocesses are ``nvcc --version`` and, with ``judge_libraries``, loading each built library."""
    checks: list[dict] = []

    def add(name: str, level: str, value: str) -> None:
        checks.append({"name": name, "level": level, "value": value})

    add("python", "ok", f"{sys.version.split()[0]} ({sys.executable})")
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        add("torch", "error", f"not importable: {type(exc).__name__}: {exc}")
        return checks
    add("torch", "ok" if torch.version.cuda else "error",
        f"{torch.__version__} (CUDA {torch.version.cuda})" if torch.version.cuda else f"{torch.__version__} is not a CUDA build")
    try:
        import triton

        add("triton", "ok", triton.__version__)
    except Exception as exc:  # noqa: BLE001
        add("triton", "error", f"not importable: {type(exc).__name__}: {exc}")
    capability = None
    if torch.cuda.is_available():
        capability = torch.cuda.get_device_capability()
        add("gpu", "ok", f"{torch.cuda.get_device_name(0)} (sm_{capability[0]}{capability[1]})")
    else:
        add("gpu", "note", "none visible: a real run exits 2 here (nothing would be measured)")

    build = _vk_build()
    from torch.utils.cpp_extension import CUDA_HOME

    nvcc = os.path.join(CUDA_HOME or "", "bin", "nvcc")
    why_no_cuda = build.cuda_toolkit()
    usable = None
    if judge_libraries:
        for path, origin in library_candidates():
            info, why = judge_library(path, capability)
            if why is None and usable is None:
                usable = path
                add("prebuilt library", "ok", f"{origin} {path}: {_archs(info)}, torch {info['torch']}, "
                                              f"{info['size_mib']} MiB")
            elif why is not None:
                level = "error" if origin == "$VITKERNELS_LIBRARY" else "warn"
                add("prebuilt library", level, f"{origin}: {why}")
        if not library_candidates():
            add("prebuilt library", "note", f"none ({PREBUILT}, vitkernels/_C*.so): the build step builds one")
    if why_no_cuda is None:
        version = build.nvcc_version(nvcc)
        add("nvcc", "ok", f"{nvcc}: CUDA {version[0]}.{version[1]}, torch's CUDA {torch.version.cuda}")
    else:
        # Without nvcc a carried library still serves; without either the CUDA kernels cannot be tested.
        level = "warn" if usable or not judge_libraries else "error"
        add("nvcc", level, why_no_cuda + ("" if level == "warn" else " (and no usable prebuilt library)"))
    sanitizer = find_sanitizer()
    if sanitizer:
        add("compute-sanitizer", "ok", sanitizer)
    else:
        add("compute-sanitizer", "warn", "not found: memcheck and racecheck would be skipped")
    tests = glob.glob(os.path.join(ROOT, "tests", "test_*.py"))
    add("tests", "ok" if tests else "error", f"{len(tests)} files in tests/")
    missing = [op for op in OPS if not os.path.exists(os.path.join(ROOT, "benchmarks", f"bench_{op}.py"))]
    add("benchmarks", "warn" if missing else "ok",
        f"missing bench_{', bench_'.join(missing)}.py" if missing else f"bench_{{{','.join(OPS)}}}.py")
    for module, level, why in (("pytest", "error", "tests cannot run"), ("xdist", "warn", "tests run serially"),
                               ("timm", "warn", "the timm baseline rows would be skipped")):
        add(module, "ok" if has_module(module) else level, "installed" if has_module(module) else f"missing: {why}")
    return checks


def dry_run(steps: list[Step], budget_s: float) -> int:
    """Print the plan and the environment checks; 0 when consistent, 1 when something would fail."""
    print(f"gpu_check --dry-run: budget {budget_s:.0f} s (less {RESERVE_S} s reserve); nothing is run")
    start = 0.0
    for i, step in enumerate(steps, 1):
        left = budget_s - RESERVE_S - start
        fits = "" if left >= step.min_s else "  (runs only if the steps above end early)"
        print(f"  {i:2d}. {step.name:17s} cap {step.cap_s:3.0f} s  min {step.min_s:2.0f} s  {step.what}{fits}")
        start += min(step.cap_s, max(left, 0.0)) if left >= step.min_s else 0.0
    t0 = time.time()
    checks = environment()
    print(f"environment (checked in {time.time() - t0:.1f} s):")
    for c in checks:
        print(f"  {c['level']:5s} {c['name']}: {c['value']}")
    errors = [c for c in checks if c["level"] == "error"]
    if errors:
        print(f"gpu_check --dry-run: inconsistent: {'; '.join(c['name'] + ': ' + c['value'] for c in errors)}")
        return 1
    print("gpu_check --dry-run: consistent")
    return 0


# ---------------------------------------------------------------------------------------------------------
# Results


def experiment_env():
    """vitkernels/experiments/env.py (device name, commit, versions), loaded from its file: it needs only torch,
    so the JSON records them even on a machine where the vitkernels package does not import."""
    path = os.path.join(ROOT, "vitkernels", "experiments", "env.py")
    spec = importlib.util.spec_from_file_location("vitkernels_experiments_env", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def results_path(device: str, now: datetime.datetime) -> str:
    """benchmarks/results/<UTC date>_<gpu>.json, with the time added when that file exists already."""
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = os.path.join(ROOT, "benchmarks", "results", f"{now:%Y-%m-%d}_{slug}.json")
    if os.path.exists(path):
        path = path[:-len(".json")] + f"_{now:%H%M%S}.json"
    return path


class Results:
    """The JSON, written after every step to benchmarks/results/ and, when $OUT is set, to $OUT."""

    def __init__(self, path: str, result: dict, check: Check):
        self.path, self.result, self.check = path, result, check
        self.out = os.environ.get("OUT") or None
        self._library_sent = False

    def write(self, records: list[dict] | None = None, partial: bool = True) -> None:
        if records is not None:
            self.result["steps"] = records
        self.result["benchmarks"] = self.check.benchmarks
        self.result["partial"] = partial
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "w") as f:
            json.dump(self.result, f, indent=2)
        if self.out:
            self._copy_out()

    def _copy_out(self) -> None:
        os.makedirs(self.out, exist_ok=True)
        stem = os.path.splitext(os.path.basename(self.path))[0]
        shutil.copy(self.path, os.path.join(self.out, stem + ".json"))
        with open(os.path.join(self.out, stem + "_logs.txt"), "w") as f:  # the full logs, tail-first if huge
            for log in sorted(glob.glob(os.path.join(self.check.log_dir, "*.log")), key=os.path.getmtime):
                with open(log, errors="replace") as g:
                    text = g.read()
                f.write(f"===== {os.path.basename(log)} =====\n{text[-(OUT_FILE_LIMIT // 16):]}\n")
        lib = self.check.built_library
        if lib and not self._library_sent:
            self._library_sent = True
            target = os.path.join(self.out, os.path.basename(lib) + ".gz")
            with open(lib, "rb") as src, gzip.open(target, "wb", compresslevel=6) as dst:
                shutil.copyfileobj(src, dst)
            if os.path.getsize(target) > OUT_FILE_LIMIT:
                os.remove(target)
                self.result["library_not_returned"] = f"{lib} is over {OUT_FILE_LIMIT >> 20} MiB even gzipped"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="gpu_check", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="steps (cap / min seconds): " + ", ".join(
                                    f"{s.name} {s.cap_s:.0f}/{s.min_s:.0f}" for s in STEPS))
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole check, counted from the start of gpu_check.sh (default {DEFAULT_BUDGET_S})")
    p.add_argument("--steps", help="comma-separated steps to run (default: all), e.g. tests_full,memcheck")
    p.add_argument("--skip", help="comma-separated steps not to run")
    p.add_argument("--workers", type=int, help="pytest-xdist workers (default: min(8, cores))")
    p.add_argument("--dry-run", action="store_true", help="list the steps and check the environment; run nothing")
    p.add_argument("--build-library", metavar="ARCH",
                   help="only build the extension library for TORCH_CUDA_ARCH_LIST=ARCH (e.g. 9.0a), no GPU needed")
    p.add_argument("--library-out", default=os.path.join(ROOT, os.path.dirname(PREBUILT)),
                   help=f"folder for --build-library (default {os.path.dirname(PREBUILT)})")
    p.add_argument("--sanitize-cases", action="store_true", help=argparse.SUPPRESS)  # run under compute-sanitizer
    args = p.parse_args(argv)
    if args.sanitize_cases:
        return run_sanitize_cases()
    if args.build_library:
        return build_library(args.build_library, args.library_out)
    steps = select_steps(args.steps, args.skip)
    if args.dry_run:
        return dry_run(steps, args.budget)

    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (none visible); nothing was run or measured (--dry-run checks the "
              "environment only).", file=sys.stderr)
        return 2
    t0 = float(os.environ.get("VK_GPU_CHECK_T0") or time.time())  # gpu_check.sh's start: setup counts too
    t0 = min(max(t0, time.time() - 600), time.time())
    capability = torch.cuda.get_device_capability()
    env = experiment_env()
    device = env.device_name("cuda")
    check = Check(workers=args.workers, capability=capability)
    now = datetime.datetime.now(datetime.timezone.utc)
    commit = env.git_commit(ROOT) or "unknown"
    # no vitkernels among the versions: importing it here would load the extension before the build step
    versions = {**env.versions(("triton",)),
                "driver": _run_text(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])}
    result = {"date": now.isoformat(timespec="seconds"), "device": device,
              "capability": f"{capability[0]}.{capability[1]}", "commit": commit.removesuffix("-dirty"),
              "dirty": commit.endswith("-dirty"), "versions": versions, "budget_s": args.budget,
              "environment": environment(judge_libraries=False), "steps": []}
    results = Results(results_path(device, now), result, check)
    results.write()

    def on_sigterm(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    records: list[dict] = []
    try:
        records = run_steps(steps, check, args.budget, t0, on_step=lambda r: results.write(r))
    finally:
        result["wall_s"] = round(time.time() - t0, 1)
        results.write(records, partial=len(records) < len(steps))
        print(f"[gpu_check] wrote {results.path}" + (f" and a copy in {results.out}" if results.out else ""))
    return 0 if all(r["status"] in ("ok", "skipped") for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
