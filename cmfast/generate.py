"""Batch generation with per-sample seeds, and the one place that plans a sampling run.

`sampling_plan` decides, once per command, whether a model samples as a teacher (EDM's Heun sampler) or as a
consistency model (Algorithm 1), which time points it runs, whether the inference engine (`cmfast.engine`) runs the
network (by default on CUDA) and whether a CUDA graph can replay it; `sample`, `eval`,
`tune-steps` and `edit` all take its answer. `generate` then runs a plan over batches: image i of a run with seed S
draws its noise (and its class label, when the model is class-conditional and no label is given) from its own
generator seeded S + i, so it is the same image whatever the batch size.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from . import engine as engine_lib
from .graphs import graph_unavailable_reason, graphed_sampler
from .io import to_uint8
from .preconditioning import ConsistencyModel, EDMDenoiser, TrigFlowModel
from .sampling import (
    RHO,
    consistency_steps,
    evaluation_sigmas,
    generators_from_seeds,
    heun_evaluations,
    heun_sample,
    multistep_sigmas,
    noise_from,
    randint,
    randn,
    sigmas_from_ts,
)
from .trigflow import T_MID, sigma_from_t_float

DEFAULT_HEUN_STEPS = 18  # EDM's CIFAR-10 setting: 35 network evaluations
DEFAULT_GRID = 40  # the official grid that `ts` indexes
MAX_STEPS = 1000  # more steps than any sampler here profits from; a larger count is a typo that would run for days
MIN_TEACHER_STEPS = 8  # fewer Heun steps leave a teacher's samples visibly blurred (EDM, Fig. 2)


@dataclass(frozen=True)
class SamplingPlan:
    """How a model samples, decided once by `sampling_plan`.

    A teacher runs EDM's Heun sampler for `heun_steps` steps; a consistency model runs Algorithm 1 at
    `evaluation_sigmas`. `sigmas` are the time points as the user gave or resolved them (a final sigma_min only marks
    the end), `graph` whether a CUDA graph replays the sampler, and `graph_refused` why a requested graph cannot run;
    `engine` whether `generate` runs the network through `cmfast.engine.prepare`, `engine_refused` why not where it
    was asked for or would have been the default.
    """

    teacher: bool
    sigmas: tuple[float, ...] | None = None
    evaluation_sigmas: tuple[float, ...] | None = None
    heun_steps: int | None = None
    graph: bool = False
    graph_refused: str = ""
    ts: tuple[int, ...] | None = None
    grid: int | None = None
    engine: bool = False
    engine_refused: str = ""

    @property
    def warning(self) -> str:
        """A one-line warning when the plan will give poor samples, else ""."""
        if self.teacher and self.heun_steps < MIN_TEACHER_STEPS:
            return (
                f"{self.heun_steps} Heun step(s) of an EDM teacher give blurred samples; "
                f"use --steps {MIN_TEACHER_STEPS} or more (default {DEFAULT_HEUN_STEPS})"
            )
        return ""

    @property
    def evaluations(self) -> int:
        """Network evaluations per image."""
        return heun_evaluations(self.heun_steps) if self.teacher else len(self.evaluation_sigmas)

    def record(self) -> dict:
        """What a run's JSON says about its sampler."""
        if self.teacher:
            return {
                "sampler": "edm_heun",
                "heun_steps": self.heun_steps,
                "evaluations": self.evaluations,
                "engine": self.engine,
            }
        record = {
            "sampler": "multistep",
            "sigmas": list(self.sigmas),
            "evaluations": self.evaluations,
            "engine": self.engine,
        }
        if self.ts is not None:
            record.update(ts=list(self.ts), grid=self.grid)
        return record


