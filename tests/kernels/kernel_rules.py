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
