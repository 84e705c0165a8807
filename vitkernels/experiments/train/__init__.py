"""``python -m vitkernels train``: train a ViT on an offline dataset, on any backend, on 1..N devices.

With no options it trains the embedded default: on a CPU a small ViT (28 px, patch 7, width 64, depth 4) on
``mnist5k`` for 25 epochs (about a minute and a half on 2 cores); on a GPU a wider, deeper one for longer, in bf16.
Any option given overrides the default's value. Multi-GPU: ``torchrun --nproc_per_node N -m vitkernels
train ...`` (``--batch-size`` is per process, as in timm's and torchvision's reference scripts); add ``--fsdp``
to shard the model, its gradients and AdamW states over the ranks (FSDP2) instead of replicating them (DDP):
docs/fsdp.md says when, and what each takes per GPU.

Outputs in ``--out``: ``log.jsonl`` (one line per step, plus eval lines), ``metrics.json``, ``model.pt``
(final weights) and ``checkpoint.pt`` (every ``--ckpt-interval`` steps, atomic; ``--resume`` continues it);
with ``--fsdp``, ``checkpoint/step_<N>/`` directories instead, written by every rank.
"""

from __future__ import annotations

import argparse
import json
import sys

from vitkernels.experiments.cli import ArgumentParser, add_options, error_line
from vitkernels.experiments.train.config import CPU_PRESET, GPU_PRESET, GROUPS, TrainConfig
from vitkernels.experiments.train.loop import lr_at, param_groups, train

__all__ = ["TrainConfig", "build_parser", "main", "parse_args", "train", "lr_at", "param_groups"]


def build_parser() -> argparse.ArgumentParser:
    """``vitkernels train``'s options: the fields of TrainConfig (see train/config.py)."""
    p = ArgumentParser(
        prog="vitkernels train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=f"CPU default: {json.dumps(CPU_PRESET)}\nGPU default: {json.dumps(GPU_PRESET)}")
    return add_options(p, TrainConfig, GROUPS)


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    args = build_parser().parse_args(argv)
    return TrainConfig(**vars(args))


def main(argv: list[str] | None = None) -> int:
    cfg = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        metrics = train(cfg)
    except (ValueError, FileNotFoundError, ImportError) as exc:  # one line, as every vitkernels command
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
