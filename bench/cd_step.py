"""One consistency-distillation training step: images/s and peak memory, random weights and data.

The step of Algorithm 2 as `cmfast distill` runs it: the teacher's Heun step (two evaluations, no gradients), the
target's evaluation, the online forward and backward, RAdam, the EMA updates of the target and one EMA. Variants:
  eager-amp           bf16 autocast (fp32 on a CPU), eager PyTorch
  compile             the same with the three backbones (teacher, target, online) under torch.compile
  cmfast-fused-eager  cmfast's fused ops as `cmfast distill --fused` runs them: set_fused_ops, the teacher's Heun
                      step through cmfast.ops.heun_step, skip/out through cmfast.ops.skip_out; no graph
  cmfast              the same with the whole step captured as one CUDA graph (cmfast.training.graph_step), as
                      `cmfast distill --fused --graph` runs it (CUDA only)
Shapes: DDPM++ (CIFAR-10) at batch 512 and ADM-64 at batch 64 (GPU); the digits network at batch 32 on a CPU; dropout 0,
as the paper's CD students.
Distances: l2 and LPIPS (VGG, random backbone: its speed does not depend on the weights).
Each row is the median of 5 timings (each a median over repeated steps), with their minimum and maximum.
Each figure also as TFLOP/s and % of the device's measured bf16 matrix throughput: the step's FLOPs are counted by
torch.utils.flop_counter on one eager step.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import time
from types import SimpleNamespace

import torch

import cmfast
from cmfast import ops
from cmfast.generate import image_shape
from cmfast.networks import NETWORK_PRESETS, set_fused_ops
from cmfast.training.distances import get_distance
from cmfast.training.graph_step import CapturedCDStep
from cmfast.training.losses import CDLoss
from cmfast.training.trainer import Trainer

from .common import add_rates, failure, peak_tflops, repeated_ms, select_models

GPU_CASES = [("ddpmpp-cifar10", 512, 0), ("adm-imagenet64", 64, 1000)]  # preset, batch, classes
CPU_CASES = [("ddpmpp-digits8", 32, 0)]
SUMMARY_COLUMNS = [
    "model", "batch", "distance", "variant", "ms", "ms_min", "ms_max", "images_s", "peak_mem_gib", "pct_peak", "x_eager"
]  # fmt: skip


class _Step(SimpleNamespace):
    """What CapturedCDStep reads from a Trainer, without a dataset or a run directory."""

    _update_averages = Trainer._update_averages


def _make_step(preset, batch, n_classes, distance, device, fused: bool, compiled: bool, graph: bool, mode: str):
    torch.manual_seed(0)
    # dropout 0, as the paper's CD students (REFERENCE.md); the captured step also refuses dropout
    net = cmfast.build_network(dataclasses.replace(NETWORK_PRESETS[preset], dropout=0.0))
    teacher = cmfast.EDMDenoiser(copy.deepcopy(net)).to(device).eval().requires_grad_(False)
    online = cmfast.ConsistencyModel(net).to(device).train()
    target = copy.deepcopy(online).requires_grad_(False)
    ema = copy.deepcopy(online).eval().requires_grad_(False)
    for m in (teacher, online, target):
        m.autocast_dtype = torch.bfloat16 if device == "cuda" else None
        if fused:
            set_fused_ops(m.net)
        if compiled:
            m.net = torch.compile(m.net, mode=mode, dynamic=False)
    for m in (online, target):
        m.skip_out_op = ops.skip_out if fused else None
    dist = get_distance("lpips", pretrained_backbone=False) if distance == "lpips" else "l2"
    loss_fn = CDLoss(teacher, target, num_scales=18, solver="heun", distance=dist, mu=0.95, fused=fused)
    optimizer = torch.optim.RAdam(online.parameters(), lr=1e-5, capturable=graph)
    cfg = SimpleNamespace(kind="cd", mixed_precision="bf16")
    t = _Step(
        cfg=cfg,
        device=torch.device(device),
        dist=SimpleNamespace(world=1),
        net_config=net.config,
        loss_fn=loss_fn,
        model=online,
        online=online,
        target=target,
        emas={0.999: ema},
        optimizer=optimizer,
        step=0,
        sharded=False,
    )
    shape = (batch, *image_shape(online))
    g = torch.Generator(device).manual_seed(1)
    images = torch.rand(shape, device=device, generator=g) * 2 - 1
    labels = torch.randint(n_classes, (batch,), device=device, generator=g) if n_classes else None
    z, j = loss_fn.draw(images, g)
    if graph:
        captured = CapturedCDStep(t, images, labels, z, j)
        return lambda: captured(images, labels, z, j)

    def eager():
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn.loss_from_draws(online, images, labels, z, j).mean()
        loss.backward()
        optimizer.step()
        t._update_averages(0)
        return loss

    return eager


def _step_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def run(
    quick: bool = False,
    compile: bool | None = None,
    log=print,
    compile_mode: str = "max-autotune",
    budget_s: float = 1e9,
    models: list[str] | None = None,
    variants: list[str] | None = None,
) -> tuple[list[dict], dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wanted_variants = variants
    by_preset = {case[0]: case for case in (GPU_CASES if device == "cuda" else CPU_CASES)}
    cases = list(select_models(by_preset, models).values())
    compile = device == "cuda" if compile is None else compile
    distances = ("l2",) if quick or device == "cpu" else ("l2", "lpips")
    deadline = time.monotonic() + budget_s
    peak = peak_tflops(device)
    rows = []
    for preset, batch, n_classes in cases:
        for distance in distances:
            # torch.compile (minutes of compiling three backbones and a backward) last, so a cut-off run keeps the rest
            variants = {
                "eager-amp": dict(fused=False, compiled=False, graph=False),
                "cmfast-fused-eager": dict(fused=True, compiled=False, graph=False),
            }
            if device == "cuda":
                variants["cmfast"] = dict(fused=True, compiled=False, graph=True)
            if compile:
                variants["compile"] = dict(fused=False, compiled=True, graph=False)
            variants = select_models(variants, wanted_variants, "--variants")
            flops = None
            for name, how in variants.items():
                row = dict(model=preset, batch=batch, distance=distance, variant=name)
                if time.monotonic() > deadline:
                    rows.append({**row, "skipped": "the suite's time budget ran out"})
                    continue
                try:
                    # FLOPs are counted on an eager step (FlopCounterMode sees nothing inside compiled code or a
                    # graph replay): eager-amp's own, or a plain one built for it when eager-amp is not asked for
                    if flops is None and name != "eager-amp":
                        plain = dict(fused=False, compiled=False, graph=False)
                        flops = _step_flops(_make_step(preset, batch, n_classes, distance, device, mode="", **plain))
                    gc.collect()
                    if device == "cuda":
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    step = _make_step(preset, batch, n_classes, distance, device, mode=compile_mode, **how)
                    if flops is None:
                        flops = _step_flops(step)
                    timing = repeated_ms(step, device, repeats=5, rep_ms=300)
                except Exception as e:  # noqa: BLE001 (an OOM or a capture failure is a result to report)
                    rows.append({**row, "skipped": failure(e)})
                    log(f"{preset} {distance} {name}: {rows[-1]['skipped']}")
                    continue
                ms = timing["ms"]
                row.update(ms_min=timing["ms_min"], ms_max=timing["ms_max"], repeats=timing["repeats"])
                add_rates(row, ms, batch, flops, peak)
                if device == "cuda":
                    row["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
                rows.append(row)
                log(
                    f"{preset:16s} b={batch:<4d} {distance:6s} {name:18s} {ms:9.2f} ms "
                    f"[{row['ms_min']:.2f}, {row['ms_max']:.2f}]  {row['images_s']:8.1f} img/s  "
                    f"{row.get('peak_mem_gib', 0):6.1f} GiB  {row['pct_peak']:5.1f}% of peak"
                )
                del step
    return rows, {"tflops": peak}


def summary(rows: list[dict]) -> list[dict]:
    by = {(r["model"], r["distance"], r["variant"]): r for r in rows if "ms" in r}
    out = []
    for (model, distance, _variant), r in by.items():
        line = {k: r.get(k) for k in SUMMARY_COLUMNS}
        base = by.get((model, distance, "eager-amp"))
        line["x_eager"] = base["ms"] / r["ms"] if base else None
        out.append(line)
    return out
