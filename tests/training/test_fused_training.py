"""A short consistency-distillation run through the fused ops (Trainer(fused=True): GroupNorm+SiLU through cmfast.ops)
follows the plain run's loss curve and ends at the same weights, within float32 rounding.

The fused backend is whichever the dispatch picks on this machine (the C++ extension's CPU kernels when built, else
Triton's interpreter), and, behind the triton marker, Triton forced with CMFAST_BACKEND."""

import pytest
import torch

from cmfast import ops
from cmfast.kernels import group_norm_silu as gn_kernels
from cmfast.kernels._common import interpreted
from cmfast.training.config import preset_config
from cmfast.training.trainer import Trainer

FAST = dict(batch_size=8, log_every=1, checkpoint_every=1000, ema_rates=(0.9,), sample_every=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    config = preset_config("digits-edm", **{**FAST, "total_steps": 3})
    return str(Trainer(config, tmp_path_factory.mktemp("teacher"), progress=False, device="cpu").train())


def _run(config, run_dir, fused, steps):
    trainer = Trainer(config, run_dir, progress=False, device="cpu", fused=fused)
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    return torch.tensor(losses, dtype=torch.float64), {k: v.clone() for k, v in trainer.online.net.state_dict().items()}


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=pytest.mark.triton)])
def test_cd_run_through_fused_ops_follows_the_reference(tmp_path, teacher, backend, monkeypatch):
    if backend is not None:
        if not interpreted(gn_kernels):
            pytest.skip("needs triton with TRITON_INTERPRET=1")
        monkeypatch.setenv("CMFAST_BACKEND", backend)
    x = torch.randn(2, 32, 4, 4)
    chosen = ops.explain("group_norm_silu", x, None, None, 8).backend
    if chosen == "torch":
        pytest.skip("no fused backend on this machine (no extension, no Triton interpreter)")
    steps, batch = (6, 8) if backend is None else (2, 2)  # Triton's interpreter is slow
    config = preset_config("digits-cd", teacher=teacher, total_steps=steps, **{**FAST, "batch_size": batch})
    ref_losses, ref_weights = _run(config, tmp_path / "ref", False, steps)
    losses, weights = _run(config, tmp_path / "fused", True, steps)
    assert ref_losses[-1] != ref_losses[0]  # the run moves
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-7)
    moved = 0
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-6, msg=f"{k} after {steps} steps ({chosen})")
        moved += not torch.equal(v, weights[k])
    assert moved > 0  # the fused kernels really ran: their rounding differs from the reference's somewhere
