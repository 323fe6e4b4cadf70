"""Forward mode (JVP) of the fused ops: torch.func.jvp through cmfast.ops against torch.func.jvp of the float64
references, primal and tangent, on irregular shapes, for the Triton kernels (CPU interpreter, marker `triton`; CUDA,
marker `cuda`), the extension's CPU kernels and the PyTorch rules the registered JVP ops carry;
torch.autograd.forward_ad through the same rules; a backward through the primal output in the step that took the JVP;
and the JVP backends' place in the dispatch (explain).

Tolerance (the `within_rule` fixture of conftest.py): the error against float64 is at most twice the error of PyTorch's
own JVP in the same dtype (autograd's forward mode through the reference), plus a floor.
"""

import os

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.nn.attention import SDPBackend, sdpa_kernel

from cmfast import ops, trigflow
from cmfast.kernels import attention as _attn
from cmfast.kernels import group_norm_silu as _gn
from cmfast.kernels import skip_out as _so
from cmfast.kernels import trig_skip_out as _tso
from cmfast.kernels._common import interpreted

FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FORMS = ["silu", "norm", "scale_shift"]
# (B, C, H, W, groups): odd H x W, C not a power of two, batch 1 and 3
GN_SHAPES = {"cpu": [(3, 12, 5, 7, 4), (1, 40, 3, 3, 10)], "cuda": [(3, 192, 33, 31, 32), (1, 576, 17, 15, 32)]}


@pytest.fixture(autouse=True)
def no_backend_override(monkeypatch):
    monkeypatch.delenv("CMFAST_BACKEND", raising=False)


def needs_extension():
    reason = ops.extension.reason()
    if reason and os.environ.get("CMFAST_REQUIRE_EXT") == "1":
        pytest.fail(f"CMFAST_REQUIRE_EXT=1 but {reason}")
    if reason:
        pytest.skip(reason)


def fused_backends(op, *args) -> list[str]:
    """The fused backends (ext, triton) that can run `op` on these inputs on this machine."""
    available = []
    for backend in ("ext", "triton"):
        try:
            ops.explain(op, *args, backend=backend)
        except ops.BackendError:
            continue
        available.append(backend)
    return available


def jvp(fn, primals, tangents, cast=None):
    """torch.func.jvp(fn, primals, tangents), the inputs cast to `cast` first (e.g. float64 for the reference)."""
    if cast is not None:
        primals, tangents = (tuple(t.to(cast) for t in ts) for ts in (primals, tangents))
    return torch.func.jvp(fn, primals, tangents)


def assert_jvp_within_rule(check, fn, reference, primals, tangents, dtype, what):
    """Primal and tangent of fn against float64 jvp of `reference`, within twice the error of jvp(reference) in
    dtype plus the floor."""
    out, tout = jvp(fn, primals, tangents)
    ref, tref = jvp(reference, primals, tangents, cast=torch.float64)
    low, tlow = jvp(reference, primals, tangents)
    assert out.dtype == dtype and tout.dtype == dtype, what
    check(out, ref, low, dtype, f"primal of {what}")
    check(tout, tref, tlow, dtype, f"tangent of {what}")
    return out, tout


# --- GroupNorm + SiLU ------------------------------------------------------------------------------------------------


def gn_case(group_norm_inputs, shape, form, dtype, device, channels_last, seed=0):
    """Primals (x, weight, bias[, scale, shift]) and random tangents for every one of them, and fn(backend)."""
    x, weight, bias, scale, shift, _ = group_norm_inputs(shape[:4], form, dtype, device, channels_last, seed)
    primals = (x, weight, bias) + ((scale, shift) if scale is not None else ())
    g = torch.Generator().manual_seed(seed + 100)
    tangents = tuple(torch.randn(p.shape, generator=g).to(device, dtype).contiguous(memory_format=_gn.memory_format(p))
                     for p in primals)  # fmt: skip
    groups, silu = shape[-1], form != "norm"

    def fn(backend):
        def f(x, weight, bias, *scale_shift):
            s, t = scale_shift if scale_shift else (None, None)
            return ops.group_norm_silu(x, weight, bias, groups, 1e-5, s, t, silu=silu, backend=backend)

        return f

    return primals, tangents, fn


