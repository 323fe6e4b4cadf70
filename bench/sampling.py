"""One-step sampling throughput and batch-1 latency, random weights (speed does not depend on them).

Variants, each timed in the same run on the same device:
  eager-fp32      ConsistencyModel + Algorithm 1 in float32, NCHW
  eager-bf16      the same under bf16 autocast, channels_last
  compile         torch.compile of the backbone (bf16 autocast; --compile-mode, default max-autotune)
  cmfast-fused    bf16 with cmfast's fused GroupNorm+SiLU / attention (set_fused_ops)
  cmfast-graph    cmfast-fused replayed as a CUDA graph (cmfast.graphs)
  diffusers       diffusers' ConsistencyModelPipeline (bf16 weights on a GPU): for ADM the same network through the
                  diffusers key map; for DDPM++ a UNet2DModel of the same widths, scored with its own FLOP count
Each figure also as TFLOP/s and % of the device's measured bf16 matrix throughput (the model's FLOPs counted by
torch.utils.flop_counter at batch 1). On a CPU: the small presets, without the CUDA graph (and torch.compile only
with --compile).
"""

from __future__ import annotations

import time

import torch

import cmfast
from cmfast.generate import image_shape
from cmfast.graphs import graphed_sampler
from cmfast.interop.diffusers_layout import unet_config
from cmfast.networks import ADMConfig, set_fused_ops

from .common import add_rates, failure, peak_tflops, select_models, time_ms

GPU_MODELS = {"ddpmpp-cifar10": 0, "adm-imagenet64": 1000}  # preset -> classes
CPU_MODELS = {"ddpmpp-tiny": 0, "adm-tiny": 10}
BATCHES_GPU, BATCHES_CPU = (1, 16, 64, 256), (1, 16)
SUMMARY_COLUMNS = ["model", "variant", "batch", "ms", "images_s", "tflop_s", "pct_peak", "x_eager_bf16", "x_compile"]


def _model(preset: str, device: str, autocast, channels_last: bool, fused: bool) -> cmfast.ConsistencyModel:
    torch.manual_seed(0)
    model = cmfast.ConsistencyModel(cmfast.build_network(preset)).to(device).eval().requires_grad_(False)
    model.autocast_dtype = autocast
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if fused:
        set_fused_ops(model.net)
    return model


def _flops_per_image(model, shape, labels) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, *shape, device=next(model.parameters()).device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, 80.0, labels[:1] if labels is not None else None)
    return float(counter.get_total_flops())


