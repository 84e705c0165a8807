"""Benchmark the Triton LayerNorm(+residual) against the PyTorch ops it replaces (GPU only).

ViT-B/16 at batch 256 by default: R = 256 * 197 = 50432 rows of C = 768, bf16. Two cases:
    residual   s = x + residual; y = LN(s)   vs  x + residual, then F.layer_norm
    plain      y = LN(x)                     vs  F.layer_norm
Two phases per case and implementation (triton.testing.do_bench, median ms):
    fwd   the forward under no_grad
    bwd   the backward alone: autograd.grad on a retained graph, w.r.t. x (and residual), weight and bias
Bandwidth is the same ideal byte count for both implementations (each (R, C) tensor read or written once):
    fwd: plain x -> y (2 R C), residual x, residual -> s, y (4 R C)
    bwd: plain x, dy -> dx (3 R C), residual s, dy, ds -> dx (4 R C; dx is also the residual's gradient)
and the device's copy bandwidth (x.clone(): 2 R C bytes) is measured in the same run as the ceiling
(target: the fused forward >= 85% of it). Tensors are ~77 MB each, beyond L2, so no input rotation is needed.

    python benchmarks/bench_layer_norm.py [--batch 256] [--width 768] [--dtype bf16] [--out rows.json]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch
import torch.nn.functional as F

from bench_common import commit, refuse, write_rows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TOKENS = 197  # ViT-B/16 at 224 px: 14 x 14 patches + the class token
EPS = 1e-6


def _eager(x, weight, bias, residual):
    """The unfused PyTorch path: an add kernel, then F.layer_norm."""
    if residual is None:
        return F.layer_norm(x, x.shape[-1:], weight, bias, EPS)
    s = x + residual
    return F.layer_norm(s, s.shape[-1:], weight, bias, EPS), s


def _fused(x, weight, bias, residual):
    from vitkernels.triton.layer_norm import layer_norm

    return layer_norm(x, weight, bias, EPS, residual)


def _time_fwd(fn, args) -> float:
    from triton.testing import do_bench

    with torch.no_grad():
        return do_bench(lambda: fn(*args))


def _time_bwd(fn, args) -> float:
    """The backward alone: one graph, retained, differentiated repeatedly."""
    from triton.testing import do_bench

    leaves = [a for a in args if isinstance(a, torch.Tensor)]
    out = fn(*args)
    outs = list(out) if isinstance(out, tuple) else [out]
    grads = [torch.randn_like(o) for o in outs]
    return do_bench(lambda: torch.autograd.grad(outs, leaves, grads, retain_graph=True))


def bench(batch: int, C: int, dtype: torch.dtype) -> list[dict]:
    import triton
    from triton.testing import do_bench

    dev = torch.device("cuda")
    R = batch * TOKENS
    elem = torch.empty((), dtype=dtype).element_size()
    x = torch.randn(R, C, device=dev, dtype=dtype, requires_grad=True)
    r = torch.randn(R, C, device=dev, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(C, device=dev)).to(dtype).requires_grad_()
    b = (0.1 * torch.randn(C, device=dev)).to(dtype).requires_grad_()
    with torch.no_grad():
        copy_ms = do_bench(lambda: x.clone())
    copy_gbs = 2 * R * C * elem / (copy_ms * 1e-3) / 1e9
    common = {
        "op": "layer_norm", "R": R, "C": C, "batch": batch, "tokens": TOKENS,
        "dtype": str(dtype).replace("torch.", ""), "copy_ms": copy_ms, "copy_gbs": copy_gbs,
        "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    rows = []
    for case, residual in (("residual", r), ("plain", None)):
        args = (x, w, b, residual)
        for fn in (_fused, _eager):
            fn(*args)  # compile and autotune outside the timing
        tensors = {"fwd": 4 if residual is not None else 2, "bwd": 4 if residual is not None else 3}
        for phase, timer in (("fwd", _time_fwd), ("bwd", _time_bwd)):
            t_ms, b_ms = timer(_fused, args), timer(_eager, args)
            nbytes = tensors[phase] * R * C * elem
            t_gbs, b_gbs = nbytes / (t_ms * 1e-3) / 1e9, nbytes / (b_ms * 1e-3) / 1e9
            rows.append({
                **common, "case": case, "phase": phase, "bytes": nbytes, "triton_ms": t_ms, "torch_ms": b_ms,
                "triton_gbs": t_gbs, "torch_gbs": b_gbs, "triton_frac_copy": t_gbs / copy_gbs,
                "speedup": b_ms / t_ms,
            })
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=768, help="C (192, 384, 768, 1024, 1280 in ViTs)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", help="write the result rows as a JSON list to this file")
    args = parser.parse_args(argv)
    if (code := refuse("bench_layer_norm.py")) is not None:
        return code
    rows = bench(args.batch, args.width, DTYPES[args.dtype])
    print(f"copy (x.clone()): {rows[0]['copy_ms']:.3f} ms, {rows[0]['copy_gbs']:.0f} GB/s")
    print(f"{'case':8s} {'phase':5s} {'triton ms':>9s} {'torch ms':>9s} {'triton GB/s':>11s} {'torch GB/s':>10s} "
          f"{'of copy':>7s} {'speed-up':>8s}")
    for row in rows:
        print(f"{row['case']:8s} {row['phase']:5s} {row['triton_ms']:9.3f} {row['torch_ms']:9.3f} "
              f"{row['triton_gbs']:11.0f} {row['torch_gbs']:10.0f} {row['triton_frac_copy']:6.0%} "
              f"{row['speedup']:7.2f}x")
    write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