@pytest.fixture
def check_gn(group_norm_inputs, poisoned_outputs, within_rule):
    """check_gn(shape, form, dtype, device, channels_last, backend): jvp through the backend against the rule, the
    tangent in x's memory format."""
    check = within_rule(FLOOR)

    def run(shape, form, dtype, device, channels_last, backend, seed=0):
        primals, tangents, fn = gn_case(group_norm_inputs, shape, form, dtype, device, channels_last, seed)
        with poisoned_outputs():
            _, tout = assert_jvp_within_rule(check, fn(backend), fn("torch"), primals, tangents, dtype,
                                             f"{backend} {form} {shape} channels_last={channels_last}")  # fmt: skip
        assert tout.is_contiguous(memory_format=torch.channels_last) == channels_last

    return run


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_jvp_triton(device, dtype, form, channels_last, check_gn):
    for i, shape in enumerate(GN_SHAPES[device]):
        check_gn(shape, form, dtype, device, channels_last, "triton", seed=i)


@pytest.mark.parametrize("form", FORMS)
def test_group_norm_silu_jvp_triton_split(device, form, monkeypatch, check_gn):
    """Groups too big for one program: the partial-sums kernel, then the tangent kernel, with a partial last chunk."""
    monkeypatch.setattr(_gn, "MAX_FUSED_BWD", 64)
    monkeypatch.setattr(_gn, "CHUNK", 64)
    assert _gn._plan(3, 99, 64)[2] == 7
    check_gn((1, 24, 9, 11, 8), form, torch.float32, device, form == "norm", "triton")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_silu_jvp_extension(dtype, form, channels_last, check_gn, monkeypatch):
    needs_extension()
    monkeypatch.setenv("CMFAST_EXT_POISON", "1")
    for i, shape in enumerate(GN_SHAPES["cpu"]):
        check_gn(shape, form, dtype, "cpu", channels_last, "ext", seed=i)


@pytest.mark.parametrize("form", FORMS)
def test_group_norm_silu_jvp_torch_rule(form, group_norm_inputs, within_rule):
    """The registered JVP op's PyTorch rule (what opcheck runs, and the kernels' specification) in float64 against
    autograd's forward mode through the float64 reference."""
    primals, tangents, fn = gn_case(group_norm_inputs, (3, 12, 5, 7, 4), form, torch.float64, "cpu", False)
    x, weight, bias, *ss = primals
    scale, shift = (t.reshape(3, 12) for t in ss) if ss else (None, None)
    tx, tweight, tbias, *tss = tangents
    tscale, tshift = (t.reshape(3, 12) for t in tss) if tss else (None, None)
    _, mean, rstd = torch.ops.cmfast.group_norm_silu(x, weight, bias, scale, shift, 4, 1e-5, form != "norm", "torch")
    ta, tt = _gn.affine_tangents(weight, bias, scale, tweight, tbias, tscale, tshift, 3, torch.float64)
    tout = _gn.group_norm_silu_jvp_torch(x, tx, weight, bias, scale, shift, mean, rstd, ta, tt, 4, form != "norm")
    _, tref = jvp(fn("torch"), primals, tangents)
    torch.testing.assert_close(tout, tref, rtol=1e-10, atol=1e-10)


def test_group_norm_silu_forward_ad_and_backward_through_the_primal(group_norm_inputs):
    """torch.autograd.forward_ad takes the same rule as torch.func.jvp; and with grad on, a backward through the
    primal output of torch.func.jvp gives the gradients of the plain op."""
    primals, tangents, fn = gn_case(group_norm_inputs, (3, 12, 5, 7, 4), "scale_shift", torch.float32, "cpu", True)
    if ops.explain("group_norm_silu", *primals[:3], 4).backend == "torch":
        pytest.skip("no fused backend on this machine (no extension, no Triton interpreter)")
    _, tref = jvp(fn("torch"), primals, tangents, cast=torch.float64)
    with fwAD.dual_level():
        out = fn(None)(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        tout = fwAD.unpack_dual(out).tangent
    torch.testing.assert_close(tout.double(), tref, rtol=1e-4, atol=1e-5)

    leaves = [p.detach().requires_grad_() for p in primals]
    out, tout = torch.func.jvp(fn(None), tuple(leaves), tangents)
    torch.testing.assert_close(tout.double(), tref, rtol=1e-4, atol=1e-5)
    dy = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves, dy)
    ref_leaves = [p.detach().double().requires_grad_() for p in primals]
    ref_grads = torch.autograd.grad(fn("torch")(*ref_leaves), ref_leaves, dy.double())
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=1e-4, atol=1e-4)


