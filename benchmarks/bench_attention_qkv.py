"""Benchmark attention on the fused qkv tensor (ops.attention_qkv: d(qkv) written whole by the backward) on
every backend (GPU only; the harness: vitkernels/experiments/harness.py).

Shapes (bf16 by default): qkv (B, N, 3 * H * D), the qkv GEMM's output, one leaf:
    vit_b16   B=256, H=12, N=197, D=64
    vit_h14   B=64,  H=16, N=257, D=80
The torch provider is SDPA on the q, k, v views (its backward stacks dq, dk, dv into d(qkv), as timm's does).
FLOPs: 4*B*H*N^2*D forward, 2.5x that backward.

    python benchmarks/bench_attention_qkv.py [--cases vit_b16 vit_h14] [--dtype bf16] [--providers ...] [--out f.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vitkernels
from vitkernels.experiments import harness  # noqa: E402

CASES = {  # name: (B, H, N, D)
    "vit_b16": (256, 12, 197, 64),
    "vit_h14": (64, 16, 257, 80),
}


def case(name: str) -> harness.Case:
    B, H, N, D = CASES[name]

    def inputs(device, dtype):
        qkv = torch.randn(B, N, 3 * H * D, device=device, dtype=dtype, requires_grad=True)
        return (qkv, H), dict(scale=D ** -0.5)

    fwd = 4.0 * B * H * N * N * D
    return harness.Case(name, dict(B=B, H=H, N=N, D=D), inputs,
                        flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd})


def main(argv=None) -> int:
    providers = harness.op_providers("attention_qkv")
    parser = harness.parser(__doc__, providers)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    return harness.main("attention_qkv", "bench_attention_qkv.py", [case(n) for n in args.cases], providers, args)


if __name__ == "__main__":
    sys.exit(main())
