"""``python -m vitkernels bench``: time a ViT's full training step and its inference, per provider.

Providers (the same model config, batch, dtype and input for all):

    timm-eager          timm's VisionTransformer, eager, autocast, SDPA attention: the baseline
    timm-compile        the same under torch.compile
    vitkernels-torch    vitkernels' model on the torch backend (its reference ops)
    vitkernels-triton   ... on the fused Triton kernels
    vitkernels-cuda     ... on the CUDA C++ extension

A training step is forward + cross-entropy + backward + AdamW step (+ zero_grad); inference is a forward
under ``torch.inference_mode``. Timing: ``--warmup`` steps first (compilation, autotuning, allocator warm-up;
not timed), then ``--repeats`` timings of ``--iters`` steps each, with CUDA events on a GPU
(time.perf_counter on a CPU); the row reports the median and the spread (min, max) of ms per step. TFLOP/s
are model FLOPs (``vitkernels.flops.count``: 3x forward for training, whatever the provider recomputes)
divided by time, MFU against ``vitkernels.experiments.mfu.PEAK_TFLOPS``. A provider that cannot run is a row with
``skipped`` set to the reason.

Default: on a GPU vit_base_patch16_224 at 224, bf16, batch 256; on a CPU a tiny ViT (depth 4) at 32 px in
fp32, batch 16 (under 2 minutes: Triton's interpreter and the extension's C++ twin are for tests, and
compiling takes minutes on a small CPU, so those rows are skipped there unless --providers names them).

``--memory``: instead of timing, the memory report (``vitkernels/experiments/memory.py``): bytes saved for the
backward, the peak of a training step (estimated under FakeTensorMode, so ViT-B/16 at batch 256 costs seconds on
a CPU; measured as well on a GPU), an HBM-traffic proxy and gradient checkpointing, each against timm eager.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys

import torch
import torch.nn.functional as F

from vitkernels.experiments import harness, mfu
from vitkernels.experiments.cli import ArgumentParser
from vitkernels.experiments.env import DTYPES, autocast, device_name

PROVIDERS = ("timm-eager", "timm-compile", "vitkernels-torch", "vitkernels-triton", "vitkernels-cuda")
MODES = ("train", "infer")

GPU_DEFAULT = dict(model="vit_base_patch16_224", img_size=224, batch_size=256, dtype="bf16", repeats=5,
                   warmup=3, iters=10)
CPU_DEFAULT = dict(model="vit_tiny_patch16_224", img_size=32, patch_size=8, depth=4, batch_size=16,
                   dtype="fp32", repeats=3, warmup=1, iters=2)
# Rows a CPU run skips unless --providers names them (the default must finish in under 2 minutes).
CPU_DEFAULT_SKIP = {"timm-compile": "skipped on CPU by default: compiling takes minutes on a small CPU "
                                   "(--providers timm-compile times it)"}


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="vitkernels bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a vitkernels.list_models() name (default: see above)")
    p.add_argument("--img-size", type=int)
    p.add_argument("--patch-size", type=int)
    p.add_argument("--embed-dim", type=int)
    p.add_argument("--depth", type=int)
    p.add_argument("--num-heads", type=int)
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--dtype", choices=tuple(DTYPES), help="autocast dtype (fp32: no autocast)")
    p.add_argument("--providers", help=f"comma-separated subset of {','.join(PROVIDERS)} (default: all)")
    p.add_argument("--mode", choices=("train", "infer", "both"), default="both")
    p.add_argument("--repeats", type=int, help="timed repeats (median and spread over these)")
    p.add_argument("--iters", type=int, help="steps per timed repeat")
    p.add_argument("--warmup", type=int, help="untimed steps first (compilation, autotuning)")
    p.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: the device table)")
    p.add_argument("--device", help="cuda | cpu (default: cuda when present)")
    p.add_argument("--memory", action="store_true",
                   help="instead of timing, report memory (vitkernels/experiments/memory.py): bytes saved for the "
                        "backward, the peak of a training step (estimated without compute; measured too on a GPU), "
                        "an HBM-traffic proxy and gradient checkpointing, vs timm eager. Defaults: "
                        "vit_base_patch16_224, the peak at --batch-size 256 under --dtype bf16. Fake tensors live "
                        "on the GPU when one is visible, else on the CPU (--device is not used)")
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--seed", type=int, default=0)
    return p


# -- providers ---------------------------------------------------------------------------------------------
def why_skip(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot be timed here (None when it can)."""
    if provider.startswith("timm"):
        try:
            import timm  # noqa: F401
        except Exception as exc:  # noqa: BLE001
            return f"timm is not importable ({type(exc).__name__}: {exc})"
        return None
    backend = provider.split("-", 1)[1]
    why = harness.why_skip(backend, device)
    if why is not None:
        return why
    from vitkernels.backends import OPS, get_impl

    missing = [op for op in OPS if get_impl(backend).get_op(op) is None]
    return f"the {backend} backend has no {', '.join(missing)} op yet" if missing else None


