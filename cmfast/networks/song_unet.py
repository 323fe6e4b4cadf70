"""DDPM++ / NCSN++ U-Net (Song et al. 2021) as EDM (Karras et al. 2022) re-implements it in `training/networks.py`.

Module and parameter names follow EDM's `SongUNet` (`map_noise`, `map_layer0`, `enc['16x16_block0'].conv0`, ...), so its
checkpoints load with `load_state_dict` unchanged. The network sees c_noise = ln(sigma) / 4 only; preconditioning
(c_skip, c_out, c_in) lives with the caller.

`group_norm_silu` runs through the fused `cmfast.ops.group_norm_silu` when a block's `fused` flag is set
(`cmfast.networks.set_fused_ops`). `attention` always runs in PyTorch: its qkv channels are in EDM's (heads, C / heads,
3) order, which `cmfast.ops.attention` (channels (3, heads, head_dim), ADM's layout) does not read.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .configs import SongUNetConfig
from .recompute import norm_act_conv

# Constants of EDM's DDPM++ / NCSN++ configuration (fixed there too, not exposed as options).
SKIP_SCALE = math.sqrt(0.5)  # residual sums are scaled to keep unit variance
GROUP_NORM_EPS = 1e-6  # SongUNet passes eps=1e-6 to every GroupNorm
INIT_ZERO = 1e-5  # weight scale of the last conv of each branch: near zero, so every block starts close to identity
INIT_ATTN = math.sqrt(0.2)  # weight scale of the qkv projection
MAX_POSITIONS = 10000  # lowest positional-embedding frequency is 1 / MAX_POSITIONS
PIXEL_NORM_EPS = 1e-4  # adaptive double normalisation: v / sqrt(mean(v^2) + eps) over channels


def pixel_norm(v: Tensor, eps: float = PIXEL_NORM_EPS) -> Tensor:
    """(B, C, ...) -> each sample's channel vector divided by its root mean square (sCM's adaptive double
    normalisation applies it to the scale and to the shift); computed in at least float32."""
    dtype = torch.promote_types(v.dtype, torch.float32)
    w = v.to(dtype)
    return (w * torch.rsqrt(w.square().mean(dim=1, keepdim=True) + eps)).to(v.dtype)


def _xavier_uniform(shape: tuple[int, ...], fan_in: int, fan_out: int, scale: float) -> nn.Parameter:
    """U(-a, a) with a = scale * sqrt(6 / (fan_in + fan_out)); `torch.empty` honours a `torch.device` context (meta)."""
    bound = scale * math.sqrt(6 / (fan_in + fan_out))
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


def fir_filter(taps: tuple[int, ...]) -> Tensor:
    """(1, 1, k, k) separable 2-D FIR filter from 1-D taps, normalised to sum 1 (k = len(taps))."""
    f = torch.as_tensor(taps, dtype=torch.float32)
    return (f.outer(f) / f.sum().square())[None, None]


def fir_downsample_2x(x: Tensor, f: Tensor, padding: int) -> Tensor:
    """(B, C, H, W) -> (B, C, H/2, W/2): per-channel filter with the (1, 1, k, k) `f`, stride 2."""
    channels = x.shape[1]
    return F.conv2d(x, f.to(x.dtype).tile(channels, 1, 1, 1), groups=channels, stride=2, padding=padding)


def fir_upsample_2x(x: Tensor, f: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, C, 2H, 2W): zero-insertion then per-channel filter with 4 f (gain 4 keeps the mean)."""
    channels = x.shape[1]
    padding = (f.shape[-1] - 1) // 2
    weight = (4 * f).to(x.dtype).tile(channels, 1, 1, 1)
    return F.conv_transpose2d(x, weight, groups=channels, stride=2, padding=padding)


