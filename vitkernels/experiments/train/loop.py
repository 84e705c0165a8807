"""The training loop: ``train(config) -> metrics``.

One step: batch (augmented on the device) -> forward under autocast -> label-smoothed cross-entropy ->
backward (through a GradScaler for fp16) -> gradient-norm clipping -> AdamW with the learning rate of a
linear-warmup + cosine schedule evaluated per step. Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the
environment) the model is wrapped in DistributedDataParallel; each rank reads its DistributedSampler shard of
the in-memory data; rank 0 alone logs and writes checkpoints.

Exact resume: data order is a function of (seed, epoch), augmentation of (seed, step, rank), the learning
rate of the step; the checkpoint holds model, optimizer, scaler, step and every rank's RNG state. A run
killed at any point and resumed from its last checkpoint therefore ends with the same weights, bit for bit,
as an uninterrupted run (CPU, or ``--deterministic`` on a GPU).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from vitkernels import data as datasets
from vitkernels import flops as flopcount
from vitkernels.train import checkpoint as ckpt

CHECKPOINT = "checkpoint.pt"


@dataclass
class TrainConfig:
    """Everything a run depends on. ``None`` means: take the preset's value (``preset(device)``)."""

    model: str | None = None
    img_size: int | None = None
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_ratio: float | None = None
    drop_path_rate: float | None = None
    dataset: str | None = None
    epochs: float | None = None
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    min_lr_ratio: float = 0.01
    weight_decay: float | None = None
    warmup_steps: int | None = None
    label_smoothing: float | None = None
    clip_grad: float | None = None
    backend: str = "auto"
    amp: str | None = None
    compile: bool = False
    grad_checkpointing: bool = False
    seed: int = 0
    eval_interval: int | None = None
    out: str = "runs/train"
    resume: str | None = None
    ckpt_interval: int | None = None
    deterministic: bool = False
    device: str | None = None
    workers: int = 0
    peak_tflops: float | None = None
    progress: bool = True
    log_every: int = 10
    debug_step_sleep: float = 0.0  # seconds slept after each step (tests kill a run mid-way)
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


def default_patch_size(img_size: int) -> int:
    """A patch size giving 16-64 patches for small images (MNIST's 28 px: 4x4 patches of 7 px), 16 px for
    ImageNet-sized ones."""
    if img_size == 28:
        return 7
    for limit, patch in ((16, 2), (64, 4), (128, 8)):
        if img_size <= limit:
            return patch
    return 16


# -- distributed -------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str | None) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; start the process group (nccl on CUDA, gloo on CPU); pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dist = Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_arg:
        device = torch.device(device_arg)
    else:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank if dist.enabled else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if dist.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist, device


# -- pieces of the loop ------------------------------------------------------------------------------------
def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on norms, biases (ndim <= 1) and ``model.no_weight_decay()`` names."""
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name in skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_at(step: int, total: int, base: float, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``base * min_ratio`` at ``total``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}


def _autocast(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


@torch.no_grad()
def evaluate(model, data: datasets.Data, batch_size: int, device, amp: str, img_size: int, dist: Dist
             ) -> tuple[float, float]:
    """(accuracy, mean loss) on this rank's shard of the test split, summed over ranks."""
    was_training = model.training
    model.eval()
    n = len(data.test_y)
    idx_all = torch.arange(n)[dist.rank::dist.world_size]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for i in range(0, len(idx_all), batch_size):
        x, y = datasets.make_batch(data, idx_all[i:i + batch_size], train=False, img_size=img_size)
        with _autocast(device, amp):
            logits = model(x)
        totals[0] += (logits.argmax(-1) == y).sum()
        totals[1] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[2] += len(y)
    if dist.enabled:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    correct, loss_sum, count = totals.tolist()
    return correct / max(count, 1), loss_sum / max(count, 1)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def model_kwargs(cfg: TrainConfig, data: datasets.Data) -> dict:
    """VisionTransformer constructor arguments from --model and/or explicit sizes."""
    from vitkernels.models import model_config

    if cfg.model:
        kw = model_config(cfg.model)  # raises ValueError listing the known names
    else:
        img = cfg.img_size or data.img_size
        kw = dict(img_size=img, patch_size=default_patch_size(img), embed_dim=64, depth=4, num_heads=4,
                  mlp_ratio=4.0)
    for name in ("img_size", "patch_size", "embed_dim", "depth", "num_heads", "mlp_ratio", "drop_path_rate"):
        value = getattr(cfg, name)
        if value is not None:
            kw[name] = value
    if cfg.model is None and cfg.img_size is not None and cfg.patch_size is None:
        kw["patch_size"] = default_patch_size(cfg.img_size)
    kw.update(num_classes=data.num_classes, in_chans=data.in_chans)
    return kw


