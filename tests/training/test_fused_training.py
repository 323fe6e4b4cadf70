"""A short consistency-distillation run through the fused ops (Trainer(fused=True): GroupNorm+SiLU, the teacher's Heun
step and the consistency function's skip/out through cmfast.ops) follows the plain run's loss curve and ends at the
same weights, within float32 rounding; the fused teacher step is the plain `heun_step` / `euler_step`.

The fused backend is whichever the dispatch picks on this machine (the C++ extension's CPU kernels when built, else
Triton's interpreter), and, behind the triton marker, Triton forced with CMFAST_BACKEND."""

import pytest
import torch

from cmfast import EDMDenoiser, build_network, ops
from cmfast.kernels import group_norm_silu as gn_kernels
from cmfast.kernels._common import interpreted
from cmfast.sampling import euler_step, heun_step, karras_sigmas
from cmfast.training.config import preset_config
from cmfast.training.losses import CDLoss, fused_teacher_step
from cmfast.training.trainer import Trainer

FAST = dict(batch_size=8, log_every=1, checkpoint_every=1000, ema_rates=(0.9,), sample_every=0)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> str:
    config = preset_config("digits-edm", **{**FAST, "total_steps": 3})
    return str(Trainer(config, tmp_path_factory.mktemp("teacher"), progress=False, device="cpu").train())


@pytest.fixture
def op_calls(monkeypatch) -> dict:
    """Calls of cmfast.ops.heun_step and skip_out, counted (the fused path really takes them)."""
    calls = {}
    for name in ("heun_step", "skip_out"):
        op = getattr(ops, name)

        def counted(*args, _op=op, _name=name, **kwargs):
            calls[_name] += 1
            return _op(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    return calls


def _run(config, run_dir, fused, steps, calls):
    calls.update(heun_step=0, skip_out=0)
    trainer = Trainer(config, run_dir, progress=False, device="cpu", fused=fused)
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    weights = {k: v.clone() for k, v in trainer.online.net.state_dict().items()}
    return torch.tensor(losses, dtype=torch.float64), weights, dict(calls)


@pytest.mark.parametrize("backend", [None, pytest.param("triton", marks=pytest.mark.triton)])
def test_cd_run_through_fused_ops_follows_the_reference(tmp_path, teacher, backend, monkeypatch, op_calls):
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
    ref_losses, ref_weights, ref_calls = _run(config, tmp_path / "ref", False, steps, op_calls)
    losses, weights, calls = _run(config, tmp_path / "fused", True, steps, op_calls)
    assert ref_calls == {"heun_step": 0, "skip_out": 0}
    # per step: the teacher's two Heun calls; skip/out in the online and the target evaluation
    assert calls == {"heun_step": 2 * steps, "skip_out": 2 * steps}
    assert ref_losses[-1] != ref_losses[0]  # the run moves
    torch.testing.assert_close(losses, ref_losses, rtol=1e-4, atol=1e-7)
    moved = 0
    for k, v in ref_weights.items():
        torch.testing.assert_close(weights[k], v, rtol=1e-4, atol=1e-6, msg=f"{k} after {steps} steps ({chosen})")
        moved += not torch.equal(v, weights[k])
    assert moved > 0  # the fused kernels really ran: their rounding differs from the reference's somewhere


@pytest.fixture(scope="module")
def edm_teacher() -> EDMDenoiser:
    torch.manual_seed(0)
    net = build_network("ddpmpp-tiny")
    with torch.no_grad():  # no zero-initialised layers: every part of F is exercised
        for p in net.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return EDMDenoiser(net).eval().requires_grad_(False)


@pytest.mark.parametrize("solver", ["heun", "euler"])
def test_fused_teacher_step_is_the_plain_step(edm_teacher, solver):
    """Per sample: the first step from sigma_max, one mid-grid, the last one (to sigma_min) and one to sigma 0, which
    EDM's sampler ends with an Euler step (x + (0 - sigma) d = D)."""
    grid = karras_sigmas(18)
    sigma = torch.stack([grid[0], grid[7], grid[16], grid[16]]).float()
    sigma_next = torch.stack([grid[1], grid[8], grid[17], torch.tensor(0.0, dtype=torch.float64)]).float()
    size = edm_teacher.net.config.resolution
    x = torch.randn(4, 3, size, size, generator=torch.Generator().manual_seed(1)) * sigma.reshape(-1, 1, 1, 1)

    def D(x, s, class_labels=None):
        return edm_teacher(x, s.reshape(-1), class_labels)

    with torch.no_grad():
        euler = euler_step(D, x, sigma.reshape(-1, 1, 1, 1), sigma_next.reshape(-1, 1, 1, 1))
        ref = (
            heun_step(D, x, sigma.reshape(-1, 1, 1, 1), sigma_next.reshape(-1, 1, 1, 1)) if solver == "heun" else euler
        )
        ref = torch.cat([ref[:3], euler[3:]])  # the plain Heun step divides by sigma_next = 0 (NaN there)
        got = fused_teacher_step(edm_teacher, x, sigma, sigma_next, None, solver)
    assert torch.isfinite(ref).all()
    scale = ref.abs().amax(dim=(1, 2, 3), keepdim=True)  # relative to each sample's magnitude (sigma_max: ~80)
    torch.testing.assert_close(got / scale, ref / scale, rtol=0, atol=1e-5)


def test_fused_loss_needs_an_edm_teacher():
    with pytest.raises(ValueError, match="EDMDenoiser teacher"):
        CDLoss(lambda x, s, c=None: x, None, distance="l2", fused=True)
