"""Atomic checkpoints: written to a temporary file in the same directory, fsynced, then ``os.replace``d over
the old one, so a run killed at any instant (SIGKILL, preemption) leaves either the previous checkpoint or the
new one, never a torn file.

Sharded checkpoints (``--fsdp``, below) follow the same rule one level up: a directory that every rank
writes its shards into under a temporary name, renamed to its final name by rank 0 once all have."""

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
    _fsync_dir(directory)  # make the rename itself durable


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


# -- sharded checkpoints: one directory per checkpoint, committed by a rename ----------------------------
# <root>/step_00000008/             a complete checkpoint: every rank's DCP shard files, DCP's .metadata and
#                                   EXTRA (step, RNG states, scaler, run id: the small replicated state)
# <root>/.tmp-step_00000012/        a save in progress, or one a kill interrupted: never read, removed by the
#                                   next save
# Every rank writes into the temporary directory; once all have (DCP's save returns), rank 0 writes EXTRA
# and renames the directory to its final name. A rename is atomic, so a kill of any rank at any instant
# leaves the previous checkpoint as the newest complete one. The root must be on a filesystem every rank
# sees (several nodes: a shared one), as DCP itself needs to reshard.
STEP_PREFIX = "step_"
EXTRA = "extra.pt"


def step_dir(root: str, step: int) -> str:
    return os.path.join(root, f"{STEP_PREFIX}{step:08d}")


def tmp_dir(root: str, step: int) -> str:
    return os.path.join(root, f".tmp-{STEP_PREFIX}{step:08d}")


def is_sharded(path: str) -> bool:
    """Whether ``path`` is one complete sharded checkpoint (a committed step directory)."""
    return os.path.isfile(os.path.join(path, EXTRA)) and os.path.isfile(os.path.join(path, ".metadata"))


def latest_sharded(root: str) -> str | None:
    """The newest complete checkpoint under ``root``, or ``root`` itself when it is one; None if none."""
    if is_sharded(root):
        return root
    if not os.path.isdir(root):
        return None
    steps = sorted(name for name in os.listdir(root) if name.startswith(STEP_PREFIX)
                   and name[len(STEP_PREFIX):].isdigit() and is_sharded(os.path.join(root, name)))
    return os.path.join(root, steps[-1]) if steps else None


def begin_sharded(root: str, step: int) -> str:
    """Rank 0, before a save: an empty temporary directory for checkpoint ``step`` (a stale one, left by a
    kill, is removed). Returns its path."""
    import shutil

    tmp = tmp_dir(root, step)
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    return tmp


def commit_sharded(root: str, step: int, extra: dict) -> str:
    """Rank 0, after every rank has written its shards into ``tmp_dir(root, step)``: write ``extra``, rename
    the directory to ``step_dir(root, step)``, then remove every other checkpoint and every leftover of an
    interrupted save (the newest is the only one kept, as checkpoint.pt is overwritten). Returns the final
    path."""
    import shutil

    tmp, final = tmp_dir(root, step), step_dir(root, step)
    save_atomic(extra, os.path.join(tmp, EXTRA))
    if os.path.exists(final):  # the same step saved again (a resume from an older checkpoint): set it aside
        old = os.path.join(root, f".old-{os.path.basename(final)}")
        if os.path.exists(old):
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _fsync_dir(root)
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if path != final and name.startswith((STEP_PREFIX, ".old-", ".tmp-")):
            shutil.rmtree(path, ignore_errors=True)
    return final


def _fsync_dir(directory: str) -> None:
    try:  # some filesystems / platforms cannot fsync a directory
        dir_fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
