"""The diffusers layout of a consistency model: ConsistencyModelPipeline = UNet2DModel + CMStochasticIterativeScheduler.

A pipeline folder, as `save_pretrained` writes it and as diffusers' conversion of the OpenAI releases publishes it:

    model_index.json                          {"_class_name": "ConsistencyModelPipeline", "unet": [...], ...}
    unet/config.json                          UNet2DModel's constructor arguments
    unet/diffusion_pytorch_model.safetensors  its state dict
    scheduler/scheduler_config.json           sigma_min, sigma_max, sigma_data, rho, num_train_timesteps, ...

UNet2DModel, with resnet (or conv) resampling, scale-shift (or additive) time conditioning, 32-group norms and a
normed middle attention, is the ADM network of the official checkpoints under other names. This module holds the
one correspondence between the two: `unet_config` / `adm_config_from_unet` for the configs, `key_pairs` for the
weights (used by `to_diffusers_state` and `from_diffusers_state` alike). Nothing here imports diffusers; reading
and writing folders needs only JSON and safetensors.

DDPM++/NCSN++ (EDM's SongUNet) has no UNet2DModel equivalent, nor do ADM variants with legacy (heads, 3, d) qkv order,
parameter-free resampling, a first level wider than the time embedding's input, or per-level head widths: those are
refused with a `DiffusersLayoutError` that names the reason.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ..io import atomic_write_bytes
from ..networks import ADMConfig, build_network

PIPELINE_CLASS = "ConsistencyModelPipeline"
UNET_CLASS = "UNet2DModel"
SCHEDULER_CLASS = "CMStochasticIterativeScheduler"
WEIGHTS_NAMES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")
LEGACY_WEIGHTS_NAMES = ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin")  # torch.save files
ALL_WEIGHTS_NAMES = WEIGHTS_NAMES + LEGACY_WEIGHTS_NAMES
DIFFUSERS_VERSION = "0.42.1"  # the release the layout was checked against; diffusers only warns on a mismatch

# UNet2DModel's constructor defaults (diffusers 0.42), for keys a config.json leaves out.
UNET_DEFAULTS = {
    "sample_size": None,
    "in_channels": 3,
    "out_channels": 3,
    "center_input_sample": False,
    "time_embedding_type": "positional",
    "time_embedding_dim": None,
    "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "block_out_channels": (224, 448, 672, 896),
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "downsample_padding": 1,
    "downsample_type": "conv",
    "upsample_type": "conv",
    "dropout": 0.0,
    "act_fn": "silu",
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "attn_norm_num_groups": None,
    "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "class_embed_type": None,
    "num_class_embeds": None,
}
# CMStochasticIterativeScheduler's defaults (those of the official code).
SCHEDULER_DEFAULTS = {
    "num_train_timesteps": 40,
    "sigma_min": 0.002,
    "sigma_max": 80.0,
    "sigma_data": 0.5,
    "s_noise": 1.0,
    "rho": 7.0,
    "clip_denoised": True,
}
# The resampling each block type does: "resnet", "conv", or None where the type's own option decides.
_DOWN_TYPES = {"ResnetDownsampleBlock2D": "resnet", "DownBlock2D": "conv", "AttnDownBlock2D": None}
_UP_TYPES = {"ResnetUpsampleBlock2D": "resnet", "UpBlock2D": "conv", "AttnUpBlock2D": None}


class DiffusersLayoutError(ValueError):
    """A model or folder that cannot be carried between cmfast and the diffusers layout; the message says why."""


@dataclass(frozen=True)
class SchedulerSettings:
    """What CMStochasticIterativeScheduler holds that matters to cmfast: the preconditioning and the time grid."""

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0
    num_train_timesteps: int = 40  # the Karras grid the multistep time points index (N in the paper)
    clip_denoised: bool = True


@dataclass(frozen=True)
class KeyPair:
    """One ADM tensor and the diffusers tensor(s) holding the same numbers.

    Several diffusers names mean the ADM tensor is their concatenation along dim 0 (the fused qkv projection);
    `conv1x1` means the ADM side is a 1x1 convolution and the diffusers side a Linear (trailing 1x1 dims dropped).
    """

    adm: str
    diffusers: tuple[str, ...]
    conv1x1: bool = False


# ---------------------------------------------------------------------------------------------------------------
# configs


def unet_config(config: ADMConfig) -> dict:
    """The UNet2DModel config.json of an ADM network; a DiffusersLayoutError when UNet2DModel cannot express it."""
    if config.qkv_layout != "3hd":
        raise DiffusersLayoutError(
            f"qkv_layout {config.qkv_layout!r}: diffusers splits q, k, v as (3, heads, head_dim); only '3hd' maps"
        )
    if config.channel_mult[0] != 1:
        raise DiffusersLayoutError(
            f"channel_mult[0] = {config.channel_mult[0]}: UNet2DModel feeds its first block's width to the time "
            "embedding, so the first level must be model_channels wide"
        )
    if not config.resblock_updown and not config.conv_resample:
        raise DiffusersLayoutError("parameter-free resampling (conv_resample=False) has no UNet2DModel block type")
    widths = [m * config.model_channels for m in config.channel_mult]
    attention_ds = {config.image_size // r for r in config.attention_resolutions}
    attention = [2**level in attention_ds for level in range(len(widths))]
    one_head = config.num_head_channels == -1 and config.num_heads == 1  # diffusers' attention_head_dim=None
    head_dim = None if one_head else _head_dim(config, [w for w, a in zip(widths, attention) if a] + [widths[-1]])
    updown = config.resblock_updown
    down = ["AttnDownBlock2D" if a else ("ResnetDownsampleBlock2D" if updown else "DownBlock2D") for a in attention]
    up = ["AttnUpBlock2D" if a else ("ResnetUpsampleBlock2D" if updown else "UpBlock2D") for a in attention][::-1]
    return {
        "_class_name": UNET_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        **UNET_DEFAULTS,
        "sample_size": config.image_size,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "block_out_channels": widths,
        "layers_per_block": config.num_res_blocks,
        "downsample_type": "resnet" if updown else "conv",
        "upsample_type": "resnet" if updown else "conv",
        "dropout": config.dropout,
        "attention_head_dim": head_dim,
        "norm_num_groups": 32,
        "attn_norm_num_groups": 32,  # the middle attention is normed in ADM; diffusers drops that norm unless told
        "resnet_time_scale_shift": "scale_shift" if config.use_scale_shift_norm else "default",
        "num_class_embeds": config.num_classes or None,
    }


def unet_kwargs(config: ADMConfig) -> dict:
    """UNet2DModel's constructor arguments for an ADM network: `unet_config` without config.json's bookkeeping keys."""
    return {k: v for k, v in unet_config(config).items() if not k.startswith("_")}


def _head_dim(config: ADMConfig, attention_widths: list[int]) -> int:
    """The one head width of every attention block (UNet2DModel has a single attention_head_dim)."""
    if config.num_head_channels != -1:
        return config.num_head_channels
    dims = {w // config.num_heads for w in attention_widths}
    if len(dims) != 1:
        raise DiffusersLayoutError(
            f"num_heads={config.num_heads} at widths {sorted(set(attention_widths))} gives head widths {sorted(dims)}; "
            "UNet2DModel takes one head width for all attention blocks (or one head per block)"
        )
    return dims.pop()


def adm_config_from_unet(config: dict) -> ADMConfig:
    """The ADMConfig a UNet2DModel config.json describes; a DiffusersLayoutError naming the first setting ADM lacks."""
    c = {**UNET_DEFAULTS, **config}
    if c.get("_class_name", UNET_CLASS) != UNET_CLASS:
        raise DiffusersLayoutError(f"a {c['_class_name']}, not a {UNET_CLASS}; only UNet2DModel maps to ADM")
    fixed = {  # setting: the only value ADM has
        "center_input_sample": False,
        "time_embedding_type": "positional",
        "freq_shift": 0,
        "flip_sin_to_cos": True,
        "mid_block_type": "UNetMidBlock2D",
        "mid_block_scale_factor": 1,
        "downsample_padding": 1,
        "act_fn": "silu",
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "add_attention": True,
        "class_embed_type": None,
    }
    for key, value in fixed.items():
        if c[key] != value:
            raise DiffusersLayoutError(f"{key} = {c[key]!r}: cmfast's ADM supports only {value!r}")
    widths = [int(w) for w in c["block_out_channels"]]
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    if c["sample_size"] is None or not isinstance(c["sample_size"], int):
        raise DiffusersLayoutError(f"sample_size = {c['sample_size']!r}: need one integer (square images)")
    if len(down) != len(widths) or len(up) != len(widths):
        raise DiffusersLayoutError(
            f"{len(widths)} block_out_channels but {len(down)} down and {len(up)} up block types"
        )
    unknown = [t for t in down if t not in _DOWN_TYPES] + [t for t in up if t not in _UP_TYPES]
    if unknown:
        raise DiffusersLayoutError(
            f"block type {unknown[0]!r} has no ADM equivalent; supported: {', '.join([*_DOWN_TYPES, *_UP_TYPES])}"
        )
    if c["time_embedding_dim"] not in (None, 4 * widths[0]):
        raise DiffusersLayoutError(f"time_embedding_dim = {c['time_embedding_dim']}: ADM uses 4 x {widths[0]}")
    shift = c["resnet_time_scale_shift"]
    if shift not in ("default", "scale_shift"):
        raise DiffusersLayoutError(f"resnet_time_scale_shift = {shift!r}: ADM has 'default' or 'scale_shift'")
    groups = c["attn_norm_num_groups"]
    if groups is None and shift == "scale_shift":
        raise DiffusersLayoutError(
            "attn_norm_num_groups is unset with scale_shift: diffusers builds the middle attention without a norm, "
            "which ADM always has"
        )
    if groups not in (None, 32):
        raise DiffusersLayoutError(f"attn_norm_num_groups = {groups}: ADM's norms have 32 groups")
    attention = [t.startswith("Attn") for t in down]
    if attention != [t.startswith("Attn") for t in up][::-1]:
        raise DiffusersLayoutError("attention sits at different levels in the down and up blocks; ADM mirrors them")
    # Only blocks that resample say how: every down block but the last, every up block but the last.
    kinds = {_DOWN_TYPES[t] or c["downsample_type"] for t in down[:-1]}
    kinds |= {_UP_TYPES[t] or c["upsample_type"] for t in up[:-1]}
    if len(widths) > 1 and (len(kinds) != 1 or not kinds <= {"resnet", "conv"}):
        raise DiffusersLayoutError(f"resampling {sorted(map(str, kinds))}: ADM resamples all levels one way")
    if widths[0] <= 0 or any(w % widths[0] for w in widths):
        raise DiffusersLayoutError(f"block_out_channels {widths}: each must be a multiple of the first")
    head = c["attention_head_dim"]
    image_size = c["sample_size"]
    return ADMConfig(
        image_size=image_size,
        in_channels=c["in_channels"],
        out_channels=c["out_channels"],
        model_channels=widths[0],
        channel_mult=tuple(w // widths[0] for w in widths),
        num_res_blocks=c["layers_per_block"],
        attention_resolutions=tuple(image_size // 2**level for level, a in enumerate(attention) if a),
        num_head_channels=-1 if head is None else int(head),
        num_heads=1,
        dropout=float(c["dropout"]),
        num_classes=int(c["num_class_embeds"] or 0),
        use_scale_shift_norm=shift == "scale_shift",
        resblock_updown=kinds == {"resnet"} if len(widths) > 1 else True,
        conv_resample=True,
    )


def scheduler_config(settings: SchedulerSettings) -> dict:
    """The scheduler_config.json of a CMStochasticIterativeScheduler with these settings."""
    return {
        "_class_name": SCHEDULER_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        **SCHEDULER_DEFAULTS,
        **dataclasses.asdict(settings),
    }


def scheduler_settings(config: dict) -> SchedulerSettings:
    """The settings of a scheduler_config.json; a DiffusersLayoutError for another scheduler or a noisy sampler."""
    c = {**SCHEDULER_DEFAULTS, **config}
    name = c.get("_class_name", SCHEDULER_CLASS)
    if name != SCHEDULER_CLASS:
        raise DiffusersLayoutError(f"scheduler {name!r}: a consistency-model pipeline uses {SCHEDULER_CLASS}")
    if c["s_noise"] != 1.0:
        raise DiffusersLayoutError(f"s_noise = {c['s_noise']}: cmfast's multistep sampler adds unit noise (1.0)")
    return SchedulerSettings(
        sigma_min=float(c["sigma_min"]),
        sigma_max=float(c["sigma_max"]),
        sigma_data=float(c["sigma_data"]),
        rho=float(c["rho"]),
        num_train_timesteps=int(c["num_train_timesteps"]),
        clip_denoised=bool(c["clip_denoised"]),
    )


# ---------------------------------------------------------------------------------------------------------------
# weights: one table, both directions

_RES = {
    "in_layers.0": "norm1",
    "in_layers.2": "conv1",
    "emb_layers.1": "time_emb_proj",
    "out_layers.0": "norm2",
    "out_layers.3": "conv2",
    "skip_connection": "conv_shortcut",
}
_ATTENTION = {"norm": "group_norm", "qkv": ("to_q", "to_k", "to_v"), "proj_out": "to_out.0"}
_SUBMODULES = {"res": _RES, "attention": _ATTENTION, "down": {"op": "conv"}, "up": {"conv": "conv"}, "plain": {"": ""}}


def module_pairs(config: ADMConfig) -> list[tuple[str, str, str]]:
    """(ADM module, diffusers module, kind) for every module with weights, walking both U-Nets in the same order."""
    levels = len(config.channel_mult)
    attention_ds = {config.image_size // r for r in config.attention_resolutions}
    resample_kind = "res" if config.resblock_updown else None
    pairs = [("time_embed.0", "time_embedding.linear_1", "plain"), ("time_embed.2", "time_embedding.linear_2", "plain")]
    if config.num_classes:
        pairs.append(("label_emb", "class_embedding", "plain"))
    pairs.append(("input_blocks.0.0", "conv_in", "plain"))
    block = 1
    for level in range(levels):
        attn = 2**level in attention_ds
        for j in range(config.num_res_blocks):
            pairs.append((f"input_blocks.{block}.0", f"down_blocks.{level}.resnets.{j}", "res"))
            if attn:
                pairs.append((f"input_blocks.{block}.1", f"down_blocks.{level}.attentions.{j}", "attention"))
            block += 1
        if level != levels - 1:
            pairs.append((f"input_blocks.{block}.0", f"down_blocks.{level}.downsamplers.0", resample_kind or "down"))
            block += 1
    pairs += [
        ("middle_block.0", "mid_block.resnets.0", "res"),
        ("middle_block.1", "mid_block.attentions.0", "attention"),
        ("middle_block.2", "mid_block.resnets.1", "res"),
    ]
    block = 0
    for i, level in enumerate(reversed(range(levels))):
        attn = 2**level in attention_ds
        for j in range(config.num_res_blocks + 1):
            pairs.append((f"output_blocks.{block}.0", f"up_blocks.{i}.resnets.{j}", "res"))
            if attn:
                pairs.append((f"output_blocks.{block}.1", f"up_blocks.{i}.attentions.{j}", "attention"))
            block += 1
        if level:
            pairs.append(
                (f"output_blocks.{block - 1}.{2 if attn else 1}", f"up_blocks.{i}.upsamplers.0", resample_kind or "up")
            )
    pairs += [("out.0", "conv_norm_out", "plain"), ("out.2", "conv_out", "plain")]
    return pairs


def key_pairs(config: ADMConfig) -> list[KeyPair]:
    """Every tensor of the ADM state dict with its diffusers name(s): the table both conversions read."""
    unet_config(config)  # refuse what UNet2DModel cannot express before naming anything
    with torch.device("meta"):
        adm_keys = list(build_network(config).state_dict())
    by_module = {adm: (diff, kind) for adm, diff, kind in module_pairs(config)}
    out = []
    for key in adm_keys:
        module, _, leaf = key.rpartition(".")  # leaf: weight / bias
        owner = next((m for m in _owners(module) if m in by_module), None)
        if owner is None:
            raise AssertionError(f"ADM tensor {key} has no diffusers counterpart in the table")
        diff, kind = by_module[owner]
        sub = module[len(owner) + 1 :]
        target = _SUBMODULES[kind].get(sub)
        if target is None:
            raise AssertionError(f"ADM tensor {key}: sub-module {sub!r} of a {kind} block is not in the table")
        names = target if isinstance(target, tuple) else (target,)
        full = tuple(".".join(p for p in (diff, name, leaf) if p) for name in names)
        out.append(KeyPair(key, full, conv1x1=kind == "attention" and sub in ("qkv", "proj_out")))
    return out


def _owners(module: str) -> list[str]:
    """module, then each prefix of it, longest first: "a.b.c" -> ["a.b.c", "a.b", "a"]."""
    parts = module.split(".")
    return [".".join(parts[:n]) for n in range(len(parts), 0, -1)]


def to_diffusers_state(state: dict[str, Tensor], config: ADMConfig) -> dict[str, Tensor]:
    """An ADM state dict under UNet2DModel's names (q, k, v split out of qkv; 1x1 convs as Linear weights)."""
    out = {}
    for pair in key_pairs(config):
        value = state[pair.adm]
        parts = value.chunk(len(pair.diffusers), dim=0) if len(pair.diffusers) > 1 else (value,)
        for name, part in zip(pair.diffusers, parts):
            out[name] = part.reshape(part.shape[:2]) if pair.conv1x1 and part.dim() == 4 else part
    return out


