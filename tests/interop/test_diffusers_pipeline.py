"""Round trips through diffusers itself (needs the test extras' diffusers): a cmfast model exported with
`cmfast export --format diffusers` samples in ConsistencyModelPipeline the images `cmfast sample` gives for the same
noise and time points, and a pipeline built and saved by diffusers loads in cmfast and samples the same images."""

import numpy as np
import pytest
import torch

import cmfast
from cmfast.cli import main
from cmfast.generate import generate, sampling_plan
from cmfast.interop.diffusers_layout import unet_kwargs
from cmfast.networks import ADMConfig, build_network

diffusers = pytest.importorskip("diffusers")

CLASS_COND = ADMConfig(
    image_size=16,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_head_channels=16,
    num_classes=4,
)
UNCOND_ADDITIVE = ADMConfig(
    image_size=16,
    model_channels=32,
    channel_mult=(1, 1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_head_channels=16,
    use_scale_shift_norm=False,
)


def _model(config, seed=0):
    torch.manual_seed(seed)
    net = build_network(config)
    for p in net.parameters():  # random everywhere (ADM zero-initialises its output convs)
        torch.nn.init.normal_(p, std=0.04)
    return cmfast.ConsistencyModel(net, noise_cond="adm").eval()


def _pipeline_images(pipe, n, seed, label, **steps):
    """diffusers' samples for seeds seed..seed+n-1, one generator per image as cmfast uses, in [-1, 1]."""
    gens = [torch.Generator().manual_seed(seed + i) for i in range(n)]
    labels = None if label is None else torch.full((n,), label)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=n, class_labels=labels, generator=gens, output_type="pt", **steps).images
    return out * 2 - 1  # the pipeline maps [-1, 1] to [0, 1]


def _cmfast_images(model, n, seed, label, ts=None):
    plan = sampling_plan(model, ts=ts, grid=40)
    x = generate(model, plan, num=n, batch=n, seed=seed, class_label=label, progress=False)
    return torch.from_numpy(x.images).permute(0, 3, 1, 2).float() / 127.5 - 1


@pytest.mark.parametrize("config, label", [(CLASS_COND, 2), (UNCOND_ADDITIVE, None)])
def test_exported_model_samples_the_same_in_diffusers(tmp_path, config, label):
    model = _model(config)
    cmfast.save_diffusers(model, tmp_path / "pipe")
    pipe = diffusers.ConsistencyModelPipeline.from_pretrained(tmp_path / "pipe")
    assert isinstance(pipe.unet, diffusers.UNet2DModel)
    for steps, ts in (
        ({"num_inference_steps": 1}, None),
        ({"num_inference_steps": None, "timesteps": [22, 0]}, [0, 22]),
    ):
        theirs = _pipeline_images(pipe, 3, 5, label, **steps)
        ours = _cmfast_images(model, 3, 5, label, ts)
        # ours is already rounded to uint8: within half a level plus float noise of the two networks
        assert (theirs - ours).abs().max() <= 1 / 127.5 + 1e-4, steps


def test_cli_export_then_pipeline_matches_cmfast_sample(tmp_path):
    model = _model(CLASS_COND, seed=1)
    cmfast.save(model, tmp_path / "m.safetensors")
    assert main(["export", str(tmp_path / "m.safetensors"), str(tmp_path / "pipe"), "--format", "diffusers"]) == 0
    args = ["--num", "4", "--batch", "4", "--seed", "3", "--class-label", "1", "--ts", "0,22", "--no-progress"]
    assert main(["sample", "--model", str(tmp_path / "m.safetensors"), "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["sample", "--model", str(tmp_path / "pipe"), "--out", str(tmp_path / "b"), *args]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz")["images"] for d in "ab")
    assert np.array_equal(a, b)  # the same weights through cmfast's loader, whichever layout they came from
    pipe = diffusers.ConsistencyModelPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    gens = [torch.Generator().manual_seed(3 + i) for i in range(4)]
    pil = pipe(batch_size=4, class_labels=[1] * 4, timesteps=[22, 0], num_inference_steps=None, generator=gens).images
    theirs = np.stack([np.asarray(im) for im in pil])
    assert np.abs(theirs.astype(int) - a.astype(int)).max() <= 1  # both round to uint8 on their own


