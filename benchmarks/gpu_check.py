"""One command for a GPU machine: build, test, sanitize, benchmark, and write one dated JSON.

    python benchmarks/gpu_check.py            # or: bash benchmarks/gpu_check.sh

Steps (each with its own time limit, the whole within about 10 minutes on an H100 with 16 cores):
  1. build vitkernels._C for this GPU's arch only (pip install --no-build-isolation -e .);
  2. the whole test suite on CUDA (bf16 included: tests/oracle.py adds it when a GPU is present);
  3. compute-sanitizer --tool memcheck over the cuda-backend op tests (small shapes already);
  4. the per-op benchmarks (benchmarks/bench_*.py) and the model benchmark (python -m vitkernels bench);
then writes benchmarks/results/<UTC date>_<gpu>.json with device, driver, versions, commit and every step's
output (return code, tail of its log, and the rows the benchmarks wrote). Nothing here runs without a GPU: it
exits 2 with a message, so no CPU figure can pass for a GPU one.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("layer_norm", "linear", "attention", "patch_embed")


def _run(name: str, cmd: list[str], limit_s: int, env: dict | None = None) -> dict:
    """Run one step, keep its return code, wall time and the tail of its output."""
    print(f"[gpu_check] {name}: {' '.join(cmd)}", flush=True)
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=limit_s,
                           env={**os.environ, **(env or {})})
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"timed out after {limit_s} s\n" + (exc.stdout or b"").decode(errors="replace")[-4000:]
    step = {"step": name, "cmd": cmd, "rc": rc, "wall_s": round(time.time() - t0, 1), "log_tail": out[-4000:]}
    summary = re.findall(r"^=*\s*(\d+ (?:passed|failed).*?)\s*=*$", out, flags=re.M)
    if summary:
        step["pytest_summary"] = summary[-1]
    print(f"[gpu_check] {name}: rc={rc} in {step['wall_s']} s {step.get('pytest_summary', '')}", flush=True)
    return step


def _versions() -> dict:
    import torch

    v = {"python": sys.version.split()[0], "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        v["triton"] = f"unavailable: {exc}"
    try:
        v["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                     capture_output=True, text=True).stdout.strip()
    except OSError:
        v["driver"] = None
    return v


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check needs a CUDA GPU (none visible); nothing was run or measured.", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    major, minor = torch.cuda.get_device_capability()
    device = torch.cuda.get_device_name(0)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    py = sys.executable
    tmp = tempfile.mkdtemp(prefix="gpu_check_")
    steps = [_run("build", [py, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps", "-e", "."], 300,
                  env={"TORCH_CUDA_ARCH_LIST": f"{major}.{minor}", "VITKERNELS_BUILD_EXT": "1",
                       "CUDA_HOME": os.environ.get("CUDA_HOME", "/usr/local/cuda")})]
    steps.append(_run("tests", [py, "-m", "pytest", "tests", "-q", "-p", "no:cacheprovider"], 300))
    op_tests = [f"tests/test_{op}.py" for op in OPS]
    sanitizer = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    steps.append(_run("memcheck", [sanitizer, "--tool", "memcheck", "--error-exitcode", "1", py, "-m", "pytest",
                                   *op_tests, "-q", "-p", "no:cacheprovider", "-k", "cuda and not hypothesis"], 240))
    bench_rows = {}
    for op in OPS:
        out = os.path.join(tmp, f"{op}.json")
        steps.append(_run(f"bench_{op}", [py, f"benchmarks/bench_{op}.py", "--out", out], 150))
        if os.path.exists(out):
            bench_rows[op] = json.load(open(out))
    out = os.path.join(tmp, "model.json")
    steps.append(_run("bench_model", [py, "-m", "vitkernels", "bench", "--out", out], 300))
    if os.path.exists(out):
        bench_rows["model"] = json.load(open(out))
    now = datetime.datetime.now(datetime.timezone.utc)
    result = {"date": now.isoformat(timespec="seconds"), "device": device, "capability": f"{major}.{minor}",
              "commit": commit, "versions": _versions(), "steps": steps, "benchmarks": bench_rows}
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device).strip("-").lower()
    path = os.path.join(ROOT, "benchmarks", "results", f"{now:%Y-%m-%d}_{slug}.json")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
    print(f"[gpu_check] wrote {path}")
    return 0 if all(s["rc"] == 0 for s in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
