"""Benchmark the gated MLP half of a block as one op (ops.ln_glu_mlp: norm2 -> act(fc1_g) * fc1_v -> fc2 +
residual) on every backend (GPU only; the harness: vitkernels/experiments/harness.py).

ViT-B/16-wide SwiGLU at batch 256 (R = 256 * 197 = 50432 token rows), bf16 by default:
    swiglu  LN(768) -> 768 x 2 x 2048, SiLU gate, biases -> 2048 x 768 + bias + residual
            (hidden 2048 = 768 * 4 * 2/3 rounded, as EVA-02 / timm's SwiGLU ViTs size it; the torch provider:
            F.layer_norm, two F.linear, F.silu, a product, F.linear, add: LN(x), g, v, act(g) and h kept for
            the backward; the fused op keeps g and v only)
TFLOP/s from the GEMMs, 2*R*(2*H*C + C*H) per forward: fwd 1x, bwd 2x, fwd+bwd 3x (the gate's arithmetic and
the LayerNorm are not counted).

    python benchmarks/bench_ln_glu_mlp.py [--batch 256] [--dtype bf16] [--providers ...] [--out f.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vitkernels
from vitkernels.experiments import harness  # noqa: E402

CASES = {"swiglu": (768, 2048, "silu")}  # name: (C, H hidden per half, activation)
TOKENS = 197  # ViT-B/16 at 224 px: 14 x 14 patches + the class token
PASSES = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def case(name: str, batch: int) -> harness.Case:
    C, H, activation = CASES[name]
    R = batch * TOKENS

    def inputs(device, dtype):
        def param(*shape, scale=1.0, shift=0.0):
            return (shift + scale * torch.randn(*shape, device=device)).to(dtype).requires_grad_()

        x = torch.randn(R, C, device=device, dtype=dtype, requires_grad=True)
        args = (x, param(C, scale=0.1, shift=1.0), param(C, scale=0.1), param(H, C, scale=C**-0.5),
                param(H, scale=0.02), param(H, C, scale=C**-0.5), param(H, scale=0.02), param(C, H, scale=H**-0.5),
                param(C, scale=0.02))
        return args, dict(eps=1e-6, add_input=True, activation=activation)

    return harness.Case(name, dict(R=R, C=C, H=H, activation=activation, batch=batch, tokens=TOKENS), inputs,
                        flops={mode: n * 2.0 * R * 3 * H * C for mode, n in PASSES.items()})


def main(argv=None) -> int:
    providers = harness.op_providers("ln_glu_mlp")
    parser = harness.parser(__doc__, providers)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args(argv)
    return harness.main("ln_glu_mlp", "bench_ln_glu_mlp.py", [case(n, args.batch) for n in CASES], providers,
                        args)


if __name__ == "__main__":
    sys.exit(main())
