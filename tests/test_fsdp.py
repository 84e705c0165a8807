"""``vitkernels train --fsdp`` (FSDP2) on CPU with gloo, 2 ranks under torchrun, tiny models.

- Sharded steps equal single-process steps: the gradients of 3 steps within the budget of fp32 (bf16)
  reordering, step 1's AdamW update bit for bit given the gradients; on the torch and triton backends, with
  gradient checkpointing, a bf16 MixedPrecisionPolicy and CPU offload. The exported full state dict gives
  the sharded model's logits in a plain vitkernels model and in timm.
- A run whose rank 1 is SIGKILLed in the middle of a sharded save resumes from the previous checkpoint and
  ends with the uninterrupted run's weights, bit for bit.
- A 2-rank checkpoint (its last save killed after every shard was written, before the commit) reloads
  exactly on 1 rank, and the 1-rank continuation ends within budget of the 2-rank run.
"""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from optional import requires

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HERE = os.path.abspath(__file__)
TINY_ARGS = ["--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--mlp-ratio", "2", "--batch-size", "16",
             "--device", "cpu", "--no-progress", "--fsdp"]
# The model of the step test: 8x8 one-channel images, 4 patches of 4x4 and a class token.
STEP_MODEL = dict(img_size=8, patch_size=4, in_chans=1, num_classes=10, embed_dim=32, depth=2, num_heads=2,
                  mlp_ratio=2.0)
STEP_BATCH, STEPS, LR = 8, 3, 1e-2
# name -> (backend, amp, gradient checkpointing, CPU offload)
VARIANTS = {
    "fp32": ("torch", "none", False, False),
    "checkpointing": ("torch", "none", True, False),
    "bf16_policy": ("torch", "bf16", False, False),
    "offload": ("torch", "none", False, True),
    "triton": ("triton", "none", False, False),
}
# These runs are on CPU tensors (gloo): the triton backend runs there only in Triton's interpreter, which
# conftest.py turns on where no GPU is visible.
CPU_TRITON = os.environ.get("TRITON_INTERPRET") == "1"
NO_CPU_TRITON = pytest.mark.skipif(not CPU_TRITON, reason="the triton backend on CPU needs TRITON_INTERPRET=1")


def _variants() -> list:
    return [pytest.param(v, marks=NO_CPU_TRITON) if VARIANTS[v][0] == "triton" else v for v in VARIANTS]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "VITKERNELS_DEBUG_KILL"):
        env.pop(key, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, kill: str | None = None) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node 2 <args>``; ``kill``: VITKERNELS_DEBUG_KILL ("<rank>:<step>:<point>")."""
    env = _env()
    if kill:
        env["VITKERNELS_DEBUG_KILL"] = kill
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def _train_2ranks(*args, kill: str | None = None) -> subprocess.CompletedProcess:
    return _torchrun("-m", "vitkernels", "train", *TINY_ARGS, *args, kill=kill)


# -- one step, sharded vs one process -------------------------------------------------------------------
def _step_batch():
    """Images x (STEP_BATCH, 1, 8, 8) fp32 and labels y (STEP_BATCH,), the same on every process."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(STEP_BATCH, 1, 8, 8, generator=g)
    y = torch.randint(0, 10, (STEP_BATCH,), generator=g)
    return x, y


