"""The captured distillation step (cmfast.training.graph_step) against the eager step: the same weights after several
steps (CUDA); what it refuses and why, and the CPU fallback (everywhere)."""

import pytest
import torch

from cmfast.training.config import preset_config
from cmfast.training.graph_step import captured_step_problems
from cmfast.training.state import TrainingError
from cmfast.training.trainer import Trainer

FAST = dict(batch_size=8, log_every=1, checkpoint_every=1000, ema_rates=(0.9,), sample_every=0)
cuda = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    run = tmp_path_factory.mktemp("teacher")
    config = preset_config("digits-edm", **{**FAST, "total_steps": 3})
    return str(Trainer(config, run, progress=False, device="cpu").train())


def _state(trainer):
    out = {f"online.{k}": v.detach().cpu().clone() for k, v in trainer.online.net.state_dict().items()}
    out.update({f"target.{k}": v.detach().cpu().clone() for k, v in trainer.target.net.state_dict().items()})
    for rate, model in trainer.emas.items():
        out.update({f"ema{rate}.{k}": v.detach().cpu().clone() for k, v in model.net.state_dict().items()})
    return out


def test_problems_are_named(tmp_path, teacher):
    config = preset_config("digits-cd", teacher=teacher, dropout=0.1, mixed_precision="fp16", lr_decay=0.5, **FAST)
    trainer = Trainer(config, tmp_path / "run", progress=False, device="cpu")
    problems = " | ".join(captured_step_problems(trainer))
    for words in ("CUDA device", "dropout 0.1", "fp16", "lr_decay 0.5"):
        assert words in problems


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback on machines without CUDA")
def test_cpu_falls_back_to_the_eager_step(tmp_path, teacher, capsys):
    config = preset_config("digits-cd", teacher=teacher, total_steps=2, **FAST)
    graphed = Trainer(config, tmp_path / "a", progress=False, device="cpu", graph=True)
    assert "training eagerly" in capsys.readouterr().out and not graphed.graph
    graphed.train()
    eager = Trainer(config, tmp_path / "b", progress=False, device="cpu")
    eager.train()
    for k, v in _state(eager).items():
        assert torch.equal(v, _state(graphed)[k]), k


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda)])
def test_captured_steps_follow_the_eager_steps(tmp_path, teacher, precision, _):
    config = preset_config("digits-cd", teacher=teacher, total_steps=5, mixed_precision=precision, **FAST)
    runs = {}
    for graph in (False, True):
        trainer = Trainer(config, tmp_path / str(graph), progress=False, device="cuda", graph=graph)
        losses = [trainer.train_step()["loss"] for _ in range(5)]
        runs[graph] = (losses, _state(trainer))
    (eager_losses, eager), (graph_losses, graphed) = runs[False], runs[True]
    rtol = 1e-4 if precision == "no" else 2e-2
    torch.testing.assert_close(torch.tensor(graph_losses), torch.tensor(eager_losses), rtol=rtol, atol=1e-6)
    start = Trainer(config, tmp_path / "start", progress=False, device="cuda")
    moved = 0
    for k, v in eager.items():
        torch.testing.assert_close(graphed[k], v, rtol=rtol, atol=1e-5 if precision == "no" else 1e-3, msg=k)
        moved += not torch.equal(v, _state(start)[k])
    assert moved > 0  # the steps changed the weights (the warm-up steps before capture left no trace)


@pytest.mark.parametrize("_", [pytest.param(None, marks=cuda)])
def test_dropout_is_refused_on_cuda(tmp_path, teacher, _):
    config = preset_config("digits-cd", teacher=teacher, dropout=0.1, **FAST)
    with pytest.raises(TrainingError, match="dropout 0.1"):
        Trainer(config, tmp_path / "run", progress=False, device="cuda", graph=True)


def test_loss_from_draws_is_the_eager_loss(teacher):
    """The captured step computes CDLoss.loss_from_draws on randomness drawn by CDLoss.draw: together they are the
    eager CDLoss call (same generators, same order), checked on the CPU."""
    import cmfast
    from cmfast.training.losses import CDLoss

    model = cmfast.load(teacher)
    online = cmfast.ConsistencyModel(model.net)
    loss_fn = CDLoss(model, None, num_scales=18, distance="l2")
    images = torch.rand(4, 1, 8, 8) * 2 - 1
    eager = loss_fn(online, images, generator=cmfast.generators_from_seeds(range(4)))
    z, j = loss_fn.draw(images, cmfast.generators_from_seeds(range(4)))
    assert torch.equal(loss_fn.loss_from_draws(online, images, None, z, j), eager)
