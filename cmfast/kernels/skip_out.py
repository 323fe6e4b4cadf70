"""Skip/out combination of the consistency function, fused: forward and backward.

    out = c_skip(sigma) x + c_out(sigma) F,  optionally clamped to [-1, 1]

with the boundary-condition coefficients of the paper's Appendix C (REFERENCE.md section 2), computed inside the kernel
from each sample's sigma in float32, so f(x, sigma_min) == x exactly. x and F are (B, ...) with one sigma per sample;
each program handles one block of one sample, so sigma and the coefficients are loaded and computed once per block.
Memory traffic: forward reads x and F once and writes out once; backward reads the gradient (and x and F only when
clamping, to recompute the clamp's mask) and writes dx and dF once.

Forward mode (JVP) along tx, tF and tsigma, one pass reading x, F and the tangents and writing the tangent once:
    tout = c_skip tx + c_out tF + tsigma (c_skip'(sigma) x + c_out'(sigma) F),  0 where the clamp holds out at +-1,
    c_skip' = -2 sigma_data^2 (sigma - sigma_min) / ((sigma - sigma_min)^2 + sigma_data^2)^2,
    c_out' = sigma_data (sigma_data^2 + sigma sigma_min) / (sigma^2 + sigma_data^2)^(3/2).

The registered op cmfast::skip_out (and cmfast::skip_out_backward, cmfast::skip_out_jvp) runs the C++/CUDA extension,
these kernels or PyTorch, whichever backend cmfast.ops chose, with fake implementations for torch.compile. SkipOut is
the autograd.Function over it that carries the backward and the forward-mode rule.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmfast.preconditioning import cm_c_out, cm_c_skip

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


def skip_out_ref(x: Tensor, F: Tensor, sigma: Tensor, sigma_min: float, sigma_data: float, clamp: bool = False):
    """c_skip(sigma) x + c_out(sigma) F in float32 (float64 for float64 inputs), in the dtype x and F promote to.

    x, F: (B, ...); sigma: (B,) noise levels. This is `ConsistencyModel`'s combination, then the sampler's clamp.
    """
    out_dtype = torch.promote_types(x.dtype, F.dtype)
    compute = compute_dtype(out_dtype)
    s = sigma.to(compute).reshape(-1, *[1] * (x.dim() - 1))
    out = cm_c_skip(s, sigma_min, sigma_data) * x.to(compute) + cm_c_out(s, sigma_min, sigma_data) * F.to(compute)
    return (out.clamp(-1, 1) if clamp else out).to(out_dtype)


# --- 2. kernels ------------------------------------------------------------------------------------------------------


@jit
def _cm_coefficients(sigma, sigma_min, sigma_data):
    """c_skip, c_out of the consistency function (Appendix C): 1 and 0 at sigma == sigma_min."""
    sd2 = sigma_data * sigma_data
    c_skip = sd2 / ((sigma - sigma_min) * (sigma - sigma_min) + sd2)
    c_out = sigma_data * (sigma - sigma_min) / tl.sqrt(sigma * sigma + sd2)
    return c_skip, c_out


@jit
def _skip_out_fwd_kernel(
    X,  # (B, n) input of the consistency function, any float dtype, flat per sample
    F,  # (B, n) raw network output, same layout as X
    Sigma,  # (B,) noise levels, one every sigma_stride elements
    Out,  # (B, n) output, written once
    n,  # elements per sample
    sigma_stride,
    sigma_min,
    sigma_data,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    sigma = tl.load(Sigma + b * sigma_stride).to(tl.float32)
    c_skip, c_out = _cm_coefficients(sigma, sigma_min, sigma_data)
    x = tl.load(X + base + offs, mask=mask).to(tl.float32)
    f = tl.load(F + base + offs, mask=mask).to(tl.float32)
    out = c_skip * x + c_out * f
    if CLAMP:
        out = tl.minimum(tl.maximum(out, -1.0), 1.0)
    tl.store(Out + base + offs, out.to(Out.dtype.element_ty), mask=mask)


@jit
def _skip_out_bwd_kernel(
    Grad,  # (B, n) gradient of the output
    X,  # (B, n) forward input x; read only when CLAMP
    F,  # (B, n) forward input F; read only when CLAMP
    Sigma,  # (B,) noise levels, one every sigma_stride elements
    DX,  # (B, n) gradient of x, written once
    DF,  # (B, n) gradient of F, written once
    n,
    sigma_stride,
    sigma_min,
    sigma_data,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    sigma = tl.load(Sigma + b * sigma_stride).to(tl.float32)
    c_skip, c_out = _cm_coefficients(sigma, sigma_min, sigma_data)
    g = tl.load(Grad + base + offs, mask=mask).to(tl.float32)
    if CLAMP:  # as torch.clamp(out, -1, 1): the gradient passes where -1 < out < 1 (not at the bounds)
        x = tl.load(X + base + offs, mask=mask).to(tl.float32)
        f = tl.load(F + base + offs, mask=mask).to(tl.float32)
        out = c_skip * x + c_out * f
        g = tl.where((out > -1.0) & (out < 1.0), g, 0.0)
    tl.store(DX + base + offs, (c_skip * g).to(DX.dtype.element_ty), mask=mask)
    tl.store(DF + base + offs, (c_out * g).to(DF.dtype.element_ty), mask=mask)


@jit
def _cm_coefficient_derivatives(sigma, sigma_min, sigma_data):
    """d c_skip / d sigma and d c_out / d sigma of the consistency function's coefficients (Appendix C)."""
    sd2 = sigma_data * sigma_data
    d = sigma - sigma_min
    den = d * d + sd2
    q = sigma * sigma + sd2
    return -2.0 * sd2 * d / (den * den), sigma_data * (sd2 + sigma * sigma_min) / (q * tl.sqrt(q))


