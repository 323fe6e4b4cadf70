"""The fused ops and their dispatch: GroupNorm+SiLU (and group_norm_silu_nhwc, its channels_last inference form on
x + pre_add + alpha residual), attention, the skip/out combination, TrigFlow's skip/out (trig_skip_out, and
trig_skip_out_jvp: its value and tangent from one pass) and the Heun step.

Every op takes backend=None|"ext"|"triton"|"torch". With None, the first backend that can take the inputs runs, in the
order ext (the C++/CUDA extension cmfast._C: CPU kernels for every op but attention and group_norm_silu_nhwc, and CUDA
kernels for both GroupNorm+SiLU ops on channels_last tensors), triton, torch; the environment variable CMFAST_BACKEND
sets the backend for every call that passes None ("auto" or empty keeps the automatic choice). Each skipped backend has
a reason (`explain` returns them), and a backend that was asked for and cannot take the inputs raises BackendError with
its reasons. Triton needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before triton is first imported
(Triton picks the interpreter when it decorates a function, its own library's included). "cuda", the extension backend's
former name, still selects "ext", with a DeprecationWarning.

The torch backend is the plain reference (`cmfast.kernels.<op>.<op>_ref`, the networks' and samplers' own math, e.g.
ADM's GroupNorm32), differentiated by autograd and fused by torch.compile. The fused backends run through the custom
ops that the kernel files register with torch.library (cmfast::group_norm_silu, cmfast::skip_out, cmfast::heun_step,
cmfast::attention, cmfast::trig_skip_out, the backwards and the JVPs), with fake implementations, so torch.compile
traces models that use them. The backend is an argument of those ops; their "torch" implementation lets
`torch.library.opcheck` check the registration on any machine. This package checks the arguments, chooses the
backend (dispatch.py) and loads the extension (extension.py).

Forward mode: torch.func.jvp and torch.autograd.forward_ad run through every differentiable op. The fused backends'
calls go through an autograd.Function per op (in its kernel file) that holds the backward and a forward-mode rule whose
tangent is a fused kernel too; its backend is chosen with the forward's, in the same order and with the same override,
and `explain("<op>_jvp", ...)` reports it ("torch" where the forward is the reference, which autograd differentiates).
A backend asked for that can run the forward but not its JVP raises its BackendError when a JVP is taken. Under
torch.compile the registered op is called directly (dynamo cannot trace an autograd.Function with a jvp), with its
backward and no forward mode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import attention as _attention
from ..kernels import group_norm_silu as _group_norm_silu
from ..kernels import group_norm_silu_nhwc as _group_norm_silu_nhwc
from ..kernels import heun_step as _heun_step
from ..kernels import skip_out as _skip_out
from ..kernels import trig_skip_out as _trig_skip_out
from . import extension
from .dispatch import BACKENDS, BackendError, Choice, choose, triton_input_reasons

__all__ = [
    "BACKENDS",
    "BackendError",
    "Choice",
    "attention",
    "explain",
    "group_norm_silu",
    "group_norm_silu_nhwc",
    "heun_step",
    "skip_out",
    "trig_skip_out",
    "trig_skip_out_jvp",
]


def explain(op: str, *args, backend: str | None = None, **kwargs) -> Choice:
    """The backend `cmfast.ops.<op>(*args, backend=backend, **kwargs)` would run on, and why others were skipped.
    Raises as the op would (BackendError when the backend asked for cannot take the inputs)."""
    prepare = {"group_norm_silu": _prepare_group_norm_silu, "skip_out": _prepare_skip_out, "heun_step": _prepare_heun,
               "attention": _prepare_attention, "group_norm_silu_nhwc": _prepare_group_norm_silu_nhwc,
               "group_norm_silu_jvp": _prepare_group_norm_silu_jvp, "skip_out_jvp": _prepare_skip_out_jvp,
               "trig_skip_out": _prepare_trig_skip_out, "trig_skip_out_jvp": _prepare_trig_skip_out_jvp,
               "attention_jvp": _prepare_attention_jvp}  # fmt: skip
    if op not in prepare:
        raise ValueError(f"unknown op {op!r}; expected one of {', '.join(prepare)}")
    return prepare[op](*args, backend=backend, **kwargs)[0]


# --- argument checks -------------------------------------------------------------------------------------------------


def _choose_jvp(op: str, module, backend: str | None, device_type: str, reasons: dict) -> Choice | BackendError:
    """The backend of an op's forward-mode kernel, chosen with its forward (the ops' autograd.Functions take it); a
    backend asked for that cannot run it gives its BackendError, for the Function to raise if a JVP is taken."""
    try:
        return choose(op, module, backend, device_type, reasons)
    except BackendError as e:
        return e


def _jvp_backend(jvp: Choice | BackendError) -> str | BackendError:
    return jvp if isinstance(jvp, BackendError) else jvp.backend


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
    choice, args, jvp = _prepare_group_norm_silu(x, weight, bias, num_groups, eps, scale, shift, silu, backend=backend)
    if choice.backend == "torch":
        return _group_norm_silu.group_norm_silu_ref(x, weight, bias, num_groups, eps, scale, shift, silu)
    x, weight, bias, scale, shift = args
    if torch.compiler.is_compiling():  # dynamo cannot trace an autograd.Function with a jvp; the op has its backward
        return torch.ops.cmfast.group_norm_silu(x, weight, bias, scale, shift, num_groups, eps, silu, choice.backend)[0]
    return _group_norm_silu.GroupNormSiLU.apply(x, weight, bias, scale, shift, num_groups, eps, silu, choice.backend,
                                                _jvp_backend(jvp))[0]  # fmt: skip


def _prepare_group_norm_silu_jvp(*args, backend, **kwargs):
    """The backend of group_norm_silu's forward-mode rule (the torch backend's is autograd's, on the reference)."""
    choice, _, jvp = _prepare_group_norm_silu(*args, backend=backend, **kwargs)
    if isinstance(jvp, BackendError):
        raise jvp
    return (jvp if jvp is not None else choice,)


