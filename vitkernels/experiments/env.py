"""Where an experiment ran, written once: the device's name, the checkout's commit, the versions, dtype names.

Every result the experiments write (train's metrics, bench and sweep reports, the per-op benchmark rows,
gpu_check's JSON) records these through this module. It imports only the standard library and torch, so
``benchmarks/gpu_check.py`` loads it by path on a machine where the rest of vitkernels does not import.
"""

from __future__ import annotations

import os
import platform
import subprocess

import torch

# The dtype names the CLIs and result rows use. "none" (train's --amp none) means fp32 without autocast.
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# The checkout this file belongs to (vitkernels/experiments/env.py -> the repository root).
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def dtype_name(dtype: torch.dtype) -> str:
    """The short name of a torch dtype: torch.bfloat16 -> "bf16" (any other dtype: torch's name, "float64")."""
    return DTYPE_NAMES.get(dtype, str(dtype).replace("torch.", ""))


def precision(amp: str) -> str:
    """The precision an autocast name computes in: "none" -> "fp32", else the name itself."""
    return "fp32" if amp == "none" else amp


def autocast(device: torch.device, amp: str):
    """torch.autocast on ``device`` to the dtype named ``amp``; fp32 or "none": autocast disabled."""
    dtype = DTYPES[precision(amp)]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)


def device_name(device: torch.device | str | None = None) -> str:
    """The GPU's name (``torch.cuda.get_device_name``) or "cpu (<arch>, <N> threads)"; ``None``: the device a
    run would pick (CUDA when present)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def git_commit(root: str = ROOT) -> str | None:
    """HEAD of the checkout at ``root``, with "-dirty" appended when tracked files differ from it; None outside
    a git checkout (an installed package) or without git."""
    try:
        sha = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (sha + ("-dirty" if dirty else "")) if sha else None


def versions(packages: tuple[str, ...] = ("vitkernels", "triton", "timm")) -> dict:
    """python, torch, torch's CUDA and each of ``packages``: its version, or "not importable (<why>)"."""
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in packages:
        try:
            out[name] = __import__(name).__version__
        except Exception as exc:  # noqa: BLE001 - any failure to import is reported, not raised
            out[name] = f"not importable ({type(exc).__name__}: {' '.join(str(exc).split())[:200]})"
    return out
