"""Fused Heun step (cmfast.kernels.heun_step): both passes against the float64 reference, and the two-call API
against cmfast.sampling.heun_step with a real EDM teacher.

CPU runs go through Triton's interpreter (marker `triton`), CUDA runs use bigger shapes (marker `cuda`).
"""

import pytest
import torch

from cmfast import ops
from cmfast.kernels import heun_step as K
from cmfast.preconditioning import EDMDenoiser, c_in, c_noise
from cmfast.sampling import heun_step as heun_step_sampling

triton = pytest.importorskip("triton", reason="triton is not installed")

SD = 0.5
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float16: 1e-3}
SHAPES = {"cpu": [(3, 3, 7, 9), (1, 4, 5, 3)], "cuda": [(3, 3, 67, 129), (1, 192, 33, 31)]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_both_passes_match_reference(device, dtype, clamp, channels_last, poisoned_outputs, within_rule):
    assert_within_rule = within_rule(FLOOR)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for i, shape in enumerate(SHAPES[device]):
        g = torch.Generator().manual_seed(i)
        x, F, F_next = (torch.randn(shape, generator=g) * s + 0.2 for s in (8.0, 1.2, 1.2))
        sigma = torch.exp(torch.empty(shape[0]).uniform_(-3, 4.4, generator=g))
        sigma_next = sigma * torch.empty(shape[0]).uniform_(0.3, 0.9, generator=g)
        x, F, F_next = (t.to(device, dtype).contiguous(memory_format=fmt) for t in (x, F, F_next))
        sigma, sigma_next = sigma.to(device), sigma_next.to(device)
        for f_next in (None, F_next):  # pass 1 (Euler point), then pass 2 (Heun estimate)
            with torch.no_grad(), poisoned_outputs():
                out = ops.heun_step(x, F, sigma, sigma_next, f_next, SD, clamp, backend="triton")
            args64 = [t.double() if t is not None else None for t in (x, F, sigma, sigma_next, f_next)]
            ref = K.heun_step_ref(*args64, SD, clamp)
            low = ops.heun_step(x, F, sigma, sigma_next, f_next, SD, clamp, backend="torch")
            assert out.dtype == dtype and out.is_contiguous(memory_format=fmt)
            assert_within_rule(out, ref, low, dtype, f"pass {1 if f_next is None else 2} {shape}")


def test_two_calls_reproduce_the_teachers_heun_step(device, recording_net_class, poisoned_outputs):
    """The API around a real teacher: net at (x, t), pass 1, net at (x_e, s), pass 2 == sampling.heun_step(D, ...)."""
    torch.manual_seed(0)
    net = recording_net_class(channels=3).to(device)
    teacher = EDMDenoiser(net, sigma_data=SD)
    x = torch.randn(3, 3, 9, 7, device=device) * 5
    t = torch.tensor([5.0, 0.8, 40.0], device=device)
    s = torch.tensor([3.1, 0.5, 21.0], device=device)
    shape = (-1, 1, 1, 1)
    with torch.no_grad(), poisoned_outputs():
        F = net(c_in(t.reshape(shape), SD) * x, c_noise(t, "edm"))
        x_e = ops.heun_step(x, F, t, s, backend="triton")
        F_next = net(c_in(s.reshape(shape), SD) * x_e, c_noise(s, "edm"))
        x_hat = ops.heun_step(x, F, t, s, F_next=F_next, backend="triton")
    with torch.no_grad():
        expected = heun_step_sampling(lambda x, sigma, labels=None: teacher(x, sigma.reshape(-1)), x,
                                      t.reshape(shape), s.reshape(shape))  # fmt: skip
    torch.testing.assert_close(x_hat, expected, rtol=1e-5, atol=1e-5)


def test_gradients_are_refused():
    x = torch.randn(2, 3, requires_grad=True)
    with pytest.raises(ValueError, match="no backward"):
        ops.heun_step(x, x.detach(), 1.0, 0.5)
