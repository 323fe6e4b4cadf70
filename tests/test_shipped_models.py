"""The shipped digits models load by name and generate images with the statistics of the digits they were trained
on (a collapsed or corrupt model fails: the reference is the data itself, not the model's earlier output)."""

import re

import pytest
import torch

from cmfast.checkpoint import ASSETS, SHIPPED, load
from cmfast.data import load_digits
from cmfast.preconditioning import EDMDenoiser
from cmfast.sampling import generators_from_seeds, heun_sample, multistep_sigmas, randn, sample


def pixel_stats(x: torch.Tensor) -> tuple[float, float, float]:
    """Mean, std and fraction of near-black pixels of images in [-1, 1]."""
    return float(x.mean()), float(x.std()), float((x < -0.8).float().mean())


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_model_generates_digit_like_images(name):
    model = load(name)
    channels = model.net.config.in_channels
    assert model.net.config.img_resolution == 8 and channels == (3 if "rgb" in name else 1)
    gens = generators_from_seeds(range(128))
    noise = randn((128, channels, 8, 8), gens)
    with torch.no_grad():
        if isinstance(model, EDMDenoiser):
            x = heun_sample(model, noise, 18)
        else:
            x = sample(model, noise, multistep_sigmas(1))
    data = load_digits(8, split="test", color=channels == 3)
    ref, _ = data.batch(range(len(data)))
    (m, s, dark), (m_ref, s_ref, dark_ref) = pixel_stats(x), pixel_stats(ref)
    assert abs(m - m_ref) < 0.15, (m, m_ref)
    assert 0.7 * s_ref < s < 1.3 * s_ref, (s, s_ref)
    assert abs(dark - dark_ref) < 0.15, (dark, dark_ref)


def test_each_shipped_model_is_named_after_the_preset_that_trained_it():
    """Read from the script that made the assets: the run exported as NAME.safetensors was trained with --preset NAME
    (a consistency-training model named digits-ct while made by the iCT preset would mislead)."""
    script = (ASSETS / "make_assets.sh").read_text()
    presets = dict(re.findall(r"--preset (\S+) .*?--run-dir \"\$RUNS/([\w-]+)\"", script, flags=re.S))
    presets = {run: preset for preset, run in presets.items()}
    exports = re.findall(
        r"cmfast export \"\$RUNS/([\w-]+)/model\.safetensors\" \"\$ASSETS/([\w-]+)\.safetensors\"", script
    )
    assert {name for _, name in exports} == set(SHIPPED)
    for run, name in exports:
        assert presets[run] == name, (run, presets[run], name)
