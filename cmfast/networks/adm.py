"""ADM U-Net (Dhariwal & Nichol 2021) as the official consistency-model code builds it (REFERENCE.md section 8).

Mirrors `UNetModel` of openai/consistency_models (cm/unet.py, attention_type="flash") layer for layer, with the same
module names, so the released checkpoints load with `load_state_dict(strict=True)`:

    time_embed.{0,2}  label_emb  input_blocks.N.M...  middle_block.{0,1,2}  output_blocks.N.M...  out.{0,2}

Details of the official network that matter for exact reproduction:
- The network's time input is the "timestep" 250 ln(sigma), computed by the caller (`preconditioning.c_noise`); its
  sinusoidal embedding puts the cosine half first.
- Attention convolutions are 2-D 1x1 (weights (3C, C, 1, 1)), not the 1-D ones of guided-diffusion.
- The released checkpoints were trained with flash attention, which reads the qkv channels as (3, heads, head_dim)
  with softmax scale 1/sqrt(head_dim).
- GroupNorm (32 groups, eps 1e-5) runs in at least float32 and casts back, so the torso can run in low precision.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import ops
from .configs import ADMConfig
from .recompute import norm_act_conv
from .song_unet import pixel_norm

QKV_LAYOUTS = ("3hd", "h3d")


def timestep_embedding(timesteps: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim): [cos(t f_i), sin(t f_i)] with f_i = max_period^(-i / (dim // 2)).

    Computed in float32 (float64 for float64 input): the official timesteps span about [-1550, 1100], where bfloat16
    would lose the phase entirely.
    """
    dtype = torch.promote_types(timesteps.dtype, torch.float32)
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=timesteps.device) / half)
    args = timesteps.to(dtype)[:, None] * freqs[None]
    embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(embedding, (0, dim % 2))  # odd dims get a zero column, as in the official code


def qkv_attention(qkv: Tensor, num_heads: int, layout: str = "3hd") -> Tensor:
    """Multi-head self-attention over a fused projection: (B, 3C, T) -> (B, C, T), output channels ordered (head, d).

    layout "3hd" reads the 3C channels as (3, heads, head_dim) (the flash-attention path of the released checkpoints);
    "h3d" as (heads, 3, head_dim) (legacy guided-diffusion). Softmax scale 1/sqrt(head_dim). Kept as a free function so
    a fused kernel can replace it.
    """
    batch, width, length = qkv.shape
    head_dim = width // (3 * num_heads)
    if layout == "3hd":
        q, k, v = qkv.reshape(batch, 3, num_heads, head_dim, length).unbind(1)
    else:
        q, k, v = qkv.reshape(batch, num_heads, 3, head_dim, length).unbind(2)
    # (B, heads, head_dim, T) -> (B, heads, T, head_dim), the layout scaled_dot_product_attention expects. Its fused
    # backends (flash, cuDNN, memory-efficient) need a unit-stride last dimension; from an NCHW qkv that takes a copy
    # (without it SDPA falls back to its math path, ~30x slower on an H100 at ADM-64's shapes), from a channels_last
    # one the views already have it.
    q, k, v = (t.transpose(-1, -2) for t in (q, k, v))
    q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out = F.scaled_dot_product_attention(q, k, v, scale=head_dim**-0.5)
    return out.transpose(-1, -2).reshape(batch, num_heads * head_dim, length)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in at least float32 and cast back to the input dtype (the official `GroupNorm32`)."""

    def forward(self, x: Tensor) -> Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)
        out = F.group_norm(x.to(dtype), self.num_groups, self.weight.to(dtype), self.bias.to(dtype), self.eps)
        return out.to(x.dtype)


def _norm_act(norm: GroupNorm32, x: Tensor, fused: bool, silu: bool = True, scale=None, shift=None) -> Tensor:
    """GroupNorm in float32, ADM's scale-shift norm(x) * (1 + scale) + shift when given, then SiLU; through the fused
    op (`cmfast.ops.group_norm_silu`, one read of x and one write) when `fused`."""
    if fused:
        return ops.group_norm_silu(x, norm.weight, norm.bias, norm.num_groups, norm.eps, scale, shift, silu)
    h = norm(x)
    if scale is not None:
        h = h * (1 + scale) + shift
    return F.silu(h) if silu else h


def _norm_act_conv(norm: GroupNorm32, x: Tensor, conv: nn.Conv2d, fused: bool, scale=None, shift=None) -> Tensor:
    """conv(_norm_act(norm, x, fused, scale=scale, shift=shift)); fused, it keeps only x for backward and recomputes
    the norm's output there (`cmfast.networks.recompute`)."""
    if fused and conv.stride == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1 and len(set(conv.padding)) == 1:
        return norm_act_conv(
            x, norm.weight, norm.bias, norm.num_groups, norm.eps, conv.weight, conv.bias, conv.padding[0], scale, shift
        )
    return conv(_norm_act(norm, x, fused, scale=scale, shift=shift))


