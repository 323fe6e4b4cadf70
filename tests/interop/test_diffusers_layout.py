"""The diffusers layout without diffusers: the config and key correspondence between ADM and UNet2DModel, folder
reading and writing, the refusals, and `cmfast.load`'s names, device, dtype and eval mode."""

import dataclasses
import json

import pytest
import torch

import cmfast
from cmfast.checkpoint import CheckpointError
from cmfast.interop import diffusers_layout as dl
from cmfast.networks import NETWORK_PRESETS, ADMConfig, build_network

# The UNet2DModel configs diffusers' scripts/convert_consistency_to_diffusers.py gives the OpenAI releases (values
# carried over from that script): ImageNet-64 (class-conditional, scale-shift) and LSUN-256 (unconditional, additive).
OPENAI_IMAGENET64 = {
    "sample_size": 64,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 3,
    "num_class_embeds": 1000,
    "block_out_channels": [192, 384, 576, 768],
    "attention_head_dim": 64,
    "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    "resnet_time_scale_shift": "scale_shift",
    "attn_norm_num_groups": 32,
    "upsample_type": "resnet",
    "downsample_type": "resnet",
}
OPENAI_LSUN256 = {
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "num_class_embeds": None,
    "block_out_channels": [256, 256, 512, 512, 1024, 1024],
    "attention_head_dim": 64,
    "down_block_types": ["ResnetDownsampleBlock2D"] * 3 + ["AttnDownBlock2D"] * 3,
    "up_block_types": ["AttnUpBlock2D"] * 3 + ["ResnetUpsampleBlock2D"] * 3,
    "resnet_time_scale_shift": "default",
    "upsample_type": "resnet",
    "downsample_type": "resnet",
}

SMALL = {  # the three ways an ADM maps: scale-shift + resnet resampling, additive, conv resampling
    "scale-shift": ADMConfig(
        image_size=16,
        model_channels=32,
        channel_mult=(1, 2, 3),
        num_res_blocks=2,
        attention_resolutions=(8, 4),
        num_head_channels=16,
        num_classes=5,
    ),
    "additive": ADMConfig(
        image_size=16,
        model_channels=32,
        channel_mult=(1, 1, 2),
        num_res_blocks=1,
        attention_resolutions=(4,),
        num_head_channels=16,
        use_scale_shift_norm=False,
    ),
    "conv-resample": ADMConfig(
        image_size=16,
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(8,),
        num_head_channels=32,
        resblock_updown=False,
    ),
}


def test_openai_conversions_are_the_official_networks():
    assert dl.adm_config_from_unet(OPENAI_IMAGENET64) == NETWORK_PRESETS["adm-imagenet64"]
    assert dl.adm_config_from_unet(OPENAI_LSUN256) == NETWORK_PRESETS["adm-lsun256"]


@pytest.mark.parametrize("name", [*SMALL, "adm-imagenet64", "adm-lsun256", "adm-tiny", "adm-tiny32"])
def test_config_round_trip(name):
    config = SMALL.get(name) or NETWORK_PRESETS[name]
    assert dl.adm_config_from_unet(dl.unet_config(config)) == config


@pytest.mark.parametrize("name", ["adm-imagenet64", "adm-lsun256", *SMALL])
def test_key_table_covers_both_state_dicts_once(name):
    config = SMALL.get(name) or NETWORK_PRESETS[name]
    pairs = dl.key_pairs(config)
    with torch.device("meta"):
        adm = build_network(config).state_dict()
    assert [p.adm for p in pairs] == list(adm)
    names = [n for p in pairs for n in p.diffusers]
    assert len(names) == len(set(names))
    # every attention block's q, k, v come from one qkv tensor, in that order
    qkv = [p for p in pairs if p.adm.endswith("qkv.weight")]
    assert qkv and all([n.rsplit(".", 2)[-2] for n in p.diffusers] == ["to_q", "to_k", "to_v"] for p in qkv)


@pytest.mark.parametrize("name", list(SMALL))
def test_state_round_trip_is_exact(name):
    config = SMALL[name]
    torch.manual_seed(0)
    state = build_network(config).state_dict()
    there = dl.to_diffusers_state(state, config)
    assert all(v.dim() == 2 for k, v in there.items() if ".to_" in k and k.endswith("weight"))
    back = dl.from_diffusers_state(there, config)
    assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)