@jit
def _skip_out_jvp_kernel(
    X,  # (B, n) forward input x, flat per sample
    F,  # (B, n) forward input F, same layout
    TX,  # (B, n) tangent of x; read only when HAS_TX
    TF,  # (B, n) tangent of F; read only when HAS_TF
    Sigma,  # (B,) noise levels, one every sigma_stride elements
    TSigma,  # (B,) tangents of sigma, one every tsigma_stride elements; read only when HAS_TSIGMA
    TOut,  # (B, n) tangent of the output, written once
    n,
    sigma_stride,
    tsigma_stride,
    sigma_min,
    sigma_data,
    HAS_TX: tl.constexpr,
    HAS_TF: tl.constexpr,
    HAS_TSIGMA: tl.constexpr,
    CLAMP: tl.constexpr,
    LOAD_XF: tl.constexpr,  # HAS_TSIGMA or CLAMP: x and F are read
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    sigma = tl.load(Sigma + b * sigma_stride).to(tl.float32)
    c_skip, c_out = _cm_coefficients(sigma, sigma_min, sigma_data)
    t = tl.zeros([BLOCK], tl.float32)
    if HAS_TX:
        t += c_skip * tl.load(TX + base + offs, mask=mask).to(tl.float32)
    if HAS_TF:
        t += c_out * tl.load(TF + base + offs, mask=mask).to(tl.float32)
    if LOAD_XF:
        x = tl.load(X + base + offs, mask=mask).to(tl.float32)
        f = tl.load(F + base + offs, mask=mask).to(tl.float32)
        if HAS_TSIGMA:
            dc_skip, dc_out = _cm_coefficient_derivatives(sigma, sigma_min, sigma_data)
            t += tl.load(TSigma + b * tsigma_stride).to(tl.float32) * (dc_skip * x + dc_out * f)
        if CLAMP:  # as the backward: the tangent passes where -1 < out < 1
            out = c_skip * x + c_out * f
            t = tl.where((out > -1.0) & (out < 1.0), t, 0.0)
    tl.store(TOut + base + offs, t.to(TOut.dtype.element_ty), mask=mask)


# --- 3. launchers ----------------------------------------------------------------------------------------------------


def unsupported(x: Tensor, F: Tensor, sigma: Tensor) -> list[str]:
    """Why the Triton kernels cannot take these inputs (empty when they can). Shapes are checked by cmfast.ops."""
    reasons = dtype_reasons({"x": x, "F": F})
    if x.shape[0] > GRID_LIMIT:
        reasons.append(f"batch {x.shape[0]} is above the grid limit {GRID_LIMIT}")
    if per_sample_numel(x) >= OFFSET_LIMIT:
        reasons.append(f"{per_sample_numel(x)} elements per sample overflow the kernels' 32-bit offsets")
    return reasons


def _check(reasons: list[str]) -> None:
    if reasons:
        raise ValueError("skip_out Triton kernels: " + "; ".join(reasons))


def _grid(x: Tensor):
    return (triton.cdiv(per_sample_numel(x), BLOCK), x.shape[0])


def skip_out_forward(x: Tensor, F: Tensor, sigma: Tensor, sigma_min: float, sigma_data: float, clamp: bool = False):
    """Launch the forward kernel. x, F: (B, ...) of one shape; sigma: (B,). Returns out in x's layout."""
    _check(unsupported(x, F, sigma))
    fmt = memory_format(x)
    x, F = x.contiguous(memory_format=fmt), F.contiguous(memory_format=fmt)
    out = torch.empty_like(x, dtype=torch.promote_types(x.dtype, F.dtype), memory_format=fmt)
    if out.numel():
        _skip_out_fwd_kernel[_grid(x)](
            x, F, sigma, out, per_sample_numel(x), sigma.stride(0), float(sigma_min), float(sigma_data),
            CLAMP=bool(clamp), BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out


def skip_out_backward(
    grad: Tensor,
    sigma: Tensor,
    x: Tensor,
    F: Tensor,
    sigma_min: float,
    sigma_data: float,
    clamp: bool = False,
) -> tuple[Tensor, Tensor]:
    """Launch the backward kernel: (dx, dF) in the dtypes and x's layout. x and F are read only when clamping."""
    _check(unsupported(x, F, sigma))
    fmt = memory_format(x)
    grad = grad.contiguous(memory_format=fmt)
    if clamp:
        x, F = x.contiguous(memory_format=fmt), F.contiguous(memory_format=fmt)
    dx = torch.empty_like(x, memory_format=fmt)
    dF = torch.empty_like(x, dtype=F.dtype, memory_format=fmt)
    if dx.numel():
        _skip_out_bwd_kernel[_grid(grad)](
            grad, x, F, sigma, dx, dF, per_sample_numel(grad), sigma.stride(0), float(sigma_min), float(sigma_data),
            CLAMP=bool(clamp), BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return dx, dF


def skip_out_jvp(
    x: Tensor,
    F: Tensor,
    sigma: Tensor,
    tx: Tensor | None,
    tF: Tensor | None,
    tsigma: Tensor | None,
    sigma_min: float,
    sigma_data: float,
    clamp: bool = False,
) -> Tensor:
    """Launch the forward-mode kernel: the tangent of the output (x and F's promoted dtype, x's layout) along tx, tF
    (like x and F) and tsigma (B,); a missing tangent is zero."""
    _check(unsupported(x, F, sigma))
    fmt = memory_format(x)
    x, F = x.contiguous(memory_format=fmt), F.contiguous(memory_format=fmt)
    tout = torch.empty_like(x, dtype=torch.promote_types(x.dtype, F.dtype), memory_format=fmt)
    if tout.numel():
        tx_, tF_ = (t.contiguous(memory_format=fmt) if t is not None else x for t in (tx, tF))
        ts = tsigma if tsigma is not None else sigma
        _skip_out_jvp_kernel[_grid(x)](
            x, F, tx_, tF_, sigma, ts, tout, per_sample_numel(x), sigma.stride(0), ts.stride(0), float(sigma_min),
            float(sigma_data), HAS_TX=tx is not None, HAS_TF=tF is not None, HAS_TSIGMA=tsigma is not None,
            CLAMP=bool(clamp), LOAD_XF=tsigma is not None or bool(clamp), BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return tout


# --- 4. registered op ------------------------------------------------------------------------------------------------


@torch.library.custom_op("cmfast::skip_out", mutates_args=())
def _skip_out_op(
    x: Tensor, F: Tensor, sigma: Tensor, sigma_min: float, sigma_data: float, clamp: bool, backend: str
) -> Tensor:
    """The forward; backend: "ext" (the C++/CUDA extension's cmfast_ext::skip_out), "triton" or "torch"."""
    if backend == "ext":
        return torch.ops.cmfast_ext.skip_out(x, F, sigma, sigma_min, sigma_data, clamp)
    if backend == "triton":
        return skip_out_forward(x, F, sigma, sigma_min, sigma_data, clamp)
    return skip_out_ref(x, F, sigma, sigma_min, sigma_data, clamp).contiguous(memory_format=memory_format(x))


@_skip_out_op.register_fake
def _(x, F, sigma, sigma_min, sigma_data, clamp, backend):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, F.dtype), memory_format=memory_format(x))


def skip_out_backward_torch(
    grad: Tensor, sigma: Tensor, x: Tensor, F: Tensor, sigma_min: float, sigma_data: float, clamp: bool = False
) -> tuple[Tensor, Tensor]:
    """The kernels' backward in PyTorch, in float32 (float64 for float64): (dx, dF) = (c_skip grad, c_out grad),
    masked as torch.clamp's backward when clamping, in the dtypes of x and F and x's memory format."""
    compute = compute_dtype(grad.dtype)
    s = sigma.to(compute).reshape(-1, *[1] * (x.dim() - 1))
    g = grad.to(compute)
    if clamp:
        out = cm_c_skip(s, sigma_min, sigma_data) * x.to(compute) + cm_c_out(s, sigma_min, sigma_data) * F.to(compute)
        g = g * ((out > -1) & (out < 1))  # as torch.clamp's backward
    fmt = memory_format(x)
    dx = (cm_c_skip(s, sigma_min, sigma_data) * g).to(x.dtype).contiguous(memory_format=fmt)
    return dx, (cm_c_out(s, sigma_min, sigma_data) * g).to(F.dtype).contiguous(memory_format=fmt)


@torch.library.custom_op("cmfast::skip_out_backward", mutates_args=())
def _skip_out_backward_op(
    grad: Tensor,
    sigma: Tensor,
    x: Tensor,
    F: Tensor,
    sigma_min: float,
    sigma_data: float,
    clamp: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    """(dx, dF) in the dtypes of x and F and x's memory format; x and F are only read when clamping. The extension
    has no backward: its forward's gradient comes from the PyTorch one."""
    if backend == "triton":
        return skip_out_backward(grad, sigma, x, F, sigma_min, sigma_data, clamp)
    return skip_out_backward_torch(grad, sigma, x, F, sigma_min, sigma_data, clamp)


@_skip_out_backward_op.register_fake
def _(grad, sigma, x, F, sigma_min, sigma_data, clamp, backend):
    fmt = memory_format(x)
    return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, dtype=F.dtype, memory_format=fmt)


def _setup_context(ctx, inputs, output):
    x, F, sigma, sigma_min, sigma_data, clamp, backend = inputs
    ctx.save_for_backward(x, F, sigma)
    ctx.args = (sigma_min, sigma_data, clamp, backend)


def _backward(ctx, grad):
    x, F, sigma = ctx.saved_tensors
    dx, dF = torch.ops.cmfast.skip_out_backward(grad, sigma, x, F, *ctx.args)
    return dx, dF, None, None, None, None, None


_skip_out_op.register_autograd(_backward, setup_context=_setup_context)


def cm_c_skip_derivative(sigma: Tensor, sigma_min: float, sigma_data: float) -> Tensor:
    """d c_skip / d sigma of Appendix C's c_skip: -2 sigma_data^2 (sigma - eps) / ((sigma - eps)^2 + sigma_data^2)^2."""
    d = sigma - sigma_min
    return -2 * sigma_data**2 * d / (d**2 + sigma_data**2) ** 2


def cm_c_out_derivative(sigma: Tensor, sigma_min: float, sigma_data: float) -> Tensor:
    """d c_out / d sigma of Appendix C's c_out: sigma_data (sigma_data^2 + sigma eps) / (sigma^2 + sigma_data^2)^1.5."""
    return sigma_data * (sigma_data**2 + sigma * sigma_min) / (sigma**2 + sigma_data**2) ** 1.5


def skip_out_jvp_torch(x, F, sigma, tx, tF, tsigma, sigma_min, sigma_data, clamp=False):
    """The forward-mode rule in PyTorch (float32, float64 for float64), a missing tangent zero: the registered JVP's
    torch implementation and the kernels' specification."""
    out_dtype = torch.promote_types(x.dtype, F.dtype)
    compute = compute_dtype(out_dtype)
    s = sigma.to(compute).reshape(-1, *[1] * (x.dim() - 1))
    xc, Fc = x.to(compute), F.to(compute)
    tout = torch.zeros_like(xc)
    if tx is not None:
        tout = tout + cm_c_skip(s, sigma_min, sigma_data) * tx.to(compute)
    if tF is not None:
        tout = tout + cm_c_out(s, sigma_min, sigma_data) * tF.to(compute)
    if tsigma is not None:
        dc_skip, dc_out = cm_c_skip_derivative(s, sigma_min, sigma_data), cm_c_out_derivative(s, sigma_min, sigma_data)
        tout = tout + tsigma.to(compute).reshape(s.shape) * (dc_skip * xc + dc_out * Fc)
    if clamp:
        out = cm_c_skip(s, sigma_min, sigma_data) * xc + cm_c_out(s, sigma_min, sigma_data) * Fc
        tout = tout * ((out > -1) & (out < 1))  # as the backward
    return tout.to(out_dtype).contiguous(memory_format=memory_format(x))


@torch.library.custom_op("cmfast::skip_out_jvp", mutates_args=())
def _skip_out_jvp_op(
    x: Tensor,
    F: Tensor,
    sigma: Tensor,
    tx: Tensor | None,
    tF: Tensor | None,
    tsigma: Tensor | None,
    sigma_min: float,
    sigma_data: float,
    clamp: bool,
    backend: str,
) -> Tensor:
    """The tangent of the output along tx, tF and tsigma (None: zero); backend: "ext"
    (cmfast_ext::skip_out_jvp), "triton" or "torch"."""
    if backend == "ext":
        return torch.ops.cmfast_ext.skip_out_jvp(x, F, sigma, tx, tF, tsigma, sigma_min, sigma_data, clamp)
    if backend == "triton":
        return skip_out_jvp(x, F, sigma, tx, tF, tsigma, sigma_min, sigma_data, clamp)
    return skip_out_jvp_torch(x, F, sigma, tx, tF, tsigma, sigma_min, sigma_data, clamp)


@_skip_out_jvp_op.register_fake
def _(x, F, sigma, tx, tF, tsigma, sigma_min, sigma_data, clamp, backend):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, F.dtype), memory_format=memory_format(x))