def test_group_norm_silu_jvp_in_explain(group_norm_inputs):
    x, weight, bias, *_ = group_norm_inputs((2, 8, 3, 3), "silu", torch.float32)
    assert ops.explain("group_norm_silu_jvp", x, weight, bias, 4, backend="torch").backend == "torch"
    auto = ops.explain("group_norm_silu_jvp", x, weight, bias, 4)
    expected = [b for b in ("ext", "triton") if b not in auto.skipped]
    assert auto.backend == (expected[0] if expected else "torch")
    if ops.extension.reason():
        assert auto.skipped["ext"] == ops.extension.reason()
    elif not interpreted(_gn):
        assert auto.backend == "ext"  # the CPU JVP kernel
    # float64 has no fused kernel: the JVP is autograd's, through the reference
    assert ops.explain("group_norm_silu_jvp", x.double(), weight, bias, 4).backend == "torch"


# --- skip/out and TrigFlow's skip/out --------------------------------------------------------------------------------

EPS, SD = 0.002, 0.5
ELEMENTWISE_SHAPES = {"cpu": [(3, 3, 5, 7), (1, 2, 9, 11)], "cuda": [(3, 3, 65, 63), (1, 4, 128, 129)]}


def elementwise_case(shape, dtype, device, channels_last, seed, levels):
    """Primals (x, F, per-sample level) and random tangents for each; levels: the per-sample sigmas or times to pick
    from (batch 1 takes the last)."""
    g = torch.Generator().manual_seed(seed)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x, F, tx, tF = (torch.randn(shape, generator=g).to(device, dtype).contiguous(memory_format=fmt) for _ in range(4))
    level = torch.tensor(levels[-shape[0] :], device=device)
    return (x, F, level), (tx, tF, torch.randn(shape[0], generator=g).to(device))


def skip_out_fn(clamp):
    return lambda backend: lambda x, F, sigma: ops.skip_out(x, F, sigma, EPS, SD, clamp, backend=backend)


def trig_fn(backend):
    return lambda x, F, t: ops.trig_skip_out(x, F, t, SD, backend=backend)


SIGMAS = [EPS, 0.7, 20.0]  # sigma_min (c_skip 1, c_out 0), a middle one, a large one
TIMES = [0.0, 0.7, 1.5]  # TrigFlow t: 0 (f = x), a middle one, near pi / 2


@pytest.fixture
def check_elementwise(poisoned_outputs, within_rule):
    check = within_rule(FLOOR)

    def run(op, shape, dtype, device, channels_last, backend, seed=0):
        fn, levels = (trig_fn, TIMES) if op == "trig" else (skip_out_fn(op == "clamp"), SIGMAS)
        primals, tangents = elementwise_case(shape, dtype, device, channels_last, seed, levels)
        with poisoned_outputs():
            out, tout = assert_jvp_within_rule(check, fn(backend), fn("torch"), primals, tangents, dtype,
                                               f"{op} {backend} {shape} channels_last={channels_last}")  # fmt: skip
        assert out.is_contiguous(memory_format=torch.channels_last) == channels_last
        assert tout.is_contiguous(memory_format=torch.channels_last) == channels_last

    return run


