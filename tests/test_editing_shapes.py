"""Every editing task on non-square images of odd sizes, with a plain callable f: each keeps its invariant."""

import pytest
import torch

from cmfast import editing
from cmfast.masks import make_mask

SIGMAS = [80.0, 5.0, 0.5]
SIZES = [(5, 7), (9, 3), (7, 11)]  # (H, W): odd, non-square, both orientations


def f(x, sigma, class_labels=None):
    """A small denoiser-shaped function of x and sigma that mixes neighbouring pixels (so nothing is kept by luck)."""
    s = torch.as_tensor(sigma, dtype=x.dtype, device=x.device)
    s = s.reshape(-1, 1, 1, 1) if s.ndim else s
    return torch.tanh(0.6 * x.roll(1, -1) + 0.3 * x.flip(-2) + 0.05 * torch.log(s))


def images(h, w, c=3, b=2, seed=0):
    return torch.rand(b, c, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def gens(n, seed=0):
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


@pytest.mark.parametrize("h, w", SIZES)
@pytest.mark.parametrize("spec", ["center", "strokes:3", "box:1,2,3,4"])
def test_inpaint_keeps_the_unmasked_pixels_exactly(h, w, spec):
    y = images(h, w)
    out = editing.inpaint(f, y, spec, SIGMAS, generator=gens(2))
    keep = make_mask(spec, (h, w)) == 0
    assert out.shape == y.shape and 0 < keep.sum() < h * w
    assert torch.equal(out[..., keep], y[..., keep])
    assert not torch.equal(out[..., ~keep], y[..., ~keep])


@pytest.mark.parametrize("h, w", SIZES)
def test_masks_take_height_and_width(h, w):
    center = make_mask("center", (h, w))
    assert center.shape == (h, w) and center[h // 2, w // 2] == 1 and center[0, 0] == 0
    assert make_mask("strokes:1", (h, w)).shape == (h, w)
    assert torch.equal(make_mask("center", h), make_mask("center", (h, h)))  # a side still means a square


@pytest.mark.parametrize("h, w", SIZES)
def test_colorize_keeps_the_luminance(h, w):
    y = images(h, w)
    out = editing.colorize(f, y, SIGMAS, generator=gens(2))
    assert out.shape == y.shape
    torch.testing.assert_close(editing.luminance(out), editing.luminance(y), atol=1e-5, rtol=0)


@pytest.mark.parametrize("h, w, factor", [(9, 15, 3), (6, 10, 2), (15, 5, 5)])
def test_super_resolve_keeps_the_patch_means(h, w, factor):
    y = images(h, w)
    out = editing.super_resolve(f, y, factor, SIGMAS, generator=gens(2))
    assert out.shape == y.shape
    torch.testing.assert_close(editing.patch_means(out, factor), editing.patch_means(y, factor), atol=1e-5, rtol=0)
    low = torch.nn.functional.avg_pool2d(y, factor)  # the low-resolution input gives the same output
    from_low = editing.super_resolve(f, low, factor, SIGMAS, size=(h, w), generator=gens(2))
    torch.testing.assert_close(from_low, out, atol=1e-5, rtol=0)


@pytest.mark.parametrize("h, w", SIZES)
def test_denoise_is_f_at_the_noise_level(h, w):
    noisy = images(h, w)
    torch.testing.assert_close(editing.denoise(f, noisy, 0.7), f(noisy, 0.7).clamp(-1, 1))
    assert editing.denoise(f, noisy, 0.7, steps=2, generator=gens(2)).shape == noisy.shape


@pytest.mark.parametrize("h, w", SIZES)
def test_interpolation_ends_are_the_one_step_samples(h, w):
    z1, z2 = images(h, w, b=1, seed=1)[0], images(h, w, b=1, seed=2)[0]
    strip = editing.interpolate(f, z1, z2, 4, sigma=80.0)
    assert strip.shape == (4, 3, h, w)
    torch.testing.assert_close(strip[0], f(80 * z1[None], 80.0)[0].clamp(-1, 1))
    torch.testing.assert_close(strip[-1], f(80 * z2[None], 80.0)[0].clamp(-1, 1))


@pytest.mark.parametrize("h, w", SIZES)
def test_stroke_edit_starts_from_the_painting(h, w):
    strokes = images(h, w)
    out = editing.stroke_edit(f, strokes, [2.0], generator=gens(2, seed=5))
    z = torch.stack([torch.randn(3, h, w, generator=g) for g in gens(2, seed=5)])
    torch.testing.assert_close(out, f(strokes + 2.0 * z, 2.0).clamp(-1, 1))
