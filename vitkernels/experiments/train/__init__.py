"""``python -m vitkernels train``: train a ViT on an offline dataset, on any backend, on 1..N devices.

With no options it trains the embedded default: on a CPU a small ViT (28 px, patch 7, width 64, depth 4) on
``mnist5k`` for 25 epochs (about a minute and a half on 2 cores); on a GPU a wider, deeper one for longer, in bf16.
Any option given overrides the default's value. Multi-GPU: ``torchrun --nproc_per_node N -m vitkernels
train ...`` (``--batch-size`` is per process, as in timm's and torchvision's reference scripts).

Outputs in ``--out``: ``log.jsonl`` (one line per step, plus eval lines), ``metrics.json``, ``model.pt``
(final weights) and ``checkpoint.pt`` (every ``--ckpt-interval`` steps, atomic; ``--resume`` continues it).
"""

from __future__ import annotations

import argparse
import json
import sys

from vitkernels.cli import ArgumentParser
from vitkernels.train.loop import CPU_PRESET, GPU_PRESET, TrainConfig, lr_at, param_groups, train

__all__ = ["TrainConfig", "main", "parse_args", "train", "lr_at", "param_groups"]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="vitkernels train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"CPU default: {json.dumps(CPU_PRESET)}\nGPU default: {json.dumps(GPU_PRESET)}")
    m = p.add_argument_group("model (a name, or explicit sizes; sizes also override a named model)")
    m.add_argument("--model", help="a vitkernels.list_models() name, e.g. vit_tiny_patch16_224")
    m.add_argument("--img-size", type=int, help="input resolution (default: the dataset's, or the model's)")
    m.add_argument("--patch-size", type=int)
    m.add_argument("--embed-dim", type=int)
    m.add_argument("--depth", type=int)
    m.add_argument("--num-heads", type=int)
    m.add_argument("--mlp-ratio", type=float)
    m.add_argument("--drop-path", dest="drop_path_rate", type=float, help="stochastic depth rate")
    m.add_argument("--backend", default="auto", help="auto | triton | cuda | torch")
    d = p.add_argument_group("data")
    d.add_argument("--dataset", help="synthetic | digits | mnist5k | cifar10:<dir> | folder:<dir>")
    d.add_argument("--workers", type=int, default=0, help="threads decoding folder: images (0: auto)")
    o = p.add_argument_group("optimisation")
    length = o.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=float)
    length.add_argument("--steps", type=int)
    o.add_argument("--batch-size", type=int, help="per process")
    o.add_argument("--lr", type=float, help="peak learning rate (AdamW)")
    o.add_argument("--min-lr-ratio", type=float, default=0.01, help="final lr / peak lr of the cosine")
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--warmup-steps", type=int, help="default: 10%% of the steps, at most 200")
    o.add_argument("--label-smoothing", type=float)
    o.add_argument("--clip-grad", type=float, help="max gradient norm (0: off)")
    o.add_argument("--amp", choices=("bf16", "fp16", "none"), help="autocast dtype (fp16 uses a GradScaler)")
    o.add_argument("--compile", action="store_true", help="torch.compile the model")
    o.add_argument("--grad-checkpointing", action="store_true")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--deterministic", action="store_true",
                   help="deterministic algorithms (bit-identical reruns and resumes on a GPU too)")
    r = p.add_argument_group("run")
    r.add_argument("--eval-interval", type=int, help="steps between test evaluations (default: each epoch)")
    r.add_argument("--out", default="runs/train", help="output directory")
    r.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from <out>/checkpoint.pt (or the given path)")
    r.add_argument("--ckpt-interval", type=int, help="steps between checkpoints")
    r.add_argument("--device", help="cpu | cuda | cuda:N (default: cuda when present)")
    r.add_argument("--peak-tflops", type=float, help="peak TFLOP/s for MFU (default: the device table)")
    r.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    r.add_argument("--log-every", type=int, default=10, help="steps per log flush (one device sync each)")
    r.add_argument("--debug-step-sleep", type=float, default=0.0, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        metrics = train(cfg)
    except (ValueError, FileNotFoundError, ImportError) as exc:  # one line, as every vitkernels command
        from vitkernels.__main__ import error_line

        print(f"vitkernels train: error: {error_line(exc)}", file=sys.stderr)
        return 2
    if metrics.get("world_size", 1) == 1 or _rank() == 0:
        acc = metrics["test_accuracy"]
        mfu = metrics["mfu"]
        print(f"test accuracy {acc:.4f} | {metrics['img_per_s']:.1f} img/s | {metrics['tflops']:.3f} TFLOP/s"
              f"{f' | MFU {100 * mfu:.1f}%' if mfu is not None else ''} | {metrics['steps']} steps in "
              f"{metrics['wall_s']:.1f} s | {cfg.out}/metrics.json")
    return 0


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", "0"))
