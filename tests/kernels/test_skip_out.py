"""Fused skip/out (cmfast.kernels.skip_out) against the float64 reference: forward, backward, clamp, layouts.

CPU runs go through Triton's interpreter (marker `triton`), CUDA runs use bigger shapes (marker `cuda`). Tolerance: the
kernel's error against float64 is at most twice PyTorch's own error in the same dtype plus a small per-dtype floor.
"""

import pytest
import torch

from cmfast import ops
from cmfast.kernels import skip_out as K

triton = pytest.importorskip("triton", reason="triton is not installed")

EPS, SD = 0.002, 0.5
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}
SHAPES = {"cpu": [(3, 3, 7, 9), (1, 5, 3, 11)], "cuda": [(3, 3, 67, 129), (1, 192, 33, 31)]}


def inputs(shape, dtype, device, channels_last, seed=0, F_dtype=None):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g) * 1.5 + 0.1
    F = torch.randn(shape, generator=g) * 1.5 - 0.1
    sigma = torch.exp(torch.empty(shape[0], dtype=torch.float64).uniform_(-6, 4.4, generator=g))  # ~ eps .. T
    sigma[0] = EPS  # the boundary: f(x, sigma_min) = x (float64, so that the float64 reference sees it exactly too)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.to(dtype)
    x = torch.where(
        x.abs() == 1, x * 1.02, x
    )  # f(x, eps) = x: keep it off the clamp's kinks, where torch versions differ
    x = x.to(device).contiguous(memory_format=fmt)
    F = F.to(device, F_dtype or dtype).contiguous(memory_format=fmt)
    return x, F, sigma.to(device)


def run(x, F, sigma, clamp, dout, backend):
    """Output and (dx, dF) for upstream gradient dout, through cmfast.ops."""
    x, F = x.detach().requires_grad_(), F.detach().requires_grad_()
    out = ops.skip_out(x, F, sigma, EPS, SD, clamp=clamp, backend=backend)
    out.backward(dout)
    return out.detach(), x.grad, F.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_forward_backward_match_reference(device, dtype, clamp, channels_last, poisoned_outputs, within_rule):
    assert_within_rule = within_rule(FLOOR)
    for i, shape in enumerate(SHAPES[device]):
        x, F, sigma = inputs(shape, dtype, device, channels_last, seed=i)
        dout = torch.randn(shape, generator=torch.Generator().manual_seed(9)).to(device, dtype)
        with poisoned_outputs():
            out, dx, dF = run(x, F, sigma, clamp, dout, "triton")
        ref = run(x.double(), F.double(), sigma.double(), clamp, dout.double(), "torch")
        low = run(x, F, sigma, clamp, dout, "torch")
        for name, a, r, t in zip(("out", "dx", "dF"), (out, dx, dF), ref, low):
            assert a.dtype == dtype and a.shape == x.shape
            assert_within_rule(a, r, t, dtype, f"{name} {shape}")
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert torch.equal(out[0], x[0].clamp(-1, 1) if clamp else x[0])  # c_skip(eps) = 1, c_out(eps) = 0 exactly
        if clamp:
            assert out.abs().max() <= 1 and (ref[0].abs() == 1).any()


def test_mixed_dtypes_shared_sigma_and_flat_samples(device, poisoned_outputs):
    """x float32 with a bfloat16 network output, one float sigma for the batch, samples of any rank."""
    x, F, _ = inputs((3, 2, 5, 7), torch.float32, device, False, F_dtype=torch.bfloat16)
    with poisoned_outputs():
        out = ops.skip_out(x, F, 1.7, EPS, SD, backend="triton")
    assert out.dtype == torch.float32
    ref = K.skip_out_ref(x.double(), F.double(), torch.full((3,), 1.7, dtype=torch.float64), EPS, SD)
    torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
    flat, sigma = torch.randn(1, 1001, device=device) + 0.3, torch.tensor([3.0], device=device)
    with poisoned_outputs():
        out = ops.skip_out(flat, flat * 0.5, sigma, EPS, SD, backend="triton")
    torch.testing.assert_close(out, K.skip_out_ref(flat, flat * 0.5, sigma, EPS, SD))
