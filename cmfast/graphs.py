"""CUDA-graph-captured sampling: Algorithm 1 for a fixed batch size, dtype and sigma list, captured once and
replayed, so a one-step batch costs one graph launch instead of hundreds of kernel launches from Python.

The captured region reads static buffers: the starting noise, the fresh noise of every later step, the class labels.
`graph_sample` fills them from the same random draws as `cmfast.sample` (the same generators in the same order), so
its output equals the eager sampler's for the same noise. Graphs are cached per model and per (batch, shape, dtype,
sigmas, labels or not, clamp); weights updated in place (load_state_dict, an optimizer) are seen by later replays,
while a model moved to another device or dtype needs `clear_graphs(model)`.
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import Tensor

from .sampling import SIGMA_MIN, Denoiser, Generators, consistency_steps, evaluation_sigmas, noise_given, randn

_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: GraphedSampler}


class GraphError(RuntimeError):
    """The graph sampler cannot run here (no CUDA, a CPU model); the message says why and what to do instead."""


def graph_unavailable_reason(model: torch.nn.Module | None = None) -> str:
    """Why a CUDA graph cannot be captured for this model on this machine ("" when it can)."""
    if not torch.cuda.is_available():
        return "CUDA graphs need a CUDA device and this machine has none"
    if model is not None:
        params = list(model.parameters())
        if params and params[0].device.type != "cuda":
            return f"the model is on {params[0].device}; move it to a CUDA device first"
    return ""


class GraphedSampler:
    """Algorithm 1 over fixed sigmas for noise of one shape and dtype, as one CUDA graph.

    sampler(noise, zs, labels) copies the inputs into the graph's static buffers, replays, and returns a fresh tensor
    (the static output is overwritten by the next replay). zs: the fresh noise of steps 2, 3, ... (len(sigmas) - 1
    tensors of noise's shape). The first call after construction captured the graph; `warmup` eager runs on a side
    stream before that let cuBLAS, Triton and autocast settle their workspaces and kernels.
    """

    def __init__(self, f: Denoiser, shape, dtype, device, sigmas: list[float], with_labels: bool, clamp: bool = True,
                 sigma_min: float = SIGMA_MIN, warmup: int = 2):  # fmt: skip
        self.sigmas, self.clamp, self.eps = list(sigmas), clamp, float(sigma_min)
        self.noise = torch.zeros(shape, dtype=dtype, device=device)
        self.zs = [torch.zeros(shape, dtype=dtype, device=device) for _ in self.sigmas[1:]]
        self.labels = torch.zeros(shape[0], dtype=torch.long, device=device) if with_labels else None
        # random stand-ins while warming up and capturing, so no kernel is picked for all-zero inputs
        g = torch.Generator(device).manual_seed(0)
        for t in (self.noise, *self.zs):
            t.normal_(generator=g)

        def body():  # Algorithm 1's one body (cmfast.sampling), reading the static buffers
            x = self.sigmas[0] * self.noise
            return consistency_steps(f, x, self.sigmas, self.labels, noise_given(self.zs), self.clamp, self.eps)

        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):
                body()
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.out = body()

    def __call__(self, noise: Tensor, zs: Sequence[Tensor] = (), labels: Tensor | None = None) -> Tensor:
        if noise.shape != self.noise.shape:
            raise ValueError(f"this graph was captured for noise of shape {tuple(self.noise.shape)}, got "
                             f"{tuple(noise.shape)}")  # fmt: skip
        if len(zs) != len(self.zs):
            raise ValueError(
                f"expected {len(self.zs)} fresh-noise tensors (one per step after the first), got {len(zs)}"
            )
        if (labels is None) != (self.labels is None):
            raise ValueError("class labels were " + ("not " if labels is None else "") + "expected by this graph")
        self.noise.copy_(noise)
        for buf, z in zip(self.zs, zs):
            buf.copy_(z)
        if labels is not None:
            self.labels.copy_(labels)
        self.graph.replay()
        return self.out.clone()


def graphed_sampler(f: torch.nn.Module, shape, dtype, sigmas: list[float], with_labels: bool, clamp: bool = True):
    """The cached GraphedSampler for this model and key, captured on first use."""
    reason = graph_unavailable_reason(f)
    if reason:
        raise GraphError(reason)
    eps = float(getattr(f, "sigma_min", SIGMA_MIN))
    key = (tuple(shape), dtype, tuple(sigmas), with_labels, clamp, getattr(f, "autocast_dtype", None))
    graphs = _CACHE.setdefault(f, {})
    if key not in graphs:
        device = next(f.parameters()).device
        graphs[key] = GraphedSampler(f, shape, dtype, device, sigmas, with_labels, clamp, eps)
    return graphs[key]


def clear_graphs(model: torch.nn.Module) -> None:
    """Drop the model's captured graphs (and the memory their pools hold)."""
    _CACHE.pop(model, None)


def graph_sample(
    f: torch.nn.Module,
    noise: Tensor,
    sigmas: Sequence[float] | Tensor,
    class_labels: Tensor | None = None,
    generator: Generators = None,
    clamp: bool = True,
) -> Tensor:
    """`cmfast.sample` through a cached CUDA graph: same arguments, same random draws, same output. f must be a
    module on a CUDA device (a ConsistencyModel); the first call for a new batch size / sigmas captures a graph."""
    eps = float(getattr(f, "sigma_min", SIGMA_MIN))
    sigmas = evaluation_sigmas(sigmas, eps, getattr(f, "sigma_max", None))
    sampler = graphed_sampler(f, noise.shape, noise.dtype, sigmas, class_labels is not None, clamp)
    zs = [randn(noise.shape, generator, device=noise.device, dtype=noise.dtype) for _ in sigmas[1:]]
    return sampler(noise, zs, class_labels)
