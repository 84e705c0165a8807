"""Benchmark the patch embedding on every backend (GPU only; the harness: vitkernels/experiments/harness.py).

ViT-B/16 stem at batch 256 by default: images (256, 3, 224, 224), P = 16, D = 768, K = 1 prefix token (the
class token; --prefix 5: class + 4 registers) and a position embedding over K + 196 tokens, bf16. The torch
provider is the reference the tests use: Conv2d (cuDNN) + flatten + transpose + cat(prefix) + add(pos). Two
cases:
    frozen     images without a gradient (the training case): bwd w.r.t. weight, bias, pos_embed, prefix_tokens
    dimages    the images' gradient too (a second GEMM)
TFLOP/s from 2 * M * D * K per GEMM, M = B * N tokens, K = C * P * P: fwd 1 GEMM, bwd 1 (frozen) or 2
(dimages), fwd+bwd the sum. Images and tokens are ~77 MB each, beyond L2, so no input rotation is needed.

    python benchmarks/bench_patch_embed.py [--batch 256] [--img 224] [--patch 16] [--dim 768] [--prefix 1]
        [--out f.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vitkernels
from vitkernels.experiments import harness  # noqa: E402


def cases(batch: int, img: int, P: int, D: int, C: int, prefix: int = 1) -> list[harness.Case]:
    N = (img // P) ** 2
    M, K = batch * N, C * P * P
    gemm = 2.0 * M * D * K
    found = []
    for name, dimages in (("frozen", False), ("dimages", True)):
        def inputs(device, dtype, dimages=dimages):
            images = torch.randn(batch, C, img, img, device=device, dtype=dtype, requires_grad=dimages)
            weight = (torch.randn(D, C, P, P, device=device) / K**0.5).to(dtype).requires_grad_()
            bias = (0.02 * torch.randn(D, device=device)).to(dtype).requires_grad_()
            pos = (0.02 * torch.randn(1, N + prefix, D, device=device)).to(dtype).requires_grad_()
            tokens = (0.02 * torch.randn(1, prefix, D, device=device)).to(dtype).requires_grad_() if prefix else None
            return (images, weight, bias), dict(pos_embed=pos, prefix_tokens=tokens)

        bwd_gemms = 2 if dimages else 1
        shape = dict(batch=batch, img=img, P=P, C=C, D=D, N=N, M=M, K=K, prefix=prefix)
        found.append(harness.Case(name, shape, inputs,
                                  flops={"fwd": gemm, "bwd": bwd_gemms * gemm, "fwd+bwd": (1 + bwd_gemms) * gemm}))
    return found


def main(argv=None) -> int:
    providers = harness.op_providers("patch_embed")
    parser = harness.parser(__doc__, providers)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--img", type=int, default=224)
    parser.add_argument("--patch", type=int, default=16)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--chans", type=int, default=3)
    parser.add_argument("--prefix", type=int, default=1, help="prefix tokens (class, registers, distillation)")
    args = parser.parse_args(argv)
    return harness.main("patch_embed", "bench_patch_embed.py",
                        cases(args.batch, args.img, args.patch, args.dim, args.chans, args.prefix), providers, args)


if __name__ == "__main__":
    sys.exit(main())
