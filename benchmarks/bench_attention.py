"""Benchmark attention on every backend and against each of SDPA's backends (GPU only; the harness:
vitkernels/experiments/harness.py).

Shapes (bf16 by default), q/k/v strided (B, H, N, D) views of one (B, N, 3, H, D) qkv buffer, exactly as the
model passes them, each a leaf of its own:
    vit_b16   B=256, H=12, N=197, D=64      (target: fwd >= 1.1x, bwd >= 1.0x the best SDPA backend)
    vit_h14   B=64,  H=16, N=257, D=80
Providers: torch (SDPA, dispatching as it does by default), triton, cuda, compile (by name), and SDPA
restricted to one backend at a time with torch.nn.attention.sdpa_kernel: sdpa_flash, sdpa_efficient,
sdpa_cudnn, sdpa_math (one that cannot run a case is a skipped row with its error).
FLOPs: 4*B*H*N^2*D forward, 2.5x that backward.

    python benchmarks/bench_attention.py [--cases vit_b16 vit_h14] [--dtype bf16] [--providers ...] [--out f.json]
"""

from __future__ import annotations

import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vitkernels
from vitkernels.experiments import harness  # noqa: E402

CASES = {  # name: (B, H, N, D)
    "vit_b16": (256, 12, 197, 64),
    "vit_h14": (64, 16, 257, 80),
}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def case(name: str) -> harness.Case:
    B, H, N, D = CASES[name]

    def inputs(device, dtype):
        qkv = torch.randn(B, N, 3, H, D, device=device, dtype=dtype)
        q, k, v = (t.transpose(1, 2).requires_grad_() for t in qkv.unbind(2))  # (B, H, N, D), strided
        return (q, k, v), dict(scale=D ** -0.5)

    fwd = 4.0 * B * H * N * N * D
    return harness.Case(name, dict(B=B, H=H, N=N, D=D), inputs,
                        flops={"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd})


def sdpa_providers() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    providers = {}
    for backend_name in SDPA_BACKENDS:
        backend = getattr(SDPBackend, backend_name, None)
        if backend is None:  # not in this torch
            continue

        def sdpa(q, k, v, scale, backend=backend):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, scale=scale)

        providers[f"sdpa_{backend_name.split('_')[0].lower()}"] = sdpa
    return providers


def main(argv=None) -> int:
    providers = {**harness.op_providers("attention"), **sdpa_providers()}
    parser = harness.parser(__doc__, providers)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    return harness.main("attention", "bench_attention.py", [case(n) for n in args.cases], providers, args)


if __name__ == "__main__":
    sys.exit(main())
