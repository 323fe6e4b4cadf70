"""What the `cmfast` commands share: argument types and groups, checks with one-line errors, loading a model."""

from __future__ import annotations

import argparse
import os

import torch

from ..checkpoint import load_model
from ..generate import DEFAULT_GRID
from ..networks import NETWORK_PRESETS, set_fused_ops

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def ints(text: str) -> list[int]:
    """argparse type: comma-separated integers."""
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")


def floats(text: str) -> list[float]:
    """argparse type: comma-separated numbers."""
    try:
        return [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(name: str) -> torch.device:
    """The torch device `name`, or a one-line error when it is not one or not available."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a torch device (try cpu or cuda)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def check_out_dir(out: str) -> None:
    """Fail before the work, not after, when the output directory cannot be written."""
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: directory is not writable")


def positive(name: str, value: int | None) -> None:
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
        add_sigma_args(when)
    p.add_argument("--grid", type=int, default=DEFAULT_GRID, help="grid size that --ts indexes (the official 'steps')")


def add_sigma_args(group) -> None:
    """--sigmas and --ts, into a parser or a mutually exclusive group."""
    group.add_argument("--sigmas", type=floats, help="explicit descending time points, e.g. 80,0.661")
    group.add_argument("--ts", type=ints, help="official time-point indices into a Karras grid of --grid points")


def add_model_args(p: argparse.ArgumentParser, with_model: bool = True) -> None:
    """--model (unless with_model=False: the command adds it itself), --device and --dtype."""
    if with_model:
        p.add_argument(
            "--model",
            required=True,
            help="a shipped model name, a network preset (random weights, for smoke tests: "
            + ", ".join(NETWORK_PRESETS)
            + "), a cmfast .safetensors checkpoint, or an official openai/consistency_models .pt file",
        )
    p.add_argument("--device", default=default_device(), help="torch device (default: cuda if available, else cpu)")
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="backbone precision via autocast; the preconditioning stays fp32",
    )


def load_for_sampling(spec: str, device: torch.device, dtype: str, fused: bool = False):
    """A model from --model in eval mode, with the backbone's autocast dtype and, optionally, the fused ops."""
    model = load_model(spec, device=device).eval()
    model.autocast_dtype = DTYPES[dtype]
    if fused:
        set_fused_ops(model.net)
    return model