def _steps(model, optimizer, x, y, step_one=None):
    """STEPS AdamW steps with clipping on (x, y). Returns each step's gradients {name: full fp32 tensor}.
    ``step_one``: a dict that receives the clipped gradients of step 1 and the weights after it."""
    grads = []
    for step in range(STEPS):
        loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        loss.backward()
        grads.append({n: _full(p.grad).float().clone() for n, p in model.named_parameters()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if step == 0 and step_one is not None:
            step_one["clipped_1"] = {n: _full(p.grad).clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 0 and step_one is not None:
            step_one["weights_1"] = {n: _full(p.detach()).clone() for n, p in model.named_parameters()}
    return grads


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def _step_worker(out_path: str) -> None:
    """Under torchrun: every variant's sharded steps on this rank's half of the batch; rank 0 saves each
    step's gradients, step 1's clipped gradients and weights, the exported final weights and the sharded
    model's logits to ``out_path``."""
    from vitkernels.experiments.train import fsdp
    from vitkernels.experiments.train.loop import param_groups
    from vitkernels.nn import VisionTransformer

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo")
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    x, y = _step_batch()
    half = STEP_BATCH // world
    mine = slice(rank * half, (rank + 1) * half)  # the per-rank losses are means: their average is the batch's
    results = {}
    for name, (backend, amp, checkpointing, offload) in VARIANTS.items():
        if backend == "triton" and not CPU_TRITON:
            continue
        torch.manual_seed(0)
        model = VisionTransformer(**STEP_MODEL, backend=backend)
        model.set_grad_checkpointing(checkpointing)
        fsdp.shard(model, torch.device("cpu"), amp=amp, offload=offload)
        optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=LR)
        step_one = {}
        grads = _steps(model, optimizer, x[mine], y[mine], step_one)
        weights = fsdp.full_state_dict(model)
        model.eval()
        with torch.no_grad():
            logits = model(x).float()  # every rank runs the whole batch: the forward gathers collectively
        results[name] = dict(grads=grads, weights=weights, logits=logits, **step_one)
    if rank == 0:
        torch.save(results, out_path)
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _model(backend: str, checkpointing: bool, dtype=torch.float32):
    from vitkernels.nn import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(**STEP_MODEL, backend=backend)
    model.set_grad_checkpointing(checkpointing)
    return model.to(dtype)


def _one_process_grads(backend: str, checkpointing: bool, dtype: torch.dtype) -> list[dict]:
    """The same steps on one process and the whole batch, weights and ops in ``dtype`` (float64: the
    oracle; bfloat16: what a bf16 MixedPrecisionPolicy computes, fp32 master weights and optimizer)."""
    from vitkernels.experiments.train.loop import param_groups

    x, y = _step_batch()
    master = _model(backend, checkpointing, dtype if dtype != torch.bfloat16 else torch.float32)
    optimizer = torch.optim.AdamW(param_groups(master, 0.05), lr=LR)
    if dtype != torch.bfloat16:
        return _steps(master, optimizer, x.to(dtype), y)
    compute = _model(backend, checkpointing, dtype)
    grads = []
    for _ in range(STEPS):
        with torch.no_grad():
            for p, q in zip(master.parameters(), compute.parameters()):
                q.copy_(p)
        loss = torch.nn.functional.cross_entropy(compute(x.to(dtype)).float(), y)
        loss.backward()
        for p, q in zip(master.parameters(), compute.parameters()):
            p.grad, q.grad = q.grad.float(), None
        grads.append({n: p.grad.clone() for n, p in master.named_parameters()})
        torch.nn.utils.clip_grad_norm_(master.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return grads


def _err(a: dict, b: dict) -> dict:
    """Per tensor: max |a - b| / max |b| (in float64)."""
    return {k: ((a[k].double() - b[k].double()).abs().max() / b[k].double().abs().max().clamp_min(1e-30)).item()
            for k in b}


@pytest.fixture(scope="module")
def sharded_steps(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_step") / "results.pt"
    r = _torchrun(HERE, str(out))
    assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(out, weights_only=False)


@pytest.mark.parametrize("variant", _variants())
def test_sharded_steps_match_one_process(sharded_steps, variant):
    """The gradients of each of 3 steps: err(FSDP on 2 ranks) <= 2 err(one process, same precision) + floor,
    both against a float64 one-process oracle (the triton backend's oracle: the torch backend in float64)."""
    backend, amp, checkpointing, _ = VARIANTS[variant]
    got = sharded_steps[variant]["grads"]
    oracle = _one_process_grads("torch", checkpointing, torch.float64)
    low = torch.bfloat16 if amp == "bf16" else torch.float32
    ref = _one_process_grads(backend, checkpointing, low)
    floor = 1e-3 if low == torch.bfloat16 else 1e-6
    for step in range(STEPS):
        assert got[step].keys() == oracle[step].keys()
        e_ours, e_ref = _err(got[step], oracle[step]), _err(ref[step], oracle[step])
        for k in oracle[step]:
            assert torch.isfinite(got[step][k]).all(), f"{variant}: step {step + 1} gradient of {k} not finite"
            assert e_ours[k] <= 2 * e_ref[k] + floor, (
                f"{variant}: step {step + 1} gradient of {k}: FSDP error {e_ours[k]:.3g} > 2 x one-process "
                f"{e_ref[k]:.3g} + {floor}")


@pytest.mark.parametrize("variant", _variants())
def test_sharded_update_is_adamw_on_the_gathered_gradient(sharded_steps, variant):
    """Step 1's sharded AdamW update (on fp32 master shards, also under the bf16 policy) equals a plain
    AdamW step on the whole model given the same clipped gradients: bit for bit (it is elementwise)."""
    from vitkernels.experiments.train.loop import param_groups

    backend, _, checkpointing, _ = VARIANTS[variant]
    got = sharded_steps[variant]
    model = _model(backend, checkpointing)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=LR)
    for n, p in model.named_parameters():
        p.grad = got["clipped_1"][n].clone()
    optimizer.step()
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), got["weights_1"][n]), (
            f"{variant}: {n} differs by {(p.detach() - got['weights_1'][n]).abs().max().item():.3g}")


def test_offload_changes_nothing(sharded_steps):
    """CPU offload moves where the shards live, not what is computed: bit-identical to the plain run."""
    a, b = sharded_steps["fp32"], sharded_steps["offload"]
    for step in range(STEPS):
        assert all(torch.equal(a["grads"][step][k], b["grads"][step][k]) for k in a["grads"][step]), step
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])
    assert torch.equal(a["logits"], b["logits"])


