"""Which backend runs an op call: the first of BACKENDS that can take the inputs, or the one asked for (argument, else
CMFAST_BACKEND), with a reason for every backend skipped.

A backend is skipped for its environment (extension not built, triton missing, the Triton interpreter off for CPU
tensors, a device the backend does not run on) or for the inputs (dtypes, sizes: each op's own reasons). "cuda", the
C++/CUDA extension backend's former name, is accepted for "ext" with a DeprecationWarning.
"""

from __future__ import annotations

import os
import warnings
from types import ModuleType
from typing import NamedTuple

from ..kernels import _common
from . import extension

BACKENDS = ("ext", "triton", "torch")
DEPRECATED_NAMES = {"cuda": "ext"}  # old name -> backend; accepted for one release
ENV_VAR = "CMFAST_BACKEND"


class BackendError(RuntimeError):
    """A backend was asked for (argument or CMFAST_BACKEND) and cannot take these inputs; the message says why."""


class Choice(NamedTuple):
    """The backend an op call runs on, and why each backend before it was skipped (backend -> reasons)."""

    backend: str
    skipped: dict[str, str]


def requested(backend: str | None) -> tuple[str | None, str]:
    """The backend asked for (None: choose automatically) and where it came from ("backend argument" or
    CMFAST_BACKEND, which counts only when the argument is None; "auto" or empty there keeps the automatic choice)."""
    source = "backend argument"
    if backend is None:
        backend, source = os.environ.get(ENV_VAR, "").strip().lower(), ENV_VAR
        if backend in ("", "auto"):
            return None, ""
    if backend in DEPRECATED_NAMES:
        new = DEPRECATED_NAMES[backend]
        # stacklevel 5: requested <- choose <- _prepare_<op> <- the public op <- its caller
        message = f'backend "{backend}" ({source}) is deprecated; use "{new}" (the C++/CUDA extension cmfast._C)'
        warnings.warn(message, DeprecationWarning, stacklevel=5)
        backend = new
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r} ({source}); expected one of {', '.join(BACKENDS)} or None")
    return backend, source


def triton_environment_reason(module: ModuleType, device_type: str) -> str:
    """Why the Triton kernels of `module` cannot run for tensors on `device_type` on this machine ("" if they can)."""
    if _common.triton is None:
        return "triton is not installed"
    if device_type == "cpu" and not _common.interpreted(module):
        if os.environ.get("TRITON_INTERPRET") == "1":
            return ("TRITON_INTERPRET=1 was set after triton was imported, so its kernels were compiled for GPUs "
                    "and cannot take CPU tensors; set it before importing triton or cmfast.ops")  # fmt: skip
        return "CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)"
    if device_type not in ("cpu", "cuda"):
        return f"Triton runs on CUDA tensors (or CPU ones under TRITON_INTERPRET=1), not on {device_type}"
    return ""


def environment_reason(backend: str, op: str, module: ModuleType, device_type: str) -> str:
    """Why `backend` cannot run `op` (kernels in `module`) on this machine for tensors on `device_type` ("" if it
    can)."""
    if backend == "ext":
        return extension.environment_reason(op, device_type)
    if backend == "triton":
        return triton_environment_reason(module, device_type)
    return ""


def triton_input_reasons(module: ModuleType, *args) -> list[str]:
    """The Triton kernels' own limits (dtypes, sizes) for these inputs, from the op file's `unsupported`."""
    return module.unsupported(*args) if _common.triton is not None else []


def choose(op: str, module: ModuleType, backend: str | None, device_type: str, input_reasons: dict) -> Choice:
    """The first backend in order (or the requested one) with no reasons against it. module: the op's kernel file;
    input_reasons: backend -> the reasons that depend on the inputs (dtypes, sizes)."""
    wanted, source = requested(backend)
    skipped = {}
    for name in (wanted,) if wanted else BACKENDS:
        env = environment_reason(name, op, module, device_type)
        reasons = ([env] if env else []) + input_reasons.get(name, [])
        if not reasons:
            return Choice(name, skipped)
        skipped[name] = "; ".join(reasons)
    raise BackendError(f"{op}: backend {wanted!r} (from the {source}) cannot take these inputs: {skipped[wanted]}")
