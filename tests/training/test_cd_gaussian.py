"""Consistency distillation against a known answer: for data ~ N(0, sd^2 I) the teacher's exact denoiser is
D(x, t) = sd^2 / (sd^2 + t^2) x, and the exact consistency function maps x_t to the ODE origin
f*(x, t) = x sqrt(sd^2 + eps^2) / sqrt(sd^2 + t^2). Training with CDLoss must drive f towards f*."""

import math

import torch
from torch import nn

from cmfast.preconditioning import ConsistencyModel
from cmfast.sampling import karras_sigmas
from cmfast.training.losses import CDLoss

SD, EPS = 0.5, 0.002


def exact_denoiser(x, sigma, class_labels=None):
    s = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1, 1, 1)
    return SD**2 / (SD**2 + s**2) * x


class ScaleNet(nn.Module):
    """F(x_in, c_noise) = a(c_noise) x_in: can represent f* exactly, since f* is linear in x at every t."""

    def __init__(self):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(1, 32), nn.SiLU(), nn.Linear(32, 32), nn.SiLU(), nn.Linear(32, 1))

    def forward(self, x, noise_labels, class_labels=None):
        return self.mlp(noise_labels.reshape(-1, 1).to(x.dtype)).reshape(-1, 1, 1, 1) * x


def consistency_error(f) -> float:
    """Mean over the training grid of E|f(x_t, t) - f*(x_t, t)|^2 / E|f*|^2, on fresh samples."""
    g = torch.Generator().manual_seed(123)
    errors = []
    for t in karras_sigmas(18)[:-1].tolist():
        x_t = torch.randn(512, 1, 2, 2, generator=g) * math.sqrt(SD**2 + t**2)
        exact = x_t * math.sqrt(SD**2 + EPS**2) / math.sqrt(SD**2 + t**2)
        with torch.no_grad():
            errors.append(float((f(x_t, t) - exact).square().mean() / exact.square().mean()))
    return sum(errors) / len(errors)


def test_distillation_drives_the_consistency_error_down():
    torch.manual_seed(0)
    f = ConsistencyModel(ScaleNet())
    loss_fn = CDLoss(exact_denoiser, None, num_scales=18, solver="heun", distance="l2")
    opt = torch.optim.Adam(f.parameters(), lr=3e-3)
    before = consistency_error(f)
    g = torch.Generator().manual_seed(1)
    for _ in range(1000):
        x0 = torch.randn(256, 1, 2, 2, generator=g) * SD
        loss = loss_fn(f, x0).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = consistency_error(f)
    assert after < 0.05 * before and after < 0.02, (before, after)
