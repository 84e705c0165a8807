"""What a training run depends on: ``TrainConfig``, whose fields are also ``vitkernels train``'s options (each
declared once, on its field), and the embedded presets that fill what a run leaves unset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch

from vitkernels.experiments.cli import option

AMP_CHOICES = ("bf16", "fp16", "none")  # autocast dtype; none: fp32 without autocast
RESUME_AUTO = ("auto", "latest", "1", "true")  # --resume values meaning <out>/checkpoint.pt

# --help sections, in this order (the fields below are ordered by section).
GROUPS = {
    "model": "model (a name, or explicit sizes; sizes also override a named model)",
    "data": "data",
    "optimisation": "optimisation",
    "run": "run",
}


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` means: take the preset's value (``preset(device)``)."""

    model: str | None = option("model", "a vitkernels.list_models() name, e.g. vit_tiny_patch16_224")
    img_size: int | None = option("model", "input resolution (default: the dataset's, or the model's)")
    patch_size: int | None = option("model")
    embed_dim: int | None = option("model")
    depth: int | None = option("model")
    num_heads: int | None = option("model")
    mlp_ratio: float | None = option("model")
    drop_path_rate: float | None = option("model", "stochastic depth rate", flag="--drop-path")
    backend: str = option("model", "auto | triton | cuda | torch", default="auto")
    dataset: str | None = option("data", "synthetic | digits | mnist5k | cifar10:<dir> | folder:<dir>")
    workers: int = option("data", "threads decoding folder: images (0: auto)", default=0)
    epochs: float | None = option("optimisation", exclusive="length")
    steps: int | None = option("optimisation", exclusive="length")
    batch_size: int | None = option("optimisation", "per process")
    lr: float | None = option("optimisation", "peak learning rate (AdamW)")
    min_lr_ratio: float = option("optimisation", "final lr / peak lr of the cosine", default=0.01)
    weight_decay: float | None = option("optimisation")
    warmup_steps: int | None = option("optimisation", "default: 10% of the steps, at most 200")
    label_smoothing: float | None = option("optimisation")
    clip_grad: float | None = option("optimisation", "max gradient norm (0: off)")
    amp: str | None = option("optimisation", "autocast dtype (fp16 uses a GradScaler)", choices=AMP_CHOICES)
    compile: bool = option("optimisation", "torch.compile the model", default=False)
    grad_checkpointing: bool = option("optimisation", default=False)
    fsdp: bool = option("optimisation", "shard parameters, gradients and AdamW states over the ranks (FSDP2) "
                        "instead of replicating them (DDP); with --amp bf16|fp16 a MixedPrecisionPolicy replaces "
                        "autocast; checkpoints become sharded directories (see docs/fsdp.md)", default=False)
    fsdp_offload: bool = option("optimisation", "with --fsdp: keep sharded weights, gradients and AdamW states in "
                                "host memory and step AdamW on the CPU", default=False)
    seed: int = option("optimisation", default=0)
    deterministic: bool = option("optimisation", "deterministic algorithms (bit-identical reruns and resumes on "
                                 "a GPU too)", default=False)
    eval_interval: int | None = option("run", "steps between test evaluations (default: each epoch)")
    out: str = option("run", "output directory", default="runs/train")
    resume: str | None = option("run", "continue from <out>/checkpoint.pt (with --fsdp: the newest "
                                "<out>/checkpoint/step_*), or the given path", nargs="?", const="auto")
    ckpt_interval: int | None = option("run", "steps between checkpoints")
    device: str | None = option("run", "cpu | cuda | cuda:N (default: cuda when present)")
    peak_tflops: float | None = option("run", "peak TFLOP/s for MFU (default: the device table)")
    progress: bool = option("run", "no progress bar", flag="--no-progress", default=True)
    log_every: int = option("run", "steps per log flush (one device sync each)", default=10)
    # seconds slept after each step (tests kill a run mid-way)
    debug_step_sleep: float = option("run", default=0.0, hidden=True)
    extra: dict = field(default_factory=dict)


# Embedded defaults: with no options at all, `python -m vitkernels train` trains these.
CPU_PRESET = dict(dataset="mnist5k", embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0, drop_path_rate=0.0,
                  epochs=25, batch_size=64, lr=2e-3, weight_decay=0.05, label_smoothing=0.1, clip_grad=1.0,
                  amp="none")
GPU_PRESET = dict(dataset="mnist5k", embed_dim=192, depth=6, num_heads=3, mlp_ratio=4.0, drop_path_rate=0.1,
                  epochs=40, batch_size=128, lr=1e-3, weight_decay=0.05, label_smoothing=0.1, clip_grad=1.0,
                  amp="bf16")


def preset(device: torch.device) -> dict:
    return dict(GPU_PRESET if device.type == "cuda" else CPU_PRESET)


def resolve(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill every None from the device's preset; check the values no option type can."""
    cfg = dataclasses.replace(cfg)
    for key, value in preset(device).items():
        if getattr(cfg, key) is None and not (key == "epochs" and cfg.steps is not None):
            setattr(cfg, key, value)
    if cfg.amp not in AMP_CHOICES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {cfg.amp!r}")
    if cfg.steps is not None and cfg.steps < 1 or cfg.epochs is not None and cfg.epochs <= 0:
        raise ValueError("--steps / --epochs must be positive")
    if cfg.batch_size < 1:
        raise ValueError("--batch-size must be positive")
    if cfg.fsdp_offload and not cfg.fsdp:
        raise ValueError("--fsdp-offload needs --fsdp")
    return cfg