def _prepare_group_norm_silu(x, weight, bias, num_groups=32, eps=1e-5, scale=None, shift=None, silu=True, *, backend):
    """The forward's backend, the arguments of the registered op (None for torch), and the forward-mode kernel's
    backend (None for torch: autograd differentiates the reference; a BackendError when the backend asked for has
    no forward-mode kernel for these inputs, raised only if a JVP runs)."""
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
    reasons = {"triton": triton_input_reasons(_group_norm_silu, x, num_groups),
               "ext": extension.group_norm_reasons(x, num_groups, device_type)}  # fmt: skip
    choice = choose(op, _group_norm_silu, backend, device_type, reasons)
    if choice.backend == "torch":
        return choice, None, None
    jvp_reasons = {"triton": reasons["triton"], "ext": extension.dtype_reasons(x)}
    jvp = _choose_jvp(op + "_jvp", _group_norm_silu, backend, device_type, jvp_reasons)
    weight = weight if weight is not None else torch.ones(C, device=x.device)
    bias = bias if bias is not None else torch.zeros(C, device=x.device)
    return choice, (x, weight, bias, scale, shift), jvp


# --- channels_last GroupNorm + SiLU with pre-adds (inference) -------------------------------------------------------


def group_norm_silu_nhwc(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    num_groups: int = 32,
    eps: float = 1e-5,
    pre_add: Tensor | None = None,
    residual: Tensor | None = None,
    alpha: float = 1.0,
    scale: Tensor | None = None,
    shift: Tensor | None = None,
    silu: bool = True,
    return_sum: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """SiLU(GroupNorm(h) * weight + bias), with ADM's `* (1 + scale) + shift` when given, on the sum
    h = x + pre_add + alpha * residual, computed in float32 and rounded once to x's dtype (what an unfused network
    holds in memory); statistics and arithmetic in float32 on that h, y rounded once. silu=False: no SiLU.

    x: (B, C, H, W), channels_last (NCHW runs on the torch backend), float32/bfloat16/float16; weight, bias: (C,) or
    None; pre_add: (C,), (1, C) or (B, C) per-channel terms (e.g. a folded conv bias plus a time embedding), any float
    dtype; residual: like x, same dtype; scale, shift: (B, C) or (B, C, 1, 1). Returns y in x's dtype and memory format,
    or (y, h) with return_sum=True (h is x itself when nothing is added). Inference only: the fused backends have no
    backward (calling it raises).
    """
    choice, args = _prepare_group_norm_silu_nhwc(
        x, weight, bias, num_groups, eps, pre_add, residual, alpha, scale, shift, silu, return_sum, backend=backend
    )
    if choice.backend == "torch":
        y, h = _group_norm_silu_nhwc.group_norm_silu_nhwc_ref(*args)
    else:
        y, h = torch.ops.cmfast.group_norm_silu_nhwc(*args, return_sum, choice.backend)
        h = x if pre_add is None and residual is None else h  # the op writes h only when something is added
    return (y, h) if return_sum else y


def _prepare_group_norm_silu_nhwc(
    x, weight, bias, num_groups=32, eps=1e-5, pre_add=None, residual=None, alpha=1.0, scale=None, shift=None,
    silu=True, return_sum=False, *, backend,
):  # fmt: skip
    """The backend, and the arguments in the order of the backend's function: the reference's (x, weight, bias,
    num_groups, eps, pre_add, residual, alpha, scale, shift, silu) for torch, the registered op's otherwise."""
    op = "group_norm_silu_nhwc"
    if x.dim() != 4:
        raise ValueError(f"{op}: x must be (B, C, H, W), got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{op}: x must be a floating-point tensor, got {x.dtype}")
    B, C = x.shape[:2]
    if num_groups < 1 or C % num_groups:
        raise ValueError(f"{op}: {C} channels do not split into num_groups={num_groups} groups")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is not None and p.shape != (C,):
            raise ValueError(f"{op}: {name} must have shape ({C},), got {tuple(p.shape)}")
    if pre_add is not None:
        if not pre_add.is_floating_point():
            raise ValueError(f"{op}: pre_add must be a floating-point tensor, got {pre_add.dtype}")
        if pre_add.shape not in ((C,), (1, C), (B, C)):
            raise ValueError(
                f"{op}: pre_add must have shape ({C},), (1, {C}) or ({B}, {C}), got {tuple(pre_add.shape)}"
            )
        pre_add = pre_add.reshape(-1, C)
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"{op}: residual has shape {tuple(residual.shape)} but x has {tuple(x.shape)}")
        if residual.dtype != x.dtype:
            raise ValueError(f"{op}: residual is {residual.dtype} but x is {x.dtype}; they must have one dtype")
    if (scale is None) != (shift is None):
        raise ValueError(f"{op}: give both scale and shift (ADM's scale-shift form) or neither")
    if scale is not None:
        for name, t in (("scale", scale), ("shift", shift)):
            if t.shape not in ((B, C), (B, C, 1, 1)):
                raise ValueError(f"{op}: {name} must have shape ({B}, {C}) or ({B}, {C}, 1, 1), got {tuple(t.shape)}")
        scale, shift = scale.reshape(B, C), shift.reshape(B, C)
    device_type = _check_devices(op, x, weight, bias, pre_add, residual, scale, shift)
    reasons = {"triton": triton_input_reasons(_group_norm_silu_nhwc, x, num_groups),
               "ext": [] if extension.reason() else _group_norm_silu_nhwc.ext_unsupported(x, device_type)}  # fmt: skip
    choice = choose(op, _group_norm_silu_nhwc, backend, device_type, reasons)
    if choice.backend == "torch":
        return choice, (x, weight, bias, num_groups, eps, pre_add, residual, alpha, scale, shift, silu)
    weight = weight if weight is not None else torch.ones(C, device=x.device)
    bias = bias if bias is not None else torch.zeros(C, device=x.device)
    return choice, (x, weight, bias, pre_add, residual, float(alpha), scale, shift, num_groups, float(eps), bool(silu))


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
    x and F promote to, in x's memory format. Differentiable in x and F (not in sigma) by backward; forward mode
    (torch.func.jvp, forward_ad) takes tangents of x, F and sigma.
    """
    choice, sigma, jvp = _prepare_skip_out(x, F, sigma, sigma_min, sigma_data, clamp, backend=backend)
    if choice.backend == "torch":
        return _skip_out.skip_out_ref(x, F, sigma, sigma_min, sigma_data, clamp)
    args = (x, F, sigma, float(sigma_min), float(sigma_data), clamp, choice.backend)
    if torch.compiler.is_compiling():  # dynamo cannot trace an autograd.Function with a jvp; the op has its backward
        return torch.ops.cmfast.skip_out(*args)
    return _skip_out.SkipOut.apply(*args, _jvp_backend(jvp))


def _prepare_skip_out_jvp(*args, backend, **kwargs):
    """The backend of skip_out's forward-mode rule (the torch backend's is autograd's, on the reference)."""
    choice, _, jvp = _prepare_skip_out(*args, backend=backend, **kwargs)
    if isinstance(jvp, BackendError):
        raise jvp
    return (jvp if jvp is not None else choice,)


