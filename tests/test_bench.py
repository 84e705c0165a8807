"""``python -m vitkernels bench`` on the CPU: JSON with every field, skipped rows with their reasons, bad input."""

import json

import pytest
import torch

from vitkernels.experiments import bench

FIELDS = ("provider", "mode", "model", "img_size", "batch_size", "dtype", "img_per_s", "ms_per_step", "tflops",
          "mfu", "peak_mem_mb", "speedup_vs_eager", "skipped", "ms_min", "ms_max", "spread_pct")
TINY = ["--model", "vit_tiny_patch16_224", "--img-size", "16", "--patch-size", "8", "--depth", "1",
        "--embed-dim", "32", "--num-heads", "2", "--batch-size", "2", "--dtype", "fp32", "--repeats", "2",
        "--iters", "1", "--warmup", "1", "--device", "cpu"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU rows (triton/cuda skipped without a GPU)")
def test_cpu_bench_writes_json(tmp_path, capsys):
    out = tmp_path / "bench.json"
    providers = "timm-eager,vitkernels-torch,vitkernels-triton,vitkernels-cuda"
    assert bench.main(TINY + ["--providers", providers, "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert set(report) >= {"device", "date", "commit", "versions", "results"}
    assert report["versions"]["torch"] == torch.__version__
    rows = report["results"]
    expected = [(p, m) for m in ("train", "infer") for p in providers.split(",")]
    assert [(r["provider"], r["mode"]) for r in rows] == expected
    for r in rows:
        assert set(FIELDS) <= set(r), set(FIELDS) - set(r)
        assert r["batch_size"] == 2 and r["dtype"] == "fp32" and r["img_size"] == 16
    by = {(r["provider"], r["mode"]): r for r in rows}
    for mode in ("train", "infer"):
        assert by[("vitkernels-triton", mode)]["skipped"] == "no GPU; the Triton interpreter is for tests"
        assert "no GPU" in by[("vitkernels-cuda", mode)]["skipped"]
        for provider in ("timm-eager", "vitkernels-torch"):
            r = by[(provider, mode)]
            assert r["skipped"] is None, r["skipped"]
            assert r["img_per_s"] > 0 and r["ms_per_step"] > 0 and r["tflops"] > 0
            assert r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
            assert r["mfu"] is None and r["peak_mem_mb"] is None  # CPU
        assert by[("timm-eager", mode)]["speedup_vs_eager"] == pytest.approx(1.0)
        assert by[("vitkernels-triton", mode)]["img_per_s"] is None
    train, infer = by[("timm-eager", "train")], by[("timm-eager", "infer")]
    assert train["flops_per_image"] == 3 * infer["flops_per_image"]
    printed = capsys.readouterr().out
    assert "skipped: no GPU; the Triton interpreter is for tests" in printed and "timm-eager" in printed


def test_bad_provider_and_model(capsys):
    assert bench.main(TINY + ["--providers", "timm-eager,nope"]) == 2
    assert "unknown provider" in capsys.readouterr().err
    assert bench.main(TINY[2:] + ["--model", "vit_nope"]) == 2
    assert "unknown model 'vit_nope'" in capsys.readouterr().err


def test_failing_provider_is_a_skipped_row(monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(bench, "time_provider", boom)
    args = bench.build_parser().parse_args(TINY + ["--providers", "vitkernels-torch", "--mode", "train"])
    args.verbose = False
    (row,) = bench.run(args)["results"]
    assert row["skipped"] == "failed: RuntimeError: out of memory (simulated)" and row["img_per_s"] is None
