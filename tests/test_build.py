"""vitkernels/cuda/build.py without building anything: the GPU targets of an arch list (sm_90a by default) and
whether a library's targets run on a GPU, the JIT build directory's name, the JIT build lock (stale locks
broken, held locks waited on with a bound, never silently), the nvcc / torch CUDA major check, where a built
library is looked for, and that the built library does not depend on Python."""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import subprocess
import threading
import time
import types

import pytest
import torch
from torch.utils import cpp_extension

from vitkernels.cuda import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------------------
# GPU targets: what TORCH_CUDA_ARCH_LIST builds, and where the result runs


def test_default_arch_list_builds_sm80_and_sm90a_with_ptx(monkeypatch):
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert build.cuda_arch_list() == ["8.0", "9.0"]
    assert build.cuda_targets() == ["sm_80", "sm_90a", "compute_90"]
    kw = build.extension_kwargs(root=REPO, with_cuda=True)
    nvcc = kw["extra_compile_args"]["nvcc"]
    assert [f for f in nvcc if f.startswith("-gencode")] == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90a,code=sm_90a",    # Hopper's arch-specific code, for H100 / H200
        "-gencode=arch=compute_90,code=compute_90",  # PTX: what a newer GPU's driver compiles
    ]
    cxx = kw["extra_compile_args"]["cxx"]
    assert "-DVK_CUDA_ARCHS=80,90" in cxx  # compiled_archs(): 90 for sm_90a (what gpu_check compares)
    assert "-DVK_CUDA_TARGETS=sm_80,sm_90a,compute_90" in cxx  # compiled_targets()


@pytest.mark.parametrize("arch_list, targets, archs", [
    ("9.0a", ["sm_90a"], "90"),                        # the carried library for an H100 / H200: no PTX
    ("8.0;9.0+PTX", ["sm_80", "sm_90a", "compute_90"], "80,90"),
    ("9.0a+PTX", ["sm_90a", "compute_90"], "90"),      # PTX of plain compute_90: compute_90a runs on 9.0 only
    ("8.0 8.6+PTX", ["sm_80", "sm_86", "compute_86"], "80,86"),
    ("8.0;9.0;9.0a", ["sm_80", "sm_90a", "compute_90"], "80,90"),  # no duplicates
])
def test_arch_list_entries(monkeypatch, arch_list, targets, archs):
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", arch_list)
    assert build.cuda_targets() == targets
    kw = build.extension_kwargs(root=REPO, with_cuda=True)
    gencode = [f for f in kw["extra_compile_args"]["nvcc"] if f.startswith("-gencode")]
    assert gencode == build.gencode_flags(targets) and len(set(gencode)) == len(gencode)
    assert f"-DVK_CUDA_ARCHS={archs}" in kw["extra_compile_args"]["cxx"]


def test_torch_adds_no_arch_flags_of_its_own(monkeypatch):
    """torch.utils.cpp_extension (2.11 and 2.14 alike) adds its own -gencode flags unless the nvcc flags hold an
    "arch" flag; ours do, so "9.0" is never read as torch reads it (sm_90 code only). torch also accepts "9.0a"
    in TORCH_CUDA_ARCH_LIST, for builds that leave the flags to it."""
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    nvcc = build.extension_kwargs(root=REPO, with_cuda=True)["extra_compile_args"]["nvcc"]
    assert cpp_extension._get_cuda_arch_flags(nvcc) == []
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0a")
    assert cpp_extension._get_cuda_arch_flags([]) == ["-gencode=arch=compute_90a,code=sm_90a"]