def _prepare_skip_out(x, F, sigma, sigma_min, sigma_data, clamp=False, *, backend):
    """The forward's backend, sigma as (B,), and the forward-mode kernel's backend (as for group_norm_silu)."""
    op = "skip_out"
    _check_same_shape(op, x, F=F)
    sigma = _per_sample(op, "sigma", sigma, x)
    device_type = _check_devices(op, x, F, sigma)
    reasons = {"triton": triton_input_reasons(_skip_out, x, F, sigma), "ext": extension.dtype_reasons(x, F=F)}
    choice = choose(op, _skip_out, backend, device_type, reasons)
    if choice.backend == "torch":
        return choice, sigma, None
    return choice, sigma, _choose_jvp(op + "_jvp", _skip_out, backend, device_type, reasons)


# --- TrigFlow skip/out -----------------------------------------------------------------------------------------------


def trig_skip_out(
    x: Tensor, F: Tensor, t: float | Tensor, sigma_data: float = 0.5, backend: str | None = None
) -> Tensor:
    """TrigFlow's consistency function from the network's raw output (sCM): cos(t) x - sin(t) sigma_data F.

    x, F: (B, ...) of one shape, float32/bfloat16/float16; t: a float or (B,) TrigFlow times (in [0, pi/2]). Returns
    the dtype x and F promote to, in x's memory format. Differentiable in x, F and t, by backward and in forward mode
    (torch.func.jvp, forward_ad: the tangent from one fused pass)."""
    choice, t, jvp = _prepare_trig_skip_out(x, F, t, sigma_data, backend=backend)
    if choice.backend == "torch":
        return _trig_skip_out.trig_skip_out_ref(x, F, t, sigma_data)
    if torch.compiler.is_compiling():  # dynamo cannot trace an autograd.Function with a jvp; the op has its backward
        return torch.ops.cmfast.trig_skip_out(x, F, t, float(sigma_data), choice.backend)
    return _trig_skip_out.TrigSkipOut.apply(x, F, t, float(sigma_data), choice.backend, _jvp_backend(jvp))


