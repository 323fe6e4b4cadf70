"""SongUNet (DDPM++ / NCSN++) against parameter counts, closed-form formulas and float64 references. CPU only."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cmfast.networks.configs import NETWORK_PRESETS, SongUNetConfig
from cmfast.networks.song_unet import (
    Conv2d,
    FourierEmbedding,
    GroupNorm,
    PositionalEmbedding,
    SongUNet,
    attention,
    group_norm_silu,
)

SMALL_PRESETS = ["ddpmpp-tiny", "ddpmpp-digits", "ddpmpp-digits8", "ncsnpp-tiny"]


def _num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _meta_net(config: SongUNetConfig) -> SongUNet:
    with torch.device("meta"):
        return SongUNet(config)


def _random_net(config: SongUNetConfig, seed: int = 0) -> SongUNet:
    """The net with every parameter redrawn at unit-gain scale, so no branch starts near zero (EDM's init has 1e-5)."""
    torch.manual_seed(seed)
    net = SongUNet(config).eval()
    with torch.no_grad():
        for name, p in net.named_parameters():
            if p.dim() > 1:
                p.copy_(torch.randn_like(p) / math.sqrt(p[0].numel()))
            else:
                p.copy_(0.1 * torch.randn_like(p) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return net


def _inputs(config: SongUNetConfig, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    r = config.img_resolution
    x = torch.randn(batch, config.in_channels, r, r, generator=g)
    noise_labels = torch.log(torch.rand(batch, generator=g) * 80 + 0.002) / 4  # c_noise of sigma in [0.002, 80]
    class_labels = torch.randint(0, config.label_dim, (batch,), generator=g) if config.label_dim else None
    return x, noise_labels, class_labels


# ---------------------------------------------------------------------------------------------------------------------
# Parameter counts


@pytest.mark.parametrize(("preset", "paper_count"), [("ddpmpp-cifar10", 55.7e6), ("ncsnpp-cifar10", 56.4e6)])
def test_cifar10_parameter_counts_match_edm_paper(preset, paper_count):
    assert abs(_num_params(_meta_net(NETWORK_PRESETS[preset])) / paper_count - 1) < 0.005


# Counted by instantiating NVlabs/edm training/networks.py SongUNet with train.py's CIFAR-10 settings (augment_dim=9).
EDM_EXACT_COUNTS = {"ddpmpp-cifar10": 55_733_891, "ncsnpp-cifar10": 56_397_827}


@pytest.mark.parametrize("preset", sorted(EDM_EXACT_COUNTS))
def test_cifar10_parameter_counts_match_edm_code_exactly(preset):
    assert _num_params(_meta_net(NETWORK_PRESETS[preset])) == EDM_EXACT_COUNTS[preset]


def _closed_form_count(c: SongUNetConfig) -> int:
    """Parameters of DDPM++ / NCSN++ (standard or residual encoder, standard decoder), counted layer by layer."""
    emb = c.model_channels * c.channel_mult_emb
    noise = c.model_channels * c.channel_mult_noise

    def conv(cin, cout, k):
        return cin * cout * k * k + cout

    def block(cin, cout, resample=False, attn=False):
        n = 2 * cin + conv(cin, cout, 3) + (emb * cout + cout) + 2 * cout + conv(cout, cout, 3)
        n += conv(cin, cout, 1) if cin != cout or resample else 0  # projection shortcut
        n += 2 * cout + conv(cout, 3 * cout, 1) + conv(cout, cout, 1) if attn else 0  # norm2, qkv, proj
        return n

    total = (noise * emb + emb) + (emb * emb + emb)  # map_layer0, map_layer1
    total += c.label_dim * noise + noise if c.label_dim else 0
    total += c.augment_dim * noise
    widths = [c.model_channels * m for m in c.channel_mult]
    res = [c.img_resolution >> level for level in range(len(widths))]

    total += conv(c.in_channels, c.model_channels, 3)
    ch, aux_ch, skips = c.model_channels, c.in_channels, [c.model_channels]
    for level, width in enumerate(widths):
        if level:
            total += block(ch, ch, resample=True)
            skips.append(ch)
            if c.encoder_type == "residual":
                total += conv(aux_ch, ch, 3)
                aux_ch = ch
        for _ in range(c.num_blocks):
            total += block(ch, width, attn=res[level] in c.attn_resolutions)
            ch = width
            skips.append(ch)
    for level in reversed(range(len(widths))):
        if level == len(widths) - 1:
            total += block(ch, ch, attn=True) + block(ch, ch)
        else:
            total += block(ch, ch, resample=True)
        for idx in range(c.num_blocks + 1):
            total += block(
                ch + skips.pop(), widths[level], attn=idx == c.num_blocks and res[level] in c.attn_resolutions
            )
            ch = widths[level]
    return total + 2 * ch + conv(ch, c.out_channels, 3)  # aux_norm, aux_conv


@pytest.mark.parametrize(
    "config",
    [NETWORK_PRESETS[name] for name in [*SMALL_PRESETS, "ddpmpp-cifar10", "ncsnpp-cifar10"]]
    + [dataclasses.replace(NETWORK_PRESETS["ncsnpp-tiny"], label_dim=7, augment_dim=5, channel_mult=(1, 2, 3))],
)
def test_parameter_count_matches_closed_form(config):
    assert _num_params(_meta_net(config)) == _closed_form_count(config)


@pytest.mark.parametrize("preset", SMALL_PRESETS)
def test_small_presets_are_small(preset):
    assert 0.2e6 <= _num_params(_meta_net(NETWORK_PRESETS[preset])) <= 5e6


# ---------------------------------------------------------------------------------------------------------------------
# Building blocks against their formulas


def test_positional_embedding_formula():
    x = torch.randn(5, dtype=torch.float64) * 3
    out = PositionalEmbedding(32)(x).numpy()
    freqs = np.array([10000.0 ** (-i / 15) for i in range(16)])  # endpoint=True: 16 frequencies spanning [1e-4, 1]
    arg = x.numpy()[:, None] * freqs[None]
    np.testing.assert_allclose(out, np.concatenate([np.sin(arg), np.cos(arg)], axis=1), rtol=1e-12, atol=1e-12)


def test_fourier_embedding_formula():
    torch.manual_seed(0)
    emb = FourierEmbedding(1024)
    assert 14 < emb.freqs.std().item() < 18  # N(0, 16^2) frequencies
    x = torch.randn(4, dtype=torch.float64)
    arg = 2 * np.pi * x.numpy()[:, None] * emb.freqs.double().numpy()[None]
    expected = np.concatenate([np.sin(arg), np.cos(arg)], axis=1)
    np.testing.assert_allclose(emb(x).numpy(), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("scale", [16.0, 0.02])
def test_fourier_scale_comes_from_the_config(scale):
    """EDM's NCSN++ draws its frequencies with std 16, iCT's with std 0.02; the default keeps EDM's."""
    assert NETWORK_PRESETS["ncsnpp-cifar10"].fourier_scale == 16.0
    torch.manual_seed(0)
    config = dataclasses.replace(NETWORK_PRESETS["ncsnpp-tiny"], model_channels=512, fourier_scale=scale)
    freqs = SongUNet(config).map_noise.freqs
    assert freqs.numel() == 512 and 0.9 * scale < freqs.std().item() < 1.1 * scale


def test_fir_11_upsample_is_nearest_and_downsample_is_average_pool():
    x = torch.randn(3, 5, 6, 10, dtype=torch.float64)
    up = Conv2d(5, 5, kernel=0, up=True, resample_filter=(1, 1))
    down = Conv2d(5, 5, kernel=0, down=True, resample_filter=(1, 1))
    torch.testing.assert_close(up(x), F.interpolate(x, scale_factor=2, mode="nearest"), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2), rtol=1e-12, atol=1e-12)


def _fir_1d_down(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """y[i] = sum_j taps[j] xpad[2i + j] along `axis`, with (len(taps) - 1) // 2 zeros of padding each side."""
    pad = (len(taps) - 1) // 2
    x = np.moveaxis(x, axis, -1)
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(pad, pad)])
    n = x.shape[-1] // 2
    y = sum(taps[j] * xp[..., j : j + 2 * n : 2] for j in range(len(taps)))
    return np.moveaxis(y, -1, axis)


def _fir_1d_up(x: np.ndarray, taps: np.ndarray, axis: int) -> np.ndarray:
    """Scatter y[2i + j - pad] += 2 taps[j] x[i] along `axis` (zero insertion, then filter with gain 2 per axis)."""
    pad = (len(taps) - 1) // 2
    x = np.moveaxis(x, axis, -1)
    n = x.shape[-1]
    full = np.zeros(x.shape[:-1] + (2 * (n - 1) + len(taps),))
    for j in range(len(taps)):
        full[..., j : j + 2 * n : 2] += 2 * taps[j] * x
    return np.moveaxis(full[..., pad : pad + 2 * n], -1, axis)


def test_fir_1331_resampling_matches_separable_reference():
    taps = np.array([1.0, 3.0, 3.0, 1.0]) / 8
    x = torch.randn(2, 3, 8, 6, dtype=torch.float64)
    up = Conv2d(3, 3, kernel=0, up=True, resample_filter=(1, 3, 3, 1))(x).numpy()
    down = Conv2d(3, 3, kernel=0, down=True, resample_filter=(1, 3, 3, 1))(x).numpy()
    xn = x.numpy()
    np.testing.assert_allclose(up, _fir_1d_up(_fir_1d_up(xn, taps, 2), taps, 3), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(down, _fir_1d_down(_fir_1d_down(xn, taps, 2), taps, 3), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("channels", "groups"), [(32, 8), (96, 24), (256, 32)])
def test_group_norm_silu_formula(channels, groups):
    norm = GroupNorm(channels).double()
    assert norm.num_groups == groups
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(3, channels, 5, 7, dtype=torch.float64) * 2 + 1
    xg = x.reshape(3, groups, -1)
    mean, var = xg.mean(-1, keepdim=True), xg.var(-1, unbiased=False, keepdim=True)
    y = ((xg - mean) / torch.sqrt(var + 1e-6)).reshape_as(x) * norm.weight[:, None, None] + norm.bias[:, None, None]
    torch.testing.assert_close(group_norm_silu(x, norm), y * torch.sigmoid(y), rtol=1e-10, atol=1e-10)


def test_attention_matches_float64_sdpa():
    q, k, v = (torch.randn(6, 16, 37, dtype=torch.float64) for _ in range(3))  # (batch * heads, C, positions)
    expected = F.scaled_dot_product_attention(q.mT, k.mT, v.mT).mT
    torch.testing.assert_close(attention(q, k, v), expected, rtol=1e-10, atol=1e-10)
    with torch.autocast("cpu", torch.bfloat16):  # fp32 inputs must stay fp32 inside, as EDM's AttentionOp keeps them
        out = attention(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------------
# The whole network


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize(
    "config",
    [
        NETWORK_PRESETS["ddpmpp-tiny"],
        NETWORK_PRESETS["ncsnpp-tiny"],
        dataclasses.replace(NETWORK_PRESETS["ddpmpp-digits"], label_dim=10),
        dataclasses.replace(NETWORK_PRESETS["ncsnpp-tiny"], in_channels=3, out_channels=3, label_dim=4, augment_dim=9),
    ],
    ids=["ddpmpp-3ch", "ncsnpp-1ch", "ddpmpp-1ch-cond", "ncsnpp-3ch-cond-aug"],
)
def test_output_shape(config, batch):
    net = SongUNet(config).eval()
    assert net.config is config
    x, noise_labels, class_labels = _inputs(config, batch)
    augment_labels = torch.randn(batch, config.augment_dim) if config.augment_dim else None
    y = net(x, noise_labels, class_labels, augment_labels)
    assert y.shape == (batch, config.out_channels, config.img_resolution, config.img_resolution)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("preset", ["ddpmpp-tiny", "ncsnpp-tiny"])
def test_noise_labels_reach_output(preset):
    net = _random_net(NETWORK_PRESETS[preset])
    x, noise_labels, _ = _inputs(net.config, 3)
    with torch.no_grad():
        y0, y1 = net(x, noise_labels), net(x, noise_labels + 0.5)
    assert ((y1 - y0).flatten(1).norm(dim=1) > 1e-2 * y0.flatten(1).norm(dim=1)).all()


def test_class_and_augment_labels_reach_output():
    config = dataclasses.replace(NETWORK_PRESETS["ddpmpp-tiny"], label_dim=10, augment_dim=9)
    net = _random_net(config)
    x, noise_labels, class_labels = _inputs(config, 3)
    aug = torch.randn(3, 9)
    with torch.no_grad():
        y = net(x, noise_labels, class_labels, aug)
        y_class = net(x, noise_labels, (class_labels + 1) % 10, aug)
        y_aug = net(x, noise_labels, class_labels, aug + 1)
    assert ((y_class - y).flatten(1).norm(dim=1) > 1e-2 * y.flatten(1).norm(dim=1)).all()
    assert ((y_aug - y).flatten(1).norm(dim=1) > 1e-2 * y.flatten(1).norm(dim=1)).all()


def test_label_errors_are_clear():
    conditional = SongUNet(dataclasses.replace(NETWORK_PRESETS["ncsnpp-tiny"], label_dim=10))
    x, noise_labels, _ = _inputs(conditional.config, 2)
    with pytest.raises(ValueError, match="class-conditional"):
        conditional(x, noise_labels)
    with pytest.raises(ValueError, match="class indices"):
        conditional(x, noise_labels, F.one_hot(torch.tensor([1, 2]), 10))
    unconditional = SongUNet(NETWORK_PRESETS["ncsnpp-tiny"])
    with pytest.raises(ValueError, match="unconditional"):
        unconditional(x, noise_labels, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="augment_dim=0"):
        unconditional(x, noise_labels, augment_labels=torch.randn(2, 9))
    with pytest.raises(ValueError, match="noise_labels"):
        unconditional(x, noise_labels[:1])


@pytest.mark.parametrize("preset", ["ddpmpp-tiny", "ncsnpp-tiny"])
def test_bf16_autocast_is_close_to_fp32(preset):
    net = _random_net(NETWORK_PRESETS[preset])
    x, noise_labels, _ = _inputs(net.config, 3)
    with torch.no_grad():
        y32 = net(x, noise_labels)
        with torch.autocast("cpu", torch.bfloat16):
            y16 = net(x, noise_labels)
    assert y16.dtype == torch.bfloat16  # autocast did run the convolutions in bf16
    assert ((y16.float() - y32).norm() / y32.norm()).item() < 0.05
