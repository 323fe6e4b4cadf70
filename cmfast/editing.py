"""Zero-shot editing with a consistency model (Algorithm 4, REFERENCE.md section 7).

`edit` is Algorithm 4 for any invertible linear map A, given as a pair of callables (forward, inverse), and any binary
mask Omega in A's coordinates (1 = generate, 0 = keep from the reference y). Each task is a thin instance of it:

- `inpaint`: A = I, Omega = the missing pixels;
- `colorize`: A = an orthogonal 3x3 colour transform per pixel with the luminance first, Omega = the two other axes;
- `super_resolve`: A = an orthogonal transform of each p x p patch with a uniform first column, Omega = all but the
  patch mean;
- `stroke_edit`: SDEdit, A = I and Omega all ones, the stroke painting only seeds x.

`denoise` (x = f(y, sigma), then optionally more steps) and `interpolate` (slerp of two noises, one-step decoding) are
plain consistency-function evaluations. Everything works on any callable f(x, sigma, class_labels=None) -> x0, on
batches, grayscale and RGB, and on any H and W that f takes (square or not; super-resolution needs both divisible by
its factor). Images are (B, C, H, W) floats in [-1, 1]. Randomness comes in as a torch.Generator or a
list with one generator per image, so an image's result does not depend on the batch it is edited in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .masks import make_mask
from .sampling import (
    SIGMA_MAX,
    SIGMA_MIN,
    Denoiser,
    Generators,
    consistency_steps,
    evaluation_sigmas,
    karras_sigmas,
    multistep_sigmas,
    noise_from,
    randn,
    sigmas_from_ts,
)

LinearMap = Callable[[Tensor], Tensor]
Sigmas = Sequence[float] | Tensor

EDIT_GRID = 40  # Karras points walked by inpainting, colorization and super-resolution (the paper's N = 40)
STROKE_SIGMAS = (5.38, 2.24)  # SDEdit time points of the paper = indices 16 and 20 of the 40-point Karras grid
LUMINANCE = (0.2989, 0.5870, 0.1140)  # ITU-R 601 weights, as in the official colorization code


# --- Algorithm 4 -----------------------------------------------------------------------------------------------------


def _sigma_min(f: Denoiser, sigma_min: float | None) -> float:
    return float(sigma_min if sigma_min is not None else getattr(f, "sigma_min", SIGMA_MIN))


def check_inverse(A: LinearMap, A_inv: LinearMap, like: Tensor, tol: float = 1e-4) -> None:
    """ValueError unless A_inv(A(r)) == r (within tol, relative) for random r shaped like `like` (a fixed seed)."""
    r = torch.randn(like.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    r = r.to(device=like.device, dtype=like.dtype)
    back = A_inv(A(r))
    if tuple(back.shape) != tuple(r.shape):
        raise ValueError(f"A_inv(A(x)) has shape {tuple(back.shape)}, expected {tuple(r.shape)}")
    err = float((back - r).abs().max())
    if not err <= tol * float(r.abs().max()):
        raise ValueError(f"A_inv does not invert A: max |A_inv(A(x)) - x| = {err:.3g} on random data")


def _check_mask(omega: Tensor, shape: torch.Size, like: Tensor) -> Tensor:
    omega = torch.as_tensor(omega).to(device=like.device, dtype=like.dtype)
    try:
        fits = omega.ndim <= len(shape) and torch.broadcast_shapes(omega.shape, shape) == shape
    except RuntimeError:
        fits = False
    if not fits:
        raise ValueError(f"mask of shape {tuple(omega.shape)} does not fit A(images) of shape {tuple(shape)}")
    if not bool(((omega == 0) | (omega == 1)).all()):
        raise ValueError("the mask must be binary (1 = generate, 0 = keep)")
    return omega


def _check_images(images: Tensor, name: str = "images") -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or not images.is_floating_point():
        shape = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (B, C, H, W) float tensor, got {shape}")


@torch.no_grad()
def edit(
    f: Denoiser,
    images: Tensor,
    A: LinearMap,
    A_inv: LinearMap,
    omega: Tensor,
    sigmas: Sigmas,
    class_labels: Tensor | None = None,
    generator: Generators = None,
    start: Tensor | None = None,
    clamp: bool = True,
    sigma_min: float | None = None,
) -> Tensor:
    """Zero-shot image editing (Algorithm 4).

    images: (B, C, H, W) reference y in [-1, 1]. A, A_inv: an invertible linear map on such batches and its inverse
    (checked once on random data). omega: binary mask broadcastable to A(y)'s shape, 1 where A x is generated and 0
    where it is taken from A y. sigmas: descending time points t_1 > ... > t_N; a last entry equal to sigma_min only
    marks the end, as in `sample`. start: the image x is drawn around, x ~ N(start, t_1^2 I); by default the known
    part A^-1[(A y)(1 - Omega)] (Algorithm 4), SDEdit passes the stroke painting itself. f's outputs are clamped to
    [-1, 1] before each replacement; the result is the last replacement, so it keeps A y exactly where Omega is 0.
    """
    _check_images(images)
    eps = _sigma_min(f, sigma_min)
    sigmas = evaluation_sigmas(sigmas, eps, getattr(f, "sigma_max", None))
    check_inverse(A, A_inv, images)
    Ay = A(images)
    omega = _check_mask(omega, Ay.shape, Ay)
    known = Ay * (1 - omega)  # (A y) * (1 - Omega)

    def project(x: Tensor) -> Tensor:  # x <- A^-1[(A y)(1 - Omega) + (A x) Omega]
        return A_inv(known + A(x) * omega)

    if start is None:
        start = A_inv(known)  # y <- A^-1[(A y)(1 - Omega)]
    elif start.shape != images.shape:
        raise ValueError(f"start has shape {tuple(start.shape)}, the images {tuple(images.shape)}")
    x = start + sigmas[0] * randn(images.shape, generator, device=images.device, dtype=images.dtype)
    # x <- P(f(x, t_1)), then x <- P(f(x + sqrt(t_n^2 - eps^2) z, t_n)); f's output is clamped before P, as the
    # official editors do
    return consistency_steps(f, x, sigmas, class_labels, noise_from(generator), clamp, eps, project)


def _identity(x: Tensor) -> Tensor:
    return x


def edit_sigmas(
    f: Denoiser,
    sigmas: Sigmas | None = None,
    ts: Sequence[int] | None = None,
    grid: int = EDIT_GRID,
    default: Sigmas | None = None,
    sigma_min: float | None = None,
) -> list[float]:
    """The time points of an edit: explicit `sigmas`, official indices `ts` into the Karras grid of `grid` points
    (over f's [sigma_min, sigma_max]), else `default`, else that whole grid (the paper's editing schedule)."""
    if sigmas is not None and ts is not None:
        raise ValueError("give sigmas or ts, not both")
    if sigmas is not None:
        return [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    eps, sigma_max = _sigma_min(f, sigma_min), float(getattr(f, "sigma_max", SIGMA_MAX))
    if ts is not None:
        return sigmas_from_ts(ts, grid, eps, sigma_max).tolist()
    if default is not None:
        return [float(s) for s in default]
    return karras_sigmas(grid, eps, sigma_max).tolist()


# --- inpainting: A = I ----------------------------------------------------------------------------------------------


def _inpainting_mask(mask: Tensor | str, images: Tensor) -> Tensor:
    """The mask as a (1 or B, 1 or C, H, W) tensor, or a one-line error when it does not fit the images."""
    b, c, h, w = images.shape
    if isinstance(mask, str):
        mask = make_mask(mask, (h, w))
    mask = torch.as_tensor(mask)
    if mask.ndim < 2 or mask.ndim > 4:
        raise ValueError(f"the mask must be (H, W), (C, H, W) or (B, C, H, W), got shape {tuple(mask.shape)}")
    if tuple(mask.shape[-2:]) != (h, w):
        raise ValueError(f"mask is {mask.shape[-1]}x{mask.shape[-2]} but the images are {w}x{h}")
    mask = mask.reshape((1,) * (4 - mask.ndim) + tuple(mask.shape))
    if mask.shape[1] not in (1, c) or mask.shape[0] not in (1, b):
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not fit images of shape {tuple(images.shape)}")
    return mask


def inpaint(
    f: Denoiser,
    images: Tensor,
    mask: Tensor | str,
    sigmas: Sigmas | None = None,
    *,
    ts: Sequence[int] | None = None,
    grid: int = EDIT_GRID,
    class_labels: Tensor | None = None,
    generator: Generators = None,
    clamp: bool = True,
    sigma_min: float | None = None,
) -> Tensor:
    """Fill the pixels where `mask` is 1; the others keep the reference exactly (Algorithm 4 with A = I).

    mask: (H, W), (C, H, W) or (B, C, H, W) binary tensor, or a spec for `make_mask`. Default time points: the whole
    Karras grid of `grid` points (40, as in the paper): 39 evaluations.
    """
    _check_images(images)
    _check_channels(f, images)
    omega = _inpainting_mask(mask, images)
    sigmas = edit_sigmas(f, sigmas, ts, grid, sigma_min=sigma_min)
    return edit(f, images, _identity, _identity, omega, sigmas, class_labels, generator, None, clamp, sigma_min)


# --- colorization: per-pixel orthogonal colour transform -------------------------------------------------------------


def color_basis() -> Tensor:
    """(3, 3) float64 orthogonal Q whose first column is the normalized luminance (0.2989, 0.5870, 0.1140)."""
    lum = torch.tensor(LUMINANCE, dtype=torch.float64)
    basis = torch.eye(3, dtype=torch.float64)
    basis[:, 0] = lum / lum.norm()
    q = torch.linalg.qr(basis).Q
    return -q if q[:, 0].sum() < 0 else q


def color_transform(q: Tensor) -> tuple[LinearMap, LinearMap]:
    """A and A^-1 for colorization: per pixel, RGB -> coordinates in the columns of Q (A x = Q^T x), and back."""

    def forward(x: Tensor) -> Tensor:
        return torch.einsum("bchw,cd->bdhw", x, q.to(x))

    def inverse(x: Tensor) -> Tensor:
        return torch.einsum("bdhw,cd->bchw", x, q.to(x))

    return forward, inverse


def luminance(images: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W): 0.2989 R + 0.5870 G + 0.1140 B."""
    weights = torch.tensor(LUMINANCE, dtype=images.dtype, device=images.device)
    return torch.einsum("bchw,c->bhw", images, weights).unsqueeze(1)


