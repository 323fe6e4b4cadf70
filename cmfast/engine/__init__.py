"""The inference engine: a consistency model (or EDM teacher) turned, once, into a module that samples fast.

    engine = cmfast.engine.prepare(model, device="cuda", dtype=torch.bfloat16)
    x = cmfast.sample(engine, noise, [80.0])           # or graph_sample / generate: it is a drop-in model

What `prepare` decides, once per model (the project's rule: precision and layout are the engine's business):
- layout: channels_last end to end;
- precision: the network's weights cast once to `dtype` and kept resident (no autocast casts inside the forward);
  the preconditioning (c_in, c_noise, and c_skip x + c_out F through `cmfast.ops.skip_out`) stays float32;
- fewer kernels: the lowered networks of `adm.py` and `song.py` (fused norms that absorb residual adds and conv
  biases, one batched embedding projection, unit-stride attention).
The engine holds copies of the weights: it does not see later changes to the model's (prepare again). It lowers ADM
and DDPM++; `unsupported(model)` says why it cannot take another network (NCSN++), and callers fall back to the model.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import ops
from ..networks.adm import ADMUNet
from ..networks.song_unet import SongUNet
from ..preconditioning import EDMDenoiser, c_in, c_noise
from .adm import ADMEngine
from .count import KernelCounter, count_kernels
from .song import SongEngine, song_unsupported

ENGINE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unsupported(model: nn.Module) -> str:
    """Why `prepare` cannot take this model ("" when it can)."""
    net = getattr(model, "net", None)
    if not hasattr(model, "sigma_data") or net is None:
        return f"a {type(model).__name__} is not a ConsistencyModel or EDMDenoiser"
    if getattr(model, "kind", None) == "trigflow":
        return "the engine lowers EDM's and Appendix C's preconditioning, not TrigFlow's (an sCM model)"
    reason = network_options_unsupported(getattr(net, "config", None))
    if reason:
        return reason
    if isinstance(net, ADMUNet):
        return ""
    if isinstance(net, SongUNet):
        return song_unsupported(net)
    return f"no lowering for a {type(net).__name__} network"


def network_options_unsupported(config) -> str:
    """Why the engine cannot take a network with sCM's options ("" when none is on); the logvar head only serves
    training and is ignored."""
    if getattr(config, "time_scale", 1.0) != 1.0:
        return f"time_scale {config.time_scale} (the engine embeds the noise label unscaled)"
    if getattr(config, "adaptive_double_norm", False):
        return "adaptive double normalisation (the engine lowers the plain embedding bias or scale-shift)"
    return ""


class EngineModel(nn.Module):
    """A prepared model: forward(x, sigma, class_labels) -> f(x, sigma) (or D for a teacher) in float32, like the
    model it came from, with the network lowered, channels_last and resident in `dtype`."""

    def __init__(self, model: nn.Module, device: torch.device, dtype: torch.dtype):
        super().__init__()
        net = model.net  # read, never moved: the lowered networks copy each tensor to `device`
        self.net = ADMEngine(net, dtype, device) if isinstance(net, ADMUNet) else SongEngine(net, dtype, device)
        self.num_classes = net.config.num_classes
        self.kind = model.kind
        self.sigma_min, self.sigma_max, self.sigma_data = model.sigma_min, model.sigma_max, model.sigma_data
        self.noise_cond = model.noise_cond
        self.autocast_dtype = None  # the weights are already in `dtype`
        self.dtype = dtype
        # EDM's c_skip and c_out are the consistency function's with sigma_min = 0 (the boundary at 0)
        self.boundary = 0.0 if isinstance(model, EDMDenoiser) else model.sigma_min
        # an empty parameter, so next(engine.parameters()) gives the device and dtype, as for a model
        self.anchor = nn.Parameter(torch.empty(0, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        self._check(x, sigma, class_labels)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(compute)
        if isinstance(sigma, Tensor):
            sigma = sigma.to(device=x.device, dtype=compute).reshape(-1).expand(x.shape[0])
        else:  # filled on the device: no host-to-device copy, which a CUDA graph being captured forbids
            sigma = torch.full((x.shape[0],), float(sigma), dtype=compute, device=x.device)
        x_in = (c_in(sigma.reshape(-1, 1, 1, 1), self.sigma_data) * x).to(
            dtype=self.dtype, memory_format=torch.channels_last
        )
        F_x = self.net(x_in, c_noise(sigma, self.noise_cond).float(), class_labels)
        # the registered op on every backend (its "torch" implementation too): one op, as it is one kernel on a GPU
        choice = ops.explain("skip_out", x, F_x, sigma, self.boundary, self.sigma_data)
        return torch.ops.cmfast.skip_out(x, F_x, sigma, self.boundary, self.sigma_data, False, choice.backend)

    def _check(self, x: Tensor, sigma, class_labels: Tensor | None) -> None:
        """The model's own one-line errors for the caller's mistakes (the lowered networks do not check)."""
        batch = x.shape[0]
        if isinstance(sigma, Tensor) and sigma.numel() not in (1, batch):
            raise ValueError(f"sigma has {sigma.numel()} entries but the batch has {batch} images")
        if (class_labels is None) != (self.num_classes == 0):
            need = f"(B,) int64 class_labels in [0, {self.num_classes})" if self.num_classes else "none"
            raise ValueError(f"this network has num_classes={self.num_classes}: class_labels must be {need}")
        if class_labels is not None and class_labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")

    def extra_repr(self) -> str:
        return f"{type(self.net).__name__}, dtype={self.dtype}, sigma_min={self.sigma_min}, kind={self.kind!r}"


def prepare(
    model: nn.Module, device: str | torch.device | None = None, dtype: torch.dtype = torch.bfloat16
) -> EngineModel:
    """The engine for `model` (a ConsistencyModel or EDMDenoiser with an ADM or DDPM++ network) on `device`
    (default: the model's) with weights in `dtype`; a ValueError naming the reason when it cannot be lowered."""
    reason = unsupported(model)
    if reason:
        raise ValueError(f"cannot prepare an engine: {reason}")
    if dtype not in ENGINE_DTYPES:
        raise ValueError(f"engine dtype must be one of {', '.join(map(str, ENGINE_DTYPES))}, got {dtype}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.no_grad():
        return EngineModel(model, device, dtype).eval()


__all__ = ["ENGINE_DTYPES", "EngineModel", "KernelCounter", "count_kernels", "prepare", "unsupported"]
