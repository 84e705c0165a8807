"""Benchmark the linear with fused epilogue on every backend (GPU only; the harness:
vitkernels/experiments/harness.py).

ViT-B/16 GEMMs at batch 256 (R = 256 * 197 = 50432 token rows), bf16 by default:
    qkv   768 -> 2304, bias                (the torch provider: F.linear)
    proj  768 -> 768,  bias + residual     (F.linear + add)
    fc1   768 -> 3072, bias + GELU (erf)   (F.linear + F.gelu; target: fused fwd >= 1.15x)
    fc2   3072 -> 768, bias + residual     (F.linear + add)
TFLOP/s from 2*R*M*K per GEMM: fwd 1 GEMM, bwd 2 (dx and dW), fwd+bwd 3. The inference forward runs under
no_grad, so the fused fc1 does not write GELU's pre-activation there. Operands are ~80-320 MB each, far
beyond L2, so no input rotation is needed for honest numbers.

    python benchmarks/bench_linear.py [--batch 256] [--dtype bf16] [--cases fc1 fc2] [--providers ...] [--out f.json]
"""

from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout's vitkernels
from vitkernels.experiments import harness  # noqa: E402

CASES = {  # name: (K in, M out, activation, residual)
    "qkv": (768, 2304, None, False),
    "proj": (768, 768, None, True),
    "fc1": (768, 3072, "gelu", False),
    "fc2": (3072, 768, None, True),
}
TOKENS = 197  # ViT-B/16 at 224 px: 14 x 14 patches + the class token
GEMMS = {"fwd": 1, "bwd": 2, "fwd+bwd": 3}


def case(name: str, batch: int) -> harness.Case:
    K, M, activation, has_residual = CASES[name]
    R = batch * TOKENS

    def inputs(device, dtype):
        x = torch.randn(R, K, device=device, dtype=dtype, requires_grad=True)
        w = (torch.randn(M, K, device=device) / K**0.5).to(dtype).requires_grad_()
        b = (0.02 * torch.randn(M, device=device)).to(dtype).requires_grad_()
        r = torch.randn(R, M, device=device, dtype=dtype, requires_grad=True) if has_residual else None
        return (x, w, b), dict(activation=activation, residual=r)

    epilogue = "+".join(["bias"] + (["gelu"] if activation else []) + (["residual"] if has_residual else []))
    return harness.Case(name, dict(R=R, K=K, M=M, batch=batch, tokens=TOKENS, epilogue=epilogue), inputs,
                        flops={mode: n * 2.0 * R * M * K for mode, n in GEMMS.items()})


def main(argv=None) -> int:
    providers = harness.op_providers("linear")
    parser = harness.parser(__doc__, providers)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--cases", nargs="+", choices=sorted(CASES), default=list(CASES))
    args = parser.parse_args(argv)
    return harness.main("linear", "bench_linear.py", [case(n, args.batch) for n in args.cases], providers, args)


if __name__ == "__main__":
    sys.exit(main())
