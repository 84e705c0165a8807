"""The static kernel audit (``python -m vitkernels audit``, vitkernels/experiments/audit.py).

The audit compiles what a ViT-B/16 and a ViT-H/14 training step launch (bf16, the default lean blocks, batch
256; ViT-H/14 brings the awkward cases: patch 14, head dim 80) for sm_90a and sm_80, and these tests hold the
kernels to it: every config compiles for both targets, nothing spills on either, shared memory fits a CTA, and
every tl.dot config with >= 4 warps uses wgmma on sm_90a. A failure lists the offending (target, kernel, case,
config) rows. The audit compiles, so it runs in a subprocess without
TRITON_INTERPRET (this process may hold the interpreter's kernels), with its Triton cache under tmp_path.
About 2-3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest

from vitkernels.backends import OPS
from vitkernels.experiments import audit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_90a", "sm_80")


def _env(tmp) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TRITON_CACHE_DIR"] = str(tmp / "triton")
    return env


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """(rows, first-step counts) of the audit of ViT-B/16 and ViT-H/14 bf16 training steps on both targets. Run once per
    session: pytest-xdist workers share the result through a lock in the session's common temporary
    directory (without xdist, the parent of basetemp outlives the session, so basetemp itself is used)."""
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "vitkernels-audit"
    with open(shared / "vitkernels-audit.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "audit.jsonl").is_file():
            out.mkdir(exist_ok=True)
            cmd = [sys.executable, "-m", "vitkernels", "audit", "--arch", ",".join(ARCHS), "--dtypes", "bf16",
                   "--models", "vit_base_patch16_224,vit_huge_patch14_224", "--paths", "lean", "--out", str(out),
                   "--cache-dir", str(out / "triton"), "--jobs", "2", "--quiet"]
            proc = subprocess.run(cmd, cwd=ROOT, env=_env(out), capture_output=True, text=True, timeout=1200)
            assert proc.returncode == 0, f"the audit failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    lines = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert (out / "audit.md").read_text().startswith("# Static kernel audit")
    return [x for x in lines if "kernel" in x], [x["first_step"] for x in lines if "first_step" in x]


def _listing(rows, detail) -> str:
    seen = dict.fromkeys(f"  {r['arch']} {r['kernel']} {r['case']} {r['config']}: {detail(r)}" for r in rows)
    return f"{len(seen)} config(s):\n" + "\n".join(seen)


def test_a_training_step_launches_the_ops_of_a_block_forward_and_backward(audited):
    rows, _ = audited
    assert {r["arch"] for r in rows} == set(ARCHS)
    ops = {r["op"] for r in rows}
    assert ops <= {f"{op}_{which}" for op in OPS for which in ("fwd", "bwd")}, ops
    assert {op.replace("_fwd", "_bwd") for op in ops if op.endswith("_fwd")} <= ops, ops  # every op's backward
    assert {op.rsplit("_", 1)[0] for op in ops} >= {"patch_embed", "ln_linear", "linear", "ln_mlp", "layer_norm"}
    cases = {r["case"] for r in rows}
    for case in ("fwd_qkv", "fwd_proj", "fwd_fc1", "fwd_fc2", "bwd_dw_qkv", "bwd_dw_proj", "bwd_dw_fc1",
                 "bwd_dw_fc2", "bwd_dx_qkv", "bwd_dx_fc2", "fwd_patch_embed", "bwd_dw_patch_embed"):
        assert case in cases, sorted(cases)
    assert any("attention" in case for case in cases), sorted(cases)


def test_every_config_compiles_for_both_targets(audited):
    rows, _ = audited
    bad = [r for r in rows if not r["ok"]]
    assert not bad, "configs that do not compile: " + _listing(bad, lambda r: r["error"][:200])


def test_no_config_spills_on_either_target(audited):
    """Nothing spills on sm_90a or sm_80: a tile that spills on a target is pruned there (the autotuners'
    ``early_config_prune`` rules read the device's compute capability)."""
    rows, _ = audited
    bad = [r for r in rows if r["ok"] and (r["spill_stores"] or r["spill_loads"])]
    assert not bad, "configs that spill: " + _listing(
        bad, lambda r: f"{r['regs']} regs, {r['spill_stores']} B spill stores / {r['spill_loads']} B loads")


def test_shared_memory_fits_a_cta(audited):
    rows, _ = audited
    limit = {a: audit.ARCHS[a].smem_per_cta for a in ARCHS}
    bad = [r for r in rows if r["ok"] and r["shared"] > limit[r["arch"]]]
    assert not bad, "configs over the per-CTA shared memory limit: " + _listing(
        bad, lambda r: f"{r['shared']} B > {limit[r['arch']]} B")


def test_gemm_configs_with_four_warps_use_wgmma_on_sm90a(audited):
    rows, _ = audited
    gemm = [r for r in rows if r["ok"] and r["arch"] == "sm_90a" and r["dot"] and r["num_warps"] >= 4]
    assert gemm
    bad = [r for r in gemm if not r["wgmma"]]
    assert not bad, "tl.dot configs with >= 4 warps and no wgmma on sm_90a: " + _listing(
        bad, lambda r: f"{r['mma_sync']} mma.sync")


def test_first_step_compile_count(audited):
    rows, counts = audited
    assert {c["arch"] for c in counts} == set(ARCHS)
    for c in counts:
        mine = [r for r in rows if (r["arch"], r["model"], r["path"]) == (c["arch"], c["model"], c["path"])]
        assert c["compiles"] == len({r["compile_key"] for r in mine})
        assert c["benchmark_runs"] >= c["autotune_keys"] > 0
        assert c["launches"] > c["compiles"] / 8  # every block's launches, counted


def test_capture_runs_the_real_launcher_and_launches_nothing(tmp_path):
    """The linear launcher at a tiny shape, on the stand-in GPU: its kernels, configs and grids are recorded,
    the patches are gone afterwards."""
    script = textwrap.dedent("""
        import json, triton, torch
        from triton.runtime.jit import JITFunction
        from vitkernels.experiments import audit
        run = JITFunction.run
        with audit.StandInGPU(audit.ARCHS["sm_90a"]) as gpu:
            from vitkernels.triton import linear as L
            x, w, b = gpu.tensor((100, 64)), gpu.tensor((96, 64)), gpu.tensor((96,))
            y, z = gpu.call(L.linear_fwd, x, w, b, None, "gelu", True)
            assert y.is_cuda and y.shape == (100, 96) and z.shape == (100, 96)
            gpu.call(L.linear_bwd, y, x, w, z, "gelu", True, True, True)
        assert JITFunction.run is run and not torch.cuda.is_initialized()
        print(json.dumps({"launches": [
            {"kernel": l.kernel, "dims": l.dims, "tuner": l.tuner and l.tuner["pruned"],
             "variants": [[v.constexprs, v.grid] for v in l.variants]} for l in gpu.launches],
            "configs": len(L._gpu_configs())}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=_env(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = [launch["kernel"] for launch in found["launches"]]
    # forward: one GEMM (bias + GELU + z); backward: dz = dy * GELU'(z) with db partials, dx, dW
    assert kernels == ["_linear_gemm_kernel", "_linear_bwd_dz_kernel", "_linear_gemm_kernel",
                       "_linear_gemm_kernel"], kernels
    fwd = found["launches"][0]
    assert fwd["dims"]["P"] == 100 and fwd["dims"]["Q"] == 96 and fwd["dims"]["S"] == 64
    assert 1 <= fwd["tuner"] == len(fwd["variants"]) <= found["configs"]
    for constexprs, grid in fwd["variants"]:
        assert constexprs["GELU"] and constexprs["SAVE_Z"] and constexprs["HAS_BIAS"] and not constexprs["HAS_RES"]
        assert constexprs["EVEN_S"] == (64 % constexprs["BLOCK_S"] == 0)  # the kernel's heuristic, applied
        assert grid == [math.ceil(100 / constexprs["BLOCK_P"]) * math.ceil(96 / constexprs["BLOCK_Q"]), 1, 1]
    dz = found["launches"][1]
    assert dz["tuner"] is None and len(dz["variants"]) == 1 and dz["dims"]["R"] == 100


def test_occupancy_and_waves():
    h100, a100 = audit.ARCHS["sm_90a"], audit.ARCHS["sm_80"]
    # 128 regs x 4 warps: 16 warps' registers per SM -> 4 CTAs; 1 KB reserved per CTA leaves room for them
    assert audit.occupancy(128, 0, 4, h100) == (4, "regs")
    # 255 regs round up to 256 per thread: 8 warps per SM, one 8-warp CTA
    assert audit.occupancy(255, 64 * 1024, 8, h100) == (1, "regs")
    # 24 regs x 4 warps: registers for 21 such CTAs, but 2048 threads per SM allow 16
    assert audit.occupancy(24, 0, 4, h100) == (16, "threads")
    # 40 regs: 1280 per warp (units of 256) -> 51 warps -> 12 CTAs of 4 warps
    assert audit.occupancy(40, 0, 4, h100) == (12, "regs")
    # shared memory: 100 KB (+1 KB) -> 2 CTAs in 228 KB, 1 in 164 KB; over the per-CTA limit -> none
    assert audit.occupancy(64, 100 * 1024, 4, h100) == (2, "smem")
    assert audit.occupancy(64, 100 * 1024, 4, a100) == (1, "smem")
    assert audit.occupancy(64, 200 * 1024, 4, a100) == (0, "smem")
    assert audit.waves(264, 1, 132) == 2.0
    assert audit.waves(132, 2, 132) == 0.5
    assert audit.waves(10, 0, 132) == math.inf
    row = dict(ok=True, spill_stores=0, spill_loads=0, dot=True, num_warps=8, dtype="bf16", wgmma=4,
               shared=1024, role="dw", waves=1.5)
    assert audit.flags(row, h100) == ["WAVES<2"]
    assert audit.flags(dict(row, waves=2.0, wgmma=0, spill_loads=8), h100) == ["SPILL", "NO-WGMMA"]
    assert audit.flags(dict(row, waves=2.0, wgmma=0), a100) == []  # no wgmma on sm_80
    assert audit.flags(dict(row, waves=2.0, shared=228 * 1024), h100) == ["SMEM"]


@pytest.mark.parametrize("argv, message", [
    (["--arch", "sm_70"], "unknown arch sm_70"),
    (["--dtypes", "fp8"], "unknown dtype fp8"),
    (["--models", "vit_tiny"], "unknown model vit_tiny"),
    (["--paths", "fast"], "unknown path fast"),
    (["--batch", "0"], "--batch must be a positive integer"),
])
def test_bad_arguments_are_one_line_errors(argv, message, capsys):
    from vitkernels.__main__ import main

    assert main(["audit", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_missing_triton_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # restored afterwards: the audit drops it
    monkeypatch.setitem(sys.modules, "triton", None)
    with pytest.raises(ImportError, match="needs the package 'triton'"):
        audit._import_triton()
