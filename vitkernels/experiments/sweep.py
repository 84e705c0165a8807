"""``python -m vitkernels sweep``: train a grid of ViTs and record accuracy against training compute.

The paper's central figure plots accuracy against total pre-training compute for families of models; a sweep
produces the same data for any dataset and budget::

    python -m vitkernels sweep --dataset mnist5k --grid grid.json --out runs/sweep
    python -m vitkernels plot runs/sweep

``grid.json`` is a list of runs, each an object of ``train`` options with underscores for dashes::

    [{"embed_dim": 64, "depth": 4, "num_heads": 4, "patch_size": 4, "epochs": 5},
     {"model": "vit_tiny_patch16_224", "img_size": 32, "steps": 500}]

Each run is one subprocess ``python -m vitkernels train <options> --dataset NAME --out DIR/runs/<run_id>``,
so a crash, an out-of-memory error or a bad option fails that run only: it is recorded with its error text and
the sweep goes on. ``<run_id>`` is a readable prefix plus a hash of the run's options and the dataset, stable
across sweeps, so running the same sweep again skips every run whose ``metrics.json`` exists (failed runs are
tried again). ``DIR/sweep.csv`` and ``DIR/sweep.json`` (one row per run, see ``COLUMNS``) are rewritten after
every run, so an interrupted sweep keeps what it finished.

Without ``--grid`` a default grid is used (``--print-grid`` shows it): on a CPU-only machine 8 small runs
sized for a 2-core CPU (see docs/sweep_cpu/README.md for the measured time), on a GPU a larger grid.
Each row also records the run's CPU seconds (``run_cpu_s``) and the sweep the load average, since wall times on
a shared machine depend on everyone else's work.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from vitkernels.experiments.cli import ArgumentParser
from vitkernels.experiments.env import ROOT, device_name

# A grid entry may set any option of `python -m vitkernels train` (read from its config, see train_options) but
# these, which belong to the sweep: one dataset per sweep, one output folder per run, resuming is the sweep's job.
SWEEP_OWNED = ("dataset", "out", "resume")
# Without a model name, a run must give the architecture explicitly.
SIZE_OPTIONS = ("embed_dim", "depth", "num_heads", "patch_size")
# Numeric options that must be > 0.
POSITIVE = ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "epochs", "steps",
            "batch_size", "lr")

# One row per run, in this column order in sweep.csv. `options` is the grid entry (JSON in the CSV); the
# architecture and length columns repeat it, flattened, for plotting and spreadsheets.
COLUMNS = (
    "run_id", "status", "model", "embed_dim", "depth", "num_heads", "patch_size", "img_size", "epochs", "steps",
    "params", "train_flops", "test_accuracy", "wall_s", "train_time_s", "img_per_s", "mfu", "backend", "device",
    "run_wall_s", "run_cpu_s", "options", "error",
)
# Columns copied from the run's metrics.json when the grid entry does not fix them.
_FROM_METRICS = ("model", "embed_dim", "depth", "num_heads", "patch_size", "img_size", "epochs", "steps", "params",
                 "train_flops", "test_accuracy", "wall_s", "train_time_s", "img_per_s", "mfu", "device")
_ARCHITECTURE = ("embed_dim", "depth", "num_heads", "patch_size", "img_size")

# Default grids, on mnist5k (4,000 training digits, 28x28; train's presets give the other hyper-parameters).
# CPU: 2 sizes x 2 patch sizes (16 or 49 patches) x 3 lengths = 12 runs, sized for well under 15 minutes on an
# idle 2-core machine (docs/sweep_cpu/README.md has the measured time).
# GPU: 4 sizes x 2 patch sizes x 3 lengths = 24 runs (not measured yet: no GPU was at hand when it was written).
_CPU_SIZES = ({"embed_dim": 32, "depth": 2, "num_heads": 2}, {"embed_dim": 64, "depth": 4, "num_heads": 4})
_GPU_SIZES = ({"embed_dim": 64, "depth": 4, "num_heads": 4}, {"embed_dim": 128, "depth": 6, "num_heads": 4},
              {"embed_dim": 192, "depth": 8, "num_heads": 6}, {"embed_dim": 256, "depth": 8, "num_heads": 8})
DEFAULT_GRIDS = {
    "cpu": [dict(size, patch_size=p, epochs=e) for size in _CPU_SIZES for p in (7, 4) for e in (2, 8, 25)],
    "cuda": [dict(size, patch_size=p, epochs=e) for size in _GPU_SIZES for p in (7, 4) for e in (5, 15, 40)],
}
DEFAULT_DATASET = "mnist5k"


class GridError(ValueError):
    """A grid specification that cannot be run; the message says which entry and why."""


def default_grid(device: str | None = None) -> list[dict]:
    """The default grid for ``device`` ("cpu" or "cuda"; None: "cuda" when a GPU is visible)."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return [dict(run) for run in DEFAULT_GRIDS["cuda" if device.startswith("cuda") else "cpu"]]


