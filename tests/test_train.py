"""``python -m vitkernels train``: every dataset kind, metrics.json, learning above chance, bad input, exact
resume after SIGKILL, and 2-rank DistributedDataParallel on CPU (gloo). Tiny models, few steps, CPU."""

import io
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

from optional import requires

from tests.test_data import make_cifar_dir, make_folder
from vitkernels.experiments.train import TrainConfig, lr_at, main, param_groups, train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(embed_dim=32, depth=2, num_heads=2, mlp_ratio=2.0, batch_size=32, device="cpu", progress=False)
TINY_ARGS = ["--embed-dim", "32", "--depth", "2", "--num-heads", "2", "--mlp-ratio", "2", "--batch-size", "16",
             "--device", "cpu", "--no-progress", "--dataset", "digits"]


def _env():
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


@requires("sklearn")
def test_metrics_and_log(tmp_path):
    m = train(dict(TINY, dataset="digits", steps=12, eval_interval=6, out=str(tmp_path)))
    on_disk = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test_accuracy", "train_flops", "img_per_s", "mfu", "wall_s", "params", "steps", "epochs",
                "backend", "device", "model_config"):
        assert key in on_disk, key
    assert 0.0 <= on_disk["test_accuracy"] <= 1.0
    assert on_disk["mfu"] is None  # CPU
    assert on_disk["steps"] == 12 and on_disk["img_per_s"] > 0 and on_disk["wall_s"] > 0
    assert on_disk["train_flops"] == on_disk["train_flops_per_image"] * 12 * 32
    assert on_disk["model_config"]["img_size"] == 8 and on_disk["model_config"]["in_chans"] == 1
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    evals = [r for r in lines if "test_accuracy" in r]
    assert [r["step"] for r in steps] == list(range(1, 13))
    assert [r["step"] for r in evals] == [6, 12]
    assert all(set(r) >= {"loss", "lr", "img_per_s", "tflops"} for r in steps)
    assert m["test_accuracy"] == on_disk["test_accuracy"]
    assert os.path.exists(tmp_path / "model.pt")


@requires("sklearn")
def test_learns_digits_above_chance(tmp_path):
    # 4 tokens of 4x4 pixels; 120 steps reach ~0.4 (0.39 at step 100 when this test was written).
    m = train(dict(TINY, dataset="digits", patch_size=4, steps=120, lr=3e-3, label_smoothing=0.0,
                   out=str(tmp_path)))
    assert m["test_accuracy"] > 0.3, m["test_accuracy"]  # chance is 0.1


@pytest.mark.parametrize("kind", ["synthetic", "mnist5k", "cifar10",
                                  pytest.param("folder", marks=requires("PIL"))])
def test_every_dataset_kind(tmp_path, kind):
    if kind == "cifar10":
        dataset = f"cifar10:{make_cifar_dir(str(tmp_path / 'cifar'), per_batch=8)}"
    elif kind == "folder":
        dataset = f"folder:{make_folder(str(tmp_path / 'imgs'), per_class=8, size=16)}"
    else:
        dataset = kind
    m = train(dict(TINY, dataset=dataset, steps=2, batch_size=8, out=str(tmp_path / "run"),
                   img_size=16 if kind == "synthetic" else None))
    assert m["steps"] == 2 and 0.0 <= m["test_accuracy"] <= 1.0
    assert m["model_config"]["in_chans"] == (1 if kind == "mnist5k" else 3)


@requires("sklearn")
def test_options_amp_checkpointing_and_named_model(tmp_path):
    m = train(dict(TINY, dataset="digits", steps=3, amp="bf16", grad_checkpointing=True, label_smoothing=0.1,
                   clip_grad=0.5, out=str(tmp_path / "a")))
    assert m["hardware_flops_per_image"] > m["train_flops_per_image"]  # the recomputed forward
    m = train(dict(TINY, model="vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, dataset="digits",
                   steps=1, out=str(tmp_path / "b")))
    assert m["model_config"]["embed_dim"] == 32 and m["model_config"]["img_size"] == 16  # digits resized


@requires("sklearn")
def test_bad_input_gives_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown dataset 'nope'"):
        train(dict(TINY, dataset="nope", steps=1, out=str(tmp_path)))
    assert main(TINY_ARGS + ["--steps", "1", "--model", "vit_nope", "--out", str(tmp_path)]) == 2
    assert "unknown model 'vit_nope'" in capsys.readouterr().err
    assert main(TINY_ARGS[:-2] + ["--dataset", "cifar10", "--out", str(tmp_path)]) == 2
    assert "needs a directory" in capsys.readouterr().err


