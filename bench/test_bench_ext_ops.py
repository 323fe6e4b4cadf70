"""The C++ extension's CPU ops (cmfast._C, csrc/cpu/kernels.cpp) against their eager PyTorch equivalents, fp32 NCHW.

- GroupNorm+SiLU: F.group_norm then F.silu (32 groups) vs torch.ops.cmfast_ext.group_norm_silu;
- skip/out: cmfast.kernels.skip_out.skip_out_ref (c_skip x + c_out F in eager ops) vs cmfast_ext.skip_out;
- Heun step, second call (the heavier one): cmfast.kernels.heun_step.heun_step_ref vs cmfast_ext.heun_step.

Shapes are the networks' small CPU ones: batch 16, 64 and 192 channels, 16x16 and 32x32. Each pair shares a group, so
`pytest bench/test_bench_ext_ops.py --benchmark-only` prints eager and extension side by side; extra_info holds the
memory traffic in GB/s (each tensor read or written once: the floor of what any implementation moves). The target
is the extension at least 2x eager. Skipped when the extension is not built.
"""

import pytest
import torch
import torch.nn.functional as F

from cmfast import ops
from cmfast.kernels import heun_step as _heun
from cmfast.kernels import skip_out as _so

pytestmark = pytest.mark.skipif(bool(ops.extension.reason()), reason=ops.extension.reason() or "built")

SHAPES = [(16, 64, 16, 16), (16, 64, 32, 32), (16, 192, 16, 16), (16, 192, 32, 32)]
EPS, SD = 0.002, 0.5


def _measure(benchmark, fn, op, impl, shape, tensors_moved):
    fn()  # warm-up outside the measurement
    benchmark.group = f"{op} {'x'.join(map(str, shape))}"
    benchmark.extra_info.update(op=op, impl=impl, shape=list(shape), dtype="fp32", layout="NCHW")
    benchmark.pedantic(fn, rounds=60, iterations=1, warmup_rounds=5)
    numel = torch.Size(shape).numel()
    benchmark.extra_info["gbytes_per_s"] = tensors_moved * numel * 4 / benchmark.stats.stats.median / 1e9


def _inputs(shape, n):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.mark.parametrize("impl", ["eager", "ext"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_group_norm_silu(benchmark, impl, shape):
    (x,) = _inputs(shape, 1)
    w, b = torch.randn(shape[1]), torch.randn(shape[1])
    if impl == "eager":
        fn = lambda: F.silu(F.group_norm(x, 32, w, b, 1e-5))  # noqa: E731
    else:
        fn = lambda: torch.ops.cmfast_ext.group_norm_silu(x, w, b, None, None, 32, 1e-5, True)  # noqa: E731
    _measure(benchmark, fn, "group_norm_silu", impl, shape, tensors_moved=2)


@pytest.mark.parametrize("impl", ["eager", "ext"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_skip_out(benchmark, impl, shape):
    x, f = _inputs(shape, 2)
    sigma = torch.linspace(EPS, 80, shape[0])
    if impl == "eager":
        fn = lambda: _so.skip_out_ref(x, f, sigma, EPS, SD)  # noqa: E731
    else:
        fn = lambda: torch.ops.cmfast_ext.skip_out(x, f, sigma, EPS, SD, False)  # noqa: E731
    _measure(benchmark, fn, "skip_out", impl, shape, tensors_moved=3)


@pytest.mark.parametrize("impl", ["eager", "ext"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_heun_step(benchmark, impl, shape):
    x, f, f_next = _inputs(shape, 3)
    sigma = torch.linspace(1, 80, shape[0])
    sigma_next = sigma * 0.8
    if impl == "eager":
        fn = lambda: _heun.heun_step_ref(x, f, sigma, sigma_next, f_next, SD)  # noqa: E731
    else:
        fn = lambda: torch.ops.cmfast_ext.heun_step(x, f, sigma, sigma_next, f_next, SD, False)  # noqa: E731
    _measure(benchmark, fn, "heun_step", impl, shape, tensors_moved=4)
