"""What a training step keeps for backward: the bytes of the tensors autograd saves, counted per storage.

Activation memory, the part of a step's peak that grows with the batch, is what autograd saves between the forward and
the backward. `saved_bytes` records every tensor saved (torch.autograd.graph.saved_tensors_hooks) and counts each
underlying storage once, so views of one buffer (a transpose, a reshape, an op that saves its own output) count once.
Parameters, and the copies of them that autocast makes (bf16 weights), are counted apart: they do not grow with the
batch. `consistency_step_saved_bytes` measures what autograd records in a consistency-distillation step: the online
model's forward and the distance (the teacher and the target run without gradients and save nothing).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import Tensor

from .distances import Distance, get_distance

# autograd nodes that only cast or reshape: a tensor reached from a parameter through these alone is a weight copy
_WEIGHT_VIEWS = {
    "ToCopyBackward0",
    "TBackward0",
    "TransposeBackward0",
    "PermuteBackward0",
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "AliasBackward0",
    "ExpandBackward0",
}


@dataclasses.dataclass
class SavedBytes:
    """Bytes saved for backward by one step of `batch` images, each storage counted once."""

    activations: int  # storages that are neither parameters nor casts or views of one
    weights: int  # parameters and their casts (autocast's bf16 copies): independent of the batch
    tensors: int  # saved tensors seen, views and repeats included
    storages: int  # distinct storages among them
    batch: int
    # activation bytes by the autograd node that produced the storage ("input": made without gradients)
    by_producer: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def per_image(self) -> float:
        """Activation bytes per image."""
        return self.activations / self.batch


def _parameter_of(t: Tensor, params: set[int]) -> bool:
    """t is one of the parameters (storage addresses `params`), or a cast or view of one and of nothing else."""
    fn = t.grad_fn
    while fn is not None and type(fn).__name__ in _WEIGHT_VIEWS:
        inputs = [f for f, _ in fn.next_functions if f is not None]
        if len(inputs) != 1:
            return False
        fn = inputs[0]
    if fn is None:
        return t.untyped_storage().data_ptr() in params
    variable = getattr(fn, "variable", None)  # AccumulateGrad: the leaf it accumulates into
    return variable is not None and variable.untyped_storage().data_ptr() in params


def saved_bytes(step: Callable[[], Tensor], batch: int, params=(), backward: bool = True) -> SavedBytes:
    """Run step() (it returns a scalar loss) with every tensor autograd saves recorded, then its backward.

    batch: the images the step ran on (for `per_image`); params: the parameters (and buffers) whose storages, and
    casts or views of them, count as weights. The saved tensors stay referenced until the count is done, so no
    storage is freed and its address reused by another (which would merge two storages into one).
    """
    param_ptrs = {p.untyped_storage().data_ptr() for p in params}
    kept: dict[int, list] = {}  # storage address -> [bytes, held by a parameter or its copy, producer]
    tensors = 0
    alive = []

    def pack(t: Tensor) -> Tensor:
        nonlocal tensors
        tensors += 1
        storage = t.untyped_storage()
        entry = kept.setdefault(storage.data_ptr(), [0, False, type(t.grad_fn).__name__ if t.grad_fn else "input"])
        entry[0] = max(entry[0], storage.nbytes())
        entry[1] = entry[1] or _parameter_of(t, param_ptrs)
        alive.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    if backward:
        loss.backward()
    by_producer: dict[str, int] = {}
    for size, weight, producer in kept.values():
        if not weight:
            by_producer[producer] = by_producer.get(producer, 0) + size
    weights = sum(size for size, weight, _ in kept.values() if weight)
    alive.clear()
    return SavedBytes(sum(by_producer.values()), weights, tensors, len(kept), batch, by_producer)


def consistency_step_saved_bytes(
    model: torch.nn.Module,
    images: Tensor,
    sigma: Tensor,
    labels: Tensor | None = None,
    distance: str | Distance = "l2",
    generator: torch.Generator | None = None,
    backward: bool = True,
) -> SavedBytes:
    """The saved bytes of a consistency step's recorded part: d(f(x + sigma z, sigma), target), and its backward.

    model: the online consistency function f(x, sigma, class_labels), an nn.Module in the train mode, autocast and
    fused ops the run sets; images: (B, C, H, W) in [-1, 1]; sigma: (B,) noise levels. The target (the target
    network's output in a real step) is computed without gradients, so its value does not change what autograd
    saves: the clean images stand in for it.
    """
    distance = get_distance(distance) if isinstance(distance, str) else distance
    z = torch.randn(images.shape, generator=generator, device=images.device, dtype=images.dtype)
    x = images + sigma.reshape(-1, 1, 1, 1).to(images.dtype) * z

    def step() -> Tensor:
        return distance(model(x, sigma, labels), images).mean()

    return saved_bytes(step, images.shape[0], [*model.parameters(), *model.buffers()], backward)