class SkipOut(torch.autograd.Function):
    """cmfast::skip_out with its backward (x and F) and its forward-mode rule (x, F and sigma): apply(x, F, sigma,
    sigma_min, sigma_data, clamp, backend, jvp_backend). backend runs the forward and the backward, jvp_backend the
    tangent (cmfast.ops chooses both; an exception there is raised when a JVP is taken)."""

    @staticmethod
    def forward(x, F, sigma, sigma_min, sigma_data, clamp, backend, jvp_backend):
        return torch.ops.cmfast.skip_out(x, F, sigma, sigma_min, sigma_data, clamp, backend)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, F, sigma, sigma_min, sigma_data, clamp, backend, jvp_backend = inputs
        ctx.save_for_backward(x, F, sigma)
        ctx.save_for_forward(x, F, sigma)
        ctx.args, ctx.jvp_backend = (sigma_min, sigma_data, clamp, backend), jvp_backend

    @staticmethod
    def backward(ctx, grad):
        return (*_backward(ctx, grad), None)

    @staticmethod
    def jvp(ctx, tx, tF, tsigma, *_):
        if isinstance(ctx.jvp_backend, Exception):  # the backend asked for has no forward-mode kernel here
            raise ctx.jvp_backend
        x, F, sigma = ctx.saved_tensors
        sigma_min, sigma_data, clamp, _ = ctx.args
        return torch.ops.cmfast.skip_out_jvp(x, F, sigma, tx, tF, tsigma, sigma_min, sigma_data, clamp, ctx.jvp_backend)


def _ext_fake(x, F, sigma, sigma_min, sigma_data, clamp):
    return torch.empty_like(x, memory_format=memory_format(x))


def register_ext_fakes() -> None:
    """Register the fake implementation of the extension's cmfast_ext::skip_out (schema in csrc/ops.cpp), so
    torch.compile traces it; cmfast.ops calls this once, after loading the extension."""
    torch.library.register_fake("cmfast_ext::skip_out", _ext_fake)
    if ext_has_kernel("skip_out_jvp", "cpu"):  # a cmfast._C built before the JVP has none
        torch.library.register_fake("cmfast_ext::skip_out_jvp", _ext_jvp_fake)


def _ext_jvp_fake(x, F, sigma, tx, tF, tsigma, sigma_min, sigma_data, clamp):
    return torch.empty_like(x, memory_format=memory_format(x))
