"""`python -m vitkernels sweep`: grid validation, failure isolation, resume, and a real 2-run micro sweep.

Most tests drive the sweep with a small fake `train` command (a script that parses the same options and writes a
metrics.json), which keeps them fast and lets them count invocations; the micro sweep at the end runs the real
training loop, `python -m vitkernels train`, in subprocesses, and plots the result.
"""

import csv
import json
import sys
import textwrap

import pytest

from vitkernels.experiments import plot, sweep
from vitkernels.experiments.sweep import COLUMNS, GridError, run_id, run_sweep, validate_grid

TINY = {"embed_dim": 16, "depth": 1, "num_heads": 2, "patch_size": 4}

# Stands in for `python -m vitkernels train`: logs each call, fails when embed_dim is 13, else writes metrics.
FAKE_TRAIN = textwrap.dedent("""
    import argparse, json, os, sys
    p = argparse.ArgumentParser()
    for name in ("--embed-dim", "--depth", "--num-heads", "--patch-size", "--epochs", "--steps"):
        p.add_argument(name, type=int)
    p.add_argument("--dataset"); p.add_argument("--out")
    p.add_argument("--compile", action="store_true"); p.add_argument("--no-progress", action="store_true")
    a = p.parse_args()
    with open(os.environ["FAKE_TRAIN_CALLS"], "a") as f:
        f.write(" ".join(sys.argv[1:]) + "\\n")
    if a.embed_dim == 13:
        print("step 1 loss 2.3")
        sys.exit("RuntimeError: simulated out of memory")
    length = a.epochs or a.steps or 1
    flops = 1e9 * a.embed_dim * a.depth * length / a.patch_size
    json.dump({"test_accuracy": 0.5 + 0.01 * length, "train_flops": flops, "params": 100 * a.embed_dim,
               "wall_s": 0.1 * length, "img_per_s": 1000.0, "mfu": 0.01, "backend": "torch", "device": "cpu",
               "steps": 10 * length}, open(os.path.join(a.out, "metrics.json"), "w"))
""")


@pytest.fixture
def fake_train(tmp_path, monkeypatch):
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    monkeypatch.setenv("FAKE_TRAIN_CALLS", str(calls))
    return [sys.executable, str(script)], calls


def _calls(calls):
    return [line for line in calls.read_text().splitlines() if line]


# --- grid validation -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid, message", [
    ({"embed_dim": 16}, "must be a JSON list"),
    ([], "grid is empty"),
    ([TINY, "d16"], "grid entry 1.*must be an object"),
    ([dict(TINY, embed_dims=32)], "unknown option 'embed_dims'; did you mean 'embed_dim'"),
    ([dict(TINY, colour="red")], "unknown option 'colour'; known options: model, "),
    ([dict(TINY, embed_dim="16")], "option 'embed_dim' must be int, got \"16\""),
    ([dict(TINY, depth=True)], "option 'depth' must be int, got true"),
    ([dict(TINY, lr="fast")], "option 'lr' must be a number"),
    ([dict(TINY, amp="fp8")], "option 'amp' must be one of bf16, fp16, none, got 'fp8'"),
    ([dict(TINY, epochs=0)], "option 'epochs' must be positive"),
    ([{"embed_dim": 16, "depth": 1, "patch_size": 4}], "missing num_heads: give a 'model' name or all of"),
    ([{"epochs": 2}], "missing embed_dim, depth, num_heads, patch_size"),
    ([dict(TINY, num_heads=3)], "embed_dim 16 is not divisible by num_heads 3"),
    ([dict(TINY, img_size=30)], "img_size 30 is not divisible by patch_size 4"),
    ([dict(TINY, epochs=1, steps=5)], "'epochs' or 'steps', not both"),
    ([dict(TINY, dataset="digits")], "'dataset' is set by the sweep itself"),
    ([dict(TINY, out="x")], "'out' is set by the sweep itself"),
    ([dict(TINY, epochs=1), dict(TINY, epochs=1)], "grid entry 1.*the same run as grid entry 0"),
])
def test_bad_grid_gives_clear_error(grid, message):
    with pytest.raises(GridError, match=message):
        validate_grid(grid)


