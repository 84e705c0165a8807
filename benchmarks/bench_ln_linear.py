"""Benchmark LayerNorm fused into the next GEMM (ops.ln_linear: a block's norm1 -> qkv) on every backend
(GPU only; the harness: vitkernels/experiments/harness.py).

ViT-B/16 at batch 256 (R = 256 * 197 = 50432 token rows), bf16 by default:
    qkv   LN(768) -> 768 x 2304, bias    (the torch provider: F.layer_norm then F.linear, LN(x) written,
                                          read back and kept for the backward)
The fused forward reads x twice (statistics, then the GEMM's prologue) and never writes LN(x); its backward
recomputes LN(x) in the dW GEMM's prologue. TFLOP/s from 2*R*M*K per GEMM: fwd 1 GEMM, bwd 2, fwd+bwd 3
(LayerNorm's arithmetic is not counted).

    python benchmarks/bench_ln_linear.py [--batch 256] [--dtype bf16] [--providers ...] [--out f.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vitkernels
from vitkernels.experiments import harness  # noqa: E402

CASES = {"qkv": (768, 2304)}  # name: (K in, M out)
TOKENS = 197  # ViT-B/16 at 224 px: 14 x 14 patches + the class token
GEMMS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def case(name: str, batch: int) -> harness.Case:
    K, M = CASES[name]
    R = batch * TOKENS

    def inputs(device, dtype):
        x = torch.randn(R, K, device=device, dtype=dtype, requires_grad=True)
        ln_w = (1 + 0.1 * torch.randn(K, device=device)).to(dtype).requires_grad_()
        ln_b = (0.1 * torch.randn(K, device=device)).to(dtype).requires_grad_()
        w = (torch.randn(M, K, device=device) / K**0.5).to(dtype).requires_grad_()
        b = (0.02 * torch.randn(M, device=device)).to(dtype).requires_grad_()
        return (x, ln_w, ln_b, w, b), dict(eps=1e-6)

    return harness.Case(name, dict(R=R, K=K, M=M, batch=batch, tokens=TOKENS), inputs,
                        flops={mode: n * 2.0 * R * M * K for mode, n in GEMMS.items()})


def main(argv=None) -> int:
    providers = harness.op_providers("ln_linear")
    parser = harness.parser(__doc__, providers)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    return harness.main("ln_linear", "bench_ln_linear.py", [case(n, args.batch) for n in CASES], providers, args)


if __name__ == "__main__":
    sys.exit(main())
