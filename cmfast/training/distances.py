"""Distances d(x, y) of the consistency losses (REFERENCE.md section 4; pseudo-Huber from iCT, section 5).

Each takes two (B, C, H, W) image batches in [-1, 1] and returns a (B,) tensor, one distance per sample.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Distance = Callable[[Tensor, Tensor], Tensor]  # d(x, y) -> (B,)


def _check_pair(x: Tensor, y: Tensor) -> None:
    if x.ndim != 4 or x.shape != y.shape:
        raise ValueError(f"distances take two (B, C, H, W) batches of one shape, got {list(x.shape)}, {list(y.shape)}")


def l2(x: Tensor, y: Tensor) -> Tensor:
    """Mean over pixels and channels of the squared difference."""
    _check_pair(x, y)
    return (x - y).square().mean(dim=(1, 2, 3))


def l1(x: Tensor, y: Tensor) -> Tensor:
    """Mean over pixels and channels of the absolute difference."""
    _check_pair(x, y)
    return (x - y).abs().mean(dim=(1, 2, 3))


def l2_32(x: Tensor, y: Tensor) -> Tensor:
    """l2 after resizing both images bilinearly to 32x32, as the official code's "l2-32" (no antialiasing)."""
    _check_pair(x, y)
    return l2(F.interpolate(x, size=32, mode="bilinear"), F.interpolate(y, size=32, mode="bilinear"))


def pseudo_huber(x: Tensor, y: Tensor, c: float | None = None) -> Tensor:
    """iCT's pseudo-Huber distance sqrt(||x - y||^2 + c^2) - c, ||.|| the L2 norm over all of C*H*W.

    c defaults to 0.00054 sqrt(C*H*W) (iCT). About ||x - y||^2 / (2c) for small differences and ||x - y|| for large.
    """
    _check_pair(x, y)
    if c is None:
        c = 0.00054 * math.sqrt(x[0].numel())
    return ((x - y).square().sum(dim=(1, 2, 3)) + c**2).sqrt() - c


# torchvision weights for the LPIPS backbones; the package's own linear-layer weights ship inside `lpips`.
_BACKBONES = {"vgg": ("vgg16", "VGG16_Weights"), "alex": ("alexnet", "AlexNet_Weights")}


