"""Fixtures every kernel test shares: the device a test runs on, NaN-poisoned outputs, the tolerance rule and GroupNorm
inputs.

A test that takes `device` runs once per device: "cpu" through Triton's interpreter (marker `triton`; tests/conftest.py
sets TRITON_INTERPRET=1 on machines without CUDA before triton is imported) and "cuda" (marker `cuda`, skipped
without a GPU).
"""

from contextlib import contextmanager

import pytest
import torch

from cmfast.kernels import group_norm_silu
from cmfast.kernels._common import interpreted

DEVICES = [pytest.param("cpu", marks=pytest.mark.triton), pytest.param("cuda", marks=pytest.mark.cuda)]


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", DEVICES, indirect=True)


@pytest.fixture
def device(request):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if request.param == "cpu" and not interpreted(group_norm_silu):
        pytest.skip("triton was imported without TRITON_INTERPRET=1, so CPU tensors cannot run its kernels")
    return request.param


@pytest.fixture
def poisoned_outputs(monkeypatch):
    """A context manager that fills every tensor torch.empty/empty_like allocates with NaN, so an element a kernel
    fails to write shows."""
    empty, empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    @contextmanager
    def poisoned():
        with monkeypatch.context() as mp:
            mp.setattr(torch, "empty", lambda *a, **k: poison(empty(*a, **k)))
            mp.setattr(torch, "empty_like", lambda *a, **k: poison(empty_like(*a, **k)))
            yield

    return poisoned


@pytest.fixture
def within_rule():
    """within_rule(floor) -> check(out, ref64, torch_out, dtype, what): the error against float64 is at most twice
    PyTorch's own error in the same dtype, plus floor[dtype] relative to the reference's scale; and no NaN is left
    from a missed write."""

    def rule(floor: dict):
        def check(out, ref64, torch_out, dtype, what):
            assert not out.isnan().any(), f"{what}: NaN left in the output (a missed write)"
            err = (out.double() - ref64).abs().max().item()
            torch_err = (torch_out.double() - ref64).abs().max().item()
            bound = 2 * torch_err + floor[dtype] * max(ref64.abs().max().item(), 1.0)
            assert err <= bound, (
                f"{what}: error {err:.3g} > 2 x PyTorch's {torch_err:.3g} + floor {bound - 2 * torch_err:.3g}"
            )

        return check

    return rule


@pytest.fixture
def group_norm_inputs():
    """group_norm_inputs(shape, form, dtype, device="cpu", channels_last=False, seed=0) -> x (never zero, with
    per-channel offsets), weight, bias, scale and shift (ADM's view of a (B, 2C, 1, 1) embedding; None unless form ==
    "scale_shift") and an upstream gradient, for shape (B, C, H, W)."""

    def make(shape, form, dtype, device="cpu", channels_last=False, seed=0):
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

    return make
