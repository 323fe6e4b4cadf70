"""ADMUNet against the official architecture: parameter counts, state-dict names, an independent functional forward in
float64, config inference from state dicts, errors and low precision. CPU only; the paper-size nets live on the meta
device."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from cmfast.networks.adm import ADMUNet, adm_config_from_state_dict
from cmfast.networks.configs import NETWORK_PRESETS, ADMConfig

# Small but complete: 3 levels, classes, scale-shift, residual up/down, attention at two rates with 4 and 6 heads.
SMALL = ADMConfig(
    image_size=16,
    in_channels=2,
    out_channels=3,
    model_channels=32,
    channel_mult=(1, 2, 3),
    num_res_blocks=2,
    attention_resolutions=(8, 4),
    num_head_channels=16,
    num_classes=7,
)


def _meta_net(config: ADMConfig) -> ADMUNet:
    with torch.device("meta"):
        return ADMUNet(config)


def _num_params(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def _closed_form_param_count(c: ADMConfig) -> int:
    """Parameter count of the official UNetModel, summed layer by layer from its channel bookkeeping."""
    emb = 4 * c.model_channels
    emb_out = 2 if c.use_scale_shift_norm else 1

    def res(cin, cout):
        norms = 2 * cin + 2 * cout
        convs = 9 * cin * cout + cout + 9 * cout * cout + cout
        skip = cin * cout + cout if cin != cout else 0
        return norms + convs + emb * emb_out * cout + emb_out * cout + skip

    def attn(ch):
        return 2 * ch + 3 * ch * ch + 3 * ch + ch * ch + ch

    def resample(ch):
        return res(ch, ch) if c.resblock_updown else (9 * ch * ch + ch) * c.conv_resample

    widths = [m * c.model_channels for m in c.channel_mult]
    attn_levels = {lv for lv in range(len(widths)) if c.image_size // 2**lv in c.attention_resolutions}
    total = c.model_channels * emb + emb + emb * emb + emb + c.num_classes * emb
    total += 9 * c.in_channels * widths[0] + widths[0]
    skips, ch = [widths[0]], widths[0]
    for lv, w in enumerate(widths):
        for _ in range(c.num_res_blocks):
            total += res(ch, w) + (attn(w) if lv in attn_levels else 0)
            skips.append(ch := w)
        if lv < len(widths) - 1:
            total += resample(w)
            skips.append(w)
    total += 2 * res(ch, ch) + attn(ch)
    for lv in reversed(range(len(widths))):
        for i in range(c.num_res_blocks + 1):
            total += res(ch + skips.pop(), widths[lv]) + (attn(widths[lv]) if lv in attn_levels else 0)
            ch = widths[lv]
            if lv and i == c.num_res_blocks:
                total += resample(ch)
    return total + 2 * ch + 9 * ch * c.out_channels + c.out_channels


def test_imagenet64_parameter_count():
    # 295.9M: REFERENCE.md section 8 (the paper's ImageNet-64 ADM).
    n = _num_params(_meta_net(NETWORK_PRESETS["adm-imagenet64"]))
    assert abs(n - 295.9e6) / 295.9e6 < 1e-3
    assert n == _closed_form_param_count(NETWORK_PRESETS["adm-imagenet64"])


def test_lsun256_parameter_count():
    # 526,304,771 is also what the official cm/unet.py UNetModel gives for this config (checked when writing this).
    net = _meta_net(NETWORK_PRESETS["adm-lsun256"])
    assert _num_params(net) == _closed_form_param_count(NETWORK_PRESETS["adm-lsun256"]) == 526_304_771


@pytest.mark.parametrize("name", ["adm-tiny", "adm-tiny32"])
def test_tiny_presets_are_small(name):
    n = _num_params(_meta_net(NETWORK_PRESETS[name]))
    assert 0.2e6 <= n <= 5e6
    assert n == _closed_form_param_count(NETWORK_PRESETS[name])


def test_official_state_dict_names_and_shapes():
    shapes = {k: tuple(v.shape) for k, v in _meta_net(NETWORK_PRESETS["adm-imagenet64"]).state_dict().items()}
    assert shapes["time_embed.0.weight"] == (768, 192)
    assert shapes["time_embed.2.weight"] == (768, 768)
    assert shapes["label_emb.weight"] == (1000, 768)
    assert shapes["input_blocks.0.0.weight"] == (192, 3, 3, 3)
    assert shapes["input_blocks.1.0.emb_layers.1.weight"] == (384, 768)  # scale and shift
    assert shapes["input_blocks.4.0.in_layers.2.weight"] == (192, 192, 3, 3)  # first down-sampling resblock
    assert shapes["input_blocks.5.0.skip_connection.weight"] == (384, 192, 1, 1)
    assert shapes["input_blocks.5.1.qkv.weight"] == (1152, 384, 1, 1)  # attention at 32x32; 2-D 1x1 convs
    assert shapes["middle_block.1.qkv.weight"] == (2304, 768, 1, 1)
    assert shapes["middle_block.1.proj_out.weight"] == (768, 768, 1, 1)
    assert shapes["middle_block.2.out_layers.3.weight"] == (768, 768, 3, 3)
    assert shapes["output_blocks.0.0.in_layers.0.weight"] == (1536,)
    assert shapes["output_blocks.3.2.in_layers.0.weight"] == (768,)  # up-sampling resblock after attention
    assert shapes["output_blocks.11.2.in_layers.0.weight"] == (384,)  # last up-sampler, 32x32 -> 64x64
    assert shapes["out.0.weight"] == (192,)
    assert shapes["out.2.weight"] == (3, 192, 3, 3)
    assert "input_blocks.1.0.skip_connection.weight" not in shapes  # equal widths: identity skip
    assert "output_blocks.12.1.qkv.weight" not in shapes  # no attention at 64x64
    assert "output_blocks.11.1.qkv.weight" in shapes  # last block at 32x32, before its up-sampler

    lsun = _meta_net(NETWORK_PRESETS["adm-lsun256"]).state_dict()
    assert lsun["output_blocks.2.2.in_layers.0.weight"].shape == (1024,)  # up-sampling resblock, 8x8 -> 16x16
    assert lsun["input_blocks.1.0.emb_layers.1.weight"].shape == (256, 1024)  # no scale-shift
    assert "label_emb.weight" not in lsun

    plain = _meta_net(dataclasses.replace(SMALL, resblock_updown=False)).state_dict()
    assert plain["input_blocks.3.0.op.weight"].shape == (32, 32, 3, 3)
    assert plain["output_blocks.2.2.conv.weight"].shape == (96, 96, 3, 3)


def _random_state_dict(config: ADMConfig, seed: int) -> dict[str, torch.Tensor]:
    """Official-named float64 weights, all random (zero-initialised layers too), scaled to keep activations O(1)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for key, value in _meta_net(config).state_dict().items():
        noise = torch.randn(value.shape, generator=g, dtype=torch.float64)
        if key == "label_emb.weight":
            state[key] = noise
        elif value.ndim > 1:
            state[key] = noise / math.sqrt(value[0].numel())
        elif key.endswith("weight"):  # GroupNorm gains
            state[key] = 1 + 0.2 * noise
        else:
            state[key] = 0.2 * noise
    return state