class LPIPSDistance(nn.Module):
    """LPIPS (Zhang et al. 2018) through the `lpips` package, called as the official CM code calls its LPIPS.

    Images in [-1, 1] are mapped to [0, 1] by (x + 1) / 2 and given to LPIPS with normalize=True (inputs in [0, 1]);
    the official code feeds the same [0, 1] images to piq's LPIPS, which standardizes them with ImageNet statistics,
    as the lpips package's scaling layer does. Below 256x256 both images are first upsampled bilinearly to 224x224;
    1-channel images are repeated to 3 channels.

    net: "vgg" (the paper's) or "alex". The ImageNet backbone comes from `backbone_path` (a torchvision state dict of
    vgg16 / alexnet, whole model or its `features`) or else from torchvision's cache, downloading it when the machine
    is online. pretrained_backbone=False keeps the package's random backbone and downloads nothing (for tests).
    avg_pooling=True replaces the backbone's max pooling with average pooling, as the official code does (piq's
    LPIPS(replace_pooling=True)); the default keeps the standard LPIPS network.

    The module is frozen and always in eval mode (its dropout is never active), but gradients flow to its inputs.
    It moves itself to the inputs' device on first use.
    """

    def __init__(
        self,
        net: str = "vgg",
        pretrained_backbone: bool = True,
        backbone_path: str | None = None,
        avg_pooling: bool = False,
    ):
        super().__init__()
        import lpips

        if net not in _BACKBONES:
            raise ValueError(f"unknown LPIPS network {net!r}; expected one of {sorted(_BACKBONES)}")
        if backbone_path is not None and not pretrained_backbone:
            raise ValueError("backbone_path was given with pretrained_backbone=False; drop one of them")
        with warnings.catch_warnings():  # the package builds its backbone with torchvision's deprecated `pretrained`
            warnings.simplefilter("ignore")
            self.lpips = lpips.LPIPS(pretrained=True, net=net, pnet_rand=True, verbose=False)
        self.net_name = net
        if pretrained_backbone:
            self._load_backbone(_backbone_state_dict(net, backbone_path))
        if avg_pooling:
            for parent in self.lpips.net.modules():
                for name, child in parent.named_children():
                    if isinstance(child, nn.MaxPool2d):
                        setattr(parent, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding))
        self.requires_grad_(False)
        self.train(False)

    def _load_backbone(self, state: dict[str, Tensor]) -> None:
        state = {k.removeprefix("features."): v for k, v in state.items() if not k.startswith("classifier.")}
        with torch.no_grad():
            for name, p in self.lpips.net.named_parameters():
                key = name.split(".", 1)[1]  # "slice2.5.weight" -> "5.weight", torchvision's index in `features`
                if key not in state or state[key].shape != p.shape:
                    tv_name = _BACKBONES[self.net_name][0]
                    raise ValueError(
                        f"the LPIPS backbone weights lack features.{key} of shape {list(p.shape)}; "
                        f"is this a torchvision {tv_name} state dict?"
                    )
                p.copy_(state[key])

    def train(self, mode: bool = True) -> LPIPSDistance:
        return super().train(False)  # a parent's .train() must not switch on LPIPS's dropout

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        _check_pair(x, y)
        if x.shape[1] == 1:
            x, y = x.expand(-1, 3, -1, -1), y.expand(-1, 3, -1, -1)
        if x.shape[1] != 3:
            raise ValueError(f"LPIPS takes 1- or 3-channel images, got {x.shape[1]} channels")
        if x.shape[-1] < 256:  # the official code's test, on the width
            x = F.interpolate(x, size=224, mode="bilinear")
            y = F.interpolate(y, size=224, mode="bilinear")
        shift = self.lpips.scaling_layer.shift
        if shift.device != x.device:
            self.to(x.device)
        x, y = x.to(shift.dtype), y.to(shift.dtype)
        return self.lpips((x + 1) / 2, (y + 1) / 2, normalize=True).reshape(-1)


class BackboneUnavailable(RuntimeError, ValueError):
    """The LPIPS backbone's ImageNet weights cannot be read or downloaded; the message names the remedies. A
    ValueError too, so the command line reports it in one line like other input errors."""


def _backbone_state_dict(net: str, path: str | None) -> dict[str, Tensor]:
    if path is not None:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except (OSError, RuntimeError) as e:
            raise BackboneUnavailable(f"cannot read the LPIPS backbone weights {path}: {e}") from None
    import torchvision

    weights = getattr(torchvision.models, _BACKBONES[net][1]).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=False)  # torchvision's cache, or a download
    except (OSError, RuntimeError) as e:
        raise BackboneUnavailable(
            f"cannot get the ImageNet {net} weights for LPIPS ({weights.url}: {e}); put that file in "
            f"{torch.hub.get_dir()}/checkpoints, pass backbone_path=, or use pretrained_backbone=False (random)"
        ) from None


DISTANCES = ("l2", "l1", "l2-32", "lpips", "lpips-alex", "pseudo-huber")


def get_distance(name: str, **options) -> Distance:
    """The distance called `name`, one of DISTANCES. Options: for "lpips"/"lpips-alex" those of LPIPSDistance
    (pretrained_backbone, backbone_path, avg_pooling); for "pseudo-huber" c."""
    if name in ("lpips", "lpips-alex"):
        return LPIPSDistance(net="vgg" if name == "lpips" else "alex", **options)
    if name == "pseudo-huber":
        return functools.partial(pseudo_huber, **options) if options else pseudo_huber
    simple = {"l2": l2, "l1": l1, "l2-32": l2_32}
    if name not in simple:
        raise ValueError(f"unknown distance {name!r}; expected one of {', '.join(DISTANCES)}")
    if options:
        raise ValueError(f"the {name} distance takes no options, got {sorted(options)}")
    return simple[name]
