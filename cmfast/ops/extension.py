"""The C++/CUDA extension cmfast._C (csrc/), the "ext" backend: loading it, and what its kernels can take.

Importing cmfast._C registers the torch.ops.cmfast_ext operators (schemas in csrc/ops.cpp): CPU kernels for
GroupNorm+SiLU (forward, backward and JVP), skip/out (forward and JVP), TrigFlow's skip/out (forward and a one-pass
forward with JVP) and the Heun step, and CUDA kernels for GroupNorm+SiLU and the
inference engine's GroupNorm+SiLU with pre-adds (group_norm_silu_nhwc), both on channels_last tensors. The load
happens once, when cmfast.ops is imported, so that torch.compile never traces it; the kernel files' fake
implementations of those operators are registered right after.
"""

from __future__ import annotations

import importlib.util
import math

import torch
from torch import Tensor

from ..kernels import group_norm_silu, group_norm_silu_nhwc, heun_step, skip_out, trig_skip_out
from ..kernels._common import KERNEL_DTYPES, ext_has_kernel

OPS = (
    "group_norm_silu",
    "group_norm_silu_backward",
    "group_norm_silu_jvp",
    "group_norm_silu_nhwc",
    "skip_out",
    "skip_out_jvp",
    "trig_skip_out",
    "trig_skip_out_jvp",
    "heun_step",
)  # csrc/ops.cpp
DEVICE_TYPES = ("cpu", "cuda")
THREADS = 256  # threads per block of the CUDA GroupNorm kernel: a tile may hold 256 vectors of channels


def _load() -> tuple[str, frozenset[tuple[str, str]]]:
    """Load cmfast._C and register its operators' fake implementations: why it cannot be used ("" when it can), and
    the (op, device type) pairs it has kernels for."""
    if importlib.util.find_spec("cmfast._C") is None:
        return "the C++/CUDA extension cmfast._C is not built", frozenset()
    try:
        from .. import _C  # noqa: F401  (importing it registers the cmfast_ext operators)
    except (ImportError, OSError) as e:
        return f"the C++/CUDA extension cmfast._C failed to load: {e}", frozenset()
    for module in (group_norm_silu, group_norm_silu_nhwc, skip_out, trig_skip_out, heun_step):
        module.register_ext_fakes()
    return "", frozenset((op, device) for op in OPS for device in DEVICE_TYPES if ext_has_kernel(op, device))


_REASON, _KERNELS = _load()


def reason() -> str:
    """Why the "ext" backend cannot run at all ("" when cmfast._C is loaded)."""
    return _REASON


def has_kernel(op: str, device_type: str) -> bool:
    """Whether cmfast._C has a kernel of cmfast_ext::op for tensors on device_type ("cpu" or "cuda")."""
    return (op, device_type) in _KERNELS


def environment_reason(op: str, device_type: str) -> str:
    """Why the extension cannot run `op` for tensors on `device_type` on this machine ("" if it can)."""
    if reason():
        return reason()
    if device_type not in DEVICE_TYPES:
        return f"cmfast._C runs on CPU and CUDA tensors, not on {device_type}"
    if not has_kernel(op, device_type):
        return f"cmfast._C has no {device_type.upper()} kernel for {op}"
    return ""


def dtype_reasons(x: Tensor, **others: Tensor | None) -> list[str]:
    """The extension's kernels take float32, bfloat16 or float16, one dtype for all the tensor inputs (no reasons
    when the extension is missing: that one says it all)."""
    if reason():
        return []
    if x.dtype not in KERNEL_DTYPES:
        return [f"x is {x.dtype}; cmfast._C kernels take float32, bfloat16 or float16"]
    return [f"{name} is {t.dtype} but x is {x.dtype}; cmfast._C kernels take one dtype"
            for name, t in others.items() if t is not None and t.dtype != x.dtype]  # fmt: skip


def group_norm_reasons(x: Tensor, num_groups: int, device_type: str) -> list[str]:
    """The limits of cmfast._C's group_norm_silu kernels (see csrc/cuda/group_norm_silu.cu for the CUDA one)."""
    reasons = dtype_reasons(x)
    if reasons or device_type != "cuda":
        return reasons
    if not (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last)):
        return ["the CUDA group_norm_silu kernel needs channels_last (a 4-D x stored channels_last)"]
    vec = 16 // x.element_size()  # elements per 16-byte access
    if x.shape[1] % vec:
        return [f"the CUDA group_norm_silu kernel reads 16-byte vectors: C must be a multiple of {vec} for {x.dtype}"]
    if math.lcm(x.shape[1] // num_groups, vec) > THREADS * vec:
        return [f"{x.shape[1] // num_groups} channels per group are too many for the CUDA group_norm_silu kernel"]
    return []