OPS = ["skip_out", "clamp", "trig"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_elementwise_jvp_triton(device, dtype, op, channels_last, check_elementwise):
    for i, shape in enumerate(ELEMENTWISE_SHAPES[device]):
        check_elementwise(op, shape, dtype, device, channels_last, "triton", seed=i)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_elementwise_jvp_extension(dtype, op, channels_last, check_elementwise, monkeypatch):
    needs_extension()
    monkeypatch.setenv("CMFAST_EXT_POISON", "1")
    for i, shape in enumerate(ELEMENTWISE_SHAPES["cpu"]):
        check_elementwise(op, shape, dtype, "cpu", channels_last, "ext", seed=i)


def test_skip_out_jvp_coefficient_derivatives():
    """The tangent along sigma alone is tsigma (c_skip'(sigma) x + c_out'(sigma) F), with the derivatives of Appendix
    C's coefficients written out (the kernels' formulas) against central differences of the float64 reference."""
    backends = fused_backends("skip_out_jvp", torch.ones(1, 2), torch.ones(1, 2), 1.0, EPS, SD)
    x, F = torch.randn(3, 2, 5, 5, dtype=torch.float64), torch.randn(3, 2, 5, 5, dtype=torch.float64)
    sigma = torch.tensor([EPS, 0.7, 20.0], dtype=torch.float64)
    h = 1e-6
    fd = (ops.skip_out(x, F, sigma + h, EPS, SD, backend="torch") - ops.skip_out(x, F, sigma - h, EPS, SD)) / (2 * h)
    for backend in backends:
        fn = skip_out_fn(False)(backend)
        _, tout = torch.func.jvp(lambda s, fn=fn: fn(x.float(), F.float(), s), (sigma.float(),), (torch.ones(3),))
        torch.testing.assert_close(tout.double(), fd, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("op", OPS)
def test_elementwise_jvp_torch_rules(op):
    """The registered JVP ops' PyTorch rules (the kernels' specification, written out) in float64 against autograd's
    forward mode through the float64 references, with every tangent and with some missing."""
    fn, levels = (trig_fn, TIMES) if op == "trig" else (skip_out_fn(op == "clamp"), SIGMAS)
    primals, tangents = elementwise_case((3, 3, 5, 7), torch.float64, "cpu", False, 0, levels)
    primals = (*primals[:2], primals[2].double())
    for keep in [(0, 1, 2), (1,), (2,), (0, 2)]:
        given = [t.double() if i in keep else None for i, t in enumerate(tangents)]
        _, tref = jvp(fn("torch"), primals, tuple(t if t is not None else torch.zeros_like(p)
                                                  for p, t in zip(primals, given)))  # fmt: skip
        if op == "trig":
            tout = _tso.trig_skip_out_jvp_torch(*primals, *given, SD)[1]
        else:
            tout = _so.skip_out_jvp_torch(*primals, *given, EPS, SD, op == "clamp")
        torch.testing.assert_close(tout, tref, rtol=1e-12, atol=1e-12)


def test_trig_skip_out_jvp_in_one_call():
    """cmfast.ops.trig_skip_out_jvp gives f and its tangent from one pass, as torch.func.jvp does, and t = 0 gives
    f = x exactly, with the tangent tx - tt sigma_data F."""
    primals, tangents = elementwise_case((3, 3, 5, 7), torch.float32, "cpu", False, 0, TIMES)
    ref, tref = jvp(trig_fn("torch"), primals, tangents, cast=torch.float64)
    for backend in ["torch", *fused_backends("trig_skip_out_jvp", *primals)]:
        out, tout = ops.trig_skip_out_jvp(*primals[:3], *tangents, SD, backend=backend)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tout.double(), tref, rtol=1e-5, atol=1e-5)
        x, F, _ = primals
        tx, tF, tt = tangents
        assert torch.equal(out[0], x[0]), backend
        torch.testing.assert_close(tout[0], tx[0] - tt[0] * SD * F[0], rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="tx has shape"):
        ops.trig_skip_out_jvp(*primals[:3], tangents[0][:1], None, None, SD)


@pytest.mark.parametrize("op", ["skip_out", "trig"])
def test_elementwise_forward_ad_and_backward_through_the_primal(op):
    """forward_ad takes the same rule; a backward through torch.func.jvp's primal output gives the plain op's
    gradients (trig_skip_out: of x, F and t; skip_out: of x and F)."""
    fn, levels = (trig_fn, TIMES) if op == "trig" else (skip_out_fn(False), SIGMAS)
    primals, tangents = elementwise_case((3, 3, 5, 7), torch.float32, "cpu", True, 0, levels)
    if (
        ops.explain(op.replace("trig", "trig_skip_out"), *primals, *([EPS, SD] if op == "skip_out" else [])).backend
        == "torch"
    ):
        pytest.skip("no fused backend on this machine (no extension, no Triton interpreter)")
    _, tref = jvp(fn("torch"), primals, tangents, cast=torch.float64)
    with fwAD.dual_level():
        out = fn(None)(*(fwAD.make_dual(p, t) for p, t in zip(primals, tangents)))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent.double(), tref, rtol=1e-5, atol=1e-5)
    wants = 3 if op == "trig" else 2
    leaves = [p.detach().requires_grad_(i < wants) for i, p in enumerate(primals)]
    out, tout = torch.func.jvp(fn(None), tuple(leaves), tangents)
    torch.testing.assert_close(tout.double(), tref, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, leaves[:wants], g)
    ref_leaves = [p.detach().double().requires_grad_(i < wants) for i, p in enumerate(primals)]
    ref_grads = torch.autograd.grad(fn("torch")(*ref_leaves), ref_leaves[:wants], g.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_registered_jvp_ops_opcheck(group_norm_inputs):
    """Schemas and fake implementations of the registered JVP ops and trig_skip_out (torch implementations)."""
    x, weight, bias, scale, shift, _ = group_norm_inputs((2, 8, 3, 5), "scale_shift", torch.float32)
    scale, shift = scale.reshape(2, 8), shift.reshape(2, 8)
    _, mean, rstd = torch.ops.cmfast.group_norm_silu(x, weight, bias, scale, shift, 4, 1e-5, True, "torch")
    ta, tt = torch.randn(2, 8), torch.randn(2, 8)
    args = (x, torch.randn_like(x), weight, bias, scale, shift, mean, rstd, ta, tt, 4, True, "torch")
    torch.library.opcheck(torch.ops.cmfast.group_norm_silu_jvp, args)
    F, sigma = torch.randn_like(x), torch.tensor([0.5, 3.0])
    torch.library.opcheck(torch.ops.cmfast.skip_out_jvp,
                          (x, F, sigma, torch.randn_like(x), None, torch.ones(2), EPS, SD, True, "torch"))  # fmt: skip
    torch.library.opcheck(torch.ops.cmfast.trig_skip_out, (x.requires_grad_(), F, sigma, SD, "torch"))
    for primal in (True, False):
        args = (x.detach(), F, sigma, None, torch.randn_like(x), sigma, SD, primal, "torch")
        torch.library.opcheck(torch.ops.cmfast.trig_skip_out_jvp, args)


# --- attention -------------------------------------------------------------------------------------------------------

# (B, heads, head_dim, T): head dims and T not powers of two or multiples of the blocks, batch 1 and 3
ATTN_SHAPES = {"cpu": [(3, 2, 24, 37), (1, 1, 40, 70)], "cuda": [(3, 4, 64, 1000), (1, 2, 96, 333), (2, 1, 256, 257)]}


def attention_case(shape, dtype, device, seed=0, strided=False):
    """qkv (B, 3 H D, T) with peaked softmaxes (scores of std ~2) and a random tangent; strided: both as a
    (B, T, 3 H D) tensor's transpose."""
    B, H, D, T = shape
    g = torch.Generator().manual_seed(seed)
    qkv, tqkv = (1.4 * torch.randn(B, T, 3 * H * D, generator=g) for _ in range(2))
    qkv, tqkv = (t.to(device, dtype).transpose(1, 2) for t in (qkv, tqkv))
    if not strided:
        qkv, tqkv = qkv.contiguous(), tqkv.contiguous()

    def fn(backend):
        def attention(qkv):
            if backend != "torch":
                return ops.attention(qkv, H, backend=backend)
            with sdpa_kernel(SDPBackend.MATH):  # SDPA's fused kernels (CPU flash, CUDA) have no forward mode
                return ops.attention(qkv, H, backend=backend)

        return attention

    return (qkv,), (tqkv,), fn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("strided", [False, True])
def test_attention_jvp_triton(device, dtype, strided, poisoned_outputs, within_rule):
    check = within_rule(FLOOR)
    for i, shape in enumerate(ATTN_SHAPES[device]):
        primals, tangents, fn = attention_case(shape, dtype, device, i, strided)
        with poisoned_outputs():
            assert_jvp_within_rule(check, fn("triton"), fn("torch"), primals, tangents, dtype,
                                   f"attention {shape} strided={strided}")  # fmt: skip


def test_attention_jvp_torch_rule():
    """The registered JVP op's PyTorch rule (the kernel's specification: P from lse, tO = P tV + (P * tS) V -
    rowsum(P * tS) O) in float64 against autograd's forward mode through the float64 reference."""
    (qkv,), (tqkv,), fn = attention_case((3, 2, 24, 37), torch.float64, "cpu")
    _, lse = torch.ops.cmfast.attention(qkv, 2, "torch")
    _, tref = jvp(fn("torch"), (qkv,), (tqkv,))
    torch.testing.assert_close(_attn.attention_jvp_torch(qkv, tqkv, lse, 2), tref, rtol=1e-12, atol=1e-12)
    torch.library.opcheck(torch.ops.cmfast.attention_jvp, (qkv.float(), tqkv.float(), lse.float(), 2, "torch"))


def test_attention_forward_ad_and_backward_through_the_primal():
    if not interpreted(_attn):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    primals, tangents, fn = attention_case((1, 2, 24, 37), torch.float32, "cpu")
    _, tref = jvp(fn("torch"), primals, tangents, cast=torch.float64)
    with fwAD.dual_level():
        out = fn("triton")(fwAD.make_dual(primals[0], tangents[0]))
        torch.testing.assert_close(fwAD.unpack_dual(out).tangent.double(), tref, rtol=1e-4, atol=1e-5)
    leaf = primals[0].detach().requires_grad_()
    out, tout = torch.func.jvp(fn("triton"), (leaf,), tangents)
    torch.testing.assert_close(tout.double(), tref, rtol=1e-4, atol=1e-5)
    g = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, leaf, g)
    ref_leaf = primals[0].detach().double().requires_grad_()
    (ref_grad,) = torch.autograd.grad(fn("torch")(ref_leaf), ref_leaf, g.double())
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)
    assert ops.explain("attention_jvp", *primals, 2).backend == "triton"


