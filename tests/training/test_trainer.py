"""The trainer end to end on the built-in digits (CPU): losses fall, resume is bit-exact, 2 gloo processes equal 1,
fp16 recovers from overflow, repeated non-finite steps stop the run, a truncated checkpoint falls back."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import cmfast
from cmfast.training.config import TrainConfig, preset_config
from cmfast.training.state import TrainingError, list_checkpoints
from cmfast.training.trainer import Trainer

FAST = dict(batch_size=8, log_every=1, checkpoint_every=1000, ema_rates=(0.9,))


def edm_config(**kw) -> TrainConfig:
    return preset_config("digits-edm", **{**FAST, "total_steps": 4, **kw})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("teacher")
    return str(Trainer(edm_config(total_steps=3), run, progress=False).train())


def read_log(run_dir: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"online.{k}": v.clone() for k, v in trainer.online.net.state_dict().items()}
    for rate, model in trainer.emas.items():
        out.update({f"ema{rate}.{k}": v.clone() for k, v in model.net.state_dict().items()})
    if trainer.target is not None:
        out.update({f"target.{k}": v.clone() for k, v in trainer.target.net.state_dict().items()})
    return out


def test_run_directory_outputs(tmp_path, teacher):
    run = tmp_path / "cd"
    path = Trainer(preset_config("digits-cd", teacher=teacher, total_steps=2, **FAST), run, progress=False).train()
    assert path == run / "model.safetensors"
    model = cmfast.load(path)
    assert isinstance(model, cmfast.ConsistencyModel)
    assert (run / "config.json").exists() and (run / "online.safetensors").exists()
    assert [r["step"] for r in read_log(run)] == [1, 2]
    assert {p.name for p in (run / "samples").iterdir()} == {"step-00000002-1step.png", "step-00000002-2step.png"}
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-00000002.safetensors"]


@pytest.mark.parametrize(
    "name, extra",
    [("digits-edm", {}), ("digits-cd", {}), ("digits-ct", {}), ("digits-ict", {})],
)
def test_losses_fall_on_digits(tmp_path, teacher, name, extra):
    """A short run: the mean loss over the last steps is clearly below the first steps' (same noise draws per step
    would be ideal; averaging over 10 steps keeps the check robust)."""
    if name == "digits-cd":
        extra = {"teacher": teacher}
    steps = 60
    cfg = preset_config(
        name, total_steps=steps, batch_size=32, log_every=1, checkpoint_every=1000, ema_rates=(), lr=2e-3, **extra
    )
    Trainer(cfg, tmp_path / name, progress=False).train()
    losses = [r["loss"] for r in read_log(tmp_path / name)]
    assert len(losses) == steps and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


@pytest.mark.parametrize("name", ["digits-edm", "digits-cd", "digits-ct"])
def test_resume_is_bit_exact(tmp_path, teacher, name):
    extra = {"teacher": teacher} if name == "digits-cd" else {}
    cfg = preset_config(name, total_steps=4, dropout=0.2, **{**FAST, **extra})
    torch.use_deterministic_algorithms(True)
    try:
        straight = Trainer(cfg, tmp_path / "straight", progress=False)
        straight.train()
        part = Trainer(cfg, tmp_path / "split", progress=False)
        part.train(stop_at=2)
        resumed = Trainer(cfg, tmp_path / "split", resume=True, progress=False)
        assert resumed.step == 2
        resumed.train()
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert read_log(tmp_path / "straight") == [
        {**r, "images_per_s": s["images_per_s"]}
        for r, s in zip(read_log(tmp_path / "split"), read_log(tmp_path / "straight"))
    ]


def test_learning_rate_decays_and_resumes(tmp_path):
    """With lr_decay 1 the update of step k (0-based) of K runs at lr (K - k) / K, and a run stopped half-way and
    resumed takes the same steps as one run straight through."""
    cfg = edm_config(total_steps=4, lr_decay=1.0)
    straight = Trainer(cfg, tmp_path / "straight", progress=False)
    rates = []
    for _ in range(4):
        straight.train_step()
        rates.append(straight.optimizer.param_groups[0]["lr"])
    assert rates == pytest.approx([cfg.lr * f for f in (1.0, 0.75, 0.5, 0.25)], rel=1e-12)
    torch.use_deterministic_algorithms(True)
    try:
        whole = Trainer(cfg, tmp_path / "whole", progress=False)
        whole.train()
        Trainer(cfg, tmp_path / "split", progress=False).train(stop_at=2)
        resumed = Trainer(cfg, tmp_path / "split", resume=True, progress=False)
        resumed.train()
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = weights(whole), weights(resumed)
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_truncated_newest_checkpoint_falls_back(tmp_path, capsys):
    cfg = edm_config(checkpoint_every=2, total_steps=4, keep_checkpoints=2)
    Trainer(cfg, tmp_path, progress=False).train()
    newest = list_checkpoints(tmp_path)[-1]
    newest.write_bytes(newest.read_bytes()[:500])
    resumed = Trainer(cfg, tmp_path, resume=True, progress=False)
    assert resumed.step == 2
    assert "ckpt-00000004.safetensors" in capsys.readouterr().err


def test_keeps_the_last_checkpoints(tmp_path):
    Trainer(edm_config(total_steps=5, checkpoint_every=1, keep_checkpoints=2), tmp_path, progress=False).train()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000004.safetensors", "ckpt-00000005.safetensors"]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_refuses_to_overwrite_a_run(tmp_path):
    Trainer(edm_config(total_steps=1), tmp_path, progress=False).train()
    with pytest.raises(ValueError, match="already holds checkpoints"):
        Trainer(edm_config(total_steps=1), tmp_path, progress=False)


def test_fp16_recovers_from_overflow(tmp_path):
    trainer = Trainer(edm_config(mixed_precision="fp16", total_steps=30), tmp_path, progress=False)
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**24)  # far too large: early steps must overflow
    trainer.train()
    log = read_log(tmp_path)
    skipped = [r for r in log if "skipped" in r]
    assert skipped and skipped[0]["step"] == 1  # steps done, as the other lines count
    assert trainer.scaler.get_scale() < 2.0**24
    assert any("skipped" not in r for r in log[len(skipped) :])  # training went on after the overflows
    assert all(torch.isfinite(p).all() for p in trainer.online.parameters())


def test_repeated_non_finite_steps_stop_the_run(tmp_path):
    trainer = Trainer(edm_config(max_bad_steps=2), tmp_path, progress=False)
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda *a, **k: loss_fn(*a, **k) * float("nan")
    before = [p.clone() for p in trainer.online.parameters()]
    with pytest.raises(TrainingError, match="3 consecutive steps had non-finite loss"):
        trainer.train()
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.online.parameters()))  # no step was applied


def test_data_that_does_not_fit_the_network(tmp_path):
    with pytest.raises(ValueError, match="network takes 1x16x16"):
        Trainer(edm_config(network="ddpmpp-digits", dataset="digits8"), tmp_path, progress=False)


def test_two_gloo_processes_equal_one(tmp_path):
    args = [
        "train-edm",
        "--steps",
        "3",
        "--batch",
        "8",
        "--ema",
        "0.9",
        "--no-progress",
        "--device",
        "cpu",
        "--log-every",
        "1",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run(
        [sys.executable, "-m", "cmfast", *args, "--run-dir", str(tmp_path / "one")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert single.returncode == 0, single.stderr
    multi = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "cmfast",
            *args,
            "--run-dir",
            str(tmp_path / "two"),
        ],
        capture_output=True,
        text=True,
        env=env,
    )
    assert multi.returncode == 0, multi.stderr[-3000:]
    one, two = (load_file(str(tmp_path / d / "online.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys()
    initial = Trainer(edm_config(total_steps=3, ema_rates=(0.9,)), tmp_path / "init", progress=False).online.net
    moved = 0
    for key, value in initial.state_dict().items():
        torch.testing.assert_close(two[key], one[key], rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(one[key], value))
    assert moved > 10  # the runs really trained
    losses = [[r["loss"] for r in read_log(tmp_path / d)] for d in ("one", "two")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
