"""Benchmark the gated fc1 of a GLU MLP (ops.glu_linear: h = act(x Wg^T + bg) * (x Wv^T + bv)) on every backend
(GPU only; the harness: vitkernels/experiments/harness.py).

ViT-B/16-wide SwiGLU at batch 256 (R = 256 * 197 = 50432 token rows), bf16 by default:
    swiglu  768 -> 2 x 2048, SiLU gate, biases   (hidden 2048 = 768 * 4 * 2/3 rounded as EVA-02 / timm's
                                                   SwiGLU ViTs size it; the torch provider: two F.linear,
                                                   F.silu, a product, each intermediate written and read)
The triton forward reads x once for both GEMMs and applies the gate in their epilogue. TFLOP/s from 2*R*H*C
per GEMM: fwd 2 GEMMs, bwd 4 (dx from dg and dv, dWg, dWv), fwd+bwd 6 (the gate's arithmetic is not counted).

    python benchmarks/bench_glu_linear.py [--batch 256] [--dtype bf16] [--providers ...] [--out f.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vitkernels
from vitkernels.experiments import harness  # noqa: E402

CASES = {"swiglu": (768, 2048, "silu")}  # name: (C in, H hidden per half, activation)
TOKENS = 197  # ViT-B/16 at 224 px: 14 x 14 patches + the class token
GEMMS = {"fwd": 2, "bwd": 4, "fwd+bwd": 6}


def case(name: str, batch: int) -> harness.Case:
    C, H, activation = CASES[name]
    R = batch * TOKENS

    def inputs(device, dtype):
        x = torch.randn(R, C, device=device, dtype=dtype, requires_grad=True)
        wg, wv = ((torch.randn(H, C, device=device) / C**0.5).to(dtype).requires_grad_() for _ in range(2))
        bg, bv = ((0.02 * torch.randn(H, device=device)).to(dtype).requires_grad_() for _ in range(2))
        return (x, wg, bg, wv, bv), dict(activation=activation)

    return harness.Case(name, dict(R=R, C=C, H=H, activation=activation, batch=batch, tokens=TOKENS), inputs,
                        flops={mode: n * 2.0 * R * H * C for mode, n in GEMMS.items()})


def main(argv=None) -> int:
    providers = harness.op_providers("glu_linear")
    parser = harness.parser(__doc__, providers)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    return harness.main("glu_linear", "bench_glu_linear.py", [case(n, args.batch) for n in CASES], providers, args)


if __name__ == "__main__":
    sys.exit(main())
