"""Checkpoints: the project's own format, and the official consistency-model releases.

Own format: one safetensors file. The tensors are the backbone's state dict; the header's metadata holds a JSON
document with the network config and the preconditioning (kind, sigma_min, sigma_max, sigma_data, noise_cond).
Nothing is unpickled. Official releases (openai/consistency_models: edm_*, cd_*, ct_* .pt files) are plain state
dicts read with torch.load(weights_only=True). diffusers' ConsistencyModelPipeline folders are read and written
through `cmfast.interop.diffusers_layout` (ADM networks). `load` takes any of these, or a shipped model's name.

Every failure is a `CheckpointError` whose one-line message names the file and what is wrong.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import stat
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor, nn

from .interop import diffusers_layout
from .io import atomic_write_bytes
from .networks import (
    NETWORK_PRESETS,
    ADMConfig,
    adm_config_from_state_dict,
    build_network,
    config_from_dict,
    config_to_dict,
)
from .preconditioning import MODEL_KINDS, ConsistencyModel, EDMDenoiser

FORMAT_NAME = "cmfast"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and the problem."""


def save(model: ConsistencyModel | EDMDenoiser, path: str | os.PathLike, dtype: torch.dtype | None = None) -> None:
    """Write `model` (backbone weights + config + preconditioning) to a .safetensors file, atomically.

    dtype (e.g. torch.float16) stores floating-point parameters at that precision, to halve a shipped file; buffers
    stay float32, since some are not weights but constants the network multiplies by large numbers (NCSN++'s Fourier
    frequencies, about 16 on average, times ln(sigma) / 4). Loading always gives float32 weights.
    """
    meta = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "kind": model.kind,
        "network": config_to_dict(model.net.config),
        "sigma_min": model.sigma_min,
        "sigma_max": model.sigma_max,
        "sigma_data": model.sigma_data,
        "noise_cond": model.noise_cond,
    }
    buffers = {name for name, _ in model.net.named_buffers()}
    tensors = {}
    for key, value in model.net.state_dict().items():
        value = value.detach().to("cpu")
        cast = dtype is not None and value.is_floating_point() and key not in buffers
        tensors[key] = (value.to(dtype) if cast else value).contiguous()
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata={FORMAT_NAME: json.dumps(meta)}))


def read_metadata(path: str | os.PathLike) -> dict:
    """The JSON metadata of an own-format checkpoint (cheap: reads the header only)."""
    _require_file(path)
    try:
        with safe_open(os.fspath(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(FORMAT_NAME)
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or foreign?): {_first_line(err)}")
    if raw is None:
        raise CheckpointError(f"{path}: safetensors file without cmfast metadata; not a cmfast checkpoint")
    try:
        meta = json.loads(raw)
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path}: corrupt cmfast metadata: {err}")
    if meta.get("format") != FORMAT_NAME or meta.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported cmfast format/version {meta.get('format')}/{meta.get('version')}")
    return meta


