"""Benchmark the Triton flash attention against F.scaled_dot_product_attention's backends (GPU only).

Shapes (bf16 by default), q/k/v as strided (B, H, N, D) views of one (B, N, 3, H, D) qkv buffer, exactly as
the model passes them, for every implementation:
    vit_b16   B=256, H=12, N=197, D=64      (target: fwd >= 1.1x, bwd >= 1.0x the best SDPA backend)
    vit_h14   B=64,  H=16, N=257, D=80
Implementations: ``triton`` (vitkernels.triton.attention, through its registered op, as the model calls it)
and SDPA restricted to one backend at a time with torch.nn.attention.sdpa_kernel: flash, efficient, cudnn,
math (a backend that cannot run the case is reported as skipped with its error).
Timings (triton.testing.do_bench, median ms): fwd (no grad), fwd_train (grad enabled), fwd_bwd (forward +
backward w.r.t. q, k, v); bwd = fwd_bwd - fwd_train. FLOPs: 4*B*H*N^2*D forward, 2.5x that backward.

    python benchmarks/bench_attention.py [--cases vit_b16 vit_h14] [--dtype bf16] [--out rows.json]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F

from bench_common import commit, refuse, write_rows

CASES = {  # name: (B, H, N, D)
    "vit_b16": (256, 12, 197, 64),
    "vit_h14": (64, 16, 257, 80),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def _times(fn, qkv: torch.Tensor) -> dict[str, float]:
    """fwd / fwd_train / fwd_bwd / bwd median ms of fn(q, k, v) on views of the qkv buffer."""
    from triton.testing import do_bench

    def views():
        return [t.transpose(1, 2) for t in qkv.unbind(2)]  # (B, H, N, D) strided views

    with torch.no_grad():
        fn(*views())  # compile / autotune outside the timing
        fwd = do_bench(lambda: fn(*views()))
    fwd_train = do_bench(lambda: fn(*views()))
    dy = torch.randn_like(fn(*views()))
    fn(*views()).backward(dy)  # backward compile / autotune

    def step():
        fn(*views()).backward(dy)

    fwd_bwd = do_bench(step, grad_to_none=[qkv])
    return {"fwd": fwd, "fwd_train": fwd_train, "fwd_bwd": fwd_bwd, "bwd": fwd_bwd - fwd_train}


def bench_case(name: str, dtype: torch.dtype) -> list[dict]:
    import triton
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from vitkernels.triton.attention import attention as fused

    B, H, N, D = CASES[name]
    scale = D ** -0.5
    qkv = torch.randn(B, N, 3, H, D, device="cuda", dtype=dtype, requires_grad=True)
    fwd_flops = 4.0 * B * H * N * N * D
    flops = {"fwd": fwd_flops, "fwd_train": fwd_flops, "bwd": 2.5 * fwd_flops, "fwd_bwd": 3.5 * fwd_flops}

    results: dict[str, dict[str, float] | str] = {}
    results["triton"] = _times(lambda q, k, v: fused(q, k, v, scale), qkv)
    for backend_name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:
            results[f"sdpa_{backend_name.lower()}"] = "not in this torch"
            continue

        def sdpa(q, k, v, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        try:
            results[f"sdpa_{backend_name.lower()}"] = _times(sdpa, qkv)
        except RuntimeError as exc:  # the backend does not support this case (or this GPU)
            results[f"sdpa_{backend_name.lower()}"] = f"skipped: {str(exc).splitlines()[0][:200]}"
        torch.cuda.empty_cache()

    common = {
        "op": "attention", "case": name, "B": B, "H": H, "N": N, "D": D, "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = []
    for phase in ("fwd", "fwd_train", "bwd", "fwd_bwd"):
        measured = {impl: r[phase] for impl, r in results.items() if isinstance(r, dict)}
        sdpa_ms = {impl: ms for impl, ms in measured.items() if impl != "triton"}
        best_sdpa = min(sdpa_ms, key=sdpa_ms.get) if sdpa_ms else None
        for impl, r in results.items():
            row = {**common, "phase": phase, "impl": impl}
            if isinstance(r, str):
                row["skipped"] = r
            else:
                ms = r[phase]
                row.update(ms=ms, tflops=flops[phase] / (ms * 1e-3) / 1e12)
                if impl == "triton" and best_sdpa is not None:
                    row.update(best_sdpa=best_sdpa, speedup_vs_best_sdpa=sdpa_ms[best_sdpa] / ms)
            rows.append(row)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", help="write the result rows as a JSON list to this file "
                                      "(e.g. benchmarks/results/attention_<date>.json)")
    args = parser.parse_args(argv)
    if (code := refuse("bench_attention.py")) is not None:
        return code
    torch.backends.cuda.matmul.allow_tf32 = False
    rows = []
    print(f"{'case':8s} {'phase':9s} {'impl':26s} {'ms':>8s} {'TFLOP/s':>8s}  note")
    for name in args.cases:
        for row in bench_case(name, DTYPES[args.dtype]):
            rows.append(row)
            if "skipped" in row:
                if row["phase"] == "fwd":
                    print(f"{row['case']:8s} {'-':9s} {row['impl']:26s} {'':>8s} {'':>8s}  {row['skipped']}")
                continue
            note = (f"{row['speedup_vs_best_sdpa']:.2f}x vs {row['best_sdpa']}"
                    if "speedup_vs_best_sdpa" in row else "")
            print(f"{row['case']:8s} {row['phase']:9s} {row['impl']:26s} {row['ms']:8.3f} {row['tflops']:8.1f}  {note}")
    write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
