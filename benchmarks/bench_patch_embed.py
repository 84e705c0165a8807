"""Benchmark the patch embedding on every backend (GPU only; the harness: vitkernels/experiments/harness.py).

ViT-B/16 stem at batch 256 by default: images (256, 3, 224, 224), P = 16, D = 768, class token and a
position embedding over 1 + 196 tokens, bf16. The torch provider is the reference the tests use: Conv2d
(cuDNN) + flatten + transpose + cat(cls) + add(pos). Two cases:
    frozen     images without a gradient (the training case): bwd w.r.t. weight, bias, pos_embed, cls_token
    dimages    the images' gradient too (a second GEMM)
TFLOP/s from 2 * M * D * K per GEMM, M = B * N tokens, K = C * P * P: fwd 1 GEMM, bwd 1 (frozen) or 2
(dimages), fwd+bwd the sum. Images and tokens are ~77 MB each, beyond L2, so no input rotation is needed.

    python benchmarks/bench_patch_embed.py [--batch 256] [--img 224] [--patch 16] [--dim 768] [--out f.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vitkernels
from vitkernels.experiments import harness  # noqa: E402


def cases(batch: int, img: int, P: int, D: int, C: int) -> list[harness.Case]:
    N = (img // P) ** 2
    M, K = batch * N, C * P * P
    gemm = 2.0 * M * D * K
    found = []
    for name, dimages in (("frozen", False), ("dimages", True)):
        def inputs(device, dtype, dimages=dimages):
            images = torch.randn(batch, C, img, img, device=device, dtype=dtype, requires_grad=dimages)
            weight = (torch.randn(D, C, P, P, device=device) / K**0.5).to(dtype).requires_grad_()
            bias = (0.02 * torch.randn(D, device=device)).to(dtype).requires_grad_()
            pos = (0.02 * torch.randn(1, N + 1, D, device=device)).to(dtype).requires_grad_()
            cls = (0.02 * torch.randn(1, 1, D, device=device)).to(dtype).requires_grad_()
            return (images, weight, bias), dict(pos_embed=pos, cls_token=cls)

        bwd_gemms = 2 if dimages else 1
        found.append(harness.Case(name, dict(batch=batch, img=img, P=P, C=C, D=D, N=N, M=M, K=K), inputs,
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
    args = parser.parse_args(argv)
    return harness.main("patch_embed", "bench_patch_embed.py",
                        cases(args.batch, args.img, args.patch, args.dim, args.chans), providers, args)


if __name__ == "__main__":
    sys.exit(main())