def load_file(path: str | os.PathLike, device: str | torch.device = "cpu") -> ConsistencyModel | EDMDenoiser:
    """Load an own-format checkpoint written by `save` (in the mode nn.Module starts in; `load` sets eval mode)."""
    meta = read_metadata(path)
    try:
        config = config_from_dict(meta["network"])
        kind = MODEL_KINDS[meta["kind"]]
    except (KeyError, ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: bad network description in metadata: {_first_line(err)}")
    try:
        with safe_open(os.fspath(path), framework="pt", device=str(device)) as fh:
            state = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(f"{path}: cannot read tensors (truncated file?): {_first_line(err)}")
    net = _network_with_weights(path, config, state)
    return kind(
        net,
        sigma_min=meta["sigma_min"],
        sigma_max=meta["sigma_max"],
        sigma_data=meta["sigma_data"],
        noise_cond=meta["noise_cond"],
    ).to(device)


def read_official_state_dict(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read an official .pt state dict without unpickling arbitrary objects."""
    _require_file(path)
    try:
        state = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated zips, bad magic and refused globals
        if isinstance(err, pickle.UnpicklingError) and "weights only" in str(err).lower():  # torch's advice omitted
            raise CheckpointError(
                f"{path}: refused: the file holds pickled objects other than tensors, and cmfast never unpickles them"
            )
        raise CheckpointError(
            f"{path}: cannot read as a PyTorch state dict (truncated or foreign?): {_first_line(err)}"
        )
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict (a mapping of names to tensors)")
    return dict(state)


def load_official_checkpoint(
    path: str | os.PathLike,
    arch: str | ADMConfig | None = None,
    kind: str | None = None,
    device: str | torch.device = "cpu",
    image_size: int | None = None,
) -> ConsistencyModel | EDMDenoiser:
    """Load a released openai/consistency_models checkpoint around the matching ADM.

    arch: a preset name ("adm-imagenet64", "adm-lsun256"), an ADMConfig, or None: then the ADM preset whose
    parameter shapes the file fits, else a config inferred from the state dict (image_size helps when the
    attention layout does not determine it).
    kind: "cm" (ConsistencyModel, for cd_* and ct_* files) or "edm" (EDMDenoiser, for edm_* teachers); None guesses
    from the file name. The official preconditioning is used: sigma in [0.002, 80], sigma_data 0.5, 250 ln(sigma).
    """
    state = read_official_state_dict(path)
    if arch is None:
        config = _matching_adm_preset(state)
        if config is None:
            try:
                config = adm_config_from_state_dict(state, image_size=image_size)
            except ValueError as err:
                near = _nearest_adm_preset(state)
                if near is not None:  # a near-miss of a known network: say what differs, not why inference failed
                    _network_with_weights(path, near, state)
                raise CheckpointError(f"{path}: {_first_line(err)}")
    elif isinstance(arch, str):
        config = NETWORK_PRESETS.get(arch)
        if not isinstance(config, ADMConfig):
            adm = [name for name, cfg in NETWORK_PRESETS.items() if isinstance(cfg, ADMConfig)]
            raise CheckpointError(f"{path}: arch {arch!r} is not an ADM preset; choose one of {', '.join(adm)}")
    else:
        config = arch
    kind = kind or ("edm" if os.path.basename(os.fspath(path)).lower().startswith("edm") else "cm")
    if kind not in MODEL_KINDS:
        raise CheckpointError(f"{path}: kind must be 'cm' or 'edm', got {kind!r}")
    net = _network_with_weights(path, config, state)
    return MODEL_KINDS[kind](net, noise_cond="adm").to(device)


def _adm_preset_shapes() -> list[tuple[ADMConfig, dict[str, tuple]]]:
    out = []
    for config in NETWORK_PRESETS.values():
        if isinstance(config, ADMConfig):
            with torch.device("meta"):
                out.append((config, {k: tuple(v.shape) for k, v in build_network(config).state_dict().items()}))
    return out


def _matching_adm_preset(state: Mapping[str, Tensor]) -> ADMConfig | None:
    """The first ADM preset whose state-dict keys and shapes equal the file's, if any."""
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return next((config for config, expected in _adm_preset_shapes() if expected == shapes), None)


def _nearest_adm_preset(state: Mapping[str, Tensor], min_overlap: float = 0.9) -> ADMConfig | None:
    """The ADM preset sharing the most (key, shape) pairs with the file, if it shares at least `min_overlap`."""
    shapes = {(k, tuple(v.shape)) for k, v in state.items()}
    best, best_score = None, 0.0
    for config, expected in _adm_preset_shapes():
        score = len(shapes & set(expected.items())) / max(len(shapes), len(expected))
        if score > best_score:
            best, best_score = config, score
    return best if best_score >= min_overlap else None


def _network_with_weights(path, config, state: Mapping[str, Tensor]) -> nn.Module:
    """Build the backbone without initialising it (meta device) and adopt the file's tensors as float32 weights."""
    _require_finite(path, state)
    try:
        with torch.device("meta"):
            net = build_network(config)
    except (ValueError, TypeError) as err:
        raise CheckpointError(f"{path}: cannot build the network it describes: {_first_line(err)}")
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_some(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_some(unexpected)})")
        raise CheckpointError(f"{path}: weights do not fit the network: {'; '.join(parts)}")
    for k, v in expected.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: weights do not fit the network: {k} has shape {tuple(state[k].shape)}, "
                f"the network expects {tuple(v.shape)}"
            )
    net.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in state.items()}, assign=True)
    leftover = [n for n, t in [*net.named_parameters(), *net.named_buffers()] if t.is_meta]
    if leftover:  # buffers that are not saved in state dicts: rebuild normally and load into that instead
        net = build_network(config)
        net.load_state_dict(state)
    return net