def sampling_plan(
    model: ConsistencyModel | EDMDenoiser,
    steps: int | None = None,
    sigmas: Sequence[float] | None = None,
    ts: Sequence[int] | None = None,
    grid: int = DEFAULT_GRID,
    graph: bool = False,
    default_sigmas: Sequence[float] | None = None,
    teacher_error: str | None = None,
    engine: bool | None = None,
) -> SamplingPlan:
    """Decide teacher or student, the time points and graph use for `model`, or raise a one-line ValueError.

    A consistency model takes at most one of `steps` (evaluations at the Karras grid of steps + 1 points), `sigmas`
    (explicit descending time points) or `ts` (official indices into the Karras grid of `grid` points); with none,
    `default_sigmas`, else one step at sigma_max. A TrigFlow (sCM) model's two steps are the paper's: sigma_max, then
    t_mid = 1.1 (sigma = sigma_d tan 1.1); other step counts use the Karras grid. An EDM teacher takes only `steps`,
    its Heun steps (default 18).
    teacher_error: refuse teachers with this one-line message (commands that need a consistency model).
    graph=True asks for CUDA-graph replay; where it cannot run, the plan says why in `graph_refused`.
    engine: None runs the network through the inference engine on CUDA where it can lower the network; True asks
    for it on any device; False keeps the model's own forward.
    """
    if sum(v is not None for v in (steps, sigmas, ts)) > 1:
        raise ValueError("give one of steps, sigmas or ts")
    if steps is not None and (int(steps) != steps or steps < 1):
        raise ValueError(f"--steps must be a positive integer, got {steps}")
    if steps is not None and steps > MAX_STEPS:
        raise ValueError(f"--steps must be at most {MAX_STEPS}, got {steps}")
    if isinstance(model, EDMDenoiser):
        if teacher_error:
            raise ValueError(teacher_error)
        if sigmas is not None or ts is not None:
            raise ValueError("an EDM teacher samples with Heun steps: use --steps, not --sigmas/--ts")
        refused = "teachers sample with EDM's Heun sampler, which is not captured" if graph else ""
        use, why = _engine_choice(model, engine)
        return SamplingPlan(
            True,
            heun_steps=DEFAULT_HEUN_STEPS if steps is None else int(steps),
            graph_refused=refused,
            engine=use,
            engine_refused=why,
        )
    # a model read from a diffusers pipeline keeps its scheduler's Karras rho (RHO = 7 otherwise)
    kw = dict(sigma_min=model.sigma_min, sigma_max=model.sigma_max, rho=_rho(model))
    if sigmas is not None:
        chosen = [float(s) for s in sigmas]
    elif ts is not None:
        chosen = sigmas_from_ts(ts, grid, **kw).tolist()
    elif steps is None and default_sigmas is not None:
        chosen = [float(s) for s in default_sigmas]
    elif isinstance(model, TrigFlowModel) and steps == 2:
        chosen = [model.sigma_max, sigma_from_t_float(T_MID, model.sigma_data)]
    else:
        chosen = multistep_sigmas(1 if steps is None else steps, **kw).tolist()
    evaluated = evaluation_sigmas(chosen, model.sigma_min, model.sigma_max)
    refused = graph_unavailable_reason(model) if graph else ""
    if graph and not refused and isinstance(model, TrigFlowModel):
        refused = "the captured sampler re-noises above sigma_min; a TrigFlow model's boundary is sigma = 0"
    use_engine, engine_refused = _engine_choice(model, engine)
    return SamplingPlan(
        False,
        sigmas=tuple(chosen),
        evaluation_sigmas=tuple(evaluated),
        graph=graph and not refused,
        graph_refused=refused,
        ts=tuple(int(t) for t in ts) if ts is not None else None,
        grid=grid if ts is not None else None,
        engine=use_engine,
        engine_refused=engine_refused,
    )


def _rho(model) -> float:
    scheduler = getattr(model, "diffusers_scheduler", None)
    return float(scheduler.rho) if scheduler is not None else RHO


def _engine_choice(model, engine: bool | None) -> tuple[bool, str]:
    """(use the engine, why not) for a model and the caller's wish (None: on CUDA where it can lower the network)."""
    if engine is False:
        return False, ""
    if isinstance(model, engine_lib.EngineModel):
        return False, "the model is already an engine"
    if engine is None and next(model.parameters()).device.type != "cuda":
        return False, ""
    reason = engine_lib.unsupported(model)
    return not reason, reason


def prepared(model, plan: SamplingPlan):
    """The module that runs the plan's network evaluations: the engine built once from `model` (weights in the
    model's autocast dtype, else its weights' own dtype) when the plan says so, else the model itself."""
    if not plan.engine:
        return model
    resident = next(model.net.parameters()).dtype  # e.g. cmfast.load(..., dtype=torch.bfloat16)
    dtype = getattr(model, "autocast_dtype", None) or (resident if resident in engine_lib.ENGINE_DTYPES else None)
    return engine_lib.prepare(model, dtype=dtype or torch.float32)


