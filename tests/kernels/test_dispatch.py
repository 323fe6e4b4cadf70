"""Backend dispatch of cmfast.ops: order, reasons, CMFAST_BACKEND, errors; the torch.library registration (opcheck,
torch.compile); and the PyTorch backward the registered ops carry, against autograd of the references.

The "ext" backend is the C++/CUDA extension cmfast._C; tests of the machine without it simulate its absence, and
those that need it skip when it is not built (test_extension.py checks the extension itself, and fails without it in
CI).
"""

import pytest
import torch

from cmfast import ops
from cmfast.kernels import _common
from cmfast.kernels import group_norm_silu as _gn
from cmfast.kernels import skip_out as _so

HAVE_TRITON = _common.triton is not None
INTERPRETED = HAVE_TRITON and _common.interpreted(_so)
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="needs triton with TRITON_INTERPRET=1")
EXT = ops.extension.reason() == ""
needs_ext = pytest.mark.skipif(not EXT, reason=f"cmfast._C: {ops.extension.reason()}")
NOT_BUILT = "the C++/CUDA extension cmfast._C is not built"
EPS, SD = 0.002, 0.5


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv("CMFAST_BACKEND", raising=False)


def skip_out_inputs(dtype=torch.float32, B=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, 2, 3, 5, generator=g, dtype=dtype)
    return x, torch.randn(B, 2, 3, 5, generator=g, dtype=dtype), torch.linspace(EPS, 80, B, dtype=torch.float64)


def gn_inputs(B=2, C=12, scale_shift=True, requires_grad=False):
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(B, C, 3, 5, generator=g) * 2 + 1, 1 + 0.2 * torch.randn(C, generator=g),
               0.2 * torch.randn(C, generator=g)]  # fmt: skip
    tensors += (
        [0.3 * torch.randn(B, C, generator=g), 0.3 * torch.randn(B, C, generator=g)] if scale_shift else [None] * 2
    )
    return [t.requires_grad_(requires_grad) if t is not None else None for t in tensors]


# --- dispatch order and reasons --------------------------------------------------------------------------------------


@pytest.fixture
def without_extension(monkeypatch):
    """Dispatch as on a machine where cmfast._C was not built."""
    monkeypatch.setattr(ops.extension, "reason", lambda: NOT_BUILT)


@needs_interpreter
def test_automatic_choice_skips_the_unbuilt_extension_with_its_reason(without_extension):
    choice = ops.explain("skip_out", *skip_out_inputs(), EPS, SD)
    assert choice.backend == "triton"
    assert choice.skipped == {"ext": NOT_BUILT}


@needs_ext
def test_automatic_choice_takes_the_built_extension_first():
    for op, args in [("skip_out", (*skip_out_inputs(), EPS, SD)), ("group_norm_silu", (*gn_inputs()[:3], 4))]:
        assert ops.explain(op, *args) == ops.Choice("ext", {})
    qkv = torch.randn(2, 3 * 2 * 4, 5)
    assert ops.explain("attention", qkv, 2).skipped["ext"] == "cmfast._C has no CPU kernel for attention"


@pytest.mark.parametrize("built", [pytest.param(True, marks=needs_ext), False])
def test_float64_falls_back_to_torch_with_a_reason(built, monkeypatch):
    if not built:
        monkeypatch.setattr(ops.extension, "reason", lambda: NOT_BUILT)
    choice = ops.explain("group_norm_silu", torch.randn(2, 8, 3, 3, dtype=torch.float64), None, None, 4)
    assert choice.backend == "torch"
    expected = "x is torch.float64; cmfast._C kernels take float32, bfloat16 or float16" if built else NOT_BUILT
    assert choice.skipped["ext"] == expected
    if HAVE_TRITON:
        assert "torch.float64" in choice.skipped["triton"]


