"""benchmarks/gpu_check.py on a CPU, without a GPU and without running anything heavy: --help, --dry-run,
the refusal to run without a GPU, the budget arithmetic, missing tools, crashes and timeouts of steps, the
JSON (and its copy under $OUT)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "benchmarks", "gpu_check.py")
SHELL = os.path.join(REPO, "benchmarks", "gpu_check.sh")


@pytest.fixture(scope="module")
def gc():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("gpu_check", None)


def test_device_commit_and_versions_need_only_torch():
    """The JSON's device name, commit and versions come from vitkernels/experiments/env.py, loaded from its
    file: they are recorded even where neither vitkernels nor triton imports."""
    code = ("import sys\n"
            "sys.modules['vitkernels'] = sys.modules['triton'] = None  # importing them now fails\n"
            f"sys.path.insert(0, {os.path.dirname(SCRIPT)!r})\n"
            "import gpu_check\n"
            "env = gpu_check.experiment_env()\n"
            "print(env.device_name('cpu')); print(env.git_commit()); print(env.versions(('triton',)))\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    device, commit, versions = p.stdout.strip().splitlines()
    assert device.startswith("cpu (") and "threads" in device
    assert commit == "None" or len(commit.removesuffix("-dirty")) == 40  # None outside a git checkout
    assert f"'torch': '{torch.__version__}'" in versions and "'triton': 'not importable (" in versions


def _results_files() -> set[str]:
    folder = os.path.join(REPO, "benchmarks", "results")
    return set(os.listdir(folder)) if os.path.isdir(folder) else set()


# ---------------------------------------------------------------------------------------------------------
# The command line


def test_help_exits_0_with_usage_and_runs_nothing():
    t0 = time.monotonic()
    p = subprocess.run(["bash", SHELL, "--help"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "PYTHON": sys.executable})
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: gpu_check")
    for word in ("--budget", "--dry-run", "--steps", "--build-library", "memcheck", "tests_bf16"):
        assert word in p.stdout, word
    assert "[setup]" not in p.stderr  # scripts/setup.sh (which may install things) was not run
    assert time.monotonic() - t0 < 30


def test_dry_run_lists_steps_and_checks_the_environment_in_seconds(gc):
    before = _results_files()
    t0 = time.monotonic()
    p = subprocess.run(["bash", SHELL, "--dry-run", "--budget", "300"], capture_output=True, text=True,
                       timeout=120, env={**os.environ, "PYTHON": sys.executable})
    elapsed = time.monotonic() - t0
    assert elapsed < 60, f"--dry-run took {elapsed:.0f} s"
    assert p.returncode in (0, 1), p.stderr
    assert "budget 300 s" in p.stdout and "nothing is run" in p.stdout
    for step in gc.STEPS:
        assert f"{step.name} " in p.stdout and f"cap {step.cap_s:3.0f} s" in p.stdout
    for name in ("python:", "torch:", "gpu:", "nvcc:", "compute-sanitizer:", "tests:", "benchmarks:"):
        assert name in p.stdout, name
    assert (p.returncode == 0) == p.stdout.rstrip().endswith("consistent") and ("inconsistent" not in p.stdout
                                                                                 or p.returncode == 1)
    assert _results_files() == before  # no results written


def test_dry_run_exit_code_follows_the_checks(gc, monkeypatch, capsys):
    steps = gc.select_steps(None, None)
    monkeypatch.setattr(gc, "environment", lambda: [{"name": "torch", "level": "ok", "value": "2.11.0"},
                                                    {"name": "gpu", "level": "note", "value": "none visible"}])
    assert gc.dry_run(steps, 540) == 0
    out = capsys.readouterr().out
    assert "gpu_check --dry-run: consistent" in out and "racecheck" in out
    monkeypatch.setattr(gc, "environment", lambda: [{"name": "nvcc", "level": "error", "value": "missing"}])
    assert gc.dry_run(steps, 540) == 1
    assert "inconsistent: nvcc: missing" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_real_run_without_gpu_exits_2():
    before = _results_files()
    p = subprocess.run([sys.executable, SCRIPT, "--budget", "60"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "needs a CUDA GPU" in p.stderr
    assert _results_files() == before


def test_select_steps(gc):
    assert [s.name for s in gc.select_steps("racecheck,build", None)] == ["build", "racecheck"]  # value order
    names = [s.name for s in gc.select_steps(None, "memcheck,racecheck")]
    assert names[0] == "build" and "memcheck" not in names and "tests_full" in names
    with pytest.raises(SystemExit, match="unknown step"):
        gc.select_steps("tests,build", None)


# ---------------------------------------------------------------------------------------------------------
# The budget


class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def _step(gc, clock, name, cap, minimum, used=None, calls=None, fail=None):
    def run(check, limit_s):
        if calls is not None:
            calls.append((name, limit_s))
        if fail:
            raise fail
        clock.now += limit_s if used is None else used
        return {"step": name, "status": "ok", "rc": 0}

    return gc.Step(name, cap, minimum, name, run)


def test_time_limit(gc):
    step = gc.Step("x", cap_s=100, min_s=30, what="", run=None)
    assert gc.time_limit(step, 500) == (100, None)
    assert gc.time_limit(step, 50) == (50, None)
    limit, why = gc.time_limit(step, 20)
    assert limit is None and "20 s left" in why and "at least 30 s" in why


def test_steps_get_what_is_left_and_the_rest_are_skipped(gc, tmp_path):
    clock, calls, seen = FakeClock(), [], []
    steps = [_step(gc, clock, "a", 100, 10, calls=calls),  # uses its whole cap
             _step(gc, clock, "b", 300, 50, calls=calls),  # gets what is left: 200 - 100 - reserve
             _step(gc, clock, "c", 60, 20, calls=calls)]  # nothing left: skipped
    records = gc.run_steps(steps, gc.Check(log_dir=str(tmp_path)), budget_s=200, t0=clock(), clock=clock,
                           on_step=lambda r: seen.append(len(r)))
    assert calls == [("a", 100), ("b", 200 - 100 - gc.RESERVE_S)]
    assert [r["status"] for r in records] == ["ok", "ok", "skipped"]
    assert records[1]["limit_s"] == 200 - 100 - gc.RESERVE_S
    assert records[2]["skipped"].startswith("does not fit: 0 s left") and "at least 20 s" in records[2]["skipped"]
    assert seen == [1, 2, 3]  # the JSON is rewritten after every step


def test_a_short_step_leaves_time_for_the_next(gc, tmp_path):
    clock, calls = FakeClock(), []
    steps = [_step(gc, clock, "a", 300, 10, used=20, calls=calls), _step(gc, clock, "b", 300, 50, calls=calls)]
    gc.run_steps(steps, gc.Check(log_dir=str(tmp_path)), budget_s=200, t0=clock() - 30, clock=clock)
    assert calls == [("a", 200 - 30 - gc.RESERVE_S), ("b", 200 - 30 - 20 - gc.RESERVE_S)]


def test_a_crashing_step_is_recorded_and_the_next_runs(gc, tmp_path):
    clock, calls = FakeClock(), []
    steps = [_step(gc, clock, "a", 60, 10, calls=calls, fail=ValueError("boom")),
             _step(gc, clock, "b", 60, 10, calls=calls)]
    records = gc.run_steps(steps, gc.Check(log_dir=str(tmp_path)), budget_s=500, t0=clock(), clock=clock)
    assert records[0]["status"] == "crashed" and records[0]["error"] == "ValueError: boom"
    assert "ValueError" in records[0]["log_tail"]
    assert records[1]["status"] == "ok" and [c[0] for c in calls] == ["a", "b"]


# ---------------------------------------------------------------------------------------------------------
# Commands, missing tools


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] not in ("Z", "X")  # a zombie is dead
    except FileNotFoundError:
        return False


def test_command_timeout_kills_the_whole_process_group(gc, tmp_path):
    check = gc.Check(log_dir=str(tmp_path))
    pidfile = tmp_path / "grandchild.pid"
    t0 = time.monotonic()
    record = check.command("sleepy", ["bash", "-c", f"echo started; sleep 60 & echo $! > {pidfile}; wait"],
                           limit_s=1)
    assert time.monotonic() - t0 < 15
    assert record["status"] == "timeout" and record["rc"] == 124
    assert "started" in record["log_tail"] and "killed after 1 s" in record["log_tail"]
    grandchild = int(pidfile.read_text())  # e.g. a pytest-xdist worker: it must not keep the GPU busy
    deadline = time.monotonic() + 5
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(grandchild)


def test_command_records_failure_and_pytest_summary(gc, tmp_path):
    check = gc.Check(log_dir=str(tmp_path))
    record = check.command("t", [sys.executable, "-c", "print('==== 3 passed, 1 skipped in 0.1s ===='); exit(1)"],
                           limit_s=60)
    assert record["status"] == "failed" and record["rc"] == 1
    assert record["pytest_summary"] == "3 passed, 1 skipped in 0.1s"
    missing = check.command("m", ["/nonexistent/tool"], limit_s=5)
    assert missing["status"] == "crashed"


def test_missing_compute_sanitizer_is_a_skipped_step(gc, monkeypatch, tmp_path):
    monkeypatch.setattr(gc.shutil, "which", lambda name, *a, **k: None)
    monkeypatch.setattr(gc.os.path, "isfile", lambda path: False)
    monkeypatch.setattr(gc.subprocess, "Popen", lambda *a, **k: pytest.fail("nothing may run"))
    assert gc.find_sanitizer() is None
    check = gc.Check(log_dir=str(tmp_path))
    record = gc.sanitizer_step("memcheck")(check, 60)
    assert record["status"] == "skipped" and "compute-sanitizer not found" in record["skipped"]


def test_unsupported_device_sanitizer_is_a_skipped_step(gc, monkeypatch, tmp_path):
    monkeypatch.setattr(gc, "find_sanitizer", lambda: "/opt/cuda/bin/compute-sanitizer")
    tail = "========= COMPUTE-SANITIZER\n========= Error: Device not supported\n"
    monkeypatch.setattr(gc.Check, "command", lambda self, name, cmd, limit_s, env=None: {
        "step": name, "status": "failed", "rc": 1, "wall_s": 2.0, "cmd": cmd, "log_tail": tail})
    record = gc.sanitizer_step("racecheck")(gc.Check(log_dir=str(tmp_path)), 60)
    assert record["status"] == "skipped" and "Device not supported" in record["skipped"]

    found = "[sanitize] cuda attention: ran fwd+bwd\n========= Invalid __global__ read of size 2 bytes\n"
    monkeypatch.setattr(gc.Check, "command", lambda self, name, cmd, limit_s, env=None: {
        "step": name, "status": "failed", "rc": 3, "wall_s": 2.0, "cmd": cmd, "log_tail": found})
    record = gc.sanitizer_step("memcheck")(gc.Check(log_dir=str(tmp_path)), 60)
    assert record["status"] == "failed" and "reported errors" in record["note"]  # a finding is not a skip


def test_build_uses_a_prebuilt_library_that_fits(gc, monkeypatch, tmp_path):
    info = {"archs": [90], "has_cuda": True, "torch": "2.11.0", "path": "/carried/_C.abi3.so", "size_mib": 20}
    monkeypatch.setattr(gc, "library_candidates", lambda: [("/carried/_C.abi3.so", "carried")])
    monkeypatch.setattr(gc, "judge_library", lambda path, cap: (info, None))
    monkeypatch.setattr(gc.subprocess, "Popen", lambda *a, **k: pytest.fail("nothing may be built"))
    check = gc.Check(log_dir=str(tmp_path), capability=(9, 0))
    record = gc.step_build(check, 300)
    assert record["status"] == "ok" and "nothing built" in record["note"]
    assert check.env["VITKERNELS_LIBRARY"] == "/carried/_C.abi3.so" and check.library == "/carried/_C.abi3.so"


def test_build_without_nvcc_is_skipped_with_the_reason(gc, monkeypatch, tmp_path):
    from vitkernels.cuda import build

    monkeypatch.setattr(gc, "library_candidates", lambda: [("/old/_C.abi3.so", "carried")])
    monkeypatch.setattr(gc, "judge_library", lambda path, cap: (None, "built against torch 2.10.0"))
    monkeypatch.setattr(build, "cuda_toolkit", lambda: "CUDA_HOME is not set and nvcc was not found")
    check = gc.Check(log_dir=str(tmp_path), capability=(9, 0))
    record = gc.step_build(check, 300)
    assert record["status"] == "skipped" and "nvcc was not found" in record["skipped"]
    assert record["unusable_libraries"] == ["built against torch 2.10.0"]
    assert check.env["VITKERNELS_JIT"] == "0"  # the tests do not JIT-build in every worker instead


def test_sanitize_cases_run_on_cpu(gc, capsys):
    """The cases compute-sanitizer runs on the GPU, here on the CPU (Triton's interpreter, the C++ twin), so
    a change of the ops' signatures shows up before a GPU minute is spent on it."""
    assert gc.run_sanitize_cases(device="cpu", dtype="float32") == 0
    out = capsys.readouterr().out
    assert out.count("ran fwd+bwd") + out.count("unavailable") * 4 >= 8, out


# ---------------------------------------------------------------------------------------------------------
# The JSON


def test_results_are_written_after_each_step_and_copied_to_out(gc, monkeypatch, tmp_path):
    out = tmp_path / "out"
    monkeypatch.setenv("OUT", str(out))
    monkeypatch.setattr(gc, "find_sanitizer", lambda: None)
    check = gc.Check(log_dir=str(tmp_path / "logs"))
    (tmp_path / "logs" / "tests_bf16.log").write_text("12 passed\n")
    path = str(tmp_path / "results" / "2026-01-01_nvidia-h200.json")
    results = gc.Results(path, {"device": "NVIDIA H200", "steps": []}, check)
    results.write()
    with open(path) as f:
        assert json.load(f)["partial"] is True
    steps = [gc.Step("memcheck", 120, 40, "", gc.sanitizer_step("memcheck"))]
    records = gc.run_steps(steps, check, budget_s=500, t0=time.time(), on_step=results.write)
    results.write(records, partial=False)
    with open(path) as f:
        saved = json.load(f)
    assert saved["partial"] is False and saved["steps"][0]["status"] == "skipped"
    assert "compute-sanitizer not found" in saved["steps"][0]["skipped"]
    with open(out / "2026-01-01_nvidia-h200.json") as f:
        assert json.load(f) == saved
    assert "12 passed" in (out / "2026-01-01_nvidia-h200_logs.txt").read_text()
    assert len(os.listdir(out)) <= 8


def test_results_path_does_not_overwrite(gc, monkeypatch, tmp_path):
    import datetime

    monkeypatch.setattr(gc, "ROOT", str(tmp_path))
    now = datetime.datetime(2026, 1, 2, 3, 4, 5, tzinfo=datetime.timezone.utc)
    first = gc.results_path("NVIDIA H200", now)
    assert first == str(tmp_path / "benchmarks" / "results" / "2026-01-02_nvidia-h200.json")
    os.makedirs(os.path.dirname(first))
    open(first, "w").close()
    assert gc.results_path("NVIDIA H200", now).endswith("2026-01-02_nvidia-h200_030405.json")


@pytest.mark.parametrize("targets,capability,runs", [
    (["sm_80", "sm_90a", "compute_90"], (9, 0), True), (["sm_80", "sm_90a", "compute_90"], (8, 6), True),
    (["sm_80", "sm_90a", "compute_90"], (10, 0), True), (["sm_90a"], (10, 0), False), (["sm_90a"], (8, 0), False)])
def test_judge_library_reads_the_compiled_targets(gc, monkeypatch, targets, capability, runs):
    """sm_90a code runs on 9.0 only, compute_90 PTX on 9.0 and later, sm_80 code on 8.x (CUDA's rules)."""
    from vitkernels.cuda import build

    info = {"archs": [80, 90], "targets": targets, "has_cuda": True, "torch": "2.11.0"}
    monkeypatch.setattr(build, "describe_library", lambda path: dict(info))
    _, why = gc.judge_library("/carried/_C.abi3.so", capability)
    assert (why is None) == runs, why
    if not runs:
        assert f"{capability[0]}.{capability[1]}" in why and targets[0] in why


def test_gpu_check_runs_every_op(gc):
    """gpu_check keeps its own op list (it must run before vitkernels imports on a fresh machine): the same ops
    as vitkernels.backends.OPS, so a new op's tests and benchmark run on the next GPU."""
    from vitkernels.backends import OPS

    assert sorted(gc.OPS) == sorted(OPS)
