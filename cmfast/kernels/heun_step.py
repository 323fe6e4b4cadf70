"""The teacher's Heun step for consistency distillation, fused into two passes.

The teacher is an EDM denoiser D(x, t) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t)) (REFERENCE.md section 2), and
its Heun step from t to s (section 4) evaluates the network F twice, so it takes two kernel launches around the
second evaluation:

    pass 1 (F_next=None):  D = c_skip(t) x + c_out(t) F;  d = (x - D) / t;  x_e = x + (s - t) d     -> x_e
    pass 2 (F_next given): recompute d and x_e from x and F, then
                           D' = c_skip(s) x_e + c_out(s) F_next;  d' = (x_e - D') / s;
                           x_hat = x + (s - t) (d + d') / 2                                         -> x_hat

with F = F(c_in(t) x, c_noise(t)) and F_next = F(c_in(s) x_e, c_noise(s)) the network's raw outputs and t, s per
sample. Pass 2 recomputes d and x_e in float32 rather than reading them back: one read of F instead of two tensors,
so the step costs 2 reads + 1 write, then 3 reads + 1 write. Everything is computed in float32 and rounded once into
x's dtype. Pass 1 alone is the Euler step. clamp=True clips each D to [-1, 1], as the official teacher sampler does.
Teachers run without gradients, so there is no backward.

The registered op cmfast::heun_step runs the C++/CUDA extension, this kernel or PyTorch, whichever backend cmfast.ops
chose, with fake implementations for torch.compile.
"""

from __future__ import annotations

import torch
from torch import Tensor

from cmfast.preconditioning import edm_c_out, edm_c_skip

from ._common import (
    GRID_LIMIT,
    OFFSET_LIMIT,
    compute_dtype,
    dtype_reasons,
    jit,
    memory_format,
    per_sample_numel,
    tl,
    triton,
)

BLOCK = 1024  # elements per program: 4 warps x 32 threads x 8 elements
NUM_WARPS = 4

# --- 1. PyTorch reference -------------------------------------------------------------------------------------------


def heun_step_ref(
    x: Tensor,
    F: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    F_next: Tensor | None = None,
    sigma_data: float = 0.5,
    clamp: bool = False,
) -> Tensor:
    """Pass 1 (F_next None: the Euler point x_e) or pass 2 (the Heun estimate x_hat), in float32 (float64 for
    float64 x), returned in x's dtype. x, F, F_next: (B, ...); sigma, sigma_next: (B,) with sigma_next < sigma."""
    out_dtype = x.dtype
    compute = compute_dtype(out_dtype)
    shape = (-1, *[1] * (x.dim() - 1))
    t, s = sigma.to(compute).reshape(shape), sigma_next.to(compute).reshape(shape)
    x = x.to(compute)

    def denoised(x_t, F_t, t):
        D = edm_c_skip(t, sigma_data) * x_t + edm_c_out(t, sigma_data) * F_t.to(compute)
        return D.clamp(-1, 1) if clamp else D

    d = (x - denoised(x, F, t)) / t
    x_e = x + (s - t) * d
    if F_next is None:
        return x_e.to(out_dtype)
    d_next = (x_e - denoised(x_e, F_next, s)) / s
    return (x + (s - t) * (d + d_next) / 2).to(out_dtype)


# --- 2. kernel -------------------------------------------------------------------------------------------------------


@jit
def _denoised(x, f, sigma, sigma_data, CLAMP: tl.constexpr):
    """EDM's D = c_skip(sigma) x + c_out(sigma) F, optionally clipped to [-1, 1]."""
    sd2 = sigma_data * sigma_data
    c_skip = sd2 / (sigma * sigma + sd2)
    c_out = sigma * sigma_data / tl.sqrt(sigma * sigma + sd2)
    D = c_skip * x + c_out * f
    if CLAMP:
        D = tl.minimum(tl.maximum(D, -1.0), 1.0)
    return D


