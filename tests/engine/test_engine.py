"""The inference engine against the models it comes from: the same outputs (float32 up to rounding, bfloat16 within
its tolerance), the same images through `generate`, the refusals, and the kernel counts it must not creep past."""

import dataclasses

import pytest
import torch

import cmfast
from cmfast.engine import count_kernels, prepare, unsupported
from cmfast.generate import generate, sampling_plan
from cmfast.networks import NETWORK_PRESETS, build_network

ADM_VARIANTS = {
    "adm-tiny": NETWORK_PRESETS["adm-tiny"],  # class-conditional, scale-shift, resnet resampling
    "adm-tiny32": NETWORK_PRESETS["adm-tiny32"],  # unconditional, additive time embedding
    "adm-conv-resample-h3d": dataclasses.replace(  # conv resampling, legacy (heads, 3, d) qkv rows, num_heads
        NETWORK_PRESETS["adm-tiny32"], resblock_updown=False, qkv_layout="h3d", num_head_channels=-1, num_heads=2
    ),
}
PRESETS = [*ADM_VARIANTS, "ddpmpp-tiny", "ddpmpp-digits8"]


def _model(name, kind=cmfast.ConsistencyModel, seed=0):
    torch.manual_seed(seed)
    net = build_network(ADM_VARIANTS.get(name) or NETWORK_PRESETS[name])
    for p in net.parameters():  # random everywhere: the zero-initialised output convs would hide errors
        torch.nn.init.normal_(p, std=0.05)
    return kind(net).eval()


