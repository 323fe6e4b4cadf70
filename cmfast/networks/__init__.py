"""Backbone networks F of the EDM / consistency-model parameterizations, and `build_network`."""

from __future__ import annotations

from torch import nn

from .adm import ADMUNet, adm_config_from_state_dict
from .configs import (
    NETWORK_PRESETS,
    ADMConfig,
    NetworkConfig,
    SongUNetConfig,
    config_from_dict,
    config_to_dict,
)
from .song_unet import SongUNet

NETWORK_CLASSES: dict[type, type[nn.Module]] = {SongUNetConfig: SongUNet, ADMConfig: ADMUNet}


def network_config(name_or_config: str | NetworkConfig) -> NetworkConfig:
    """A network preset name (see `NETWORK_PRESETS`) or a config -> the config; unknown names list the presets."""
    if isinstance(name_or_config, str):
        if name_or_config not in NETWORK_PRESETS:
            raise ValueError(f"unknown network preset {name_or_config!r}; presets: {', '.join(NETWORK_PRESETS)}")
        return NETWORK_PRESETS[name_or_config]
    if type(name_or_config) not in NETWORK_CLASSES:
        raise TypeError(f"expected a preset name or a network config, got {type(name_or_config).__name__}")
    return name_or_config


def set_fused_ops(net: nn.Module, enabled: bool = True) -> nn.Module:
    """Route the network's GroupNorm+SiLU (ADM: with scale-shift) and, for ADM, attention through `cmfast.ops`,
    whose dispatch picks the C++/CUDA extension, Triton or PyTorch per call. Off by default (bench/README.md says
    where the fused path wins). Weights are unchanged, and outputs up to rounding."""
    for module in net.modules():
        if hasattr(module, "fused"):
            module.fused = enabled
    return net


def build_network(name_or_config: str | NetworkConfig) -> nn.Module:
    """Build the backbone for a preset name (see `NETWORK_PRESETS`) or a config dataclass, at its initial weights."""
    config = network_config(name_or_config)
    return NETWORK_CLASSES[type(config)](config)


__all__ = [
    "NETWORK_PRESETS",
    "ADMConfig",
    "ADMUNet",
    "NetworkConfig",
    "SongUNet",
    "SongUNetConfig",
    "adm_config_from_state_dict",
    "build_network",
    "config_from_dict",
    "config_to_dict",
    "network_config",
    "set_fused_ops",
]