def colorize(
    f: Denoiser,
    images: Tensor,
    sigmas: Sigmas | None = None,
    *,
    ts: Sequence[int] | None = None,
    grid: int = EDIT_GRID,
    class_labels: Tensor | None = None,
    generator: Generators = None,
    clamp: bool = True,
    sigma_min: float | None = None,
) -> Tensor:
    """Colour images that keep the input's luminance: only the luminance axis of the colour transform comes from y.

    images: (B, 3, H, W) RGB (its colour is discarded) or (B, 1, H, W) grayscale (broadcast to 3 equal channels).
    f must be an RGB model. Default time points: the whole 40-point Karras grid (39 evaluations).
    """
    _check_images(images)
    if images.shape[1] not in (1, 3):
        raise ValueError(f"colorization takes RGB or grayscale images, got {images.shape[1]} channels")
    if _model_channels(f) not in (None, 3):
        raise ValueError(f"colorization needs an RGB model; this one has {_model_channels(f)} channel(s)")
    images = images.expand(-1, 3, -1, -1)
    omega = torch.tensor([0.0, 1.0, 1.0]).reshape(1, 3, 1, 1)
    A, A_inv = color_transform(color_basis())
    sigmas = edit_sigmas(f, sigmas, ts, grid, sigma_min=sigma_min)
    return edit(f, images, A, A_inv, omega, sigmas, class_labels, generator, None, clamp, sigma_min)


