"""channels_last GroupNorm(+scale-shift)(+SiLU) with fused pre-adds (cmfast.ops.group_norm_silu_nhwc): every backend
against a float64 reference of the same math (h = x + pre_add + alpha residual rounded once to x's dtype, then the
norm in float64 on that h), each optional input on and off, both Triton paths, odd groups and the engine's channel
counts; the registration (opcheck, torch.compile), the inference-only backward, dispatch and the argument errors.

Tolerance (`within_rule`): the error against float64 is at most twice that of the unfused PyTorch ops in the same
dtype (the sum in x's dtype, then ADM's GroupNorm32, scale-shift and SiLU) plus a floor. Outputs are poisoned with NaN.
The Triton interpreter truncates float32 -> bfloat16 casts where GPUs round to nearest, so there bfloat16 results sit
up to one unit in the last place from the rounded reference; the rule's floor covers it.
"""

import functools

import pytest
import torch

from cmfast import ops
from cmfast.kernels import _common
from cmfast.kernels import group_norm_silu as _gn
from cmfast.kernels import group_norm_silu_nhwc as K

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
CHANNELS = [128, 192, 256, 384, 576, 768, 1024]
CL = torch.channels_last
INTERPRETED = _common.triton is not None and _common.interpreted(K)
EXT = ops.extension.reason() == ""
# (pre_add, residual, scale_shift, silu, return_sum); pre_add: None, "C", "1C" or "BC" (its shape)
OPTIONS = [
    (None, False, False, True, False),
    ("C", False, False, False, True),
    ("BC", True, True, True, True),
    (None, True, True, True, True),
    ("1C", True, False, False, False),
]


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv("CMFAST_BACKEND", raising=False)


def make_inputs(shape, groups, dtype, device="cpu", options=OPTIONS[2], channels_last=True, seed=0, alpha=0.7):
    """Keyword arguments of cmfast.ops.group_norm_silu_nhwc for x of `shape` (never zero, per-channel offsets), with
    the optional inputs `options` asks for: a float32 pre_add (a folded conv bias plus an embedding term), a residual
    in x's dtype, ADM's scale and shift (views of a (B, 2C, 1, 1) embedding)."""
    pre, residual, scale_shift, silu, return_sum = options
    B, C, H, W = shape
    g = torch.Generator().manual_seed(seed)
    fmt = CL if channels_last else torch.contiguous_format

    def tensor(t, dt=dtype):
        return t.to(device, dt)

    kw = dict(num_groups=groups, eps=1e-5, alpha=alpha, silu=silu, return_sum=return_sum)
    kw["x"] = tensor(torch.randn(B, C, H, W, generator=g) * 2 + torch.randn(1, C, 1, 1, generator=g)).contiguous(
        memory_format=fmt
    )
    kw["weight"] = tensor(1 + 0.3 * torch.randn(C, generator=g))
    kw["bias"] = tensor(0.3 * torch.randn(C, generator=g))
    if pre is not None:
        rows = {"C": (C,), "1C": (1, C), "BC": (B, C)}[pre]
        kw["pre_add"] = tensor(0.5 * torch.randn(rows, generator=g) + 0.5, torch.float32)
    if residual:
        kw["residual"] = tensor(torch.randn(B, C, H, W, generator=g) * 1.5).contiguous(memory_format=fmt)
    if scale_shift:
        kw["scale"], kw["shift"] = tensor(0.5 * torch.randn(B, 2 * C, 1, 1, generator=g)).chunk(2, dim=1)
    return kw


def exact_sum(kw, dtype):
    """x + pre_add + alpha residual in `dtype` arithmetic."""
    C = kw["x"].shape[1]
    h = kw["x"].to(dtype)
    if kw.get("pre_add") is not None:
        h = h + kw["pre_add"].to(dtype).reshape(-1, C, 1, 1)
    if kw.get("residual") is not None:
        h = h + kw["alpha"] * kw["residual"].to(dtype)
    return h


