"""Benchmark LayerNorm(+residual) on every backend (GPU only; the harness: vitkernels/experiments/harness.py).

ViT-B/16 at batch 256 by default: R = 256 * 197 = 50432 rows of C = 768, bf16. Two cases:
    residual   s = x + residual; y = LN(s)   (the torch provider: an add kernel, then F.layer_norm)
    plain      y = LN(x)
Bandwidth is the same ideal byte count for every provider (each (R, C) tensor read or written once):
    fwd:      plain x -> y (2 R C), residual x, residual -> s, y (4 R C)
    bwd:      plain x, dy -> dx (3 R C), residual s, dy, ds -> dx (4 R C; dx is also the residual's gradient)
    fwd+bwd:  the sum
and the device's copy bandwidth (x.clone(): 2 R C bytes) is measured in the same run as the ceiling, in the
metadata row (target: the fused forward >= 85% of it). Tensors are ~77 MB each, beyond L2, so no input
rotation is needed.

    python benchmarks/bench_layer_norm.py [--batch 256] [--width 768] [--dtype bf16] [--providers ...] [--out f.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vitkernels
from vitkernels.experiments import harness  # noqa: E402

TOKENS = 197  # ViT-B/16 at 224 px: 14 x 14 patches + the class token
EPS = 1e-6


def cases(batch: int, C: int, elem: int) -> list[harness.Case]:
    R = batch * TOKENS
    found = []
    for name, has_residual in (("residual", True), ("plain", False)):
        def inputs(device, dtype, has_residual=has_residual):
            x = torch.randn(R, C, device=device, dtype=dtype, requires_grad=True)
            w = (1 + 0.1 * torch.randn(C, device=device)).to(dtype).requires_grad_()
            b = (0.1 * torch.randn(C, device=device)).to(dtype).requires_grad_()
            r = torch.randn(R, C, device=device, dtype=dtype, requires_grad=True) if has_residual else None
            return (x, w, b), dict(eps=EPS, residual=r)

        tensors = {"fwd": 4 if has_residual else 2, "bwd": 4 if has_residual else 3}
        tensors["fwd+bwd"] = tensors["fwd"] + tensors["bwd"]
        found.append(harness.Case(name, dict(R=R, C=C, batch=batch, tokens=TOKENS), inputs,
                                  bytes={mode: n * R * C * elem for mode, n in tensors.items()}))
    return found


def copy_ceiling(batch: int, C: int):
    def setup(device, dtype) -> dict:
        x = torch.randn(batch * TOKENS, C, device=device, dtype=dtype)
        ms = harness.do_bench(lambda: x.clone(), [])[0]
        return {"copy_ms": ms, "copy_gbs": 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9}

    return setup


def main(argv=None) -> int:
    providers = harness.op_providers("layer_norm")
    parser = harness.parser(__doc__, providers)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--width", type=int, default=768, help="C (192, 384, 768, 1024, 1280 in ViTs)")
    args = parser.parse_args(argv)
    elem = harness.DTYPES[args.dtype].itemsize
    return harness.main("layer_norm", "bench_layer_norm.py", cases(args.batch, args.width, elem), providers, args,
                        setup=copy_ceiling(args.batch, args.width))


if __name__ == "__main__":
    sys.exit(main())
