"""The C++/CUDA extension cmfast._C (csrc/): its CPU ops (GroupNorm+SiLU forward and backward, skip/out, Heun step)
and its CUDA GroupNorm+SiLU against float64 references, its torch.library registration (opcheck), its argument checks,
and its place in cmfast.ops' dispatch.

Tolerance (the `within_rule` fixture of conftest.py): the error against float64 is at most twice PyTorch's own error
in the same dtype plus a floor. Outputs are poisoned with NaN, in Python (torch.empty) and in C++
(CMFAST_EXT_POISON=1).
"""

import os
from contextlib import contextmanager

import pytest
import torch

from cmfast import ops
from cmfast.kernels import group_norm_silu as _gn
from cmfast.kernels import heun_step as _heun
from cmfast.kernels import skip_out as _so
from cmfast.kernels._common import memory_format

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMS = ["silu", "norm", "scale_shift"]
EPS, SD = 0.002, 0.5
needs_cuda = pytest.mark.skipif("not torch.cuda.is_available()")


@pytest.fixture(autouse=True)
def extension_built():
    """Skip without cmfast._C, or fail when CMFAST_REQUIRE_EXT=1 (CI, where it must have been built)."""
    reason = ops.extension.reason()
    if reason and os.environ.get("CMFAST_REQUIRE_EXT") == "1":
        pytest.fail(f"CMFAST_REQUIRE_EXT=1 but {reason}")
    if reason:
        pytest.skip(reason)


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv("CMFAST_BACKEND", raising=False)


@pytest.fixture
def poisoned(poisoned_outputs, monkeypatch):
    """A context manager: NaN in every output the op allocates, from Python or from C++."""

    @contextmanager
    def poisoned():
        with poisoned_outputs(), monkeypatch.context() as m:
            m.setenv("CMFAST_EXT_POISON", "1")
            yield

    return poisoned


@pytest.fixture
def assert_within_rule(within_rule):
    return within_rule(FLOOR)


# --- GroupNorm + SiLU ------------------------------------------------------------------------------------------------


def gn_run(inputs, form, backend, cast=None, backward=True):
    """y and the gradients of every tensor input through cmfast.ops, 32 groups (cast: float64 for the reference)."""
    tensors = [t.to(cast) if cast is not None and t is not None else t for t in inputs]
    x, weight, bias, scale, shift, dy = [
        t.detach().requires_grad_(backward) if t is not None else None for t in tensors
    ]
    y = ops.group_norm_silu(x, weight, bias, 32, 1e-5, scale, shift, silu=form != "norm", backend=backend)
    if not backward:
        return {"y": y.detach()}
    y.backward(dy.detach())
    return {"y": y.detach(), "dx": x.grad, "dweight": weight.grad, "dbias": bias.grad} | (
        {"dscale": scale.grad, "dshift": shift.grad} if scale is not None else {}
    )


@pytest.fixture
def gn_check(group_norm_inputs, poisoned, assert_within_rule):
    """gn_check(shape, form, dtype, channels_last, device="cpu", seed=0, backward=True): the extension's output (and
    gradients) against float64, within the rule, in x's memory format."""

    def check(shape, form, dtype, channels_last, device="cpu", seed=0, backward=True):
        inputs = group_norm_inputs(shape, form, dtype, device, channels_last, seed)
        with poisoned():
            fused = gn_run(inputs, form, "ext", backward=backward)
        ref = gn_run(inputs, form, "torch", cast=torch.float64, backward=backward)
        low = gn_run(inputs, form, "torch", backward=backward)
        for name, value in fused.items():
            assert value.dtype == dtype and value.shape == ref[name].shape, name
            assert_within_rule(value, ref[name], low[name], dtype, f"{name} of {form} {shape} {dtype}")
        assert fused["y"].is_contiguous(memory_format=torch.channels_last) == channels_last
        if backward:
            assert fused["dx"].is_contiguous(memory_format=torch.channels_last) == channels_last

    return check


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_cpu(dtype, form, channels_last, gn_check):
    """Odd H x W, C not a power of two, batch 1 and 3; channels_last over several 64-row chunks, the last partial."""
    for seed, shape in enumerate([(3, 192, 5, 7), (1, 576, 3, 5), (1, 64, 9, 23)]):
        gn_check(shape, form, dtype, channels_last, seed=seed)