def from_diffusers_state(state: dict[str, Tensor], config: ADMConfig, where: str = "weights") -> dict[str, Tensor]:
    """A UNet2DModel state dict under ADM's names: the inverse of `to_diffusers_state` over the same table."""
    pairs = key_pairs(config)
    expected = {name for pair in pairs for name in pair.diffusers}
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''})")
        if unexpected:
            parts.append(
                f"{len(unexpected)} unexpected ({', '.join(unexpected[:3])}{', ...' if len(unexpected) > 3 else ''})"
            )
        raise DiffusersLayoutError(f"{where}: tensors do not fit the UNet2DModel config: {'; '.join(parts)}")
    out = {}
    for pair in pairs:
        parts = [state[name] for name in pair.diffusers]
        if pair.conv1x1:
            parts = [p.reshape(*p.shape, 1, 1) if p.dim() == 2 else p for p in parts]
        out[pair.adm] = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
    return out


# ---------------------------------------------------------------------------------------------------------------
# folders


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a pipeline folder (model_index.json) or a model folder (config.json) of diffusers."""
    p = Path(path)
    return p.is_dir() and ((p / "model_index.json").is_file() or (p / "config.json").is_file())


@dataclass
class DiffusersModel:
    """What a diffusers folder holds, in cmfast's terms."""

    config: ADMConfig
    state: dict[str, Tensor]  # ADM names, float32 or the file's dtype
    scheduler: SchedulerSettings
    scheduler_found: bool  # False: the scheduler's defaults were assumed


