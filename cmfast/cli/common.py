"""What the `cmfast` commands share: argument types and groups, checks with one-line errors, loading a model."""

from __future__ import annotations

import argparse
import os
import tempfile

import torch

from ..checkpoint import SHIPPED, load
from ..generate import DEFAULT_GRID
from ..networks import NETWORK_PRESETS, set_fused_ops

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_TYPES = ("cpu", "cuda", "mps")  # where cmfast's models run; "meta" and friends hold no data to sample


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends "(default: X)" to an option's help unless the help already states its default or there is none."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if action.default is None or "default" in text:
            return text
        return super()._get_help_string(action)


class RawHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """HelpFormatter that keeps the description's line breaks."""


def plural(count: int, noun: str) -> str:
    """'1 evaluation', '2 evaluations'."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


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
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"--device {name}: cmfast runs on {', '.join(DEVICE_TYPES)}, not on {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available on this machine (use --device cpu)")
    return device


def check_out_dir(out: str) -> None:
    """Fail before the work, not after, when the output directory cannot be written."""
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: directory is not writable")


def check_out_file(path: str | None, option: str = "--out") -> None:
    """Fail before the work, not after, when the output file cannot be written: its folder is made if missing and
    a scratch file is created in it and removed (permission bits alone do not tell, e.g. for root)."""
    if not path:
        return
    if os.path.isdir(path):
        raise ValueError(f"{option} {path}: is a directory; give a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".probe"):
            pass
    except OSError as err:
        raise ValueError(f"{option} {path}: cannot write there ({err.strerror or err})") from None


def check_grid_use(args) -> None:
    """--grid only says what --ts indexes; alone it would be silently ignored."""
    if args.grid != DEFAULT_GRID and getattr(args, "ts", None) is None:
        raise ValueError(f"--grid {args.grid} only applies with --ts (the indices into that grid); add --ts or drop it")


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
    p.add_argument(
        "--grid", type=int, default=DEFAULT_GRID, help="grid size that --ts indexes (the official 'steps'; needs --ts)"
    )


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
            help="a shipped model name ("
            + ", ".join(SHIPPED)
            + "), a network preset (random weights, for smoke tests: "
            + ", ".join(NETWORK_PRESETS)
            + "), a cmfast .safetensors checkpoint, an official openai/consistency_models .pt file, or a diffusers "
            "ConsistencyModelPipeline folder (ADM)",
        )
    add_device_arg(p)
    p.add_argument(
        "--dtype",
        choices=DTYPES,
        default="fp32",
        help="backbone precision via autocast; the preconditioning stays fp32",
    )


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--device",
        default=default_device(),
        help="torch device: cpu, cuda, cuda:N or mps (default: %(default)s here; cuda when available, else cpu)",
    )


def load_for_sampling(spec: str, device: torch.device, dtype: str, fused: bool = False):
    """A model from --model in eval mode, with the backbone's autocast dtype and, optionally, the fused ops."""
    model = load(spec, device=device).eval()
    model.autocast_dtype = DTYPES[dtype]
    if fused:
        set_fused_ops(model.net)
    return model
