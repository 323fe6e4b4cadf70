"""Zero-shot editing (Algorithm 4): exact invariants with a random stand-in for f, the exact consistency function of a
one-image dataset, an independent Algorithm 4 reference, batch independence, one-line errors and the `edit` command."""

import argparse
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cmfast
from cmfast import editing
from cmfast.cli.edit import register as add_commands
from cmfast.editing import (
    color_basis,
    color_transform,
    colorize,
    denoise,
    edit,
    inpaint,
    interpolate,
    luminance,
    patch_basis,
    patch_means,
    patch_transform,
    slerp,
    stroke_edit,
    super_resolve,
)

SHORT = cmfast.karras_sigmas(6).tolist()  # 5 evaluations: enough to exercise the loop, fast on CPU


@pytest.fixture(autouse=True)
def one_thread():
    """The tensors here are tiny: extra intra-op threads only add overhead (and spin when the CPU is busy)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_f(channels: int = 3, seed: int = 0):
    """A small random conv net as f(x, sigma): nonlinear, sigma-dependent, outputs beyond [-1, 1] (so clamping shows).

    Each image is computed on its own (a loop over the batch), so results cannot depend on the batch size."""
    g = torch.Generator().manual_seed(seed)
    w1 = torch.randn(8, channels, 3, 3, generator=g) * 0.4
    w2 = torch.randn(channels, 8, 3, 3, generator=g) * 0.4

    def f(x, sigma, class_labels=None):
        def one(xi):
            h = torch.tanh(F.conv2d(xi[None] / math.sqrt(1 + sigma**2), w1, padding=1) + math.log(sigma) / 4)
            return 1.6 * torch.tanh(F.conv2d(h, w2, padding=1))[0]

        return torch.stack([one(xi) for xi in x])

    return f


def constant_f(target):
    """The exact consistency function of the dataset {target}: every (x, sigma) maps to target."""

    def f(x, sigma, class_labels=None):
        return target.expand(x.shape[0], -1, -1, -1).clone()

    return f


def images(b=3, c=3, h=12, w=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, c, h, w, generator=g) * 2 - 1


def gens(*seeds):
    return cmfast.generators_from_seeds(seeds)


class FakeModel:
    """A callable with the network config fields the editors read for their errors."""

    def __init__(self, channels, resolution=12):
        self.net = argparse.Namespace(config=argparse.Namespace(in_channels=channels, img_resolution=resolution))
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.f = random_f(channels)

    def __call__(self, x, sigma, class_labels=None):
        return self.f(x, sigma, class_labels)


# --- the transforms --------------------------------------------------------------------------------------------------


def test_color_basis_is_orthogonal_with_the_luminance_first():
    q = color_basis()
    assert q.dtype == torch.float64
    torch.testing.assert_close(q @ q.T, torch.eye(3, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(q.T @ q, torch.eye(3, dtype=torch.float64), atol=1e-14, rtol=0)
    lum = torch.tensor([0.2989, 0.5870, 0.1140], dtype=torch.float64)
    torch.testing.assert_close(q[:, 0], lum / lum.norm(), atol=1e-14, rtol=0)


@pytest.mark.parametrize("p", [2, 3, 4, 8])
def test_patch_basis_is_orthogonal_with_a_uniform_first_column(p):
    q = patch_basis(p)
    torch.testing.assert_close(q @ q.T, torch.eye(p * p, dtype=torch.float64), atol=1e-13, rtol=0)
    torch.testing.assert_close(q[:, 0], torch.full((p * p,), 1 / p, dtype=torch.float64), atol=1e-14, rtol=0)


def test_patch_transform_against_a_loop_over_patches():
    p, x = 3, images(b=2, c=2, h=6, w=9).double()
    q = patch_basis(p)
    A, A_inv = patch_transform(q, p)
    coeffs = A(x)
    for i in range(0, 6, p):
        for j in range(0, 9, p):
            patch = x[:, :, i : i + p, j : j + p].reshape(2, 2, p * p)  # row-major
            want = patch @ q  # coefficient k = <patch, column k>
            torch.testing.assert_close(coeffs[:, :, i : i + p, j : j + p].reshape(2, 2, p * p), want)
    torch.testing.assert_close(coeffs[:, :, ::p, ::p], p * patch_means(x, p)[:, :, ::p, ::p])
    torch.testing.assert_close(A_inv(coeffs), x)


def test_color_transform_against_per_pixel_matrix_product():
    x = images(b=2, h=5, w=7).double()
    q = color_basis()
    A, A_inv = color_transform(q)
    pixel = x[1, :, 3, 4]
    torch.testing.assert_close(A(x)[1, :, 3, 4], q.T @ pixel)
    torch.testing.assert_close(A_inv(A(x)), x)
    torch.testing.assert_close(A(x)[:, 0:1] * torch.tensor([0.2989, 0.5870, 0.1140]).double().norm(), luminance(x))


# --- Algorithm 4 against an independent reference ---------------------------------------------------------------------


def test_edit_matches_a_direct_transcription_of_algorithm_4():
    """A non-orthogonal invertible A (random channel mixing) and a random mask; same generator seed on both sides."""
    f, y = random_f(), images(b=2)
    m = torch.randn(3, 3, generator=torch.Generator().manual_seed(3)) + 2 * torch.eye(3)
    m_inv = torch.linalg.inv(m)

    def A(x):
        return torch.einsum("dc,bchw->bdhw", m, x)

    def A_inv(x):
        return torch.einsum("dc,bchw->bdhw", m_inv, x)

    omega = (torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(4)) < 0.5).float()
    sigmas = [80.0, 10.0, 1.5, 0.3]  # no final sigma_min: every point is evaluated
    out = edit(f, y, A, A_inv, omega, sigmas, generator=torch.Generator().manual_seed(7))

    g, eps = torch.Generator().manual_seed(7), 0.002
    y_known = A_inv(A(y) * (1 - omega))
    x = y_known + sigmas[0] * torch.randn(y.shape, generator=g)
    x = f(x, sigmas[0]).clamp(-1, 1)
    x = A_inv(A(y) * (1 - omega) + A(x) * omega)
    for t in sigmas[1:]:
        x = x + math.sqrt(t**2 - eps**2) * torch.randn(y.shape, generator=g)
        x = f(x, t).clamp(-1, 1)
        x = A_inv(A(y) * (1 - omega) + A(x) * omega)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_final_sigma_min_only_marks_the_end():
    calls = []

    def f(x, sigma, class_labels=None):
        calls.append(sigma)
        return torch.zeros_like(x)

    inpaint(f, images(b=1), "center", generator=torch.Generator().manual_seed(0))
    assert len(calls) == 39 and calls[0] == 80.0 and calls[-1] > 0.002  # the 40-point grid, last point unevaluated
    calls.clear()
    stroke_edit(f, images(b=1))
    assert calls == [5.38, 2.24]
    calls.clear()
    inpaint(f, images(b=1), "center", ts=[0, 22, 39])
    assert calls == pytest.approx(cmfast.sigmas_from_ts([0, 22], 40).tolist())


# --- invariants with a random stand-in for f --------------------------------------------------------------------------


def test_inpainting_keeps_the_known_pixels_exactly():
    y = images()
    mask = (torch.rand(3, 1, 12, 12, generator=torch.Generator().manual_seed(2)) < 0.4).float()
    out = inpaint(random_f(), y, mask, SHORT, generator=gens(0, 1, 2))
    keep = (mask == 0).expand_as(y)
    assert torch.equal(out[keep], y[keep])
    assert (out[~keep] - y[~keep]).abs().min() > 0  # the generated pixels are new
    assert out[~keep].abs().max() <= 1


def test_inpainting_masks_from_specs_and_png(tmp_path):
    y = images(b=2, h=16, w=16)
    png = tmp_path / "mask.png"
    pixels = np.zeros((16, 16), np.uint8)
    pixels[2:9, 5:12] = 255
    Image.fromarray(pixels).save(png)
    for spec, expected in [("box:5,2,12,9", torch.from_numpy(pixels > 127).float()), (str(png), None)]:
        mask = editing.make_mask(spec, 16)
        if expected is not None:
            assert torch.equal(mask, expected)
        out = inpaint(random_f(), y, spec, SHORT, generator=torch.Generator().manual_seed(0))
        assert torch.equal(out[..., mask == 0], y[..., mask == 0])
    assert torch.equal(editing.make_mask(str(png), 16), editing.make_mask("box:5,2,12,9", 16))
    center = editing.make_mask("center", 16)
    assert center.sum() == 64 and center[4:12, 4:12].all()
    strokes = editing.make_mask("strokes:3", 16)
    assert torch.equal(strokes, editing.make_mask("strokes:3", 16)) and 0 < strokes.sum() < 256
    assert not torch.equal(strokes, editing.make_mask("strokes:4", 16))


def test_colorization_keeps_the_luminance():
    y = images()
    out = colorize(random_f(), y, SHORT, generator=gens(0, 1, 2))
    torch.testing.assert_close(luminance(out), luminance(y), atol=2e-6, rtol=0)
    assert (out - y).abs().max() > 0.1  # the colour is new
    gray = images(c=1)
    out = colorize(random_f(), gray, SHORT, generator=gens(0, 1, 2))
    assert out.shape == (3, 3, 12, 12)
    torch.testing.assert_close(luminance(out), 0.9999 * gray, atol=2e-6, rtol=0)
    assert (out[:, 0] - out[:, 1]).abs().max() > 0.1  # no longer gray


def test_super_resolution_keeps_the_patch_means():
    y = images()
    for factor in (2, 3, 4, 6):
        out = super_resolve(random_f(), y, factor, SHORT, generator=torch.Generator().manual_seed(factor))
        torch.testing.assert_close(patch_means(out, factor), patch_means(y, factor), atol=2e-6, rtol=0)
        assert (out - patch_means(y, factor)).abs().max() > 0.1  # detail is new
    low = images(h=4, w=4)  # a low-resolution input, nearest-upsampled to 12x12
    out = super_resolve(random_f(), low, 3, SHORT, size=12, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(F.avg_pool2d(out, 3), low, atol=2e-6, rtol=0)


def test_interpolation_endpoints_are_the_one_step_samples():
    f = random_f()
    z1, z2 = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(0)).unbind(0)
    strip = interpolate(f, z1, z2, 5)
    assert strip.shape == (5, 3, 12, 12)
    torch.testing.assert_close(strip[0], cmfast.sample(f, z1[None], [80.0])[0], atol=1e-6, rtol=0)
    torch.testing.assert_close(strip[-1], cmfast.sample(f, z2[None], [80.0])[0], atol=1e-6, rtol=0)
    batch = interpolate(f, torch.stack([z1, z2]), torch.stack([z2, z1]), 3)
    assert batch.shape == (2, 3, 3, 12, 12)
    torch.testing.assert_close(batch[1, 0], strip[-1], atol=1e-6, rtol=0)


def test_slerp_against_the_formula():
    z1, z2 = torch.randn(2, 1, 40, generator=torch.Generator().manual_seed(5)).double().unbind(0)
    u, v = z1.numpy().ravel(), z2.numpy().ravel()
    psi = np.arccos(u @ v / np.linalg.norm(u) / np.linalg.norm(v))
    for a in (0.0, 0.3, 1.0):
        want = np.sin((1 - a) * psi) / np.sin(psi) * u + np.sin(a * psi) / np.sin(psi) * v
        np.testing.assert_allclose(slerp(z1, z2, a).numpy().ravel(), want, atol=1e-12)
    assert torch.equal(slerp(z1.float(), z2.float(), 0.0), z1.float())
    assert torch.equal(slerp(z1.float(), z2.float(), 1.0), z2.float())
    torch.testing.assert_close(slerp(z1, 3 * z1, 0.5), 2 * z1)  # parallel: linear interpolation


def test_denoising_one_step_is_f_and_multistep_follows_a_karras_grid():
    f, y = random_f(), images()
    noisy = y + 0.5 * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(denoise(f, noisy, 0.5), f(noisy, 0.5).clamp(-1, 1))
    calls = []

    def recording(x, sigma, class_labels=None):
        calls.append(sigma)
        return f(x, sigma)

    denoise(recording, noisy, 0.5, steps=3, generator=torch.Generator().manual_seed(0))
    assert calls == pytest.approx(cmfast.karras_sigmas(4, sigma_max=0.5).tolist()[:3])


# --- the exact consistency function of a one-image dataset ------------------------------------------------------------


def test_edits_reach_the_single_image_where_unconstrained():
    target = images(b=1)[0] * 0.9
    f = constant_f(target)
    y = images(b=2, seed=5)
    mask = torch.zeros(12, 12)
    mask[3:9, 2:7] = 1
    out = inpaint(f, y, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(out, torch.where(mask.bool(), target, y))
    # Colorization: the input's colour is discarded, so an input with the target's luminance gives the target.
    chroma = color_basis()[:, 1].float().reshape(1, 3, 1, 1) * torch.rand(2, 1, 12, 12)
    out = colorize(f, target + 0.2 * chroma, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target.expand(2, -1, -1, -1), atol=2e-6, rtol=0)
    out = colorize(f, y, generator=torch.Generator().manual_seed(0))  # another luminance: kept, the colour reached
    torch.testing.assert_close(luminance(out), luminance(y), atol=2e-6, rtol=0)
    chroma_of = color_transform(color_basis())[0]
    torch.testing.assert_close(chroma_of(out)[:, 1:], chroma_of(target[None])[:, 1:].expand(2, -1, -1, -1))
    for low in (patch_means(target[None], 3), F.avg_pool2d(target[None], 3)):
        out = super_resolve(f, low, 3, size=12, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(out, target[None], atol=2e-6, rtol=0)
    out = super_resolve(f, y, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(patch_means(out, 2), patch_means(y, 2), atol=2e-6, rtol=0)
    torch.testing.assert_close(out - patch_means(out, 2), (target - patch_means(target[None], 2)).expand(2, -1, -1, -1))
    assert torch.equal(stroke_edit(f, y, generator=torch.Generator().manual_seed(0)), target.expand(2, -1, -1, -1))
    assert torch.equal(denoise(f, y, 1.0, steps=3, generator=torch.Generator()), target.expand(2, -1, -1, -1))
    assert torch.equal(interpolate(f, y[0], y[1], 4), target.expand(4, -1, -1, -1))


# --- randomness -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["inpaint", "colorize", "super_resolve", "stroke_edit", "denoise"])
def test_per_sample_generators_make_results_independent_of_the_batch(task):
    f, y = random_f(), images(b=3)
    run = {
        "inpaint": lambda x, g: inpaint(f, x, "center", SHORT, generator=g),
        "colorize": lambda x, g: colorize(f, x, SHORT, generator=g),
        "super_resolve": lambda x, g: super_resolve(f, x, 3, SHORT, generator=g),
        "stroke_edit": lambda x, g: stroke_edit(f, x, generator=g),
        "denoise": lambda x, g: denoise(f, x, 2.0, steps=3, generator=g),
    }[task]
    together = run(y, gens(10, 11, 12))
    alone = torch.cat([run(y[i : i + 1], gens(10 + i)) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-6, rtol=0)
    again = run(y, gens(10, 11, 12))
    assert torch.equal(together, again)
    assert not torch.allclose(run(y, gens(20, 21, 22)), together)


# --- one-line errors --------------------------------------------------------------------------------------------------


def _bad_inverse():
    return edit(random_f(), images(), lambda x: 2 * x, lambda x: x, torch.ones(1), SHORT)


ERRORS = [
    (lambda: inpaint(random_f(), images(), torch.zeros(16, 16), SHORT), "mask is 16x16 but the images are 12x12"),
    (lambda: inpaint(random_f(), images(), torch.full((12, 12), 0.5), SHORT), "must be binary"),
    (lambda: inpaint(random_f(), images(), torch.zeros(2, 1, 12, 12), SHORT), "does not fit images"),
    (lambda: inpaint(random_f(), images(), "box:0,0,13,4", SHORT), "box 0,0,13,4 must satisfy"),
    (lambda: inpaint(random_f(), images(), "circle", SHORT), "neither center"),
    (lambda: inpaint(FakeModel(1), images(), "center", SHORT), "3 channel.* but the model takes 1"),
    (lambda: super_resolve(random_f(), images(), 5, SHORT), "image size 12x12 is not divisible by the factor 5"),
    (
        lambda: super_resolve(random_f(), images(h=10, w=10), 4, SHORT),
        "image size 10x10 is not divisible by the factor 4",
    ),
    (lambda: super_resolve(random_f(), images(h=5, w=5), 3, SHORT, size=12), "expected 12x12 or the low-res"),
    (lambda: super_resolve(random_f(), images(), 1, SHORT), "integer >= 2"),
    (lambda: colorize(random_f(), images(c=2), SHORT), "RGB or grayscale images, got 2 channels"),
    (lambda: colorize(FakeModel(1), images(c=1), SHORT), "needs an RGB model; this one has 1 channel"),
    (_bad_inverse, "A_inv does not invert A"),
    (lambda: inpaint(random_f(), images(), "center", [1.0, 5.0]), "strictly decreasing"),
    (lambda: inpaint(random_f(), images(), "center", [1.0], ts=[0, 39]), "sigmas or ts, not both"),
    (lambda: denoise(random_f(), images(), 0.001), "noise level sigma must lie in"),
    (lambda: interpolate(random_f(), torch.randn(3, 4, 4), torch.randn(3, 4, 4), 1), "n >= 2"),
    (lambda: interpolate(random_f(), torch.randn(3, 4, 4), torch.randn(3, 4, 5), 3), "same shape"),
]


@pytest.mark.parametrize("call, message", ERRORS, ids=[m for _, m in ERRORS])
def test_bad_input_is_a_one_line_value_error(call, message):
    with pytest.raises(ValueError, match=message) as err:
        call()
    assert "\n" not in str(err.value)


# --- the command ------------------------------------------------------------------------------------------------------


def run_cli(argv):
    parser = argparse.ArgumentParser(prog="cmfast")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    args.handler(args)


def read_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_edit_command_writes_a_panel_and_arrays(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", "ddpmpp-tiny", "--grid", "3", "--device", "cpu", "--out", str(out)]
    run_cli(["edit", "colorize", "--input", "digits-test:2", "--samples", "2", *common])
    data = read_npz(out / "colorize.npz")
    assert data["results"].shape == (2, 2, 16, 16, 3) and data["results"].dtype == np.uint8
    assert data["images"].shape == (4, 16, 16, 3) and data["seeds"].tolist() == [[0, 1], [2, 3]]
    assert data["reference"].shape == data["degraded"].shape == (2, 16, 16, 3)
    panel = Image.open(out / "colorize.png")
    assert panel.mode == "RGB" and panel.width >= 4 * 16 * 6 and panel.height >= 2 * 16 * 6
    assert "2 x 2 results, 2 evaluation(s) each" in capsys.readouterr().out
    # A low-resolution PNG for super-resolution, and the same result whatever the batch.
    Image.fromarray(data["images"][0][::2, ::2].copy()).save(tmp_path / "low.png")
    for batch in ("1", "16"):
        run_cli(["edit", "super-resolve", "--input", str(tmp_path / "low.png"), "--batch", batch, *common])
        results = read_npz(out / "super_resolve.npz")["results"]
        assert results.shape == (1, 3, 16, 16, 3)
        if batch == "1":
            first = results
    assert np.abs(first.astype(int) - results.astype(int)).max() <= 1
    common.remove("--grid"), common.remove("3")  # interpolation decodes in one step: no grid to walk
    run_cli(["edit", "interpolate", "--seeds", "0,1,2,3", "--num", "4", *common])
    assert read_npz(out / "interpolate.npz")["results"].shape == (2, 4, 16, 16, 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["colorize", "--model", "ddpmpp-digits8", "--input", "digits-test:1"], "colorize needs an RGB model"),
        (["inpaint", "--model", "ddpmpp-digits8", "--input", "digits-test:1", "--mask", "box:0,0,9,9"], "box"),
        (["inpaint", "--model", "ddpmpp-digits8", "--input", "nothing.gif"], "expected an image file"),
        (["super_resolve", "--model", "ddpmpp-digits8", "--input", "digits-test:1", "--factor", "3"], "divisible"),
        (["interpolate", "--model", "ddpmpp-digits8", "--seeds", "1,2,3"], "pairs of seeds"),
        (["denoise", "--model", "ddpmpp-digits8"], "needs --input"),
    ],
)
def test_edit_command_bad_input(tmp_path, argv, message):
    grid = ["--grid", "3"] if argv[0] not in ("interpolate", "denoise") else []
    with pytest.raises(ValueError, match=message) as err:
        run_cli(["edit", *argv, "--device", "cpu", *grid, "--out", str(tmp_path)])
    assert "\n" not in str(err.value)


def test_edit_command_rejects_wrong_channels(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match="3 channel.* but the model takes 1"):
        run_cli(
            [
                "edit",
                "inpaint",
                "--model",
                "ddpmpp-digits8",
                "--input",
                str(tmp_path / "rgb.png"),
                "--out",
                str(tmp_path),
            ]
        )


def test_edit_command_grayscale_tasks(tmp_path, capsys):
    out = tmp_path / "out"
    common = ["--model", "ddpmpp-digits8", "--device", "cpu", "--out", str(out)]
    npz = tmp_path / "in.npz"
    np.savez(npz, images=np.random.default_rng(0).integers(0, 256, (3, 8, 8, 1), dtype=np.uint8))
    run_cli(["edit", "inpaint", "--input", str(npz), "--mask", "strokes:1", "--samples", "2", "--grid", "3", *common])
    data = read_npz(out / "inpaint.npz")
    keep = data["mask"] == 0
    assert data["results"].shape == (3, 2, 8, 8, 1) and 0 < keep.sum() < 64
    assert (data["results"][:, :, keep] == data["reference"][:, None, keep]).all()
    run_cli(["edit", "denoise", "--input", "digits-test:2", "--sigma", "0.8", "--steps", "1,2", *common])
    data = read_npz(out / "denoise.npz")
    assert data["results"].shape == (2, 2, 8, 8, 1) and data["steps"].tolist() == [1, 2]
    assert "2 x 2 results, 1, 2 evaluation(s)" in capsys.readouterr().out
    run_cli(["edit", "denoise", "--input", str(npz), "--noisy", "--sigma", "0.8", *common])
    assert "reference" not in read_npz(out / "denoise.npz")
    run_cli(["edit", "stroke_edit", "--input", "digits-test:2", "--samples", "1", *common])
    data = read_npz(out / "stroke_edit.npz")
    assert data["sigmas"].tolist() == [5.38, 2.24] and set(np.unique(data["degraded"])) <= {0, 128, 255}
    assert Image.open(out / "stroke_edit.png").size[0] >= 3 * 8 * 8
