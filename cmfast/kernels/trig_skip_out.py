"""TrigFlow's consistency-function combination, fused: forward, backward and forward mode (JVP).

    f = c_skip(t) x + c_out(t) F = cos(t) x - sin(t) sigma_data F

(sCM, Lu & Song 2025, arXiv 2410.11081: f_theta(x_t, t) = cos(t) x_t - sin(t) sigma_d F_theta(x_t / sigma_d, t), t in
[0, pi/2] the TrigFlow time), with one t per sample. Forward mode along tx, tF and tt:

    tf = cos(t) tx - sin(t) sigma_data tF - tt (sin(t) x + cos(t) sigma_data F)

The kernel computes f, its tangent, or both in one pass: x and F (and the tangents) read once, each output written
once, one program per block of one sample (its t and coefficients loaded and computed once). The backward is
elementwise PyTorch (dx = cos(t) g, dF = -sin(t) sigma_data g, dt = -sum g (sin(t) x + cos(t) sigma_data F)), which
torch.compile fuses.

The registered ops cmfast::trig_skip_out and cmfast::trig_skip_out_jvp run the C++/CUDA extension, these kernels or
PyTorch, whichever backend cmfast.ops chose, with fake implementations for torch.compile. TrigSkipOut is the
autograd.Function over them that carries the backward and the forward-mode rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._common import (
    GRID_LIMIT,
    OFFSET_LIMIT,
    compute_dtype,
    dtype_reasons,
    ext_has_kernel,
    jit,
    memory_format,
    per_sample_numel,
    tl,
    triton,
)

BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8 elements
NUM_WARPS = 4

# --- 1. PyTorch reference -------------------------------------------------------------------------------------------


def trig_c_skip(t: Tensor) -> Tensor:
    """TrigFlow's skip scaling cos(t) (sCM, the consistency function's parameterization); 1 at t = 0."""
    return torch.cos(t)


def trig_c_out(t: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow's output scaling -sin(t) sigma_data; 0 at t = 0."""
    return -torch.sin(t) * sigma_data


