"""Atomic checkpoints: written to a temporary file in the same directory, fsynced, then ``os.replace``d over
the old one, so a run killed at any instant (SIGKILL, preemption) leaves either the previous checkpoint or the
new one, never a torn file."""

from __future__ import annotations

import json
import os
import tempfile

import torch


def save_atomic(obj, path: str) -> None:
    """torch.save ``obj`` to ``path`` atomically (temp file + fsync + os.replace + directory fsync)."""
    _write_atomic(path, lambda f: torch.save(obj, f))


def save_json_atomic(obj, path: str) -> None:
    """``obj`` as indented JSON in ``path``, atomically (as ``save_atomic``)."""
    _write_atomic(path, lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def _write_atomic(path: str, write) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-" + os.path.basename(path), dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:  # some filesystems / platforms cannot fsync a directory
        pass


def load(path: str, map_location="cpu") -> dict:
    """Load a checkpoint written by ``save_atomic`` (it holds RNG states and optimizer state, not code)."""
    return torch.load(path, map_location=map_location, weights_only=False)


def capture_rng(device: torch.device) -> dict:
    """The global RNG states that dropout / stochastic depth draw from."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