@pytest.mark.parametrize("variant", ["fp32", "bf16_policy"])
def test_exported_weights_give_the_sharded_logits(sharded_steps, variant):
    """The full state dict gathered from the shards (what model.pt holds) loads strictly into
    vitkernels.create_model's class and gives the sharded model's logits (bf16: with bf16 weights and
    input, as the policy computes)."""
    from vitkernels.nn import VisionTransformer

    got = sharded_steps[variant]
    model = VisionTransformer(**STEP_MODEL, backend="torch").eval()
    model.load_state_dict(got["weights"], strict=True)
    x, _ = _step_batch()
    dtype = torch.bfloat16 if variant == "bf16_policy" else torch.float32
    with torch.no_grad():
        logits = model.to(dtype)(x.to(dtype)).float()
    assert torch.equal(logits, got["logits"]), (logits - got["logits"]).abs().max()


@requires("timm")
def test_exported_weights_load_in_timm(sharded_steps):
    from timm.models.vision_transformer import VisionTransformer as TimmViT

    got = sharded_steps["fp32"]
    model = TimmViT(**STEP_MODEL).eval()
    model.load_state_dict(got["weights"], strict=True)
    x, _ = _step_batch()
    with torch.no_grad():
        logits = model(x)
    err = ((logits - got["logits"]).abs().max() / got["logits"].abs().max()).item()
    assert err <= 1e-5, err


# -- training runs under torchrun: kill -9 during a save, resume, reshard --------------------------------
def _weights(path) -> dict:
    return torch.load(path, weights_only=True)