def train_options() -> dict[str, tuple[type, tuple | None]]:
    """Options of ``vitkernels train`` a grid entry may set: name (underscores) -> (JSON type, choices or None).

    Read from train's config (``TrainConfig``'s fields declare the options), so the grid always accepts exactly
    what train accepts.
    """
    from vitkernels.experiments.cli import options
    from vitkernels.experiments.train.config import TrainConfig

    return {f.key: (f.kind, f.option.choices) for f in options(TrainConfig)
            if not f.option.hidden and f.key not in SWEEP_OWNED}


def validate_grid(grid) -> list[dict]:
    """Check a grid up front and return it as a list of option dicts; raise GridError naming what is wrong."""
    if not isinstance(grid, list):
        raise GridError(f"a grid must be a JSON list of runs (objects of train options), got {type(grid).__name__}")
    if not grid:
        raise GridError("the grid is empty: give at least one run")
    known = train_options()
    seen: dict[str, int] = {}
    for i, run in enumerate(grid):
        where = f"grid entry {i} ({json.dumps(run) if isinstance(run, dict) else run!r})"
        if not isinstance(run, dict):
            raise GridError(f"{where}: each run must be an object of train options, got {type(run).__name__}")
        for key, value in run.items():
            if key in SWEEP_OWNED:
                raise GridError(f"{where}: {key!r} is set by the sweep itself, not per run")
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"did you mean {close[0]!r}? " if close else ""
                raise GridError(f"{where}: unknown option {key!r}; {hint}known options: {', '.join(known)}")
            _check_value(where, key, value, *known[key])
        if "model" not in run:
            missing = [k for k in SIZE_OPTIONS if k not in run]
            if missing:
                raise GridError(f"{where}: missing {', '.join(missing)}: give a 'model' name or all of "
                                f"{', '.join(SIZE_OPTIONS)}")
        if "embed_dim" in run and "num_heads" in run and run["embed_dim"] % run["num_heads"]:
            raise GridError(f"{where}: embed_dim {run['embed_dim']} is not divisible by num_heads {run['num_heads']}")
        if "img_size" in run and "patch_size" in run and run["img_size"] % run["patch_size"]:
            raise GridError(f"{where}: img_size {run['img_size']} is not divisible by patch_size {run['patch_size']}")
        if "epochs" in run and "steps" in run:
            raise GridError(f"{where}: give 'epochs' or 'steps', not both")
        key = json.dumps(run, sort_keys=True)
        if key in seen:
            raise GridError(f"{where}: the same run as grid entry {seen[key]}")
        seen[key] = i
    return [dict(run) for run in grid]


