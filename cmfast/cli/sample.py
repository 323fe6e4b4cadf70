"""`cmfast sample`, `cmfast info` and `cmfast export`."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from ..checkpoint import ASSETS, SHIPPED, is_torch_save_file, load, read_metadata, save, save_diffusers
from ..generate import Generated, generate, image_shape, sampling_plan
from ..interop import diffusers_layout
from ..io import atomic_write_bytes, image_grid, save_npz, save_png
from ..networks import NETWORK_PRESETS, config_to_dict
from ..preconditioning import num_parameters
from .common import (
    DTYPES,
    HelpFormatter,
    add_model_args,
    add_time_point_args,
    check_device,
    check_grid_use,
    check_out_dir,
    load_for_sampling,
    plural,
    positive,
)


def register(sub) -> None:
    """Add sample, info and export to an argparse subparsers object."""
    p = sub.add_parser(
        "sample",
        help="generate images into a PNG grid and a uint8 .npz",
        description="Generate images. A consistency model runs Algorithm 1 (one step by default, or several with "
        "--steps/--sigmas/--ts); an EDM teacher checkpoint runs EDM's Heun sampler (--steps Heun steps, default 18 "
        "= 35 network evaluations). Image i uses seed SEED+i, so results do not depend on --batch. Shipped models: "
        + "; ".join(f"{name} ({what})" for name, what in SHIPPED.items())
        + ".",
        formatter_class=HelpFormatter,
    )
    add_model_args(p)
    add_time_point_args(p)
    p.add_argument("--num", type=int, help="number of images (default: --batch)")
    p.add_argument("--batch", type=int, default=16, help="images per network call")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed SEED+i")
    p.add_argument("--class-label", type=int, help="class of every image (class-conditional models; default random)")
    p.add_argument("--out", default="out", help="output directory for samples.png and samples.npz")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.add_argument(
        "--graph",
        action="store_true",
        help="consistency models on CUDA: capture each batch size's sampler as a CUDA graph once and replay it "
        "(same images as without; falls back to eager sampling, with a message, on a CPU)",
    )
    p.add_argument(
        "--fused",
        action="store_true",
        help="run GroupNorm+SiLU and attention through cmfast's fused kernels (cmfast.ops; C++/CUDA extension or "
        "Triton)",
    )
    p.add_argument(
        "--engine",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the network through cmfast's inference engine (channels_last, weights resident in --dtype, fused "
        "norms that absorb residual adds, one batched embedding projection; ADM and DDPM++): default on CUDA, "
        "--engine elsewhere too, --no-engine for the model's own forward",
    )
    p.set_defaults(handler=cmd_sample)

    p = sub.add_parser(
        "info",
        help="print a checkpoint's architecture, parameter count and config",
        description="Print what a checkpoint (or preset) holds: kind, architecture, parameters, preconditioning.",
    )
    p.add_argument(
        "checkpoint",
        help="a shipped model name, a preset name, a cmfast .safetensors file, an official .pt file or a diffusers "
        "pipeline folder",
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(handler=cmd_info)

    p = sub.add_parser(
        "export",
        help="re-save a model in the cmfast format (e.g. as fp16) or as a diffusers ConsistencyModelPipeline folder",
        description="Load any model --model accepts and write it as a cmfast .safetensors file (--format cmfast), "
        "optionally storing the weights in half precision (loading always gives float32 weights), or as a diffusers "
        "ConsistencyModelPipeline folder (--format diffusers: model_index.json, unet/, scheduler/) that "
        "ConsistencyModelPipeline.from_pretrained loads. The diffusers layout takes consistency models with an ADM "
        "network (official checkpoints, cmfast-trained ADM models); DDPM++/NCSN++ networks and EDM teachers are "
        "refused, since UNet2DModel cannot express them.",
        formatter_class=HelpFormatter,
    )
    p.add_argument(
        "source",
        help="a shipped model name, a cmfast .safetensors file, an official .pt file or a diffusers pipeline folder",
    )
    p.add_argument("dest", help="output .safetensors path (cmfast), or a new folder (diffusers); written atomically")
    p.add_argument("--format", choices=["cmfast", "diffusers"], default="cmfast", help="output layout")
    p.add_argument(
        "--dtype",
        choices=["fp32", "fp16", "bf16"],
        default="fp32",
        help="storage precision of the weights (diffusers: in the plain diffusion_pytorch_model.safetensors, which "
        "from_pretrained loads at the stored dtype unless given torch_dtype)",
    )
    p.add_argument(
        "--grid",
        type=int,
        help="diffusers only: the scheduler's num_train_timesteps, the Karras grid its integer timesteps index "
        "(default: the source's, if it came from diffusers, else 40, the official CD grid)",
    )
    p.set_defaults(handler=cmd_export)


def write_samples(out: str, stem: str, result: Generated, extra: dict) -> tuple[str, str]:
    """STEM.png (a grid; small images enlarged so the PNG is readable) and STEM.npz (uint8 images and `extra`)."""
    grid = image_grid(result.images)
    scale = max(1, 128 // result.images.shape[1])
    png, npz = os.path.join(out, f"{stem}.png"), os.path.join(out, f"{stem}.npz")
    save_png(png, grid, scale=scale)
    arrays = {"images": result.images, **extra}
    if result.labels is not None:
        arrays["labels"] = result.labels
    save_npz(npz, **arrays)
    return png, npz


def cmd_sample(args) -> None:
    positive("--batch", args.batch)
    num = args.batch if args.num is None else args.num
    positive("--num", num)
    if not 0 <= args.seed <= 2**63 - 1 - num:
        raise ValueError(f"--seed must lie in [0, 2^63 - 1 - num], got {args.seed}")
    check_grid_use(args)
    device = check_device(args.device)
    check_out_dir(args.out)
    model = load_for_sampling(args.model, device, args.dtype, args.fused)
    check_memory(num, image_shape(model), available_memory())
    plan = sampling_plan(model, args.steps, args.sigmas, args.ts, args.grid, graph=args.graph, engine=args.engine)
    if plan.graph_refused:
        print(f"cmfast: --graph: {plan.graph_refused}; sampling eagerly", file=sys.stderr)
    if plan.engine_refused and args.engine is not False:
        print(f"cmfast: engine: {plan.engine_refused}; running the model's own forward", file=sys.stderr)
    if plan.warning:
        print(f"cmfast sample: warning: {plan.warning}", file=sys.stderr)
    run = {
        "model": args.model,
        "kind": model.kind,
        "num": num,
        "batch": args.batch,
        "seed": args.seed,
        "class_label": args.class_label,
        "device": str(device),
        "dtype": args.dtype,
        "torch": torch.__version__,
        "graph": plan.graph,
        "fused": args.fused or plan.engine,
    }
    run.update({k: v for k, v in plan.record().items() if k not in ("ts", "grid")})  # the sigmas say it all
    result = generate(model, plan, num, args.batch, args.seed, args.class_label, progress=not args.no_progress)
    rate, covers = result.images_per_second()
    run.update(seconds=result.seconds, images_per_second=rate, images_per_second_covers=covers)
    extra = {"seeds": np.arange(args.seed, args.seed + num)}
    extra.update({"heun_steps": np.array(plan.heun_steps)} if plan.teacher else {"sigmas": np.array(plan.sigmas)})
    png, npz = write_samples(args.out, "samples", result, extra)
    atomic_write_bytes(os.path.join(args.out, "samples.json"), json.dumps(run, indent=2).encode())
    print(
        f"wrote {png}, {npz} and samples.json: {plural(num, 'image')}, {plural(plan.evaluations, 'evaluation')} "
        f"each, {result.seconds:.2f} s ({rate:.1f} images/s {covers}, on {device}, {args.dtype})"
    )
    if args.model in NETWORK_PRESETS:
        print(f"note: {args.model} is a preset with random (untrained) weights")


def available_memory() -> int | None:
    """Bytes of memory that can be had without swapping (Linux's MemAvailable, else the free pages), or None."""
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # no sysconf (Windows)
        return None


def check_memory(num: int, shape: tuple[int, int, int], available: int | None) -> None:
    """Refuse, before sampling, a run whose uint8 images alone (all held for the .npz) exceed `available` bytes."""
    needed = num * shape[0] * shape[1] * shape[2]
    if available is not None and needed > available:
        raise ValueError(
            f"--num {num}: the {shape[2]}x{shape[1]}x{shape[0]} uint8 images need {needed / 2**30:.1f} GiB, "
            f"but only {available / 2**30:.1f} GiB of memory is available; sample fewer images per run (other --seed)"
        )


def checkpoint_format(spec: str) -> str:
    """What kind of file `spec` (a shipped name or a path, as load takes it) is, judged by its content."""
    path = ASSETS / f"{spec}.safetensors" if spec in SHIPPED else spec
    if os.path.isdir(path) or os.path.basename(path) in diffusers_layout.ALL_WEIGHTS_NAMES:
        return "diffusers ConsistencyModelPipeline (UNet2DModel as ADM)"
    if is_torch_save_file(path):
        return "official PyTorch state dict (.pt)"
    shipped = " (shipped with cmfast)" if spec in SHIPPED else ""
    return f"cmfast safetensors v{read_metadata(path)['version']}{shipped}"


def cmd_info(args) -> None:
    model = load(args.checkpoint)
    info = {
        "file": args.checkpoint,
        "kind": "consistency model" if model.kind == "cm" else "EDM denoiser (teacher)",
        "parameters": num_parameters(model.net),
        "image_shape": list(image_shape(model)),
        "preconditioning": {
            "sigma_min": model.sigma_min,
            "sigma_max": model.sigma_max,
            "sigma_data": model.sigma_data,
            "noise_cond": model.noise_cond,
        },
        "network": config_to_dict(model.net.config),
    }
    if args.checkpoint in NETWORK_PRESETS:
        info["note"] = "a preset: random weights"
    else:
        info["format"] = checkpoint_format(args.checkpoint)
    if args.json:
        print(json.dumps(info, indent=2))
        return
    net = info.pop("network")
    for key, value in info.items():
        print(f"{key:>16}: {value}")
    print(f"{'network':>16}: {net.pop('arch')}")
    for key, value in net.items():
        print(f"{'':>18}{key} = {value}")


def cmd_export(args) -> None:
    if args.grid is not None and args.format != "diffusers":
        raise ValueError("--grid applies to --format diffusers only")
    model = load(args.source)
    size = f"{num_parameters(model.net) / 1e6:.2f}M parameters, {args.dtype}"
    if args.format == "diffusers":
        settings = save_diffusers(model, args.dest, num_train_timesteps=args.grid, dtype=DTYPES[args.dtype])
        print(
            f"wrote {args.dest}/ (ConsistencyModelPipeline: UNet2DModel, {size}; CMStochasticIterativeScheduler, "
            f"sigma {settings.sigma_min}..{settings.sigma_max}, grid {settings.num_train_timesteps})"
        )
        return
    save(model, args.dest, dtype=DTYPES[args.dtype])
    print(f"wrote {args.dest} ({model.kind}, {size})")
