"""One consistency-distillation training step: images/s and peak memory, random weights and data.

The step of Algorithm 2 as `cmfast distill` runs it: the teacher's Heun step (two evaluations, no gradients), the
target's evaluation, the online forward and backward, RAdam, the EMA updates of the target and one EMA. Every row runs
in the same process on the same device, with cudnn.benchmark on. Baselines at their best, as a user would run them:
  eager-amp-nchw        eager PyTorch under the AMP dtype (bf16 autocast on CUDA; float32 on a CPU, see below), NCHW
  eager-amp-cl          the same in channels_last (models, LPIPS network and inputs); the faster of the two is the
                        eager baseline
  eager-bf16-nchw       CPU only, l2 only: bf16 autocast on the CPU, the check of the CPU's precision choice; it is
                        the eager baseline if it is the fastest eager row
  compile-default       the three backbones (teacher, target, online) under torch.compile(mode="default"), static
                        shapes, in the eager baseline's memory format
  compile-max-autotune  the same with mode="max-autotune"; the faster compile row is the compile baseline
In every eager and compiled baseline attention goes through SDPA on unit-stride q/k/v: ADM's own attention does
(cmfast.networks.adm), and DDPM++'s attention, an fp32 einsum in cmfast.networks.song_unet, is swapped for SDPA inside
the bench while those rows run (bench.sampling.sdpa_attention).
cmfast:
  cmfast-fused-eager    cmfast's fused ops as `cmfast distill --fused` runs them: set_fused_ops, the teacher's Heun
                        step through cmfast.ops.heun_step, skip/out through cmfast.ops.skip_out; NCHW, no graph; the
                        networks' own attention (DDPM++: the einsum; ADM: the fused op where a kernel runs, else SDPA)
  cmfast                the same with the whole step captured as one CUDA graph (cmfast.training.graph_step), as
                        `cmfast distill --fused --graph` runs it; on a CPU the row is listed as not run
Shapes: DDPM++ (CIFAR-10) at batch 512 and ADM-64 at batch 64 on a GPU; on a CPU the digits network at batch 32 with
l2 and at batch 4 with LPIPS (LPIPS upsamples each image to 224x224 for its VGG: a batch-32 step takes tens of seconds
on two cores). Dropout 0, as the paper's CD students.
Distances: l2 and LPIPS (VGG with a random backbone: its cost is the same as with the real weights).
Precision on a CPU: float32 for the eager-amp, compile and cmfast rows, because the CPU has no autocast speed-up to
offer at these sizes (eager-bf16-nchw measures it); LPIPS runs in float32 everywhere, as in `cmfast distill`.
Each row: the median of 5 timings (each a median over repeated steps; one step per timing for CPU LPIPS rows), their
minimum and maximum, images/s, TFLOP/s and % of the device's measured matrix throughput (FLOPs counted by
torch.utils.flop_counter on one eager step), and the step's peak memory: bytes allocated during one step above those
allocated before it (bench.common.step_peak_bytes: torch.cuda.max_memory_allocated on CUDA, torch.profiler's memory
events on a CPU), and on CUDA also max_memory_allocated over the row (weights, optimizer state and all).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import time
from types import SimpleNamespace

import torch

import cmfast
from cmfast import ops
from cmfast.generate import image_shape
from cmfast.networks import NETWORK_PRESETS, SongUNetConfig, set_fused_ops
from cmfast.training.distances import get_distance
from cmfast.training.graph_step import CapturedCDStep
from cmfast.training.losses import CDLoss
from cmfast.training.trainer import Trainer

from .common import add_rates, failure, fresh_device, peak_tflops, select_models, time_step
from .sampling import sdpa_attention

GPU_CASES = [("ddpmpp-cifar10", 512, 0), ("adm-imagenet64", 64, 1000)]  # preset, batch, classes
CPU_CASES = [("ddpmpp-digits8", 32, 0)]
CPU_LPIPS_BATCH = 4
SUMMARY_COLUMNS = [
    "model", "batch", "distance", "variant", "dtype", "format", "attention", "ms", "ms_min", "ms_max", "images_s",
    "step_peak_mib", "peak_mem_gib", "x_eager", "x_compile", "baseline", "load_1m", "note",
]  # fmt: skip
LPIPS_NOTE = "random VGG backbone: same cost as the real weights"


@dataclasses.dataclass(frozen=True)
class Variant:
    """How one row runs the step."""

    dtype: torch.dtype | None = None  # the backbones' autocast dtype; None: float32
    channels_last: bool = False  # models, LPIPS network and inputs in channels_last
    compile_mode: str | None = None  # torch.compile mode of the three backbones; None: eager
    fused: bool = False  # cmfast's fused ops, Heun step and skip/out (`cmfast distill --fused`)
    graph: bool = False  # the whole step as one CUDA graph (`--graph`)
    sdpa: bool = True  # DDPM++'s attention swapped for SDPA on unit-stride q/k/v (the baselines)
    group: str | None = None  # "eager" or "compile": the baseline group this row competes in


def suite_variants(
    device: str, distance: str, compile: bool, compile_mode: str | None, best_eager: Variant | None
) -> dict[str, Variant]:
    """The suite's rows for one device and distance, in the order they run (torch.compile last: a cut-off run keeps
    the rest). best_eager: the eager baseline measured so far, whose memory format the compile rows take."""
    amp = torch.bfloat16 if device == "cuda" else None
    out = {
        "eager-amp-nchw": Variant(dtype=amp, group="eager"),
        "eager-amp-cl": Variant(dtype=amp, channels_last=True, group="eager"),
    }
    if device == "cpu" and distance == "l2":
        out["eager-bf16-nchw"] = Variant(dtype=torch.bfloat16, group="eager")
    out["cmfast-fused-eager"] = Variant(dtype=amp, fused=True, sdpa=False)
    out["cmfast"] = Variant(dtype=amp, fused=True, graph=True, sdpa=False)
    if compile:
        channels_last = best_eager.channels_last if best_eager is not None else device == "cuda"
        for mode in [compile_mode] if compile_mode else ["default", "max-autotune"]:
            out[f"compile-{mode}"] = Variant(dtype=amp, channels_last=channels_last, compile_mode=mode, group="compile")
    return out


class _Step(SimpleNamespace):
    """What CapturedCDStep reads from a Trainer, without a dataset or a run directory."""

    _update_averages = Trainer._update_averages


def _make_step(preset: str, batch: int, n_classes: int, distance: str, device: str, v: Variant):
    torch.manual_seed(0)
    # dropout 0, as the paper's CD students (REFERENCE.md); the captured step also refuses dropout
    net = cmfast.build_network(dataclasses.replace(NETWORK_PRESETS[preset], dropout=0.0))
    teacher = cmfast.EDMDenoiser(copy.deepcopy(net)).to(device).eval().requires_grad_(False)
    online = cmfast.ConsistencyModel(net).to(device).train()
    target = copy.deepcopy(online).requires_grad_(False)
    ema = copy.deepcopy(online).eval().requires_grad_(False)
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    dist = get_distance("lpips", pretrained_backbone=False) if distance == "lpips" else "l2"
    if distance == "lpips":
        dist.to(device=device, memory_format=fmt)
    for m in (teacher, online, target, ema):
        m.to(memory_format=fmt)
    for m in (teacher, online, target):
        m.autocast_dtype = v.dtype
        if v.fused:
            set_fused_ops(m.net)
        if v.compile_mode:
            m.net = torch.compile(m.net, mode=v.compile_mode, dynamic=False)
    for m in (online, target):
        m.skip_out_op = ops.skip_out if v.fused else None
    loss_fn = CDLoss(teacher, target, num_scales=18, solver="heun", distance=dist, mu=0.95, fused=v.fused)
    optimizer = torch.optim.RAdam(online.parameters(), lr=1e-5, capturable=v.graph)
    precision = "bf16" if v.dtype == torch.bfloat16 else "no"
    cfg = SimpleNamespace(kind="cd", mixed_precision=precision, ema_warmup=False)  # TrainConfig's default
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
    images = (torch.rand(shape, device=device, generator=g) * 2 - 1).contiguous(memory_format=fmt)
    labels = torch.randint(n_classes, (batch,), device=device, generator=g) if n_classes else None
    z, j = loss_fn.draw(images, g)
    z = z.contiguous(memory_format=fmt)
    if v.graph:
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


def _attention(preset: str, v: Variant) -> str:
    if not isinstance(NETWORK_PRESETS[preset], SongUNetConfig):
        return "adm fused op / sdpa" if v.fused else "sdpa (adm's own)"
    return "sdpa (swapped in)" if v.sdpa else "einsum fp32 (the network's own)"


def _row_note(device: str, distance: str, batch: int) -> str | None:
    if distance != "lpips":
        return None
    return LPIPS_NOTE + (f"; batch {batch} on a CPU, each timing one step" if device == "cpu" else "")


def run(
    quick: bool = False,
    compile: bool | None = None,
    log=print,
    compile_mode: str | None = None,
    budget_s: float = 1e9,
    models: list[str] | None = None,
    variants: list[str] | None = None,
) -> tuple[list[dict], dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    everything = {
        **suite_variants(device, "l2", True, compile_mode, None),
        **suite_variants(device, "lpips", True, compile_mode, None),
    }
    wanted = set(select_models(everything, variants, "--variants"))
    by_preset = {case[0]: case for case in (GPU_CASES if device == "cuda" else CPU_CASES)}
    cases = list(select_models(by_preset, models).values())
    compile = device == "cuda" if compile is None else compile
    distances = ("l2",) if quick else ("l2", "lpips")
    deadline = time.monotonic() + budget_s
    peak = peak_tflops(device)
    rows = []
    # every eager and cmfast row of every case first, torch.compile's (minutes of compiling each) last: a run cut by
    # its budget keeps the rest
    state = {}  # (preset, distance) -> [flops, best eager Variant, its ms]
    for compiled_phase in (False, True):
        for preset, l2_batch, n_classes in cases:
            for distance in distances:
                batch = CPU_LPIPS_BATCH if device == "cpu" and distance == "lpips" else l2_batch
                s = state.setdefault((preset, distance), [None, None, float("inf")])
                for name, v in suite_variants(device, distance, compile, compile_mode, s[1]).items():
                    if name in wanted and bool(v.compile_mode) == compiled_phase:
                        row = _row(preset, batch, n_classes, distance, device, name, v, s, deadline, peak)
                        rows.append(row)
                        log(_line(row))
    return rows, {"tflops": peak}


def _row(preset, batch, n_classes, distance, device, name, v: Variant, s: list, deadline: float, peak: float) -> dict:
    """One measured row, or one with the reason it was not measured; s: [flops, best eager Variant, its ms] of this
    case and distance, updated."""
    row = dict(model=preset, batch=batch, distance=distance, variant=name, note=_row_note(device, distance, batch))
    row.update(
        dtype="bf16" if v.dtype == torch.bfloat16 else "fp32",
        format="channels_last" if v.channels_last else "nchw",
        attention=_attention(preset, v),
        group=v.group,
    )
    if v.graph and device != "cuda":
        return {**row, "skipped": "not run: a CUDA graph needs a CUDA device"}
    if time.monotonic() > deadline:
        return {**row, "skipped": "the suite's time budget ran out"}
    row["load_1m"] = os.getloadavg()[0]
    slow = device == "cpu" and distance == "lpips"  # seconds per step: one call per timing
    try:
        with sdpa_attention() if v.sdpa else contextlib.nullcontext():
            ms = _measure(preset, batch, n_classes, distance, device, v, row, slow)
            if s[0] is None:  # on an eager step: FlopCounterMode sees nothing inside compiled code
                plain = dataclasses.replace(v, compile_mode=None, graph=False)
                s[0] = _step_flops(_make_step(preset, batch, n_classes, distance, device, plain))
    except Exception as e:  # noqa: BLE001 (an OOM, a compile or capture failure is a result to report)
        return {**row, "skipped": failure(e)}
    add_rates(row, ms, batch, s[0], peak)
    row["load_1m_after"] = os.getloadavg()[0]
    if v.group == "eager" and ms < s[2]:
        s[1], s[2] = v, ms
    return row


def _line(row: dict) -> str:
    head = f"{row['model']:16s} b={row['batch']:<4d} {row['distance']:6s} {row['variant']:21s}"
    if "skipped" in row:
        return f"{head} {row['skipped']}"
    return (
        f"{head} {row['ms']:9.2f} ms [{row['ms_min']:.2f}, {row['ms_max']:.2f}]  {row['images_s']:8.1f} img/s  "
        f"step peak {row['step_peak_mib']:8.1f} MiB  load {row['load_1m']:.2f}"
    )


def _measure(preset, batch, n_classes, distance, device, v: Variant, row: dict, slow: bool) -> float:
    """Times one row's step into row (first call, the repetitions, peak memory, Dynamo's graph count) and returns
    its median milliseconds."""
    fresh_device(device)
    from torch._dynamo.utils import counters  # Dynamo's counters run over the process: differences per row

    graphs, breaks = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    if v.compile_mode:
        torch._dynamo.reset()
    step = _make_step(preset, batch, n_classes, distance, device, v)
    timing = time_step(step, device, repeats=5, slow=slow)  # first call: with compiling or capture
    row.update({k: v_ for k, v_ in timing.items() if k != "ms"})
    if v.compile_mode:  # proof that it compiled: the graphs Dynamo made for this row, and its graph breaks
        row["dynamo_graphs"] = counters["stats"]["unique_graphs"] - graphs
        row["dynamo_graph_breaks"] = sum(counters["graph_break"].values()) - breaks
    return timing["ms"]


def summary(rows: list[dict]) -> list[dict]:
    """Every row (those not run with their reason in `note`), with speed-ups against the best eager row and the best
    torch.compile row of the same model, batch and distance, both timed in this run."""
    out = []
    for r in rows:
        line = {k: r.get(k) for k in SUMMARY_COLUMNS}
        if "skipped" in r:
            line["note"] = r["skipped"]
            out.append(line)
            continue
        same = [
            s
            for s in rows
            if "ms" in s and (s["model"], s["batch"], s["distance"]) == (r["model"], r["batch"], r["distance"])
        ]
        for group, column in (("eager", "x_eager"), ("compile", "x_compile")):
            members = [s for s in same if s.get("group") == group]
            if members:
                best = min(members, key=lambda s: s["ms"])
                line[column] = best["ms"] / r["ms"]
                if best is r:
                    line["baseline"] = group
        out.append(line)
    return out