def trig_skip_out_jvp(
    x: Tensor,
    F: Tensor,
    t: float | Tensor,
    tx: Tensor | None,
    tF: Tensor | None,
    tt: float | Tensor | None,
    sigma_data: float = 0.5,
    backend: str | None = None,
) -> tuple[Tensor, Tensor]:
    """(f, tf): trig_skip_out and its tangent along tx, tF (like x and F) and tt (a float or (B,); None: zero), from
    one pass over x and F, without torch.func. Not differentiable (both are for stop-gradient targets)."""
    op = "trig_skip_out_jvp"
    (choice,) = _prepare_trig_skip_out_jvp(x, F, t, sigma_data, backend=backend)
    _check_same_shape(op, x, tx=tx, tF=tF)
    t = _per_sample(op, "t", t, x)
    tt = _per_sample(op, "tt", tt, x) if tt is not None else None
    _check_devices(op, x, F, t, tx, tF, tt)
    with torch.no_grad():
        return torch.ops.cmfast.trig_skip_out_jvp(x, F, t, tx, tF, tt, float(sigma_data), True, choice.backend)


def _prepare_trig_skip_out_jvp(x, F, t, sigma_data=0.5, *, backend):
    """The backend of trig_skip_out's forward-mode kernel (also what trig_skip_out_jvp runs)."""
    choice, _, jvp = _prepare_trig_skip_out(x, F, t, sigma_data, backend=backend, jvp_for_torch=True)
    if isinstance(jvp, BackendError):
        raise jvp
    return (jvp,)