# --- super-resolution: per-patch orthogonal transform ----------------------------------------------------------------


def patch_basis(p: int) -> Tensor:
    """(p^2, p^2) float64 orthogonal Q whose first column is uniform, 1/p (its coefficient is p times the mean)."""
    basis = torch.eye(p * p, dtype=torch.float64)
    basis[:, 0] = 1 / p
    q = torch.linalg.qr(basis).Q
    return -q if q[:, 0].sum() < 0 else q


def patch_transform(q: Tensor, p: int) -> tuple[LinearMap, LinearMap]:
    """A and A^-1 for super-resolution: each p x p patch (row-major) -> its p^2 coefficients Q^T patch, written back
    into the patch's own pixels (coefficient k at row k // p, column k % p), and the inverse."""

    def to_patches(x: Tensor) -> Tensor:  # (B, C, H, W) -> (B, C, H/p, W/p, p^2)
        b, c, h, w = x.shape
        return x.reshape(b, c, h // p, p, w // p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // p, w // p, p * p)

    def from_patches(x: Tensor) -> Tensor:
        b, c, hp, wp, _ = x.shape
        return x.reshape(b, c, hp, wp, p, p).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hp * p, wp * p)

    def forward(x: Tensor) -> Tensor:
        return from_patches(to_patches(x) @ q.to(x))

    def inverse(x: Tensor) -> Tensor:
        return from_patches(to_patches(x) @ q.to(x).T)

    return forward, inverse