def references(kw):
    """(y64, h64, y_torch, h_torch): the math in float64 on h rounded once to x's dtype, the exact sum; and the unfused
    PyTorch ops in x's dtype (sum, ADM's GroupNorm32, scale-shift, SiLU)."""
    dtype, G, eps = kw["x"].dtype, kw["num_groups"], kw["eps"]
    h64 = exact_sum(kw, torch.float64)
    h = h64.to(dtype) if "pre_add" in kw or "residual" in kw else kw["x"]
    d = {k: kw[k].double() if kw.get(k) is not None else None for k in ("weight", "bias", "scale", "shift")}
    y64, _ = K.group_norm_silu_nhwc_ref(h.double(), d["weight"], d["bias"], G, eps, None, None, 1.0, d["scale"],
                                        d["shift"], kw["silu"])  # fmt: skip
    h_torch = exact_sum(kw, dtype)
    y_torch = _gn.group_norm_silu_ref(h_torch, kw["weight"], kw["bias"], G, eps, kw.get("scale"), kw.get("shift"),
                                      kw["silu"])  # fmt: skip
    return y64, h64, y_torch, h_torch


@pytest.fixture
def check(poisoned_outputs, within_rule):
    """check(kw, backend, what): y (and h when returned) against float64 within the rule, in x's dtype, shape and
    memory format, with every output poisoned first."""
    assert_within_rule = within_rule(FLOOR)

    def check(kw, backend, what, run=None):
        run = run or functools.partial(ops.group_norm_silu_nhwc, backend=backend)
        with poisoned_outputs():
            out = run(**kw)
        y, h = out if kw["return_sum"] else (out, None)
        y64, h64, y_torch, h_torch = references(kw)
        x = kw["x"]
        fmt = _common.memory_format(x)
        for name, got in (("y", y), ("h", h)):
            if got is not None:
                assert got.dtype == x.dtype and got.shape == x.shape, f"{name} of {what}"
                assert got.is_contiguous(memory_format=fmt), f"{name} of {what} is not in x's memory format"
        assert_within_rule(y, y64, y_torch, x.dtype, f"y of {what}")
        if h is not None and ("pre_add" in kw or "residual" in kw):
            assert_within_rule(h, h64, h_torch, x.dtype, f"h of {what}")
        elif h is not None:
            assert h is x, f"{what}: with nothing added, h is x itself"

    return check