@pytest.mark.parametrize("backend", ["ext", "triton"])
def test_torch_compile_traces_trig_skip_out_and_its_backward(backend):
    """Under torch.compile the op is called without its autograd.Function (dynamo cannot trace a custom jvp): one
    graph, the values and gradients (x, F and t) of eager."""
    if backend == "ext":
        needs_extension()
    elif not interpreted(_tso):
        pytest.skip("needs triton with TRITON_INTERPRET=1")
    (x, F, t), _ = elementwise_case((3, 3, 5, 7), torch.float32, "cpu", True, 0, TIMES)
    leaves = [v.detach().requires_grad_() for v in (x, F, t)]
    compiled = torch.compile(trig_fn(backend), backend="aot_eager", fullgraph=True)
    out, eager = compiled(*leaves), trig_fn(backend)(*leaves)
    torch.testing.assert_close(out, eager)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, leaves, g), torch.autograd.grad(eager, leaves, g)):
        torch.testing.assert_close(a, b)


def test_trig_skip_out_is_trigflow_consistency_function():
    """cmfast.ops.trig_skip_out on every backend here equals cmfast.trigflow.consistency_function (float64 inputs
    for the reference), value and tangent."""
    primals, tangents = elementwise_case((3, 2, 5, 7), torch.float32, "cpu", False, 0, TIMES)
    ref, tref = jvp(lambda x, F, t: trigflow.consistency_function(x, F, t, SD), primals, tangents, cast=torch.float64)
    for backend in ["torch", *fused_backends("trig_skip_out", *primals)]:
        out, tout = jvp(trig_fn(backend), primals, tangents)
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(tout.double(), tref, rtol=1e-5, atol=1e-5)
