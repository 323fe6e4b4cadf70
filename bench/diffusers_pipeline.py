"""One-step sampling through diffusers' ConsistencyModelPipeline and through cmfast, on one network and one device.

Every row samples the same ADM consistency model (random weights: speed does not depend on them), built once in
cmfast and carried into a UNet2DModel with the diffusers key map, so all rows do the same work (one FLOP count,
checked on both networks). Rows, in the order they run (torch.compile last, so a cut-off run keeps the rest):
  diffusers           the pipeline as diffusers users run it: bf16 weights on a GPU (fp32 on a CPU)
  diffusers+cmfast    the same pipeline after cmfast.accelerate(pipe): fused ops, and a CUDA graph on a GPU
  cmfast              cmfast's own sampler: fused ops, bf16 autocast and the CUDA-graph sampler on a GPU
  diffusers+compile   the pipeline with torch.compile(unet) (max-autotune at batch >= 16, reduce-overhead at batch 1,
                      static shapes), cudnn.benchmark on; on a CPU only with --compile
Each row: the median of at least 5 timed repetitions, with their minimum and maximum; images/s; TFLOP/s and % of
the device's measured bf16 matrix throughput.
"""

from __future__ import annotations

import time

import torch

import cmfast
from cmfast.graphs import graphed_sampler
from cmfast.interop.diffusers_layout import to_diffusers_state, unet_kwargs
from cmfast.networks import NETWORK_PRESETS, set_fused_ops

from .common import add_rates, failure, peak_tflops, repeated_ms, select_models

GPU_MODELS = ["adm-imagenet64"]
CPU_MODELS = ["adm-tiny", "adm-tiny32"]
BATCHES_GPU, BATCHES_CPU = (1, 16, 64, 256), (1, 16)
VARIANTS = ("diffusers", "diffusers+cmfast", "cmfast", "diffusers+compile")
SUMMARY_COLUMNS = ["model", "variant", "batch", "ms", "ms_min", "ms_max", "images_s", "pct_peak", "x_diffusers"]


def _cmfast_model(preset: str, device: str) -> cmfast.ConsistencyModel:
    torch.manual_seed(0)
    return cmfast.ConsistencyModel(cmfast.build_network(preset)).to(device).eval().requires_grad_(False)