# --- the torch backend (the reference) on CPU ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", CHANNELS)
def test_torch_backend(dtype, channels, check):
    """The engine's channel counts with 32 groups (4 to 32 channels per group), 7 x 9 pixels, batch 1 and 3, each
    optional input on and off."""
    for i, options in enumerate(OPTIONS):
        kw = make_inputs((1 + 2 * (i % 2), channels, 7, 9), 32, dtype, options=options, seed=i)
        check(kw, "torch", f"{options} C={channels} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_odd_groups_and_layouts(dtype, check):
    """Odd channels per group (5, 3, 9), a float64 pre_add, NCHW input (y and h stay NCHW), alpha != 1."""
    for i, (shape, groups) in enumerate([((3, 40, 5, 3), 8), ((2, 96, 7, 9), 32), ((1, 576, 3, 5), 64)]):
        for channels_last in (True, False):
            kw = make_inputs(shape, groups, dtype, options=OPTIONS[2], channels_last=channels_last, seed=i, alpha=-1.5)
            kw["pre_add"] = kw["pre_add"].double()
            check(kw, "torch", f"{shape} groups={groups} channels_last={channels_last}")


# --- Triton: the interpreter on CPU (marker triton), or CUDA ----------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("extras", [False, True], ids=["plain", "pre_add+residual+scale_shift"])
@pytest.mark.parametrize("path", ["single", "split"])
@pytest.mark.parametrize("shape", [(3, 192, 7, 9), (1, 576, 7, 9)], ids=["C192", "C576"])
def test_triton(device, shape, path, extras, dtype, check, monkeypatch):
    """Both paths forced: single (one program per sample) and split (C = 192: 2 tiles of 32 pixels, the last of 31;
    C = 576: 8 tiles of 8, the last of 7), the tiles merged 4 at a time, so the merge takes two steps for C = 576."""
    monkeypatch.setattr(K, "MERGE_BLOCK_T", 4)
    options = OPTIONS[2] if extras else (None, False, False, True, True)
    kw = make_inputs(shape, 32, dtype, device, options=options, seed=shape[1])
    if extras and shape[1] == 192:
        kw["pre_add"] = kw["pre_add"].double()  # any float dtype, read as such
    run = functools.partial(_run_launcher, path=path)
    check(kw, "triton", f"{path} {shape} {options} {dtype}", run=run)
    assert K._plan(63, shape[1], path)[0] == path


def _run_launcher(x, weight, bias, num_groups, eps, pre_add=None, residual=None, alpha=1.0, scale=None, shift=None,
                  silu=True, return_sum=False, path="auto"):  # fmt: skip
    """The Triton launcher with its path forced, called as cmfast.ops.group_norm_silu_nhwc is (checked through it
    first: the backend it picks is triton)."""
    args = dict(num_groups=num_groups, eps=eps, pre_add=pre_add, residual=residual, alpha=alpha, scale=scale,
                shift=shift, silu=silu, return_sum=return_sum)  # fmt: skip
    assert ops.explain("group_norm_silu_nhwc", x, weight, bias, backend="triton", **args).backend == "triton"
    pre = pre_add.reshape(-1, x.shape[1]) if pre_add is not None else None
    scale, shift = (scale.reshape(x.shape[:2]), shift.reshape(x.shape[:2])) if scale is not None else (None, None)
    y, h = K.group_norm_silu_nhwc_forward(x, weight, bias, pre, residual, alpha, scale, shift, num_groups, eps, silu,
                                          return_sum, path=path)  # fmt: skip
    if not return_sum:
        return y
    return y, h if pre is not None or residual is not None else x


def test_triton_split_statistics_of_an_offset_input(device, check):
    """A large mean over a small spread (mean 50, std 0.1) through the split path's merge: the tiles' centred sums and
    Chan's formula keep the variance where E[h^2] - E[h]^2 in float32 would lose it."""
    kw = make_inputs((2, 192, 7, 9), 32, torch.float32, device, options=OPTIONS[1])
    kw["x"] = (kw["x"] * 0.05 + 50).contiguous(memory_format=CL)
    check(kw, "triton", "offset input, split", run=functools.partial(_run_launcher, path="split"))


def test_triton_paths_by_size():
    """single while the padded sample fits MAX_SINGLE elements, else split with TILE_ELEMENTS-element tiles."""
    assert K._plan(63, 192) == ("single", 64, 256)
    assert K._plan(16 * 16, 192) == ("split", 32, 256)
    assert K._plan(25, 1024) == ("single", 32, 1024)
    assert K._plan(8 * 8, 1024) == ("split", 8, 1024)
    assert K._plan(64 * 64, 128) == ("split", 64, 128)
    with pytest.raises(ValueError, match="unknown path 'tile'"):
        K._plan(63, 192, "tile")


@pytest.mark.cuda
@pytest.mark.skipif("not torch.cuda.is_available()")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", CHANNELS)
def test_triton_cuda_shapes(dtype, channels, check):
    """The engine's resolutions on a GPU, both paths as the launcher picks them."""
    for i, (options, hw) in enumerate(zip(OPTIONS, [(4, 4), (8, 8), (16, 16), (32, 32), (64, 64)])):
        kw = make_inputs((1 + 2 * (i % 2), channels, *hw), 32, dtype, "cuda", options=options, seed=i)
        check(kw, "triton", f"{options} C={channels} {hw} {dtype}")


# --- the extension's CUDA kernel (CUDA only) -------------------------------------------------------------------------


def needs_ext_cuda(test):
    """Marker cuda; skipped without a GPU or without cmfast._C."""
    test = pytest.mark.skipif(not EXT, reason=f"cmfast._C: {ops.extension.reason()}")(test)
    return pytest.mark.cuda(pytest.mark.skipif("not torch.cuda.is_available()")(test))


def _run_ext(**kw):
    """The registered op with the "ext" backend (cmfast_ext::group_norm_silu_nhwc), its C++ outputs poisoned too."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("CMFAST_EXT_POISON", "1")
        y, h = torch.ops.cmfast.group_norm_silu_nhwc(*_op_args(kw, "ext"))
    if not kw["return_sum"]:
        return y
    return y, h if "pre_add" in kw or "residual" in kw else kw["x"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("hw", [(7, 9), (32, 32), (64, 64)])
@needs_ext_cuda
def test_ext_cuda(dtype, channels, hw, check):
    """The CUDA kernel: one block per sample while the sample fits in shared memory, the split kernels otherwise."""
    for i, options in enumerate(OPTIONS):
        kw = make_inputs((1 + 2 * (i % 2), channels, *hw), 32, dtype, "cuda", options=options, seed=i)
        check(kw, "ext", f"{options} C={channels} {hw} {dtype}", run=_run_ext)


@needs_ext_cuda
def test_ext_cuda_checks():
    kw = make_inputs((2, 192, 9, 7), 32, torch.bfloat16, "cuda")
    args = _op_args(kw, "ext")[:-1]
    E = torch.ops.cmfast_ext.group_norm_silu_nhwc
    with pytest.raises(RuntimeError, match="needs a 4-D channels_last x"):
        E(kw["x"].contiguous(), *args[1:])
    with pytest.raises(RuntimeError, match=r"pre_add must have shape \(C,\), \(1, C\) or \(B, C\) = \(2, 192\)"):
        E(*args[:3], args[3][:, :96], *args[4:])
    with pytest.raises(RuntimeError, match="residual is Float but x is BFloat16"):
        E(*args[:4], args[4].float(), *args[5:])
    odd = make_inputs((1, 36, 4, 4), 4, torch.bfloat16, "cuda")
    with pytest.raises(RuntimeError, match="C must be a multiple of 8"):
        E(*_op_args(odd, "ext")[:-1])


@needs_ext_cuda
@pytest.mark.skipif(
    "group_norm_silu_nhwc" not in ops.extension.OPS,
    reason="cmfast/ops/extension.py does not list the op in OPS (nor register its fake) yet",
)
def test_ext_cuda_dispatch_and_opcheck():
    kw = make_inputs((2, 192, 9, 7), 32, torch.bfloat16, "cuda")
    torch.library.opcheck(torch.ops.cmfast_ext.group_norm_silu_nhwc.default, _op_args(kw, "ext")[:-1])
    assert ops.explain("group_norm_silu_nhwc", **kw) == ops.Choice("ext", {})
    odd = make_inputs((1, 36, 4, 4), 4, torch.bfloat16, "cuda")
    assert "multiple of 8" in ops.explain("group_norm_silu_nhwc", **odd).skipped["ext"]
    kw["x"] = kw["x"].contiguous()
    assert "channels_last" in ops.explain("group_norm_silu_nhwc", **kw).skipped["ext"]


@pytest.mark.cuda
@pytest.mark.skipif("not torch.cuda.is_available()")
@pytest.mark.parametrize(
    "backend", ["triton", pytest.param("ext", marks=pytest.mark.skipif(not EXT, reason="no cmfast._C"))]
)
def test_cuda_graph_capture(backend):
    """The engine captures the op in CUDA graphs: no host sync, no allocation outside the graph's pool; a replay on
    new inputs gives what an eager call gives (single path at 7 x 9, split path at 64 x 64)."""
    for hw in ((7, 9), (64, 64)):
        kw = make_inputs((2, 192, *hw), 32, torch.bfloat16, "cuda")
        args = list(_op_args(kw, backend))
        torch.ops.cmfast.group_norm_silu_nhwc(*args)  # compiles the Triton kernels outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y, h = torch.ops.cmfast.group_norm_silu_nhwc(*args)
        for t in (args[0], args[4]):  # x and the residual
            t.copy_(torch.randn_like(t))
        graph.replay()
        want_y, want_h = torch.ops.cmfast.group_norm_silu_nhwc(*args)
        assert torch.equal(y, want_y) and torch.equal(h, want_h), f"{backend} {hw}"


# --- registration, backward, dispatch, errors ------------------------------------------------------------------------


def _op_args(kw, backend):
    _, (x, w, b, G, eps, pre, res, alpha, scale, shift, silu) = ops._prepare_group_norm_silu_nhwc(**kw, backend="torch")
    return (x, w, b, pre, res, float(alpha), scale, shift, G, float(eps), silu, kw["return_sum"], backend)


def test_opcheck_torch():
    """Schema, fake implementation (torch.compile), no aliasing or mutation; with and without the written h."""
    for i, options in enumerate(OPTIONS):
        kw = make_inputs((2, 64, 3, 5), 16, torch.float32, options=options, seed=i)
        torch.library.opcheck(torch.ops.cmfast.group_norm_silu_nhwc.default, _op_args(kw, "torch"))


@pytest.mark.triton
@pytest.mark.skipif(not INTERPRETED, reason="needs triton with TRITON_INTERPRET=1")
def test_opcheck_and_compile_triton():
    kw = make_inputs((2, 64, 3, 5), 16, torch.bfloat16)
    torch.library.opcheck(torch.ops.cmfast.group_norm_silu_nhwc.default, _op_args(kw, "triton"))

    def block(x, residual):
        extra = dict(pre_add=kw["pre_add"], residual=residual, scale=kw["scale"], shift=kw["shift"], return_sum=True)
        y, h = ops.group_norm_silu_nhwc(x, kw["weight"], kw["bias"], 16, **extra, backend="triton")
        return y + h

    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(kw["x"], kw["residual"]), block(kw["x"], kw["residual"]))


def test_backward_is_inference_only():
    kw = make_inputs((2, 64, 3, 5), 16, torch.float32)
    args = list(_op_args(kw, "torch"))
    args[0] = args[0].detach().requires_grad_()
    y, _ = torch.ops.cmfast.group_norm_silu_nhwc(*args)
    with pytest.raises(RuntimeError, match="group_norm_silu_nhwc is inference-only"):
        y.sum().backward()


def test_dispatch_reasons(monkeypatch):
    kw = make_inputs((2, 64, 3, 5), 16, torch.float32)
    ext_reason = "cmfast._C has no CPU kernel for group_norm_silu_nhwc" if EXT else ops.extension.reason()
    choice = ops.explain("group_norm_silu_nhwc", **kw)
    assert choice.skipped["ext"] == ext_reason
    assert choice.backend == ("triton" if INTERPRETED else "torch")
    kw["x"] = kw["x"].contiguous()
    kw["residual"] = kw["residual"].contiguous()
    nchw = ops.explain("group_norm_silu_nhwc", **kw)
    assert nchw.backend == "torch"
    if _common.triton is not None:
        assert nchw.skipped["triton"].endswith("read a 4-D x stored channels_last")
    with pytest.raises(ops.BackendError, match="'triton' .*stored channels_last"):
        ops.group_norm_silu_nhwc(**kw, backend="triton")
    monkeypatch.setenv("CMFAST_BACKEND", "torch")
    kw["x"] = kw["x"].contiguous(memory_format=CL)
    assert ops.explain("group_norm_silu_nhwc", **kw) == ops.Choice("torch", {})


def test_return_sum_without_pre_adds_is_x():
    kw = make_inputs((2, 64, 3, 5), 16, torch.float32, options=(None, False, True, True, True))
    y, h = ops.group_norm_silu_nhwc(**kw)
    assert h is kw["x"]
    torch.testing.assert_close(y, ops.group_norm_silu_nhwc(**kw | {"return_sum": False}, backend="torch"))


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(pre_add=torch.randn(65)), r"pre_add must have shape \(64,\), \(1, 64\) or \(2, 64\), got \(65,\)"),
        (dict(pre_add=torch.randn(3, 64)), r"pre_add must have shape .* got \(3, 64\)"),
        (dict(pre_add=torch.ones(64, dtype=torch.long)), "pre_add must be a floating-point tensor, got torch.int64"),
        (dict(residual=torch.randn(2, 64, 5, 3)), r"residual has shape \(2, 64, 5, 3\) but x has \(2, 64, 3, 5\)"),
        (dict(residual=torch.randn(2, 64, 3, 5, dtype=torch.bfloat16)), "residual is torch.bfloat16 but x is"),
        (dict(scale=torch.randn(64), shift=torch.randn(64)), r"scale must have shape \(2, 64\) or \(2, 64, 1, 1\)"),
        (dict(shift=None), "give both scale and shift"),
        (dict(num_groups=12), "64 channels do not split into num_groups=12 groups"),
        (dict(weight=torch.randn(32)), r"weight must have shape \(64,\), got \(32,\)"),
        (dict(x=torch.randn(2, 64, 15)), r"x must be \(B, C, H, W\), got shape \(2, 64, 15\)"),
        (dict(x=torch.ones(2, 64, 3, 5, dtype=torch.long)), "x must be a floating-point tensor"),
    ],
)
def test_clear_errors(change, message):
    kw = make_inputs((2, 64, 3, 5), 16, torch.float32) | change
    with pytest.raises(ValueError, match=f"group_norm_silu_nhwc: {message}"):
        ops.group_norm_silu_nhwc(**kw)
