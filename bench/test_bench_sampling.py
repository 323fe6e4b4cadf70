"""Baseline: one-step sampling in eager PyTorch (fp32, CPU) with small presets.

Later work (fused kernels, CUDA graphs, the C++ extension) must beat these figures on the same machine. Run with
`make bench`; pytest-benchmark reports the median and the JSON keeps device, versions and date.
"""

import pytest
import torch

import cmfast


@pytest.mark.parametrize("preset", ["ddpmpp-tiny", "adm-tiny"])
@pytest.mark.parametrize("batch", [1, 16])
def test_one_step_sampling_eager_cpu(benchmark, preset, batch):
    torch.manual_seed(0)
    model = cmfast.ConsistencyModel(cmfast.build_network(preset)).eval()
    cfg = model.net.config
    size = cfg.resolution
    noise = torch.randn(batch, cfg.in_channels, size, size)
    labels = torch.zeros(batch, dtype=torch.long) if cfg.num_classes else None

    def one_step():
        with torch.inference_mode():
            return cmfast.sample(model, noise, [model.sigma_max], class_labels=labels)

    one_step()  # warm-up outside the measurement
    benchmark.extra_info.update(preset=preset, batch=batch, dtype="fp32", backend="eager")
    out = benchmark.pedantic(one_step, rounds=20, iterations=1, warmup_rounds=2)
    assert out.shape == noise.shape
    benchmark.extra_info["images_per_s_median"] = batch / benchmark.stats.stats.median