@jit
def _heun_step_kernel(
    X,  # (B, n) the point at sigma, flat per sample
    F,  # (B, n) the network's raw output at (x, sigma), same layout
    FNext,  # (B, n) the network's raw output at (x_e, sigma_next); read only when HEUN
    Sigma,  # (B,) t, one every sigma_stride elements
    SigmaNext,  # (B,) s, one every sigma_next_stride elements
    Out,  # (B, n) x_e (pass 1) or x_hat (pass 2), written once
    n,  # elements per sample
    sigma_stride,
    sigma_next_stride,
    sigma_data,
    HEUN: tl.constexpr,
    CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    b = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = b.to(tl.int64) * n
    t = tl.load(Sigma + b * sigma_stride).to(tl.float32)
    s = tl.load(SigmaNext + b * sigma_next_stride).to(tl.float32)
    x = tl.load(X + base + offs, mask=mask).to(tl.float32)
    f = tl.load(F + base + offs, mask=mask).to(tl.float32)
    d = (x - _denoised(x, f, t, sigma_data, CLAMP)) / t
    x_next = x + (s - t) * d
    if HEUN:
        f_next = tl.load(FNext + base + offs, mask=mask).to(tl.float32)
        d_next = (x_next - _denoised(x_next, f_next, s, sigma_data, CLAMP)) / s
        x_next = x + (s - t) * (d + d_next) * 0.5
    tl.store(Out + base + offs, x_next.to(Out.dtype.element_ty), mask=mask)


# --- 3. launcher -----------------------------------------------------------------------------------------------------


def unsupported(x: Tensor, F: Tensor, F_next: Tensor | None) -> list[str]:
    """Why the Triton kernel cannot take these inputs (empty when it can). Shapes are checked by cmfast.ops."""
    reasons = dtype_reasons({"x": x, "F": F, "F_next": F_next}, takes="the kernel takes")
    if x.shape[0] > GRID_LIMIT:
        reasons.append(f"batch {x.shape[0]} is above the grid limit {GRID_LIMIT}")
    if per_sample_numel(x) >= OFFSET_LIMIT:
        reasons.append(f"{per_sample_numel(x)} elements per sample overflow the kernel's 32-bit offsets")
    return reasons


def heun_step_forward(
    x: Tensor,
    F: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    F_next: Tensor | None = None,
    sigma_data: float = 0.5,
    clamp: bool = False,
) -> Tensor:
    """Launch pass 1 (F_next None) or pass 2. x, F, F_next: (B, ...) of one shape; sigma, sigma_next: (B,).
    Returns a tensor of x's dtype and layout."""
    reasons = unsupported(x, F, F_next)
    if reasons:
        raise ValueError("heun_step Triton kernel: " + "; ".join(reasons))
    heun, fmt = F_next is not None, memory_format(x)
    x, F = x.contiguous(memory_format=fmt), F.contiguous(memory_format=fmt)
    F_next = F_next.contiguous(memory_format=fmt) if heun else F
    out = torch.empty_like(x, memory_format=fmt)
    if out.numel():
        grid = (triton.cdiv(per_sample_numel(x), BLOCK), x.shape[0])
        _heun_step_kernel[grid](
            x, F, F_next, sigma, sigma_next, out, per_sample_numel(x), sigma.stride(0), sigma_next.stride(0),
            float(sigma_data), HEUN=heun, CLAMP=bool(clamp), BLOCK=BLOCK, num_warps=NUM_WARPS,
        )  # fmt: skip
    return out


# --- 4. registered op ------------------------------------------------------------------------------------------------


@torch.library.custom_op("cmfast::heun_step", mutates_args=())
def _heun_step_op(
    x: Tensor,
    F: Tensor,
    sigma: Tensor,
    sigma_next: Tensor,
    F_next: Tensor | None,
    sigma_data: float,
    clamp: bool,
    backend: str,
) -> Tensor:
    """Pass 1 or 2; backend: "ext" (the C++/CUDA extension's cmfast_ext::heun_step), "triton" or "torch"."""
    if backend == "ext":
        return torch.ops.cmfast_ext.heun_step(x, F, sigma, sigma_next, F_next, sigma_data, clamp)
    if backend == "triton":
        return heun_step_forward(x, F, sigma, sigma_next, F_next, sigma_data, clamp)
    out = heun_step_ref(x, F, sigma, sigma_next, F_next, sigma_data, clamp)
    return out.contiguous(memory_format=memory_format(x))


@_heun_step_op.register_fake
def _(x, F, sigma, sigma_next, F_next, sigma_data, clamp, backend):
    return torch.empty_like(x, memory_format=memory_format(x))


def _ext_fake(x, F, sigma, sigma_next, F_next, sigma_data, clamp):
    return torch.empty_like(x, memory_format=memory_format(x))


def register_ext_fakes() -> None:
    """Register the fake implementation of the extension's cmfast_ext::heun_step (schema in csrc/ops.cpp), so
    torch.compile traces it; cmfast.ops calls this once, after loading the extension."""
    torch.library.register_fake("cmfast_ext::heun_step", _ext_fake)
