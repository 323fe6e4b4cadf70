"""The `cmfast` command line: sample, info, demo. Errors in the user's input end in one line on stderr, exit code 2."""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch

from .checkpoint import CheckpointError, load_model, read_metadata
from .editing_cli import add_commands as add_edit_commands
from .evaluation.cli import add_commands as add_eval_commands
from .generate import Generated, generate, image_shape
from .graphs import graph_unavailable_reason
from .io import atomic_write_bytes, image_grid, save_npz, save_png
from .networks import PRESETS, config_to_dict, set_fused_ops
from .preconditioning import EDMDenoiser, num_parameters
from .sampling import heun_evaluations, multistep_sigmas, num_evaluations, sigmas_from_ts
from .training.commands import add_commands as add_train_commands
from .training.state import ResumeError, TrainingError

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _ints(text: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def _floats(text: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _check_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (try cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def _check_out_dir(out: str) -> None:
    """Fail before sampling, not after, when the output directory cannot be written."""
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: directory is not writable")


def _positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value}")


def add_time_point_args(p: argparse.ArgumentParser, with_when: bool = True) -> None:
    """--steps | --sigmas | --ts (where a consistency model is evaluated, or a teacher's Heun steps), and --grid."""
    if with_when:
        when = p.add_mutually_exclusive_group()
        when.add_argument(
            "--steps",
            type=int,
            help="consistency model: network evaluations, at the Karras grid of STEPS+1 points (default 1); "
            "EDM teacher: Heun steps (default 18 = 35 evaluations)",
        )
        when.add_argument("--sigmas", type=_floats, help="explicit descending time points, e.g. 80,0.661")
        when.add_argument("--ts", type=_ints, help="official time-point indices into a Karras grid of --grid points")
    p.add_argument("--grid", type=int, default=40, help="grid size that --ts indexes (the official 'steps')")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="a network preset (random weights, for smoke tests: " + ", ".join(PRESETS) + "), "
        "a cmfast .safetensors checkpoint, or an official openai/consistency_models .pt file",
    )
    p.add_argument("--device", default=_default_device(), help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="backbone precision via autocast; the preconditioning stays fp32",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cmfast",
        description="cmfast: one- and few-step generation with consistency models (Song et al., ICML 2023).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "sample",
        help="generate images into a PNG grid and a uint8 .npz",
        description="Generate images. A consistency model runs Algorithm 1 (one step by default, or several with "
        "--steps/--sigmas/--ts); an EDM teacher checkpoint runs EDM's Heun sampler (--steps Heun steps, default 18 "
        "= 35 network evaluations). Image i uses seed SEED+i, so results do not depend on --batch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_model_args(p)
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
        help="run GroupNorm+SiLU and attention through cmfast's fused kernels (cmfast.ops; CUDA extension or Triton)",
    )

    p = sub.add_parser(
        "info",
        help="print a checkpoint's architecture, parameter count and config",
        description="Print what a checkpoint (or preset) holds: kind, architecture, parameters, preconditioning.",
    )
    p.add_argument("checkpoint", help="a cmfast .safetensors file, an official .pt file, or a preset name")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")

    p = sub.add_parser(
        "export",
        help="re-save a model (checkpoint, official .pt or shipped name) in the cmfast format, e.g. as fp16",
        description="Load any model --model accepts and write it as a cmfast .safetensors file, optionally storing "
        "the weights in half precision (loading always gives float32 weights).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("source", help="a cmfast .safetensors file, an official .pt file or a shipped model name")
    p.add_argument("dest", help="output .safetensors path (written atomically)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32", help="storage precision")

    p = sub.add_parser(
        "demo",
        help="the main job: train a digits teacher, distill it, compare 1- and 2-step samples (CPU, minutes)",
        description="The whole pipeline on the built-in digits (scikit-learn's 8x8 handwritten digits): train a small "
        "EDM teacher, distill it into a consistency model, sample the same seeds with the teacher's Heun sampler and "
        "the student at one and two steps, write PNG grids side by side (panel.png) and print a table of steps, "
        "network evaluations and time. The run directories (teacher/, cd/) hold configs, logs and checkpoints.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--teacher-steps", type=int, default=3000, help="optimizer steps for the EDM teacher")
    p.add_argument("--cd-steps", type=int, default=1500, help="optimizer steps for consistency distillation")
    p.add_argument("--seed", type=int, default=0, help="seed of weights, data order, noise and samples")
    p.add_argument("--out", default="demo", help="output directory (must not hold an earlier run)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    add_train_commands(sub)
    add_edit_commands(sub)
    add_eval_commands(sub)
    return parser


def _resolve_sigmas(args, model) -> list[float]:
    kw = dict(sigma_min=model.sigma_min, sigma_max=model.sigma_max)
    if args.sigmas is not None:
        return args.sigmas
    if args.ts is not None:
        return sigmas_from_ts(args.ts, args.grid, **kw).tolist()
    return multistep_sigmas(1 if args.steps is None else args.steps, **kw).tolist()


def _write_outputs(out: str, stem: str, result: Generated, extra: dict) -> tuple[str, str]:
    grid = image_grid(result.images)
    scale = max(1, 128 // result.images.shape[1])  # small images are enlarged so the PNG is readable
    png, npz = os.path.join(out, f"{stem}.png"), os.path.join(out, f"{stem}.npz")
    save_png(png, grid, scale=scale)
    arrays = {"images": result.images, **extra}
    if result.labels is not None:
        arrays["labels"] = result.labels
    save_npz(npz, **arrays)
    return png, npz


def cmd_sample(args) -> None:
    _positive("--batch", args.batch)
    num = args.batch if args.num is None else args.num
    _positive("--num", num)
    _positive("--steps", args.steps)
    if not 0 <= args.seed <= 2**63 - 1 - num:
        raise ValueError(f"--seed must lie in [0, 2^63 - 1 - num], got {args.seed}")
    device = _check_device(args.device)
    _check_out_dir(args.out)
    model = load_model(args.model, device=device).eval()
    model.autocast_dtype = DTYPES[args.dtype]
    if args.fused:
        set_fused_ops(model.net)
    graph = args.graph
    if graph and isinstance(model, EDMDenoiser):
        print("cmfast: --graph applies to consistency models; the teacher's Heun sampler runs eagerly", file=sys.stderr)
        graph = False
    if graph and (reason := graph_unavailable_reason(model)):
        print(f"cmfast: --graph: {reason}; sampling eagerly", file=sys.stderr)
        graph = False
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
        "graph": graph,
        "fused": args.fused,
    }
    if isinstance(model, EDMDenoiser):
        if args.sigmas is not None or args.ts is not None:
            raise ValueError("an EDM teacher samples with Heun steps: use --steps, not --sigmas/--ts")
        steps = 18 if args.steps is None else args.steps
        how = dict(heun_steps=steps)
        run.update(sampler="edm_heun", heun_steps=steps, evaluations=heun_evaluations(steps))
    else:
        sigmas = _resolve_sigmas(args, model)
        how = dict(sigmas=sigmas)
        run.update(sampler="multistep", sigmas=sigmas, evaluations=num_evaluations(sigmas, model.sigma_min))
    result = generate(
        model, num, args.batch, args.seed, class_label=args.class_label, progress=not args.no_progress, graph=graph,
        **how,
    )  # fmt: skip
    run["seconds"] = result.seconds
    extra = {"seeds": np.arange(args.seed, args.seed + num)}
    extra.update({key: np.array(value) for key, value in how.items()})
    png, npz = _write_outputs(args.out, "samples", result, extra)
    atomic_write_bytes(os.path.join(args.out, "samples.json"), json.dumps(run, indent=2).encode())
    print(
        f"wrote {png}, {npz} and samples.json: {num} images, {run['evaluations']} evaluations each, "
        f"{result.seconds:.2f} s ({num / result.seconds:.1f} images/s on {device}, {args.dtype})"
    )
    if args.model in PRESETS:
        print(f"note: {args.model} is a preset with random (untrained) weights")


def cmd_info(args) -> None:
    model = load_model(args.checkpoint)
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
    if args.checkpoint in PRESETS:
        info["note"] = "a preset: random weights"
    elif args.checkpoint.endswith(".safetensors"):
        info["format"] = f"cmfast safetensors v{read_metadata(args.checkpoint)['version']}"
    else:
        info["format"] = "official PyTorch state dict (.pt)"
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
    model = load_model(args.source)
    model.save(args.dest, dtype={"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype])
    print(f"wrote {args.dest} ({model.kind}, {num_parameters(model.net) / 1e6:.2f}M parameters, {args.dtype})")


def cmd_demo(args) -> None:
    from .pipeline import run_pipeline

    _positive("--teacher-steps", args.teacher_steps)
    _positive("--cd-steps", args.cd_steps)
    _check_out_dir(args.out)
    print(run_pipeline(args.out, args.teacher_steps, args.cd_steps, seed=args.seed, progress=not args.no_progress))


COMMANDS = {"sample": cmd_sample, "info": cmd_info, "export": cmd_export, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        (getattr(args, "handler", None) or COMMANDS[args.command])(args)
    except (CheckpointError, ValueError, OSError, TrainingError, ResumeError) as err:
        print(f"cmfast {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
