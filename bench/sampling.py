"""One-step sampling throughput and batch-1 latency, random weights (speed does not depend on them).

Every variant runs in the same process on the same device, with cudnn.benchmark on. Baselines at their best, as a
user would run them:
  eager-fp32       ConsistencyModel + Algorithm 1 in float32, NCHW
  eager-bf16-nchw  the same under bf16 autocast, NCHW
  eager-bf16-cl    the same, channels_last (the summary's "eager" is the better of the two bf16 rows)
  compile          torch.compile of the backbone, bf16 autocast, channels_last, static shapes: mode max-autotune at
                   batch >= 16 and reduce-overhead at batch 1 (--compile-mode overrides both)
  diffusers        diffusers' ConsistencyModelPipeline (bf16 weights on a GPU): for ADM the same network through the
                   diffusers key map; for DDPM++ a UNet2DModel of the same widths, scored with its own FLOP count
In every eager and compiled baseline attention goes through SDPA on unit-stride q/k/v: ADM's own attention does
(cmfast.networks.adm), and DDPM++'s EDM attention (an fp32 einsum) is swapped for SDPA while they run.
cmfast:
  cmfast-fused     bf16 autocast with cmfast's fused GroupNorm+SiLU / attention (set_fused_ops), NCHW
  engine           cmfast.engine.prepare(model, dtype=bf16): channels_last, resident bf16 weights, lowered network
  engine-graph     the engine replayed as one CUDA graph per batch size (cmfast.graphs), as `cmfast sample --graph`
Each row: the median of at least 5 timed repetitions (each itself a median over many calls) with their minimum and
maximum; images/s; TFLOP/s and % of the device's measured bf16 matrix throughput (FLOPs counted by
torch.utils.flop_counter at batch 1). On a CPU: the small presets, fp32 where a GPU would use bf16 (the CPU's bf16
convolutions are emulated), no CUDA graph, and torch.compile only with --compile.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F

import cmfast
from cmfast.engine import prepare as prepare_engine
from cmfast.generate import image_shape
from cmfast.graphs import graphed_sampler
from cmfast.interop.diffusers_layout import unet_kwargs
from cmfast.networks import ADMConfig, set_fused_ops
from cmfast.networks import song_unet as _song_unet

from .common import add_rates, failure, peak_tflops, repeated_ms, select_models

GPU_MODELS = {"ddpmpp-cifar10": 0, "adm-imagenet64": 1000}  # preset -> classes
CPU_MODELS = {"ddpmpp-tiny": 0, "adm-tiny": 10}
BATCHES_GPU, BATCHES_CPU = (1, 16, 64, 256), (1, 16)


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
        unet = UNet2DModel(**unet_kwargs(config))
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


def _sdpa_attention(q, k, v):
    """EDM's attention (q, k, v: (N, C, L) -> (N, C, L)) through SDPA on unit-stride (N, 1, L, C) views."""
    q, k, v = (t.transpose(1, 2).unsqueeze(1) for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    return F.scaled_dot_product_attention(q, k, v, scale=1 / math.sqrt(q.shape[-1])).squeeze(1).transpose(1, 2)


@contextlib.contextmanager
def sdpa_attention():
    """DDPM++'s attention through SDPA while the block runs (the baselines' best form); ADM's already is."""
    original = _song_unet.attention
    _song_unet.attention = _sdpa_attention
    try:
        yield
    finally:
        _song_unet.attention = original


VARIANTS = ("eager-bf16-cl", "eager-bf16-nchw", "engine", "engine-graph", "cmfast-fused", "eager-fp32", "diffusers",
            "compile")  # fmt: skip
BASELINES = {"eager-fp32", "eager-bf16-nchw", "eager-bf16-cl", "compile"}


def run(
    quick: bool = False,
    compile: bool | None = None,
    log=print,
    compile_mode: str | None = None,
    budget_s: float = 1e9,
    models: list[str] | None = None,
    variants: list[str] | None = None,
    batches: list[int] | None = None,
) -> tuple[list[dict], dict]:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.backends.cudnn.benchmark = True
    models = select_models(GPU_MODELS if device == "cuda" else CPU_MODELS, models)
    batches = batches or ((BATCHES_GPU if not quick else (1, 256)) if device == "cuda" else BATCHES_CPU)
    compile = device == "cuda" if compile is None else compile
    low = torch.bfloat16 if device == "cuda" else None  # the CPU's bf16 convolutions are emulated: fp32 there
    wanted = [v for v in VARIANTS if (compile or v != "compile") and (device == "cuda" or v != "engine-graph")]
    wanted = list(select_models({v: v for v in wanted}, variants, "--variants"))
    deadline = time.monotonic() + budget_s
    peak = peak_tflops(device)
    log(f"measured bf16 matrix throughput on {device}: {peak:.3g} TFLOP/s")
    rows = []
    for preset, n_classes in models.items():
        # counted on the eager model: FlopCounterMode does not see into compiled code (and compiling under it misleads)
        plain = _model(preset, device, autocast=None, channels_last=False, fused=False)
        flops = _flops_per_image(
            plain, image_shape(plain), torch.zeros(1, dtype=torch.long, device=device) if n_classes else None
        )
        for name in wanted:
            if name == "diffusers":
                rows += _diffusers_rows(preset, n_classes, batches, device, peak, deadline, log)
                continue
            for batch in batches:
                row = dict(model=preset, variant=name, batch=batch, flops_per_image=flops)
                row["dtype"] = "fp32" if name == "eager-fp32" or low is None else "bf16"
                if time.monotonic() > deadline:
                    rows.append({**row, "skipped": "the suite's time budget ran out"})
                    continue
                noise = torch.randn(batch, *image_shape(plain), device=device)
                labels = torch.randint(n_classes, (batch,), device=device) if n_classes else None
                try:
                    fn = _runner(name, preset, plain, device, low, batch, noise, labels, compile_mode, row)
                    with torch.inference_mode(), sdpa_attention() if name in BASELINES else contextlib.nullcontext():
                        row.update(repeated_ms(fn, device))
                except Exception as e:  # noqa: BLE001 (an OOM, a compile or capture failure is a result to report)
                    rows.append({**row, "skipped": failure(e)})
                    log(f"{preset} {name} b={batch}: {rows[-1]['skipped']}")
                    continue
                add_rates(row, row["ms"], batch, flops * batch, peak)
                if name == "compile":  # proof that it compiled: Dynamo's graph count, and its graph breaks
                    from torch._dynamo.utils import counters

                    row["dynamo_graphs"] = counters["stats"]["unique_graphs"]
                    row["dynamo_graph_breaks"] = sum(counters["graph_break"].values())
                rows.append(row)
                log(
                    f"{preset:16s} {name:16s} b={batch:<4d} {row['ms']:9.3f} ms [{row['ms_min']:.3f}, "
                    f"{row['ms_max']:.3f}] {row['images_s']:9.1f} img/s {row['pct_peak']:5.1f}% of peak"
                )
                if device == "cuda":
                    torch.cuda.empty_cache()
        del plain
    return rows, {"tflops": peak}


def _runner(name, preset, plain, device, low, batch, noise, labels, compile_mode, row):
    """A no-argument callable sampling one batch in one step the way variant `name` does."""
    if name.startswith("engine"):
        engine = prepare_engine(plain, dtype=low or torch.float32)
        if name == "engine-graph":
            sampler = graphed_sampler(engine, noise.shape, noise.dtype, [engine.sigma_max], labels is not None)
            return lambda: sampler(noise, (), labels)
        return lambda: cmfast.sample(engine, noise, [engine.sigma_max], class_labels=labels)
    how = {
        "eager-fp32": dict(autocast=None, channels_last=False, fused=False),
        "eager-bf16-nchw": dict(autocast=low, channels_last=False, fused=False),
        "eager-bf16-cl": dict(autocast=low, channels_last=True, fused=False),
        "cmfast-fused": dict(autocast=low, channels_last=False, fused=True),
        "compile": dict(autocast=low, channels_last=True, fused=False),
    }[name]
    model = _model(preset, device, **how)
    if name == "compile":
        # static shapes, one specialised compile per batch size, as a user serving a fixed batch would run it
        mode = compile_mode or ("reduce-overhead" if batch == 1 else "max-autotune")
        model.net = torch.compile(model.net, mode=mode, dynamic=False)
        row["compile_mode"] = mode
    noise = noise.contiguous(memory_format=torch.channels_last) if how["channels_last"] else noise
    return lambda: cmfast.sample(model, noise, [model.sigma_max], class_labels=labels)


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
                row.update(repeated_ms(lambda kwargs=kwargs: pipe(**kwargs), device))
        except Exception as e:  # noqa: BLE001
            rows.append({**row, "skipped": failure(e)})
            continue
        row["dtype"] = "bf16" if device == "cuda" else "fp32"
        add_rates(row, row["ms"], batch, flops * batch, peak)
        rows.append(row)
        log(f"{preset:16s} diffusers        b={batch:<4d} {row['ms']:9.3f} ms  {row['images_s']:9.1f} img/s")
    return rows


SUMMARY_COLUMNS = [
    "model",
    "variant",
    "batch",
    "ms",
    "ms_min",
    "ms_max",
    "images_s",
    "pct_peak",
    "x_eager",
    "x_compile",
]


def summary(rows: list[dict]) -> list[dict]:
    """Every timed row, with its speed-up over the better eager bf16 row (NCHW or channels_last) and over torch.compile
    at the same model and batch."""
    by = {(r["model"], r["variant"], r.get("batch")): r for r in rows if "ms" in r}
    out = []
    for (model, _variant, batch), r in by.items():
        line = {k: r.get(k) for k in SUMMARY_COLUMNS}
        eager = [by[(model, v, batch)]["ms"] for v in ("eager-bf16-nchw", "eager-bf16-cl") if (model, v, batch) in by]
        comp = by.get((model, "compile", batch))
        line["x_eager"] = min(eager) / r["ms"] if eager else None
        line["x_compile"] = comp["ms"] / r["ms"] if comp else None
        out.append(line)
    return out
