"""Fused ops and their dispatch (issue 6): GroupNorm+SiLU, attention, the skip/out combination and the Heun step.

Every public op takes backend=None|"torch"|"triton"|"cuda". With None, the first backend that can take the inputs runs,
in the order cuda (the C++/CUDA extension cmfast._C: CPU kernels for every op but attention, and a CUDA kernel for
GroupNorm+SiLU on channels_last tensors), triton, torch; the environment variable CMFAST_BACKEND sets
the backend for every call that passes None ("auto" or empty keeps the automatic choice). Each skipped backend has a
reason (`explain` returns them), and a backend that was asked for and cannot take the inputs raises BackendError with
its reasons. Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is first imported
(Triton picks the interpreter when it decorates a function, its own library's included).

The torch backend is the plain reference (`cmfast.kernels.<op>.<op>_ref`, the networks' and samplers' own math, e.g.
ADM's GroupNorm32), differentiated by autograd and fused by torch.compile. The fused backends run through custom ops
registered with torch.library (cmfast::group_norm_silu, cmfast::skip_out, cmfast::heun_step, and the backwards), with
fake implementations, so torch.compile traces models that use them; their "cuda" branch calls the extension's own ops
(torch.ops.cmfast_ext.*, whose fake implementations are registered here when the extension loads), and where the
extension has no backward the PyTorch one below runs on the statistics its forward saved. The backend is an argument
of those ops; their "torch" implementation (the reference's math, with an explicit backward) lets
`torch.library.opcheck` check the registration on any machine.
"""

from __future__ import annotations

import importlib.util
import math
import os
from typing import NamedTuple

import torch
from torch import Tensor

from .kernels import attention as _attn
from .kernels import group_norm_silu as _gn
from .kernels import heun_step as _heun
from .kernels import skip_out as _so

BACKENDS = ("cuda", "triton", "torch")
_EXT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_EXT_THREADS = 256  # threads per block of the CUDA GroupNorm kernel: a tile may hold 256 vectors of channels


class BackendError(RuntimeError):
    """A backend was asked for (argument or CMFAST_BACKEND) and cannot take these inputs; the message says why."""


class Choice(NamedTuple):
    """The backend an op call runs on, and why each backend before it was skipped (backend -> reasons)."""

    backend: str
    skipped: dict[str, str]


# --- dispatch --------------------------------------------------------------------------------------------------------


def _environment_reasons(backend: str, op: str, device_type: str) -> str:
    """Why `backend` cannot run `op` on this machine for tensors on `device_type` ("" if it can)."""
    if backend == "cuda":
        reason = _extension_reason()
        if reason:
            return reason
        if device_type not in ("cpu", "cuda"):
            return f"cmfast._C runs on CPU and CUDA tensors, not on {device_type}"
        if not _ext_has_kernel(op, device_type):
            return f"cmfast._C has no {device_type.upper()} kernel for {op}"
    if backend == "triton":
        module = {"group_norm_silu": _gn, "skip_out": _so, "heun_step": _heun, "attention": _attn}[op]
        if module.triton is None:
            return "triton is not installed"
        if device_type == "cpu" and not _interpreted(module):
            if os.environ.get("TRITON_INTERPRET") == "1":
                return ("TRITON_INTERPRET=1 was set after triton was imported, so its kernels were compiled for GPUs "
                        "and cannot take CPU tensors; set it before importing triton or cmfast.ops")  # fmt: skip
            return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
        if device_type not in ("cpu", "cuda"):
            return f"Triton runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), not on {device_type}"
    return ""


def _interpreted(module) -> bool:
    """Whether the module's kernels, and Triton's own library functions, were decorated for the interpreter: Triton
    reads TRITON_INTERPRET when it decorates a function, so at import."""
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    kernels = [v for v in vars(module).values() if isinstance(v, InterpretedFunction | module.triton.JITFunction)]
    return all(isinstance(f, InterpretedFunction) for f in [standard.sum, *kernels])


def _requested(backend: str | None) -> tuple[str | None, str]:
    source = "backend argument"
    if backend is None:
        backend, source = os.environ.get("CMFAST_BACKEND", "").strip().lower(), "CMFAST_BACKEND"
        if backend in ("", "auto"):
            return None, ""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} ({source}); expected one of {', '.join(BACKENDS)} or None")
    return backend, source


