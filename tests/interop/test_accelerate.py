"""cmfast.accelerate on a diffusers ConsistencyModelPipeline (CPU, reference backends): the patched pipeline gives the
unpatched one's images within the dtype's rounding, really runs cmfast's fused ops, and restores cleanly."""

import pytest
import torch

import cmfast
from cmfast import ops
from cmfast.interop.diffusers_layout import unet_kwargs
from cmfast.networks import ADMConfig

diffusers = pytest.importorskip("diffusers")

CONFIG = ADMConfig(
    image_size=16,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(8,),
    num_head_channels=16,
    num_classes=4,
)


def _pipeline(dtype=torch.float32, config=CONFIG):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(**unet_kwargs(config))
    with torch.no_grad():
        for p in unet.parameters():
            p.normal_(0, 0.04)
    scheduler = diffusers.CMStochasticIterativeScheduler(num_train_timesteps=40)
    pipe = diffusers.ConsistencyModelPipeline(unet=unet, scheduler=scheduler).to(dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _images(pipe, steps):
    gens = [torch.Generator().manual_seed(i) for i in range(3)]
    return pipe(batch_size=3, class_labels=[0, 1, 3], generator=gens, output_type="pt", **steps).images.float()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-5), (torch.bfloat16, 0.04)])
def test_accelerated_pipeline_gives_the_same_images(dtype, tol, monkeypatch):
    pipe = _pipeline(dtype)
    steps = {"num_inference_steps": None, "timesteps": [22, 0]}
    plain = _images(pipe, steps)
    calls = {"group_norm_silu": 0, "attention": 0}
    for name in calls:
        real = getattr(ops, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(ops, name, counted)
    assert cmfast.accelerate(pipe) is pipe and cmfast.interop.accelerate.is_accelerated(pipe)
    fast = _images(pipe, steps)
    assert (fast - plain).abs().max() <= tol
    # every norm and every attention block of the UNet went through the fused ops, once per step (two steps)
    norms = sum(isinstance(m, torch.nn.GroupNorm) for m in pipe.unet.modules())
    attention = sum(type(m).__name__ == "Attention" for m in pipe.unet.modules())
    assert attention == 4 and calls == {"group_norm_silu": 2 * norms, "attention": 2 * attention}
    cmfast.restore(pipe)
    assert "forward" not in pipe.unet.__dict__ and not cmfast.interop.accelerate.is_accelerated(pipe)
    assert torch.equal(_images(pipe, steps), plain)


def test_unet_forward_contract_is_kept():
    pipe = cmfast.accelerate(_pipeline())
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor(431.0), torch.tensor([1, 2])
    out = pipe.unet(x, t, class_labels=y)
    (tup,) = pipe.unet(x, t, class_labels=y, return_dict=False)
    assert torch.equal(out.sample, tup)
    cmfast.restore(pipe)
    assert (pipe.unet(x, t, class_labels=y).sample - tup).abs().max() < 1e-5


def test_refusals_are_one_line():
    pipe = _pipeline()
    with pytest.raises(ValueError, match="graph=True needs the UNet on a CUDA device"):
        cmfast.accelerate(pipe, graph=True)
    assert not cmfast.interop.accelerate.is_accelerated(pipe)
    pipe.unet.register_to_config(time_embedding_type="fourier")
    with pytest.raises(ValueError, match="cannot accelerate this UNet2DModel: time_embedding_type = 'fourier'"):
        cmfast.accelerate(pipe)
    with pytest.raises(ValueError, match="whose unet is a UNet2DModel"):
        cmfast.accelerate(object())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_accelerated_pipeline_on_cuda_with_graph():
    pipe = _pipeline(torch.bfloat16).to("cuda")
    gens = [torch.Generator("cuda").manual_seed(i) for i in range(3)]
    steps = {"num_inference_steps": 1}
    plain = pipe(batch_size=3, class_labels=[0, 1, 3], generator=gens, output_type="pt", **steps).images.float()
    cmfast.accelerate(pipe)
    assert pipe.unet._cmfast.graph
    for _ in range(2):  # capture, then replay
        gens = [torch.Generator("cuda").manual_seed(i) for i in range(3)]
        fast = pipe(batch_size=3, class_labels=[0, 1, 3], generator=gens, output_type="pt", **steps).images.float()
        assert (fast - plain).abs().max() <= 0.04
