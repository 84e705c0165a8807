"""pytest-benchmark suite: the full training step and inference of a ViT per provider
(``vitkernels.experiments.bench``'s providers), for
``pytest benchmarks/test_bench_model.py --benchmark-json=out.json``. CI does not run it.

GPU: vit_base_patch16_224, 224 px, bf16, batch 64 (``VITKERNELS_BENCH_BATCH`` overrides). Without a GPU a
tiny ViT on the CPU, and only the providers that are benchmarks there (triton/cuda rows skip with the reason).
"""

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from vitkernels.experiments import bench  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
if CUDA:
    MODEL = dict(model="vit_base_patch16_224", img_size=224, patch_size=None, depth=None)
    BATCH, DTYPE = int(os.environ.get("VITKERNELS_BENCH_BATCH", 64)), "bf16"
else:
    MODEL = dict(model="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    BATCH, DTYPE = int(os.environ.get("VITKERNELS_BENCH_BATCH", 8)), "fp32"


def _kwargs():
    args = bench.build_parser().parse_args(["--model", MODEL["model"]])
    for key in ("img_size", "patch_size", "depth"):
        setattr(args, key, MODEL[key])
    return bench.model_kwargs(args)


@pytest.mark.parametrize("mode", bench.MODES)
@pytest.mark.parametrize("provider", bench.PROVIDERS)
def test_step(benchmark, provider, mode):
    why = bench.why_skip(provider, DEVICE)
    if why is not None:
        pytest.skip(why)
    cfg = _kwargs()
    fn = bench.make_step(provider, mode, cfg, BATCH, DTYPE, DEVICE, seed=0)
    fn()  # warm-up: compilation, autotuning

    def run():
        fn()
        if CUDA:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=5 if CUDA else 3, iterations=5 if CUDA else 1, warmup_rounds=1)
    benchmark.extra_info.update(provider=provider, mode=mode, batch_size=BATCH, dtype=DTYPE, device=str(DEVICE),
                                **{k: cfg[k] for k in ("img_size", "patch_size", "embed_dim", "depth")})