def build(provider: str, cfg: dict, device: torch.device) -> torch.nn.Module:
    """A fresh model for ``provider`` with constructor arguments ``cfg``, on ``device`` (compiled for
    timm-compile)."""
    if provider.startswith("timm"):
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(**cfg).to(device)
        return torch.compile(model) if provider == "timm-compile" else model
    from vitkernels import VisionTransformer

    return VisionTransformer(**cfg, backend=provider.split("-", 1)[1]).to(device)


def make_step(provider: str, mode: str, cfg: dict, batch: int, dtype: str, device: torch.device, seed: int = 0):
    """A fresh model for ``provider`` and a function running one step of ``mode`` on a fixed random batch:
    train = forward (autocast) + cross-entropy + backward + AdamW step + zero_grad; infer = forward under
    inference_mode (autocast)."""
    torch.manual_seed(seed)
    model = build(provider, cfg, device)
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, cfg["in_chans"], cfg["img_size"], cfg["img_size"], generator=g, device=device)
    y = torch.randint(0, max(1, cfg["num_classes"]), (batch,), generator=g, device=device)
    if mode == "train":
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

        def step():
            with autocast(device, dtype):
                logits = model(x)
            F.cross_entropy(logits.float(), y).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    else:
        model.eval()

        def step():
            with torch.inference_mode(), autocast(device, dtype):
                model(x)
    return step


def time_provider(provider: str, mode: str, cfg: dict, batch: int, dtype: str, device: torch.device,
                  repeats: int, iters: int, warmup: int, seed: int) -> dict:
    """Time one provider in one mode (``harness.time_steps``); returns the measured fields of a result row."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    step = make_step(provider, mode, cfg, batch, dtype, device, seed)
    row = harness.time_steps(step, device, repeats=repeats, iters=iters, warmup=warmup)
    row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return row


def _free(device: torch.device) -> None:
    gc.collect()
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    if device.type == "cuda":
        torch.cuda.empty_cache()


# -- driver ------------------------------------------------------------------------------------------------
def resolve_args(args: argparse.Namespace, device: torch.device) -> argparse.Namespace:
    defaults = GPU_DEFAULT if device.type == "cuda" else CPU_DEFAULT
    explicit_model = args.model is not None
    for key, value in defaults.items():
        if getattr(args, key, None) is None and not (explicit_model and key in ("img_size", "patch_size", "depth")):
            setattr(args, key, value)
    args.skip_reasons = dict(CPU_DEFAULT_SKIP) if device.type == "cpu" and not args.providers else {}
    providers = [p.strip() for p in (args.providers or ",".join(PROVIDERS)).split(",") if p.strip()]
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        raise ValueError(f"unknown provider(s) {unknown}; choose from {', '.join(PROVIDERS)}")
    if "timm-eager" in providers:  # the baseline first, so speed-ups can be computed
        providers.remove("timm-eager")
        providers.insert(0, "timm-eager")
    args.providers = providers
    for key in ("repeats", "iters", "batch_size"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be at least 1")
    return args


def model_kwargs(args) -> dict:
    from vitkernels.models import model_config

    cfg = model_config(args.model)  # raises ValueError naming the known models
    for key in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "num_classes"):
        if getattr(args, key, None) is not None:
            cfg[key] = getattr(args, key)
    cfg.setdefault("in_chans", 3)
    return cfg


def run(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``; returns the report (see the module docstring)."""
    from vitkernels import flops

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args = resolve_args(args, device)
    cfg = model_kwargs(args)
    name = device_name(device)
    peak = args.peak_tflops if args.peak_tflops is not None else (
        mfu.peak_tflops(name, args.dtype) if device.type == "cuda" else None)
    modes = MODES if args.mode == "both" else (args.mode,)
    results = []
    for mode in modes:
        eager_ips = None
        fl = flops.count(cfg, batch_size=1, training=mode == "train").total
        for provider in args.providers:
            row = dict(provider=provider, mode=mode, model=args.model, img_size=cfg["img_size"],
                       patch_size=cfg["patch_size"], depth=cfg["depth"], embed_dim=cfg["embed_dim"],
                       batch_size=args.batch_size, dtype=args.dtype, img_per_s=None, ms_per_step=None,
                       ms_min=None, ms_max=None, spread_pct=None, tflops=None, mfu=None, peak_mem_mb=None,
                       speedup_vs_eager=None, flops_per_image=fl,
                       skipped=args.skip_reasons.get(provider) or why_skip(provider, device))
            if row["skipped"] is None:
                try:
                    row.update(time_provider(provider, mode, cfg, args.batch_size, args.dtype, device,
                                             args.repeats, args.iters, args.warmup, args.seed))
                except Exception as exc:  # noqa: BLE001 - one failing provider must not end the benchmark
                    first_line = str(exc).splitlines()[0][:300] if str(exc) else ""
                    row["skipped"] = f"failed: {type(exc).__name__}: {first_line}"
                finally:
                    _free(device)
            if row["skipped"] is None:
                ips = args.batch_size * 1e3 / row["ms_per_step"]
                row["img_per_s"] = ips
                row["tflops"] = ips * fl / 1e12
                row["mfu"] = mfu.mfu(ips * fl, name, args.dtype, peak) if peak else None
                if provider == "timm-eager":
                    eager_ips = ips
                row["speedup_vs_eager"] = ips / eager_ips if eager_ips else None
            results.append(row)
            if getattr(args, "verbose", True):
                print(format_row(row), flush=True)
    return dict(**harness.metadata(device), peak_tflops=peak,
                config=dict(model=args.model, model_kwargs=cfg, batch_size=args.batch_size, dtype=args.dtype,
                            repeats=args.repeats, iters=args.iters, warmup=args.warmup,
                            timing="cuda events" if device.type == "cuda" else "time.perf_counter"),
                results=results)


