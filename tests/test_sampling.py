"""Noise grids against their formulas, Algorithm 1 against an explicit replay, and the Heun sampler against the
exact PF-ODE solution for Gaussian data."""

import math

import numpy as np
import pytest
import torch

from cmfast.generate import MAX_STEPS, Generated, sampling_plan
from cmfast.networks import build_network
from cmfast.preconditioning import ConsistencyModel, EDMDenoiser
from cmfast.sampling import (
    generators_from_seeds,
    heun_evaluations,
    heun_sample,
    heun_step,
    karras_sigmas,
    multistep_sigmas,
    num_evaluations,
    randn,
    sample,
    sigmas_from_ts,
)

EPS, T, RHO = 0.002, 80.0, 7.0


def karras_ascending(i, n):
    """REFERENCE.md section 1, ascending form: t_i for i = 1..N."""
    return (EPS ** (1 / RHO) + (i - 1) / (n - 1) * (T ** (1 / RHO) - EPS ** (1 / RHO))) ** RHO


@pytest.mark.parametrize("n", [2, 3, 18, 40, 201])
def test_karras_grid_matches_ascending_formula(n):
    sig = karras_sigmas(n)
    assert sig.dtype == torch.float64 and sig.shape == (n,)
    assert sig[0].item() == T and sig[-1].item() == EPS
    expected = torch.tensor([karras_ascending(i, n) for i in range(n, 0, -1)], dtype=torch.float64)
    torch.testing.assert_close(sig, expected, rtol=1e-13, atol=0)
    assert bool((sig[:-1] > sig[1:]).all())


def test_karras_grid_other_parameters():
    sig = karras_sigmas(5, sigma_min=0.01, sigma_max=10.0, rho=3.0)
    j = torch.arange(5, dtype=torch.float64)
    expected = (10 ** (1 / 3) + j / 4 * (0.01 ** (1 / 3) - 10 ** (1 / 3))) ** 3
    torch.testing.assert_close(sig, expected)


def test_sigmas_from_official_ts():
    sig = sigmas_from_ts([0, 22, 39], 40)
    assert sig.tolist() == pytest.approx([80.0, karras_ascending(40 - 22, 40), 0.002], rel=1e-13)
    assert sig[0].item() == 80.0 and sig[-1].item() == 0.002
    assert num_evaluations(sig.tolist()) == 2


@pytest.mark.parametrize("ts, steps", [([0, 40], 40), ([-1, 3], 40), ([5, 5], 40), ([9, 2], 40), ([], 40)])
def test_bad_ts_are_rejected(ts, steps):
    with pytest.raises(ValueError, match="ts"):
        sigmas_from_ts(ts, steps)


def test_bad_grids_are_rejected():
    with pytest.raises(ValueError, match="n >= 2"):
        karras_sigmas(1)
    with pytest.raises(ValueError, match="positive integer"):
        multistep_sigmas(0)


def test_randn_per_sample_rows_come_from_their_own_generator():
    gens = generators_from_seeds([3, 4, 5])
    z = randn((3, 2, 4, 4), gens)
    for i, seed in enumerate([3, 4, 5]):
        ref = torch.randn((2, 4, 4), generator=torch.Generator().manual_seed(seed))
        assert torch.equal(z[i], ref)
    with pytest.raises(ValueError, match="generators"):
        randn((2, 1), gens)


def toy_f(x, sigma, class_labels=None):
    """A deterministic nonlinear stand-in for a consistency function (accepts float or tensor sigma)."""
    return torch.tanh(x / (1 + float(sigma))) * 1.5


def test_one_sigma_is_one_step():
    z = torch.randn(4, 3, 5, 5)
    one = sample(toy_f, z, [T])
    assert torch.equal(one, toy_f(T * z, T).clamp(-1, 1))
    assert torch.equal(sample(toy_f, z, [T, EPS]), one)  # a final sigma_min marks the end, no evaluation


def test_multistep_matches_algorithm_1_replay():
    z = torch.randn(2, 1, 4, 4)
    sigmas = [T, 2.0, 0.5, EPS]
    out = sample(toy_f, z, sigmas, generator=torch.Generator().manual_seed(7), sigma_min=EPS)
    g = torch.Generator().manual_seed(7)
    x = toy_f(T * z, T).clamp(-1, 1)
    for s in (2.0, 0.5):
        x = x + math.sqrt(s**2 - EPS**2) * torch.randn(x.shape, generator=g)
        x = toy_f(x, s).clamp(-1, 1)
    torch.testing.assert_close(out, x, rtol=0, atol=0)