def _normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


def _zero(module: nn.Module) -> nn.Module:
    """Zero-initialise a layer, as the official code does for the last conv of each residual branch and the output."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


def _resample(x: Tensor, mode: str | None) -> Tensor:
    if mode == "down":
        return F.avg_pool2d(x, 2)
    if mode == "up":
        return F.interpolate(x, scale_factor=2, mode="nearest")
    return x


class ResBlock(nn.Module):
    """Residual block conditioned on the embedding; `resample` "down"/"up" makes it a resolution-changing block.

    (B, in_channels, H, W), (B, emb_channels) -> (B, out_channels, H', W'), H' = H/2, H or 2H.
    """

    def __init__(
        self,
        in_channels: int,
        emb_channels: int,
        out_channels: int,
        dropout: float,
        use_scale_shift_norm: bool,
        resample: str | None = None,
        double_norm: bool = False,
    ):
        super().__init__()
        self.use_scale_shift_norm = use_scale_shift_norm
        self.double_norm = double_norm  # sCM's adaptive double normalisation: scale and shift pixel-normalised
        self.resample = resample
        self.in_layers = nn.Sequential(
            _normalization(in_channels), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm else out_channels)
        )
        self.out_layers = nn.Sequential(
            _normalization(out_channels),
            nn.SiLU(),
            nn.Dropout(dropout),
            _zero(nn.Conv2d(out_channels, out_channels, 3, padding=1)),
        )
        # The official blocks never use the 3x3 skip option: a 1x1 conv when the width changes, else identity.
        self.skip_connection = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)
        self.fused = False  # see `cmfast.networks.set_fused_ops`

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        # Resampling sits between the input activation and the input conv, on both branches.
        if self.resample is None:
            h = _norm_act_conv(self.in_layers[0], x, self.in_layers[2], self.fused)
        else:
            h = self.in_layers[2](_resample(_norm_act(self.in_layers[0], x, self.fused), self.resample))
        x = _resample(x, self.resample)
        emb_out = self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        scale = shift = None
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            if self.double_norm:
                scale, shift = pixel_norm(scale), pixel_norm(shift)
        else:
            h = h + emb_out
        dropout, conv = self.out_layers[2], self.out_layers[3]
        if self.training and dropout.p > 0:
            h = conv(dropout(_norm_act(self.out_layers[0], h, self.fused, scale=scale, shift=shift)))
        else:
            h = _norm_act_conv(self.out_layers[0], h, conv, self.fused, scale=scale, shift=shift)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Residual multi-head self-attention over all positions: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, num_heads: int, num_head_channels: int, qkv_layout: str):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(
                    f"attention width {channels} is not divisible by {num_head_channels} channels per head"
                )
            num_heads = channels // num_head_channels
        if channels % num_heads:
            raise ValueError(f"attention width {channels} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv_layout = qkv_layout
        self.norm = _normalization(channels)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = _zero(nn.Conv2d(channels, channels, 1))
        self.fused = False  # see `cmfast.networks.set_fused_ops`

    def forward(self, x: Tensor) -> Tensor:
        batch, channels, height, width = x.shape
        qkv = self.qkv(_norm_act(self.norm, x, self.fused, silu=False)).reshape(batch, 3 * channels, height * width)
        # the fused kernel where one can run (CUDA, or Triton's interpreter); its PyTorch fallback would keep the whole
        # T x T softmax for backward, where SDPA keeps far less, so without a kernel SDPA runs instead
        if self.fused and self.qkv_layout == "3hd" and ops.explain("attention", qkv, self.num_heads).backend != "torch":
            h = ops.attention(qkv, self.num_heads)
        else:
            h = qkv_attention(qkv, self.num_heads, self.qkv_layout)
        return x + self.proj_out(h.reshape(batch, channels, height, width))


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 conv (`op`), or 2x2 average pooling when conv_resample is off."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if use_conv else nn.AvgPool2d(2)

    def forward(self, x: Tensor) -> Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Double the resolution (nearest), then a 3x3 conv (`conv`) when conv_resample is on."""

    def __init__(self, channels: int, use_conv: bool):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if use_conv else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """Layers applied in turn, residual blocks also given the embedding (the official TimestepEmbedSequential)."""

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, ResBlock) else layer(x)
        return x