def trig_skip_out_ref(x: Tensor, F: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """cos(t) x - sin(t) sigma_data F in float32 (float64 for float64 inputs), in the dtype x and F promote to.
    x, F: (B, ...); t: (B,) TrigFlow times."""
    out_dtype = torch.promote_types(x.dtype, F.dtype)
    compute = compute_dtype(out_dtype)
    t = t.to(compute).reshape(-1, *[1] * (x.dim() - 1))
    return (trig_c_skip(t) * x.to(compute) + trig_c_out(t, sigma_data) * F.to(compute)).to(out_dtype)


# --- 2. kernels ------------------------------------------------------------------------------------------------------


@jit
def _trig_skip_out_kernel(
    X,  # (B, n) input x, flat per sample
    F,  # (B, n) network output, same layout
    T,  # (B,) TrigFlow times, one every t_stride elements
    TX,  # (B, n) tangent of x; read only when HAS_TX
    TF,  # (B, n) tangent of F; read only when HAS_TF
    TT,  # (B,) tangents of t, one every tt_stride elements; read only when HAS_TT
    Out,  # (B, n) f, written once when WRITE_OUT
    TOut,  # (B, n) tangent of f, written once when TANGENT
    n,
    t_stride,
    tt_stride,
    sigma_data,
    WRITE_OUT: tl.constexpr,
    TANGENT: tl.constexpr,
    HAS_TX: tl.constexpr,
    HAS_TF: tl.constexpr,
    HAS_TT: tl.constexpr,
    LOAD_XF: tl.constexpr,  # WRITE_OUT or HAS_TT: x and F are read
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    t = tl.load(T + b * t_stride).to(tl.float32)
    cos_t, sin_t = tl.cos(t), tl.sin(t)
    if LOAD_XF:
        x = tl.load(X + base + offs, mask=mask).to(tl.float32)
        f = tl.load(F + base + offs, mask=mask).to(tl.float32)
    if WRITE_OUT:
        tl.store(Out + base + offs, (cos_t * x - sin_t * sigma_data * f).to(Out.dtype.element_ty), mask=mask)
    if TANGENT:
        d = tl.zeros([BLOCK], tl.float32)
        if HAS_TX:
            d += cos_t * tl.load(TX + base + offs, mask=mask).to(tl.float32)
        if HAS_TF:
            d -= sin_t * sigma_data * tl.load(TF + base + offs, mask=mask).to(tl.float32)
        if HAS_TT:
            d -= tl.load(TT + b * tt_stride).to(tl.float32) * (sin_t * x + cos_t * sigma_data * f)
        tl.store(TOut + base + offs, d.to(TOut.dtype.element_ty), mask=mask)


# --- 3. launchers ----------------------------------------------------------------------------------------------------


def unsupported(x: Tensor, F: Tensor, t: Tensor) -> list[str]:
    """Why the Triton kernel cannot take these inputs (empty when it can). Shapes are checked by cmfast.ops."""
    reasons = dtype_reasons({"x": x, "F": F})
    if x.shape[0] > GRID_LIMIT:
        reasons.append(f"batch {x.shape[0]} is above the grid limit {GRID_LIMIT}")
    if per_sample_numel(x) >= OFFSET_LIMIT:
        reasons.append(f"{per_sample_numel(x)} elements per sample overflow the kernel's 32-bit offsets")
    return reasons


def trig_skip_out_forward(
    x: Tensor,
    F: Tensor,
    t: Tensor,
    sigma_data: float,
    tx: Tensor | None = None,
    tF: Tensor | None = None,
    tt: Tensor | None = None,
    primal: bool = True,
    tangent: bool = False,
) -> tuple[Tensor | None, Tensor | None]:
    """Launch the kernel: (f, tf), f when `primal` and tf (along tx, tF like x and F, tt (B,); a missing tangent is
    zero) when `tangent`, else None in its place; both in x and F's promoted dtype and x's layout, from one pass."""
    reasons = unsupported(x, F, t)
    if reasons:
        raise ValueError("trig_skip_out Triton kernel: " + "; ".join(reasons))
    fmt = memory_format(x)
    x, F = x.contiguous(memory_format=fmt), F.contiguous(memory_format=fmt)
    dtype = torch.promote_types(x.dtype, F.dtype)
    out = torch.empty_like(x, dtype=dtype, memory_format=fmt) if primal else None
    tout = torch.empty_like(x, dtype=dtype, memory_format=fmt) if tangent else None
    if x.numel():
        tx_, tF_ = (v.contiguous(memory_format=fmt) if v is not None else x for v in (tx, tF))
        tt_ = tt if tt is not None else t
        _trig_skip_out_kernel[(triton.cdiv(per_sample_numel(x), BLOCK), x.shape[0])](
            x, F, t, tx_, tF_, tt_, out if primal else x, tout if tangent else x, per_sample_numel(x), t.stride(0),
            tt_.stride(0), float(sigma_data), WRITE_OUT=primal, TANGENT=tangent, HAS_TX=tx is not None,
            HAS_TF=tF is not None, HAS_TT=tt is not None, LOAD_XF=primal or tt is not None, BLOCK=BLOCK,
            num_warps=NUM_WARPS,
        )  # fmt: skip
    return out, tout


# --- 4. registered ops -----------------------------------------------------------------------------------------------


def trig_skip_out_jvp_torch(x, F, t, tx, tF, tt, sigma_data):
    """(f, tf) in PyTorch (float32, float64 for float64), a missing tangent zero: the registered JVP's torch
    implementation and the kernel's specification."""
    out_dtype = torch.promote_types(x.dtype, F.dtype)
    compute = compute_dtype(out_dtype)
    tb = t.to(compute).reshape(-1, *[1] * (x.dim() - 1))
    xc, Fc = x.to(compute), F.to(compute)
    tout = torch.zeros_like(xc)
    if tx is not None:
        tout = tout + trig_c_skip(tb) * tx.to(compute)
    if tF is not None:
        tout = tout + trig_c_out(tb, sigma_data) * tF.to(compute)
    if tt is not None:  # d c_skip / dt = -sin(t), d c_out / dt = -cos(t) sigma_data
        tout = tout - tt.to(compute).reshape(tb.shape) * (torch.sin(tb) * xc + torch.cos(tb) * sigma_data * Fc)
    fmt = memory_format(x)
    out = trig_c_skip(tb) * xc + trig_c_out(tb, sigma_data) * Fc
    return out.to(out_dtype).contiguous(memory_format=fmt), tout.to(out_dtype).contiguous(memory_format=fmt)


@torch.library.custom_op("cmfast::trig_skip_out", mutates_args=())
def _trig_skip_out_op(x: Tensor, F: Tensor, t: Tensor, sigma_data: float, backend: str) -> Tensor:
    """The forward; backend: "ext" (cmfast_ext::trig_skip_out), "triton" or "torch"."""
    if backend == "ext":
        return torch.ops.cmfast_ext.trig_skip_out(x, F, t, sigma_data)
    if backend == "triton":
        return trig_skip_out_forward(x, F, t, sigma_data)[0]
    return trig_skip_out_ref(x, F, t, sigma_data).contiguous(memory_format=memory_format(x))


@_trig_skip_out_op.register_fake
def _(x, F, t, sigma_data, backend):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, F.dtype), memory_format=memory_format(x))