def test_missing_and_extra_tensors_are_named():
    config = SMALL["additive"]
    there = dl.to_diffusers_state(build_network(config).state_dict(), config)
    there.pop("conv_in.weight")
    there["stray.weight"] = torch.zeros(1)
    with pytest.raises(dl.DiffusersLayoutError, match=r"1 missing \(conv_in.weight\); 1 unexpected \(stray.weight\)"):
        dl.from_diffusers_state(there, config)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"qkv_layout": "h3d"}, "qkv_layout 'h3d'"),
        ({"channel_mult": (2, 2)}, r"channel_mult\[0\] = 2"),
        ({"resblock_updown": False, "conv_resample": False}, "parameter-free resampling"),
        ({"num_head_channels": -1, "num_heads": 2}, "one head width for all attention blocks"),
    ],
)
def test_adm_variants_unet2dmodel_cannot_express_are_refused(change, message):
    config = dataclasses.replace(SMALL["scale-shift"], **change)
    with pytest.raises(dl.DiffusersLayoutError, match=message):
        dl.unet_config(config)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"time_embedding_type": "fourier"}, "time_embedding_type = 'fourier'"),
        ({"attn_norm_num_groups": None}, "middle attention without a norm"),
        ({"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"]}, "'CrossAttnDownBlock2D' has no ADM"),
        ({"norm_eps": 1e-6}, "norm_eps"),
        ({"up_block_types": ["UpBlock2D", "ResnetUpsampleBlock2D"]}, "different levels"),
        ({"_class_name": "UNet2DConditionModel"}, "only UNet2DModel"),
    ],
)
def test_unet_configs_adm_lacks_are_refused(change, message):
    base = {
        **OPENAI_IMAGENET64,
        "block_out_channels": [32, 64],
        "down_block_types": ["ResnetDownsampleBlock2D", "AttnDownBlock2D"],
        "up_block_types": ["AttnUpBlock2D", "ResnetUpsampleBlock2D"],
    }
    with pytest.raises(dl.DiffusersLayoutError, match=message):
        dl.adm_config_from_unet({**base, **change})


def _model(config: ADMConfig, seed: int = 0) -> cmfast.ConsistencyModel:
    torch.manual_seed(seed)
    net = build_network(config)
    for p in net.parameters():  # ADM zero-initialises its output convs; give every weight a value
        torch.nn.init.normal_(p, std=0.05)
    return cmfast.ConsistencyModel(net, sigma_min=0.002, sigma_max=80.0, noise_cond="adm").eval()


def test_folder_round_trip_keeps_weights_and_preconditioning(tmp_path):
    model = _model(SMALL["scale-shift"])
    model.sigma_max, model.sigma_data = 40.0, 0.25
    settings = cmfast.save_diffusers(model, tmp_path / "pipe", num_train_timesteps=201)
    assert settings.num_train_timesteps == 201
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["_class_name"] == "ConsistencyModelPipeline"
    scheduler = json.loads((tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["sigma_max"], scheduler["sigma_data"], scheduler["num_train_timesteps"]) == (40.0, 0.25, 201)
    for spec in ("pipe", "pipe/unet", "pipe/unet/diffusion_pytorch_model.safetensors"):
        loaded = cmfast.load(tmp_path / spec)
        assert isinstance(loaded, cmfast.ConsistencyModel) and not loaded.training
        assert (loaded.sigma_min, loaded.sigma_max, loaded.sigma_data) == (0.002, 40.0, 0.25)
        assert loaded.net.config == model.net.config
        assert all(torch.equal(a, b) for a, b in zip(loaded.net.state_dict().values(), model.net.state_dict().values()))
        assert loaded.diffusers_scheduler.num_train_timesteps == 201
    # a model read from diffusers keeps its grid when written back
    assert cmfast.save_diffusers(cmfast.load(tmp_path / "pipe"), tmp_path / "again").num_train_timesteps == 201


def test_unet_folder_without_scheduler_assumes_defaults_and_says_so(tmp_path):
    cmfast.save_diffusers(_model(SMALL["additive"]), tmp_path / "pipe")
    lone = tmp_path / "lone"
    (tmp_path / "pipe" / "unet").rename(lone)
    with pytest.warns(UserWarning, match="no scheduler config beside it"):
        model = cmfast.load(lone)
    assert (model.sigma_min, model.sigma_max, model.sigma_data) == (0.002, 80.0, 0.5)


def test_export_refusals_name_the_reason(tmp_path):
    with pytest.raises(CheckpointError, match="DDPM\\+\\+/NCSN\\+\\+"):
        cmfast.save_diffusers(cmfast.load("digits-cd"), tmp_path / "a")
    with pytest.raises(CheckpointError, match="EDMDenoiser is not a consistency model"):
        cmfast.save_diffusers(cmfast.load("digits-edm"), tmp_path / "b")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(CheckpointError, match="exists and is not an empty folder"):
        cmfast.save_diffusers(_model(SMALL["additive"]), tmp_path / "full")
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written left behind


def test_foreign_folders_are_refused_in_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="not a diffusers pipeline or model folder"):
        cmfast.load(tmp_path)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    with pytest.raises(CheckpointError, match="a StableDiffusionPipeline pipeline, not a ConsistencyModelPipeline"):
        cmfast.load(tmp_path)


def test_load_takes_shipped_names_device_dtype_and_gives_eval_mode():
    model = cmfast.load("digits-cd", device="cpu")
    assert not model.training and next(model.parameters()).dtype == torch.float32
    half = cmfast.load("digits-cd", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.net.parameters())
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 80
    full_out, half_out = model(z, 80.0), half(z, 80.0)
    assert half_out.dtype == torch.float32  # the preconditioning stays float32
    assert (full_out - half_out).abs().max() < 0.05 * full_out.abs().max()
    with pytest.raises(CheckpointError, match="dtype must be"):
        cmfast.load("digits-cd", dtype=torch.int8)