def test_sample_uses_f_sigma_min_and_clamp_option():
    calls = []

    class F:
        sigma_min = 0.5

        def __call__(self, x, sigma, class_labels=None):
            calls.append(float(sigma))
            return 3 * x

    z = torch.randn(1, 1, 2, 2)
    out = sample(F(), z, [10.0, 2.0, 0.5], generator=torch.Generator().manual_seed(0), clamp=False)
    assert calls == [10.0, 2.0]  # stops before the final sigma_min of this f
    assert out.abs().max() > 1
    with pytest.raises(ValueError, match="decreasing"):
        sample(F(), z, [1.0, 2.0])


def test_heun_step_matches_hand_computation():
    def D(x, sigma, class_labels=None):
        return 0.3 * x + 0.1 * sigma

    x = torch.tensor([1.0, -2.0])
    t, s = 2.0, 1.0
    d = (x - D(x, t)) / t
    xe = x + (s - t) * d
    d2 = (xe - D(xe, s)) / s
    torch.testing.assert_close(heun_step(D, x, t, s), x + (s - t) * (d + d2) / 2)


def test_heun_sampler_solves_gaussian_pf_ode():
    # Data ~ N(0, sd^2 I): the exact denoiser is D(x, s) = sd^2 / (sd^2 + s^2) x, and the PF ODE solution is
    # x(s) = x(T) sqrt(sd^2 + s^2) / sqrt(sd^2 + T^2). The sampler ends with D at sigma_min. Heun is second order, so
    # 4x more steps must cut the error about 16x (an Euler-only bug would give about 4x).
    sd, calls = 0.5, []

    def D(x, sigma, class_labels=None):
        calls.append(sigma)
        return sd**2 / (sd**2 + float(sigma) ** 2) * x

    z = torch.randn(3, 1, 4, 4, dtype=torch.float64)
    exact = z * T * sd**2 / (math.sqrt(sd**2 + T**2) * math.sqrt(sd**2 + EPS**2))
    heun_sample(D, z, num_steps=18, clamp=False)
    assert len(calls) == heun_evaluations(18) == 35
    err = {
        n: ((heun_sample(D, z, num_steps=n, clamp=False) - exact).abs() / exact.abs()).max().item() for n in (50, 200)
    }
    assert err[200] < 5e-4
    assert err[50] / err[200] > 10


def test_heun_sampler_clamps_denoiser_outputs_by_default():
    def D(x, sigma, class_labels=None):
        return 5 * torch.ones_like(x)

    out = heun_sample(D, torch.zeros(1, 1, 2, 2), num_steps=3)
    assert torch.equal(out, torch.ones(1, 1, 2, 2))  # the final D is clipped to 1
    assert heun_sample(D, torch.zeros(1, 1, 2, 2), num_steps=3, clamp=False).max() == 5
    with pytest.raises(ValueError, match="positive integer"):
        heun_sample(D, torch.zeros(1, 1, 2, 2), num_steps=0)


def test_sample_rejects_time_points_that_cannot_be_right():
    z = torch.randn(1, 1, 2, 2)

    class F:
        sigma_min, sigma_max = EPS, T

        def __call__(self, x, sigma, class_labels=None):
            return x

    with pytest.raises(ValueError, match="only time point is sigma_min"):
        sample(F(), z, [EPS])
    with pytest.raises(ValueError, match="above the model's sigma_max"):
        sample(F(), z, [1000.0])


def test_sigmas_from_ts_needs_only_the_chosen_points():
    big = 10**9  # a grid this large must not be materialised
    sig = sigmas_from_ts([0, big // 2, big - 1], big)
    assert sig[0].item() == T and sig[-1].item() == EPS
    assert sig[1].item() == pytest.approx(karras_ascending(big - big // 2, big), rel=1e-9)


def test_plans_refuse_step_counts_no_sampler_needs():
    for model in (
        ConsistencyModel(build_network("ddpmpp-tiny")),
        EDMDenoiser(build_network("ddpmpp-tiny")),
    ):
        assert sampling_plan(model, steps=MAX_STEPS).evaluations >= MAX_STEPS
        with pytest.raises(ValueError, match=f"at most {MAX_STEPS}"):
            sampling_plan(model, steps=MAX_STEPS + 1)
    teacher = EDMDenoiser(build_network("ddpmpp-tiny"))
    assert "blurred" in sampling_plan(teacher, steps=7).warning and sampling_plan(teacher, steps=8).warning == ""


def test_the_sampling_rate_leaves_out_the_first_batch():
    images = np.zeros((10, 2, 2, 1), np.uint8)
    assert Generated(images, None, 5.0, 4.0, 4).images_per_second() == (6.0, "after the first batch")
    assert Generated(images, None, 5.0, 5.0, 10).images_per_second() == (2.0, "whole run, including warm-up")
