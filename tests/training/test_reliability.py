"""The trainer's guards (CPU, digits, a few steps): non-finite runs stop with an error and write no model, the CT
schedules count taken steps and keep their K when a run grows, resume repairs crash leftovers and checks checkpoint
hashes, one writer per run directory, the teacher's path and hash, students' dropout, LPIPS pooling and the Fourier
scale from the config, batches that cannot fit."""

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import cmfast
from cmfast import NETWORK_PRESETS
from cmfast.checkpoint import CheckpointError
from cmfast.checkpoint import save as save_model
from cmfast.cli import build_parser
from cmfast.cli.train import train_config
from cmfast.pipeline import run_pipeline
from cmfast.training import trainer as trainer_module
from cmfast.training.config import preset_config
from cmfast.training.distances import get_distance
from cmfast.training.state import ResumeError, TrainingError, list_checkpoints
from cmfast.training.trainer import Trainer, check_batch_fits

FAST = dict(batch_size=8, log_every=1, checkpoint_every=1000, ema_rates=(0.9,))


def edm_config(**kw):
    return preset_config("digits-edm", **{**FAST, "total_steps": 4, **kw})


def ct_config(**kw):
    """A CT run: its end-of-run samples take 3 network evaluations (an EDM teacher's Heun sampler takes 35)."""
    return preset_config("digits-ct", **{**FAST, "total_steps": 4, **kw})


def read_log(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def weights(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {f"{name}.{k}": v.clone() for name, m in trainer._modules().items() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    """An (untrained) EDM teacher with dropout 0.13, like the CIFAR-10 teacher."""
    torch.manual_seed(0)
    net = cmfast.build_network(dataclasses.replace(NETWORK_PRESETS["ddpmpp-digits8"], dropout=0.13))
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    save_model(cmfast.EDMDenoiser(net), path)
    return path


# --- non-finite runs ---------------------------------------------------------------------------------------------


def test_a_non_finite_update_stops_the_run_and_writes_nothing(tmp_path):
    trainer = Trainer(edm_config(), tmp_path, progress=False)
    trainer.optimizer.param_groups[0]["lr"] = float("inf")  # what `--lr inf` did before the config refused it
    with pytest.raises(TrainingError, match="step 1: the update made the weights non-finite"):
        trainer.train()
    assert not list_checkpoints(tmp_path) and not (tmp_path / "model.safetensors").exists()


def test_non_finite_weights_are_never_written(tmp_path):
    trainer = Trainer(edm_config(total_steps=1), tmp_path, progress=False)
    with torch.no_grad():
        next(iter(trainer.emas.values())).net.enc["8x8_conv"].weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="weights are not finite at step 1; no checkpoint"):
        trainer.train()
    assert not list_checkpoints(tmp_path) and not (tmp_path / "model.safetensors").exists()


def test_a_run_whose_steps_were_all_skipped_writes_no_model(tmp_path):
    trainer = Trainer(edm_config(total_steps=2), tmp_path, progress=False)
    loss_fn = trainer.loss_fn
    trainer.loss_fn = lambda *a, **k: loss_fn(*a, **k) * float("nan")
    with pytest.raises(TrainingError, match="all 2 steps were skipped"):
        trainer.train()
    assert not (tmp_path / "model.safetensors").exists()


def test_a_non_finite_teacher_is_refused(tmp_path, teacher):
    model = cmfast.load(teacher)
    with torch.no_grad():
        next(model.net.parameters()).fill_(float("nan"))
    save_model(model, tmp_path / "nan.safetensors")
    cfg = preset_config("digits-cd", teacher=str(tmp_path / "nan.safetensors"), total_steps=2, **FAST)
    with pytest.raises(CheckpointError, match="nan.safetensors: weights hold non-finite values"):
        Trainer(cfg, tmp_path / "cd", progress=False)  # refused at load, before any step
    assert not (tmp_path / "cd" / "lock").exists()


class SkipFirstStep:
    """A loss whose first call is NaN (a skipped step); records the schedule's k of every call."""

    def __init__(self, loss_fn):
        self.loss_fn, self.ks = loss_fn, []

    def __call__(self, *args, step, **kw):
        self.ks.append(step)
        return self.loss_fn(*args, step=step, **kw) * (float("nan") if len(self.ks) == 1 else 1.0)

    def __getattr__(self, name):
        return getattr(self.loss_fn, name)


def test_skip_lines_count_steps_like_the_others(tmp_path):
    trainer = Trainer(ct_config(total_steps=3), tmp_path, progress=False)
    trainer.loss_fn = SkipFirstStep(trainer.loss_fn)
    trainer.train()
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == [1, 1, 2, 3] and "skipped" in log[0]  # step 1's skip line, then its line


# --- the CT schedules --------------------------------------------------------------------------------------------


def test_ct_schedules_advance_only_on_taken_steps(tmp_path):
    trainer = Trainer(preset_config("digits-ct", total_steps=4, **FAST), tmp_path, progress=False)
    trainer.loss_fn = loss = SkipFirstStep(trainer.loss_fn)
    update, averaged = trainer._update_averages, []
    trainer._update_averages = lambda k: averaged.append(k) or update(k)
    trainer.train()
    assert loss.ks == [0, 0, 1, 2] and averaged == [0, 1, 2]  # N(k) and mu(k) at k = taken steps before
    assert [r.get("num_scales") for r in read_log(tmp_path) if "skipped" not in r] == [
        loss.num_scales(k) for k in (0, 0, 1, 2)
    ]


@pytest.mark.parametrize("name", ["digits-ct", "digits-ict"])
def test_k_steps_resume_k_steps_equals_2k_steps(tmp_path, name):
    """Growing a finished run keeps its schedule: k steps, then --resume --steps 2k, equals 2k steps straight with
    the schedule's K = k, bit for bit (weights and log)."""
    cfg = preset_config(name, total_steps=2, dropout=0.2, **FAST)
    torch.use_deterministic_algorithms(True)
    try:
        split = tmp_path / "split"
        Trainer(cfg, split, progress=False).train()
        args = build_parser().parse_args(["train-ct", "--run-dir", str(split), "--resume", "--steps", "4"])
        resumed = Trainer(train_config(args), split, resume=True, progress=False)
        resumed.train()
        straight_cfg = preset_config(name, total_steps=4, schedule_steps=2, dropout=0.2, **FAST)
        straight = Trainer(straight_cfg, tmp_path / "straight", progress=False)
        straight.train()
    finally:
        torch.use_deterministic_algorithms(False)
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_log(tmp_path / "straight")]
    assert strip == [{k: v for k, v in r.items() if k != "images_per_s"} for r in read_log(split)]
    assert json.loads((split / "config.json").read_text())["total_steps"] == 4


def test_resume_refuses_steps_below_the_run(tmp_path):
    Trainer(ct_config(total_steps=2), tmp_path, progress=False).train()
    with pytest.raises(ResumeError, match="--steps 1 is below the run's step 2"):
        Trainer(ct_config(total_steps=1), tmp_path, resume=True, progress=False)


# --- crash leftovers and checkpoint integrity --------------------------------------------------------------------


def test_resume_removes_stale_temporaries_and_replayed_log_lines(tmp_path):
    cfg = ct_config(checkpoint_every=2, keep_checkpoints=3)
    Trainer(cfg, tmp_path, progress=False).train()
    list_checkpoints(tmp_path)[-1].unlink()  # killed after step 4 was logged, before its checkpoint
    stale = [tmp_path / "checkpoints" / ".ckpt-00000004.safetensors.x1.tmp", tmp_path / ".model.safetensors.x2.tmp"]
    for p in stale:
        p.write_bytes(b"partial")
    resumed = Trainer(cfg, tmp_path, resume=True, progress=False)
    assert resumed.step == 2 and not any(p.exists() for p in stale)
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2]
    resumed.train()
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]


