"""The training loop: ``train(config) -> metrics``.

One step: batch (augmented on the device) -> forward under autocast -> label-smoothed cross-entropy ->
backward (through a GradScaler for fp16) -> gradient-norm clipping -> AdamW with the learning rate of a
linear-warmup + cosine schedule evaluated per step. Under ``torchrun`` (RANK / WORLD_SIZE / LOCAL_RANK in the
environment) the model is wrapped in DistributedDataParallel; each rank reads its DistributedSampler shard of
the in-memory data; rank 0 alone logs and writes checkpoints.

With ``--fsdp`` the model is sharded with FSDP2 instead (``fsdp.py``: every rank holds 1/W of the weights,
gradients and AdamW states; a MixedPrecisionPolicy replaces autocast), also on one process (a one-rank
group). Its checkpoints are directories written by every rank at once with torch.distributed.checkpoint and
committed by a rename (``checkpoint.py``); they resume on the same number of ranks exactly, and on another
(resharded, with the same global batch); ``model.pt`` is gathered on rank 0's CPU one tensor at a time.

Exact resume: data order is a function of (seed, epoch), augmentation of (seed, step, rank), the learning
rate of the step; the checkpoint holds model, optimizer, scaler, step and every rank's RNG state. A run
killed at any point and resumed from its last checkpoint therefore ends with the same weights, bit for bit,
as an uninterrupted run (CPU, or ``--deterministic`` on a GPU), with DDP or FSDP2 alike.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vitkernels import flops as flopcount
from vitkernels.experiments import data as datasets
from vitkernels.experiments import mfu
from vitkernels.experiments.env import autocast, device_name, precision
from vitkernels.experiments.train import checkpoint as ckpt
from vitkernels.experiments.train.config import RESUME_AUTO, TrainConfig, resolve

CHECKPOINT = "checkpoint.pt"
SHARDED_CHECKPOINTS = "checkpoint"  # --fsdp: <out>/checkpoint/step_<N>/ (checkpoint.py)
# "<rank>:<step>:<point>": that rank SIGKILLs itself at that point of the save at that step (tests; points:
# save_start, after the temporary directory exists; save_written, after this rank's shards are written).
DEBUG_KILL = "VITKERNELS_DEBUG_KILL"


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
    owns_group: bool = False  # this run started the process group, so it ends it

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_distributed(device_arg: str | None, fsdp: bool = False) -> tuple[Dist, torch.device]:
    """Read torchrun's environment; start the process group (nccl on CUDA, gloo on CPU); pick the device.
    FSDP2 needs a process group on one process too: a one-rank group in this process (no rendezvous)."""
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
    backend = "nccl" if device.type == "cuda" else "gloo"
    if dist.enabled and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend)
        dist.owns_group = True
    elif fsdp and not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend, store=torch.distributed.HashStore(), rank=0, world_size=1)
        dist.owns_group = True
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


@torch.no_grad()
def evaluate(model, data: datasets.Data, batch_size: int, device, amp: str, img_size: int, dist: Dist,
             lockstep: bool = False) -> tuple[float, float]:
    """(accuracy, mean loss) on this rank's shard of the test split, summed over ranks. ``lockstep``: every
    rank runs the same number of forwards (FSDP gathers weights in each one, collectively); a rank whose
    shard is one sample shorter runs its last one on a stand-in batch that is not counted."""
    was_training = model.training
    model.eval()
    n = len(data.test_y)
    idx_all = torch.arange(n)[dist.rank::dist.world_size]
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    span = math.ceil(n / dist.world_size) if lockstep else len(idx_all)  # the longest shard
    for i in range(0, span, batch_size):
        idx = idx_all[i:i + batch_size]
        counted = len(idx) > 0
        x, y = datasets.make_batch(data, idx if counted else torch.arange(1), train=False, img_size=img_size)
        with autocast(device, amp):
            logits = model(x)
        if not counted:
            continue
        totals[0] += (logits.argmax(-1) == y).sum()
        totals[1] += F.cross_entropy(logits.float(), y, reduction="sum")
        totals[2] += len(y)
    if dist.enabled:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    correct, loss_sum, count = totals.tolist()
    return correct / max(count, 1), loss_sum / max(count, 1)


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


# -- set-up ------------------------------------------------------------------------------------------------
@dataclass
class Run:
    """What set-up builds and every later phase reads: the resolved config, the data, the model and its
    optimiser, the schedule's lengths and the FLOPs of one image."""

    cfg: TrainConfig  # resolved: no None left that a preset fills
    dist: Dist
    device: torch.device
    data: datasets.Data
    model_kw: dict  # VisionTransformer's constructor arguments
    model: torch.nn.Module  # the bare model (with --fsdp: sharded in place): weights, checkpoints
    net: torch.nn.Module  # what a step calls: the model, wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    batch: int  # per process
    steps_per_epoch: int
    total: int  # steps
    warmup: int  # steps
    eval_interval: int  # steps
    train_flops_per_image: float  # model FLOPs of a training step (3x forward)
    hw_flops_per_image: float  # with the forward recomputed under gradient checkpointing
    peak: float | None  # TFLOP/s, for MFU
    run_id: dict  # what a checkpoint must match to be resumed
    ckpt_path: str  # checkpoint.pt, or with --fsdp the directory of the sharded checkpoints
    autocast_amp: str  # what the forward runs under autocast: cfg.amp, or "none" where FSDP's policy casts

    @property
    def global_batch(self) -> int:
        return self.batch * self.dist.world_size

    @property
    def sharded(self) -> bool:
        return self.cfg.fsdp

    @property
    def img_size(self) -> int:
        return self.model_kw["img_size"]


