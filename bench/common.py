"""What every benchmark shares: the machine record, timing, the device's measured ceilings, results files, tables.

Speed is only ever measured here, never in tests. Every results file records the device, the library versions and the
date beside the figures, and every ratio is taken against a baseline timed in the same run on the same device.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def failure(e: Exception) -> str:
    """One line for a measurement that failed (an OOM, a compile or capture error): it is a result to report."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:200] if lines else ''}"


def select_models(available: dict, wanted: list[str] | None, option: str = "--models") -> dict:
    """The entries of `available` named in `wanted`, in wanted's order (all of them when wanted is empty or None)."""
    if not wanted:
        return dict(available)
    unknown = [name for name in wanted if name not in available]
    if unknown:
        raise SystemExit(f"{option}: {', '.join(unknown)} is not available here; choose from {', '.join(available)}")
    return {name: available[name] for name in wanted}


def add_rates(row: dict, ms: float, images: int, flops: float, peak_tflops: float) -> dict:
    """row with ms, images/s, TFLOP/s and % of the device's measured matrix peak."""
    row.update(ms=ms, images_s=images / ms * 1e3, tflop_s=flops / ms / 1e9)
    row["pct_peak"] = 100 * row["tflop_s"] / peak_tflops
    return row


def machine() -> dict:
    """The device, versions and date a figure was measured with."""
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cpu": platform.processor() or platform.machine(),
        "cpu_threads": torch.get_num_threads(),
        "load_avg_1_5_15_min": os.getloadavg(),  # as `uptime` prints it: other jobs sharing the machine show here
    }
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, sm_count=props.multi_processor_count, gpu_memory_gib=props.total_memory / 2**30)
    else:
        info["device"] = f"cpu ({info['cpu']}, {info['cpu_threads']} threads)"
    try:
        from cmfast import ops

        info["cmfast_extension"] = ops.extension.reason() or "loaded"
    except ImportError:
        pass
    return info


def device_slug(info: dict) -> str:
    """A file-name-safe name for the device: 'nvidia-h100-80gb-hbm3', 'cpu-2t'."""
    if info["device"].startswith("cpu"):
        return f"cpu-{info['cpu_threads']}t"
    return "".join(c if c.isalnum() else "-" for c in info["device"].lower()).strip("-")


def time_ms(
    fn: Callable[[], object],
    device: str,
    warmup_ms: float = 25,
    rep_ms: float = 100,
    min_calls: int = 5,
    untimed_calls: int = 1,
) -> float:
    """Median milliseconds per call of fn: CUDA events through triton.testing.do_bench on a GPU (it clears the L2
    cache between calls), a synchronised wall clock over repeated calls on the CPU (calls for at least rep_ms, and at
    least min_calls of them, after untimed_calls untimed ones)."""
    if device == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    for _ in range(untimed_calls):
        fn()
    samples, spent = [], 0.0
    while spent < max(rep_ms, 1) / 1000 or len(samples) < min_calls:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        spent += samples[-1]
    return statistics.median(samples) * 1000


def repeated_ms(
    fn: Callable[[], object],
    device: str,
    repeats: int = 5,
    rep_ms: float = 100,
    min_calls: int = 5,
    untimed_calls: int = 1,
) -> dict:
    """Median, minimum and maximum of `repeats` timings of fn, each itself a median over many calls (time_ms), after
    one warm-up call (capture, autotuning, the allocator). On a CPU each timing makes at least min_calls calls after
    untimed_calls untimed ones (fewer of both for steps that take seconds)."""
    fn()
    times = [
        time_ms(fn, device, rep_ms=rep_ms, min_calls=min_calls, untimed_calls=untimed_calls) for _ in range(repeats)
    ]
    return {"ms": statistics.median(times), "ms_min": min(times), "ms_max": max(times), "repeats": repeats}


def fresh_device(device: str) -> None:
    """Before a row builds its models: collect garbage and, on CUDA, empty the cache and restart the peak count."""
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def time_step(step: Callable[[], object], device: str, repeats: int = 5, slow: bool = False) -> dict:
    """A training step's figures: the first call's seconds (compiling, capturing), `repeats` timings (repeated_ms;
    slow: one call per timing and no untimed call, for steps that take seconds), on CUDA the row's whole peak
    (`peak_mem_gib`), and the peak the step adds (`step_peak_mib`, step_peak_bytes)."""
    start = time.perf_counter()
    step()
    if device == "cuda":
        torch.cuda.synchronize()
    out = {"first_step_s": time.perf_counter() - start}
    rep = dict(min_calls=1, untimed_calls=0) if slow else {}
    out.update(repeated_ms(step, device, repeats=repeats, rep_ms=300, **rep))
    if device == "cuda":
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["step_peak_mib"] = step_peak_bytes(step, device) / 2**20
    return out


def step_peak_bytes(fn: Callable[[], object], device: str) -> int:
    """Peak bytes allocated during one call of fn, above the bytes allocated when it starts (what the call adds to
    what already lives: weights, optimizer state, inputs). CUDA: torch.cuda.max_memory_allocated. CPU: the
    allocations and frees torch.profiler records with profile_memory (every tensor from PyTorch's CPU allocator,
    compiled code's included), summed in time order and their running maximum taken."""
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = prof.profiler.kineto_results.events()
    changes = sorted(
        (e.start_ns(), e.nbytes()) for e in events if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    )
    live = peak = 0
    for _, nbytes in changes:
        live += nbytes
        peak = max(peak, live)
    return peak


def time_graph_ms(fn: Callable[[], object], rep_ms: float = 100) -> float:
    """Median milliseconds per call of fn replayed from a CUDA graph (triton.testing.do_bench_cudagraph): the
    kernels' own time without Python's launch overhead, as a captured sampler or training step sees it."""
    from triton.testing import do_bench_cudagraph

    return float(do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))


def peak_bandwidth_gbs(device: str) -> float:
    """The device's achievable memory bandwidth, measured: a 1 GiB device-to-device copy (bytes read + written)."""
    n = (2**30 if device == "cuda" else 2**26) // 4
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device)
    return 2 * n * 4 / ms / 1e6


def peak_tflops(device: str, dtype: torch.dtype = torch.bfloat16) -> float:
    """The device's achievable matrix throughput in dtype, measured on random data (8192^3 on a GPU)."""
    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, device=device, dtype=dtype if device == "cuda" else torch.float32)
    b = torch.randn(n, n, device=device, dtype=a.dtype)
    ms = time_ms(lambda: a @ b, device)
    return 2 * n**3 / ms / 1e9


def write_results(name: str, info: dict, rows: list[dict], extra: dict | None = None, out: str | None = None) -> Path:
    """Atomically write {"machine": info, **extra, "rows": rows} to `out` or bench/results/<device>-<name>.json."""
    path = Path(out) if out else RESULTS / f"{device_slug(info)}-{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"machine": info, **(extra or {}), "rows": rows}, indent=1) + "\n")
    os.replace(tmp, path)
    return path


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of the given columns; floats with 3 significant digits, missing values as '-'."""

    def cell(v):
        if v is None:
            return "-"
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