def resolve(cfg: TrainConfig, device: torch.device) -> TrainConfig:
    """Fill every None from the device's preset."""
    cfg = dataclasses.replace(cfg)
    for key, value in preset(device).items():
        if getattr(cfg, key) is None and not (key == "epochs" and cfg.steps is not None):
            setattr(cfg, key, value)
    if cfg.amp not in AMP_DTYPES:
        raise ValueError(f"--amp must be one of {', '.join(AMP_DTYPES)}, got {cfg.amp!r}")
    if cfg.steps is not None and cfg.steps < 1 or cfg.epochs is not None and cfg.epochs <= 0:
        raise ValueError("--steps / --epochs must be positive")
    if cfg.batch_size < 1:
        raise ValueError("--batch-size must be positive")
    return cfg


# -- the loop ----------------------------------------------------------------------------------------------
def train(config: TrainConfig | dict | None = None) -> dict:
    """Train a ViT as configured; return the metrics (also written to ``<out>/metrics.json`` by rank 0)."""
    t_start = time.perf_counter()
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    dist, device = init_distributed(cfg.device)
    try:
        return _train(cfg, dist, device, t_start)
    finally:
        if dist.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(cfg: TrainConfig, dist: Dist, device: torch.device, t_start: float) -> dict:
    from vitkernels.backends import resolve as resolve_backend
    from vitkernels.nn import VisionTransformer

    cfg = resolve(cfg, device)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    torch.manual_seed(cfg.seed)
    data = datasets.load(cfg.dataset, seed=cfg.seed, img_size=cfg.img_size, device=device, workers=cfg.workers)
    kw = model_kwargs(cfg, data)
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    model = VisionTransformer(**kw, backend=cfg.backend).to(device)
    if cfg.grad_checkpointing:
        model.set_grad_checkpointing(True)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout / stochastic depth differ across ranks
    img_size = kw["img_size"]

    # Steps: every rank sees ceil(n / world) samples per epoch (DistributedSampler), in full batches.
    n_rank = math.ceil(len(data.train_y) / dist.world_size)
    batch = min(cfg.batch_size, n_rank)
    steps_per_epoch = n_rank // batch
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, min(200, total // 10))
    eval_interval = cfg.eval_interval or steps_per_epoch
    global_batch = batch * dist.world_size

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    net = model
    if dist.enabled:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        net = torch.compile(net)

    train_flops_per_image = flopcount.count(model, training=True, recompute=False).total
    hw_flops_per_image = flopcount.count(model, training=True).total  # with recompute under checkpointing
    peak = cfg.peak_tflops if cfg.peak_tflops is not None else (
        flopcount.peak_tflops(device_name(device), "fp32" if cfg.amp == "none" else cfg.amp)
        if device.type == "cuda" else None)
    params = sum(p.numel() for p in model.parameters())
    run_id = dict(model=kw, dataset=cfg.dataset, batch_size=batch, world_size=dist.world_size, seed=cfg.seed,
                  total_steps=total)

    # Resume.
    if dist.main:
        os.makedirs(cfg.out, exist_ok=True)
    ckpt_path = os.path.join(cfg.out, CHECKPOINT)
    step, train_time_before, resumed_from = 0, 0.0, None
    if cfg.resume:
        path = ckpt_path if cfg.resume in ("auto", "latest", "1", "true") else cfg.resume
        if os.path.exists(path):
            state = ckpt.load(path, map_location=device)
            mismatch = {k: (state["run"].get(k), v) for k, v in run_id.items() if state["run"].get(k) != v}
            if mismatch:
                raise ValueError(f"cannot resume from {path}: the run differs in {mismatch} (checkpoint, now)")
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scaler.load_state_dict(state["scaler"])
            step = resumed_from = state["step"]
            train_time_before = state["train_time_s"]
            rng = state["rng"][dist.rank] if dist.rank < len(state["rng"]) else state["rng"][0]
            ckpt.restore_rng(rng, device)
        elif cfg.resume not in ("auto", "latest", "1", "true"):
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        elif dist.main:
            print(f"vitkernels train: no checkpoint at {path}; starting from step 0")

    log = None
    if dist.main:
        log = open(os.path.join(cfg.out, "log.jsonl"), "a" if resumed_from is not None else "w")
    bar = None
    if dist.main and cfg.progress:
        from tqdm import tqdm

        bar = tqdm(total=total, initial=step, desc="train", unit="step", dynamic_ncols=True)

    def save_checkpoint(step_now: int, images: int, train_time: float) -> None:
        rngs = [ckpt.capture_rng(device)]
        if dist.enabled:
            rngs = [None] * dist.world_size
            torch.distributed.all_gather_object(rngs, ckpt.capture_rng(device))
            rngs = [{k: v.cpu() for k, v in r.items()} for r in rngs]
        if dist.main:
            ckpt.save_atomic(dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                  scaler=scaler.state_dict(), step=step_now, images_seen=images,
                                  train_time_s=train_time, rng=rngs, run=run_id, config=dataclasses.asdict(cfg)),
                             ckpt_path)

    net.train()
    pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss, lr) not yet logged (avoids a sync per step)
    train_time = 0.0
    window_images = 0
    warm_time, warm_images = 0.0, 0  # throughput excluding the first log window (warm-up, compilation)
    windows = 0
    last = dict(loss=float("nan"), img_per_s=0.0, tflops=0.0)
    test_acc, test_loss = None, None
    order_epoch, order = -1, None
    t_mark = time.perf_counter()

    def flush() -> None:
        nonlocal train_time, window_images, t_mark, windows, warm_time, warm_images
        if not pending:
            return
        losses = torch.stack([p[1] for p in pending]).float().cpu().tolist()  # one sync for the window
        now = time.perf_counter()
        dt = now - t_mark
        train_time += dt
        windows += 1
        if windows > 1:
            warm_time += dt
            warm_images += window_images
        ips = window_images / dt if dt > 0 else 0.0
        tfl = ips * train_flops_per_image / 1e12
        last.update(loss=losses[-1], img_per_s=ips, tflops=tfl)
        if log is not None:
            for (s, _, lr), loss in zip(pending, losses):
                log.write(json.dumps(dict(step=s, epoch=s / steps_per_epoch, loss=loss, lr=lr,
                                          img_per_s=round(ips, 2), tflops=round(tfl, 6))) + "\n")
            log.flush()
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.4f}", img_s=f"{ips:.0f}", tflops=f"{tfl:.3g}")
        pending.clear()
        window_images = 0
        t_mark = time.perf_counter()

    while step < total:
        epoch, i = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order = datasets.epoch_indices(len(data.train_y), epoch, cfg.seed, dist.rank, dist.world_size)
            order_epoch = epoch
        idx = order[i * batch:(i + 1) * batch]
        x, y = datasets.make_batch(data, idx, train=True, img_size=img_size,
                                   generator=datasets.step_generator(device, cfg.seed, step, dist.rank))
        lr = lr_at(step, total, cfg.lr, warmup, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with _autocast(device, cfg.amp):
            logits = net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
        scaler.scale(loss).backward()
        if cfg.clip_grad:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window_images += global_batch
        pending.append((step, loss.detach(), lr))
        if bar is not None:
            bar.update(1)
        if cfg.debug_step_sleep:
            time.sleep(cfg.debug_step_sleep)
        boundary = step == total or step % eval_interval == 0 or (cfg.ckpt_interval and step % cfg.ckpt_interval == 0)
        if boundary or len(pending) >= cfg.log_every:
            flush()
        if cfg.ckpt_interval and step % cfg.ckpt_interval == 0 and step < total:
            save_checkpoint(step, step * global_batch, train_time_before + train_time)
        if step % eval_interval == 0 or step == total:
            test_acc, test_loss = evaluate(net, data, max(batch, 256), device, cfg.amp, img_size, dist)
            if log is not None:
                log.write(json.dumps(dict(step=step, test_accuracy=test_acc, test_loss=test_loss)) + "\n")
                log.flush()
            if bar is not None:
                bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['img_per_s']:.0f}",
                                tflops=f"{last['tflops']:.3g}", acc=f"{test_acc:.3f}")
        if boundary:
            t_mark = time.perf_counter()  # eval and checkpoint time is not training time
    flush()
    if bar is not None:
        bar.close()

    if cfg.ckpt_interval:
        save_checkpoint(step, step * global_batch, train_time_before + train_time)
    images = step * global_batch
    images_now = (step - (resumed_from or 0)) * global_batch
    img_per_s = (warm_images / warm_time) if warm_time > 0 else (images_now / train_time if train_time > 0 else 0.0)
    achieved = img_per_s * train_flops_per_image
    metrics = dict(
        test_accuracy=test_acc, test_loss=test_loss, final_loss=last["loss"],
        train_flops=train_flops_per_image * images, train_flops_per_image=train_flops_per_image,
        hardware_flops_per_image=hw_flops_per_image, img_per_s=img_per_s, tflops=achieved / 1e12,
        mfu=flopcount.mfu(achieved, device_name(device), "fp32" if cfg.amp == "none" else cfg.amp, peak)
        if peak else None,
        peak_tflops=peak, wall_s=time.perf_counter() - t_start, train_time_s=train_time_before + train_time,
        params=params, steps=step, epochs=step / steps_per_epoch, steps_per_epoch=steps_per_epoch,
        images_seen=images, batch_size=batch, global_batch_size=global_batch, world_size=dist.world_size,
        backend=cfg.backend,
        backend_resolved={op: resolve_backend(op, cfg.backend, device)[0]
                          for op in ("patch_embed", "layer_norm", "attention", "linear")},
        device=device_name(device), amp=cfg.amp, compile=cfg.compile, grad_checkpointing=cfg.grad_checkpointing,
        dataset=cfg.dataset, model=cfg.model, model_config=kw, resumed_from=resumed_from,
        config={k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"},
    )
    if dist.main:
        torch.save(model.state_dict(), os.path.join(cfg.out, "model.pt"))
        with open(os.path.join(cfg.out, "metrics.json"), "w") as f:
            json.dump(metrics, f, indent=2, default=str)
        log.close()
    return metrics