def _reference_forward(sd, c, x, timesteps, class_labels):
    """The official UNetModel forward, written as plain functional code over the state dict (float64)."""
    used = set()

    def p(name):
        used.add(name)
        return sd[name]

    def gn(h, prefix):
        return F.group_norm(h, 32, p(f"{prefix}.weight"), p(f"{prefix}.bias"), eps=1e-5)

    def conv(h, prefix, **kwargs):
        return F.conv2d(h, p(f"{prefix}.weight"), p(f"{prefix}.bias"), **kwargs)

    def up(h):
        return h.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)

    def down(h):
        return (h[:, :, 0::2, 0::2] + h[:, :, 1::2, 0::2] + h[:, :, 0::2, 1::2] + h[:, :, 1::2, 1::2]) / 4

    def resblock(prefix, h, resample=None):
        a = F.silu(gn(h, f"{prefix}.in_layers.0"))
        if resample:
            a, h = resample(a), resample(h)
        a = conv(a, f"{prefix}.in_layers.2", padding=1)
        e = F.linear(F.silu(emb), p(f"{prefix}.emb_layers.1.weight"), p(f"{prefix}.emb_layers.1.bias"))
        e = e[:, :, None, None]
        width = a.shape[1]
        if e.shape[1] == 2 * width:
            a = gn(a, f"{prefix}.out_layers.0") * (1 + e[:, :width]) + e[:, width:]
        else:
            a = gn(a + e, f"{prefix}.out_layers.0")
        a = conv(F.silu(a), f"{prefix}.out_layers.3", padding=1)
        skip = conv(h, f"{prefix}.skip_connection") if f"{prefix}.skip_connection.weight" in sd else h
        return skip + a

    def attention(prefix, h):
        b, ch, height, width = h.shape
        heads = ch // c.num_head_channels if c.num_head_channels > 0 else c.num_heads
        d = ch // heads
        qkv = conv(gn(h, f"{prefix}.norm"), f"{prefix}.qkv").reshape(b, 3 * ch, height * width)
        out = []
        for i in range(heads):
            if c.qkv_layout == "3hd":  # [all q | all k | all v], each head-major
                q, k, v = (qkv[:, j * ch + i * d : j * ch + (i + 1) * d] for j in range(3))
            else:  # [head 0: q k v | head 1: q k v | ...]
                q, k, v = (qkv[:, (3 * i + j) * d : (3 * i + j + 1) * d] for j in range(3))
            weights = torch.softmax(torch.einsum("bct,bcs->bts", q, k) / math.sqrt(d), dim=-1)
            out.append(torch.einsum("bts,bcs->bct", weights, v))
        return h + conv(torch.cat(out, dim=1).reshape(b, ch, height, width), f"{prefix}.proj_out")

    half = c.model_channels // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    angles = timesteps[:, None] * freqs
    emb = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)
    emb = F.linear(emb, p("time_embed.0.weight"), p("time_embed.0.bias"))
    emb = F.linear(F.silu(emb), p("time_embed.2.weight"), p("time_embed.2.bias"))
    if class_labels is not None:
        emb = emb + p("label_emb.weight")[class_labels]

    period = c.num_res_blocks + 1  # blocks per level; the encoder's down-sampler closes each level but the last
    n_blocks = len(c.channel_mult) * period
    h = conv(x, "input_blocks.0.0", padding=1)
    skips = [h]
    for i in range(1, n_blocks):
        prefix = f"input_blocks.{i}.0"
        if i % period:
            h = resblock(prefix, h)
            if f"input_blocks.{i}.1.qkv.weight" in sd:
                h = attention(f"input_blocks.{i}.1", h)
        elif f"{prefix}.in_layers.0.weight" in sd:
            h = resblock(prefix, h, down)
        elif f"{prefix}.op.weight" in sd:
            h = conv(h, f"{prefix}.op", stride=2, padding=1)
        else:
            h = down(h)
        skips.append(h)
    h = attention("middle_block.1", resblock("middle_block.0", h))
    h = resblock("middle_block.2", h)
    for j in range(n_blocks):
        h = resblock(f"output_blocks.{j}.0", torch.cat([h, skips.pop()], dim=1))
        m = 1
        if f"output_blocks.{j}.1.qkv.weight" in sd:
            h = attention(f"output_blocks.{j}.1", h)
            m = 2
        if j % period == period - 1 and j != n_blocks - 1:
            prefix = f"output_blocks.{j}.{m}"
            if f"{prefix}.in_layers.0.weight" in sd:
                h = resblock(prefix, h, up)
            elif f"{prefix}.conv.weight" in sd:
                h = conv(up(h), f"{prefix}.conv", padding=1)
            else:
                h = up(h)
    out = conv(F.silu(gn(h, "out.0")), "out.2", padding=1)
    assert used == set(sd), f"reference left parameters unused: {sorted(set(sd) - used)}"
    return out


