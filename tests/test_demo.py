"""The demo's data-parallel CPU training: two one-thread processes give the one-process run's weights."""

import json

import pytest
import torch
from safetensors.torch import load_file

from cmfast.pipeline import train
from cmfast.training.config import preset_config


def test_two_processes_train_the_same_weights_as_one(tmp_path):
    cfg = preset_config("digits-edm", total_steps=3, batch_size=16, checkpoint_every=3, sample_every=0, ema_warmup=True)
    one = load_file(train(cfg, tmp_path / "one", progress=False, processes=1))
    two = load_file(train(cfg, tmp_path / "two", progress=False, processes=2))
    assert one.keys() == two.keys()
    for name, a in one.items():
        torch.testing.assert_close(two[name], a, rtol=1e-4, atol=1e-5, msg=name)
    losses = [json.loads((tmp_path / run / "log.jsonl").read_text().splitlines()[-1])["loss"] for run in ("one", "two")]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4)  # both logged the step-3 loss of the same batch


def test_a_failing_worker_is_one_line(tmp_path):
    cfg = preset_config("digits-edm", total_steps=2, dataset=str(tmp_path / "missing.npz"), sample_every=0)
    with pytest.raises(RuntimeError, match=r"training run failed: .*missing\.npz") as info:
        train(cfg, tmp_path / "run", progress=False, processes=2)
    assert "\n" not in str(info.value)
