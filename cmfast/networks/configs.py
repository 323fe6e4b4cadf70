"""Network configurations (dataclasses) and the one table of presets.

Every backbone is built from a frozen dataclass; both kinds answer `resolution` and `num_classes`. A config
round-trips through JSON (`config_to_dict` / `config_from_dict`), which is how checkpoints in the project's own format
record their architecture.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class SongUNetConfig:
    """DDPM++ / NCSN++ (Song et al. 2021) as configured for CIFAR-10 in EDM (Karras et al. 2022)."""

    arch: ClassVar[str] = "song_unet"
    noise_cond: ClassVar[str] = "edm"  # the network is fed c_noise = ln(sigma) / 4

    img_resolution: int = 32  # input and output height = width
    in_channels: int = 3
    out_channels: int = 3
    label_dim: int = 0  # number of classes; 0 = unconditional
    augment_dim: int = 0  # width of EDM's augmentation labels (9 in the CIFAR-10 configs); 0 = none
    model_channels: int = 128  # base channel count
    channel_mult: tuple[int, ...] = (2, 2, 2)  # per-resolution multipliers of model_channels
    channel_mult_emb: int = 4  # embedding width = model_channels * channel_mult_emb
    num_blocks: int = 4  # residual blocks per resolution
    attn_resolutions: tuple[int, ...] = (16,)  # feature-map sizes that get self-attention
    dropout: float = 0.10
    embedding_type: str = "positional"  # "positional" (DDPM++) or "fourier" (NCSN++)
    fourier_scale: float = 16.0  # std of NCSN++'s random Fourier frequencies (16 in EDM; iCT uses 0.02)
    channel_mult_noise: int = 1  # noise-embedding width multiplier: 1 (DDPM++) or 2 (NCSN++)
    encoder_type: str = "standard"  # "standard" (DDPM++) or "residual" (NCSN++)
    decoder_type: str = "standard"
    resample_filter: tuple[int, ...] = (1, 1)  # (1, 1) for DDPM++, (1, 3, 3, 1) FIR for NCSN++
    # sCM options (Lu & Song 2025), off by default
    time_scale: float = 1.0  # the noise label is multiplied by this before its embedding (TrigFlow's c_noise(t) = t)
    adaptive_double_norm: bool = False  # scale-shift conditioning, scale and shift each pixel-normalised
    logvar_head: bool = False  # a linear head on the noise embedding giving the adaptive weighting's log-variance

    @property
    def resolution(self) -> int:
        """Image height = width, the name both network configs share."""
        return self.img_resolution

    @property
    def num_classes(self) -> int:
        """Number of classes (0 = unconditional), the name both network configs share."""
        return self.label_dim


@dataclass(frozen=True)
class ADMConfig:
    """ADM (Dhariwal & Nichol 2021) as the official consistency-model code builds it (guided-diffusion naming)."""

    arch: ClassVar[str] = "adm"
    noise_cond: ClassVar[str] = "adm"  # the network is fed 250 * ln(sigma) as its "timestep"

    image_size: int = 64
    in_channels: int = 3
    out_channels: int = 3
    model_channels: int = 192
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    num_res_blocks: int = 3
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # feature-map sizes that get self-attention
    num_head_channels: int = 64  # channels per attention head; -1 means use num_heads
    num_heads: int = 1  # used only when num_head_channels == -1
    dropout: float = 0.0
    num_classes: int = 0  # 0 = unconditional
    use_scale_shift_norm: bool = True
    resblock_updown: bool = True
    conv_resample: bool = True
    qkv_layout: str = "3hd"  # "3hd": qkv channels as (3, heads, head_dim), the released checkpoints; "h3d": legacy
    # sCM options (Lu & Song 2025), off by default
    time_scale: float = 1.0  # the noise label is multiplied by this before its embedding (TrigFlow's c_noise(t) = t)
    adaptive_double_norm: bool = False  # scale-shift conditioning, scale and shift each pixel-normalised
    logvar_head: bool = False  # a linear head on the noise embedding giving the adaptive weighting's log-variance

    @property
    def resolution(self) -> int:
        """Image height = width, the name both network configs share."""
        return self.image_size


NetworkConfig = SongUNetConfig | ADMConfig
CONFIG_CLASSES: dict[str, type] = {cls.arch: cls for cls in (SongUNetConfig, ADMConfig)}

# One table of every preset. Paper configs first (REFERENCE.md section 8), then small ones for CPU tests and demos.
NETWORK_PRESETS: dict[str, NetworkConfig] = {
    "ddpmpp-cifar10": SongUNetConfig(augment_dim=9, dropout=0.13),
    "ncsnpp-cifar10": SongUNetConfig(
        augment_dim=9,
        dropout=0.13,
        embedding_type="fourier",
        channel_mult_noise=2,
        encoder_type="residual",
        resample_filter=(1, 3, 3, 1),
    ),
    "adm-imagenet64": ADMConfig(num_classes=1000),
    "adm-lsun256": ADMConfig(
        image_size=256,
        model_channels=256,
        channel_mult=(1, 1, 2, 2, 4, 4),
        num_res_blocks=2,
        use_scale_shift_norm=False,
    ),
    # Small presets: 0.2M to 5M parameters, for CPU tests, demos and the built-in digits.
    "ddpmpp-tiny": SongUNetConfig(
        img_resolution=16, model_channels=32, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0
    ),
    "ddpmpp-digits": SongUNetConfig(
        img_resolution=16,
        in_channels=1,
        out_channels=1,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_blocks=2,
        attn_resolutions=(8,),
        dropout=0.0,
    ),
    "ddpmpp-digits8": SongUNetConfig(
        img_resolution=8,
        in_channels=1,
        out_channels=1,
        model_channels=32,
        channel_mult=(1, 2),
        num_blocks=2,
        attn_resolutions=(4,),
        dropout=0.0,
    ),
    "ncsnpp-tiny": SongUNetConfig(
        img_resolution=8,
        in_channels=1,
        out_channels=1,
        model_channels=32,
        channel_mult=(1, 2),
        num_blocks=1,
        attn_resolutions=(4,),
        dropout=0.0,
        embedding_type="fourier",
        channel_mult_noise=2,
        encoder_type="residual",
        resample_filter=(1, 3, 3, 1),
    ),
    "adm-tiny": ADMConfig(
        image_size=16,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_head_channels=16,
        num_classes=10,
    ),
    "adm-tiny32": ADMConfig(
        image_size=32,
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(16, 8),
        num_head_channels=32,
        use_scale_shift_norm=False,
    ),
}
# The coloured-digits network: ddpmpp-digits8 with 3 channels in and out.
NETWORK_PRESETS["ddpmpp-digits8-rgb"] = dataclasses.replace(
    NETWORK_PRESETS["ddpmpp-digits8"], in_channels=3, out_channels=3
)


def config_to_dict(config: NetworkConfig) -> dict:
    """JSON-ready dict of a config, tagged with its architecture."""
    return {"arch": config.arch, **dataclasses.asdict(config)}


def config_from_dict(data: dict) -> NetworkConfig:
    """Inverse of `config_to_dict`; rejects unknown architectures and fields with a clear message."""
    data = dict(data)
    arch = data.pop("arch", None)
    if arch not in CONFIG_CLASSES:
        raise ValueError(f"unknown network architecture {arch!r}; expected one of {sorted(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[arch]
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {arch} config fields: {', '.join(unknown)}")
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})