@torch.library.custom_op("cmfast::trig_skip_out_jvp", mutates_args=())
def _trig_skip_out_jvp_op(
    x: Tensor,
    F: Tensor,
    t: Tensor,
    tx: Tensor | None,
    tF: Tensor | None,
    tt: Tensor | None,
    sigma_data: float,
    primal: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(f, tf) from one pass, f an empty tensor unless `primal`; tangents tx, tF, tt (None: zero). backend: "ext"
    (cmfast_ext::trig_skip_out_jvp), "triton" or "torch"."""
    if backend == "ext":
        return torch.ops.cmfast_ext.trig_skip_out_jvp(x, F, t, tx, tF, tt, sigma_data, primal)
    if backend == "triton":
        out, tout = trig_skip_out_forward(x, F, t, sigma_data, tx, tF, tt, primal=primal, tangent=True)
    else:
        out, tout = trig_skip_out_jvp_torch(x, F, t, tx, tF, tt, sigma_data)
    return (out if primal else x.new_empty(0)), tout


@_trig_skip_out_jvp_op.register_fake
def _(x, F, t, tx, tF, tt, sigma_data, primal, backend):
    tout = torch.empty_like(x, dtype=torch.promote_types(x.dtype, F.dtype), memory_format=memory_format(x))
    return (torch.empty_like(tout) if primal else x.new_empty(0)), tout


def trig_skip_out_backward(grad: Tensor, x: Tensor, F: Tensor, t: Tensor, sigma_data: float, needs: tuple):
    """(dx, dF, dt) in the dtypes of x, F and t, each None where `needs` (three bools) says it is not wanted:
    dx = cos(t) g, dF = -sin(t) sigma_data g, dt = -sum over each sample of g (sin(t) x + cos(t) sigma_data F)."""
    compute = compute_dtype(grad.dtype)
    tb = t.to(compute).reshape(-1, *[1] * (x.dim() - 1))
    g = grad.to(compute)
    fmt = memory_format(x)
    dx = (trig_c_skip(tb) * g).to(x.dtype).contiguous(memory_format=fmt) if needs[0] else None
    dF = (trig_c_out(tb, sigma_data) * g).to(F.dtype).contiguous(memory_format=fmt) if needs[1] else None
    dt = None
    if needs[2]:
        d_dt = -(torch.sin(tb) * x.to(compute) + torch.cos(tb) * sigma_data * F.to(compute))
        dt = (g * d_dt).reshape(x.shape[0], -1).sum(1).to(t.dtype)
    return dx, dF, dt


def _setup_context(ctx, inputs, output):
    x, F, t, sigma_data = inputs[:4]
    ctx.save_for_backward(x, F, t)
    ctx.sigma_data = sigma_data


def _backward(ctx, grad):
    x, F, t = ctx.saved_tensors
    return (*trig_skip_out_backward(grad, x, F, t, ctx.sigma_data, ctx.needs_input_grad[:3]), None, None)


_trig_skip_out_op.register_autograd(_backward, setup_context=_setup_context)


class TrigSkipOut(torch.autograd.Function):
    """cmfast::trig_skip_out with its backward and forward-mode rule (x, F and t): apply(x, F, t, sigma_data,
    backend, jvp_backend). backend runs the forward, jvp_backend the tangent (cmfast.ops chooses both; an exception
    there is raised when a JVP is taken)."""

    @staticmethod
    def forward(x, F, t, sigma_data, backend, jvp_backend):
        return torch.ops.cmfast.trig_skip_out(x, F, t, sigma_data, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, F, t, sigma_data, _, jvp_backend = inputs
        ctx.save_for_backward(x, F, t)
        ctx.save_for_forward(x, F, t)
        ctx.sigma_data, ctx.jvp_backend = sigma_data, jvp_backend

    @staticmethod
    def backward(ctx, grad):
        return (*_backward(ctx, grad), None)

    @staticmethod
    def jvp(ctx, tx, tF, tt, *_):
        if isinstance(ctx.jvp_backend, Exception):  # the backend asked for has no forward-mode kernel here
            raise ctx.jvp_backend
        x, F, t = ctx.saved_tensors
        return torch.ops.cmfast.trig_skip_out_jvp(x, F, t, tx, tF, tt, ctx.sigma_data, False, ctx.jvp_backend)[1]


def _ext_fake(x, F, t, sigma_data):
    return torch.empty_like(x, memory_format=memory_format(x))


def _ext_jvp_fake(x, F, t, tx, tF, tt, sigma_data, primal):
    tout = torch.empty_like(x, memory_format=memory_format(x))
    return (torch.empty_like(tout) if primal else x.new_empty(0)), tout


def register_ext_fakes() -> None:
    """Register the fake implementations of the extension's cmfast_ext::trig_skip_out and its JVP (schemas in
    csrc/ops.cpp), so torch.compile traces them; cmfast.ops calls this once, after loading the extension (a cmfast._C
    built without them has neither)."""
    if ext_has_kernel("trig_skip_out", "cpu"):
        torch.library.register_fake("cmfast_ext::trig_skip_out", _ext_fake)
        torch.library.register_fake("cmfast_ext::trig_skip_out_jvp", _ext_jvp_fake)