def read_folder(
    path: str | os.PathLike, device: str | torch.device = "cpu", weights_name: str | None = None
) -> DiffusersModel:
    """Read a ConsistencyModelPipeline folder, or its unet/ folder (the scheduler is then looked for beside it).
    weights_name: read that file of the unet folder (e.g. the fp16 variant) rather than the first one found."""
    root = Path(path)
    if (root / "model_index.json").is_file():
        index = _read_json(root / "model_index.json")
        name = index.get("_class_name")
        if name != PIPELINE_CLASS:
            raise DiffusersLayoutError(f"{root}: a {name} pipeline, not a {PIPELINE_CLASS}")
        unet_dir, scheduler_file = root / "unet", root / "scheduler" / "scheduler_config.json"
    elif (root / "config.json").is_file():
        unet_dir = root
        scheduler_file = next(
            (
                f
                for f in (root.parent / "scheduler" / "scheduler_config.json", root / "scheduler_config.json")
                if f.is_file()
            ),
            root.parent / "scheduler" / "scheduler_config.json",
        )
    else:
        raise DiffusersLayoutError(f"{root}: no model_index.json or config.json; not a diffusers folder")
    if not (unet_dir / "config.json").is_file():
        raise DiffusersLayoutError(f"{unet_dir}: no config.json")
    try:
        config = adm_config_from_unet(_read_json(unet_dir / "config.json"))
    except DiffusersLayoutError as err:
        raise DiffusersLayoutError(f"{unet_dir / 'config.json'}: {err}") from None
    found = scheduler_file.is_file()
    if found:
        try:
            settings = scheduler_settings(_read_json(scheduler_file))
        except DiffusersLayoutError as err:
            raise DiffusersLayoutError(f"{scheduler_file}: {err}") from None
    else:
        settings = SchedulerSettings()
        warnings.warn(
            f"{unet_dir}: no scheduler config beside it; assuming {SCHEDULER_CLASS}'s defaults "
            f"(sigma_min {settings.sigma_min}, sigma_max {settings.sigma_max}, sigma_data {settings.sigma_data})",
            stacklevel=2,
        )
    weights = _read_weights(unet_dir, device, weights_name)
    state = from_diffusers_state(weights, config, where=str(unet_dir))
    return DiffusersModel(config, state, settings, found)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DiffusersLayoutError(f"{path}: not readable JSON: {err}") from None
    if not isinstance(data, dict):
        raise DiffusersLayoutError(f"{path}: expected a JSON object")
    return data