def _choose(op: str, backend: str | None, device_type: str, input_reasons: dict[str, list[str]]) -> Choice:
    """The first backend in order (or the requested one) with no reasons against it. input_reasons: the reasons that
    depend on the inputs (dtypes, sizes), per backend."""
    requested, source = _requested(backend)
    skipped = {}
    for name in (requested,) if requested else BACKENDS:
        env = _environment_reasons(name, op, device_type)
        reasons = ([env] if env else []) + input_reasons.get(name, [])
        if not reasons:
            return Choice(name, skipped)
        skipped[name] = "; ".join(reasons)
    raise BackendError(
        f"{op}: backend {requested!r} (from the {source}) cannot take these inputs: {skipped[requested]}"
    )


def _triton_input_reasons(module, *args) -> dict[str, list[str]]:
    """The kernels' own limits (dtypes, sizes) for these inputs."""
    return {"triton": module.unsupported(*args) if module.triton is not None else []}


def _ext_dtype_reasons(x: Tensor, **others: Tensor | None) -> list[str]:
    """The extension's kernels take float32, bfloat16 or float16, one dtype for all the tensor inputs (no reasons
    when the extension is missing: that one says it all)."""
    if _extension_reason():
        return []
    if x.dtype not in _EXT_DTYPES:
        return [f"x is {x.dtype}; cmfast._C kernels take float32, bfloat16 or float16"]
    return [f"{name} is {t.dtype} but x is {x.dtype}; cmfast._C kernels take one dtype"
            for name, t in others.items() if t is not None and t.dtype != x.dtype]  # fmt: skip


def _check_devices(op: str, *tensors: Tensor | None) -> str:
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"{op}: all tensors must be on one device, got {sorted(map(str, devices))}")
    return devices.pop().type


def _per_sample(op: str, name: str, value: float | Tensor, like: Tensor) -> Tensor:
    """A float or (B,)/(1,) tensor of noise levels as a (B,) tensor on x's device (stride 0 when shared)."""
    value = torch.as_tensor(value, device=like.device)
    if not value.is_floating_point():
        value = value.to(torch.float32)
    value = value.reshape(-1)
    if value.numel() == 1:
        value = value.expand(like.shape[0])
    if value.shape[0] != like.shape[0]:
        raise ValueError(f"{op}: {name} has {value.shape[0]} entries but the batch has {like.shape[0]} samples")
    return value


def _check_same_shape(op: str, x: Tensor, **others: Tensor | None) -> None:
    for name, t in others.items():
        if t is not None and t.shape != x.shape:
            raise ValueError(f"{op}: {name} has shape {tuple(t.shape)} but x has {tuple(x.shape)}")
    for name, t in (("x", x), *others.items()):
        if t is not None and not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating-point tensor, got {t.dtype}")
    if x.dim() < 1:
        raise ValueError(f"{op}: x must be (B, ...), got a scalar")


def explain(op: str, *args, backend: str | None = None, **kwargs) -> Choice:
    """The backend `cmfast.ops.<op>(*args, backend=backend, **kwargs)` would run on, and why others were skipped.
    Raises as the op would (BackendError when the backend asked for cannot take the inputs)."""
    prepare = {"group_norm_silu": _prepare_group_norm_silu, "skip_out": _prepare_skip_out, "heun_step": _prepare_heun,
               "attention": _prepare_attention}  # fmt: skip
    if op not in prepare:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(prepare)}")
    return prepare[op](*args, backend=backend, **kwargs)[0]


# --- the C++/CUDA extension ------------------------------------------------------------------------------------------


_EXT_OPS = ("group_norm_silu", "group_norm_silu_backward", "skip_out", "heun_step")  # schemas in csrc/ops.cpp


def _load_extension() -> tuple[str, frozenset[tuple[str, str]]]:
    """Load cmfast._C (which registers the torch.ops.cmfast_ext ops) and register their fake implementations: why it
    cannot be used ("" when it can), and the (op, device type) pairs it has kernels for. Runs once, at import, so that
    torch.compile never traces the loading."""
    if importlib.util.find_spec("cmfast._C") is None:
        return "the C++/CUDA extension cmfast._C is not built", frozenset()
    try:
        from . import _C  # noqa: F401
    except (ImportError, OSError) as e:
        return f"the C++/CUDA extension cmfast._C failed to load: {e}", frozenset()
    _register_ext_fakes()
    has_kernel = torch._C._dispatch_has_kernel_for_dispatch_key
    kernels = {(op, device) for op in _EXT_OPS for device in ("cpu", "cuda")
               if has_kernel(f"cmfast_ext::{op}", device.upper())}  # fmt: skip
    return "", frozenset(kernels)


