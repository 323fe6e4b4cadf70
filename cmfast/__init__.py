"""cmfast: a fast engine for consistency models (Song, Dhariwal, Chen, Sutskever, ICML 2023)."""

from .checkpoint import CheckpointError, load, load_diffusers, load_official_checkpoint, save, save_diffusers
from .editing import colorize, denoise, edit, inpaint, interpolate, stroke_edit, super_resolve
from .interop.accelerate import accelerate, restore
from .networks import NETWORK_PRESETS, build_network
from .preconditioning import ConsistencyModel, EDMDenoiser, TrigFlowModel
from .sampling import (
    generators_from_seeds,
    heun_sample,
    karras_sigmas,
    multistep_sigmas,
    sample,
    sigmas_from_ts,
)

__version__ = "0.1.0"

__all__ = [
    "NETWORK_PRESETS",
    "CheckpointError",
    "ConsistencyModel",
    "EDMDenoiser",
    "TrigFlowModel",
    "accelerate",
    "build_network",
    "colorize",
    "denoise",
    "edit",
    "inpaint",
    "interpolate",
    "stroke_edit",
    "super_resolve",
    "generators_from_seeds",
    "heun_sample",
    "karras_sigmas",
    "load",
    "load_diffusers",
    "load_official_checkpoint",
    "multistep_sigmas",
    "restore",
    "sample",
    "save",
    "save_diffusers",
    "sigmas_from_ts",
]