def _read_weights(unet_dir: Path, device, name: str | None = None) -> dict[str, Tensor]:
    """The unet's tensors: from `name`, else the first of the safetensors names, then the torch.save names."""
    for candidate in (name,) if name else ALL_WEIGHTS_NAMES:
        path = unet_dir / candidate
        if not path.is_file():
            continue
        if candidate.endswith(".safetensors"):
            try:
                with safe_open(os.fspath(path), framework="pt", device=str(device)) as fh:
                    return {k: fh.get_tensor(k) for k in fh.keys()}
            except (SafetensorError, OSError, RuntimeError) as err:
                raise DiffusersLayoutError(f"{path}: not a readable safetensors file: {err}") from None
        try:
            state = torch.load(os.fspath(path), map_location=device, weights_only=True)
        except Exception as err:  # torch raises several types for foreign or truncated files
            raise DiffusersLayoutError(f"{path}: not a state dict cmfast can read without unpickling: {err}") from None
        if isinstance(state, dict) and all(isinstance(v, Tensor) for v in state.values()):
            return state
        raise DiffusersLayoutError(f"{path}: expected a state dict of tensors")
    if any(unet_dir.glob("*.index.json")):
        raise DiffusersLayoutError(f"{unet_dir}: sharded weights (*.index.json) are not supported; save unsharded")
    raise DiffusersLayoutError(f"{unet_dir}: no {name or ' or '.join(ALL_WEIGHTS_NAMES)}")