@requires("sklearn")
def test_resume_after_sigkill_during_a_sharded_save_is_bit_identical(tmp_path):
    """Rank 1 SIGKILLed at the start of the save at step 8 (the shards half written, nothing committed):
    the step-4 checkpoint stays the newest complete one, and the resumed run ends with the uninterrupted
    run's weights, bit for bit (stochastic depth: every rank's RNG state is restored too)."""
    run = ["--dataset", "digits", "--steps", "12", "--ckpt-interval", "4", "--deterministic", "--seed", "3",
           "--drop-path", "0.1"]
    r = _train_2ranks(*run, "--out", str(tmp_path / "ref"))
    assert r.returncode == 0, r.stderr[-4000:]
    killed = tmp_path / "killed"
    r = _train_2ranks(*run, "--out", str(killed), kill="1:8:save_start")
    assert r.returncode != 0 and "SIGKILL" in r.stderr, r.stderr[-4000:]
    assert sorted(os.listdir(killed / "checkpoint")) == [".tmp-step_00000008", "step_00000004"]
    assert not (killed / "model.pt").exists()
    r = _train_2ranks(*run, "--out", str(killed), "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    m = json.loads((killed / "metrics.json").read_text())
    assert m["resumed_from"] == 4 and m["steps"] == 12 and m["world_size"] == 2 and m["fsdp"] is True
    assert os.listdir(killed / "checkpoint") == ["step_00000012"]  # the leftover of the killed save is gone
    a, b = _weights(tmp_path / "ref" / "model.pt"), _weights(killed / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after the resume"


# synthetic images have no augmentation and drop-path is 0: 2 ranks x 16 and 1 rank x 32 see the same samples
# at every step, so a resharded continuation differs from the 2-rank run only in reduction order.
RESHARD = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, device="cpu", progress=False, fsdp=True,
               dataset="synthetic", img_size=8, patch_size=4, steps=8, ckpt_interval=4, seed=3)
RESHARD_ARGS = ["--dataset", "synthetic", "--img-size", "8", "--patch-size", "4", "--steps", "8",
                "--ckpt-interval", "4", "--seed", "3"]


def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path):
    """Rank 0 SIGKILLed after every shard of the final save was written but before the commit: step 4 is
    the newest checkpoint. On 1 rank (global batch kept: 1 x 32) it reloads exactly (weights and AdamW
    states equal DCP's own consolidation of the 2-rank files), and the continuation to step 8 ends within
    1% of each tensor's movement over those steps from the 2-rank run's weights."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from vitkernels.experiments.train import TrainConfig, fsdp, loop, train

    out = tmp_path / "run"
    r = _train_2ranks(*RESHARD_ARGS, "--out", str(out), kill="0:8:save_written")
    assert r.returncode != 0 and "SIGKILL" in r.stderr, r.stderr[-4000:]
    assert sorted(os.listdir(out / "checkpoint")) == [".tmp-step_00000008", "step_00000004"]
    assert ".metadata" in os.listdir(out / "checkpoint" / ".tmp-step_00000008")  # written, not committed
    two_ranks = _weights(out / "model.pt")  # exported before the final save: the 2-rank run's step 8

    one_rank = dict(RESHARD, batch_size=32, out=str(out), resume="auto")
    dist, device = loop.init_distributed("cpu", fsdp=True)
    try:
        run = loop.set_up(TrainConfig(**one_rank), dist, device)
        assert loop.resume(run).step == 4
        loaded = fsdp.full_state_dict(run.model)
        optim = get_optimizer_state_dict(run.model, run.optimizer, options=StateDictOptions(full_state_dict=True))
    finally:
        torch.distributed.destroy_process_group()
    dcp_to_torch_save(str(out / "checkpoint" / "step_00000004"), str(tmp_path / "step4.pt"))
    saved = torch.load(tmp_path / "step4.pt", weights_only=False)
    assert loaded.keys() == saved["model"].keys()
    assert all(torch.equal(loaded[k], saved["model"][k]) for k in loaded)
    assert optim["state"].keys() == saved["optimizer"]["state"].keys()
    for name, state in optim["state"].items():
        for key, value in state.items():
            assert torch.equal(value, saved["optimizer"]["state"][name][key]), (name, key)

    m = train(one_rank)
    assert m["resumed_from"] == 4 and m["steps"] == 8 and m["world_size"] == 1
    ours = _weights(out / "model.pt")
    for k in two_ranks:
        moved = (two_ranks[k] - saved["model"][k]).abs().max().item()
        err = (ours[k] - two_ranks[k]).abs().max().item()
        assert moved > 0 and err <= 1e-2 * moved, f"{k}: {err:.3g} from the 2-rank run, which moved {moved:.3g}"

    again = train(one_rank)  # a finished run: nothing to do, same metrics
    assert again == m
    with pytest.raises(ValueError, match="resume it with --fsdp"):
        train(dict(one_rank, fsdp=False))
    with pytest.raises(ValueError, match="global_batch_size"):
        train(dict(one_rank, batch_size=16))


def test_offload_needs_fsdp(tmp_path, capsys):
    from vitkernels.experiments.train import main

    assert main(["--fsdp-offload", "--dataset", "synthetic", "--steps", "1", "--out", str(tmp_path)]) == 2
    assert "--fsdp-offload needs --fsdp" in capsys.readouterr().err


if __name__ == "__main__":  # the torchrun worker of sharded_steps
    _step_worker(sys.argv[1])
