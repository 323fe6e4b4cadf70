"""sCM's network options (time_scale, adaptive_double_norm, logvar_head): off by default, exact when on, refused by
the engine."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from cmfast import engine
from cmfast.networks import build_network, network_config
from cmfast.networks.adm import ResBlock
from cmfast.networks.song_unet import UNetBlock, pixel_norm
from cmfast.preconditioning import ConsistencyModel, TrigFlowModel


def test_options_are_off_in_every_preset_and_keep_the_state_dict():
    for name in ("ddpmpp-digits8", "adm-tiny"):
        cfg = network_config(name)
        assert (cfg.time_scale, cfg.adaptive_double_norm, cfg.logvar_head) == (1.0, False, False)
        plain = build_network(cfg).state_dict()
        with_head = build_network(dataclasses.replace(cfg, logvar_head=True)).state_dict()
        assert set(with_head) - set(plain) and set(plain) <= set(with_head)


@pytest.mark.parametrize("name", ["ddpmpp-digits8", "adm-tiny"])
def test_time_scale_multiplies_the_noise_label(name):
    cfg = network_config(name)
    torch.manual_seed(0)
    net = build_network(cfg).double()
    scaled = build_network(dataclasses.replace(cfg, time_scale=250.0)).double()
    scaled.load_state_dict(net.state_dict())
    size, classes = cfg.resolution, cfg.num_classes
    x = torch.randn(2, cfg.in_channels, size, size, dtype=torch.float64)
    labels = torch.tensor([1, 3]) if classes else None
    c = torch.tensor([0.3, 1.2], dtype=torch.float64)
    torch.testing.assert_close(scaled(x, c, labels), net(x, 250.0 * c, labels))


def test_pixel_norm_gives_unit_mean_square_per_sample():
    v = torch.randn(3, 16, 1, 1, dtype=torch.float64) * torch.tensor([1e-1, 1.0, 30.0]).reshape(-1, 1, 1, 1)
    ms = pixel_norm(v).square().mean(dim=1).flatten()
    expected = v.square().mean(dim=1).flatten() / (v.square().mean(dim=1).flatten() + 1e-4)
    torch.testing.assert_close(ms, expected)


def _perturbed(net):
    for p in net.parameters():  # break the zero inits so every layer matters
        p.data.add_(0.05 * torch.randn_like(p))
    return net


def test_song_block_double_norm_by_hand():
    torch.manual_seed(1)
    block = _perturbed(UNetBlock(16, 32, emb_channels=24, double_norm=True).double())
    x, emb = torch.randn(2, 16, 4, 4, dtype=torch.float64), torch.randn(2, 24, dtype=torch.float64)
    h = block.conv0(F.silu(F.group_norm(x, block.norm0.num_groups, block.norm0.weight, block.norm0.bias, 1e-6)))
    scale, shift = (block.affine.weight @ emb.T + block.affine.bias[:, None]).T.chunk(2, dim=1)
    rms = lambda v: v / (v.square().mean(dim=1, keepdim=True) + 1e-4).sqrt()  # noqa: E731
    n1 = F.group_norm(h, block.norm1.num_groups, block.norm1.weight, block.norm1.bias, 1e-6)
    h = F.silu(n1 * (1 + rms(scale)[:, :, None, None]) + rms(shift)[:, :, None, None])
    expected = (block.conv1(h) + block.skip(x)) * math.sqrt(0.5)
    torch.testing.assert_close(block(x, emb), expected)


def test_adm_block_double_norm_by_hand():
    torch.manual_seed(2)
    block = _perturbed(ResBlock(32, 24, 64, 0.0, True, double_norm=True).double())
    x, emb = torch.randn(2, 32, 4, 4, dtype=torch.float64), torch.randn(2, 24, dtype=torch.float64)
    h = block.in_layers[2](F.silu(block.in_layers[0](x)))
    scale, shift = block.emb_layers[1](F.silu(emb)).chunk(2, dim=1)
    rms = lambda v: v / (v.square().mean(dim=1, keepdim=True) + 1e-4).sqrt()  # noqa: E731
    h = F.silu(block.out_layers[0](h) * (1 + rms(scale)[:, :, None, None]) + rms(shift)[:, :, None, None])
    expected = block.skip_connection(x) + block.out_layers[3](h)
    torch.testing.assert_close(block(x, emb), expected)


@pytest.mark.parametrize("name", ["ddpmpp-digits8", "adm-tiny"])
def test_networks_with_every_option_run_and_give_a_logvar(name):
    cfg = dataclasses.replace(network_config(name), adaptive_double_norm=True, logvar_head=True, time_scale=1000.0)
    torch.manual_seed(1)
    net = _perturbed(build_network(cfg).double())
    size = cfg.resolution
    x = torch.randn(2, cfg.in_channels, size, size, dtype=torch.float64)
    labels = torch.tensor([0, 4]) if cfg.num_classes else None
    c = torch.tensor([0.1, 0.9], dtype=torch.float64)
    out, logvar = net(x, c, labels, return_logvar=True)
    assert out.shape == (2, cfg.out_channels, size, size) and logvar.shape == (2,)
    torch.testing.assert_close(out, net(x, c, labels))
    torch.testing.assert_close(logvar, net.logvar(c))


def test_adm_double_norm_needs_scale_shift():
    cfg = dataclasses.replace(network_config("adm-tiny32"), adaptive_double_norm=True)
    with pytest.raises(ValueError, match="use_scale_shift_norm"):
        build_network(cfg)


def test_engine_refuses_trigflow_and_the_options():
    net = build_network("ddpmpp-digits8")
    assert "TrigFlow" in engine.unsupported(TrigFlowModel(net))
    scaled = build_network(dataclasses.replace(network_config("ddpmpp-digits8"), time_scale=1000.0))
    assert "time_scale" in engine.unsupported(ConsistencyModel(scaled))
    double = build_network(dataclasses.replace(network_config("adm-tiny"), adaptive_double_norm=True))
    assert "double" in engine.unsupported(ConsistencyModel(double))
    head = build_network(dataclasses.replace(network_config("ddpmpp-digits8"), logvar_head=True))
    assert engine.unsupported(ConsistencyModel(head)) == ""
    with pytest.raises(ValueError, match="TrigFlow"):
        engine.prepare(TrigFlowModel(net))