@pytest.mark.parametrize("channels", [64, 192, 576, 1152, 1536])
def test_group_norm_silu_cpu_paper_channel_counts(channels, gn_check):
    """Every GroupNorm width of the paper's networks with 32 groups (2 to 48 channels per group)."""
    gn_check((2, channels, 3, 5), "scale_shift", torch.float32, channels == 576)


def test_group_norm_silu_cpu_statistics():
    """The saved mean and rstd are the float32 group statistics (shifted sums stay accurate for a large mean)."""
    x = torch.randn(3, 96, 7, 5) * 0.1 + 50
    for fmt in (torch.contiguous_format, torch.channels_last):
        xc = x.contiguous(memory_format=fmt)
        y, mean, rstd = torch.ops.cmfast_ext.group_norm_silu(
            xc, torch.ones(96), torch.zeros(96), None, None, 32, 1e-5, 0
        )
        var, mean64 = torch.var_mean(x.double().reshape(3, 32, -1), dim=-1, correction=0)
        assert mean.dtype == rstd.dtype == torch.float32 and mean.shape == (3, 32)
        torch.testing.assert_close(mean.double(), mean64, rtol=1e-6, atol=0)
        torch.testing.assert_close(rstd.double(), torch.rsqrt(var + 1e-5), rtol=1e-4, atol=0)


def test_group_norm_silu_cpu_songunet_groups():
    """DDPM++'s GroupNorm: min(32, C // 4) groups, eps 1e-6, no weight or bias given; 2-D and 3-D inputs."""
    for x in (torch.randn(3, 12, 5, 3) * 3 + 1, torch.randn(2, 12, 7), torch.randn(5, 12)):
        assert ops.explain("group_norm_silu", x, None, None, 3).backend == "ext"
        y = ops.group_norm_silu(x, None, None, num_groups=3, eps=1e-6)
        torch.testing.assert_close(y, torch.nn.functional.silu(torch.nn.functional.group_norm(x, 3, eps=1e-6)))


# --- CUDA ------------------------------------------------------------------------------------------------------------

# (B, C, H, W): the fused path (the tile fits in shared memory) and the split path (it does not: 64 x 64 positions,
# 96 x 96 positions of a 4-channel tile, and the paper's widest groups)
CUDA_SHAPES = [(3, 192, 33, 31), (1, 576, 17, 15), (2, 1152, 8, 8), (16, 64, 32, 32), (1, 256, 64, 64),
               (2, 64, 96, 96), (1, 1536, 45, 45)]  # fmt: skip


@needs_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
def test_group_norm_silu_cuda(dtype, form, gn_check):
    """The CUDA kernel (channels_last) against float64; its backward is the registered op's PyTorch one on the saved
    stats."""
    for seed, shape in enumerate(CUDA_SHAPES):
        gn_check(shape, form, dtype, True, device="cuda", seed=seed, backward=shape[0] * shape[2] < 200)