def _extension_reason() -> str:
    """Why the "cuda" backend cannot run at all ("" when cmfast._C is loaded)."""
    return _EXTENSION[0]


def _ext_has_kernel(op: str, device_type: str) -> bool:
    """Whether cmfast._C has a kernel of cmfast_ext::op for tensors on device_type ("cpu" or "cuda")."""
    return (op, device_type) in _EXTENSION[1]


def _register_ext_fakes() -> None:
    """Fake implementations of the cmfast_ext ops (schemas in csrc/ops.cpp), so torch.compile traces them."""

    @torch.library.register_fake("cmfast_ext::group_norm_silu")
    def _(x, weight, bias, scale, shift, num_groups, eps, silu):
        stats = x.new_empty((x.shape[0], num_groups), dtype=torch.float32)
        return torch.empty_like(x, memory_format=_so.memory_format(x)), stats, torch.empty_like(stats)

    @torch.library.register_fake("cmfast_ext::group_norm_silu_backward")
    def _(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu):
        sums = x.new_empty(x.shape[:2], dtype=torch.float32)
        return torch.empty_like(x, memory_format=_so.memory_format(x)), sums, torch.empty_like(sums)

    @torch.library.register_fake("cmfast_ext::skip_out")
    def _(x, F, sigma, sigma_min, sigma_data, clamp):
        return torch.empty_like(x, memory_format=_so.memory_format(x))

    @torch.library.register_fake("cmfast_ext::heun_step")
    def _(x, F, sigma, sigma_next, F_next, sigma_data, clamp):
        return torch.empty_like(x, memory_format=_so.memory_format(x))


_EXTENSION = _load_extension()


# --- GroupNorm + SiLU ------------------------------------------------------------------------------------------------


def group_norm_silu(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int = 32,
    eps: float = 1e-5,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = True,
    backend: str | None = None,
) -> Tensor:
    """SiLU(GroupNorm(x)), or GroupNorm alone with silu=False, or ADM's scale-shift form
    SiLU(GroupNorm(x) * (1 + scale) + shift) when scale and shift are given.

    x: (B, C, *spatial), NCHW or channels_last, float32/bfloat16/float16 (statistics in float32); weight, bias: (C,)
    or None; scale, shift: B x C values, e.g. (B, C, 1, 1). Returns y of x's shape, dtype and memory format.
    Differentiable in x, weight, bias, scale and shift.
    """
    choice, args = _prepare_group_norm_silu(x, weight, bias, num_groups, eps, scale, shift, silu, backend=backend)
    if choice.backend == "torch":
        return _gn.group_norm_silu_ref(x, weight, bias, num_groups, eps, scale, shift, silu)
    x, weight, bias, scale, shift = args
    return torch.ops.cmfast.group_norm_silu(x, weight, bias, scale, shift, num_groups, eps, silu, choice.backend)[0]