@pytest.mark.parametrize("targets, capability, runs", [
    (["sm_80", "sm_90a", "compute_90"], (9, 0), True),    # H100 / H200: the sm_90a code
    (["sm_80", "sm_90a", "compute_90"], (8, 0), True),    # A100
    (["sm_80", "sm_90a", "compute_90"], (8, 9), True),    # L4 / L40: sm_80 code runs on 8.x
    (["sm_80", "sm_90a", "compute_90"], (10, 0), True),   # B200: the compute_90 PTX, compiled by the driver
    (["sm_80", "sm_90a", "compute_90"], (7, 5), False),   # T4: older than everything held
    (["sm_90a"], (9, 0), True),                           # a --build-library 9.0a library on an H100
    (["sm_90a"], (10, 0), False),                         # arch-specific code runs on its own arch only
    (["sm_90a"], (8, 0), False),
    (["sm_90"], (9, 0), True),                            # an older build's plain sm_90
    (["sm_80"], (9, 0), False),                           # GPU code never crosses a major version
    (["compute_90a"], (10, 0), False),
    ([], (9, 0), False),                                  # the CPU twin only
])
def test_why_not_for_gpu(targets, capability, runs):
    why = build.why_not_for_gpu(targets, capability)
    if runs:
        assert why is None
    else:
        assert why is not None and f"sm_{capability[0]}{capability[1]}" in why, why


def test_nvcc_flags_are_the_builds(monkeypatch):
    """tests/test_cuda_ptxas.py compiles with nvcc_flags(): the extension's own nvcc flags, torch's common
    flags and defines, its default C++ standard (c++17 in torch 2.11, c++20 in 2.14) and include directories."""
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.delenv("CC", raising=False)
    flags = build.nvcc_flags(["sm_90a"])
    own = build.extension_kwargs(root=REPO, with_cuda=True)["extra_compile_args"]["nvcc"]
    assert [f for f in own if not f.startswith("-gencode")] == ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    assert [f for f in flags if f.startswith("-gencode")] == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert set(cpp_extension.COMMON_NVCC_FLAGS) | {"-O3", "-lineinfo", "-DTORCH_API_INCLUDE_EXTENSION_H"} <= set(flags)
    includes = [f[2:] for f in flags if f.startswith("-I")]
    aten = [os.path.join(p, "ATen", "ATen.h") for p in includes if os.path.exists(os.path.join(p, "ATen", "ATen.h"))]
    assert aten, includes
    std = [f for f in flags if f.startswith("-std=")]
    needs_cxx20 = "C++20 or later" in open(aten[0]).read()  # torch 2.14's headers say so; 2.11's build c++17
    assert std == (["-std=c++20"] if needs_cxx20 else ["-std=c++17"]), std
    assert [f for f in build.nvcc_flags() if f.startswith("-gencode")] == build.gencode_flags(build.cuda_targets())


# ---------------------------------------------------------------------------------------------------------
# The JIT build directory


def test_jit_name_is_specific_to_torch_and_flags(monkeypatch):
    kw = build.extension_kwargs(root=REPO, with_cuda=False)
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    old = build.jit_name(False, kw)
    assert re.fullmatch(r"vitkernels_C_cpu_2_11_0_cu130_[0-9a-f]{8}", old), old
    assert build.jit_name(False, kw) == old  # stable: the same environment finds its cached build

    monkeypatch.setattr(torch, "__version__", "2.14.1+cu130")
    new = build.jit_name(False, kw)
    assert new.startswith("vitkernels_C_cpu_2_14_1_cu130_") and new != old

    flagged = {**kw, "extra_compile_args": {"cxx": kw["extra_compile_args"]["cxx"] + ["-DVK_EXTRA"],
                                            "nvcc": kw["extra_compile_args"]["nvcc"]}}
    assert build.jit_name(False, flagged) != new

    monkeypatch.setattr(torch.version, "cuda", "12.8")
    assert build.jit_name(False, kw) != new


def test_jit_build_dir_under_torch_extensions_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    path = build.jit_build_dir("vitkernels_C_cpu_x_12345678")
    assert path == str(tmp_path / "vitkernels_C_cpu_x_12345678") and os.path.isdir(path)


# ---------------------------------------------------------------------------------------------------------
# The JIT build lock


