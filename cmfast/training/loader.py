"""Which samples each process reads at each step, and the DataLoader that reads them.

The data order is a function of the step, not a state: global sample position p (step x global batch + offset) is
the dataset's image perm_e[p mod n] in epoch e = p // n, perm_e a permutation seeded by (seed, e). Each process takes
its slice of every global batch (DistributedSampler-style, by rank), and with gradient accumulation its slice is cut
into `accum` equal micro-batches, in order. So one batch of B or K micro-batches of B/K see the same samples with the
same per-sample randomness, and a resumed run reads on from its step exactly where the uninterrupted run was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Sampler


def sample_seed(seed: int, step: int, position: int) -> int:
    """Seed of the generator that draws one sample's randomness at one step (independent of how work is split)."""
    return hash((seed, step, position)) & (2**63 - 1)


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The permutation of n dataset indices that epoch `epoch` visits."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(sample_seed(seed, -1, epoch)))


@dataclass(frozen=True)
class BatchSplit:
    """How one optimizer step's global batch is divided: over `world` processes, then into `accum` micro-batches."""

    batch: int  # global batch: samples per optimizer step, all processes together
    world: int = 1
    rank: int = 0
    accum: int = 1  # micro-batches per optimizer step and process

    @property
    def local(self) -> int:
        return self.batch // self.world

    @property
    def micro(self) -> int:
        return self.local // self.accum

    def positions(self, step: int, micro: int = 0) -> range:
        """Global sample positions of micro-batch `micro` of this process at `step`."""
        start = step * self.batch + self.rank * self.local + micro * self.micro
        return range(start, start + self.micro)


class StepSampler(Sampler[list[int]]):
    """Dataset indices of this process's micro-batches for steps [start, end): `split.accum` lists per step."""

    def __init__(self, n: int, seed: int, split: BatchSplit, start: int, end: int):
        self.n, self.seed, self.split, self.start, self.end = n, seed, split, start, end
        self._epoch, self._order = None, None

    def __len__(self) -> int:
        return max(self.end - self.start, 0) * self.split.accum

    def indices(self, positions: range) -> list[int]:
        out = []
        for p in positions:
            epoch = p // self.n
            if epoch != self._epoch:
                self._epoch, self._order = epoch, epoch_order(self.n, self.seed, epoch)
            out.append(int(self._order[p % self.n]))
        return out

    def __iter__(self):
        for step in range(self.start, self.end):
            for micro in range(self.split.accum):
                yield self.indices(self.split.positions(step, micro))


def as_is(batch):
    """The DataLoader's collate function: datasets return whole batches (`__getitems__`), already stacked."""
    return batch


def make_loader(dataset, sampler: StepSampler, workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader over `sampler`'s micro-batches: `workers` processes read and decode ahead (0: in this process)."""
    return DataLoader(
        dataset,
        batch_sampler=sampler,
        collate_fn=as_is,
        num_workers=workers,
        pin_memory=pin_memory,
        prefetch_factor=4 if workers else None,
        persistent_workers=False,
        # the loader draws its workers' base seed from this generator, not torch's global RNG (whose state, for the
        # dropout masks, must be the same whether a run was resumed or not)
        generator=torch.Generator().manual_seed(sampler.seed),
    )


def default_workers(in_memory: bool) -> int:
    """Loader processes when none are asked for: none for an in-memory dataset (indexing a tensor needs no help),
    else this machine's cores shared among the processes torchrun starts on it, less one for the training process,
    at least 1 and at most 8."""
    if in_memory:
        return 0
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, min(8, (os.cpu_count() or 1) // local_world - 1))


def worker_error(err: Exception) -> str:
    """The original one-line message of an error a DataLoader worker raised (the loader re-raises it with the
    worker's traceback in the message)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    last = lines[-1] if lines else str(err)
    name = type(err).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last
