"""cmfast.networks.recompute.norm_act_conv: conv2d(SiLU(GroupNorm(x))) that keeps only x for backward. Values and
gradients against a float64 composition of PyTorch's own ops, the saved bytes against the count by hand, autocast
against the plain fused composition, and the fallbacks (no graph, torch.func) that must not recompute."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from cmfast import build_network, ops
from cmfast.networks import NETWORK_PRESETS, set_fused_ops
from cmfast.networks.recompute import can_recompute, norm_act_conv
from cmfast.training.memory import saved_bytes

GROUPS, EPS = 4, 1e-5


def reference(x, w, b, scale, shift, conv_w, conv_b, padding, silu=True):
    h = F.group_norm(x, GROUPS, w, b, EPS)
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.conv2d(F.silu(h) if silu else h, conv_w, conv_b, padding=padding)


def make(scale_shift: bool, kernel: int, bias: bool, x_grad: bool = True, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 8, 5, 7, generator=g).requires_grad_(x_grad)
    w, b = torch.randn(8, generator=g).requires_grad_(), torch.randn(8, generator=g).requires_grad_()
    scale = torch.randn(3, 8, 1, 1, generator=g).requires_grad_() if scale_shift else None
    shift = torch.randn(3, 8, 1, 1, generator=g).requires_grad_() if scale_shift else None
    conv_w = (0.3 * torch.randn(6, 8, kernel, kernel, generator=g)).requires_grad_()
    conv_b = torch.randn(6, generator=g).requires_grad_() if bias else None
    return x, w, b, scale, shift, conv_w, conv_b


@pytest.mark.parametrize("scale_shift", [False, True], ids=["plain", "scale-shift"])
@pytest.mark.parametrize("kernel, bias", [(3, True), (1, False)], ids=["3x3-bias", "1x1"])
@pytest.mark.parametrize("silu", [True, False], ids=["silu", "norm-only"])
def test_values_and_gradients_match_float64(scale_shift, kernel, bias, silu):
    x, w, b, scale, shift, conv_w, conv_b = make(scale_shift, kernel, bias)
    y = norm_act_conv(x, w, b, GROUPS, EPS, conv_w, conv_b, kernel // 2, scale, shift, silu)
    inputs = [t for t in (x, w, b, scale, shift, conv_w, conv_b) if t is not None]
    grad_y = torch.randn_like(y)
    grads = torch.autograd.grad(y, inputs, grad_y)
    ref_inputs = [t.detach().double().requires_grad_() if t is not None else None for t in (x, w, b, scale, shift)]
    ref_conv = [t.detach().double().requires_grad_() if t is not None else None for t in (conv_w, conv_b)]
    y64 = reference(*ref_inputs, *ref_conv, kernel // 2, silu)
    grads64 = torch.autograd.grad(y64, [t for t in (*ref_inputs, *ref_conv) if t is not None], grad_y.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads64):
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_only_the_norm_input_is_saved():
    x, w, b, _, _, conv_w, conv_b = make(False, 3, True)
    params = [w, b, conv_w, conv_b]
    lean = saved_bytes(lambda: norm_act_conv(x, w, b, GROUPS, EPS, conv_w, conv_b, 1).sum(), 3, params)
    plain = saved_bytes(lambda: reference(x, w, b, None, None, conv_w, conv_b, 1).sum(), 3, params)
    assert lean.activations == x.numel() * 4  # x alone: no statistics, no normalised or activated tensor
    # eager keeps x and the statistics for GroupNorm, GroupNorm's output for SiLU and SiLU's output for the conv
    assert plain.activations == 3 * x.numel() * 4 + 2 * (3 * GROUPS * 4)


def test_a_frozen_input_gets_no_gradient_and_the_rest_do():
    x, w, b, _, _, conv_w, conv_b = make(False, 3, True, x_grad=False)
    y = norm_act_conv(x, w, b, GROUPS, EPS, conv_w, conv_b, 1)
    y.square().sum().backward()
    assert x.grad is None and all(p.grad is not None for p in (w, b, conv_w, conv_b))
    want = torch.autograd.grad(reference(x, w, b, None, None, conv_w, conv_b, 1).square().sum(), [w, b, conv_w])
    for p, g in zip((w, b, conv_w), want):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-4)


def test_bf16_autocast_gives_the_plain_fused_composition():
    x, w, b, scale, shift, conv_w, conv_b = make(True, 3, True)
    inputs = [x, w, b, scale, shift, conv_w, conv_b]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lean = norm_act_conv(x, w, b, GROUPS, EPS, conv_w, conv_b, 1, scale, shift)
        plain = F.conv2d(ops.group_norm_silu(x, w, b, GROUPS, EPS, scale, shift), conv_w, conv_b, padding=1)
    assert lean.dtype == plain.dtype == torch.bfloat16
    torch.testing.assert_close(lean, plain, rtol=0, atol=0)
    grad_y = torch.randn_like(lean)
    for got, want in zip(torch.autograd.grad(lean, inputs, grad_y), torch.autograd.grad(plain, inputs, grad_y)):
        assert got.dtype == want.dtype == torch.float32  # gradients of the float32 parameters, as autocast gives them
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-2)


def test_the_recomputing_path_is_taken_only_when_autograd_records():
    x, w, b, _, _, conv_w, _ = make(False, 3, False)
    assert can_recompute(x, w, conv_w)
    with torch.no_grad():
        assert not can_recompute(x, w, conv_w)
    assert not can_recompute(x.detach(), None, conv_w.detach())
    seen = []
    torch.func.jvp(lambda v: seen.append(can_recompute(v)) or v, (x.detach(),), (torch.ones_like(x),))
    assert seen == [False]  # under torch.func, the ops' own forward-mode rules run


@pytest.mark.parametrize("preset", ["ddpmpp-tiny", "adm-tiny"])
def test_a_fused_network_gets_the_plain_networks_gradients(preset):
    config = dataclasses.replace(NETWORK_PRESETS[preset], dropout=0.0)
    torch.manual_seed(0)
    net = build_network(config).train()
    with torch.no_grad():  # zero-initialised output layers would hide the inner blocks' gradients
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, config.in_channels, config.resolution, config.resolution)
    sigma = torch.tensor([0.3, 2.0])
    labels = torch.tensor([1, 4]) if config.num_classes else None

    def grads():
        net.zero_grad()
        net(x, sigma, labels).square().mean().backward()
        return [p.grad.clone() for p in net.parameters()]

    plain = grads()
    fused = grads() if set_fused_ops(net) else None
    set_fused_ops(net, False)
    for want, got in zip(plain, fused):
        torch.testing.assert_close(got, want, rtol=2e-4, atol=2e-5)