def _pipeline(model: cmfast.ConsistencyModel, dtype: torch.dtype):
    """A ConsistencyModelPipeline holding `model`'s weights (the diffusers key map), at `dtype`."""
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    config = model.net.config
    unet = UNet2DModel(**unet_kwargs(config))
    unet.load_state_dict(to_diffusers_state(model.net.state_dict(), config))
    scheduler = CMStochasticIterativeScheduler(
        num_train_timesteps=40, sigma_min=model.sigma_min, sigma_max=model.sigma_max, sigma_data=model.sigma_data
    )
    device = next(model.parameters()).device
    unet = unet.to(device) if dtype == torch.float32 else unet.to(device, dtype)  # .to(dtype) warns even when a no-op
    pipe = ConsistencyModelPipeline(unet=unet.eval(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        fn()
    return float(counter.get_total_flops())


def _flop_counts(model, n_classes: int, device: str) -> tuple[float, float]:
    """FLOPs of one image through cmfast's network and through the UNet2DModel carrying its weights."""
    config = model.net.config
    x = torch.randn(1, config.in_channels, config.image_size, config.image_size, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if n_classes else None
    ours = _flops(lambda: model(x, 80.0, y))
    unet = _pipeline(model, torch.float32).unet
    theirs = _flops(lambda: unet(x, torch.tensor(1000.0, device=device), class_labels=y))
    return ours, theirs


def run(
    quick: bool = False,
    compile: bool | None = None,
    log=print,
    budget_s: float = 1e9,
    models: list[str] | None = None,
    variants: list[str] | None = None,
    batches: list[int] | None = None,
) -> tuple[list[dict], dict]:
    import diffusers  # noqa: F401 (the suite's subject: a clear ImportError when the extra is missing)

    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    presets = list(select_models({m: m for m in (GPU_MODELS if device == "cuda" else CPU_MODELS)}, models))
    batches = batches or (((1, 256) if quick else BATCHES_GPU) if device == "cuda" else BATCHES_CPU)
    compile = device == "cuda" if compile is None else compile
    wanted = select_models({v: v for v in VARIANTS if compile or v != "diffusers+compile"}, variants, "--variants")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    deadline = time.monotonic() + budget_s
    peak = peak_tflops(device)
    log(f"measured bf16 matrix throughput on {device}: {peak:.3g} TFLOP/s; weights {dtype}")
    rows = []
    for preset in presets:
        model = _cmfast_model(preset, device)
        n_classes = NETWORK_PRESETS[preset].num_classes
        flops, flops_diffusers = _flop_counts(model, n_classes, device)
        log(f"{preset}: {flops / 1e9:.3g} GFLOP per image (cmfast), {flops_diffusers / 1e9:.3g} (UNet2DModel)")
        for variant in wanted:
            for batch in batches:
                row = dict(model=preset, variant=variant, batch=batch, dtype=str(dtype).removeprefix("torch."))
                row.update(flops_per_image=flops, flops_per_image_diffusers=flops_diffusers)
                if time.monotonic() > deadline:
                    rows.append({**row, "skipped": "the suite's time budget ran out"})
                    continue
                try:
                    fn = _runner(variant, model, batch, n_classes, dtype, device, row)
                    with torch.inference_mode():
                        row.update(repeated_ms(fn, device))
                except Exception as e:  # noqa: BLE001 (a compile or capture failure is a result to report)
                    rows.append({**row, "skipped": failure(e)})
                    log(f"{preset} {variant} b={batch}: {rows[-1]['skipped']}")
                    continue
                add_rates(row, row["ms"], batch, flops * batch, peak)
                rows.append(row)
                log(
                    f"{preset:14s} {variant:18s} b={batch:<4d} {row['ms']:9.3f} ms "
                    f"[{row['ms_min']:.3f}, {row['ms_max']:.3f}]  {row['images_s']:9.1f} img/s"
                )
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows, {"tflops": peak}


def _runner(variant: str, model, batch: int, n_classes: int, dtype, device: str, row: dict):
    """A no-argument callable that samples one batch in one step the way `variant` does."""
    gen = torch.Generator(device).manual_seed(0)
    labels = torch.randint(n_classes, (batch,), device=device, generator=gen) if n_classes else None
    if variant == "cmfast":
        model.autocast_dtype = torch.bfloat16 if device == "cuda" else None
        set_fused_ops(model.net)
        shape = (batch, model.net.config.in_channels, model.net.config.image_size, model.net.config.image_size)
        noise = torch.randn(shape, device=device, generator=gen)
        if device == "cuda":
            sampler = graphed_sampler(model, noise.shape, noise.dtype, [model.sigma_max], labels is not None)
            row["graph"] = True
            return lambda: sampler(noise, (), labels)
        return lambda: cmfast.sample(model, noise, [model.sigma_max], class_labels=labels)
    pipe = _pipeline(model, dtype)
    if variant == "diffusers+cmfast":
        cmfast.accelerate(pipe)
        row["graph"] = pipe.unet._cmfast.graph
    elif variant == "diffusers+compile":
        mode = "reduce-overhead" if batch == 1 else "max-autotune"
        pipe.unet.compile(mode=mode, dynamic=False)
        row["compile_mode"] = mode
    kwargs = dict(batch_size=batch, num_inference_steps=1, output_type="pt", class_labels=labels)
    return lambda: pipe(**kwargs)


def summary(rows: list[dict]) -> list[dict]:
    """Every timed row, with its speed-up over plain diffusers at the same model and batch."""
    by = {(r["model"], r["variant"], r["batch"]): r for r in rows if "ms" in r}
    out = []
    for (model, _variant, batch), r in by.items():
        line = {k: r.get(k) for k in SUMMARY_COLUMNS}
        base = by.get((model, "diffusers", batch))
        line["x_diffusers"] = base["ms"] / r["ms"] if base else None
        out.append(line)
    return out