def patch_means(images: Tensor, p: int) -> Tensor:
    """Each p x p patch replaced by its mean (the low-resolution image, nearest-upsampled)."""
    return F.interpolate(F.avg_pool2d(images, p), scale_factor=p, mode="nearest")


def super_resolve(
    f: Denoiser,
    images: Tensor,
    factor: int,
    sigmas: Sigmas | None = None,
    *,
    size: int | tuple[int, int] | None = None,
    ts: Sequence[int] | None = None,
    grid: int = EDIT_GRID,
    class_labels: Tensor | None = None,
    generator: Generators = None,
    clamp: bool = True,
    sigma_min: float | None = None,
) -> Tensor:
    """Images of `size` whose factor x factor patch means equal the input's (only the mean comes from y).

    images: (B, C, H/factor, W/factor) low-resolution images (nearest-upsampled here), or (B, C, H, W) high-resolution
    ones to be reduced; they need not be square. size: the output's side or (H, W); default the model's resolution,
    else the input's size. Any factor dividing H and W. Default time points: the whole 40-point Karras grid (39
    evaluations).
    """
    _check_images(images)
    _check_channels(f, images)
    if int(factor) != factor or factor < 2:
        raise ValueError(f"the super-resolution factor must be an integer >= 2, got {factor}")
    factor = int(factor)
    h, w = images.shape[-2:]
    size = size or _model_resolution(f) or (h, w)
    out_h, out_w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if out_h % factor or out_w % factor:
        raise ValueError(f"image size {out_w}x{out_h} is not divisible by the factor {factor}")
    if (h * factor, w * factor) == (out_h, out_w):
        images = F.interpolate(images, scale_factor=factor, mode="nearest")
    elif (h, w) != (out_h, out_w):
        low = f"{out_w // factor}x{out_h // factor}"
        raise ValueError(f"images are {w}x{h}: expected {out_w}x{out_h} or the low-resolution {low}")
    omega = torch.ones(1, 1, out_h, out_w)
    omega[..., ::factor, ::factor] = 0  # coefficient 0 of each patch (the mean) is kept
    A, A_inv = patch_transform(patch_basis(factor), factor)
    sigmas = edit_sigmas(f, sigmas, ts, grid, sigma_min=sigma_min)
    return edit(f, images, A, A_inv, omega, sigmas, class_labels, generator, None, clamp, sigma_min)


# --- stroke-guided editing (SDEdit) ----------------------------------------------------------------------------------


def stroke_edit(
    f: Denoiser,
    strokes: Tensor,
    sigmas: Sigmas | None = None,
    *,
    ts: Sequence[int] | None = None,
    grid: int = EDIT_GRID,
    class_labels: Tensor | None = None,
    generator: Generators = None,
    clamp: bool = True,
    sigma_min: float | None = None,
) -> Tensor:
    """Realistic images from stroke paintings: x ~ N(strokes, t_1^2 I), then consistency steps (Algorithm 4 with A = I
    and Omega all ones, the painting only seeding x). Default sigmas (5.38, 2.24), the paper's: two evaluations."""
    _check_images(strokes, "strokes")
    _check_channels(f, strokes)
    sigmas = edit_sigmas(f, sigmas, ts, grid, default=STROKE_SIGMAS, sigma_min=sigma_min)
    omega = torch.ones(1, 1, 1, 1)
    return edit(f, strokes, _identity, _identity, omega, sigmas, class_labels, generator, strokes, clamp, sigma_min)


# --- denoising and interpolation -------------------------------------------------------------------------------------


@torch.no_grad()
def denoise(
    f: Denoiser,
    noisy: Tensor,
    sigma: float,
    steps: int = 1,
    class_labels: Tensor | None = None,
    generator: Generators = None,
    clamp: bool = True,
    sigma_min: float | None = None,
) -> Tensor:
    """Denoise images that carry Gaussian noise of std `sigma`: x = f(noisy, sigma), one evaluation; with steps > 1,
    re-noise and evaluate again at the Karras grid of steps + 1 points from sigma down to sigma_min (Algorithm 1)."""
    _check_images(noisy, "noisy")
    _check_channels(f, noisy)
    if int(steps) != steps or steps < 1:
        raise ValueError(f"the number of denoising steps must be a positive integer, got {steps}")
    eps = _sigma_min(f, sigma_min)
    if not eps < sigma <= getattr(f, "sigma_max", math.inf):
        raise ValueError(f"the noise level sigma must lie in ({eps}, {getattr(f, 'sigma_max', math.inf)}], got {sigma}")
    sigmas = [float(sigma)] if steps == 1 else evaluation_sigmas(multistep_sigmas(steps, eps, sigma), eps)
    return consistency_steps(f, noisy, sigmas, class_labels, noise_from(generator), clamp, eps)