def test_a_corrupted_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    cfg = ct_config(checkpoint_every=2, keep_checkpoints=2)
    Trainer(cfg, tmp_path, progress=False).train()
    newest = list_checkpoints(tmp_path)[-1]
    data = bytearray(newest.read_bytes())
    data[-3] ^= 0x40  # tensor data (the header comes first), so the file still parses
    newest.write_bytes(bytes(data))
    resumed = Trainer(cfg, tmp_path, resume=True, progress=False)
    assert resumed.step == 2
    assert "ckpt-00000004.safetensors: corrupted training checkpoint" in capsys.readouterr().err


# --- one writer per run directory --------------------------------------------------------------------------------


def test_a_second_writer_is_refused(tmp_path):
    first = Trainer(ct_config(total_steps=1), tmp_path, progress=False)
    with pytest.raises(TrainingError, match=f"in use by process {os.getpid()}"):
        Trainer(ct_config(total_steps=1), tmp_path, resume=True, progress=False)
    first.train()
    assert not (tmp_path / "lock").exists()
    Trainer(ct_config(total_steps=1), tmp_path, resume=True, progress=False)


def test_a_lock_held_by_a_live_process_is_refused_and_a_dead_ones_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        with pytest.raises(TrainingError, match=f"in use by process {holder.pid}"):
            Trainer(ct_config(total_steps=1), tmp_path, progress=False)
    finally:
        holder.kill()
        holder.wait()
    Trainer(ct_config(total_steps=1), tmp_path, progress=False).train()  # the pid is gone: the lock is stale


# --- the teacher, students and network settings ------------------------------------------------------------------


