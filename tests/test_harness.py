"""The benchmark harness's plumbing on the CPU, with a fake timer: providers x modes x cases, the rows and their
units, skipped providers with the reason, the metadata row; and every benchmarks/bench_<op>.py's cases run
through it at small sizes. No timing is real here: the benchmarks themselves refuse to run without a GPU."""

from __future__ import annotations

import importlib
import json
import os
import sys

import pytest
import torch

from vitkernels.backends import OPS  # every op has its benchmarks/bench_<op>.py
from vitkernels.experiments import harness

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CPU = torch.device("cpu")


class FakeTimer:
    """Calls the timed function twice (as a real timer would, at least) and reports fixed quantiles."""

    def __init__(self, ms: float = 2.0):
        self.ms, self.calls = ms, 0

    def __call__(self, fn, grad_to_none):
        for _ in range(2):
            for t in grad_to_none:
                t.grad = None
            fn()
        self.calls += 1
        return self.ms, 0.9 * self.ms, 1.1 * self.ms


def bench_module(op: str):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        return importlib.import_module(f"bench_{op}")
    finally:
        sys.path.remove(os.path.join(ROOT, "benchmarks"))


def _tiny_layer_norm() -> harness.Case:
    def inputs(device, dtype):
        x = torch.randn(7, 48, device=device, dtype=dtype, requires_grad=True)
        w = torch.ones(48, device=device, dtype=dtype, requires_grad=True)
        return (x, w, None), dict(eps=1e-6)

    return harness.Case("tiny", dict(R=7, C=48), inputs, flops={"fwd": 1e9}, bytes={"fwd": 2e9, "bwd": 3e9})


def test_rows_cover_every_provider_and_mode_with_units_and_reasons():
    def broken(*args, **kwargs):
        raise RuntimeError("unsupported shape (simulated)\nsecond line")

    providers = {**harness.op_providers("layer_norm"), "broken": broken}
    providers = harness.select(providers, "torch,triton,cuda,broken")
    timer = FakeTimer(ms=2.0)
    rows = harness.run([_tiny_layer_norm()], providers, dtype="fp32", device=CPU, timer=timer)
    assert [(r["provider"], r["mode"]) for r in rows] == [(p, m) for p in providers for m in harness.MODES]
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in harness.MODES:
        r = by["torch", mode]
        assert r["skipped"] is None and r["ms"] == 2.0 and (r["ms_p20"], r["ms_p80"]) == (1.8, 2.2)
        assert r["case"] == "tiny" and r["R"] == 7 and r["C"] == 48 and r["speedup"] == 1.0
        assert by["triton", mode]["skipped"] == "no GPU; the Triton interpreter is for tests"
        assert by["cuda", mode]["skipped"] == "no GPU; the extension's C++ CPU twin is for tests"
        assert by["broken", mode]["skipped"] == "failed: RuntimeError: unsupported shape (simulated)"
        assert by["broken", mode]["ms"] is None and by["broken", mode]["speedup"] is None
    assert by["torch", "fwd"]["tflops"] == pytest.approx(1e9 / 2e-3 / 1e12)
    assert by["torch", "fwd"]["gbs"] == pytest.approx(2e9 / 2e-3 / 1e9)
    assert by["torch", "bwd"]["tflops"] is None and by["torch", "fwd+bwd"]["gbs"] is None  # no formula given
    assert timer.calls == 3  # one per mode, for the one provider that ran
    assert all(harness.format_row(r) for r in rows)


def test_modes_time_what_they_say():
    seen = []

    def op(x, w):
        seen.append(torch.is_grad_enabled())
        return x * w

    x = torch.randn(5, requires_grad=True)
    w = torch.randn(5, requires_grad=True)
    grads = {}

    def timer(fn, grad_to_none):
        out = fn()
        if isinstance(out, tuple):  # bwd: autograd.grad's result
            grads["bwd"] = out
        grads.setdefault("reset", list(grad_to_none))
        return 1.0, 1.0, 1.0

    seen.clear()
    harness.time_modes(op, (x, w), {}, ("fwd",), timer)
    assert seen == [False, False]  # warm-up + the timed call, both under no_grad
    seen.clear()
    harness.time_modes(op, (x, w), {}, ("bwd",), timer)
    assert seen == [True]  # one forward, the backward alone is timed
    assert len(grads["bwd"]) == 2 and grads["reset"] == []
    del grads["reset"]
    seen.clear()
    harness.time_modes(op, (x, w), {}, ("fwd+bwd",), timer)
    assert seen == [True, True, True] and grads["reset"] == [x, w]  # forward each time; grads reset
    assert x.grad is not None and w.grad is not None