HEADER = (f"{'provider':18s} {'mode':5s} {'img/s':>9s} {'ms/step':>9s} {'spread':>7s} {'TFLOP/s':>8s} "
          f"{'MFU':>6s} {'mem MB':>8s} {'vs eager':>8s}")


def format_row(row: dict) -> str:
    if row["skipped"]:
        return f"{row['provider']:18s} {row['mode']:5s} skipped: {row['skipped']}"

    def fmt(v, spec, suffix=""):
        return "-" if v is None else format(v, spec) + suffix

    return (f"{row['provider']:18s} {row['mode']:5s} {row['img_per_s']:9.1f} {row['ms_per_step']:9.2f} "
            f"{fmt(row['spread_pct'], '6.1f', '%'):>7s} {row['tflops']:8.3g} "
            f"{fmt(None if row['mfu'] is None else 100 * row['mfu'], '5.1f', '%'):>6s} "
            f"{fmt(row['peak_mem_mb'], '8.0f'):>8s} {fmt(row['speedup_vs_eager'], '7.2f', 'x'):>8s}")


def write_json(path: str | None, report: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(report, f, indent=2, default=str)
        print(f"wrote {path}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    print(f"vitkernels bench on {device_name(torch.device(device))}")
    if args.memory:
        from vitkernels.experiments import memory

        print("memory report (estimates under FakeTensorMode: no compute) ...", flush=True)
        try:
            report = memory.report(args)
        except ValueError as exc:
            print(f"vitkernels bench: error: {exc}", file=sys.stderr)
            return 2
        print(memory.format_table(report))
        write_json(args.out, report)
        return 0
    print(HEADER, flush=True)
    try:
        report = run(args)
    except ValueError as exc:
        print(f"vitkernels bench: error: {exc}", file=sys.stderr)
        return 2
    c = report["config"]
    print(f"{c['model']} {c['model_kwargs']['img_size']}px batch {c['batch_size']} {c['dtype']}; "
          f"median of {c['repeats']} x {c['iters']} steps ({c['timing']}); {report['device']}, {report['date']}")
    write_json(args.out, report)
    return 0