def slerp(z1: Tensor, z2: Tensor, alpha: float | Tensor) -> Tensor:
    """Spherical interpolation per sample: sin((1-a) psi)/sin(psi) z1 + sin(a psi)/sin(psi) z2, psi the angle between
    z1 and z2 (flattened over all but the first axis). alpha: a scalar or (B,). Exact at alpha = 0 and 1."""
    b = z1.shape[0]
    a = torch.as_tensor(alpha, dtype=torch.float64, device=z1.device).reshape(-1).expand(b)
    u, v = z1.reshape(b, -1).double(), z2.reshape(b, -1).double()
    cos = ((u * v).sum(1) / (u.norm(dim=1) * v.norm(dim=1))).clamp(-1, 1)
    psi = torch.arccos(cos)
    if bool((cos < -1 + 1e-12).any()):
        raise ValueError("z1 and z2 point in opposite directions; their spherical interpolation is undefined")
    parallel = psi.sin() < 1e-12
    s = torch.where(parallel, torch.ones_like(psi), psi.sin())
    c1 = torch.where(parallel, 1 - a, torch.sin((1 - a) * psi) / s)  # lerp when z1 and z2 are parallel
    c2 = torch.where(parallel, a, torch.sin(a * psi) / s)
    shape = (b,) + (1,) * (z1.ndim - 1)
    return c1.to(z1.dtype).reshape(shape) * z1 + c2.to(z1.dtype).reshape(shape) * z2


@torch.no_grad()
def interpolate(
    f: Denoiser,
    z1: Tensor,
    z2: Tensor,
    n: int,
    class_labels: Tensor | None = None,
    sigma: float | None = None,
    clamp: bool = True,
) -> Tensor:
    """A strip of n images decoded in one step from the spherical interpolation of two standard-normal noises.

    z1, z2: (C, H, W) -> (n, C, H, W), or (B, C, H, W) -> (B, n, C, H, W). Image k is f(T z, T) with z = slerp(z1, z2,
    k / (n - 1)) and T = sigma or f.sigma_max (80), so the endpoints are the one-step samples of z1 and z2.
    class_labels: (B,) (or (1,) unbatched), one per strip.
    """
    if int(n) != n or n < 2:
        raise ValueError(f"an interpolation strip needs n >= 2 images, got {n}")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 and z2 must have the same shape, got {tuple(z1.shape)} and {tuple(z2.shape)}")
    if z1.ndim not in (3, 4):
        raise ValueError(f"z1 and z2 must be (C, H, W) or (B, C, H, W), got {tuple(z1.shape)}")
    _check_channels(f, z1 if z1.ndim == 4 else z1[None])
    batched = z1.ndim == 4
    z1, z2 = (z1, z2) if batched else (z1[None], z2[None])
    b, n = z1.shape[0], int(n)
    alphas = torch.linspace(0, 1, n, dtype=torch.float64, device=z1.device)
    z = slerp(z1.repeat_interleave(n, 0), z2.repeat_interleave(n, 0), alphas.repeat(b))
    T = float(sigma if sigma is not None else getattr(f, "sigma_max", SIGMA_MAX))
    labels = None if class_labels is None else class_labels.reshape(-1).repeat_interleave(n)
    x = f(T * z, T, labels)
    x = x.clamp(-1, 1) if clamp else x
    x = x.reshape(b, n, *x.shape[1:])
    return x if batched else x[0]


# --- model introspection for clear errors ----------------------------------------------------------------------------


def _model_config(f):
    return getattr(getattr(f, "net", None), "config", None)


def _model_channels(f) -> int | None:
    return getattr(_model_config(f), "in_channels", None)


def _model_resolution(f) -> int | None:
    cfg = _model_config(f)
    return cfg.resolution if cfg is not None else None


def _check_channels(f, images: Tensor) -> None:
    channels = _model_channels(f)
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"the images have {images.shape[1]} channel(s) but the model takes {channels}")
