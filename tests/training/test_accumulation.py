"""Gradient accumulation: K micro-batches give the update of one batch of K x the size. In float64 the accumulated
gradient equals the whole batch's to rounding; a CT run with --accum 4 follows the run without it (weights, target,
EMA, and N(k) / mu(k) advancing once per optimizer step); the batch arithmetic and the flags."""

import json

import pytest
import torch

from cmfast.cli import build_parser
from cmfast.cli.train import train_config
from cmfast.training.config import preset_config, resolve_accum
from cmfast.training.loader import sample_seed
from cmfast.training.trainer import Trainer

FAST = dict(log_every=1, checkpoint_every=1000, ema_rates=(0.9,), dropout=0.0)


def gradients(trainer: Trainer) -> list[torch.Tensor]:
    return [p.grad.clone() for p in trainer.online.parameters()]


def test_accumulated_gradient_equals_the_whole_batch_in_float64(tmp_path):
    """The EDM loss on 12 float64 images: three micro-batches of 4 (each mean / 3, gradients summed) against one
    batch of 12, and against an independent reference: the gradient of the mean of the 12 per-sample losses."""
    trainer = Trainer(preset_config("digits-edm", batch_size=12, **FAST), tmp_path, progress=False)
    trainer.online.double()
    images = trainer._read_step(0)[0][0].double() / 127.5 - 1

    def gens():
        return [torch.Generator().manual_seed(sample_seed(0, 0, p)) for p in range(12)]

    trainer.online.zero_grad(set_to_none=True)
    whole_loss = trainer._accumulate([(images, None, gens())])
    whole = gradients(trainer)
    trainer.online.zero_grad(set_to_none=True)
    g = gens()
    accum_loss = trainer._accumulate([(images[i : i + 4], None, g[i : i + 4]) for i in (0, 4, 8)])
    accumulated = gradients(trainer)
    trainer.online.zero_grad(set_to_none=True)
    per_sample = trainer.loss_fn(trainer.online, images, None, generator=gens())
    per_sample.mean().backward()
    reference = gradients(trainer)

    assert per_sample.dtype == torch.float64 and per_sample.shape == (12,)
    assert accum_loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-13)
    assert whole_loss.item() == pytest.approx(per_sample.mean().item(), rel=1e-13)
    for a, w, r in zip(accumulated, whole, reference):
        torch.testing.assert_close(a, r, rtol=1e-10, atol=1e-14)
        torch.testing.assert_close(w, r, rtol=1e-10, atol=1e-14)
    assert sum(r.abs().sum() for r in reference) > 0


def read_log(run) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_accum_4_follows_one_batch_of_16(tmp_path):
    """CT on the digits, 3 steps of a global batch of 16: as one batch, and as 4 micro-batches of 4. The online,
    target and EMA weights agree to float32 rounding, far below what the steps moved them; N(k) and mu(k) are logged
    with the same values, and the schedules' k counts optimizer steps, not micro-batches."""
    runs = {}
    for accum in (1, 4):
        cfg = preset_config("digits-ct", total_steps=3, batch_size=16, accum=accum, **FAST)
        trainer = Trainer(cfg, tmp_path / f"accum{accum}", progress=False)
        initial = {k: v.clone() for k, v in trainer.online.net.state_dict().items()}
        trainer.train()
        assert trainer.accum == accum and trainer.split.micro == 16 // accum
        assert trainer.taken_steps == trainer.step == 3
        runs[accum] = trainer
    one, four = runs[1], runs[4]
    for name in ("online", "target"):
        a, b = getattr(one, name).net.state_dict(), getattr(four, name).net.state_dict()
        for key in a:
            moved = (a[key] - initial[key]).abs().max()
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-6 + 1e-3 * float(moved))
    ema_one, ema_four = (next(iter(t.emas.values())).net.state_dict() for t in (one, four))
    for key in ema_one:
        torch.testing.assert_close(ema_four[key], ema_one[key], rtol=1e-5, atol=1e-6)
    moved = max(float((v - initial[k]).abs().max()) for k, v in one.online.net.state_dict().items())
    assert moved > 1e-4  # the steps really moved the weights
    logs = [read_log(tmp_path / f"accum{k}") for k in (1, 4)]
    assert [r["step"] for r in logs[1]] == [1, 2, 3]
    for r1, r4 in zip(*logs):
        assert (r4["num_scales"], r4["target_ema"]) == (r1["num_scales"], r1["target_ema"])
        assert r4["loss"] == pytest.approx(r1["loss"], rel=1e-5)
    schedule = four.loss_fn
    assert [r["num_scales"] for r in logs[1]] == [schedule.num_scales(k) for k in range(3)]
    assert [r["target_ema"] for r in logs[1]] == [schedule.target_ema(k) for k in range(3)]


@pytest.mark.parametrize(
    "batch, world, accum, micro, want",
    [(2048, 8, None, None, 1), (2048, 8, 4, None, 4), (2048, 8, None, 64, 4), (2048, 8, 4, 64, 4), (64, 1, 8, 8, 8)],
)
def test_accumulation_from_the_global_batch(batch, world, accum, micro, want):
    k = resolve_accum(batch, world, accum, micro)
    assert k == want and batch == world * k * (batch // world // k)


@pytest.mark.parametrize(
    "batch, world, accum, micro, match",
    [
        (2048, 8, None, 96, r"--micro-batch 96 does not divide the per-process batch 256"),
        (2048, 8, 3, None, r"--accum 3 does not divide the per-process batch 256"),
        (2048, 8, 2, 64, r"--accum 2 contradicts --micro-batch 64: .* makes 4 micro-batches"),
        (100, 8, None, None, "batch size 100 does not split evenly over 8 processes"),
    ],
)
def test_batches_that_do_not_split_are_refused(batch, world, accum, micro, match):
    with pytest.raises(ValueError, match=match):
        resolve_accum(batch, world, accum, micro)


def test_flags_reach_the_config(tmp_path):
    args = ["train-edm", "--accum", "2", "--micro-batch", "32", "--sharding", "fsdp", "--workers", "3"]
    cfg = train_config(build_parser().parse_args([*args, "--run-dir", str(tmp_path)]))
    assert (cfg.accum, cfg.micro_batch, cfg.sharding) == (2, 32, "fsdp")
    with pytest.raises(ValueError, match="accum must be a positive integer"):
        preset_config("digits-edm", accum=0)
    with pytest.raises(ValueError, match="fsdp' trains in fp32 or bf16"):
        preset_config("digits-edm", sharding="fsdp", mixed_precision="fp16")
    with pytest.raises(ValueError, match="--sharding fsdp needs several processes"):
        Trainer(preset_config("digits-edm", sharding="fsdp"), tmp_path / "one", progress=False)
