"""Accelerate a diffusers ConsistencyModelPipeline in place: its UNet2DModel runs as cmfast's ADM network.

    pipe = ConsistencyModelPipeline.from_pretrained(...).to("cuda", torch.bfloat16)
    cmfast.accelerate(pipe)          # same pipeline object, same scheduler, same outputs within rounding
    images = pipe(batch_size=64, num_inference_steps=1).images
    cmfast.restore(pipe)             # back to diffusers' own forward

The UNet2DModel stays where it is (its config, device and dtype, which the pipeline reads); only its `forward` is
replaced by a call into an ADMUNet built from the same weights through the diffusers key map. That network shares
the UNet's tensors except the fused q/k/v projections, which are concatenated (one copy of those weights). It runs
GroupNorm+SiLU and attention through cmfast's fused ops (`cmfast.ops` dispatch: the C++/CUDA extension, Triton, or
PyTorch), and on CUDA each (batch, labels or not) call shape is captured once as a CUDA graph and replayed.

Weights changed on the UNet after `accelerate` are not seen by the accelerated forward: call `accelerate` again.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..networks import build_network, set_fused_ops
from .diffusers_layout import DiffusersLayoutError, adm_config_from_unet, from_diffusers_state


@dataclass
class Acceleration:
    """What `accelerate` attached to a UNet2DModel (as `unet._cmfast`)."""

    net: nn.Module  # the ADMUNet sharing the UNet's weights
    original_forward: object  # the bound forward it replaced; None when the UNet had no instance-level forward
    fused: bool
    graph: bool
    graphs: dict = field(default_factory=dict)  # (batch, shape, dtype, labels?) -> _GraphedCall


def accelerate(pipe, fused: bool = True, graph: bool | None = None):
    """Patch `pipe.unet` (a UNet2DModel that maps to ADM) to run through cmfast, in place; returns `pipe`.

    fused: route GroupNorm+SiLU and attention through cmfast's fused ops. graph: capture the network call as a CUDA
    graph per call shape (default: on when the UNet is on a CUDA device; a ValueError when asked for elsewhere).
    A UNet2DModel that ADM cannot express raises a ValueError that names the setting. Calling it again rebuilds the
    network from the UNet's current weights.
    """
    unet = getattr(pipe, "unet", None)
    if unet is None or type(unet).__name__ != "UNet2DModel":
        raise ValueError(f"accelerate takes a pipeline whose unet is a UNet2DModel, got {type(unet).__name__}")
    restore(pipe)
    try:
        config = adm_config_from_unet(dict(unet.config))
    except DiffusersLayoutError as err:
        raise DiffusersLayoutError(f"cannot accelerate this UNet2DModel: {err}") from None
    param = next(unet.parameters())
    on_cuda = param.device.type == "cuda"
    graph = on_cuda if graph is None else graph
    if graph and not on_cuda:
        raise ValueError(f"graph=True needs the UNet on a CUDA device; it is on {param.device}")
    with torch.device("meta"):
        net = build_network(config)
    state = from_diffusers_state(dict(unet.state_dict()), config, where="pipe.unet")
    net.load_state_dict(state, assign=True)  # views of the UNet's tensors, except the concatenated q/k/v
    net.eval().requires_grad_(False)
    if fused:
        set_fused_ops(net)
    unet._cmfast = Acceleration(net, unet.__dict__.get("forward"), fused, graph)
    unet.forward = types.MethodType(_forward, unet)
    return pipe


def restore(pipe):
    """Undo `accelerate` on `pipe` (a no-op for a pipeline that was not accelerated); returns `pipe`."""
    unet = getattr(pipe, "unet", None)
    acc = getattr(unet, "_cmfast", None) if unet is not None else None
    if acc is None:
        return pipe
    if acc.original_forward is None:
        del unet.forward
    else:
        unet.forward = acc.original_forward
    del unet._cmfast
    return pipe


def is_accelerated(pipe) -> bool:
    return getattr(getattr(pipe, "unet", None), "_cmfast", None) is not None


def _forward(self, sample: Tensor, timestep, class_labels: Tensor | None = None, return_dict: bool = True):
    """UNet2DModel.forward's contract (sample, timestep, class_labels, return_dict) through the cmfast network."""
    acc: Acceleration = self._cmfast
    batch = sample.shape[0]
    t = timestep if isinstance(timestep, Tensor) else torch.tensor(float(timestep))
    # diffusers embeds the timestep in float32 whatever the model's dtype; so does ADM's timestep_embedding
    t = t.to(device=sample.device, dtype=torch.float32).reshape(-1).expand(batch)
    if class_labels is not None:
        class_labels = class_labels.to(sample.device).long().reshape(batch)
    if acc.graph:
        key = (tuple(sample.shape), sample.dtype, class_labels is not None)
        call = acc.graphs.get(key)
        if call is None:
            call = acc.graphs[key] = _GraphedCall(acc.net, sample, t, class_labels)
        out = call(sample, t, class_labels)
    else:
        out = acc.net(sample, t, class_labels)
    if not return_dict:
        return (out,)
    from diffusers.models.unets.unet_2d import UNet2DOutput  # diffusers is the caller's: it is installed

    return UNet2DOutput(sample=out)


class _GraphedCall:
    """net(x, t, labels) for one input shape and dtype, captured as a CUDA graph; replays return a fresh tensor."""

    def __init__(self, net: nn.Module, x: Tensor, t: Tensor, labels: Tensor | None, warmup: int = 2):
        self.net = net
        self.x, self.t = x.detach().clone(), t.detach().clone()
        self.labels = None if labels is None else labels.detach().clone()
        device = x.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side), torch.inference_mode():
            for _ in range(warmup):  # let cuBLAS, cuDNN and Triton pick and compile their kernels outside the capture
                net(self.x, self.t, self.labels)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.inference_mode(), torch.cuda.graph(self.graph):
            self.out = net(self.x, self.t, self.labels)

    def __call__(self, x: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        self.x.copy_(x)
        self.t.copy_(t)
        if labels is not None:
            self.labels.copy_(labels)
        self.graph.replay()
        return self.out.clone()
