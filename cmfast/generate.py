"""Batch generation with per-sample seeds: what `cmfast sample` and `cmfast demo` run.

Image i of a run with seed S draws its noise (and its class label, when the model is class-conditional and no label
is given) from its own generator seeded S + i, so it is the same image whatever the batch size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from .graphs import GraphError, graph_sample, graph_unavailable_reason
from .io import to_uint8
from .preconditioning import ConsistencyModel, EDMDenoiser
from .sampling import evaluation_sigmas, generators_from_seeds, heun_sample, randint, randn, sample


@dataclass
class Generated:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray | None  # (N,) int64 class labels, or None for unconditional models
    seconds: float  # wall time spent in the sampler (excludes model loading)


def image_shape(model: ConsistencyModel | EDMDenoiser) -> tuple[int, int, int]:
    """(C, H, W) that the backbone takes."""
    cfg = model.net.config
    size = getattr(cfg, "img_resolution", None) or cfg.image_size
    return cfg.in_channels, size, size


def num_classes(model: ConsistencyModel | EDMDenoiser) -> int:
    cfg = model.net.config
    return getattr(cfg, "num_classes", 0) or getattr(cfg, "label_dim", 0)


def generate(
    model: ConsistencyModel | EDMDenoiser,
    num: int,
    batch: int,
    seed: int = 0,
    sigmas=None,
    heun_steps: int = 18,
    class_label: int | None = None,
    progress: bool = True,
    graph: bool = False,
) -> Generated:
    """Sample `num` images in batches of `batch`. A ConsistencyModel uses Algorithm 1 over `sigmas`; an EDMDenoiser
    (a teacher) uses EDM's Heun sampler with `heun_steps` steps. graph=True replays a CUDA graph per batch size
    (cmfast.graphs; consistency models on CUDA only), with the same images."""
    if num < 1 or batch < 1:
        raise ValueError(f"--num and --batch must be positive, got num={num}, batch={batch}")
    is_teacher = isinstance(model, EDMDenoiser)
    if graph and is_teacher:
        raise ValueError("graph=True applies to consistency models; teachers sample eagerly")
    if graph and (reason := graph_unavailable_reason(model)):
        raise GraphError(f"graph=True: {reason}")
    if not is_teacher:
        if sigmas is None:
            raise ValueError("a consistency model needs its time points (sigmas)")
        evaluation_sigmas(sigmas, model.sigma_min, model.sigma_max)  # fail before the progress bar starts
    n_classes = num_classes(model)
    if class_label is not None and n_classes == 0:
        raise ValueError("this model is unconditional; drop --class-label")
    if class_label is not None and not 0 <= class_label < n_classes:
        raise ValueError(f"class label {class_label} out of range for a model with {n_classes} classes")
    device = next(model.parameters()).device
    shape = image_shape(model)
    images, labels, seconds = [], [], 0.0
    for start in tqdm(range(0, num, batch), desc="sampling", unit="batch", disable=not progress):
        seeds = range(seed + start, seed + min(start + batch, num))
        gens = generators_from_seeds(seeds)
        noise = randn((len(gens), *shape), gens, device=device)
        y = None
        if n_classes:
            y = (
                torch.full((len(gens),), class_label, device=device)
                if class_label is not None
                else randint(n_classes, len(gens), gens, device=device)
            )
            labels.append(y.cpu().numpy())
        t0 = time.perf_counter()
        with torch.inference_mode():
            if is_teacher:
                x = heun_sample(model, noise, heun_steps, class_labels=y)
            elif graph:
                x = graph_sample(model, noise, sigmas, class_labels=y, generator=gens)
            else:
                x = sample(model, noise, sigmas, class_labels=y, generator=gens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        images.append(to_uint8(x))
    return Generated(np.concatenate(images), np.concatenate(labels) if labels else None, seconds)
