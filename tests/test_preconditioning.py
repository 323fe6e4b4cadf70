"""Preconditioning coefficients against the paper's formulas (float64) and the boundary condition f(x, eps) = x."""

import math

import pytest
import torch

from cmfast.preconditioning import (
    ConsistencyModel,
    EDMDenoiser,
    c_in,
    c_noise,
    cm_c_out,
    cm_c_skip,
    edm_c_out,
    edm_c_skip,
)

SIGMAS = [0.002, 0.01, 0.3, 0.5, 1.0, 7.3, 80.0]
EPS, SD = 0.002, 0.5


@pytest.mark.parametrize("sigma", SIGMAS)
def test_coefficients_match_formulas(sigma):
    s = torch.tensor(sigma, dtype=torch.float64)
    assert float(edm_c_skip(s, SD)) == pytest.approx(SD**2 / (sigma**2 + SD**2), rel=1e-14)
    assert float(edm_c_out(s, SD)) == pytest.approx(sigma * SD / math.sqrt(sigma**2 + SD**2), rel=1e-14)
    assert float(cm_c_skip(s, EPS, SD)) == pytest.approx(SD**2 / ((sigma - EPS) ** 2 + SD**2), rel=1e-14)
    assert float(cm_c_out(s, EPS, SD)) == pytest.approx(SD * (sigma - EPS) / math.sqrt(SD**2 + sigma**2), abs=1e-15)
    assert float(c_in(s, SD)) == pytest.approx(1 / math.sqrt(sigma**2 + SD**2), rel=1e-14)
    assert float(c_noise(s, "edm")) == pytest.approx(math.log(sigma) / 4, rel=1e-14)
    assert float(c_noise(s, "adm")) == pytest.approx(1000 * 0.25 * math.log(sigma), rel=1e-12)


def test_boundary_coefficients_exact():
    s = torch.tensor(EPS)
    assert float(cm_c_skip(s, EPS, SD)) == 1.0 and float(cm_c_out(s, EPS, SD)) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_boundary_condition_exact(dtype, recording_net_class):
    net = recording_net_class().to(dtype)
    f = ConsistencyModel(net)
    x = torch.randn(3, 3, 5, 7, dtype=dtype)
    out = f(x, EPS)
    assert out.dtype == dtype
    assert torch.equal(out, x)
    # away from the boundary the network does contribute
    assert not torch.allclose(f(x, 1.0), x)


@pytest.mark.parametrize("cls, skip, outc", [(ConsistencyModel, cm_c_skip, cm_c_out), (EDMDenoiser, None, None)])
def test_forward_is_the_preconditioned_formula(cls, skip, outc, recording_net_class):
    torch.manual_seed(1)
    net = recording_net_class().double()
    model = cls(net)
    x = torch.randn(3, 3, 4, 4, dtype=torch.float64)
    sigma = torch.tensor([0.05, 1.7, 60.0], dtype=torch.float64)
    out = model(x, sigma)
    s = sigma.reshape(-1, 1, 1, 1)
    if cls is ConsistencyModel:
        cs, co = skip(s, EPS, SD), outc(s, EPS, SD)
    else:
        cs, co = SD**2 / (s**2 + SD**2), s * SD / (s**2 + SD**2).sqrt()
    x_in = x / (s**2 + SD**2).sqrt()
    expected = cs * x + co * recording_net_class.forward(net, x_in, sigma.log() / 4)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    seen_x, seen_noise = net.calls[0]
    torch.testing.assert_close(seen_x, x_in)
    torch.testing.assert_close(seen_noise, sigma.log() / 4)


def test_scalar_and_per_sample_sigma_agree(recording_net):
    f = ConsistencyModel(recording_net)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(f(x, 2.5), f(x, torch.full((4,), 2.5)))
    with pytest.raises(ValueError, match="sigma has 3 entries"):
        f(x, torch.ones(3))


def test_adm_noise_conditioning_is_passed(recording_net):
    f = ConsistencyModel(recording_net, noise_cond="adm")
    f(torch.randn(2, 3, 4, 4), 3.0)
    assert float(recording_net.calls[-1][1][0]) == pytest.approx(250 * math.log(3.0), rel=1e-6)


def test_class_labels_reach_the_network(recording_net_class):
    net = recording_net_class(num_classes=5)
    f = ConsistencyModel(net)
    x = torch.randn(2, 3, 4, 4)
    a = f(x, 1.0, torch.tensor([0, 1]))
    b = f(x, 1.0, torch.tensor([2, 1]))
    assert not torch.allclose(a[0], b[0]) and torch.allclose(a[1], b[1])


def test_autocast_bf16_keeps_fp32_combination(recording_net):
    f = ConsistencyModel(recording_net)
    x = torch.randn(2, 3, 8, 8)
    ref = f(x, 0.7)
    f.autocast_dtype = torch.bfloat16
    out = f(x, 0.7)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)
    assert torch.equal(f(x, EPS), x)  # the boundary condition survives low precision


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sigma_min=0.0), "sigma_min"),
        (dict(sigma_min=100.0), "sigma_min"),
        (dict(sigma_data=-1.0), "sigma_data"),
        (dict(noise_cond="vp"), "noise_cond"),
        (dict(autocast_dtype=torch.int8), "autocast_dtype"),
    ],
)
def test_bad_arguments_are_named(recording_net, kwargs, match):
    with pytest.raises(ValueError, match=match):
        ConsistencyModel(recording_net, **kwargs)


@pytest.mark.parametrize("preset", ["ddpmpp-tiny", "ncsnpp-tiny", "adm-tiny"])
def test_low_precision_backbone_with_fp32_preconditioning(preset, perturb):
    from cmfast.networks import build_network

    torch.manual_seed(0)
    f = ConsistencyModel(perturb(build_network(preset), scale=0.1)).eval()
    cfg = f.net.config
    size = cfg.resolution
    x = torch.randn(2, cfg.in_channels, size, size)
    y = torch.tensor([1, 4]) if cfg.num_classes else None
    with torch.no_grad():
        ref = f(x, 2.0, y)
        f.to(torch.bfloat16)  # weights in bf16, no autocast: noise labels must still reach the net in float32
        out = f(x, 2.0, y)
        assert out.dtype == torch.float32 and torch.equal(f(x, EPS, y), x)
    assert (out - ref).abs().max() <= 0.05 * ref.abs().max()