class ADMUNet(nn.Module):
    """The ADM U-Net F(x, timestep, class) of the official consistency models.

    forward: x (B, in_channels, H, W), noise_labels (B,) = 250 ln(sigma), class_labels (B,) int64 or None
    -> (B, out_channels, H, W) in x's dtype. H and W must be divisible by 2^(len(channel_mult) - 1).
    """

    def __init__(self, config: ADMConfig):
        super().__init__()
        if config.qkv_layout not in QKV_LAYOUTS:
            raise ValueError(f"unknown qkv_layout {config.qkv_layout!r}; expected one of {QKV_LAYOUTS}")
        if config.adaptive_double_norm and not config.use_scale_shift_norm:
            raise ValueError("adaptive_double_norm normalises the scale and shift: it needs use_scale_shift_norm=True")
        self.config = config
        c = config
        emb_channels = 4 * c.model_channels
        # Attention resolutions are feature-map sizes; blocks are placed by downsampling rate, as the official script
        # converts them (ds = image_size // res).
        attention_ds = {c.image_size // res for res in c.attention_resolutions}

        def res_block(cin: int, cout: int, resample: str | None = None) -> ResBlock:
            return ResBlock(
                cin, emb_channels, cout, c.dropout, c.use_scale_shift_norm, resample, c.adaptive_double_norm
            )

        def attention(channels: int) -> AttentionBlock:
            return AttentionBlock(channels, c.num_heads, c.num_head_channels, c.qkv_layout)

        self.time_embed = nn.Sequential(
            nn.Linear(c.model_channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels)
        )
        if c.num_classes > 0:
            self.label_emb = nn.Embedding(c.num_classes, emb_channels)
        # sCM's adaptive weighting w(t): a linear head on the timestep embedding, zero at initialisation
        self.logvar_head = _zero(nn.Linear(c.model_channels, 1)) if c.logvar_head else None

        ch = int(c.channel_mult[0] * c.model_channels)
        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(c.in_channels, ch, 3, padding=1))])
        skip_channels = [ch]  # widths of the features the decoder concatenates, in encoder order
        ds = 1
        for level, mult in enumerate(c.channel_mult):
            for _ in range(c.num_res_blocks):
                layers: list[nn.Module] = [res_block(ch, int(mult * c.model_channels))]
                ch = int(mult * c.model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skip_channels.append(ch)
            if level != len(c.channel_mult) - 1:
                down = res_block(ch, ch, "down") if c.resblock_updown else Downsample(ch, c.conv_resample)
                self.input_blocks.append(EmbedSequential(down))
                skip_channels.append(ch)
                ds *= 2

        self.middle_block = EmbedSequential(res_block(ch, ch), attention(ch), res_block(ch, ch))

        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(c.channel_mult))):
            for i in range(c.num_res_blocks + 1):
                layers = [res_block(ch + skip_channels.pop(), int(mult * c.model_channels))]
                ch = int(mult * c.model_channels)
                if ds in attention_ds:
                    layers.append(attention(ch))
                if level and i == c.num_res_blocks:
                    layers.append(res_block(ch, ch, "up") if c.resblock_updown else Upsample(ch, c.conv_resample))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))

        self.out = nn.Sequential(_normalization(ch), nn.SiLU(), _zero(nn.Conv2d(ch, c.out_channels, 3, padding=1)))
        self.fused = False  # see `cmfast.networks.set_fused_ops`

    def scaled_noise(self, noise_labels: Tensor) -> Tensor:
        """The noise labels times the config's time_scale (left alone at 1)."""
        scale = self.config.time_scale
        return noise_labels if scale == 1 else noise_labels * scale

    def logvar(self, noise_labels: Tensor) -> Tensor:
        """(B,) noise labels -> (B,) log-variance of sCM's adaptive weighting (needs logvar_head)."""
        if self.logvar_head is None:
            raise ValueError("this network has no logvar head (config logvar_head=False)")
        emb = timestep_embedding(self.scaled_noise(noise_labels), self.config.model_channels)
        return self.logvar_head(emb.to(self.logvar_head.weight.dtype)).reshape(-1).float()

    def forward(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None = None, return_logvar: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        if return_logvar:
            return self.forward(x, noise_labels, class_labels), self.logvar(noise_labels)
        if (class_labels is None) != (self.config.num_classes == 0):
            need = f"(B,) int64 class_labels in [0, {self.config.num_classes})" if self.config.num_classes else "none"
            raise ValueError(f"this ADMUNet has num_classes={self.config.num_classes}: class_labels must be {need}")
        weight = self.time_embed[0].weight
        emb = self.time_embed(
            timestep_embedding(self.scaled_noise(noise_labels), self.config.model_channels).to(weight.dtype)
        )
        if class_labels is not None:
            if class_labels.shape != (x.shape[0],):
                raise ValueError(f"class_labels must have shape ({x.shape[0]},), got {tuple(class_labels.shape)}")
            emb = emb + self.label_emb(class_labels)

        h = x
        skips = []
        for block in self.input_blocks:
            h = block(h, emb)
            skips.append(h)
        h = self.middle_block(h, emb)
        for block in self.output_blocks:
            h = block(torch.cat([h, skips.pop()], dim=1), emb)
        return _norm_act_conv(self.out[0], h, self.out[2], self.fused).to(x.dtype)


_BLOCK_KEY = re.compile(r"^(input_blocks|output_blocks)\.(\d+)\.(\d+)\.([a-z_]+)\.")
_LAYER_KINDS = {
    "in_layers": "res",
    "emb_layers": "res",
    "out_layers": "res",
    "skip_connection": "res",
    "norm": "attention",
    "qkv": "attention",
    "proj_out": "attention",
    "op": "downsample",
    "conv": "upsample",
}
_DEFAULT_ATTENTION_RESOLUTIONS = (32, 16, 8)


def adm_config_from_state_dict(
    state_dict: dict[str, Tensor], image_size: int | None = None, num_head_channels: int = 64
) -> ADMConfig:
    """Infer the ADMConfig of an official (guided-diffusion naming) state dict from its key names and shapes.

    Recovered from the weights: channels, classes, scale-shift norm, channel_mult, num_res_blocks, resblock_updown,
    conv_resample and the downsampling rates that carry attention. Not recoverable, hence arguments or defaults:
    - image_size: attention is placed by downsampling rate ds = image_size // resolution. When None, it is taken as
      the size for which the official default resolutions (32, 16, 8) give exactly the rates found (64 for the
      ImageNet-64 net, 256 for LSUN); a ValueError asks for it when no size fits.
    - num_head_channels (head count is invisible in the weights): default 64, that of every released checkpoint.
    - dropout (0.0) and qkv_layout ("3hd", that of the released checkpoints) keep the ADMConfig defaults.
    Only shapes are read, so a state dict of meta tensors works.
    """
    required = (
        "time_embed.0.weight",
        "input_blocks.0.0.weight",
        "middle_block.0.emb_layers.1.weight",
        "middle_block.0.out_layers.3.weight",
        "out.2.weight",
    )
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(f"not an ADM (guided-diffusion naming) state dict: missing {', '.join(missing)}")
    model_channels = state_dict["time_embed.0.weight"].shape[1]
    middle_width = state_dict["middle_block.0.out_layers.3.weight"].shape[0]
    use_scale_shift_norm = state_dict["middle_block.0.emb_layers.1.weight"].shape[0] == 2 * middle_width

    # kinds[prefix][block][sub-module] = "res" / "attention" / "downsample" / "upsample"
    kinds: dict[str, dict[int, dict[int, str]]] = {"input_blocks": {}, "output_blocks": {}}
    for key in state_dict:
        match = _BLOCK_KEY.match(key)
        if match and match[4] in _LAYER_KINDS:
            kinds[match[1]].setdefault(int(match[2]), {})[int(match[3])] = _LAYER_KINDS[match[4]]
    n_in, n_out = max(kinds["input_blocks"], default=0) + 1, max(kinds["output_blocks"], default=-1) + 1

    # Up-samplers are the decoder's residual or conv layers after sub-module 0; parameter-free ones (no conv, no
    # resblock_updown) are invisible there but leave key-less average-pooling blocks in the encoder.
    outputs = kinds["output_blocks"]
    ups = [j for j in range(n_out) if any(k in ("res", "upsample") for m, k in outputs.get(j, {}).items() if m > 0)]
    pools = [i for i in range(1, n_in) if i not in kinds["input_blocks"]]
    levels = 1 + (len(ups) or len(pools))
    num_res_blocks = n_out // levels - 1
    expected_ups = [k * (num_res_blocks + 1) + num_res_blocks for k in range(levels - 1)]
    if num_res_blocks < 0 or n_in != n_out or n_out != levels * (num_res_blocks + 1) or ups not in ([], expected_ups):
        raise ValueError("unrecognised ADM block structure: input/output blocks do not form a U-Net")
    resblock_updown = any(outputs[j][max(outputs[j])] == "res" for j in ups)

    # Level l's widths are the outputs of its decoder blocks; attention sits at that level's rate 2^l.
    channel_mult = []
    attention_ds = set()
    for level in range(levels):
        j = (levels - 1 - level) * (num_res_blocks + 1)
        width = state_dict[f"output_blocks.{j}.0.out_layers.3.weight"].shape[0]
        if width % model_channels:
            raise ValueError(f"level {level} width {width} is not a multiple of model_channels {model_channels}")
        channel_mult.append(width // model_channels)
        if "attention" in outputs[j].values():
            attention_ds.add(2**level)

    if image_size is None:
        if not attention_ds:
            raise ValueError("cannot infer image_size (no attention outside the middle block); pass image_size")
        image_size = 8 * max(attention_ds)
        default_ds = {image_size // res for res in _DEFAULT_ATTENTION_RESOLUTIONS} & {2**lv for lv in range(levels)}
        if attention_ds != default_ds:
            raise ValueError(
                f"attention at downsampling rates {sorted(attention_ds)} matches no image size under the default "
                f"attention resolutions {_DEFAULT_ATTENTION_RESOLUTIONS}; pass image_size"
            )
    attention_resolutions = tuple(sorted({image_size // ds for ds in attention_ds}, reverse=True))

    return ADMConfig(
        image_size=image_size,
        in_channels=state_dict["input_blocks.0.0.weight"].shape[1],
        out_channels=state_dict["out.2.weight"].shape[0],
        model_channels=model_channels,
        channel_mult=tuple(channel_mult),
        num_res_blocks=num_res_blocks,
        attention_resolutions=attention_resolutions,
        num_head_channels=num_head_channels,
        num_classes=state_dict["label_emb.weight"].shape[0] if "label_emb.weight" in state_dict else 0,
        use_scale_shift_norm=use_scale_shift_norm,
        resblock_updown=resblock_updown,
        conv_resample=not pools,
    )
