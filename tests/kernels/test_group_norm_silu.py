"""Fused GroupNorm+SiLU (cmfast.kernels.group_norm_silu) against autograd of the float64 reference: forward and
every gradient, for GroupNorm+SiLU, GroupNorm alone and ADM's scale-shift form, NCHW and channels_last, both the
one-program-per-group path and the split path, and the paper's channel counts.

CPU runs go through Triton's interpreter (marker `triton`), CUDA runs use the networks' shapes (marker `cuda`).
Tolerance: the kernel's error against float64 is at most twice PyTorch's own error in the same dtype plus a floor.
"""

import functools

import pytest
import torch

from cmfast import ops
from cmfast.kernels import group_norm_silu as K

triton = pytest.importorskip("triton", reason="triton is not installed")

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMS = ["silu", "norm", "scale_shift"]
# (B, C, H, W, groups): odd H x W, C not a power of two, batch 1 and 3
SHAPES = {
    "cpu": [(3, 96, 5, 7, 32), (1, 40, 3, 3, 10)],
    "cuda": [(3, 192, 33, 31, 32), (1, 576, 17, 15, 32), (2, 1152, 8, 8, 32), (1, 256, 64, 64, 32)],
}


def run(inputs, groups, form, backend, cast=None):
    """y and the gradients of every tensor input, through cmfast.ops (cast: e.g. torch.float64 for the reference)."""
    tensors = [t.to(cast) if cast is not None and t is not None else t for t in inputs]
    x, weight, bias, scale, shift, dy = [t.detach().requires_grad_() if t is not None else None for t in tensors]
    y = ops.group_norm_silu(x, weight, bias, groups, 1e-5, scale, shift, silu=form != "norm", backend=backend)
    y.backward(dy.detach())
    return {"y": y.detach(), "dx": x.grad, "dweight": weight.grad, "dbias": bias.grad} | (
        {"dscale": scale.grad, "dshift": shift.grad} if scale is not None else {}
    )


@pytest.fixture
def check(group_norm_inputs, poisoned_outputs, within_rule):
    """check(shape, form, dtype, device, channels_last, seed=0) for shape (B, C, H, W, groups): the Triton backend's
    output and gradients against float64, within the rule, in x's memory format."""
    assert_within_rule = within_rule(FLOOR)

    def check(shape, form, dtype, device, channels_last, seed=0):
        inputs = group_norm_inputs(shape[:4], form, dtype, device, channels_last, seed)
        with poisoned_outputs():
            fused = run(inputs, shape[-1], form, "triton")
        ref = run(inputs, shape[-1], form, "torch", cast=torch.float64)
        low = run(inputs, shape[-1], form, "torch")
        for name, value in fused.items():
            assert value.dtype == dtype and value.shape == ref[name].shape, name
            assert_within_rule(value, ref[name], low[name], dtype, f"{name} of {form} {shape}")
        assert fused["y"].is_contiguous(memory_format=torch.channels_last) == channels_last
        assert fused["dx"].is_contiguous(memory_format=torch.channels_last) == channels_last

    return check


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_fused_path(device, dtype, form, channels_last, check):
    for i, shape in enumerate(SHAPES[device]):
        check(shape, form, dtype, device, channels_last, seed=i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_split_path(device, dtype, form, monkeypatch, check):
    """Groups too big for one program: chunked statistics and gradients, with a partial last chunk."""
    monkeypatch.setattr(K, "MAX_FUSED_FWD", 64)
    monkeypatch.setattr(K, "MAX_FUSED_BWD", 64)
    monkeypatch.setattr(K, "CHUNK", 64)  # 3 channels per group -> BLOCK_C 4, BLOCK_P 16: 99 = 6 x 16 + 3 positions
    assert K._plan(3, 99, 64)[2] == 7
    check((3, 24, 9, 11, 8), form, dtype, device, channels_last=form == "norm")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("form", FORMS)
def test_flat_forward_path(device, dtype, form, monkeypatch, check):
    """The NCHW looped forward: several steps per group with a partial last one (3 x 99 = 297 = 4 x 64 + 41
    elements), statistics merged across steps, channels found from the flat index; the tile path beside it."""
    monkeypatch.setattr(K, "FLAT_BLOCK", 64)
    launcher = K.group_norm_silu_forward
    for path in ("flat", "tile"):
        monkeypatch.setattr(K, "group_norm_silu_forward", functools.partial(launcher, path=path))
        check((3, 24, 9, 11, 8), form, dtype, device, channels_last=False)
    assert K._forward_path(torch.contiguous_format, 4 * 128, 1) == "fused"
    assert K._forward_path(torch.contiguous_format, 8 * 4096, 1) == "fused"
    assert K._forward_path(torch.contiguous_format, 16 * 4096, 2) == "flat"
    assert K._forward_path(torch.channels_last, 8 * 4096, 1) == "fused"


@pytest.mark.parametrize("channels", [64, 192, 576, 1152, 1536])
def test_paper_channel_counts(device, channels, check):
    """Every GroupNorm width of the paper's networks with 32 groups (2 to 48 channels per group)."""
    hw = (3, 5) if device == "cpu" else (32, 32)
    check((1, channels, *hw, 32), "scale_shift", torch.float32, device, channels_last=channels == 576)


def test_songunet_groups_and_eps(device, poisoned_outputs):
    """DDPM++'s GroupNorm: min(32, C // 4) groups and eps 1e-6, without weight or bias given."""
    x = torch.randn(3, 12, 5, 3, device=device) * 3 + 1
    with poisoned_outputs():
        y = ops.group_norm_silu(x, None, None, num_groups=3, eps=1e-6, backend="triton")
    torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 3, eps=1e-6)))