def _inputs(config: ADMConfig, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, config.in_channels, 16, 8, generator=g, dtype=torch.float64)
    timesteps = 250 * torch.tensor([0.002, 1.3, 80.0], dtype=torch.float64).log()  # 250 ln(sigma), as the caller feeds
    labels = torch.tensor([0, 6, 3]) if config.num_classes else None
    return x, timesteps, labels


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"qkv_layout": "h3d"},
        {
            "num_classes": 0,
            "use_scale_shift_norm": False,
            "resblock_updown": False,
            "num_head_channels": -1,
            "num_heads": 2,
        },
        {"resblock_updown": False, "conv_resample": False},
    ],
    ids=["3hd", "h3d", "plain-2heads", "avgpool"],
)
def test_matches_independent_forward(changes):
    config = dataclasses.replace(SMALL, **changes)
    sd = _random_state_dict(config, seed=0)
    net = ADMUNet(config).double()
    net.load_state_dict(sd, strict=True)
    x, timesteps, labels = _inputs(config)
    with torch.no_grad():
        out = net(x, timesteps, labels)
    expected = _reference_forward(sd, config, x, timesteps, labels)
    assert out.shape == (3, config.out_channels, 16, 8)
    assert expected.abs().max() > 0.1  # the zero-initialised layers really carry random weights
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-10)


def test_qkv_layout_changes_the_output():
    sd = _random_state_dict(SMALL, seed=0)
    x, timesteps, labels = _inputs(SMALL)
    outputs = []
    for layout in ("3hd", "h3d"):
        net = ADMUNet(dataclasses.replace(SMALL, qkv_layout=layout)).double()
        net.load_state_dict(sd, strict=True)
        with torch.no_grad():
            outputs.append(net(x, timesteps, labels))
    assert (outputs[0] - outputs[1]).abs().max() > 1e-3


