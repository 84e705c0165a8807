"""Benchmark the 2-D rotary position embedding of q and k (ops.rope) on every backend (GPU only; the harness:
vitkernels/experiments/harness.py).

Shapes (bf16 by default): q, k (B, H, T, D) strided views of a (B, T, 3, H, D) qkv GEMM output, as the EVA-02
attention passes them; fp32 (T - P, D) tables from timm's layout (the sin / cos halves of one table):
    eva02_b14   B=256, H=12, T=257, D=64, P=1   (EVA-02 Base/14 at 224)
    eva02_l14   B=64,  H=16, T=257, D=64, P=1   (EVA-02 Large/14 at 224)
    rope_reg4   B=256, H=10, T=260, D=64, P=4   (timm's vit_betwixt_patch16_rope_reg4_gap_256)
The torch provider is timm's expression (x * cos + rot(x) * sin, prefix rows concatenated back).
Bandwidth: the ideal bytes, q and k read and written once each way (4 B H T D elements per direction; the
tables are L2-resident and not counted). Elementwise: no FLOPs.

    python benchmarks/bench_rope.py [--cases eva02_b14 rope_reg4] [--dtype bf16] [--providers ...] [--out f.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vitkernels
from vitkernels.experiments import harness  # noqa: E402

CASES = {  # name: (B, H, T, D, P)
    "eva02_b14": (256, 12, 257, 64, 1),
    "eva02_l14": (64, 16, 257, 64, 1),
    "rope_reg4": (256, 10, 260, 64, 4),
}


def case(name: str, elem: int = 2) -> harness.Case:
    B, H, T, D, P = CASES[name]

    def inputs(device, dtype):
        qkv = torch.randn(B, T, 3, H, D, device=device, dtype=dtype)
        # Leaves with the strides of the (B, H, T, D) views of the qkv buffer.
        q, k = (t.transpose(1, 2).detach().requires_grad_() for t in qkv.unbind(2)[:2])
        angles = torch.rand(T - P, D // 2, device=device) * 6.3
        table = torch.cat([angles.sin(), angles.cos()], -1).repeat_interleave(2, -1)  # (T - P, 2 D) interleaved
        sin, cos = table.chunk(2, -1)
        return (q, k, sin, cos), dict(num_prefix_tokens=P)

    moved = 4 * B * H * T * D * elem
    return harness.Case(name, dict(B=B, H=H, T=T, D=D, P=P), inputs,
                        bytes={"fwd": moved, "bwd": moved, "fwd+bwd": 2 * moved})


def main(argv=None) -> int:
    providers = harness.op_providers("rope")
    parser = harness.parser(__doc__, providers)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    elem = harness.DTYPES[args.dtype].itemsize
    return harness.main("rope", "bench_rope.py", [case(n, elem) for n in args.cases], providers, args)


if __name__ == "__main__":
    sys.exit(main())