def test_teacher_is_stored_absolute_with_its_hash_and_may_move(tmp_path, teacher, monkeypatch):
    (tmp_path / "t").mkdir()
    shutil.copy(teacher, tmp_path / "t" / "teacher.safetensors")
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "cd"
    Trainer(preset_config("digits-cd", teacher="t/teacher.safetensors", total_steps=1, **FAST), run, progress=False)
    stored = json.loads((run / "config.json").read_text())
    assert stored["teacher"] == str(tmp_path / "t" / "teacher.safetensors") and len(stored["teacher_sha256"]) == 64
    shutil.move(tmp_path / "t" / "teacher.safetensors", tmp_path / "moved.safetensors")
    monkeypatch.chdir(tmp_path / "t")

    def resume(*argv):
        args = build_parser().parse_args(["distill", "--run-dir", str(run), "--resume", *argv])
        return Trainer(train_config(args), run, resume=True, progress=False)

    with pytest.raises(ResumeError):  # found, but no checkpoint yet: the teacher check passed
        resume("--teacher", "../moved.safetensors")
    with pytest.raises(ValueError, match="if it moved, pass --teacher"):
        resume()
    other = cmfast.load(teacher)
    with torch.no_grad():
        next(other.net.parameters()).add_(1.0)
    save_model(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not this run's teacher"):
        resume("--teacher", str(tmp_path / "other.safetensors"))


def test_teacher_by_shipped_name(tmp_path, monkeypatch):
    from cmfast.checkpoint import ASSETS

    monkeypatch.chdir(tmp_path)
    run = tmp_path / "cd"
    Trainer(preset_config("digits-cd", teacher="digits-edm", total_steps=1, **FAST), run, progress=False)
    stored = json.loads((run / "config.json").read_text())
    assert stored["teacher"] == str((ASSETS / "digits-edm.safetensors").resolve())
    with pytest.raises(ValueError, match="must be an EDM denoiser"):
        Trainer(
            preset_config("digits-cd", teacher="digits-cd", total_steps=1, **FAST), tmp_path / "cd2", progress=False
        )


def test_students_default_to_dropout_zero(tmp_path, teacher):
    assert cmfast.load(teacher).net.config.dropout == 0.13
    cfg = preset_config("digits-cd", teacher=str(teacher), total_steps=1, **FAST)
    assert Trainer(cfg, tmp_path / "a", progress=False).net_config.dropout == 0.0
    cfg = preset_config("digits-cd", teacher=str(teacher), total_steps=1, dropout=0.1, **FAST)
    assert Trainer(cfg, tmp_path / "b", progress=False).net_config.dropout == 0.1


@pytest.mark.parametrize("pooling, kept, gone", [("avg", nn.AvgPool2d, nn.MaxPool2d), ("max", nn.MaxPool2d, None)])
def test_lpips_pooling_reaches_the_backbone(tmp_path, monkeypatch, pooling, kept, gone):
    """The config's pooling replaces the backbone's layers (random backbone weights: nothing is downloaded)."""
    monkeypatch.setattr(
        trainer_module, "get_distance", lambda name, **kw: get_distance(name, pretrained_backbone=False, **kw)
    )
    cfg = preset_config("digits-ct", distance="lpips", lpips_pooling=pooling, total_steps=1, **FAST)
    layers = [type(m) for m in Trainer(cfg, tmp_path, progress=False).loss_fn.distance.lpips.net.modules()]
    assert layers.count(kept) == 4 and (gone is None or gone not in layers)


def test_ict_fourier_scale_reaches_the_network(tmp_path):
    cfg = preset_config("digits-ct", network="ncsnpp-tiny", ict=True, total_steps=1, **FAST)
    assert cfg.fourier_scale == 0.02
    freqs = Trainer(cfg, tmp_path, progress=False).online.net.map_noise.freqs
    assert 0.01 < freqs.std().item() < 0.03
    with pytest.raises(ValueError, match="fourier_scale applies to NCSN"):
        Trainer(preset_config("digits-ct", fourier_scale=0.02, **FAST), tmp_path / "ddpmpp", progress=False)


# --- resources and the demo --------------------------------------------------------------------------------------


def test_a_batch_that_cannot_fit_is_refused_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="batch 100000000 cannot fit") as err:
        Trainer(edm_config(batch_size=100_000_000), tmp_path, progress=False)
    assert "\n" not in str(err.value)
    check_batch_fits(512, 3, 32, 80 * 2**30)  # CIFAR-10's batch on one GPU passes
    with pytest.raises(ValueError, match="lower --batch"):
        check_batch_fits(2048, 3, 256, 80 * 2**30)


def test_demo_refuses_an_earlier_demo(tmp_path):
    (tmp_path / "panel.png").write_bytes(b"earlier")
    with pytest.raises(ValueError, match="not empty .*remove it or pick another directory"):
        run_pipeline(tmp_path, 1, progress=False)