def test_good_grids_and_default_grids_validate():
    assert validate_grid([TINY, {"model": "vit_tiny_patch16_224", "steps": 3, "lr": 1e-3, "compile": True}])
    for device in ("cpu", "cuda"):
        grid = validate_grid(sweep.default_grid(device))
        assert len({run_id(run, "mnist5k") for run in grid}) == len(grid)
        # a real trade-off: several sizes x patch sizes x lengths
        for key in ("embed_dim", "patch_size", "epochs"):
            assert len({run[key] for run in grid}) >= 2, key


def test_bad_grid_file_through_the_cli(tmp_path, capsys):
    path = tmp_path / "grid.json"
    path.write_text('[{"embed_dim": 16, "depth": 1, "num_heads": 2}]')
    assert sweep.main(["--grid", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "grid entry 0" in err and "missing patch_size" in err, err
    path.write_text("[{")
    assert sweep.main(["--grid", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "is not valid JSON" in capsys.readouterr().err
    assert sweep.main(["--grid", str(tmp_path / "missing.json")]) == 2
    assert "cannot read grid file" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # nothing ran


def test_run_id_is_stable_and_distinguishes_runs():
    a = run_id(dict(TINY, epochs=2), "mnist5k")
    assert a == run_id({"epochs": 2, **TINY}, "mnist5k")  # key order does not matter
    assert a.startswith("d16-l1-h2-p4-e2-")
    assert a != run_id(dict(TINY, epochs=3), "mnist5k")
    assert a != run_id(dict(TINY, epochs=2), "digits")
    assert run_id({"model": "vit_tiny_patch16_224", "steps": 5}, "digits").startswith("vit_tiny_patch16_224-s5-")


def test_train_args():
    assert sweep.train_args({"embed_dim": 16, "mlp_ratio": 2.0, "compile": True, "amp": "bf16"}) == [
        "--embed-dim", "16", "--mlp-ratio", "2.0", "--compile", "--amp", "bf16"]
    assert sweep.train_args({"compile": False}) == []


# --- running, failures, resume (fake train) ----------------------------------------------------------------------

def test_failing_run_is_recorded_and_sweep_goes_on(tmp_path, fake_train):
    cmd, calls = fake_train
    grid = [dict(TINY, epochs=1), dict(TINY, embed_dim=13, num_heads=1, epochs=1), dict(TINY, epochs=2)]
    rows = run_sweep(grid, "digits", tmp_path, train_cmd=cmd, log=lambda *_: None)
    assert len(_calls(calls)) == 3
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    failed = rows[1]
    assert "simulated out of memory" in failed["error"] and "exited with status 1" in failed["error"]
    assert failed["test_accuracy"] is None and failed["embed_dim"] == 13
    assert rows[2]["test_accuracy"] == pytest.approx(0.52)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    assert [r["status"] for r in saved["rows"]] == ["ok", "failed", "ok"]
    assert "simulated out of memory" in saved["rows"][1]["error"]


def test_resume_skips_finished_runs_and_retries_failed(tmp_path, fake_train):
    cmd, calls = fake_train
    grid = [dict(TINY, epochs=1), dict(TINY, embed_dim=13, num_heads=1, epochs=1)]
    run_sweep(grid, "digits", tmp_path, train_cmd=cmd, log=lambda *_: None)
    ok_metrics = tmp_path / "runs" / run_id(grid[0], "digits") / "metrics.json"
    mtime = ok_metrics.stat().st_mtime_ns
    grid.append(dict(TINY, epochs=3))  # a grown grid: only the new run and the failed one train
    rows = run_sweep(grid, "digits", tmp_path, train_cmd=cmd, log=lambda *_: None)
    calls_made = _calls(calls)
    assert len(calls_made) == 2 + 2, calls_made
    assert "--embed-dim 13" in calls_made[2] and "--epochs 3" in calls_made[3]
    assert ok_metrics.stat().st_mtime_ns == mtime
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert rows[0]["test_accuracy"] == pytest.approx(0.51) and rows[0]["run_wall_s"] is not None


def test_stale_metrics_of_a_failed_retry_do_not_count(tmp_path, fake_train):
    cmd, calls = fake_train
    bad = dict(TINY, embed_dim=13, num_heads=1, epochs=1)
    run_dir = tmp_path / "runs" / run_id(bad, "digits")
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text("{not json")  # a half-written file from a killed run
    rows = run_sweep([bad], "digits", tmp_path, train_cmd=cmd, log=lambda *_: None)
    assert rows[0]["status"] == "failed" and len(_calls(calls)) == 1
    assert not (run_dir / "metrics.json").exists()


def test_csv_and_json_columns(tmp_path, fake_train):
    cmd, _ = fake_train
    grid = [dict(TINY, epochs=1), dict(TINY, patch_size=2, steps=4, compile=True)]
    run_sweep(grid, "digits", tmp_path, train_cmd=cmd, log=lambda *_: None)
    with open(tmp_path / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS
        table = list(reader)
    assert len(table) == 2
    assert json.loads(table[1]["options"]) == grid[1]
    assert table[1]["patch_size"] == "2" and table[1]["steps"] == "4" and table[1]["epochs"] == ""
    assert float(table[0]["train_flops"]) == pytest.approx(1e9 * 16 * 1 * 1 / 4)
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert data["dataset"] == "digits" and data["grid"] == grid and data["columns"] == list(COLUMNS)
    assert all(set(COLUMNS) <= set(row) for row in data["rows"])


def test_cli_exit_status(tmp_path, fake_train, monkeypatch):
    cmd, _ = fake_train
    monkeypatch.setattr(sweep, "default_train_cmd", lambda: cmd)
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps([dict(TINY, epochs=1)]))
    assert sweep.main(["--dataset", "digits", "--grid", str(grid), "--out", str(tmp_path / "a")]) == 0
    grid.write_text(json.dumps([dict(TINY, epochs=1), dict(TINY, embed_dim=13, num_heads=1, epochs=1)]))
    assert sweep.main(["--dataset", "digits", "--grid", str(grid), "--out", str(tmp_path / "b")]) == 1


def test_timeout_is_recorded(tmp_path):
    script = tmp_path / "slow.py"
    script.write_text("import time; print('started', flush=True); time.sleep(30)")
    rows = run_sweep([dict(TINY, epochs=1)], "digits", tmp_path, train_cmd=[sys.executable, str(script)],
                     timeout=1.0, log=lambda *_: None)
    assert rows[0]["status"] == "failed" and rows[0]["error"].startswith("timed out after 1 s")
    assert "started" in rows[0]["error"]



# --- the real training loop -------------------------------------------------------------------------------------

def test_micro_sweep_with_the_real_training_loop(tmp_path):
    """Two tiny ViTs on the 8x8 digits, a few steps each, through `python -m vitkernels train`; then the plot,
    and a rerun that must not train again (its train command would fail if it did)."""
    tiny = {"embed_dim": 16, "depth": 1, "num_heads": 2, "steps": 3, "batch_size": 32, "backend": "torch"}
    grid = [dict(tiny, patch_size=4), dict(tiny, patch_size=2)]
    rows = run_sweep(grid, "digits", tmp_path, prune=True, log=lambda *_: None)
    assert [r["status"] for r in rows] == ["ok", "ok"], [r["error"] for r in rows]
    for row in rows:
        assert 0.0 <= row["test_accuracy"] <= 1.0
        assert row["steps"] == 3 and row["img_size"] == 8 and row["device"].startswith("cpu")
        assert row["params"] > 0 and row["train_flops"] > 0 and row["wall_s"] > 0 and row["img_per_s"] > 0
        assert row["backend"] == "torch" and row["run_cpu_s"] > 0
        # pruned: the weights are gone, the metrics and the log stay
        assert sorted(p.name for p in (tmp_path / "runs" / row["run_id"]).iterdir()) == ["metrics.json",
                                                                                      "train.log"]
    # 16 patches of 2x2 cost more than 4 patches of 4x4 at the same width and depth
    assert rows[1]["train_flops"] > rows[0]["train_flops"]
    with open(tmp_path / "sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == COLUMNS and len(list(reader)) == 2

    assert plot.main([str(tmp_path)]) == 0
    png = (tmp_path / "compute_vs_accuracy.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert (tmp_path / "compute_vs_accuracy.svg").stat().st_size > 10_000

    metrics = [tmp_path / "runs" / r["run_id"] / "metrics.json" for r in rows]
    mtimes = [m.stat().st_mtime_ns for m in metrics]
    again = run_sweep(grid, "digits", tmp_path, train_cmd=[sys.executable, "-c", "raise SystemExit(3)"],
                      log=lambda *_: None)
    assert [r["status"] for r in again] == ["ok", "ok"]
    assert [r["test_accuracy"] for r in again] == [r["test_accuracy"] for r in rows]
    assert [r["run_wall_s"] for r in again] == [r["run_wall_s"] for r in rows]
    assert [m.stat().st_mtime_ns for m in metrics] == mtimes