def _prepare_trig_skip_out(x, F, t, sigma_data=0.5, *, backend, jvp_for_torch=False):
    """The forward's backend, t as (B,), and the forward-mode kernel's backend (as for group_norm_silu; chosen for the
    torch forward too when jvp_for_torch)."""
    op = "trig_skip_out"
    _check_same_shape(op, x, F=F)
    t = _per_sample(op, "t", t, x)
    device_type = _check_devices(op, x, F, t)
    reasons = {"triton": triton_input_reasons(_trig_skip_out, x, F, t), "ext": extension.dtype_reasons(x, F=F)}
    choice = choose(op, _trig_skip_out, backend, device_type, reasons)
    if choice.backend == "torch" and not jvp_for_torch:
        return choice, t, None
    return choice, t, _choose_jvp(op + "_jvp", _trig_skip_out, backend, device_type, reasons)


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
        return _heun_step.heun_step_ref(x, F, sigma, sigma_next, F_next, sigma_data, clamp)
    return torch.ops.cmfast.heun_step(x, F, sigma, sigma_next, F_next, float(sigma_data), clamp, choice.backend)


def _prepare_heun(x, F, sigma, sigma_next, F_next=None, sigma_data=0.5, clamp=False, *, backend):
    op = "heun_step"
    _check_same_shape(op, x, F=F, F_next=F_next)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, F, F_next)):
        raise ValueError(f"{op} has no backward; run the teacher's step under torch.no_grad()")
    sigma = _per_sample(op, "sigma", sigma, x)
    sigma_next = _per_sample(op, "sigma_next", sigma_next, x)
    device_type = _check_devices(op, x, F, F_next, sigma, sigma_next)
    reasons = {"triton": triton_input_reasons(_heun_step, x, F, F_next),
               "ext": extension.dtype_reasons(x, F=F, F_next=F_next)}  # fmt: skip
    return choose(op, _heun_step, backend, device_type, reasons), sigma, sigma_next


# --- attention -------------------------------------------------------------------------------------------------------


def attention(qkv: Tensor, num_heads: int, backend: str | None = None) -> Tensor:
    """Multi-head self-attention over the fused qkv projection, as cmfast.networks.adm.qkv_attention(qkv, num_heads,
    "3hd"): softmax(q^T k / sqrt(head_dim)) per sample and head.

    qkv: (B, 3 H D, T) with channels (3, heads, head_dim) (the official checkpoints' layout), float32/bfloat16/float16
    (softmax statistics in float32), any strides. Returns (B, H D, T) in qkv's dtype, channels (head, d).
    Differentiable in qkv. The Triton backend is flash-style: it never holds the T x T scores.
    """
    choice, jvp = _prepare_attention(qkv, num_heads, backend=backend)
    if choice.backend == "torch":
        return _attention.attention_ref(qkv, num_heads)
    if torch.compiler.is_compiling():  # dynamo cannot trace an autograd.Function with a jvp; the op has its backward
        return torch.ops.cmfast.attention(qkv, num_heads, choice.backend)[0]
    return _attention.Attention.apply(qkv, num_heads, choice.backend, _jvp_backend(jvp))[0]


def _prepare_attention_jvp(*args, backend, **kwargs):
    """The backend of attention's forward-mode rule (the torch backend's is autograd's, on the reference)."""
    choice, jvp = _prepare_attention(*args, backend=backend, **kwargs)
    if isinstance(jvp, BackendError):
        raise jvp
    return (jvp if jvp is not None else choice,)


def _prepare_attention(qkv, num_heads, *, backend):
    """The forward's backend and the forward-mode kernel's (as for group_norm_silu)."""
    op = "attention"
    if qkv.dim() != 3:
        raise ValueError(f"{op}: qkv must be (B, 3 heads head_dim, T), got shape {tuple(qkv.shape)}")
    if not qkv.is_floating_point():
        raise ValueError(f"{op}: qkv must be a floating-point tensor, got {qkv.dtype}")
    if num_heads < 1 or qkv.shape[1] % (3 * num_heads) or qkv.shape[1] == 0:
        raise ValueError(f"{op}: {qkv.shape[1]} channels do not split into (3, {num_heads} heads, head_dim)")
    device_type = _check_devices(op, qkv)
    reasons = {"triton": triton_input_reasons(_attention, qkv, num_heads)}
    choice = choose(op, _attention, backend, device_type, reasons)
    if choice.backend == "torch":
        return choice, None
    return choice, _choose_jvp(op + "_jvp", _attention, backend, device_type, reasons)
