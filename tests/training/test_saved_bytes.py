"""cmfast.training.memory counts what autograd saves for backward: hand-computed cases, views counted once, weights
and autocast's weight copies apart; and the fused path saves less than the eager one (the fused GroupNorm+SiLU keeps
its input and the per-group statistics, not the normalised tensor SiLU needs)."""

import dataclasses

import pytest
import torch
from torch import nn

from cmfast import ConsistencyModel, build_network, ops
from cmfast.networks import NETWORK_PRESETS, set_fused_ops
from cmfast.training.memory import consistency_step_saved_bytes, saved_bytes


def test_a_linear_layer_saves_its_input_and_its_weight():
    layer = nn.Linear(5, 7)
    x = torch.randn(3, 5, requires_grad=True)
    saved = saved_bytes(lambda: layer(x).sum(), 3, list(layer.parameters()))
    # addmm keeps x (for the weight's gradient) and weight^T (for x's): a view of the parameter, counted as weights
    assert (saved.activations, saved.weights, saved.tensors, saved.storages) == (3 * 5 * 4, 7 * 5 * 4, 2, 2)
    assert saved.per_image == 5 * 4
    assert x.grad is not None and layer.weight.grad is not None  # the backward ran


def test_a_frozen_input_saves_only_what_the_weight_gradient_needs():
    layer = nn.Linear(5, 7)
    saved = saved_bytes(lambda: layer(torch.randn(3, 5)).sum(), 3, list(layer.parameters()))
    assert (saved.activations, saved.weights, saved.tensors) == (3 * 5 * 4, 0, 1)


def test_views_of_one_storage_count_once():
    h = torch.randn(4, 6, requires_grad=True)

    def step():
        y = h * 2  # one (4, 6) float32 storage, saved twice through two views
        return y.reshape(24).sin().sum() + y.t().cos().sum()

    saved = saved_bytes(step, 4)
    assert (saved.tensors, saved.storages, saved.activations) == (2, 1, 24 * 4)


def test_autocast_weight_copies_count_as_weights():
    layer = nn.Linear(5, 7)
    x = torch.randn(3, 5, requires_grad=True)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return layer(x).float().sum()

    saved = saved_bytes(step, 3, list(layer.parameters()))
    # x's bf16 copy is an activation (a cast of the input, not of a parameter); the weight's bf16 copy is a weight
    assert (saved.activations, saved.weights) == (3 * 5 * 2, 7 * 5 * 2)


def test_fused_group_norm_silu_saves_one_tensor_less():
    x = torch.randn(2, 32, 5, 7, requires_grad=True)
    norm = nn.GroupNorm(8, 32)
    if ops.explain("group_norm_silu", x, norm.weight, norm.bias, 8).backend == "torch":
        pytest.skip("no fused backend on this machine (no extension, no Triton interpreter)")
    params = list(norm.parameters())
    eager = saved_bytes(lambda: nn.functional.silu(norm(x)).sum(), 2, params)
    fused = saved_bytes(lambda: ops.group_norm_silu(x, norm.weight, norm.bias, 8).sum(), 2, params)
    # both keep x, the mean and 1/std (2 x 8 float32 each); eager also keeps GroupNorm's output for SiLU's backward
    assert fused.activations == x.numel() * 4 + 2 * (2 * 8 * 4)
    assert eager.activations - fused.activations == x.numel() * 4


@pytest.mark.parametrize(
    "preset, autocast", [("ddpmpp-tiny", None), ("adm-tiny", torch.bfloat16)], ids=["ddpmpp-fp32", "adm-bf16"]
)
def test_the_fused_step_saves_less_than_the_eager_one(preset, autocast):
    config = dataclasses.replace(NETWORK_PRESETS[preset], dropout=0.0)
    torch.manual_seed(0)
    model = ConsistencyModel(build_network(config), autocast_dtype=autocast).train()
    x = torch.randn(1, config.in_channels, config.resolution, config.resolution)
    if ops.explain("group_norm_silu", torch.randn(1, 32, 4, 4), None, None, 8).backend == "torch":
        pytest.skip("no fused backend on this machine (no extension, no Triton interpreter)")
    images, sigma = x.clamp(-1, 1), torch.tensor([1.5])
    labels = torch.tensor([3]) if config.num_classes else None
    eager = consistency_step_saved_bytes(model, images, sigma, labels, generator=torch.Generator().manual_seed(0))
    set_fused_ops(model.net)
    model.skip_out_op = ops.skip_out
    fused = consistency_step_saved_bytes(model, images, sigma, labels, generator=torch.Generator().manual_seed(0))
    assert 0 < fused.activations < eager.activations
    # the fused op really ran: its autograd node is the op's own (an autograd.Function or the extension's op)
    assert any("groupnormsilu" in name.lower().replace("_", "") for name in fused.by_producer)
    if autocast is None:
        assert fused.weights == pytest.approx(eager.weights, rel=0.01)  # the same parameters either way
    else:  # the recomputing norm+conv keeps the float32 parameter itself instead of autocast's bf16 copy
        param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        assert fused.weights <= 1.5 * param_bytes