def test_initial_output_is_zero():
    # The official output conv and residual-branch convs start at zero.
    net = ADMUNet(NETWORK_PRESETS["adm-tiny"])
    x = torch.randn(2, 3, 16, 16)
    assert torch.equal(net(x, torch.tensor([10.0, -300.0]), torch.tensor([1, 9])), torch.zeros_like(x))


@pytest.mark.parametrize("name", ["adm-imagenet64", "adm-lsun256"])
def test_config_from_state_dict_infers_image_size(name):
    assert adm_config_from_state_dict(_meta_net(NETWORK_PRESETS[name]).state_dict()) == NETWORK_PRESETS[name]


@pytest.mark.parametrize(
    "config",
    [
        NETWORK_PRESETS["adm-tiny"],
        NETWORK_PRESETS["adm-tiny32"],
        dataclasses.replace(SMALL, resblock_updown=False, conv_resample=False),
    ],
    ids=["adm-tiny", "adm-tiny32", "avgpool"],
)
def test_config_from_state_dict_with_image_size(config):
    sd = _meta_net(config).state_dict()
    with pytest.raises(ValueError, match="pass image_size"):
        adm_config_from_state_dict(sd)  # attention placement fits no size under the default (32, 16, 8)
    inferred = adm_config_from_state_dict(sd, image_size=config.image_size, num_head_channels=config.num_head_channels)
    assert inferred == config


def test_config_from_non_adm_state_dict():
    with pytest.raises(ValueError, match="not an ADM"):
        adm_config_from_state_dict({"map_noise.freqs": torch.zeros(64), "enc.32x32_conv.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="not an ADM"):
        adm_config_from_state_dict(
            {"model": _meta_net(NETWORK_PRESETS["adm-tiny"]).state_dict()}
        )  # a wrapped checkpoint


def test_class_label_errors():
    net = ADMUNet(NETWORK_PRESETS["adm-tiny"])
    x, t = torch.randn(2, 3, 16, 16), torch.zeros(2)
    with pytest.raises(ValueError, match="num_classes=10"):
        net(x, t)
    with pytest.raises(ValueError, match="shape"):
        net(x, t, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="num_classes=0"):
        ADMUNet(NETWORK_PRESETS["adm-tiny32"])(torch.randn(2, 3, 32, 32), t, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="qkv_layout"):
        ADMUNet(dataclasses.replace(SMALL, qkv_layout="hd3"))


def test_runs_under_bf16_autocast():
    config = NETWORK_PRESETS["adm-tiny"]
    net = ADMUNet(config)
    net.load_state_dict({k: v.float() for k, v in _random_state_dict(config, seed=2).items()})
    x = torch.randn(2, 3, 16, 16)
    t, labels = 250 * torch.tensor([0.5, 20.0]).log(), torch.tensor([3, 7])
    with torch.no_grad():
        expected = net(x, t, labels)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = net(x, t, labels)
    assert out.dtype == torch.float32
    assert (out - expected).norm() / expected.norm() < 0.05


def test_official_file_through_the_loader_matches_the_reference(tmp_path):
    """The whole chain: an official-style .pt file -> load_official_checkpoint -> consistency function, against
    the paper's boundary-condition scalings around the independent functional forward with 250 ln(sigma) input."""
    from cmfast import load_official_checkpoint

    # Attention at 32, 16, 8 of 32 (rates 1, 2, 4), so the loader can infer image_size 32 from where attention sits;
    # 64-channel heads (the official default, not stored in the weights) give 1, 2 and 3 heads per level.
    config = dataclasses.replace(
        SMALL, in_channels=3, image_size=32, attention_resolutions=(32, 16, 8), model_channels=64, num_head_channels=64
    )
    sd = {k: v.float() for k, v in _random_state_dict(config, seed=3).items()}
    path = tmp_path / "cd_small_l2.pt"
    torch.save(sd, path)
    f = load_official_checkpoint(path).double()
    assert f.net.config == config and f.noise_cond == "adm"
    x, _, labels = _inputs(config)
    sigma = torch.tensor([0.002, 1.3, 80.0], dtype=torch.float64)
    with torch.no_grad():
        out = f(x, sigma, labels)
    s, eps, sd_ = sigma.reshape(-1, 1, 1, 1), 0.002, 0.5
    c_skip = sd_**2 / ((s - eps) ** 2 + sd_**2)
    c_out = sd_ * (s - eps) / (sd_**2 + s**2).sqrt()
    F_x = _reference_forward(
        {k: v.double() for k, v in sd.items()}, config, x / (s**2 + sd_**2).sqrt(), 250 * sigma.log(), labels
    )
    torch.testing.assert_close(out, c_skip * x + c_out * F_x, rtol=0, atol=1e-10)
    assert torch.equal(out[0], x[0])  # sigma_min: the boundary condition
