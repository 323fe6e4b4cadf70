"""What every op file shares: the optional Triton import, the kernels' dtypes and limits, the memory-format rule.

Triton is optional: without it `triton`, `tl` and `InterpretedFunction` are None, `jit` leaves functions undecorated
(so the op files still import and their PyTorch references work), and `cmfast.ops` skips the Triton backend with the
reason. Triton reads TRITON_INTERPRET when it decorates a function, so whether CPU tensors can run the kernels is fixed
when this module is first imported; `interpreted` says which way it went.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
    from triton.language import standard as _tl_standard
    from triton.runtime.interpreter import InterpretedFunction
except ImportError:
    triton = tl = _tl_standard = InterpretedFunction = None

jit = triton.jit if triton is not None else (lambda fn: fn)

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # what the Triton kernels load and store
GRID_LIMIT = 65535  # programs along a launch grid's second axis, where the kernels put samples (or chunks)
OFFSET_LIMIT = 2**31  # elements one sample may span: the kernels address within a sample in int32


def memory_format(x: Tensor) -> torch.memory_format:
    """channels_last for 4-D tensors stored that way, else contiguous: the two layouts every fused op addresses
    (its inputs are made contiguous in that format, and its outputs are allocated in it)."""
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def per_sample_numel(x: Tensor) -> int:
    """Elements per sample of a (B, ...) tensor; in either layout, sample b is the b-th run of this many."""
    return x.numel() // x.shape[0] if x.shape[0] else 0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype statistics and arithmetic run in: float32 for float32, bfloat16 and float16 storage, float64 for
    float64 (the references' precision for tests)."""
    return torch.promote_types(dtype, torch.float32)


def dtype_reasons(tensors: dict[str, Tensor | None], takes: str = "the kernels take") -> list[str]:
    """One reason per tensor whose dtype the kernels cannot load, e.g. "x is torch.float64; the kernels take ..."."""
    return [f"{name} is {t.dtype}; {takes} float32, bfloat16 or float16"
            for name, t in tensors.items() if t is not None and t.dtype not in KERNEL_DTYPES]  # fmt: skip


def interpreted(module: ModuleType) -> bool:
    """Whether the module's Triton kernels, and Triton's own library functions, were decorated for the interpreter
    (TRITON_INTERPRET=1 when triton was first imported), so they can take CPU tensors. False without triton."""
    if triton is None:
        return False
    kernels = [v for v in vars(module).values() if isinstance(v, InterpretedFunction | triton.JITFunction)]
    return all(isinstance(f, InterpretedFunction) for f in [_tl_standard.sum, *kernels])


def ext_has_kernel(op: str, device_type: str) -> bool:
    """Whether the C++/CUDA extension registered a kernel of torch.ops.cmfast_ext.<op> for tensors on device_type
    ("cpu" or "cuda"); False while the extension is not loaded (cmfast.ops loads it)."""
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"cmfast_ext::{op}", device_type.upper())
    except RuntimeError:  # the operator does not exist
        return False
