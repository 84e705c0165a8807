"""What every per-op benchmark shares: the GPU guard, the commit, and writing result rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch


def commit() -> str:
    """The short commit of this checkout, or "unknown"."""
    try:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        return subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "unknown"


def why_not_gpu(script: str) -> str | None:
    """Why ``script`` cannot time anything here (None on a usable GPU). Timings come only from real kernels
    on a CUDA device: never from the CPU, never from Triton's interpreter."""
    if not torch.cuda.is_available():
        return f"{script} needs a CUDA GPU (none visible); nothing was measured."
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return "unset TRITON_INTERPRET: the interpreter is for tests, not timings."
    return None


def refuse(script: str) -> int | None:
    """Print why the benchmark cannot run and return its exit code (2), or None when it can run."""
    why = why_not_gpu(script)
    if why is None:
        return None
    print(why, file=sys.stderr)
    return 2


def write_rows(rows: list[dict], path: str | None) -> None:
    """Write the rows as a JSON list to ``path`` (when given)."""
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=2)
        print(f"wrote {len(rows)} rows to {path}")
