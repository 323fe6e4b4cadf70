"""Skip/out combination of the consistency function, fused: forward and backward (issue 6, item 3).

    out = c_skip(sigma) x + c_out(sigma) F,  optionally clamped to [-1, 1]

with the boundary-condition coefficients of the paper's Appendix C (REFERENCE.md section 2), computed inside the kernel
from each sample's sigma in float32, so f(x, sigma_min) == x exactly. x and F are (B, ...) with one sigma per sample;
each program handles one block of one sample, so sigma and the coefficients are loaded and computed once per block.
Memory traffic: forward reads x and F once and writes out once; backward reads the gradient (and x and F only when
clamping, to recompute the clamp's mask) and writes dx and dF once.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmfast.preconditioning import cm_c_out, cm_c_skip

try:
    import triton
    import triton.language as tl
except ImportError:  # the reference below still works; cmfast.ops reports why the Triton backend was skipped
    triton = tl = None

_jit = triton.jit if triton is not None else (lambda fn: fn)

BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8 elements
NUM_WARPS = 4
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# --- 1. PyTorch reference -------------------------------------------------------------------------------------------


def skip_out_ref(x: Tensor, F: Tensor, sigma: Tensor, sigma_min: float, sigma_data: float, clamp: bool = False):
    """c_skip(sigma) x + c_out(sigma) F in float32 (float64 for float64 inputs), in the dtype x and F promote to.

    x, F: (B, ...); sigma: (B,) noise levels. This is `ConsistencyModel`'s combination, then the sampler's clamp.
    """
    out_dtype = torch.promote_types(x.dtype, F.dtype)
    compute = torch.float64 if out_dtype == torch.float64 else torch.float32
    s = sigma.to(compute).reshape(-1, *[1] * (x.dim() - 1))
    out = cm_c_skip(s, sigma_min, sigma_data) * x.to(compute) + cm_c_out(s, sigma_min, sigma_data) * F.to(compute)
    return (out.clamp(-1, 1) if clamp else out).to(out_dtype)


# --- 2. kernels ------------------------------------------------------------------------------------------------------


@_jit
def _cm_coefficients(sigma, sigma_min, sigma_data):
    """c_skip, c_out of the consistency function (Appendix C): 1 and 0 at sigma == sigma_min."""
    sd2 = sigma_data * sigma_data
    c_skip = sd2 / ((sigma - sigma_min) * (sigma - sigma_min) + sd2)
    c_out = sigma_data * (sigma - sigma_min) / tl.sqrt(sigma * sigma + sd2)
    return c_skip, c_out


@_jit
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


@_jit
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


# --- 3. launchers ----------------------------------------------------------------------------------------------------


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for 4-D tensors stored that way, else contiguous: the two layouts every fused op addresses
    (its inputs are made contiguous in that format, and its outputs are allocated in it)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def per_sample_numel(x: Tensor) -> int:
    """Elements per sample of a (B, ...) tensor; in either layout, sample b is the b-th run of this many."""
    return x.numel() // x.shape[0] if x.shape[0] else 0


def unsupported(x: Tensor, F: Tensor, sigma: Tensor) -> list[str]:
    """Why the Triton kernels cannot take these inputs (empty when they can). Shapes are checked by cmfast.ops."""
    reasons = [f"{name} is {t.dtype}; the kernels take float32, bfloat16 or float16"
               for name, t in (("x", x), ("F", F)) if t.dtype not in _DTYPES]  # fmt: skip
    if x.shape[0] > 65535:
        reasons.append(f"batch {x.shape[0]} is above the grid limit 65535")
    if per_sample_numel(x) >= 2**31:
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
