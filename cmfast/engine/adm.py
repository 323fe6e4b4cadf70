"""ADM's forward, lowered for inference: channels_last, weights resident in one dtype, few kernels.

Built from an `ADMUNet` (the weights are copied once). What changes against the module-by-module forward:
- every GroupNorm(+scale-shift)+SiLU is one fused op that also adds the block's pending residual (`common.Pending`);
- the first convolution's bias of each residual block moves into the next norm's per-channel pre-add, together with
  the time-embedding term when the block adds it (no scale-shift);
- the 36 (ADM-64) per-block embedding projections run as one matrix product;
- attention reads q, k and v straight from the projection's output as unit-stride views, in the (3, heads, head_dim)
  order of the released checkpoints (legacy (heads, 3, head_dim) weights are reordered once);
- 1x1 projections are matrix products over the channels_last rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..networks.adm import ADMUNet, AttentionBlock, Downsample, ResBlock, Upsample
from .common import Norm, Pending, conv, norm_act, norm_of, resample, rows_to_nhwc, self_attention, weight


@dataclass
class _Res:
    norm1: Norm
    conv1: Tensor
    norm2: Norm
    pre_add: Tensor | None  # conv1's bias (scale-shift blocks; otherwise it joins the embedding projection's bias)
    emb: slice  # this block's columns of the batched embedding projection
    out_channels: int
    scale_shift: bool
    conv2: tuple[Tensor, Tensor]
    skip: tuple[Tensor, Tensor] | None
    resample: str | None


@dataclass
class _Attention:
    norm: Norm
    qkv: tuple[Tensor, Tensor]
    proj: tuple[Tensor, Tensor]
    heads: int
    scale: float


@dataclass
class _Resample:
    mode: str  # "down" or "up"
    conv: tuple[Tensor, Tensor] | None  # Downsample's stride-2 conv / Upsample's conv, when conv_resample


class ADMEngine(nn.Module):
    """forward(x, noise_labels, class_labels) as ADMUNet's, with x channels_last in the engine's dtype."""

    def __init__(self, net: ADMUNet, dtype: torch.dtype, device):
        super().__init__()
        self.config = net.config
        self.dtype = dtype
        w = lambda t, s=1.0: weight(t, dtype, device, s)  # noqa: E731
        half = net.config.model_channels // 2  # timestep_embedding's frequencies, computed once
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=device) / half)
        self.register_buffer("freqs", freqs)
        self.time = [(w(m.weight), w(m.bias)) for m in (net.time_embed[0], net.time_embed[2])]
        self.label = w(net.label_emb.weight) if net.config.num_classes else None
        emb_w, emb_b = [], []

        def res(block: ResBlock) -> _Res:
            lin = block.emb_layers[1]
            start = sum(x.shape[0] for x in emb_w)
            out_channels = block.out_layers[3].weight.shape[0]
            bias = lin.bias.detach().float().clone()
            if not block.use_scale_shift_norm:  # h + conv1.bias + emb_out: one per-(sample, channel) pre-add
                bias += block.in_layers[2].bias.detach().float()
            emb_w.append(lin.weight.detach().float())
            emb_b.append(bias)
            return _Res(
                norm1=norm_of(block.in_layers[0], dtype, device),
                conv1=w(block.in_layers[2].weight),
                norm2=norm_of(block.out_layers[0], dtype, device),
                pre_add=w(block.in_layers[2].bias) if block.use_scale_shift_norm else None,
                emb=slice(start, start + lin.weight.shape[0]),
                out_channels=out_channels,
                scale_shift=block.use_scale_shift_norm,
                conv2=(w(block.out_layers[3].weight), w(block.out_layers[3].bias)),
                skip=None
                if isinstance(block.skip_connection, nn.Identity)
                else (w(block.skip_connection.weight), w(block.skip_connection.bias)),
                resample=block.resample,
            )

        def attention(block: AttentionBlock) -> _Attention:
            c = block.qkv.weight.shape[1]
            heads, d = block.num_heads, c // block.num_heads
            qkv_w, qkv_b = block.qkv.weight.detach().reshape(3 * c, c), block.qkv.bias.detach()
            if block.qkv_layout == "h3d":  # (heads, 3, d) rows -> (3, heads, d)
                qkv_w = qkv_w.reshape(heads, 3, d, c).transpose(0, 1).reshape(3 * c, c)
                qkv_b = qkv_b.reshape(heads, 3, d).transpose(0, 1).reshape(3 * c)
            return _Attention(
                norm=norm_of(block.norm, dtype, device),
                qkv=(w(qkv_w), w(qkv_b)),
                proj=(w(block.proj_out.weight.detach().reshape(c, c)), w(block.proj_out.bias)),
                heads=heads,
                scale=d**-0.5,
            )

        def layer(module: nn.Module):
            if isinstance(module, ResBlock):
                return res(module)
            if isinstance(module, AttentionBlock):
                return attention(module)
            if isinstance(module, Downsample):
                op = module.op
                return _Resample("down", (w(op.weight), w(op.bias)) if isinstance(op, nn.Conv2d) else None)
            if isinstance(module, Upsample):
                c = module.conv
                return _Resample("up", (w(c.weight), w(c.bias)) if isinstance(c, nn.Conv2d) else None)
            raise TypeError(f"the engine has no lowering for {type(module).__name__}")

        self.input_conv = (w(net.input_blocks[0][0].weight), w(net.input_blocks[0][0].bias))
        self.input_blocks = [[layer(m) for m in block] for block in list(net.input_blocks)[1:]]
        self.middle = [layer(m) for m in net.middle_block]
        self.output_blocks = [[layer(m) for m in block] for block in net.output_blocks]
        self.out_norm = norm_of(net.out[0], dtype, device)
        self.out_conv = (w(net.out[2].weight), w(net.out[2].bias))
        self.emb_weight = torch.cat(emb_w).to(device=device, dtype=dtype)
        self.emb_bias = torch.cat(emb_b).to(device=device, dtype=dtype)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        args = noise_labels.float()[:, None] * self.freqs[None]
        t = torch.cat([torch.cos(args), torch.sin(args)], dim=1).to(self.dtype)
        (w1, b1), (w2, b2) = self.time
        emb = F.linear(F.silu(F.linear(t, w1, b1)), w2, b2)
        if self.label is not None:
            emb = emb + F.embedding(class_labels, self.label)
        emb_all = F.linear(F.silu(emb), self.emb_weight, self.emb_bias)  # every block's projection at once

        h: Tensor | Pending = conv(x, *self.input_conv)
        skips = [Pending(h)]
        for block in self.input_blocks:
            h = self._block(block, h, emb_all)
            skips.append(h)
        h = self._block(self.middle, h, emb_all)
        for block in self.output_blocks:
            skip = skips.pop()
            h = torch.cat([_value(h), skip.materialize()], dim=1)
            h = self._block(block, h, emb_all)
        y, _ = norm_act(h, self.out_norm)
        return conv(y, *self.out_conv)

    def _block(self, layers: list, h, emb_all: Tensor):
        for item in layers:
            if isinstance(item, _Res):
                h = self._res(item, h, emb_all)
            elif isinstance(item, _Attention):
                h = self._attention(item, h)
            else:
                h = self._resample(item, h)
        return h if isinstance(h, Pending) else Pending(h)

    @staticmethod
    def _res(r: _Res, h, emb_all: Tensor) -> Pending:
        y, x = norm_act(h, r.norm1)
        y, x = resample(y, r.resample), resample(x, r.resample)
        y = conv(y, r.conv1, None)
        e = emb_all[:, r.emb]
        if r.scale_shift:
            scale, shift = e[:, : r.out_channels], e[:, r.out_channels :]
            y, _ = norm_act(y, r.norm2, pre_add=r.pre_add, scale=scale, shift=shift)
        else:
            y, _ = norm_act(y, r.norm2, pre_add=e)
        y = conv(y, *r.conv2)
        skip = x if r.skip is None else conv(x, *r.skip)
        return Pending(y, skip)

    @staticmethod
    def _attention(a: _Attention, h) -> Pending:
        y, x = norm_act(h, a.norm, silu=False)
        rows = self_attention(y, *a.qkv, a.heads, a.scale)
        out = F.linear(rows, *a.proj)
        return Pending(rows_to_nhwc(out, y.shape[2], y.shape[3]), x)

    @staticmethod
    def _resample(r: _Resample, h) -> Tensor:
        x = _value(h)
        if r.mode == "down":
            return conv(x, *r.conv, stride=2) if r.conv is not None else F.avg_pool2d(x, 2)
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return conv(x, *r.conv) if r.conv is not None else x


def _value(h) -> Tensor:
    return h.materialize() if isinstance(h, Pending) else h


__all__ = ["ADMEngine"]
