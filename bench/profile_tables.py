"""Kernel tables of one-step sampling: where the time of one batch goes, for cmfast and for the compile baseline.

For each model and batch size (GPU: 256 and 1; CPU: 16 and 1), one sampling call of each variant is profiled with
torch.profiler after warm-up: on a GPU the device kernels (CUDA activity, a CUDA-graph replay's kernels included),
on a CPU every operator's self time (and, as the kernel count, the dispatcher-level count of kernel-producing ops).
Each kernel (CPU: operator) is put in one category by its name:
  convolution, matmul (linear layers), groupnorm, attention, elementwise, copy/cast, other
and the row records the kernel count, the summed kernel time per category, and the 15 costliest kernels.
Variants: engine-graph (GPU) or engine (CPU), the model's own eager bf16 channels_last forward, and compile
(torch.compile of the eager model, as in the sampling suite; GPU, or --compile on a CPU).
"""

from __future__ import annotations

import re
import time
from collections import defaultdict

import torch

import cmfast
from cmfast.engine import count_kernels
from cmfast.engine import prepare as prepare_engine
from cmfast.generate import image_shape
from cmfast.graphs import graphed_sampler

from .common import failure, select_models
from .sampling import CPU_MODELS, GPU_MODELS, _model, sdpa_attention

CATEGORIES = [  # (category, pattern over lower-cased kernel names), first match wins
    ("attention", r"flash|fmha|attention|sdpa|_efficient_attention|cudnn_mha|softmax"),
    ("groupnorm", r"group_norm|groupnorm|_gn_|native_group_norm|_single_kernel|_tile_stats|_normalise|var_mean"),
    ("convolution", r"conv|fprop|dgrad|implicit_gemm|winograd|mkldnn_convolution|xmma"),
    ("matmul", r"gemm|addmm|\bmm\b|aten::mm|aten::bmm|linear|matmul|cutlass|sm90_|ampere_"),
    ("copy/cast", r"copy|_to_copy|aten::to\b|cast|clone|contiguous|cat\b|aten::cat|concat"),
    ("elementwise", r"elementwise|vectorized|add|mul|silu|sigmoid|sin|cos|exp|log|sqrt|rsqrt|pow|div|sub|"
     r"upsample|avg_pool|pool|clamp|skip_out|fill|where|triton_"),
]  # fmt: skip
SUMMARY_COLUMNS = ["model", "variant", "batch", "kernels", "kernel_ms", *[c for c, _ in CATEGORIES], "other"]


def categorize(name: str) -> str:
    lower = name.lower()
    for category, pattern in CATEGORIES:
        if re.search(pattern, lower):
            return category
    return "other"


def kernel_table(fn, device: str) -> dict:
    """Profile one call of fn (after two warm-up calls): kernel count, time per category, the costliest kernels."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    activities = [ProfilerActivity.CUDA] if device == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
    per_kernel: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if device == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            us = event.device_time_total if hasattr(event, "device_time_total") else event.cuda_time_total
        else:  # self time: an operator's own, without its children's, so nothing counts twice
            us = event.self_cpu_time_total
            if us <= 0:
                continue
        entry = per_kernel[event.name]
        entry[0] += 1
        entry[1] += us / 1000
    categories = {c: {"ms": 0.0, "count": 0} for c, _ in CATEGORIES} | {"other": {"ms": 0.0, "count": 0}}
    for name, (count, ms) in per_kernel.items():
        cat = categories[categorize(name)]
        cat["ms"] += ms
        cat["count"] += count
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:15]
    # GPU: kernels launched. CPU: the dispatcher-level count of kernel-producing ops (cmfast.engine.count), since
    # CPU operators nest and their profiler events are not kernels
    kernels = sum(c for c, _ in per_kernel.values()) if device == "cuda" else count_kernels(fn).total
    return {
        "kernels": kernels,
        "kernel_ms": sum(ms for _, ms in per_kernel.values()),
        "by_category": categories,
        "top": [{"name": n[:160], "count": c, "ms": ms, "category": categorize(n)} for n, (c, ms) in top],
    }


def run(
    quick: bool = False,
    compile: bool | None = None,
    log=print,
    compile_mode: str | None = None,
    budget_s: float = 1e9,
    models: list[str] | None = None,
    batches: list[int] | None = None,
) -> tuple[list[dict], dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    models = select_models(GPU_MODELS if device == "cuda" else CPU_MODELS, models)
    batches = batches or ((256, 1) if device == "cuda" else (16, 1))
    compile = device == "cuda" if compile is None else compile
    low = torch.bfloat16 if device == "cuda" else None
    variants = ["engine-graph" if device == "cuda" else "engine", "eager-bf16-cl"] + (["compile"] if compile else [])
    deadline = time.monotonic() + budget_s
    rows = []
    for preset, n_classes in models.items():
        for batch in batches:
            for variant in variants:
                row = dict(model=preset, variant=variant, batch=batch, dtype="bf16" if low else "fp32")
                if time.monotonic() > deadline:
                    rows.append({**row, "skipped": "the suite's time budget ran out"})
                    continue
                try:
                    fn = _sampler(variant, preset, device, low, batch, n_classes, compile_mode, row)
                    with torch.inference_mode(), sdpa_attention():
                        row.update(kernel_table(fn, device))
                except Exception as e:  # noqa: BLE001 (a capture or compile failure is a result to report)
                    rows.append({**row, "skipped": failure(e)})
                    log(f"{preset} {variant} b={batch}: {rows[-1]['skipped']}")
                    continue
                rows.append(row)
                cats = ", ".join(f"{c} {v['ms']:.2f}" for c, v in row["by_category"].items() if v["count"])
                log(f"{preset:16s} {variant:14s} b={batch:<4d} {row['kernels']:5d} kernels {row['kernel_ms']:.2f} ms: "
                    f"{cats}")  # fmt: skip
    return rows, {}


def _sampler(variant, preset, device, low, batch, n_classes, compile_mode, row):
    model = _model(preset, device, autocast=low, channels_last=True, fused=False)
    noise = torch.randn(batch, *image_shape(model), device=device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(n_classes, (batch,), device=device) if n_classes else None
    if variant.startswith("engine"):
        engine = prepare_engine(model, dtype=low or torch.float32)
        if variant == "engine-graph":
            sampler = graphed_sampler(engine, noise.shape, noise.dtype, [engine.sigma_max], labels is not None)
            return lambda: sampler(noise, (), labels)
        return lambda: cmfast.sample(engine, noise, [engine.sigma_max], class_labels=labels)
    if variant == "compile":
        mode = compile_mode or ("reduce-overhead" if batch == 1 else "max-autotune")
        model.net = torch.compile(model.net, mode=mode, dynamic=False)
        row["compile_mode"] = mode
    return lambda: cmfast.sample(model, noise, [model.sigma_max], class_labels=labels)


def summary(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        if "kernels" not in r:
            continue
        line = {k: r.get(k) for k in ("model", "variant", "batch", "kernels", "kernel_ms")}
        line.update({c: v["ms"] for c, v in r["by_category"].items()})
        out.append(line)
    return out
