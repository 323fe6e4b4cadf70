"""Count the kernel-producing ops a call issues, at the dispatcher, on any device (the CPU included).

`count_kernels(fn)` runs fn under a TorchDispatchMode and counts every cmfast:: op (each is one fused kernel on a GPU),
every op that writes into one of its arguments (in-place and out= ops) and every other op whose output does not alias
an input (an op that writes memory, so launches work). Views,
reshapes that stay views, no-op casts (`.to` to the dtype a tensor already has), dtype queries and dropout in eval
mode return aliases and are not counted. A composite op such as scaled_dot_product_attention counts once, as the one
call a GPU backend makes of it; ops it runs inside are not seen. Models on the meta device can be counted without
computing anything (outputs are told apart from inputs by storage identity, not by address).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class KernelCounter(TorchDispatchMode):
    """`with KernelCounter() as c: ...` then `c.counts` (op name -> calls) and `c.total`."""

    def __init__(self):
        super().__init__()
        self.counts: Counter = Counter()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_storage(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        outputs = [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]
        writes = any(a.alias_info is not None and a.alias_info.is_write for a in func._schema.arguments)
        if func.namespace == "cmfast" or writes or any(_storage(t) not in inputs for t in outputs):
            self.counts[f"{func.namespace}::{func._schema.name.split('::')[-1]}"] += 1
        return out


def _storage(t: torch.Tensor) -> int:
    """The identity of t's storage (shared by its views); works on the meta device, where every data pointer is 0."""
    return t.untyped_storage()._cdata


def count_kernels(fn: Callable[[], object]) -> KernelCounter:
    """Run fn once (under inference mode) and return the counter."""
    with torch.inference_mode(), KernelCounter() as counter:
        fn()
    return counter
