"""TrigFlow math (cmfast.trigflow) and the TrigFlow model wrapper, against float64 references and invariants."""

import math

import pytest
import torch

from cmfast import trigflow
from cmfast.networks import build_network, network_config
from cmfast.preconditioning import EDMDenoiser, TrigFlowModel

SD = 0.5


def _images(b=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 1, 8, 8, generator=g, dtype=torch.float64)


def test_velocity_is_the_time_derivative_of_the_noising_path():
    x0, z = _images(seed=1), SD * _images(seed=2)
    t = torch.tensor([0.1, 0.7, 1.4], dtype=torch.float64)
    h = 1e-6
    fd = (trigflow.trigflow_noise(x0, z, t + h) - trigflow.trigflow_noise(x0, z, t - h)) / (2 * h)
    torch.testing.assert_close(trigflow.data_velocity(x0, z, t), fd, rtol=1e-8, atol=1e-8)


def test_edm_conversion_is_edm_noising():
    x0, n = _images(seed=3), _images(seed=4)
    sigma = torch.tensor([0.01, 0.9, 60.0], dtype=torch.float64)
    t = trigflow.t_from_sigma(sigma, SD)
    torch.testing.assert_close(trigflow.sigma_from_t(t, SD), sigma)
    x_t = trigflow.trigflow_noise(x0, SD * n, t)  # z = sigma_d n
    torch.testing.assert_close(trigflow.edm_from_trigflow(x_t, t), x0 + sigma.reshape(-1, 1, 1, 1) * n)
    torch.testing.assert_close(trigflow.trigflow_from_edm(trigflow.edm_from_trigflow(x_t, t), t), x_t)


def test_consistency_function_boundary_and_form():
    x, F = _images(seed=5), _images(seed=6)
    zero = torch.zeros(3, dtype=torch.float64)
    torch.testing.assert_close(trigflow.consistency_function(x, F, zero, SD), x)
    t = torch.tensor([0.3, 1.0, 1.5], dtype=torch.float64)
    expected = torch.stack([math.cos(s) * x[i] - math.sin(s) * SD * F[i] for i, s in enumerate(t.tolist())])
    torch.testing.assert_close(trigflow.consistency_function(x, F, t, SD), expected)


def test_velocity_from_the_exact_denoiser_of_one_point_is_the_path_velocity():
    # data = one point x0: E[x0 | x_t] = x0 exactly, so the PF-ODE velocity must equal cos t z - sin t x0
    x0, z = _images(seed=7), SD * _images(seed=8)
    t = torch.tensor([0.05, 0.8, 1.5], dtype=torch.float64)
    x_t = trigflow.trigflow_noise(x0, z, t)
    torch.testing.assert_close(trigflow.velocity_from_denoised(x_t, x0, t), trigflow.data_velocity(x0, z, t))


def test_lognormal_proposal_has_the_asked_log_sigma_moments():
    u = torch.randn(200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = trigflow.lognormal_proposal(u, -1.0, 1.4, SD)
    assert bool(((t > 0) & (t < math.pi / 2)).all())
    log_sigma = trigflow.sigma_from_t(t, SD).log()
    assert abs(log_sigma.mean().item() + 1.0) < 0.02 and abs(log_sigma.std().item() - 1.4) < 0.02


def test_tangent_warmup_and_normalisation():
    assert [trigflow.tangent_warmup(k, 10) for k in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert trigflow.tangent_warmup(3, 0) == 1.0
    g = _images(seed=9) * torch.tensor([1e-3, 1.0, 1e3], dtype=torch.float64).reshape(-1, 1, 1, 1)
    out = trigflow.normalize_tangent(g, 0.1)
    norms = g.flatten(1).norm(dim=1)
    torch.testing.assert_close(out.flatten(1).norm(dim=1), norms / (norms + 0.1))
    torch.testing.assert_close(out, g / (norms + 0.1).reshape(-1, 1, 1, 1))


def _edm_net(seed=0):
    torch.manual_seed(seed)
    return build_network("ddpmpp-digits8").double()


def test_edm_denoiser_is_a_trigflow_consistency_function_with_minus_its_output():
    # EDM's preconditioning at sigma = sigma_d tan t equals f = cos t x_t - sin t sigma_d F with F = -net, the
    # identity behind TrigFlowModel(noise_cond="edm") and the sCD teacher velocity
    net = _edm_net()
    teacher = EDMDenoiser(net, sigma_data=SD)
    student = TrigFlowModel(net, sigma_data=SD, noise_cond="edm")
    x = _images(seed=10)
    sigma = torch.tensor([0.02, 1.3, 70.0], dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(student(x, sigma), teacher(x, sigma), rtol=1e-10, atol=1e-10)
        t = trigflow.t_from_sigma(sigma, SD)
        x_t = trigflow.trigflow_from_edm(x, t)
        F = student(x_t, t, raw=True)
        v = trigflow.velocity_from_denoised(x_t, teacher(x, sigma), t)
        torch.testing.assert_close(v, SD * F, rtol=1e-9, atol=1e-9)


def test_trigflow_model_in_edm_coordinates_matches_its_raw_form():
    cfg = network_config("ddpmpp-digits8")
    import dataclasses

    torch.manual_seed(1)
    net = build_network(dataclasses.replace(cfg, time_scale=1000.0, logvar_head=True)).double()
    model = TrigFlowModel(net, sigma_data=SD)
    assert model.noise_cond == "t" and model.boundary == 0.0
    x = _images(seed=11)
    sigma = torch.tensor([0.5, 2.0, 80.0], dtype=torch.float64)
    with torch.no_grad():
        t = torch.atan(sigma / SD)
        x_t = torch.cos(t).reshape(-1, 1, 1, 1) * x
        F, logvar = model(x_t, t, raw=True, return_logvar=True)
        expected = torch.cos(t).reshape(-1, 1, 1, 1) * x_t - torch.sin(t).reshape(-1, 1, 1, 1) * SD * F
        torch.testing.assert_close(model(x, sigma), expected)
        torch.testing.assert_close(F, net(x_t / SD, 1.0 * t))  # c_noise(t) = t; the net scales it by 1000 itself
        assert logvar.shape == (3,) and bool((logvar == 0).all())  # zero-initialised head


def test_trigflow_model_refuses_unknown_time_conditioning():
    with pytest.raises(ValueError, match="TrigFlow noise_cond"):
        TrigFlowModel(_edm_net(), noise_cond="ln")


def test_skip_out_hook_replaces_the_combination():
    model = TrigFlowModel(_edm_net(), sigma_data=SD)
    calls = []

    def op(x, F, t, sigma_data):
        calls.append(sigma_data)
        return trigflow.consistency_function(x, F, t, sigma_data)

    x = _images(seed=12)
    with torch.no_grad():
        plain = model(x, 1.0)
        model.skip_out_op = op
        torch.testing.assert_close(model(x, 1.0), plain)
    assert calls == [SD]