def _lock(tmp_path, age_s: float) -> str:
    path = tmp_path / "lock"
    path.write_text("")
    then = time.time() - age_s
    os.utime(path, (then, then))
    return str(path)


def test_stale_lock_is_broken_with_a_warning(tmp_path):
    path = _lock(tmp_path, age_s=1000)
    t0 = time.monotonic()
    with pytest.warns(RuntimeWarning, match=r"removing the stale JIT build lock .*lock \(1000 s old"):
        build.wait_for_build_lock(str(tmp_path), stale_s=900, timeout_s=30, kind="baton")
    assert not os.path.exists(path)
    assert time.monotonic() - t0 < 5


def test_stale_threshold_from_environment(tmp_path, monkeypatch):
    path = _lock(tmp_path, age_s=120)
    monkeypatch.setenv("VITKERNELS_JIT_LOCK_STALE_S", "60")
    with pytest.warns(RuntimeWarning, match="stale"):
        build.wait_for_build_lock(str(tmp_path), timeout_s=30, kind="baton")
    assert not os.path.exists(path)


def _wait_in_thread(**kwargs) -> Exception | None:
    """wait_for_build_lock in a thread, so that a wait that never ends fails the test instead of hanging it."""
    raised = []

    def wait():
        try:
            build.wait_for_build_lock(**kwargs)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            raised.append(exc)

    thread = threading.Thread(target=wait, daemon=True)
    thread.start()
    thread.join(timeout=10)
    assert not thread.is_alive(), "wait_for_build_lock was still waiting after 10 s"
    return raised[0] if raised else None


def test_held_lock_prints_what_it_waits_for_and_gives_up(tmp_path, capsys):
    path = _lock(tmp_path, age_s=5)
    t0 = time.monotonic()
    exc = _wait_in_thread(build_dir=str(tmp_path), stale_s=900, timeout_s=0.5, kind="baton", poll_s=0.1)
    assert isinstance(exc, RuntimeError) and f"rm {path}" in str(exc), exc
    waited = time.monotonic() - t0
    assert 0.4 <= waited < 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and path in err and "s old" in err and f"rm {path}" in err
    assert os.path.exists(path)  # a fresh lock is never broken


def test_released_lock_ends_the_wait(tmp_path, monkeypatch):
    path = _lock(tmp_path, age_s=0)
    sleeps = []

    def sleep(s):  # the other build finishes during the first wait
        sleeps.append(s)
        os.remove(path)

    monkeypatch.setattr(build.time, "sleep", sleep)
    build.wait_for_build_lock(str(tmp_path), stale_s=900, timeout_s=60, kind="baton")
    assert len(sleeps) == 1


def test_flock_lock_held_by_a_live_holder(tmp_path):
    path = _lock(tmp_path, age_s=10_000)  # old, but held: never broken in flock mode
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert build.lock_held(path, "flock")
        exc = _wait_in_thread(build_dir=str(tmp_path), stale_s=900, timeout_s=0.3, kind="flock", poll_s=0.1)
        assert isinstance(exc, RuntimeError) and f"rm {path}" in str(exc), exc
        assert os.path.exists(path)
    finally:
        os.close(fd)
    assert not build.lock_held(path, "flock")  # the file is left behind, but nobody holds it
    build.wait_for_build_lock(str(tmp_path), timeout_s=0.1, kind="flock")  # returns at once


def test_lock_kind_follows_torch(monkeypatch):
    def baton_style(build_directory):
        baton = FileBaton(os.path.join(build_directory, "lock"))  # noqa: F821 - only its source is read
        return baton

    def flock_style(build_directory):
        with FileLock(os.path.join(build_directory, "lock")):  # noqa: F821
            pass

    monkeypatch.setattr(cpp_extension, "_jit_compile", baton_style)
    assert build.torch_lock_kind() == "baton"
    monkeypatch.setattr(cpp_extension, "_jit_compile", flock_style)
    assert build.torch_lock_kind() == "flock"
    monkeypatch.setattr(cpp_extension, "_jit_compile", len)  # no source: the cautious reading
    assert build.torch_lock_kind() == "baton"