def test_select_and_the_metadata_row():
    providers = harness.op_providers("linear")
    assert list(harness.select(providers, None)) == ["torch", "triton", "cuda"]  # compile only by name
    assert list(harness.select(providers, "compile, torch")) == ["compile", "torch"]
    with pytest.raises(ValueError, match="unknown provider"):
        harness.select(providers, "torch,nope")
    meta = harness.metadata(CPU, op="linear", dtype="bf16")
    assert set(meta) >= {"device", "date", "commit", "versions", "op", "dtype"}
    assert meta["device"].startswith("cpu") and meta["versions"]["torch"] == torch.__version__


@pytest.mark.parametrize("op", OPS)
def test_bench_scripts_refuse_without_a_gpu(op, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    bench = bench_module(op)
    assert bench.main([]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


def _small_cases(op: str, monkeypatch) -> list[harness.Case]:
    bench = bench_module(op)
    if op == "layer_norm":
        return bench.cases(batch=1, C=40, elem=4)
    if op == "linear":
        monkeypatch.setitem(bench.CASES, "fc1", (24, 40, "gelu", False))
        monkeypatch.setitem(bench.CASES, "fc2", (40, 24, None, True))
        return [bench.case("fc1", 1), bench.case("fc2", 1)]
    if op == "attention":
        monkeypatch.setitem(bench.CASES, "tiny", (2, 3, 13, 16))
        return [bench.case("tiny")]
    if op == "attention_qkv":
        monkeypatch.setitem(bench.CASES, "tiny", (2, 3, 13, 16))
        return [bench.case("tiny")]
    if op == "ln_linear":
        monkeypatch.setitem(bench.CASES, "tiny", (24, 40))
        return [bench.case("tiny", 1)]
    if op == "ln_mlp":
        monkeypatch.setitem(bench.CASES, "tiny", (24, 40))
        return [bench.case("tiny", 1)]
    if op == "glu_linear":
        monkeypatch.setitem(bench.CASES, "tiny", (24, 40, "silu"))
        return [bench.case("tiny", 1)]
    if op == "ln_glu_mlp":
        monkeypatch.setitem(bench.CASES, "tiny", (24, 40, "silu"))
        return [bench.case("tiny", 1)]
    if op == "rope":
        monkeypatch.setitem(bench.CASES, "tiny", (2, 3, 13, 16, 1))
        return [bench.case("tiny", 4)]
    return bench.cases(batch=2, img=16, P=8, D=24, C=3)


@pytest.mark.parametrize("op", OPS)
def test_bench_cases_run_through_the_harness(op, monkeypatch):
    bench = bench_module(op)
    providers = {"torch": harness.op_providers(op)["torch"]}
    if op == "attention":
        providers.update(bench.sdpa_providers())
    cases = _small_cases(op, monkeypatch)
    rows = harness.run(cases, providers, dtype="fp32", device=CPU, timer=FakeTimer())
    assert len(rows) == len(cases) * len(providers) * len(harness.MODES)
    torch_rows = [r for r in rows if r["provider"] == "torch"]
    assert all(r["skipped"] is None for r in torch_rows), [r["skipped"] for r in torch_rows]
    assert all(r["tflops"] is not None or r["gbs"] is not None for r in torch_rows)  # every mode has a formula
    json.dumps(rows)  # rows are plain JSON


@pytest.mark.parametrize("op", OPS)
def test_bench_help(op, capsys):
    with pytest.raises(SystemExit) as exc:
        bench_module(op).main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--providers" in out and "--modes" in out and "--out" in out