ASSETS = Path(__file__).resolve().parent / "assets"
SHIPPED = {  # models trained by the project's own commands (cmfast/assets/README.md says which)
    "digits-edm": "EDM teacher on the 8x8 digits (Heun sampler)",
    "digits-cd": "consistency distillation of digits-edm",
    "digits-ict": "improved consistency training (iCT) from scratch on the 8x8 digits",
    "digits-rgb-cd": "consistency distillation on coloured 8x8 digits (3 channels, for colorization)",
}


def load(
    spec: str | os.PathLike,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> ConsistencyModel | EDMDenoiser:
    """Load a model, in eval mode, from whatever names one (the CLI's --model and --teacher take the same):

    - a shipped model name (see SHIPPED), e.g. "digits-cd";
    - a network preset name (random weights seeded with 0, for smoke tests), e.g. "adm-tiny";
    - a cmfast .safetensors checkpoint, or an official openai/consistency_models .pt file;
    - a diffusers ConsistencyModelPipeline folder, its unet/ folder, or that folder's
      diffusion_pytorch_model.safetensors (the scheduler config is read from beside it).

    dtype (torch.bfloat16 or torch.float16) casts the backbone's parameters once and keeps them at that precision;
    the preconditioning and the noise embedding still run in float32. None or torch.float32 keeps float32.
    """
    if dtype not in (None, torch.float32, torch.bfloat16, torch.float16):
        raise CheckpointError(f"dtype must be torch.float32, torch.bfloat16 or torch.float16, got {dtype}")
    model = _load_any(os.fspath(spec), device).eval()
    if dtype is not None and dtype != torch.float32:
        for p in model.net.parameters():
            p.data = p.data.to(dtype)
    return model


def _load_any(spec: str, device) -> ConsistencyModel | EDMDenoiser:
    if spec in SHIPPED:
        return load_file(ASSETS / f"{spec}.safetensors", device=device)
    if spec in NETWORK_PRESETS:
        with torch.random.fork_rng(devices=[]):  # the same random weights every time, without touching global RNG
            torch.manual_seed(0)
            return ConsistencyModel(build_network(spec)).to(device)
    if os.path.isdir(spec):
        if not diffusers_layout.is_diffusers_folder(spec):
            raise CheckpointError(
                f"{spec}: is a folder, but not a diffusers pipeline or model folder (no model_index.json or "
                "config.json); give a checkpoint file"
            )
        return load_diffusers(spec, device)
    if not os.path.exists(spec):
        if os.sep in spec or spec.endswith((".safetensors", ".pt", ".pth", ".bin")):
            raise CheckpointError(f"{spec}: no such file or folder")
        raise CheckpointError(
            f"{spec}: neither a shipped model ({', '.join(SHIPPED)}), a network preset ({', '.join(NETWORK_PRESETS)}) "
            "nor an existing file or folder"
        )
    _require_file(spec)
    folder = os.path.dirname(os.path.abspath(spec))
    if os.path.basename(spec) in diffusers_layout.ALL_WEIGHTS_NAMES and diffusers_layout.is_diffusers_folder(folder):
        return load_diffusers(folder, device, weights_name=os.path.basename(spec))
    if is_torch_save_file(spec):
        return load_official_checkpoint(spec, device=device)
    return load_file(spec, device=device)


def load_diffusers(
    path: str | os.PathLike, device: str | torch.device = "cpu", weights_name: str | None = None
) -> ConsistencyModel:
    """A ConsistencyModel from a diffusers ConsistencyModelPipeline folder or its unet/ folder (ADM networks only).

    The scheduler's sigma_min, sigma_max and sigma_data become the preconditioning; its time grid (num_train_timesteps,
    rho) is kept as `model.diffusers_scheduler`: `sampling_plan` takes its rho for the Karras grid, and
    `save_diffusers` writes both back by default. weights_name: read that file of the unet folder.
    """
    try:
        found = diffusers_layout.read_folder(path, device="cpu", weights_name=weights_name)
    except diffusers_layout.DiffusersLayoutError as err:
        raise CheckpointError(str(err)) from None
    net = _network_with_weights(path, found.config, found.state)
    s = found.scheduler
    model = ConsistencyModel(
        net, sigma_min=s.sigma_min, sigma_max=s.sigma_max, sigma_data=s.sigma_data, noise_cond="adm"
    )
    model.diffusers_scheduler = s
    return model.to(device)


def save_diffusers(
    model: ConsistencyModel,
    out: str | os.PathLike,
    num_train_timesteps: int | None = None,
    dtype: torch.dtype | None = None,
) -> diffusers_layout.SchedulerSettings:
    """Write `model` as a diffusers ConsistencyModelPipeline folder (`from_pretrained(out)` loads it).

    Only consistency models with an ADM network and ADM's time input (250 ln sigma) map onto UNet2DModel and
    CMStochasticIterativeScheduler; anything else raises a CheckpointError with the reason. num_train_timesteps is
    the Karras grid that the pipeline's integer timesteps index (default: the one the model was loaded with, else 40,
    the official CD grid). Returns the scheduler settings written.
    """
    if not isinstance(model, ConsistencyModel):
        raise CheckpointError(
            f"a {type(model).__name__} is not a consistency model; {diffusers_layout.PIPELINE_CLASS} would apply "
            "consistency-model scalings to it (export teachers in cmfast's own format)"
        )
    config = model.net.config
    if not isinstance(config, ADMConfig):
        raise CheckpointError(
            f"a {config.arch} network (DDPM++/NCSN++) has no diffusers UNet2DModel equivalent; "
            "only ADM consistency models export to the diffusers layout"
        )
    if model.noise_cond != "adm":
        raise CheckpointError(
            f"noise_cond {model.noise_cond!r}: diffusers feeds the network 250 ln(sigma) ('adm'); cannot export"
        )
    base = getattr(model, "diffusers_scheduler", None) or diffusers_layout.SchedulerSettings()
    if num_train_timesteps is not None and num_train_timesteps < 2:
        raise CheckpointError(f"num_train_timesteps must be at least 2, got {num_train_timesteps}")
    settings = dataclasses.replace(
        base,
        sigma_min=model.sigma_min,
        sigma_max=model.sigma_max,
        sigma_data=model.sigma_data,
        num_train_timesteps=num_train_timesteps or base.num_train_timesteps,
    )
    state = {k: v.detach().float() if v.is_floating_point() else v for k, v in model.net.state_dict().items()}
    try:
        diffusers_layout.write_folder(out, config, state, settings, dtype=dtype)
    except diffusers_layout.DiffusersLayoutError as err:
        raise CheckpointError(str(err)) from None
    return settings


def is_torch_save_file(path: str | os.PathLike) -> bool:
    """Whether `path` holds a torch.save archive (zip) or a legacy pickle stream rather than a safetensors file.

    A safetensors file starts with its 8-byte little-endian header length and then "{"; that is checked first, since
    a header length can begin with the byte 0x80 that also opens a pickle stream.
    """
    with open(path, "rb") as fh:
        head = fh.read(9)
    if len(head) == 9 and head[8:9] == b"{":
        return False
    return head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"))


def _require_file(path) -> None:
    """A one-line CheckpointError unless `path` is a regular file (a FIFO or device would block or read as empty)."""
    if os.path.isdir(path):
        raise CheckpointError(f"{path}: is a directory, not a checkpoint file")
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such file")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise CheckpointError(f"{path}: not a regular file (a pipe, device or socket); give a checkpoint file")


def _require_finite(path, state: Mapping[str, Tensor]) -> None:
    """A one-line CheckpointError naming the first tensor that holds NaN or inf (a diverged run's weights)."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise CheckpointError(f"{path}: weights hold non-finite values (NaN or inf) in {key}; refusing to load")


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def _some(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (", ..." if len(names) > n else "")