def write_folder(
    out: str | os.PathLike,
    config: ADMConfig,
    state: dict[str, Tensor],
    settings: SchedulerSettings,
    dtype: torch.dtype | None = None,
) -> None:
    """Write a ConsistencyModelPipeline folder at `out` (which must not exist, or be empty), all or nothing.

    The folder is assembled beside `out` under a temporary name and renamed into place, so a crash leaves either no
    folder or a complete one. dtype (e.g. torch.float16) stores the weights at that precision.
    """
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DiffusersLayoutError(f"{out}: exists and is not an empty folder; choose a new path")
    unet = unet_config(config)
    tensors = {
        k: (v.detach().to("cpu", dtype if dtype is not None and v.is_floating_point() else v.dtype)).contiguous()
        for k, v in to_diffusers_state(state, config).items()
    }
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", SCHEDULER_CLASS],
        "unet": ["diffusers", UNET_CLASS],
    }
    parent = out.resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.", suffix=".tmp"))
    try:
        _write_json(staging / "model_index.json", index)
        _write_json(staging / "unet" / "config.json", unet)
        _write_json(staging / "scheduler" / "scheduler_config.json", scheduler_config(settings))
        atomic_write_bytes(staging / "unet" / WEIGHTS_NAMES[0], safetensors_bytes(tensors, metadata={"format": "pt"}))
        os.chmod(staging, 0o777 & ~_umask())
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _write_json(path: Path, data: dict) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