def set_up(cfg: TrainConfig, dist: Dist, device: torch.device) -> Run:
    """Resolve the config, seed, load the data, build the model (identical on every rank), the optimiser and
    the schedule; create the output folder (rank 0)."""
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
    train_flops = flopcount.count(model, training=True, recompute=False).total  # of the whole, unsharded model
    hw_flops = flopcount.count(model, training=True).total
    if cfg.fsdp:
        from vitkernels.experiments.train import fsdp

        # Every rank built the same weights (seeded above); each keeps its shards.
        model = fsdp.shard(model, device, amp=cfg.amp, offload=cfg.fsdp_offload)
    torch.manual_seed(cfg.seed + dist.rank)  # dropout / stochastic depth differ across ranks

    # Steps: every rank sees ceil(n / world) samples per epoch (DistributedSampler), in full batches.
    n_rank = math.ceil(len(data.train_y) / dist.world_size)
    batch = min(cfg.batch_size, n_rank)
    steps_per_epoch = n_rank // batch
    total = cfg.steps if cfg.steps is not None else max(1, round(cfg.epochs * steps_per_epoch))
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, min(200, total // 10))

    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(0.9, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    net = model
    if dist.enabled and not cfg.fsdp:
        device_ids = [device.index] if device.type == "cuda" else None
        net = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids)
    if cfg.compile:
        net = torch.compile(net)

    peak = cfg.peak_tflops if cfg.peak_tflops is not None else (
        mfu.peak_tflops(device_name(device), precision(cfg.amp)) if device.type == "cuda" else None)
    if dist.main:
        os.makedirs(cfg.out, exist_ok=True)
    return Run(
        cfg=cfg, dist=dist, device=device, data=data, model_kw=kw, model=model, net=net, optimizer=optimizer,
        scaler=scaler, batch=batch, steps_per_epoch=steps_per_epoch, total=total, warmup=warmup,
        eval_interval=cfg.eval_interval or steps_per_epoch,
        train_flops_per_image=train_flops, hw_flops_per_image=hw_flops, peak=peak,
        run_id=dict(model=kw, dataset=cfg.dataset, batch_size=batch, world_size=dist.world_size, seed=cfg.seed,
                    total_steps=total),
        ckpt_path=os.path.join(cfg.out, SHARDED_CHECKPOINTS if cfg.fsdp else CHECKPOINT),
        autocast_amp="none" if cfg.fsdp else cfg.amp)


# -- resume and checkpoints --------------------------------------------------------------------------------
@dataclass
class Start:
    """Where the loop starts: step 0 of a new run, or the step of the checkpoint it resumes."""

    step: int = 0
    train_time_s: float = 0.0  # training time of the run before this process
    resumed_from: int | None = None
    metrics: dict | None = None  # the final checkpoint of a finished run holds its metrics: nothing is left


def resume(run: Run) -> Start:
    """With --resume, load the checkpoint (weights, optimiser, scaler, step, this rank's RNG state) after
    checking it belongs to the same run; without one, or for "auto" without a checkpoint: step 0.

    With --fsdp the checkpoint is the newest complete directory under <out>/checkpoint (or the given one);
    it may come from another number of ranks when the global batch is the same (DCP reshards it)."""
    cfg, dist = run.cfg, run.dist
    if not cfg.resume:
        return Start()
    auto = cfg.resume in RESUME_AUTO
    path = run.ckpt_path if auto else cfg.resume
    if run.sharded:
        path = ckpt.latest_sharded(path) or path
    found = ckpt.is_sharded(path) if run.sharded else os.path.isfile(path)
    if not found:
        _check_format(run, path, auto)
        if not auto:
            raise FileNotFoundError(f"--resume {path}: no such checkpoint")
        if dist.main:
            print(f"vitkernels train: no checkpoint at {path}; starting from step 0")
        return Start()
    state = ckpt.load(os.path.join(path, ckpt.EXTRA) if run.sharded else path, map_location=run.device)
    mismatch = _run_mismatch(state["run"], run.run_id, resharding=run.sharded)
    if mismatch:
        raise ValueError(f"cannot resume from {path}: the run differs in {mismatch} (checkpoint, now)")
    resharded = run.sharded and state["run"]["world_size"] != dist.world_size
    if run.sharded:
        from vitkernels.experiments.train import fsdp

        fsdp.load_sharded(run.model, run.optimizer, path)
        if resharded and dist.main:
            print(f"vitkernels train: resharding a checkpoint of {state['run']['world_size']} ranks onto "
                  f"{dist.world_size}; the weights and optimiser state load exactly, the continuation differs from "
                  "the original run's in reduction order and per-rank randomness")
    else:
        run.model.load_state_dict(state["model"])
        run.optimizer.load_state_dict(state["optimizer"])
    run.scaler.load_state_dict(state["scaler"])
    if resharded:  # other ranks, other streams: seeded from (seed, step, rank), not borrowed from another rank
        torch.manual_seed((cfg.seed * 1_000_003 + state["step"]) * 1_009 + dist.rank)
    else:
        rng = state["rng"][dist.rank] if dist.rank < len(state["rng"]) else state["rng"][0]
        ckpt.restore_rng(rng, run.device)
    metrics = state.get("metrics")
    done = os.path.join(cfg.out, "metrics.json")
    if metrics is None and state["step"] >= run.total and os.path.exists(done):
        # A final checkpoint from before checkpoints carried metrics: the run's own metrics.json, if finished.
        with open(done) as f:
            metrics = json.load(f)
        metrics = metrics if metrics.get("steps") == run.total and metrics.get("test_accuracy") is not None else None
    return Start(state["step"], state["train_time_s"], state["step"], metrics)


def _run_mismatch(saved: dict, now: dict, resharding: bool) -> dict:
    """{key: (checkpoint's, now)} for what differs between two run ids. ``resharding``: the number of ranks
    may differ, the global batch (per-rank batch x ranks) may not."""
    saved, now = dict(saved), dict(now)
    if resharding:
        for run_id in (saved, now):
            run_id["global_batch_size"] = run_id.pop("batch_size", 0) * run_id.pop("world_size", 0)
    return {k: (saved.get(k), v) for k, v in now.items() if saved.get(k) != v}


def _check_format(run: Run, path: str, auto: bool) -> None:
    """Where this run's kind of checkpoint is missing: if one of the other kind (sharded vs checkpoint.pt) is
    there, say so rather than start from step 0 or report it missing."""
    other = os.path.join(run.cfg.out, CHECKPOINT if run.sharded else SHARDED_CHECKPOINTS) if auto else path
    if run.sharded and os.path.isfile(other):
        raise ValueError(f"{other} was written without --fsdp; resume it without --fsdp")
    if not run.sharded and ckpt.latest_sharded(other):
        raise ValueError(f"{other} holds sharded checkpoints (written with --fsdp); resume it with --fsdp")


def save_checkpoint(run: Run, step: int, train_time_s: float, metrics: dict | None = None) -> None:
    """Every rank's RNG state gathered to rank 0, which writes the checkpoint atomically. The final one, written
    after model.pt and metrics.json, carries the metrics: a resume from it finds the run complete. With --fsdp
    every rank writes its shards (collective), rank 0 commits the directory (see checkpoint.py)."""
    dist, device = run.dist, run.device
    rngs = [ckpt.capture_rng(device)]
    if dist.enabled:
        rngs = [None] * dist.world_size
        torch.distributed.all_gather_object(rngs, ckpt.capture_rng(device))
        rngs = [{k: v.cpu() for k, v in r.items()} for r in rngs]
    small = dict(scaler=run.scaler.state_dict(), step=step, images_seen=step * run.global_batch,
                 train_time_s=train_time_s, rng=rngs, run=run.run_id, config=dataclasses.asdict(run.cfg),
                 metrics=metrics)
    if run.sharded:
        _save_sharded(run, step, small)
    elif dist.main:
        ckpt.save_atomic(dict(model=run.model.state_dict(), optimizer=run.optimizer.state_dict(), **small),
                         run.ckpt_path)


def _save_sharded(run: Run, step: int, small: dict) -> None:
    """Checkpoint ``step`` as a sharded directory: rank 0 creates the temporary directory, every rank writes
    its shards into it, rank 0 commits it (``small`` beside the shards, then the rename). A kill of any rank
    before the rename leaves the previous checkpoint the newest complete one."""
    from vitkernels.experiments.train import fsdp

    root, main = run.ckpt_path, run.dist.main
    if main:
        ckpt.begin_sharded(root, step)
    torch.distributed.barrier()  # the directory exists before any rank writes into it
    _debug_kill(run, step, "save_start")
    fsdp.save_sharded(run.model, run.optimizer, ckpt.tmp_dir(root, step))
    _debug_kill(run, step, "save_written")
    if main:
        ckpt.commit_sharded(root, step, small)
    torch.distributed.barrier()  # no rank goes on before the checkpoint is committed


def _debug_kill(run: Run, step: int, point: str) -> None:
    """SIGKILL this process when VITKERNELS_DEBUG_KILL names this rank, step and point (tests)."""
    if os.environ.get(DEBUG_KILL) == f"{run.dist.rank}:{step}:{point}":
        os.kill(os.getpid(), signal.SIGKILL)


def export_model(run: Run, path: str) -> None:
    """``model.pt``: the whole model's plain state dict (timm keys), written atomically by rank 0. With --fsdp
    every rank takes part (collective): the weights are gathered into rank 0's host memory tensor by tensor."""
    if run.sharded:
        from vitkernels.experiments.train import fsdp

        state = fsdp.full_state_dict(run.model)
    else:
        state = run.model.state_dict() if run.dist.main else None
    if run.dist.main:
        ckpt.save_atomic(state, path)


# -- one step ----------------------------------------------------------------------------------------------
def train_step(run: Run, step: int, idx: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Step ``step`` on the samples ``idx``: batch (augmented on the device) -> forward under autocast ->
    label-smoothed cross-entropy -> backward (scaled for fp16) -> clipping -> AdamW at the step's learning
    rate. Returns (the loss, still on the device; the learning rate)."""
    cfg, optimizer, scaler = run.cfg, run.optimizer, run.scaler
    x, y = datasets.make_batch(run.data, idx, train=True, img_size=run.img_size,
                               generator=datasets.step_generator(run.device, cfg.seed, step, run.dist.rank))
    lr = lr_at(step, run.total, cfg.lr, run.warmup, cfg.min_lr_ratio)
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast(run.device, run.autocast_amp):
        logits = run.net(x)
    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
    scaler.scale(loss).backward()
    if cfg.clip_grad:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(run.model.parameters(), cfg.clip_grad)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach(), lr


# -- the log -----------------------------------------------------------------------------------------------
class TrainLog:
    """The record of a run: log.jsonl and the progress bar (rank 0), throughput per log window (every rank).

    Step losses stay on the device until ``flush`` (one sync per window, not per step). The time between
    flushes is training time, except what ``restart_clock`` leaves out (evaluation, checkpoints); the first
    window (warm-up, compilation) is left out of the final throughput when there is a later one.
    """

    def __init__(self, run: Run, start: Start):
        self.run = run
        self.file = None
        if run.dist.main:
            self.file = open(os.path.join(run.cfg.out, "log.jsonl"), "a" if start.resumed_from is not None else "w")
        self.bar = None
        if run.dist.main and run.cfg.progress:
            from tqdm import tqdm

            self.bar = tqdm(total=run.total, initial=start.step, desc="train", unit="step", dynamic_ncols=True)
        self.pending: list[tuple[int, torch.Tensor, float]] = []  # (step, loss, lr) not yet written
        self.train_time = 0.0
        self.window_images = 0
        self.windows = 0
        self.warm_time, self.warm_images = 0.0, 0  # throughput excluding the first window
        self.last = dict(loss=float("nan"), img_per_s=0.0, tflops=0.0)
        self.t_mark = time.perf_counter()

    def step(self, step: int, loss: torch.Tensor, lr: float) -> None:
        self.window_images += self.run.global_batch
        self.pending.append((step, loss, lr))
        if self.bar is not None:
            self.bar.update(1)

    def flush(self) -> None:
        """Close the window: one device sync for its losses, its throughput, its lines in log.jsonl."""
        if not self.pending:
            return
        losses = torch.stack([p[1] for p in self.pending]).float().cpu().tolist()
        dt = time.perf_counter() - self.t_mark
        self.train_time += dt
        self.windows += 1
        if self.windows > 1:
            self.warm_time += dt
            self.warm_images += self.window_images
        ips = self.window_images / dt if dt > 0 else 0.0
        tfl = ips * self.run.train_flops_per_image / 1e12
        self.last.update(loss=losses[-1], img_per_s=ips, tflops=tfl)
        for (s, _, lr), loss in zip(self.pending, losses):
            self._write(step=s, epoch=s / self.run.steps_per_epoch, loss=loss, lr=lr, img_per_s=round(ips, 2),
                        tflops=round(tfl, 6))
        self._postfix()
        self.pending.clear()
        self.window_images = 0
        self.t_mark = time.perf_counter()

    def evaluation(self, step: int, accuracy: float, loss: float) -> None:
        self._write(step=step, test_accuracy=accuracy, test_loss=loss)
        self._postfix(acc=f"{accuracy:.3f}")

    def restart_clock(self) -> None:
        """What happened since the last flush (evaluation, a checkpoint) is not training time."""
        self.t_mark = time.perf_counter()

    def img_per_s(self, images: int) -> float:
        """Training throughput: after the first window when there was a later one, else over ``images``."""
        if self.warm_time > 0:
            return self.warm_images / self.warm_time
        return images / self.train_time if self.train_time > 0 else 0.0

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        if self.file is not None:
            self.file.close()
            self.file = None

    def _write(self, **record) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def _postfix(self, **extra) -> None:
        if self.bar is not None:
            last = self.last
            self.bar.set_postfix(loss=f"{last['loss']:.4f}", img_s=f"{last['img_per_s']:.0f}",
                                 tflops=f"{last['tflops']:.3g}", **extra)


def summary(run: Run, log: TrainLog, start: Start, step: int, test: tuple, wall_s: float) -> dict:
    """The metrics of a finished run (metrics.json)."""
    from vitkernels.backends import OPS, resolve as resolve_backend

    cfg, device = run.cfg, run.device
    images = step * run.global_batch
    img_per_s = log.img_per_s((step - start.step) * run.global_batch)
    achieved = img_per_s * run.train_flops_per_image
    name = device_name(device)
    return dict(
        test_accuracy=test[0], test_loss=test[1], final_loss=log.last["loss"],
        train_flops=run.train_flops_per_image * images, train_flops_per_image=run.train_flops_per_image,
        hardware_flops_per_image=run.hw_flops_per_image, img_per_s=img_per_s, tflops=achieved / 1e12,
        mfu=mfu.mfu(achieved, name, precision(cfg.amp), run.peak) if run.peak else None,
        peak_tflops=run.peak, wall_s=wall_s, train_time_s=start.train_time_s + log.train_time,
        params=sum(p.numel() for p in run.model.parameters()), steps=step, epochs=step / run.steps_per_epoch,
        steps_per_epoch=run.steps_per_epoch, images_seen=images, batch_size=run.batch,
        global_batch_size=run.global_batch, world_size=run.dist.world_size, backend=cfg.backend,
        backend_resolved={op: resolve_backend(op, cfg.backend, device)[0]
                          for op in OPS},
        device=name, amp=cfg.amp, compile=cfg.compile, grad_checkpointing=cfg.grad_checkpointing, fsdp=cfg.fsdp,
        dataset=cfg.dataset, model=cfg.model, model_config=run.model_kw, resumed_from=start.resumed_from,
        config={k: v for k, v in dataclasses.asdict(cfg).items() if k != "extra"},
    )


# -- the loop ----------------------------------------------------------------------------------------------
def train(config: TrainConfig | dict | None = None) -> dict:
    """Train a ViT as configured; return the metrics (also written to ``<out>/metrics.json`` by rank 0)."""
    t_start = time.perf_counter()
    cfg = config if isinstance(config, TrainConfig) else TrainConfig(**(config or {}))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts
    dist, device = init_distributed(cfg.device, cfg.fsdp)
    try:
        metrics = _train(cfg, dist, device, t_start)
    except BaseException:
        if dist.owns_group and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # no barrier: another rank may be gone
        raise
    if dist.owns_group:
        # Every rank past its last collective before the group goes: destroying it while a peer still has
        # work in flight can abort gloo ("terminate called without an active exception").
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def _evaluate(run: Run) -> tuple[float, float]:
    return evaluate(run.net, run.data, max(run.batch, 256), run.device, run.autocast_amp, run.img_size, run.dist,
                    lockstep=run.sharded)


def _train(cfg: TrainConfig, dist: Dist, device: torch.device, t_start: float) -> dict:
    run = set_up(cfg, dist, device)
    cfg = run.cfg
    start = resume(run)
    if start.metrics is not None:
        return _complete(run, start)
    log = TrainLog(run, start)
    try:
        step, test = start.step, (None, None)
        order_epoch, order = -1, None
        run.net.train()
        while step < run.total:
            epoch, i = divmod(step, run.steps_per_epoch)
            if epoch != order_epoch:
                order = datasets.epoch_indices(len(run.data.train_y), epoch, cfg.seed, dist.rank, dist.world_size)
                order_epoch = epoch
            loss, lr = train_step(run, step, order[i * run.batch:(i + 1) * run.batch])
            step += 1
            log.step(step, loss, lr)
            if cfg.debug_step_sleep:
                time.sleep(cfg.debug_step_sleep)
            checkpoint_due = bool(cfg.ckpt_interval) and step % cfg.ckpt_interval == 0
            eval_due = step % run.eval_interval == 0 or step == run.total
            if eval_due or checkpoint_due or len(log.pending) >= cfg.log_every:
                log.flush()
            if checkpoint_due and step < run.total:
                save_checkpoint(run, step, start.train_time_s + log.train_time)
            if eval_due:
                test = _evaluate(run)
                log.evaluation(step, *test)
            if eval_due or checkpoint_due:
                log.restart_clock()  # eval and checkpoint time is not training time
        log.flush()
        log.close()
        if test[0] is None:  # resumed at the last step of a run killed before its evaluation
            test = _evaluate(run)
        metrics = summary(run, log, start, step, test, time.perf_counter() - t_start)
        # Export first, then the final checkpoint that says so: a run killed before that checkpoint resumes
        # from the previous one and redoes what was left (training steps, evaluation, export); one killed after
        # it is complete. Each file is written atomically.
        export_model(run, os.path.join(cfg.out, "model.pt"))
        if dist.main:
            ckpt.save_json_atomic(metrics, os.path.join(cfg.out, "metrics.json"))
        if cfg.ckpt_interval:
            save_checkpoint(run, step, start.train_time_s + log.train_time, metrics)
        return metrics
    finally:
        log.close()


def _complete(run: Run, start: Start) -> dict:
    """A resume of a finished run: restore model.pt / metrics.json from the final checkpoint where they are
    missing (they were written before it, so normally both are there), and return the run's metrics."""
    out, metrics = run.cfg.out, start.metrics
    lost = [not os.path.exists(os.path.join(out, "model.pt"))]
    if run.sharded and run.dist.enabled:
        torch.distributed.broadcast_object_list(lost, src=0)  # the export is collective: rank 0's view decides
    if lost[0]:
        export_model(run, os.path.join(out, "model.pt"))
    if run.dist.main:
        if not os.path.exists(os.path.join(out, "metrics.json")):
            ckpt.save_json_atomic(metrics, os.path.join(out, "metrics.json"))
        print(f"vitkernels train: the run in {out} is complete ({start.step} steps); nothing left to do")
    return metrics