# ---------------------------------------------------------------------------------------------------------
# nvcc against torch's CUDA


@pytest.fixture
def fake_nvcc(monkeypatch, tmp_path):
    """A CUDA_HOME whose nvcc says the release given to the returned function."""
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "nvcc").write_text("")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))
    build.nvcc_version.cache_clear()
    said = {}

    def run(cmd, **kwargs):
        assert cmd == [str(tmp_path / "bin" / "nvcc"), "--version"]
        return types.SimpleNamespace(stdout=said["text"], stderr="", returncode=0)

    monkeypatch.setattr(build.subprocess, "run", run)

    def set_release(text):
        said["text"] = text
        build.nvcc_version.cache_clear()

    yield set_release
    build.nvcc_version.cache_clear()


def test_nvcc_major_mismatch_gives_the_reason(monkeypatch, fake_nvcc):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    fake_nvcc("nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 12.8, V12.8.93\n")
    why = build.cuda_toolkit()
    assert why is not None and "nvcc 12.8" in why and "CUDA 13.0" in why and "major" in why
    assert build.extension_kwargs(root=REPO)["with_cuda"] is False  # setup.py and the JIT build the CPU twin
    assert build._jit_with_cuda() is False

    fake_nvcc("Cuda compilation tools, release 13.2, V13.2.1\n")  # same major: torch only warns
    assert build.cuda_toolkit() is None
    fake_nvcc("no version here")
    assert "did not say" in build.cuda_toolkit()
    monkeypatch.setattr(torch.version, "cuda", None)
    assert "not a CUDA build" in build.cuda_toolkit()


def test_missing_nvcc_gives_the_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(tmp_path))  # no bin/nvcc there
    assert "nvcc was not found" in build.cuda_toolkit()


# ---------------------------------------------------------------------------------------------------------
# Which library is loaded


def test_library_candidates(monkeypatch, tmp_path):
    old, new = tmp_path / "_C.cpython-311-x86_64-linux-gnu.so", tmp_path / "_C.abi3.so"
    for i, path in enumerate((old, new)):
        path.write_text("")
        os.utime(path, (1000 + i, 1000 + i))
    monkeypatch.setattr(build, "_PACKAGE_DIR", str(tmp_path))
    monkeypatch.delenv("VITKERNELS_LIBRARY", raising=False)
    assert build.library_candidates() == [str(new), str(old)]  # newest first
    monkeypatch.setenv("VITKERNELS_LIBRARY", str(tmp_path / "carried.so"))
    assert build.library_candidates() == [str(tmp_path / "carried.so")]  # the chosen one only
    with pytest.raises(RuntimeError, match=r"no extension library at .*carried.so \(from \$VITKERNELS_LIBRARY\)"):
        build.load_library(str(tmp_path / "carried.so"))


def test_jit_can_be_forbidden(monkeypatch):
    monkeypatch.setenv("VITKERNELS_JIT", "0")
    assert "VITKERNELS_JIT" in build.why_no_jit()


def test_built_library_has_no_python_dependency():
    """The point of the plain-libtorch library: no libpython, no libtorch_python, so one build serves every
    Python version of its torch (the GPU image's 3.12 as well as this 3.11)."""
    libraries = build.library_candidates()
    if not libraries:
        pytest.skip("no built library (setup.py did not build vitkernels/_C*.so)")
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) is not installed")
    dynamic = subprocess.run(["readelf", "-d", libraries[0]], capture_output=True, text=True, check=True).stdout
    needed = re.findall(r"\(NEEDED\)\s+Shared library: \[(.+?)\]", dynamic)
    assert "libtorch_cpu.so" in needed or "libtorch.so" in needed, needed
    assert not [n for n in needed if "python" in n], needed