@needs_cuda
@pytest.mark.cuda
def test_group_norm_silu_cuda_dispatch_and_registration(group_norm_inputs):
    x, w, b, scale, shift, _ = group_norm_inputs(
        (2, 192, 9, 7), "scale_shift", torch.float32, "cuda", channels_last=True
    )
    assert ops.explain("group_norm_silu", x, w, b, 32, 1e-5, scale, shift) == ops.Choice("ext", {})
    nchw = x.contiguous()
    assert ops.explain("group_norm_silu", nchw, w, b).skipped["ext"] == (
        "the CUDA group_norm_silu kernel needs channels_last (a 4-D x stored channels_last)"
    )
    assert ops.explain("skip_out", x, x, 1.0, EPS, SD).skipped["ext"] == "cmfast._C has no CUDA kernel for skip_out"
    odd = torch.randn(1, 36, 4, 4, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
    assert "multiple of 8" in ops.explain("group_norm_silu", odd, None, None, 4).skipped["ext"]
    with pytest.raises(RuntimeError, match="needs a 4-D channels_last x"):
        torch.ops.cmfast_ext.group_norm_silu(nchw, w, b, None, None, 32, 1e-5, True)
    torch.library.opcheck(torch.ops.cmfast_ext.group_norm_silu.default, (x, w, b, scale, shift, 32, 1e-5, True))
    misaligned = torch.randn(2 * 192 * 63 + 1, device="cuda")[1:].reshape(2, 9, 7, 192).permute(0, 3, 1, 2)
    y, _, _ = torch.ops.cmfast_ext.group_norm_silu(misaligned, w, b, None, None, 32, 1e-5, True)
    torch.testing.assert_close(y, _gn.group_norm_silu_ref(misaligned, w, b, 32, 1e-5), rtol=1e-4, atol=1e-5)


# --- skip/out and the Heun step --------------------------------------------------------------------------------------


def elementwise_inputs(shape, dtype, channels_last, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return [(torch.randn(shape, generator=g) * 1.5).to(dtype).contiguous(memory_format=fmt) for _ in range(n)]


SHAPES = [((3, 3, 17, 15), False), ((3, 3, 17, 15), True), ((1, 5, 7), False), ((4, 2, 130, 131), False)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("shape, channels_last", SHAPES)
def test_skip_out_cpu(dtype, clamp, shape, channels_last, poisoned, assert_within_rule):
    """Forward against float64, with sigma from sigma_min (where f(x, sigma_min) = x exactly) to 80; the backward
    (cmfast.ops' PyTorch one) against autograd of the reference in the same dtype."""
    x, F, dout = elementwise_inputs(shape, dtype, channels_last)
    sigma = torch.tensor([EPS, 0.7, 80.0, 3.0])[: shape[0]]
    x.requires_grad_(), F.requires_grad_()
    with poisoned():
        out = ops.skip_out(x, F, sigma, EPS, SD, clamp, backend="ext")
    ref = _so.skip_out_ref(x.double(), F.double(), sigma, EPS, SD, clamp)
    assert_within_rule(out.detach(), ref, _so.skip_out_ref(x, F, sigma, EPS, SD, clamp), dtype, "skip_out")
    assert out.dtype == dtype and out.is_contiguous(memory_format=memory_format(x))
    if not clamp:
        assert torch.equal(out[0].detach(), x[0].detach())
    grads = torch.autograd.grad(out, (x, F), dout)
    low = _so.skip_out_ref(x, F, sigma, EPS, SD)
    inside = low.abs() != 1  # PyTorch versions differ on clamp's gradient at the bounds, which low precision hits
    for got, want in zip(grads, torch.autograd.grad(low.clamp(-1, 1) if clamp else low, (x, F), dout)):
        torch.testing.assert_close(got[inside], want[inside])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heun", [False, True])
@pytest.mark.parametrize("clamp", [False, True])
@pytest.mark.parametrize("shape, channels_last", SHAPES)
def test_heun_step_cpu(dtype, heun, clamp, shape, channels_last, poisoned, assert_within_rule):
    """Both calls of the teacher's step (Euler point, then Heun estimate) against float64, sigma per sample."""
    x, F, F_next = elementwise_inputs(shape, dtype, channels_last)
    F_next = F_next if heun else None
    sigma = torch.tensor([80.0, 2.5, 0.4, 11.0])[: shape[0]]
    sigma_next = sigma * torch.tensor([0.7, 0.5, 0.05, 0.9])[: shape[0]]
    with poisoned():
        out = ops.heun_step(x, F, sigma, sigma_next, F_next, SD, clamp, backend="ext")
    cast = [t.double() if t is not None else None for t in (x, F, F_next)]
    ref = _heun.heun_step_ref(cast[0], cast[1], sigma, sigma_next, cast[2], SD, clamp)
    low = _heun.heun_step_ref(x, F, sigma, sigma_next, F_next, SD, clamp)
    assert_within_rule(out, ref, low, dtype, f"heun_step heun={heun}")
    assert out.dtype == dtype and out.is_contiguous(memory_format=memory_format(x))


def test_shared_sigma_and_float64_sigma():
    """A float sigma (expanded, stride 0) and a float64 one both become per-sample float32 noise levels."""
    x, F, _ = elementwise_inputs((3, 2, 5, 5), torch.float32, False)
    want = _so.skip_out_ref(x, F, torch.full((3,), 1.5), EPS, SD)
    torch.testing.assert_close(ops.skip_out(x, F, 1.5, EPS, SD, backend="ext"), want)
    torch.testing.assert_close(ops.skip_out(x, F, torch.full((3,), 1.5, dtype=torch.float64), EPS, SD), want)
    empty = torch.randn(0, 3, 4)
    assert ops.skip_out(empty, empty, torch.ones(0), EPS, SD, backend="ext").shape == (0, 3, 4)


# --- registration, checks, dispatch ----------------------------------------------------------------------------------


def opcheck_cases(group_norm_inputs):
    x, w, b, scale, shift, dy = group_norm_inputs((2, 64, 3, 5), "scale_shift", torch.float32)
    x_cl = x.contiguous(memory_format=torch.channels_last)
    y, mean, rstd = torch.ops.cmfast_ext.group_norm_silu(x, w, b, scale, shift, 32, 1e-5, True)
    a, F, F_next = elementwise_inputs((3, 2, 5, 7), torch.float32, False)
    a_cl, F_cl, _ = elementwise_inputs((3, 2, 5, 7), torch.float32, True)
    sigma = torch.tensor([EPS, 1.0, 30.0])
    E = torch.ops.cmfast_ext
    return [
        (E.group_norm_silu.default, (x, w, b, scale.reshape(2, 64), shift.reshape(2, 64), 32, 1e-5, True)),
        (E.group_norm_silu.default, (x_cl, w, b, None, None, 32, 1e-6, False)),
        (E.group_norm_silu.default, (x.bfloat16(), w, b, scale, shift, 16, 1e-5, True)),
        (E.group_norm_silu_backward.default, (dy, x, w, b, scale, shift, mean, rstd, 32, True)),
        (E.group_norm_silu_backward.default, (dy, x_cl, w, b, None, None, mean, rstd, 32, False)),
        (E.skip_out.default, (a, F, sigma, EPS, SD, True)),
        (E.skip_out.default, (a_cl, F_cl, sigma, EPS, SD, False)),
        (E.heun_step.default, (a, F, sigma, sigma / 2, None, SD, False)),
        (E.heun_step.default, (a_cl, F_cl, sigma, sigma / 2, F_next.contiguous(memory_format=torch.channels_last),
                               SD, True)),
    ]  # fmt: skip


def test_opcheck(group_norm_inputs):
    """Schemas, fake implementations (torch.compile), and no aliasing or mutation, for every cmfast_ext CPU op."""
    for op, args in opcheck_cases(group_norm_inputs):
        torch.library.opcheck(op, args)


def test_torch_compile_traces_the_extension_ops(group_norm_inputs):
    x, w, b, scale, shift, _ = group_norm_inputs((2, 64, 3, 5), "scale_shift", torch.float32)

    def block(x, sigma):
        h = torch.ops.cmfast_ext.group_norm_silu(x, w, b, scale, shift, 32, 1e-5, True)[0]
        return torch.ops.cmfast_ext.skip_out(x, h, sigma, EPS, SD, False)

    sigma = torch.tensor([0.5, 3.0])
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(x, sigma), block(x, sigma))


def test_clear_errors_name_the_argument():
    E = torch.ops.cmfast_ext
    x, w, b = torch.randn(2, 12, 3, 3), torch.randn(12), torch.randn(12)
    with pytest.raises(RuntimeError, match="group_norm_silu: x must be float32, bfloat16 or float16, got Double"):
        E.group_norm_silu(x.double(), w, b, None, None, 4, 1e-5, True)
    with pytest.raises(RuntimeError, match="12 channels do not split into num_groups=5 groups"):
        E.group_norm_silu(x, w, b, None, None, 5, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"weight must have shape \(C,\) = \(12,\), got \[6\]"):
        E.group_norm_silu(x, w[:6], b, None, None, 4, 1e-5, True)
    with pytest.raises(RuntimeError, match="give both scale and shift"):
        E.group_norm_silu(x, w, b, torch.randn(2, 12), None, 4, 1e-5, True)
    with pytest.raises(RuntimeError, match="shift must hold B x C = 2 x 12 values, got shape \\[12\\]"):
        E.group_norm_silu(x, w, b, torch.randn(2, 12), torch.randn(12), 4, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"x must be \(B, C, \*spatial\), got shape \[12\]"):
        E.group_norm_silu(w, w, b, None, None, 4, 1e-5, True)
    with pytest.raises(RuntimeError, match=r"mean must be float32 of shape \(B, num_groups\) = \(2, 4\)"):
        E.group_norm_silu_backward(x, x, w, b, None, None, torch.zeros(2, 3), torch.ones(2, 4), 4, True)
    with pytest.raises(RuntimeError, match="group_norm_silu_backward: dy has shape"):
        E.group_norm_silu_backward(x[:1], x, w, b, None, None, torch.zeros(2, 4), torch.ones(2, 4), 4, True)
    F, sigma = torch.randn_like(x), torch.ones(2)
    with pytest.raises(RuntimeError, match="skip_out: F has shape \\[2, 12, 3, 2\\] but x has \\[2, 12, 3, 3\\]"):
        E.skip_out(x, F[..., :2], sigma, EPS, SD, False)
    with pytest.raises(RuntimeError, match="skip_out: F is BFloat16 but x is Float; the kernels take one dtype"):
        E.skip_out(x, F.bfloat16(), sigma, EPS, SD, False)
    with pytest.raises(RuntimeError, match=r"skip_out: sigma must have shape \(B,\) = \(2,\), got \[3\]"):
        E.skip_out(x, F, torch.ones(3), EPS, SD, False)
    with pytest.raises(RuntimeError, match="heun_step: sigma_next must be floating point, got Long"):
        E.heun_step(x, F, sigma, torch.ones(2, dtype=torch.long), None, SD, False)
    with pytest.raises(RuntimeError, match="heun_step: F_next has shape"):
        E.heun_step(x, F, sigma, sigma, F[:1], SD, False)


def test_dispatch_picks_the_extension_for_cpu_tensors(group_norm_inputs):
    x, w, b, scale, shift, _ = group_norm_inputs((2, 64, 3, 5), "scale_shift", torch.bfloat16)
    assert ops.explain("group_norm_silu", x, w, b, 32, 1e-5, scale, shift) == ops.Choice("ext", {})
    assert ops.explain("skip_out", x, x, 1.0, EPS, SD) == ops.Choice("ext", {})
    assert ops.explain("heun_step", x, x, 2.0, 1.0, x) == ops.Choice("ext", {})
    choice = ops.explain("skip_out", x, x.float(), 1.0, EPS, SD)
    assert choice.skipped["ext"] == "F is torch.float32 but x is torch.bfloat16; cmfast._C kernels take one dtype"
    cuda_x = torch.empty(2, 64, 3, 5, device="meta")
    assert ops.explain("group_norm_silu", cuda_x, None, None).skipped["ext"].endswith("not on meta")