def _inputs(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    config = model.net.config
    x = torch.randn(batch, config.in_channels, config.resolution, config.resolution, generator=g) * 3
    labels = torch.randint(config.num_classes, (batch,), generator=g) if config.num_classes else None
    return x, labels


CASES = [(name, cmfast.ConsistencyModel) for name in PRESETS] + [("ddpmpp-digits8", cmfast.EDMDenoiser)]


@pytest.mark.parametrize("name, kind", CASES, ids=[f"{n}-{k.kind}" for n, k in CASES])
def test_float32_engine_equals_the_model(name, kind):
    model = _model(name, kind)
    engine = prepare(model, dtype=torch.float32)
    x, labels = _inputs(model, batch=2)
    with torch.no_grad():
        for sigma in (80.0, 0.011, torch.tensor([1.3, 0.002])):
            ref, out = model(x, sigma, labels), engine(x, sigma, labels)
            assert out.dtype == torch.float32 and out.shape == ref.shape
            assert (out - ref).abs().max() <= 2e-5 * max(ref.abs().max().item(), 1.0), sigma


@pytest.mark.parametrize("name", ["adm-tiny", "ddpmpp-tiny"])
def test_bfloat16_engine_is_within_bfloat16_of_the_float32_model(name):
    """Weights resident in bf16 against the model in float32, and the model's own bf16 autocast against the same
    reference: the engine's error is of the order of autocast's."""
    model = _model(name)
    x, labels = _inputs(model)
    with torch.no_grad():
        ref = model(x, 2.0, labels)
        engine = prepare(model, dtype=torch.bfloat16)
        err = (engine(x, 2.0, labels) - ref).abs().max().item()
        model.autocast_dtype = torch.bfloat16
        autocast_err = (model(x, 2.0, labels) - ref).abs().max().item()
    assert err <= 3 * autocast_err + 1e-3 and err < 0.05 * ref.abs().max().item()


def test_generate_gives_the_same_images_through_the_engine():
    model = _model("adm-tiny")
    plain = sampling_plan(model, ts=[0, 22], grid=40, engine=False)
    fast = sampling_plan(model, ts=[0, 22], grid=40, engine=True)
    assert not plain.engine and fast.engine and fast.record()["engine"]
    a = generate(model, plain, num=4, batch=4, seed=0, progress=False)
    b = generate(model, fast, num=4, batch=2, seed=0, progress=False)
    assert (a.images.astype(int) - b.images.astype(int)).__abs__().max() <= 1
    assert (a.labels == b.labels).all()


def test_engine_is_the_default_only_on_cuda_and_refusals_say_why():
    model = _model("adm-tiny")
    assert not sampling_plan(model).engine  # a CPU model keeps its own forward unless asked
    fourier = _model("ncsnpp-tiny")
    assert "Fourier" in unsupported(fourier)
    plan = sampling_plan(fourier, engine=True)
    assert not plan.engine and "Fourier" in plan.engine_refused
    with pytest.raises(ValueError, match="cannot prepare an engine: NCSN"):
        prepare(fourier)
    with pytest.raises(ValueError, match="engine dtype must be"):
        prepare(model, dtype=torch.int8)


def test_engine_holds_its_own_copy_of_the_weights():
    model = _model("adm-tiny")
    engine = prepare(model, dtype=torch.float32)
    x, labels = _inputs(model)
    with torch.no_grad():
        before = engine(x, 1.0, labels)
        for p in model.net.parameters():
            p.add_(1.0)
        assert torch.equal(engine(x, 1.0, labels), before)
    assert next(engine.parameters()).dtype == torch.float32 and not list(engine.state_dict().values())[0].numel()


# Kernel-producing ops of one bf16 forward at batch 1, counted at the dispatcher (cmfast.engine.count): the eager
# models under bf16 autocast issue 1232 (ADM-64) and 884 (DDPM++ CIFAR-10), most of them weight casts. The engine is
# counted on the meta device (no arithmetic, so the 296M-parameter ADM-64 takes seconds); there SDPA's output needs
# one copy per attention block that the CPU and GPU kernels avoid, so these are upper bounds. Pinned at what the
# engine issues now, so they cannot creep back.
KERNEL_PINS = {"adm-imagenet64": 344, "ddpmpp-cifar10": 238}
KERNEL_LIMITS = {"adm-imagenet64": 350, "ddpmpp-cifar10": 300}


def _meta_count(config, dtype=torch.bfloat16, batch=1):
    with torch.device("meta"):
        net = build_network(config)
    engine = prepare(cmfast.ConsistencyModel(net), device="meta", dtype=dtype)
    x = torch.randn(batch, config.in_channels, config.resolution, config.resolution, device="meta")
    labels = torch.zeros(batch, dtype=torch.long, device="meta") if config.num_classes else None
    return count_kernels(lambda: engine(x, 80.0, labels))


@pytest.mark.parametrize("name", list(KERNEL_PINS))
def test_kernel_count_pins(name):
    counter = _meta_count(NETWORK_PRESETS[name])
    assert counter.total <= KERNEL_PINS[name] <= KERNEL_LIMITS[name], counter.counts.most_common(12)
    casts = sum(n for op, n in counter.counts.items() if op in ("aten::to", "aten::_to_copy"))
    assert casts <= 2  # the input's and the time embedding's; no weight is cast inside the forward


def test_meta_count_bounds_the_cpu_count_and_dtype_adds_one_cast():
    model = _model("adm-tiny")
    x, labels = _inputs(model, batch=1)
    cpu = {}
    for dtype in (torch.float32, torch.bfloat16):
        engine = prepare(model, dtype=dtype)
        cpu[dtype] = count_kernels(lambda e=engine: e(x, 80.0, labels)).total
    assert cpu[torch.bfloat16] == cpu[torch.float32] + 1  # the time embedding's cast to the weights' dtype
    attention_blocks = sum(type(m).__name__ == "AttentionBlock" for m in model.net.modules())
    meta = _meta_count(model.net.config).total
    assert cpu[torch.bfloat16] <= meta <= cpu[torch.bfloat16] + attention_blocks


def test_counter_counts_what_writes_memory():
    x = torch.randn(4, 4)
    y = torch.empty(4, 4)
    counter = count_kernels(
        lambda: (x.view(16), x.t(), x.to(torch.float32), x + 1, x.float().sum(), y.add_(1), torch.mul(x, 2, out=y))
    )
    assert counter.counts == {"aten::add": 1, "aten::sum": 1, "aten::add_": 1, "aten::mul": 1}


def test_cli_sample_with_and_without_the_engine(tmp_path):
    import json

    import numpy as np

    from cmfast.cli import main

    args = ["sample", "--model", "adm-tiny", "--num", "4", "--steps", "2", "--class-label", "3", "--no-progress"]
    assert main([*args, "--engine", "--out", str(tmp_path / "a")]) == 0
    assert main([*args, "--no-engine", "--out", str(tmp_path / "b")]) == 0
    a, b = (np.load(tmp_path / d / "samples.npz")["images"].astype(int) for d in "ab")
    assert np.abs(a - b).max() <= 1
    assert json.loads((tmp_path / "a" / "samples.json").read_text())["engine"] is True
    assert json.loads((tmp_path / "b" / "samples.json").read_text())["engine"] is False


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", ["adm-tiny", "ddpmpp-tiny"])
def test_engine_on_cuda_matches_and_captures(name):
    """On a GPU: the fused backends (Triton or the extension) within bf16 of the float32 model, the CUDA-graph sampler
    over the engine equal to the engine eagerly, and `sampling_plan` choosing the engine by default."""
    from cmfast.graphs import graph_sample

    model = _model(name).cuda()
    x, labels = _inputs(model)
    x, labels = x.cuda(), labels.cuda() if labels is not None else None
    assert sampling_plan(model).engine
    engine = prepare(model, dtype=torch.bfloat16)
    with torch.no_grad():
        ref = model(x, 2.0, labels)
        out = engine(x, 2.0, labels)
        assert (out - ref).abs().max() < 0.05 * ref.abs().max()
        noise = torch.randn_like(x)
        eager = cmfast.sample(engine, noise, [80.0], class_labels=labels)
        graphed = graph_sample(engine, noise, [80.0], class_labels=labels)
        assert (eager - graphed).abs().max() <= 1e-3


def test_prepare_leaves_the_model_where_it_is():
    model = _model("adm-tiny")
    engine = prepare(model, device="meta", dtype=torch.float32)
    assert next(engine.parameters()).device.type == "meta"
    assert next(model.parameters()).device.type == "cpu"


def test_engine_refuses_what_the_model_refuses():
    model = _model("adm-tiny")
    engine = prepare(model, dtype=torch.float32)
    x, labels = _inputs(model)
    with pytest.raises(ValueError, match="class_labels must be"):
        engine(x, 1.0)
    with pytest.raises(ValueError, match="class_labels must have shape"):
        engine(x, 1.0, labels[:, None])
    with pytest.raises(ValueError, match="sigma has 2 entries but the batch has 3"):
        engine(x, torch.tensor([1.0, 2.0]), labels)


def test_generate_keeps_resident_half_weights_in_the_engine():
    from cmfast.generate import prepared

    model = cmfast.load("adm-tiny", dtype=torch.bfloat16)
    engine = prepared(model, sampling_plan(model, engine=True))
    assert engine.dtype == torch.bfloat16
