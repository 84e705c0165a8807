"""The CUDA kernels compile for every GPU target of the default build (sm_80, sm_90a) and no kernel spills.

Each csrc/*_kernel.cu is compiled device-only (``nvcc -cubin``, no host compiler pass, no GPU needed) with
the flags setup.py's build gives nvcc (``vitkernels.cuda.build.nvcc_flags``: torch's flags, the extension's,
torch's include directories), one GPU target per test, and ``-Xptxas -v``. ptxas reports per kernel (per
template instance: every dtype x head-dim tile of the attention kernels) its registers, spill stores / loads
and static shared memory; every kernel must report zero spill stores and loads. Failures list the kernels.

Skipped, with the reason, where the extension build itself would not compile CUDA (no nvcc / CUDA_HOME, an
nvcc whose major version differs from torch's CUDA, a CPU-only torch). About 25 s per (file, target) for
attention_kernel.cu and less for the others on the 2-core CI machine; the 8 tests spread over pytest-xdist
workers.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess

import pytest

from vitkernels.cuda import build

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "csrc", "*_kernel.cu")))
# GPU code of the default build ("8.0;9.0" -> sm_80, sm_90a; its compute_90 PTX goes through no ptxas here:
# the driver compiles it on a newer GPU).
TARGETS = [t for t in build.cuda_targets(build.DEFAULT_ARCH_LIST.split(";")) if t.startswith("sm_")]


def test_default_build_targets():
    assert TARGETS == ["sm_80", "sm_90a"]
    assert SOURCES, "no csrc/*_kernel.cu found"


def parse_ptxas(log: str) -> dict[str, dict]:
    """Per kernel (mangled name) from ``ptxas -v``: regs, spill_stores, spill_loads, stack, smem (static)."""
    kernels: dict[str, dict] = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["regs"] = int(m.group(1))
            smem = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(smem.group(1)) if smem else 0
    return kernels


def test_parse_ptxas():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90a'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 64 registers, used 1 barriers, 2112 bytes smem
ptxas info    : Compiling entry function '_Z3barv' for 'sm_90a'
ptxas info    : Function properties for _Z3barv
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 29 registers
"""
    assert parse_ptxas(log) == {
        "_Z3fooPf": dict(stack=8, spill_stores=4, spill_loads=8, regs=64, smem=2112),
        "_Z3barv": dict(stack=0, spill_stores=0, spill_loads=0, regs=29, smem=0),
    }


def readable(names: list[str]) -> dict[str, str]:
    """Mangled -> demangled kernel names (c++filt), shortened; the mangled name where c++filt is missing."""
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    short = [re.sub(r"^void |vitkernels::\(anonymous namespace\)::|\(.*", "", d) for d in out]
    return dict(zip(names, short)) if len(short) == len(names) else {n: n for n in names}


@pytest.fixture(scope="module")
def nvcc():
    why = build.cuda_toolkit()
    if why is not None:
        pytest.skip(f"the extension build would not compile CUDA here: {why}")
    from torch.utils.cpp_extension import CUDA_HOME

    return os.path.join(CUDA_HOME, "bin", "nvcc")


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("source", SOURCES)
def test_kernels_compile_without_spills(nvcc, source, target, tmp_path):
    cmd = [nvcc, *build.nvcc_flags([target]), "-Xptxas", "-v", "-cubin", "-o", str(tmp_path / f"{target}.cubin"),
           os.path.join(REPO, "csrc", source)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    log = p.stdout + p.stderr
    assert p.returncode == 0, f"nvcc failed for {source} ({target}):\n{log[-4000:]}\ncommand: {' '.join(cmd)}"
    kernels = parse_ptxas(log)
    assert kernels, f"ptxas -v reported no kernel for {source} ({target}):\n{log[-2000:]}"
    missing = [k for k, info in kernels.items() if "regs" not in info or "spill_stores" not in info]
    assert not missing, f"unparsed ptxas report for {missing} in:\n{log[-2000:]}"
    names = readable(list(kernels))
    spilling = [f"{names[k]}: {info['regs']} regs, {info['spill_stores']} B spill stores, {info['spill_loads']} B "
                f"spill loads" for k, info in kernels.items() if info["spill_stores"] or info["spill_loads"]]
    assert not spilling, f"{source} spills on {target}:\n  " + "\n  ".join(spilling)