def test_reasons_for_triton_environment(monkeypatch, without_extension):
    x, F, sigma = skip_out_inputs()
    triton = _common.triton
    monkeypatch.setattr(_common, "triton", None)
    assert ops.explain("skip_out", x, F, sigma, EPS, SD).skipped["triton"] == "triton is not installed"
    monkeypatch.setattr(_common, "triton", triton)
    if not HAVE_TRITON:
        pytest.skip("triton is not installed, so the reasons that need it cannot be checked")
    monkeypatch.setattr(_common, "interpreted", lambda module: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert "need the Triton interpreter" in ops.explain("skip_out", x, F, sigma, EPS, SD).skipped["triton"]
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert "was set after triton was imported" in ops.explain("skip_out", x, F, sigma, EPS, SD).skipped["triton"]
    meta = [t.to("meta") for t in (x, F, sigma)]
    assert "not on meta" in ops.explain("skip_out", *meta, EPS, SD).skipped["triton"]


@needs_ext
def test_extension_takes_cpu_and_cuda_tensors_only():
    meta = [t.to("meta") for t in skip_out_inputs()]
    skipped = ops.explain("skip_out", *meta, EPS, SD).skipped
    assert skipped["ext"] == "cmfast._C runs on CPU and CUDA tensors, not on meta"


def test_requested_backend_that_cannot_run_raises_with_reasons(monkeypatch):
    x, F, sigma = skip_out_inputs()
    if EXT:
        with pytest.raises(ops.BackendError, match="'ext' .*x is torch.float64; cmfast._C kernels take"):
            ops.skip_out(x.double(), F.double(), sigma, EPS, SD, backend="ext")
        with pytest.raises(ops.BackendError, match="'ext' .*F is torch.bfloat16 but x is torch.float32"):
            ops.skip_out(x, F.bfloat16(), sigma, EPS, SD, backend="ext")
        with pytest.raises(ops.BackendError, match="'ext' .*no CPU kernel for attention"):
            ops.attention(torch.randn(1, 6, 4), 1, backend="ext")
    with monkeypatch.context() as m:
        m.setattr(ops.extension, "reason", lambda: NOT_BUILT)
        with pytest.raises(ops.BackendError, match="'ext' .*not built"):
            ops.skip_out(x, F, sigma, EPS, SD, backend="ext")
    if HAVE_TRITON:
        with pytest.raises(ops.BackendError, match="'triton' .*CMFAST_BACKEND.*torch.float64"):
            monkeypatch.setenv("CMFAST_BACKEND", "triton")
            ops.skip_out(x.double(), F.double(), sigma, EPS, SD)
    with pytest.raises(ValueError, match="unknown backend 'gpu'"):
        ops.skip_out(x, F, sigma, EPS, SD, backend="gpu")


def test_environment_override(monkeypatch):
    x, F, sigma = skip_out_inputs()
    automatic = ops.explain("skip_out", x, F, sigma, EPS, SD)
    monkeypatch.setenv("CMFAST_BACKEND", "torch")
    assert ops.explain("skip_out", x, F, sigma, EPS, SD) == ops.Choice("torch", {})
    monkeypatch.setenv("CMFAST_BACKEND", "auto")
    assert ops.explain("skip_out", x, F, sigma, EPS, SD) == automatic
    monkeypatch.delenv("CMFAST_BACKEND")
    assert ops.explain("skip_out", x, F, sigma, EPS, SD) == automatic
    monkeypatch.setenv("CMFAST_BACKEND", "TPU")
    with pytest.raises(ValueError, match="'tpu' \\(CMFAST_BACKEND\\)"):
        ops.skip_out(x, F, sigma, EPS, SD)
    monkeypatch.setenv("CMFAST_BACKEND", "triton")
    assert ops.explain("skip_out", x, F, sigma, EPS, SD, backend="torch").backend == "torch"  # the argument wins


@pytest.mark.parametrize("built", [pytest.param(True, marks=needs_ext), False])
def test_cuda_is_a_deprecated_name_of_ext(built, monkeypatch):
    if not built:
        monkeypatch.setattr(ops.extension, "reason", lambda: NOT_BUILT)
    args = (*skip_out_inputs(), EPS, SD)
    if built:
        with pytest.warns(DeprecationWarning, match='backend "cuda" \\(backend argument\\) is deprecated; use "ext"'):
            assert ops.explain("skip_out", *args, backend="cuda") == ops.Choice("ext", {})
        monkeypatch.setenv("CMFAST_BACKEND", "CUDA")
        with pytest.warns(DeprecationWarning, match="CMFAST_BACKEND"):
            assert ops.explain("skip_out", *args) == ops.Choice("ext", {})
    else:
        with pytest.warns(DeprecationWarning), pytest.raises(ops.BackendError, match="'ext' .*not built"):
            ops.skip_out(*args, backend="cuda")


def test_invalid_inputs_raise_for_every_backend():
    x, F, sigma = skip_out_inputs()
    with pytest.raises(ValueError, match="sigma has 2 entries but the batch has 3"):
        ops.skip_out(x, F, sigma[:2], EPS, SD)
    with pytest.raises(ValueError, match="F has shape"):
        ops.skip_out(x, F[:, :1], sigma, EPS, SD)
    with pytest.raises(ValueError, match="12 channels do not split into num_groups=5"):
        ops.group_norm_silu(torch.randn(1, 12, 2, 2), None, None, 5)
    with pytest.raises(ValueError, match="both scale and shift"):
        ops.group_norm_silu(torch.randn(1, 12, 2, 2), None, None, 4, scale=torch.randn(1, 12))
    with pytest.raises(ValueError, match="B x C = 2 x 12"):
        ops.group_norm_silu(torch.randn(2, 12, 2, 2), None, None, 4, scale=torch.randn(12), shift=torch.randn(12))
    with pytest.raises(ValueError, match="unknown op"):
        ops.explain("no_such_op", x)


@needs_interpreter
@pytest.mark.triton
def test_backends_agree():
    x, F, sigma = skip_out_inputs()
    torch.testing.assert_close(ops.skip_out(x, F, sigma, EPS, SD, True, "triton"),
                               ops.skip_out(x, F, sigma, EPS, SD, True, "torch"))  # fmt: skip
    args = gn_inputs()
    torch.testing.assert_close(ops.group_norm_silu(*args[:3], 4, 1e-5, *args[3:], backend="triton"),
                               ops.group_norm_silu(*args[:3], 4, 1e-5, *args[3:], backend="torch"))  # fmt: skip


# --- the torch.library registration ----------------------------------------------------------------------------------


def opcheck_cases(backend):
    x, F, sigma = skip_out_inputs()
    x.requires_grad_(), F.requires_grad_()
    x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
    gn = gn_inputs(requires_grad=True)
    gn_plain = gn_inputs(C=8, scale_shift=False, requires_grad=True)
    gn_cl = [gn[0].detach().contiguous(memory_format=torch.channels_last).requires_grad_(), *gn[1:]]
    with torch.no_grad():
        y, mean, rstd = torch.ops.cmfast.group_norm_silu(*gn, 4, 1e-5, True, "torch")
    dy = torch.randn_like(y)
    plain = (x.detach(), F.detach())
    return [
        (torch.ops.cmfast.skip_out.default, (x, F, sigma, EPS, SD, True, backend)),
        (torch.ops.cmfast.skip_out.default, (x_cl, F, sigma, EPS, SD, False, backend)),
        (torch.ops.cmfast.skip_out_backward.default, (torch.randn_like(x), sigma, *plain, EPS, SD, True, backend)),
        (torch.ops.cmfast.group_norm_silu.default, (*gn, 4, 1e-5, True, backend)),
        (torch.ops.cmfast.group_norm_silu.default, (*gn_plain, 2, 1e-6, False, backend)),
        (torch.ops.cmfast.group_norm_silu.default, (*gn_cl, 4, 1e-5, True, backend)),
        (torch.ops.cmfast.group_norm_silu_backward.default,
         (dy, *[t.detach() for t in gn], mean, rstd, 4, True, backend)),
        (torch.ops.cmfast.heun_step.default, (*plain, sigma, sigma / 2, None, SD, False, backend)),
        (torch.ops.cmfast.heun_step.default, (*plain, sigma, sigma / 2, x.detach() * 0.5, SD, True, backend)),
    ]  # fmt: skip


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("triton", marks=[pytest.mark.triton, needs_interpreter]),
        pytest.param("ext", marks=needs_ext),
    ],
)
def test_opcheck(backend):
    for op, args in opcheck_cases(backend):
        torch.library.opcheck(op, args)