def _check_value(where: str, key: str, value, kind: type, choices: tuple | None) -> None:
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise GridError(f"{where}: option {key!r} must be {'a number' if kind is float else kind.__name__}, "
                        f"got {json.dumps(value)}")
    if choices is not None and value not in choices:
        raise GridError(f"{where}: option {key!r} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if key in POSITIVE and value <= 0:
        raise GridError(f"{where}: option {key!r} must be positive, got {value}")


def load_grid(path: str | os.PathLike) -> list[dict]:
    """Read and validate a grid JSON file."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise GridError(f"cannot read grid file {path}: {exc.strerror or exc}") from None
    try:
        grid = json.loads(text)
    except json.JSONDecodeError as exc:
        raise GridError(f"grid file {path} is not valid JSON: {exc}") from None
    return validate_grid(grid)


def run_id(options: dict, dataset: str) -> str:
    """A readable, stable name for one run: its sizes and length, then a hash of its options and dataset."""
    digest = hashlib.sha1(json.dumps({"dataset": dataset, **options}, sort_keys=True).encode()).hexdigest()[:8]
    if "model" in options:
        name = options["model"]
    else:
        name = f"d{options['embed_dim']}-l{options['depth']}-h{options['num_heads']}-p{options['patch_size']}"
    if "epochs" in options:
        name += f"-e{options['epochs']}"
    elif "steps" in options:
        name += f"-s{options['steps']}"
    return f"{name}-{digest}".replace("/", "_")


def train_args(options: dict) -> list[str]:
    """The command-line options of ``vitkernels train`` for a grid entry (True booleans become bare flags)."""
    args = []
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                args.append(flag)
        else:
            args += [flag, str(value)]
    return args


def default_train_cmd() -> list[str]:
    return [sys.executable, "-m", "vitkernels", "train"]


def _package_env() -> dict:
    """The environment of a train subprocess: this vitkernels importable even when it is not installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def _read_metrics(path: Path) -> dict | None:
    """metrics.json of a finished run, or None when it is missing, unreadable or lacks test_accuracy."""
    try:
        metrics = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return metrics if isinstance(metrics, dict) and metrics.get("test_accuracy") is not None else None


def _row(rid: str, options: dict, metrics: dict | None, status: str, error: str, run_wall_s=None,
         run_cpu_s=None) -> dict:
    row = dict.fromkeys(COLUMNS)
    row.update(run_id=rid, status=status, options=options, error=error, run_wall_s=run_wall_s, run_cpu_s=run_cpu_s)
    metrics = metrics or {}
    # The sizes train actually used (its presets fill what the grid left out), else a named model's config.
    config = metrics.get("model_config") if isinstance(metrics.get("model_config"), dict) else {}
    if not config and "model" in options:
        try:
            from vitkernels.models import model_config

            config = model_config(options["model"])
        except ValueError:
            config = {}
    for key in _FROM_METRICS:
        if key in options:
            row[key] = options[key]
        elif metrics.get(key) is not None:
            row[key] = metrics[key]
        elif key in _ARCHITECTURE and config.get(key) is not None:
            row[key] = config[key]
    row["backend"] = _backend(options, metrics)
    return row


def _backend(options: dict, metrics: dict) -> str | None:
    """The backend that ran: the requested one, or for "auto" the backends it resolved to (e.g. "auto:torch")."""
    asked = metrics.get("backend") or options.get("backend")
    resolved = metrics.get("backend_resolved")
    if asked == "auto" and isinstance(resolved, dict) and resolved:
        return "auto:" + "+".join(sorted(set(map(str, resolved.values()))))
    return asked


def _tail(path: Path, limit: int = 2000) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [line for line in text.replace("\r", "\n").splitlines() if line.strip()]
    return "\n".join(lines[-20:])[-limit:]


def run_one(options: dict, dataset: str, run_dir: Path, *, train_cmd: list[str] | None = None,
            timeout: float | None = None) -> tuple[dict | None, str]:
    """Train one grid entry in a subprocess; return (metrics, "") or (None, error text)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = run_dir / "metrics.json"
    metrics_path.unlink(missing_ok=True)  # a stale file of an earlier failed attempt must not count as success
    quiet = [] if train_cmd or "no_progress" not in train_options() else ["--no-progress"]  # no bars in the log
    cmd = (list(train_cmd or default_train_cmd()) + train_args(options) + quiet
           + ["--dataset", dataset, "--out", str(run_dir)])
    log_path = run_dir / "train.log"
    with open(log_path, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=_package_env(), timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout:g} s\n{_tail(log_path)}"
        except OSError as exc:
            return None, f"cannot start {cmd[0]}: {exc}"
    if proc.returncode != 0:
        return None, f"train exited with status {proc.returncode}:\n{_tail(log_path)}"
    metrics = _read_metrics(metrics_path)
    if metrics is None:
        return None, f"train exited 0 but wrote no metrics.json with test_accuracy in {run_dir}"
    return metrics, ""


def _prune(run_dir: Path, keep=("metrics.json", "train.log")) -> None:
    """Delete a finished run's checkpoints and other files, keeping only ``keep``."""
    for path in run_dir.iterdir():
        if path.name in keep:
            continue
        shutil.rmtree(path) if path.is_dir() else path.unlink()


def _csv_value(value):
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return "" if value is None else value


def write_results(out: Path, rows: list[dict], meta: dict) -> None:
    """Write out/sweep.json (meta + rows) and out/sweep.csv (rows), each replaced atomically."""
    tmp = out / "sweep.json.tmp"
    tmp.write_text(json.dumps({**meta, "columns": list(COLUMNS), "rows": rows}, indent=1, default=str) + "\n")
    os.replace(tmp, out / "sweep.json")
    tmp = out / "sweep.csv.tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({key: _csv_value(row.get(key)) for key in COLUMNS})
    os.replace(tmp, out / "sweep.csv")


def run_sweep(grid: list[dict], dataset: str, out: str | os.PathLike, *, train_cmd: list[str] | None = None,
              timeout: float | None = None, prune: bool = False, log=print) -> list[dict]:
    """Run every grid entry not finished yet, writing out/sweep.{csv,json} after each; return the rows."""
    grid = validate_grid(grid)
    out = Path(out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    previous = {}
    try:
        previous = {r["run_id"]: r for r in json.loads((out / "sweep.json").read_text()).get("rows", [])}
    except (OSError, json.JSONDecodeError, AttributeError, KeyError, TypeError):
        pass
    ids = [run_id(options, dataset) for options in grid]
    meta = {"dataset": dataset, "machine": device_name(), "started": _now(), "load_avg_start": _load_avg(),
            "grid": grid}
    rows: list[dict] = []
    start, cpu_start = time.perf_counter(), _children_cpu_s()
    for i, (rid, options) in enumerate(zip(ids, grid)):
        run_dir = out / "runs" / rid
        metrics = _read_metrics(run_dir / "metrics.json")
        if metrics is not None:
            before = previous.get(rid, {})
            row = _row(rid, options, metrics, "ok", "", before.get("run_wall_s"), before.get("run_cpu_s"))
            log(f"[{i + 1}/{len(grid)}] {rid}: done before, skipped (test accuracy {metrics['test_accuracy']:.4f})")
        else:
            log(f"[{i + 1}/{len(grid)}] {rid}: training ...")
            t0, cpu0 = time.perf_counter(), _children_cpu_s()
            metrics, error = run_one(options, dataset, run_dir, train_cmd=train_cmd, timeout=timeout)
            elapsed = round(time.perf_counter() - t0, 2)
            cpu = round(_children_cpu_s() - cpu0, 2)
            row = _row(rid, options, metrics, "ok" if metrics else "failed", error, elapsed, cpu)
            if metrics:
                log(f"    test accuracy {metrics['test_accuracy']:.4f} in {elapsed:.1f} s")
                if prune:
                    _prune(run_dir)
            else:
                log(f"    FAILED in {elapsed:.1f} s: {error.splitlines()[0] if error else ''}")
        rows.append(row)
        meta.update(updated=_now(), sweep_wall_s=round(time.perf_counter() - start, 2),
                    sweep_cpu_s=round(_children_cpu_s() - cpu_start, 2), load_avg=_load_avg())
        write_results(out, rows + [_pending(r, o) for r, o in zip(ids[i + 1:], grid[i + 1:])], meta)
    failed = sum(r["status"] != "ok" for r in rows)
    log(f"sweep: {len(rows) - failed} ok, {failed} failed, {time.perf_counter() - start:.1f} s; "
        f"results in {out / 'sweep.csv'} and {out / 'sweep.json'}")
    return rows


def _pending(rid: str, options: dict) -> dict:
    return _row(rid, options, None, "pending", "")


def _load_avg() -> list[float] | None:
    """The 1/5/15-minute load averages: how busy a shared machine was (wall times depend on it)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _children_cpu_s() -> float:
    """CPU seconds (user + system) used so far by finished child processes: on a shared machine this, unlike
    wall time, does not grow with other people's load."""
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def main(argv=None) -> int:
    parser = ArgumentParser(prog="vitkernels sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=DEFAULT_DATASET,
                        help=f"dataset of every run (train's --dataset; default {DEFAULT_DATASET})")
    parser.add_argument("--grid", help="JSON file: a list of runs, each an object of train options "
                                       "(default: the built-in grid for this machine, see --print-grid)")
    parser.add_argument("--out", default="runs/sweep", help="output folder (default runs/sweep)")
    parser.add_argument("--timeout", type=float, default=None, help="seconds allowed per run (default: no limit)")
    parser.add_argument("--prune", action="store_true",
                        help="after each finished run delete its checkpoints, keeping metrics.json and train.log")
    parser.add_argument("--print-grid", action="store_true", help="print the grid as JSON and exit")
    args = parser.parse_args(argv)
    try:
        grid = load_grid(args.grid) if args.grid else default_grid()
    except GridError as exc:
        print(f"vitkernels sweep: {exc}", file=sys.stderr)
        return 2
    if args.print_grid:
        print(json.dumps(grid, indent=1))
        return 0
    rows = run_sweep(grid, args.dataset, args.out, timeout=args.timeout, prune=args.prune)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