def _saved_pipeline(tmp_path, config, seed=7, **scheduler):
    torch.manual_seed(seed)
    unet = diffusers.UNet2DModel(**unet_kwargs(config))
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.04)
    pipe = diffusers.ConsistencyModelPipeline(
        unet=unet, scheduler=diffusers.CMStochasticIterativeScheduler(**scheduler)
    )
    pipe.save_pretrained(tmp_path / "pipe")
    return pipe


@pytest.mark.parametrize("config, label", [(CLASS_COND, 3), (UNCOND_ADDITIVE, None)])
def test_pipeline_saved_by_diffusers_loads_in_cmfast(tmp_path, config, label):
    """diffusers builds and saves the pipeline (its own init, its own writer); cmfast reads it back."""
    pipe = _saved_pipeline(tmp_path, config, num_train_timesteps=40, sigma_min=0.002, sigma_max=80.0)
    model = cmfast.load(tmp_path / "pipe")
    for steps, ts in (
        ({"num_inference_steps": 1}, None),
        ({"num_inference_steps": None, "timesteps": [30, 0]}, [0, 30]),
    ):
        theirs = _pipeline_images(pipe, 2, 0, label, **steps)
        ours = _cmfast_images(model, 2, 0, label, ts)
        assert (theirs - ours).abs().max() <= 1 / 127.5 + 1e-4, steps


def test_one_head_per_block_at_several_widths_round_trips(tmp_path):
    """diffusers' attention_head_dim=None (one head per block) with attention at levels of different widths."""
    config = ADMConfig(
        image_size=16,
        model_channels=32,
        channel_mult=(1, 2, 3),
        num_res_blocks=1,
        attention_resolutions=(8, 4),
        num_head_channels=-1,
        num_heads=1,
    )
    pipe = _saved_pipeline(tmp_path, config)
    assert pipe.unet.config.attention_head_dim is None
    model = cmfast.load(tmp_path / "pipe")
    assert model.net.config == config
    theirs = _pipeline_images(pipe, 2, 0, None, num_inference_steps=1)
    assert (theirs - _cmfast_images(model, 2, 0, None)).abs().max() <= 1 / 127.5 + 1e-4
    cmfast.save_diffusers(model, tmp_path / "again")  # and back out


def test_scheduler_rho_sets_the_karras_grid(tmp_path):
    pipe = _saved_pipeline(tmp_path, UNCOND_ADDITIVE, rho=3.0)
    model = cmfast.load(tmp_path / "pipe")
    steps = {"num_inference_steps": None, "timesteps": [22, 0]}
    theirs = _pipeline_images(pipe, 2, 1, None, **steps)
    assert (theirs - _cmfast_images(model, 2, 1, None, ts=[0, 22])).abs().max() <= 1 / 127.5 + 1e-4


def test_weights_files_named_directly(tmp_path):
    """The fp16 variant when both files exist, and the torch.save (.bin) weights of a safe_serialization=False save."""
    pipe = _saved_pipeline(tmp_path, UNCOND_ADDITIVE)
    pipe.unet.save_pretrained(tmp_path / "pipe" / "unet", variant="fp16")  # same weights, other file
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.mul_(2)
    pipe.unet.to(torch.float16).save_pretrained(tmp_path / "pipe" / "unet", variant="fp16")
    plain = cmfast.load(tmp_path / "pipe")
    fp16 = cmfast.load(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    w_plain, w_fp16 = (next(m.net.parameters()) for m in (plain, fp16))
    assert torch.allclose(w_fp16, 2 * w_plain, rtol=1e-3, atol=1e-4)
    pipe.unet.to(torch.float32).save_pretrained(tmp_path / "bin", safe_serialization=False)
    from_bin = cmfast.load(tmp_path / "bin" / "diffusion_pytorch_model.bin")
    assert torch.allclose(next(from_bin.net.parameters()), w_fp16, rtol=1e-3, atol=1e-4)