def registered_torch_ops():
    """group_norm_silu, heun_step and skip_out as ops.* calls them, but through the registered custom ops' "torch"
    implementation: ops.* with backend="torch" runs the plain references, which would leave no custom op to trace."""
    T = torch.ops.cmfast
    return (
        lambda x, w, b, n, eps, scale, shift: T.group_norm_silu(x, w, b, scale, shift, n, eps, True, "torch")[0],
        lambda x, F, sigma, sigma_next: T.heun_step(x, F, sigma, sigma_next, None, SD, False, "torch"),
        lambda *args, clamp: T.skip_out(*args, clamp, "torch"),
    )


def dispatched_ops(backend):
    """group_norm_silu, heun_step and skip_out through cmfast.ops with this backend (None: the automatic choice)."""
    return (
        lambda *a: ops.group_norm_silu(*a, backend=backend),
        lambda *a: ops.heun_step(*a, backend=backend),
        lambda *a, clamp: ops.skip_out(*a, clamp=clamp, backend=backend),
    )


@pytest.mark.parametrize(
    "backend",
    [
        "torch",
        pytest.param("triton", marks=[pytest.mark.triton, needs_interpreter]),
        pytest.param("ext", marks=needs_ext),
        None,
    ],
)
def test_torch_compile_traces_the_ops_in_one_graph(backend):
    """A block that uses all three ops compiles with fullgraph=True; values and gradients match eager. "torch" calls
    the registered custom ops with their "torch" implementation, so that the custom ops are what is traced."""
    group_norm_silu, heun_step, skip_out = registered_torch_ops() if backend == "torch" else dispatched_ops(backend)

    def block(x, w, b, scale, shift, sigma):
        h = group_norm_silu(x, w, b, 4, 1e-5, scale, shift)
        with torch.no_grad():
            target = heun_step(x.detach(), h.detach(), sigma, sigma / 2)
        return skip_out(x, h, sigma, EPS, SD, clamp=True), target

    x, w, b, scale, shift = gn_inputs(requires_grad=True)
    sigma = torch.tensor([0.5, 3.0])
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    eager_out, eager_target = block(x, w, b, scale, shift, sigma)
    out, target = compiled(x, w, b, scale, shift, sigma)
    torch.testing.assert_close(out, eager_out)
    torch.testing.assert_close(target, eager_target)
    grads = torch.autograd.grad(out.square().sum(), (x, w, b, scale, shift))
    eager_grads = torch.autograd.grad(eager_out.square().sum(), (x, w, b, scale, shift))
    for g, e in zip(grads, eager_grads):
        torch.testing.assert_close(g, e)


# --- the registered ops' PyTorch backward ----------------------------------------------------------------------------


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("channels_last", [False, True])
def test_registered_torch_backward_matches_autograd_of_the_reference(scale_shift, silu, channels_last):
    x, w, b, scale, shift = [t.double() if t is not None else None for t in gn_inputs(B=3, scale_shift=scale_shift)]
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    inputs = [t.requires_grad_() for t in (x, w, b, scale, shift) if t is not None]
    dy = torch.randn_like(x)
    y = torch.ops.cmfast.group_norm_silu(x, w, b, scale, shift, 4, 1e-5, silu, "torch")[0]
    grads = torch.autograd.grad(y, inputs, dy)
    ref = _gn.group_norm_silu_ref(x, w, b, 4, 1e-5, scale, shift, silu)
    torch.testing.assert_close(y, ref)
    for g, r in zip(grads, torch.autograd.grad(ref, inputs, dy)):
        torch.testing.assert_close(g, r)
