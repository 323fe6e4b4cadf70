"""What every kernel test shares: the CPU/CUDA device parameter, NaN-poisoned outputs and the tolerance rule."""

from contextlib import contextmanager

import pytest
import torch
from cmfast.kernels import group_norm_silu

from cmfast import ops

DEVICES = [
    pytest.param("cpu", marks=pytest.mark.triton),
    pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif("not torch.cuda.is_available()")]),
]


@pytest.fixture
def device(request):
    if request.param == "cpu" and not ops._interpreted(group_norm_silu):
        pytest.skip("triton was imported without TRITON_INTERPRET=1, so CPU tensors cannot run its kernels")
    return request.param


@contextmanager
def poisoned_outputs():
    """Fill every tensor torch.empty/empty_like allocates with NaN, so an element a kernel fails to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
        mp.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
        yield


def within_rule(floor: dict):
    """The check of the issue's rule: error against float64 at most twice PyTorch's own error in the same dtype,
    plus floor[dtype] relative to the reference's scale; also no NaN left from a missed write."""

    def check(out, ref64, torch_out, dtype, what):
        assert not out.isnan().any(), f"{what}: NaN left in the output (a missed write)"
        err = (out.double() - ref64).abs().max().item()
        torch_err = (torch_out.double() - ref64).abs().max().item()
        bound = 2 * torch_err + floor[dtype] * max(ref64.abs().max().item(), 1.0)
        assert err <= bound, (
            f"{what}: error {err:.3g} > 2 x PyTorch's {torch_err:.3g} + floor {bound - 2 * torch_err:.3g}"
        )

    return check


def group_norm_inputs(shape, form, dtype, device="cpu", channels_last=False, seed=0):
    """GroupNorm test inputs for shape (B, C, H, W): x (never zero, with per-channel offsets), weight, bias, scale and
    shift (ADM's view of a (B, 2C, 1, 1) embedding; None unless form == "scale_shift") and an upstream gradient."""
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, H, W, generator=g) * 2 + torch.randn(1, C, 1, 1, generator=g)
    weight = 1 + 0.3 * torch.randn(C, generator=g)
    bias = 0.3 * torch.randn(C, generator=g)
    dy = torch.randn(B, C, H, W, generator=g)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, dy = (t.to(device, dtype).contiguous(memory_format=fmt) for t in (x, dy))
    weight, bias = weight.to(device, dtype), bias.to(device, dtype)
    scale = shift = None
    if form == "scale_shift":
        scale, shift = (0.5 * torch.randn(B, 2 * C, 1, 1, generator=g)).to(device, dtype).chunk(2, dim=1)
    return x, weight, bias, scale, shift, dy