@dataclass
class Generated:
    images: np.ndarray  # (N, H, W, C) uint8
    labels: np.ndarray | None  # (N,) int64 class labels, or None for unconditional models
    seconds: float  # wall time spent in the sampler (excludes model loading)
    first_batch_seconds: float = 0.0  # the part of `seconds` spent on the first batch, which pays for warm-up
    first_batch_size: int = 0  # images in the first batch

    def images_per_second(self) -> tuple[float, str]:
        """The sampling rate and what it covers: from the second batch on, so one-time set-up (oneDNN, cuDNN
        autotuning, CUDA graph capture) does not count; a single batch can only give the whole run's rate."""
        n, first = len(self.images), self.first_batch_size
        if first < n and self.seconds > self.first_batch_seconds:
            return (n - first) / (self.seconds - self.first_batch_seconds), "after the first batch"
        return n / self.seconds, "whole run, including warm-up"


def image_shape(model: ConsistencyModel | EDMDenoiser) -> tuple[int, int, int]:
    """(C, H, W) that the backbone takes."""
    cfg = model.net.config
    return cfg.in_channels, cfg.resolution, cfg.resolution


def num_classes(model: ConsistencyModel | EDMDenoiser) -> int:
    """The backbone's number of classes (0 = unconditional)."""
    return model.net.config.num_classes


def check_class_label(model: ConsistencyModel | EDMDenoiser, label: int | None) -> None:
    """A one-line ValueError unless `label` is None or a class of this model."""
    classes = num_classes(model)
    if label is not None and classes == 0:
        raise ValueError("this model is unconditional; drop --class-label")
    if label is not None and not 0 <= label < classes:
        raise ValueError(f"--class-label {label} out of range for a model with {classes} classes")


def run_plan(model, plan: SamplingPlan, noise, class_labels=None, generator=None):
    """One batch through the planned sampler: noise (B, C, H, W) standard normal, fresh noise from `generator`."""
    if plan.teacher:
        return heun_sample(model, noise, plan.heun_steps, class_labels=class_labels)
    sigmas = list(plan.evaluation_sigmas)
    draw = noise_from(generator)
    if plan.graph:
        zs = [draw(noise) for _ in sigmas[1:]]
        sampler = graphed_sampler(model, noise.shape, noise.dtype, sigmas, class_labels is not None)
        return sampler(noise, zs, class_labels)
    # re-noising to sigma needs std sqrt(sigma^2 - b^2) over the model's boundary b (sigma_min; 0 for TrigFlow)
    floor = getattr(model, "boundary", model.sigma_min)
    return consistency_steps(model, sigmas[0] * noise, sigmas, class_labels, draw, sigma_min=floor)


def generate(
    model: ConsistencyModel | EDMDenoiser,
    plan: SamplingPlan,
    num: int,
    batch: int,
    seed: int = 0,
    class_label: int | None = None,
    progress: bool = True,
) -> Generated:
    """Sample `num` images in batches of `batch` as `plan` says (see `sampling_plan`)."""
    if num < 1 or batch < 1:
        raise ValueError(f"--num and --batch must be positive, got num={num}, batch={batch}")
    check_class_label(model, class_label)
    n_classes = num_classes(model)
    device = next(model.parameters()).device
    model = prepared(model, plan)
    shape = image_shape(model)
    images, labels, seconds, first_seconds = [], [], 0.0, 0.0
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
            x = run_plan(model, plan, noise, y, gens)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds += time.perf_counter() - t0
        first_seconds = first_seconds or seconds
        check_finite(x, f"seeds {seeds.start}..{seeds.stop - 1}")
        images.append(to_uint8(x))
    first = min(batch, num)
    return Generated(np.concatenate(images), np.concatenate(labels) if labels else None, seconds, first_seconds, first)


def check_finite(x: torch.Tensor, what: str) -> None:
    """A one-line ValueError when generated images hold NaN or inf (they would be written as black images).
    what: which images, e.g. "seeds 0..15"."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(
            f"the model produced non-finite values (NaN or inf) for {what}; its weights or the time points are broken"
        )