def _prepare_group_norm_silu(x, weight, bias, num_groups=32, eps=1e-5, scale=None, shift=None, silu=True, *, backend):
    op = "group_norm_silu"
    if x.dim() < 2:
        raise ValueError(f"{op}: x must be (B, C, ...), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    B, C = x.shape[:2]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"{op}: {C} channels do not split into num_groups={num_groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (C,):
            raise ValueError(f"{op}: {name} must have shape ({C},), got {tuple(p.shape)}")
    if (scale is None) != (shift is None):
        raise ValueError(f"{op}: give both scale and shift (ADM's scale-shift form) or neither")
    if scale is not None:
        for name, t in (("scale", scale), ("shift", shift)):
            if t.numel() != B * C:
                raise ValueError(f"{op}: {name} must hold B x C = {B} x {C} values, got shape {tuple(t.shape)}")
        scale, shift = scale.reshape(B, C), shift.reshape(B, C)
    device_type = _check_devices(op, x, weight, bias, scale, shift)
    reasons = _triton_input_reasons(_gn, x, num_groups) | {"cuda": _ext_group_norm_reasons(x, num_groups, device_type)}
    choice = _choose(op, backend, device_type, reasons)
    if choice.backend == "torch":
        return choice, None
    weight = weight if weight is not None else torch.ones(C, device=x.device)
    bias = bias if bias is not None else torch.zeros(C, device=x.device)
    return choice, (x, weight, bias, scale, shift)


def _ext_group_norm_reasons(x: Tensor, num_groups: int, device_type: str) -> list[str]:
    """The limits of cmfast._C's group_norm_silu kernels (see csrc/cuda/group_norm_silu.cu for the CUDA one)."""
    reasons = _ext_dtype_reasons(x)
    if reasons or device_type != "cuda":
        return reasons
    if not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return ["the CUDA group_norm_silu kernel needs channels_last (a 4-D x stored channels_last)"]
    vec = 16 // x.element_size()  # elements per 16-byte access
    if x.shape[1] % vec:
        return [f"the CUDA group_norm_silu kernel reads 16-byte vectors: C must be a multiple of {vec} for {x.dtype}"]
    if math.lcm(x.shape[1] // num_groups, vec) > _EXT_THREADS * vec:
        return [f"{x.shape[1] // num_groups} channels per group are too many for the CUDA group_norm_silu kernel"]
    return []


@torch.library.custom_op("cmfast::group_norm_silu", mutates_args=())
def _group_norm_silu_op(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    num_groups: int,
    eps: float,
    silu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(y, mean, rstd); mean and rstd are the (B, G) statistics the backward reuses."""
    if backend == "cuda":
        return torch.ops.cmfast_ext.group_norm_silu(x, weight, bias, scale, shift, num_groups, eps, silu)
    if backend == "triton":
        return _gn.group_norm_silu_forward(x, weight, bias, scale, shift, num_groups, eps, silu)
    y = _gn.group_norm_silu_ref(x, weight, bias, num_groups, eps, scale, shift, silu)
    xg = x.to(_stats_dtype(x)).reshape(x.shape[0], num_groups, -1)
    var, mean = torch.var_mean(xg, dim=-1, correction=0)
    return y.contiguous(memory_format=_so.memory_format(x)), mean, torch.rsqrt(var + eps)


def _stats_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


@_group_norm_silu_op.register_fake
def _(x, weight, bias, scale, shift, num_groups, eps, silu, backend):
    stats = x.new_empty((x.shape[0], num_groups), dtype=_stats_dtype(x))
    return torch.empty_like(x, memory_format=_so.memory_format(x)), stats, torch.empty_like(stats)


@torch.library.custom_op("cmfast::group_norm_silu_backward", mutates_args=())
def _group_norm_silu_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    scale: Tensor | None,
    shift: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    num_groups: int,
    silu: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(dx, dweight, dbias, dscale, dshift); dscale and dshift are empty without the scale-shift form. The "cuda"
    backend runs the extension's backward where it has one (CPU), else the PyTorch one."""
    if backend == "cuda" and _ext_has_kernel("group_norm_silu_backward", x.device.type):
        dx, sum_a, sum_b = torch.ops.cmfast_ext.group_norm_silu_backward(
            dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu
        )
        grads = (dx, *_gn.param_grads(sum_a, sum_b, weight, bias, scale, shift))
    elif backend == "triton":
        grads = _gn.group_norm_silu_backward(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu)
    else:
        grads = _group_norm_silu_backward_torch(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


def _group_norm_silu_backward_torch(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu):
    """The kernels' backward (see cmfast.kernels.group_norm_silu) in PyTorch, in float32 (float64 for float64)."""
    compute = _stats_dtype(x)
    B, C = x.shape[:2]
    groups = (B, num_groups, -1)
    xhat = ((x.to(compute).reshape(groups) - mean[..., None]) * rstd[..., None]).reshape(B, C, -1)
    a, t = weight.to(compute).expand(B, C), bias.to(compute).expand(B, C)
    if scale is not None:
        s1 = 1 + scale.to(compute)
        a, t = a * s1, t * s1 + shift.to(compute)
    dz = dy.to(compute).reshape(B, C, -1)
    if silu:
        z = xhat * a[..., None] + t[..., None]
        sig = torch.sigmoid(z)
        dz = dz * sig * (1 + z * (1 - sig))
    sum_a, sum_b = (dz * xhat).sum(-1), dz.sum(-1)
    n = xhat[0].numel() // num_groups
    mean_dxhat = (a * sum_b).reshape(groups).sum(-1, keepdim=True) / n
    mean_dxhat_xhat = (a * sum_a).reshape(groups).sum(-1, keepdim=True) / n
    dxhat = (dz * a[..., None]).reshape(groups)
    dx = rstd[..., None] * (dxhat - mean_dxhat - xhat.reshape(groups) * mean_dxhat_xhat)
    dx = dx.reshape(x.shape).to(x.dtype).contiguous(memory_format=_so.memory_format(x))
    return (dx, *_gn.param_grads(sum_a, sum_b, weight, bias, scale, shift))


@_group_norm_silu_backward_op.register_fake
def _(dy, x, weight, bias, scale, shift, mean, rstd, num_groups, silu, backend):
    dx = torch.empty_like(x, memory_format=_so.memory_format(x))
    dw, db = weight.new_empty(weight.shape), bias.new_empty(bias.shape)
    if scale is None:
        return dx, dw, db, x.new_empty(0), x.new_empty(0)
    return dx, dw, db, scale.new_empty(scale.shape), shift.new_empty(shift.shape)


def _group_norm_silu_setup(ctx, inputs, output):
    x, weight, bias, scale, shift, num_groups, eps, silu, backend = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, bias, scale, shift, mean, rstd)
    ctx.num_groups, ctx.silu, ctx.backend = num_groups, silu, backend


def _group_norm_silu_grad(ctx, dy, _dmean, _drstd):
    x, weight, bias, scale, shift, mean, rstd = ctx.saved_tensors
    dx, dw, db, dscale, dshift = torch.ops.cmfast.group_norm_silu_backward(
        dy, x, weight, bias, scale, shift, mean, rstd, ctx.num_groups, ctx.silu, ctx.backend
    )
    if scale is None:
        dscale = dshift = None
    return dx, dw, db, dscale, dshift, None, None, None, None


_group_norm_silu_op.register_autograd(_group_norm_silu_grad, setup_context=_group_norm_silu_setup)


# --- skip/out --------------------------------------------------------------------------------------------------------


def skip_out(
    x: Tensor,
    F: Tensor,
    sigma: float | Tensor,
    sigma_min: float,
    sigma_data: float,
    clamp: bool = False,
    backend: str | None = None,
) -> Tensor:
    """The consistency function's combination c_skip(sigma) x + c_out(sigma) F (Appendix C coefficients, computed
    from sigma in float32), optionally clamped to [-1, 1].

    x, F: (B, ...) of one shape, float32/bfloat16/float16; sigma: a float or (B,) noise levels. Returns the dtype
    x and F promote to, in x's memory format. Differentiable in x and F (not in sigma).
    """
    choice, sigma = _prepare_skip_out(x, F, sigma, sigma_min, sigma_data, clamp, backend=backend)
    if choice.backend == "torch":
        return _so.skip_out_ref(x, F, sigma, sigma_min, sigma_data, clamp)
    return torch.ops.cmfast.skip_out(x, F, sigma, float(sigma_min), float(sigma_data), clamp, choice.backend)


def _prepare_skip_out(x, F, sigma, sigma_min, sigma_data, clamp=False, *, backend):
    op = "skip_out"
    _check_same_shape(op, x, F=F)
    sigma = _per_sample(op, "sigma", sigma, x)
    device_type = _check_devices(op, x, F, sigma)
    reasons = _triton_input_reasons(_so, x, F, sigma) | {"cuda": _ext_dtype_reasons(x, F=F)}
    return _choose(op, backend, device_type, reasons), sigma


@torch.library.custom_op("cmfast::skip_out", mutates_args=())
def _skip_out_op(
    x: Tensor, F: Tensor, sigma: Tensor, sigma_min: float, sigma_data: float, clamp: bool, backend: str
) -> Tensor:
    if backend == "cuda":
        return torch.ops.cmfast_ext.skip_out(x, F, sigma, sigma_min, sigma_data, clamp)
    if backend == "triton":
        return _so.skip_out_forward(x, F, sigma, sigma_min, sigma_data, clamp)
    return _so.skip_out_ref(x, F, sigma, sigma_min, sigma_data, clamp).contiguous(memory_format=_so.memory_format(x))


@_skip_out_op.register_fake
def _(x, F, sigma, sigma_min, sigma_data, clamp, backend):
    return torch.empty_like(x, dtype=torch.promote_types(x.dtype, F.dtype), memory_format=_so.memory_format(x))


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
    """(dx, dF) in the dtypes of x and F and x's memory format; x and F are only read when clamping."""
    if backend == "triton":
        return _so.skip_out_backward(grad, sigma, x, F, sigma_min, sigma_data, clamp)
    from .preconditioning import cm_c_out, cm_c_skip

    compute = _stats_dtype(grad)
    s = sigma.to(compute).reshape(-1, *[1] * (x.dim() - 1))
    g = grad.to(compute)
    if clamp:
        out = cm_c_skip(s, sigma_min, sigma_data) * x.to(compute) + cm_c_out(s, sigma_min, sigma_data) * F.to(compute)
        g = g * ((out > -1) & (out < 1))  # as torch.clamp's backward
    fmt = _so.memory_format(x)
    dx = (cm_c_skip(s, sigma_min, sigma_data) * g).to(x.dtype).contiguous(memory_format=fmt)
    return dx, (cm_c_out(s, sigma_min, sigma_data) * g).to(F.dtype).contiguous(memory_format=fmt)


@_skip_out_backward_op.register_fake
def _(grad, sigma, x, F, sigma_min, sigma_data, clamp, backend):
    fmt = _so.memory_format(x)
    return torch.empty_like(x, memory_format=fmt), torch.empty_like(x, dtype=F.dtype, memory_format=fmt)


def _skip_out_setup(ctx, inputs, output):
    x, F, sigma, sigma_min, sigma_data, clamp, backend = inputs
    ctx.save_for_backward(x, F, sigma)
    ctx.args = (sigma_min, sigma_data, clamp, backend)


def _skip_out_grad(ctx, grad):
    x, F, sigma = ctx.saved_tensors
    dx, dF = torch.ops.cmfast.skip_out_backward(grad, sigma, x, F, *ctx.args)
    return dx, dF, None, None, None, None, None


_skip_out_op.register_autograd(_skip_out_grad, setup_context=_skip_out_setup)


# --- Heun step -------------------------------------------------------------------------------------------------------


def heun_step(
    x: Tensor,
    F: Tensor,
    sigma: float | Tensor,
    sigma_next: float | Tensor,
    F_next: Tensor | None = None,
    sigma_data: float = 0.5,
    clamp: bool = False,
    backend: str | None = None,
) -> Tensor:
    """One Heun step of an EDM teacher's PF ODE from sigma to sigma_next (REFERENCE.md section 4), in two calls
    around the teacher's second network evaluation:

        x_e   = heun_step(x, F, sigma, sigma_next)                  # F = net(c_in(sigma) x, c_noise(sigma))
        x_hat = heun_step(x, F, sigma, sigma_next, F_next=F_next)   # F_next = net(c_in(sigma_next) x_e, ...)

    F and F_next are the network's raw outputs (before the teacher's skip/out, which happens here with EDM's
    coefficients). The first call alone is the Euler step. x, F, F_next: (B, ...) of one shape; sigma, sigma_next:
    floats or (B,) tensors, sigma_next > 0 for the second call. Returns x's dtype and memory format. clamp=True
    clips each denoised estimate to [-1, 1]. No backward: run it under torch.no_grad(), as teachers are.
    """
    choice, sigma, sigma_next = _prepare_heun(x, F, sigma, sigma_next, F_next, sigma_data, clamp, backend=backend)
    if choice.backend == "torch":
        return _heun.heun_step_ref(x, F, sigma, sigma_next, F_next, sigma_data, clamp)
    return torch.ops.cmfast.heun_step(x, F, sigma, sigma_next, F_next, float(sigma_data), clamp, choice.backend)


def _prepare_heun(x, F, sigma, sigma_next, F_next=None, sigma_data=0.5, clamp=False, *, backend):
    op = "heun_step"
    _check_same_shape(op, x, F=F, F_next=F_next)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, F, F_next)):
        raise ValueError(f"{op} has no backward; run the teacher's step under torch.no_grad()")
    sigma = _per_sample(op, "sigma", sigma, x)
    sigma_next = _per_sample(op, "sigma_next", sigma_next, x)
    device_type = _check_devices(op, x, F, F_next, sigma, sigma_next)
    reasons = _triton_input_reasons(_heun, x, F, F_next) | {"cuda": _ext_dtype_reasons(x, F=F, F_next=F_next)}
    choice = _choose(op, backend, device_type, reasons)
    return choice, sigma, sigma_next


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
    if backend == "cuda":
        return torch.ops.cmfast_ext.heun_step(x, F, sigma, sigma_next, F_next, sigma_data, clamp)
    if backend == "triton":
        return _heun.heun_step_forward(x, F, sigma, sigma_next, F_next, sigma_data, clamp)
    out = _heun.heun_step_ref(x, F, sigma, sigma_next, F_next, sigma_data, clamp)
    return out.contiguous(memory_format=_so.memory_format(x))


@_heun_step_op.register_fake
def _(x, F, sigma, sigma_next, F_next, sigma_data, clamp, backend):
    return torch.empty_like(x, memory_format=_so.memory_format(x))


# --- attention -------------------------------------------------------------------------------------------------------


def attention(qkv: Tensor, num_heads: int, backend: str | None = None) -> Tensor:
    """Multi-head self-attention over the fused qkv projection, as cmfast.networks.adm.qkv_attention(qkv, num_heads,
    "3hd"): softmax(q^T k / sqrt(head_dim)) per sample and head.

    qkv: (B, 3 H D, T) with channels (3, heads, head_dim) (the official checkpoints' layout), float32/bfloat16/float16
    (softmax statistics in float32), any strides. Returns (B, H D, T) in qkv's dtype, channels (head, d).
    Differentiable in qkv. The Triton backend is flash-style: it never holds the T x T scores.
    """
    (choice,) = _prepare_attention(qkv, num_heads, backend=backend)
    if choice.backend == "torch":
        return _attn.attention_ref(qkv, num_heads)
    return torch.ops.cmfast.attention(qkv, num_heads, choice.backend)[0]


def _prepare_attention(qkv, num_heads, *, backend):
    op = "attention"
    if qkv.dim() != 3:
        raise ValueError(f"{op}: qkv must be (B, 3 heads head_dim, T), got shape {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise ValueError(f"{op}: qkv must be a floating-point tensor, got {qkv.dtype}")
    if num_heads < 1 or qkv.shape[1] % (3 * num_heads) or qkv.shape[1] == 0:
        raise ValueError(f"{op}: {qkv.shape[1]} channels do not split into (3, {num_heads} heads, head_dim)")
    device_type = _check_devices(op, qkv)
    return (_choose(op, backend, device_type, _triton_input_reasons(_attn, qkv, num_heads)),)


@torch.library.custom_op("cmfast::attention", mutates_args=())
def _attention_op(qkv: Tensor, num_heads: int, backend: str) -> tuple[Tensor, Tensor]:
    """(out, lse); lse is the (B, H, T) log-sum-exp of each query's scaled scores, which the backward reuses."""
    if backend == "triton":
        return _attn.attention_forward(qkv, num_heads)
    return _attn.attention_ref(qkv, num_heads).contiguous(), _attn.attention_lse_torch(qkv, num_heads)


@_attention_op.register_fake
def _(qkv, num_heads, backend):
    B, width, T = qkv.shape
    out = qkv.new_empty((B, width // 3, T))
    return out, qkv.new_empty((B, num_heads, T), dtype=_stats_dtype(qkv))


@torch.library.custom_op("cmfast::attention_backward", mutates_args=())
def _attention_backward_op(dout: Tensor, qkv: Tensor, out: Tensor, lse: Tensor, num_heads: int, backend: str) -> Tensor:
    """The gradient of qkv, (B, 3 H D, T) in qkv's dtype."""
    if backend == "triton":
        return _attn.attention_backward(dout, qkv, out, lse, num_heads)
    return _attn.attention_backward_torch(dout, qkv, out, lse, num_heads)


@_attention_backward_op.register_fake
def _(dout, qkv, out, lse, num_heads, backend):
    return qkv.new_empty(qkv.shape)


def _attention_setup(ctx, inputs, output):
    qkv, num_heads, backend = inputs
    out, lse = output
    ctx.save_for_backward(qkv, out, lse)
    ctx.num_heads, ctx.backend = num_heads, backend


def _attention_grad(ctx, dout, _dlse):
    qkv, out, lse = ctx.saved_tensors
    return torch.ops.cmfast.attention_backward(dout, qkv, out, lse, ctx.num_heads, ctx.backend), None, None


_attention_op.register_autograd(_attention_grad, setup_context=_attention_setup)