def _diffusers_pipeline(preset: str, device: str):
    """ConsistencyModelPipeline for the preset, bf16 weights on a GPU (fp32 on a CPU), and its UNet's FLOPs per image.

    ADM presets: the same network as cmfast's, carried over by the diffusers key map (the layout diffusers' own
    conversion of the official checkpoints uses). DDPM++ has no UNet2DModel equivalent; its stand-in is a UNet2DModel
    of the same widths, depth and attention resolution, which does less work, so its rows carry its own FLOP count.
    """
    from diffusers import CMStochasticIterativeScheduler, ConsistencyModelPipeline, UNet2DModel

    config = cmfast.NETWORK_PRESETS[preset]
    if isinstance(config, ADMConfig):
        unet = UNet2DModel(**{k: v for k, v in unet_config(config).items() if not k.startswith("_")})
    else:
        widths = tuple(m * config.model_channels for m in config.channel_mult)
        attention = [config.img_resolution >> level in config.attn_resolutions for level in range(len(widths))]
        unet = UNet2DModel(
            sample_size=config.img_resolution,
            in_channels=config.in_channels,
            out_channels=config.out_channels,
            layers_per_block=config.num_blocks,
            block_out_channels=widths,
            attention_head_dim=max(widths),
            down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in attention),
            up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in attention)[::-1],
        )
    scheduler = CMStochasticIterativeScheduler(num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    unet = unet.to(device).eval()
    x = torch.randn(1, config.in_channels, config.resolution, config.resolution, device=device)
    y = torch.zeros(1, dtype=torch.long, device=device) if config.num_classes else None
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(x, torch.tensor(1000.0, device=device), class_labels=y)
    if device == "cuda":
        unet = unet.to(dtype=torch.bfloat16)
    pipe = ConsistencyModelPipeline(unet=unet, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe, sum(p.numel() for p in unet.parameters()), float(counter.get_total_flops())


def run(
    quick: bool = False,
    compile: bool | None = None,
    log=print,
    compile_mode: str = "max-autotune",
    budget_s: float = 1e9,
    models: list[str] | None = None,
    variants: list[str] | None = None,
    batches: list[int] | None = None,
) -> tuple[list[dict], dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    wanted_variants, wanted_batches = variants, batches
    models = select_models(GPU_MODELS if device == "cuda" else CPU_MODELS, models)
    batches = (BATCHES_GPU if not quick else (1, 256)) if device == "cuda" else BATCHES_CPU
    batches = wanted_batches or batches
    compile = device == "cuda" if compile is None else compile
    deadline = time.monotonic() + budget_s
    peak = peak_tflops(device)
    log(f"measured bf16 matrix throughput on {device}: {peak:.3g} TFLOP/s")
    rows = []
    for preset, n_classes in models.items():
        # the baseline and cmfast first, torch.compile (minutes of compiling) last, so a cut-off run keeps the rest
        variants = {
            "eager-bf16": dict(autocast=torch.bfloat16, channels_last=True, fused=False),
            "cmfast-fused": dict(autocast=torch.bfloat16, channels_last=False, fused=True),
        }
        if device == "cuda":
            variants["cmfast-graph"] = dict(autocast=torch.bfloat16, channels_last=False, fused=True)
        variants["eager-fp32"] = dict(autocast=None, channels_last=False, fused=False)
        variants["diffusers"] = {}
        if compile:
            variants["compile"] = dict(autocast=torch.bfloat16, channels_last=True, fused=False)
        variants = select_models(variants, wanted_variants, "--variants")
        # counted on the eager model: FlopCounterMode does not see into compiled code (and compiling under it misleads)
        plain = _model(preset, device, autocast=None, channels_last=False, fused=False)
        flops = _flops_per_image(
            plain, image_shape(plain), torch.zeros(1, dtype=torch.long, device=device) if n_classes else None
        )
        del plain
        for name, how in variants.items():
            if name == "diffusers":
                rows += _diffusers_rows(preset, n_classes, batches, device, peak, deadline, log)
                continue
            model = _model(preset, device, **how)
            shape = image_shape(model)
            if name == "compile":
                # static shapes: one specialised compile per batch size, as a user serving a fixed batch would run it
                # (with dynamic shapes the second batch size recompiles for all sizes, slower to build and to run)
                model.net = torch.compile(model.net, mode=compile_mode, dynamic=False)
            for batch in batches:
                row = dict(model=preset, variant=name, batch=batch)
                if time.monotonic() > deadline:
                    rows.append({**row, "skipped": "the suite's time budget ran out"})
                    continue
                noise = torch.randn(batch, *shape, device=device)
                labels = torch.randint(n_classes, (batch,), device=device) if n_classes else None
                row["flops_per_image"] = flops
                try:
                    if name == "cmfast-graph":  # captured here, on first use; a capture error is a result too
                        sampler = graphed_sampler(model, noise.shape, noise.dtype, [model.sigma_max], n_classes > 0)

                        def fn(sampler=sampler, noise=noise, labels=labels):
                            return sampler(noise, (), labels)
                    else:

                        def fn(model=model, noise=noise, labels=labels):
                            return cmfast.sample(model, noise, [model.sigma_max], class_labels=labels)

                    with torch.inference_mode():
                        ms = time_ms(fn, device, rep_ms=200)
                except Exception as e:  # noqa: BLE001 (an OOM or a compile failure is a result to report)
                    rows.append({**row, "skipped": failure(e)})
                    log(f"{preset} {name} b={batch}: {rows[-1]['skipped']}")
                    continue
                add_rates(row, ms, batch, flops * batch, peak)
                if name == "compile":  # proof that it compiled: Dynamo's graph count, and its graph breaks
                    from torch._dynamo.utils import counters

                    row["dynamo_graphs"] = counters["stats"]["unique_graphs"]
                    row["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
                rows.append(row)
                log(
                    f"{preset:16s} {name:13s} b={batch:<4d} {ms:9.3f} ms  {row['images_s']:9.1f} img/s  "
                    f"{row['pct_peak']:5.1f}% of peak"
                )
            del model
            if device == "cuda":
                torch.cuda.empty_cache()
    return rows, {"tflops": peak}


def _diffusers_rows(preset, n_classes, batches, device, peak, deadline, log) -> list[dict]:
    try:
        pipe, n_params, flops = _diffusers_pipeline(preset, device)
    except Exception as e:  # noqa: BLE001 (diffusers missing, or an API it changed)
        log(f"diffusers: {type(e).__name__}: {e}")
        return [dict(model=preset, variant="diffusers", skipped=failure(e))]
    rows = []
    for batch in batches:
        row = dict(model=preset, variant="diffusers", batch=batch, unet_parameters=n_params, flops_per_image=flops)
        if time.monotonic() > deadline:
            rows.append({**row, "skipped": "the suite's time budget ran out"})
            continue
        kwargs = dict(batch_size=batch, num_inference_steps=1, output_type="pt")
        if n_classes:
            kwargs["class_labels"] = torch.randint(n_classes, (batch,), device=device)
        try:
            with torch.inference_mode():
                ms = time_ms(lambda kwargs=kwargs: pipe(**kwargs), device, rep_ms=200)
        except Exception as e:  # noqa: BLE001
            rows.append({**row, "skipped": failure(e)})
            continue
        add_rates(row, ms, batch, flops * batch, peak)
        rows.append(row)
        log(f"{preset:16s} diffusers     b={batch:<4d} {ms:9.3f} ms  {row['images_s']:9.1f} img/s")
    return rows


def summary(rows: list[dict]) -> list[dict]:
    """Every timed row, with its speed-up over eager bf16 and over torch.compile at the same model and batch."""
    by = {(r["model"], r["variant"], r.get("batch")): r for r in rows if "ms" in r}
    out = []
    for (model, _variant, batch), r in by.items():
        line = {k: r.get(k) for k in SUMMARY_COLUMNS}
        base = by.get((model, "eager-bf16", batch))
        comp = by.get((model, "compile", batch))
        line["x_eager_bf16"] = base["ms"] / r["ms"] if base else None
        line["x_compile"] = comp["ms"] / r["ms"] if comp else None
        out.append(line)
    return out
