"""DDPM++ (EDM's SongUNet with positional embedding, standard encoder and decoder, box resampling), lowered for
inference as `adm.py` lowers ADM: channels_last, resident weights, fused norms that add the pending residual.

SongUNet-specific foldings: the residual scale sqrt(1/2) of every block and attention output moves into the
weights of the branch's last convolution or projection and of the skip convolution (an identity skip takes it as
the residual's alpha); conv0's bias joins the block's embedding projection, so the norm that follows takes one
per-(sample, channel) pre-add; the one-hot class embedding becomes a row lookup; EDM's (heads, head_dim, 3) qkv rows
are reordered once to (3, heads, head_dim), so q, k and v are unit-stride views of one projection.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..networks.song_unet import MAX_POSITIONS, SKIP_SCALE, Conv2d, SongUNet, UNetBlock
from .common import Norm, Pending, conv, norm_act, norm_of, resample, rows_to_nhwc, self_attention, weight


def song_unsupported(net: SongUNet) -> str:
    """Why the engine cannot lower this SongUNet ("" when it can)."""
    c = net.config
    if c.embedding_type != "positional":
        return "NCSN++'s Fourier embedding (the engine lowers DDPM++: positional embedding)"
    if c.encoder_type != "standard" or c.decoder_type != "standard":
        return f"encoder {c.encoder_type!r} / decoder {c.decoder_type!r} (the engine lowers the standard ones)"
    if tuple(c.resample_filter) != (1, 1):
        return f"resample filter {c.resample_filter} (the engine lowers the box filter (1, 1))"
    return ""


@dataclass
class _Block:
    norm0: Norm
    resample: str | None
    conv0: Tensor
    emb: slice
    norm1: Norm
    conv1: tuple[Tensor, Tensor]  # scaled by SKIP_SCALE
    skip: tuple[Tensor, Tensor] | None  # scaled by SKIP_SCALE
    attention: tuple | None  # (norm2, qkv weight, qkv bias, proj weight, proj bias, heads, scale)


class SongEngine(nn.Module):
    """forward(x, noise_labels, class_labels) as SongUNet's, with x channels_last in the engine's dtype."""

    def __init__(self, net: SongUNet, dtype: torch.dtype, device):
        super().__init__()
        reason = song_unsupported(net)
        if reason:
            raise ValueError(f"the engine cannot lower this network: {reason}")
        self.config = c = net.config
        self.dtype = dtype
        w = lambda t, s=1.0: weight(t, dtype, device, s)  # noqa: E731
        half = net.map_noise.num_channels // 2
        self.register_buffer(
            "freqs", (MAX_POSITIONS ** -(torch.arange(half, dtype=torch.float64) / (half - 1))).float().to(device)
        )
        self.label = (
            w(net.map_label.weight.t(), math.sqrt(c.label_dim)) if net.map_label is not None else None
        )  # one_hot(y) sqrt(L) W^T = sqrt(L) W[:, y]
        self.label_bias = w(net.map_label.bias) if net.map_label is not None else None
        self.layers = [(w(m.weight), w(m.bias)) for m in (net.map_layer0, net.map_layer1)]
        emb_w, emb_b = [], []

        def block(b: UNetBlock) -> _Block:
            start = sum(x.shape[0] for x in emb_w)
            emb_w.append(b.affine.weight.detach().float())
            emb_b.append(b.affine.bias.detach().float() + b.conv0.bias.detach().float())
            mode = "up" if b.conv0.up else "down" if b.conv0.down else None
            attention = None
            if b.num_heads:
                cout, heads = b.out_channels, b.num_heads
                d = cout // heads
                qkv_w = b.qkv.weight.detach().reshape(heads, d, 3, cout).permute(2, 0, 1, 3).reshape(3 * cout, cout)
                qkv_b = b.qkv.bias.detach().reshape(heads, d, 3).permute(2, 0, 1).reshape(3 * cout)
                proj_w = b.proj.weight.detach().reshape(cout, cout)
                attention = (
                    norm_of(b.norm2, dtype, device),
                    w(qkv_w),
                    w(qkv_b),
                    w(proj_w, SKIP_SCALE),
                    w(b.proj.bias, SKIP_SCALE),
                    heads,
                    d**-0.5,
                )
            return _Block(
                norm0=norm_of(b.norm0, dtype, device),
                resample=mode,
                conv0=w(b.conv0.weight),
                emb=slice(start, start + b.out_channels),
                norm1=norm_of(b.norm1, dtype, device),
                conv1=(w(b.conv1.weight, SKIP_SCALE), w(b.conv1.bias, SKIP_SCALE)),
                skip=None if b.skip is None else (w(b.skip.weight, SKIP_SCALE), w(b.skip.bias, SKIP_SCALE)),
                attention=attention,
            )

        self.encoder = []
        for name, module in net.enc.items():
            if isinstance(module, UNetBlock):
                self.encoder.append(block(module))
            else:  # the first level's input conv
                assert isinstance(module, Conv2d) and name.endswith("_conv")
                self.input_conv = (w(module.weight), w(module.bias))
        self.decoder = []
        for name, module in net.dec.items():
            if isinstance(module, UNetBlock):
                self.decoder.append(("cat" if "_block" in name else "", block(module)))
            elif name.endswith("aux_norm"):
                self.out_norm = norm_of(module, dtype, device)
            elif name.endswith("aux_conv"):
                self.out_conv = (w(module.weight), w(module.bias))
        self.emb_weight = torch.cat(emb_w).to(device=device, dtype=dtype)
        self.emb_bias = torch.cat(emb_b).to(device=device, dtype=dtype)

    def forward(self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None) -> Tensor:
        args = noise_labels.float()[:, None] * self.freqs[None]
        emb = torch.cat([torch.sin(args), torch.cos(args)], dim=1).to(self.dtype)
        if self.label is not None:
            emb = emb + F.embedding(class_labels, self.label, None) + self.label_bias
        (w0, b0), (w1, b1) = self.layers
        emb = F.silu(F.linear(F.silu(F.linear(emb, w0, b0)), w1, b1))
        emb_all = F.linear(emb, self.emb_weight, self.emb_bias)  # every block's affine (+ conv0 bias) at once

        h = conv(x, *self.input_conv)
        skips = [Pending(h)]
        h = Pending(h)
        for b in self.encoder:
            h = self._block(b, h, emb_all)
            skips.append(h)
        for kind, b in self.decoder:
            if kind == "cat":
                h = Pending(torch.cat([h.materialize(), skips.pop().materialize()], dim=1))
            h = self._block(b, h, emb_all)
        y, _ = norm_act(h, self.out_norm)
        return conv(y, *self.out_conv)

    @staticmethod
    def _block(b: _Block, h: Pending, emb_all: Tensor) -> Pending:
        y, x = norm_act(h, b.norm0)
        y, x = resample(y, b.resample), resample(x, b.resample)
        y = conv(y, b.conv0, None)
        y, _ = norm_act(y, b.norm1, pre_add=emb_all[:, b.emb])
        y = conv(y, *b.conv1)
        out = Pending(y, conv(x, *b.skip)) if b.skip is not None else Pending(y, x, SKIP_SCALE)
        if b.attention is None:
            return out
        norm2, qkv_w, qkv_b, proj_w, proj_b, heads, scale = b.attention
        y, x = norm_act(out, norm2, silu=False)
        rows = self_attention(y, qkv_w, qkv_b, heads, scale)
        return Pending(rows_to_nhwc(F.linear(rows, proj_w, proj_b), y.shape[2], y.shape[3]), x, SKIP_SCALE)