def group_norm_silu(x: Tensor, norm: GroupNorm, fused: bool = False, scale=None, shift=None) -> Tensor:
    """SiLU(GroupNorm(x)) on (B, C, H, W); the pair every block applies before a conv; with (B, C, 1, 1) scale and
    shift, SiLU(GroupNorm(x) (1 + scale) + shift). fused: through `cmfast.ops.group_norm_silu` (one read of x, one
    write)."""
    if fused:
        return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift)
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.silu(h)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention over positions. q, k, v: (N, C, L) with N = batch * heads -> (N, C, L).

    out[n, :, i] = sum_j softmax_j(q[n, :, i] . k[n, :, j] / sqrt(C)) v[n, :, j]. The logits and softmax run in at least
    fp32 whatever the autocast dtype, as in EDM's AttentionOp; inputs and output keep the caller's dtype.
    """
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        logits = torch.einsum("ncq,nck->nqk", q.to(dtype), k.to(dtype)) / math.sqrt(q.shape[1])
        out = torch.einsum("nqk,nck->ncq", logits.softmax(dim=2), v.to(dtype))
    return out.to(v.dtype)


def group_norm_silu_conv(x: Tensor, norm: GroupNorm, conv: Conv2d, fused: bool = False, scale=None, shift=None):
    """conv(group_norm_silu(x, norm, fused, scale, shift)); fused and without resampling, only x is kept for backward
    and the norm's output recomputed there (`cmfast.networks.recompute`)."""
    if not fused or conv.up or conv.down or conv.weight is None:
        return conv(group_norm_silu(x, norm, fused, scale, shift))
    k = conv.weight.shape[-1]
    y = norm_act_conv(x, norm.weight, norm.bias, norm.num_groups, norm.eps, conv.weight, None, k // 2, scale, shift)
    return y + conv.bias.to(y.dtype)[:, None, None] if conv.bias is not None else y


class Linear(nn.Module):
    """Fully-connected layer with EDM's xavier-uniform init (bias starts at 0). (..., in) -> (..., out)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_weight: float = 1.0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = _xavier_uniform((out_features, in_features), in_features, out_features, init_weight)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv2d(nn.Module):
    """Same-padded convolution with optional 2x FIR up/down-sampling before it. (B, Cin, H, W) -> (B, Cout, H', W').

    kernel=0 gives a pure resampler without weights. `fused_resample` (down only) convolves at full resolution first
    and then filters with stride 2, as EDM's residual NCSN++ encoder does; this is a different map from filtering first.
    The filter is kept as a buffer, as in EDM, only when the layer resamples.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        resample_filter: tuple[int, ...] = (1, 1),
        fused_resample: bool = False,
        init_weight: float = 1.0,
    ):
        super().__init__()
        if up and down:
            raise ValueError("Conv2d cannot both up- and down-sample")
        if fused_resample and not (down and kernel):
            raise ValueError("fused_resample is implemented for down-sampling convolutions only")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fan_in, fan_out = in_channels * kernel * kernel, out_channels * kernel * kernel
        shape = (out_channels, in_channels, kernel, kernel)
        self.weight = _xavier_uniform(shape, fan_in, fan_out, init_weight) if kernel else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        self.register_buffer("resample_filter", fir_filter(resample_filter) if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w_pad = self.weight.shape[-1] // 2 if self.weight is not None else 0
        f = self.resample_filter
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample:
            x = fir_downsample_2x(F.conv2d(x, self.weight, padding=w_pad + f_pad), f, padding=0)
        else:
            if self.up:
                x = fir_upsample_2x(x, f)
            if self.down:
                x = fir_downsample_2x(x, f, padding=f_pad)
            if self.weight is not None:
                x = F.conv2d(x, self.weight, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype)[:, None, None]
        return x


class GroupNorm(nn.GroupNorm):
    """GroupNorm with min(32, C // 4) groups, so narrow layers keep at least 4 channels per group."""

    def __init__(self, num_channels: int, eps: float = GROUP_NORM_EPS):
        super().__init__(num_groups=min(32, num_channels // 4), num_channels=num_channels, eps=eps)


class UNetBlock(nn.Module):
    """DDPM++ residual block, optionally resampling and followed by self-attention. (B, Cin, H, W) -> (B, Cout, H', W').

    The embedding enters as a per-channel bias after conv0 (EDM's adaptive_scale=False, which SongUNet uses), or with
    `double_norm` as sCM's adaptive double normalisation: norm1(h) (1 + pixel_norm(scale)) + pixel_norm(shift).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        num_heads: int = 1,
        dropout: float = 0.0,
        resample_filter: tuple[int, ...] = (1, 1),
        double_norm: bool = False,
    ):
        super().__init__()
        self.double_norm = double_norm
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.num_heads = num_heads if attention else 0
        self.fused = False  # see `cmfast.networks.set_fused_ops`
        self.dropout = dropout

        self.norm0 = GroupNorm(in_channels)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if double_norm else 1))
        self.norm1 = GroupNorm(out_channels)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, init_weight=INIT_ZERO)
        # The shortcut needs weights when the width changes; when resampling, DDPM++ also gives it a 1x1 projection.
        self.skip = None
        if out_channels != in_channels or up or down:
            self.skip = Conv2d(in_channels, out_channels, kernel=1, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, init_weight=INIT_ATTN)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, init_weight=INIT_ZERO)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        """x: (B, Cin, H, W), emb: (B, emb_channels) -> (B, Cout, H', W')."""
        h = group_norm_silu_conv(x, self.norm0, self.conv0, self.fused)
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        scale = shift = None
        if self.double_norm:
            scale, shift = (pixel_norm(p) for p in params.chunk(2, dim=1))
        else:
            h = h + params
        if self.training and self.dropout > 0:
            h = self.conv1(F.dropout(group_norm_silu(h, self.norm1, self.fused, scale, shift), p=self.dropout))
        else:
            h = group_norm_silu_conv(h, self.norm1, self.conv1, self.fused, scale, shift)
        x = (h + (self.skip(x) if self.skip is not None else x)) * SKIP_SCALE
        if self.num_heads:
            x = (self.proj(self.self_attention(self.norm2(x))) + x) * SKIP_SCALE
        return x

    def self_attention(self, x: Tensor) -> Tensor:
        """(B, C, H, W) -> (B, C, H, W). The qkv channels are laid out as (heads, C / heads, 3), EDM's order."""
        b, c, h, w = x.shape
        q, k, v = self.qkv(x).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
        return attention(q, k, v).reshape(b, c, h, w)


class PositionalEmbedding(nn.Module):
    """DDPM++ noise embedding. (B,) -> (B, num_channels) = [sin(x f), cos(x f)], f_i = MAX_POSITIONS^(-i / (n/2 - 1)).

    The frequencies span [1 / MAX_POSITIONS, 1] inclusive (EDM's endpoint=True for SongUNet). EDM computes [cos, sin]
    and swaps the halves in SongUNet.forward; emitting [sin, cos] directly is the same map.
    """

    def __init__(self, num_channels: int):
        super().__init__()
        self.num_channels = num_channels

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = MAX_POSITIONS ** -(torch.arange(half, dtype=torch.float64, device=x.device) / (half - 1))
        x = x.outer(freqs.to(x.dtype))
        return torch.cat([x.sin(), x.cos()], dim=1)


class FourierEmbedding(nn.Module):
    """NCSN++ noise embedding. (B,) -> (B, num_channels) = [sin(2 pi x f), cos(2 pi x f)], f ~ N(0, scale^2).

    The random frequencies are a buffer, so they are saved with the weights. [sin, cos] is EDM's order after its swap.
    scale is 16 in EDM's NCSN++ and 0.02 in iCT's.
    """

    def __init__(self, num_channels: int, scale: float = 16.0):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = x.outer(2 * math.pi * self.freqs.to(x.dtype))
        return torch.cat([x.sin(), x.cos()], dim=1)


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, standard encoder) or NCSN++ (Fourier embedding, residual encoder, FIR filter).

    Levels run from img_resolution down by halves, one per entry of channel_mult. Each encoder level has num_blocks
    blocks (plus a down-sampling block after the first level); each decoder level has num_blocks + 1 blocks, each
    consuming one encoder skip. The output comes from the 'aux' head(s): GroupNorm, SiLU, 3x3 conv.
    """

    def __init__(self, config: SongUNetConfig):
        super().__init__()
        self.config = config
        c = config
        if c.embedding_type not in ("positional", "fourier"):
            raise ValueError(f"embedding_type must be 'positional' or 'fourier', got {c.embedding_type!r}")
        if c.encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"encoder_type must be 'standard', 'skip' or 'residual', got {c.encoder_type!r}")
        if c.decoder_type not in ("standard", "skip"):
            raise ValueError(f"decoder_type must be 'standard' or 'skip', got {c.decoder_type!r}")
        if c.img_resolution % 2 ** (len(c.channel_mult) - 1):
            raise ValueError(f"img_resolution {c.img_resolution} cannot be halved {len(c.channel_mult) - 1} times")

        emb_channels = c.model_channels * c.channel_mult_emb
        noise_channels = c.model_channels * c.channel_mult_noise
        block_kwargs = {
            "emb_channels": emb_channels,
            "dropout": c.dropout,
            "resample_filter": c.resample_filter,
            "double_norm": c.adaptive_double_norm,
        }

        # Mapping: noise (and class, augmentation) labels -> embedding vector fed to every block.
        self.map_noise = (
            PositionalEmbedding(noise_channels)
            if c.embedding_type == "positional"
            else FourierEmbedding(noise_channels, c.fourier_scale)
        )
        self.map_label = Linear(c.label_dim, noise_channels) if c.label_dim else None
        self.map_augment = Linear(c.augment_dim, noise_channels, bias=False) if c.augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels)
        self.map_layer1 = Linear(emb_channels, emb_channels)
        # sCM's adaptive weighting w(t): a linear head on the noise embedding, zero at initialisation
        self.map_logvar = Linear(noise_channels, 1, init_weight=0.0) if c.logvar_head else None

        # Encoder. 'aux' entries carry the downsampled input image alongside the features (skip / residual encoders).
        self.enc = nn.ModuleDict()
        cout = caux = c.in_channels
        for level, mult in enumerate(c.channel_mult):
            res = c.img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = Conv2d(cout, c.model_channels, kernel=3)
                cout = c.model_channels
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
                if c.encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(
                        caux, caux, kernel=0, down=True, resample_filter=c.resample_filter
                    )
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, kernel=1)
                if c.encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(
                        caux, cout, kernel=3, down=True, resample_filter=c.resample_filter, fused_resample=True
                    )
                    caux = cout
            for idx in range(c.num_blocks):
                attn = res in c.attn_resolutions
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cout, c.model_channels * mult, attention=attn, **block_kwargs
                )
                cout = c.model_channels * mult
        skips = [block.out_channels for name, block in self.enc.items() if "aux" not in name]

        # Decoder. Walks the levels back up; each '_block' concatenates the matching encoder output.
        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            res = c.img_resolution >> level
            if level == len(c.channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(c.num_blocks + 1):
                cin = cout + skips.pop()
                cout = c.model_channels * mult
                attn = idx == c.num_blocks and res in c.attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block_kwargs)
            if c.decoder_type == "skip" or level == 0:
                if c.decoder_type == "skip" and level < len(c.channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(
                        c.out_channels, c.out_channels, kernel=0, up=True, resample_filter=c.resample_filter
                    )
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, c.out_channels, kernel=3, init_weight=INIT_ZERO)

    def embed(self, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None) -> Tensor:
        """(B,) c_noise, (B,) int64 classes or None, (B, augment_dim) or None -> (B, emb_channels)."""
        # The sinusoids are computed at the labels' precision (float32 from the preconditioning), then cast to the
        # weights' dtype so a network converted with .to(bfloat16) also runs without autocast.
        emb = self.map_noise(self.scaled_noise(noise_labels)).to(self.map_layer0.weight.dtype)
        if self.map_label is not None:
            # Scaling by sqrt(label_dim) gives the one-hot vector unit mean square, the input scale the init assumes.
            one_hot = F.one_hot(class_labels.long(), self.config.label_dim).to(emb.dtype)
            emb = emb + self.map_label(one_hot * math.sqrt(self.config.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def scaled_noise(self, noise_labels: Tensor) -> Tensor:
        """The noise labels times the config's time_scale (left alone at 1)."""
        scale = self.config.time_scale
        return noise_labels if scale == 1 else noise_labels * scale

    def logvar(self, noise_labels: Tensor) -> Tensor:
        """(B,) noise labels -> (B,) log-variance of sCM's adaptive weighting (needs logvar_head)."""
        if self.map_logvar is None:
            raise ValueError("this network has no logvar head (config logvar_head=False)")
        emb = self.map_noise(self.scaled_noise(noise_labels)).to(self.map_logvar.weight.dtype)
        return self.map_logvar(emb).reshape(-1).float()

    def forward(
        self,
        x: Tensor,
        noise_labels: Tensor,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
        return_logvar: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, in_channels, R, R), noise_labels: (B,) c_noise = ln(sigma) / 4, class_labels: (B,) int64 class indices
        (required iff label_dim > 0), augment_labels: (B, augment_dim) or None -> (B, out_channels, R, R); with
        return_logvar, also the (B,) log-variance of the logvar head."""
        if return_logvar:
            return self.forward(x, noise_labels, class_labels, augment_labels), self.logvar(noise_labels)
        self._check_inputs(x, noise_labels, class_labels, augment_labels)
        emb = self.embed(noise_labels, class_labels, augment_labels)

        skips = []
        aux = x
        for name, block in self.enc.items():
            if "aux_down" in name:
                aux = block(aux)
            elif "aux_skip" in name:
                x = skips[-1] = x + block(aux)
            elif "aux_residual" in name:
                x = skips[-1] = aux = (x + block(aux)) * SKIP_SCALE
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)

        aux = None
        for name, block in self.dec.items():
            if "aux_up" in name:
                aux = block(aux)
            elif "aux_norm" in name:
                h = group_norm_silu(x, block)
            elif "aux_conv" in name:
                aux = block(h) if aux is None else block(h) + aux
            else:
                if "_block" in name:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

    def _check_inputs(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None
    ) -> None:
        """Clear errors for the mistakes a caller can make with the labels."""
        c = self.config
        batch = x.shape[0]
        if noise_labels.shape != (batch,):
            raise ValueError(f"noise_labels must have shape ({batch},), got {tuple(noise_labels.shape)}")
        if c.label_dim and class_labels is None:
            raise ValueError(f"this network is class-conditional (label_dim={c.label_dim}); pass class_labels")
        if not c.label_dim and class_labels is not None:
            raise ValueError("this network is unconditional (label_dim=0); class_labels must be None")
        if class_labels is not None and class_labels.shape != (batch,):
            raise ValueError(f"class_labels must be ({batch},) class indices, got shape {tuple(class_labels.shape)}")
        if augment_labels is not None and not c.augment_dim:
            raise ValueError("this network takes no augmentation labels (augment_dim=0); augment_labels must be None")
        if augment_labels is not None and augment_labels.shape != (batch, c.augment_dim):
            raise ValueError(
                f"augment_labels must have shape ({batch}, {c.augment_dim}), got {tuple(augment_labels.shape)}"
            )
