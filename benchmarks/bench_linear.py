"""Benchmark the Triton linear with fused epilogue against the PyTorch ops it replaces (GPU only).

ViT-B/16 GEMMs at batch 256 (R = 256 * 197 = 50432 token rows), bf16 by default:
    qkv   768 -> 2304, bias                vs F.linear
    proj  768 -> 768,  bias + residual     vs F.linear + add
    fc1   768 -> 3072, bias + GELU (erf)   vs F.linear + F.gelu      (target: fused fwd >= 1.15x)
    fc2   3072 -> 768, bias + residual     vs F.linear + add
Three timings per case and implementation (triton.testing.do_bench, median ms):
    fwd        inference forward (no grad: GELU's pre-activation is not kept)
    fwd_train  forward with grad enabled (the fused fc1 also writes z for the backward)
    fwd_bwd    forward + backward w.r.t. x, weight, bias (and residual)
and bwd = fwd_bwd - fwd_train. TFLOP/s from 2*R*M*K per GEMM (fwd: 1 GEMM, bwd: 2, fwd_bwd: 3). Operands are
~80-320 MB each, far beyond L2, so no input rotation is needed for honest numbers.

    python benchmarks/bench_linear.py [--batch 256] [--dtype bf16] [--cases fc1 fc2] [--out rows.json]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F

from bench_common import commit, refuse, write_rows

CASES = {  # name: (K in, M out, activation, residual)
    "qkv": (768, 2304, None, False),
    "proj": (768, 768, None, True),
    "fc1": (768, 3072, "gelu", False),
    "fc2": (3072, 768, None, True),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENS = 197  # ViT-B/16 at 224 px: 14 x 14 patches + the class token


def _eager(x, weight, bias, activation, residual):
    """The unfused PyTorch path (cuBLAS GEMM with bias, then separate GELU / add kernels)."""
    y = F.linear(x, weight, bias)
    if activation == "gelu":
        y = F.gelu(y)
    if residual is not None:
        y = y + residual
    return y


def _time(fn, args, train: bool, backward: bool) -> float:
    from triton.testing import do_bench

    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    if not train:
        with torch.no_grad():
            return do_bench(lambda: fn(*args))
    if not backward:
        return do_bench(lambda: fn(*args))
    dy = torch.randn_like(fn(*args))

    def step():
        fn(*args).backward(dy)

    return do_bench(step, grad_to_none=leaves)


def bench_case(name: str, batch: int, dtype: torch.dtype) -> list[dict]:
    import triton

    from vitkernels.triton.linear import linear as fused

    K, M, activation, has_res = CASES[name]
    R = batch * TOKENS
    dev = torch.device("cuda")
    x = torch.randn(R, K, device=dev, dtype=dtype, requires_grad=True)
    w = (torch.randn(M, K, device=dev) / K**0.5).to(dtype).requires_grad_()
    b = (0.02 * torch.randn(M, device=dev)).to(dtype).requires_grad_()
    r = torch.randn(R, M, device=dev, dtype=dtype, requires_grad=True) if has_res else None
    args = (x, w, b, activation, r)
    gemm_flops = 2.0 * R * M * K
    ms = {}
    for impl, fn in (("triton", fused), ("torch", _eager)):
        fn(*args)  # compile and autotune outside the timing
        ms[impl, "fwd"] = _time(fn, args, train=False, backward=False)
        ms[impl, "fwd_train"] = _time(fn, args, train=True, backward=False)
        ms[impl, "fwd_bwd"] = _time(fn, args, train=True, backward=True)
        ms[impl, "bwd"] = ms[impl, "fwd_bwd"] - ms[impl, "fwd_train"]
    epilogue = "+".join(["bias"] + (["gelu"] if activation else []) + (["residual"] if has_res else []))
    common = {
        "op": "linear", "case": name, "epilogue": epilogue, "R": R, "K": K, "M": M, "batch": batch,
        "tokens": TOKENS, "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = []
    for phase, gemms in (("fwd", 1), ("fwd_train", 1), ("bwd", 2), ("fwd_bwd", 3)):
        t_ms, b_ms = ms["triton", phase], ms["torch", phase]
        rows.append({
            **common, "phase": phase, "triton_ms": t_ms, "torch_ms": b_ms,
            "triton_tflops": gemms * gemm_flops / (t_ms * 1e-3) / 1e12,
            "torch_tflops": gemms * gemm_flops / (b_ms * 1e-3) / 1e12,
            "speedup": b_ms / t_ms,
        })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    parser.add_argument("--out", help="write the result rows as a JSON list to this file")
    args = parser.parse_args(argv)
    if (code := refuse("bench_linear.py")) is not None:
        return code
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 runs compare against full-precision cuBLAS
    rows = []
    print(f"{'case':5s} {'phase':9s} {'triton ms':>9s} {'torch ms':>9s} {'triton TF/s':>11s} "
          f"{'torch TF/s':>10s} {'speed-up':>8s}")
    for name in args.cases:
        for row in bench_case(name, args.batch, DTYPES[args.dtype]):
            rows.append(row)
            print(f"{row['case']:5s} {row['phase']:9s} {row['triton_ms']:9.3f} {row['torch_ms']:9.3f} "
                  f"{row['triton_tflops']:11.1f} {row['torch_tflops']:10.1f} {row['speedup']:7.2f}x")
    write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