def test_schedule_and_weight_decay_groups():
    lrs = [lr_at(s, 100, 1.0, 10, 0.01) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # cosine decays
    assert lrs[-1] == pytest.approx(0.01, abs=1e-3)
    import vitkernels

    model = vitkernels.VisionTransformer(img_size=8, patch_size=4, embed_dim=16, depth=1, num_heads=2, num_classes=3)
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    no_names = {names[id(p)] for p in no_decay["params"]}
    assert {"pos_embed", "cls_token", "blocks.0.norm1.weight", "blocks.0.attn.qkv.bias"} <= no_names
    assert all(p.ndim >= 2 and names[id(p)] not in ("pos_embed", "cls_token") for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05


@requires("sklearn")
def test_resume_after_sigkill_is_bit_identical(tmp_path):
    """A run killed with SIGKILL after its first checkpoint and resumed ends with the same weights, bit for
    bit, as an uninterrupted run (CPU, deterministic)."""
    common = dict(TINY, dataset="digits", steps=12, ckpt_interval=4, deterministic=True, seed=3,
                  drop_path_rate=0.1, batch_size=16)  # stochastic depth: the RNG state must be restored too
    ref = tmp_path / "ref"
    train(dict(common, out=str(ref)))
    killed = tmp_path / "killed"
    args = TINY_ARGS + ["--steps", "12", "--ckpt-interval", "4", "--deterministic", "--seed", "3",
                        "--drop-path", "0.1", "--out", str(killed), "--debug-step-sleep", "0.5"]
    proc = subprocess.Popen([sys.executable, "-m", "vitkernels", "train", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 240
        while not (killed / "checkpoint.pt").exists():
            assert proc.poll() is None, f"run ended before its first checkpoint: {proc.stderr.read().decode()}"
            assert time.time() < deadline, "no checkpoint within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=60) == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (killed / "model.pt").exists()
    m = train(dict(common, out=str(killed), resume="auto"))
    assert 0 < m["resumed_from"] < 12 and m["steps"] == 12
    a = torch.load(ref / "model.pt")
    b = torch.load(killed / "model.pt")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs after resume"


RESUME_RUN = dict(TINY, dataset="digits", steps=12, ckpt_interval=4, eval_interval=6, deterministic=True, seed=3,
                  drop_path_rate=0.1, batch_size=16)


def _weights(path):
    return torch.load(path / "model.pt")


@requires("sklearn")
def test_resume_of_a_finished_run_keeps_what_it_produced(tmp_path, capsys):
    """Resuming a run whose last checkpoint is its final step (resumed twice, or killed after that checkpoint)
    reports it complete, exits 0, and leaves metrics.json and model.pt as they were (restored if lost)."""
    run = dict(RESUME_RUN, out=str(tmp_path))
    first = train(run)
    files = {name: (tmp_path / name).read_bytes() for name in ("metrics.json", "model.pt")}
    capsys.readouterr()
    for _ in range(2):
        again = train(dict(run, resume="auto"))
        assert again == first
        assert {name: (tmp_path / name).read_bytes() for name in files} == files
        assert "is complete (12 steps)" in capsys.readouterr().out
    (tmp_path / "metrics.json").unlink()
    (tmp_path / "model.pt").unlink()
    assert main(TINY_ARGS[:-2] + ["--dataset", "digits", "--out", str(tmp_path), "--resume"] +
                ["--steps", "12", "--ckpt-interval", "4", "--eval-interval", "6",
                 "--deterministic", "--seed", "3", "--drop-path", "0.1"]) == 0
    assert json.loads((tmp_path / "metrics.json").read_text()) == json.loads(files["metrics.json"])
    ref = _weights(tmp_path)
    assert all(torch.equal(ref[k], v) for k, v in torch.load(io.BytesIO(files["model.pt"])).items())


class _Killed(Exception):
    """Stands for a kill at one point of a run: what is on disk is what a SIGKILL there would leave."""


@requires("sklearn")
@pytest.mark.parametrize("where", ["right_after_a_checkpoint", "during_the_final_evaluation", "during_the_export"])
def test_resume_after_a_kill_finishes_the_run(tmp_path, monkeypatch, where):
    """Killed right after a checkpoint, during the final evaluation or during the export, a resumed run ends with
    the uninterrupted run's weights (bit for bit, CPU) and test accuracy, and writes metrics.json."""
    from vitkernels.experiments.train import checkpoint, loop

    ref = train(dict(RESUME_RUN, out=str(tmp_path / "ref")))
    out = tmp_path / where
    if where == "right_after_a_checkpoint":
        save = loop.save_checkpoint

        def killed_after(run, step, *args, **kwargs):
            save(run, step, *args, **kwargs)
            if step == 8:
                raise _Killed

        monkeypatch.setattr(loop, "save_checkpoint", killed_after)
    elif where == "during_the_final_evaluation":
        evaluate, calls = loop.evaluate, []

        def killed_in_second(*args, **kwargs):  # evaluations at steps 6 and 12
            calls.append(1)
            if len(calls) == 2:
                raise _Killed
            return evaluate(*args, **kwargs)

        monkeypatch.setattr(loop, "evaluate", killed_in_second)
    else:
        def killed_writing(obj, path):
            raise _Killed

        monkeypatch.setattr(checkpoint, "save_json_atomic", killed_writing)  # model.pt written, metrics.json not
    with pytest.raises(_Killed):
        train(dict(RESUME_RUN, out=str(out)))
    assert not (out / "metrics.json").exists()
    monkeypatch.undo()
    m = train(dict(RESUME_RUN, out=str(out), resume="auto"))
    assert m["resumed_from"] == 8 and m["steps"] == 12 and m["test_accuracy"] == ref["test_accuracy"]
    assert json.loads((out / "metrics.json").read_text())["test_accuracy"] == ref["test_accuracy"]
    a, b = _weights(tmp_path / "ref"), _weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@requires("sklearn")
def test_ddp_two_ranks_gloo(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "vitkernels", "train", *TINY_ARGS, "--steps", "4",
           "--ckpt-interval", "2", "--out", str(out)]
    env = _env()
    env["OMP_NUM_THREADS"] = "1"
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((out / "metrics.json").read_text())
    assert m["world_size"] == 2 and m["global_batch_size"] == 32 and m["steps"] == 4
    assert 0.0 <= m["test_accuracy"] <= 1.0
    assert (out / "checkpoint.pt").exists()
    assert len(torch.load(out / "checkpoint.pt", weights_only=False)["rng"]) == 2  # every rank's RNG state
