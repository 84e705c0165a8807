"""Benchmark the Triton patch embedding against the PyTorch ops it replaces (GPU only).

ViT-B/16 stem at batch 256 by default: images (256, 3, 224, 224), P = 16, D = 768, class token and a
position embedding over 1 + 196 tokens, bf16. The PyTorch path is the reference the tests use:
Conv2d (cuDNN) + flatten + transpose + cat(cls) + add(pos). Phases (triton.testing.do_bench, median ms):
    fwd            forward under no_grad (target: >= 1.5x the PyTorch path)
    bwd            backward alone (autograd.grad on a retained graph) w.r.t. weight, bias, pos_embed and
                   cls_token, images frozen: the training case
    bwd_dimages    the same plus the images' gradient (a second GEMM)
TFLOP/s from 2 * M * D * K per GEMM, M = B * N tokens, K = C * P * P (fwd: 1 GEMM, bwd: 1, bwd_dimages: 2).
Images and tokens are ~77 MB each, beyond L2, so no input rotation is needed.

    python benchmarks/bench_patch_embed.py [--batch 256] [--img 224] [--patch 16] [--dim 768] [--out rows.json]
"""

from __future__ import annotations

import argparse
import datetime
import sys

import torch

from bench_common import commit, refuse, write_rows

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _eager(images, weight, bias, pos_embed, cls_token):
    from vitkernels.ops.reference import patch_embed

    return patch_embed(images, weight, bias, pos_embed, cls_token)


def _fused(images, weight, bias, pos_embed, cls_token):
    from vitkernels.triton.patch_embed import patch_embed

    return patch_embed(images, weight, bias, pos_embed, cls_token)


def _time_fwd(fn, args) -> float:
    from triton.testing import do_bench

    with torch.no_grad():
        return do_bench(lambda: fn(*args))


def _time_bwd(fn, args) -> float:
    """The backward alone: one graph, retained, differentiated repeatedly."""
    from triton.testing import do_bench

    leaves = [a for a in args if a.requires_grad]
    out = fn(*args)
    grad = torch.randn_like(out)
    return do_bench(lambda: torch.autograd.grad(out, leaves, grad, retain_graph=True))


def bench(batch: int, img: int, P: int, D: int, C: int, dtype: torch.dtype) -> list[dict]:
    import triton

    dev = torch.device("cuda")
    N = (img // P) ** 2
    M, K = batch * N, C * P * P
    images = torch.randn(batch, C, img, img, device=dev, dtype=dtype)
    weight = (torch.randn(D, C, P, P, device=dev) / K**0.5).to(dtype).requires_grad_()
    bias = (0.02 * torch.randn(D, device=dev)).to(dtype).requires_grad_()
    pos = (0.02 * torch.randn(1, N + 1, D, device=dev)).to(dtype).requires_grad_()
    cls = (0.02 * torch.randn(1, 1, D, device=dev)).to(dtype).requires_grad_()
    gemm_flops = 2.0 * M * D * K
    common = {
        "op": "patch_embed", "batch": batch, "img": img, "P": P, "C": C, "D": D, "N": N, "M": M, "K": K,
        "dtype": str(dtype).replace("torch.", ""),
        "device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "commit": commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    frozen = (images, weight, bias, pos, cls)
    trainable = (images.clone().requires_grad_(), weight, bias, pos, cls)
    rows = []
    for phase, args, timer, gemms in (("fwd", frozen, _time_fwd, 1), ("bwd", frozen, _time_bwd, 1),
                                      ("bwd_dimages", trainable, _time_bwd, 2)):
        for fn in (_fused, _eager):
            out = fn(*args)  # compile and autotune outside the timing
            if phase != "fwd":
                torch.autograd.grad(out, [a for a in args if a.requires_grad], torch.ones_like(out))
        t_ms, b_ms = timer(_fused, args), timer(_eager, args)
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
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--chans", type=int, default=3)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--out", help="write the result rows as a JSON list to this file")
    args = parser.parse_args(argv)
    if (code := refuse("bench_patch_embed.py")) is not None:
        return code
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 runs compare against full-precision cuDNN
    torch.backends.cudnn.allow_tf32 = False
    rows = bench(args.batch, args.img, args.patch, args.dim, args.chans, DTYPES[args.dtype])
    print(f"{'phase':11s} {'triton ms':>9s} {'torch ms':>9s} {'triton TF/s':>11s} {'torch TF/s':>10s} "
          f"{'speed-up':>8s}")
    for row in rows:
        print(f"{row['phase']:11s} {row['triton_ms']:9.3f} {row['torch_ms']:9.3f} {row['triton_tflops']:11.1f} "
              f"{row['torch_tflops']:10.1f} {row['speedup']:7.2f}x")
    write_rows(rows, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
