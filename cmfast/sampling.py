"""Noise grids, randomness and the samplers: Algorithm 1 (one-step and multistep) and EDM's Heun sampler.

Samplers are stateless functions over a callable f(x, sigma, class_labels=None). Randomness comes in as an argument:
a torch.Generator, or a list of them with one per sample, which makes every image depend only on its own seed
whatever the batch size (see `generators_from_seeds`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

Denoiser = Callable[..., Tensor]  # f(x, sigma, class_labels=None) -> x0
Generators = torch.Generator | Sequence[torch.Generator] | None
NoiseSource = Callable[[Tensor], Tensor]  # like -> fresh standard normal noise of like's shape, device and dtype
Projection = Callable[[Tensor], Tensor]  # x -> x with the known part put back (zero-shot editing)

SIGMA_MIN, SIGMA_MAX, RHO = 0.002, 80.0, 7.0


# --- noise grids (REFERENCE.md section 1) ----------------------------------------------------------------------------


def _karras_at(j: Tensor, n: int, sigma_min: float, sigma_max: float, rho: float) -> Tensor:
    """sigma(j) = (T^(1/rho) + j/(n-1) (eps^(1/rho) - T^(1/rho)))^rho, with the endpoints j = 0 and n-1 made exact."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + j / (n - 1) * (lo - hi)) ** rho
    sigmas[j == 0], sigmas[j == n - 1] = sigma_max, sigma_min  # so "last == sigma_min" checks are exact
    return sigmas


def _check_grid(n: int, sigma_min: float, sigma_max: float) -> None:
    if int(n) != n or n < 2:
        raise ValueError(f"a Karras grid needs n >= 2 points, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")


def karras_sigmas(n: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO) -> Tensor:
    """Karras et al. (2022) grid of n noise levels, descending float64: first sigma_max (T), last sigma_min (eps).

    sigma(j) = (T^(1/rho) + j/(n-1) (eps^(1/rho) - T^(1/rho)))^rho for j = 0..n-1, the official code's index order.
    """
    _check_grid(n, sigma_min, sigma_max)
    return _karras_at(torch.arange(int(n), dtype=torch.float64), int(n), sigma_min, sigma_max, rho)


def sigmas_from_ts(
    ts: Sequence[int], steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO
) -> Tensor:
    """Official multistep time points: indices `ts` into the descending Karras grid of `steps` points.

    ts = (0, 22, 39) with steps = 40 gives [80.0, sigma_22, 0.002]; `sample` stops at a last entry equal to
    sigma_min (no evaluation there), so that list means two network evaluations. A last index below steps - 1 is
    evaluated too (the official sampler would instead return the image re-noised to that level).
    """
    _check_grid(steps, sigma_min, sigma_max)
    ts = [int(t) for t in ts]
    if not ts:
        raise ValueError("ts is empty")
    if any(t < 0 or t >= steps for t in ts):
        raise ValueError(f"ts {ts} must lie in [0, {steps - 1}] for a grid of steps={steps}")
    if any(b <= a for a, b in zip(ts, ts[1:])):
        raise ValueError(f"ts {ts} must be strictly increasing")
    return _karras_at(torch.tensor(ts, dtype=torch.float64), int(steps), sigma_min, sigma_max, rho)


def multistep_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO):
    """Default time points for `num_steps` evaluations: the Karras grid of num_steps + 1 points (last = sigma_min)."""
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"the number of sampling steps must be a positive integer, got {num_steps}")
    return karras_sigmas(num_steps + 1, sigma_min, sigma_max, rho)


def num_evaluations(sigmas: Sequence[float], sigma_min: float = SIGMA_MIN) -> int:
    """Network evaluations that `sample` spends on this list of time points."""
    return len(evaluation_sigmas(sigmas, sigma_min))


# --- randomness ------------------------------------------------------------------------------------------------------


def generators_from_seeds(seeds: Sequence[int], device: str | torch.device = "cpu") -> list[torch.Generator]:
    """One generator per sample, seeded with its own seed (sample i of a run with seed S uses S + i)."""
    return [torch.Generator(device).manual_seed(int(s)) for s in seeds]


def randn(shape: Sequence[int], generator: Generators = None, device=None, dtype=torch.float32) -> Tensor:
    """Standard normal noise of `shape`; with a list of generators, row i is drawn from generator i alone."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=gen_device, dtype=dtype).to(device)
    if len(generator) != shape[0]:
        raise ValueError(f"got {len(generator)} generators for a batch of {shape[0]}")
    rows = [torch.randn(tuple(shape[1:]), generator=g, device=g.device, dtype=dtype) for g in generator]
    return torch.stack(rows).to(device)


def randint(high: int, n: int, generator: Generators = None, device=None) -> Tensor:
    """n integers in [0, high); with a list of generators, entry i comes from generator i alone."""
    if generator is None or isinstance(generator, torch.Generator):
        gen_device = generator.device if generator is not None else device
        return torch.randint(high, (n,), generator=generator, device=gen_device).to(device)
    if len(generator) != n:
        raise ValueError(f"got {len(generator)} generators for {n} labels")
    return torch.cat([torch.randint(high, (1,), generator=g, device=g.device) for g in generator]).to(device)


# --- samplers --------------------------------------------------------------------------------------------------------


def check_sigmas(sigmas: Sequence[float] | Tensor) -> list[float]:
    """Time points as floats; positive, finite and strictly decreasing, or a ValueError that says which."""
    sigmas = [float(s) for s in (sigmas.tolist() if isinstance(sigmas, Tensor) else sigmas)]
    if not sigmas:
        raise ValueError("sigmas is empty")
    if any(s <= 0 or not math.isfinite(s) for s in sigmas):
        raise ValueError(f"sigmas must be positive and finite, got {sigmas}")
    if any(b >= a for a, b in zip(sigmas, sigmas[1:])):
        raise ValueError(f"sigmas must be strictly decreasing, got {sigmas}")
    return sigmas


def evaluation_sigmas(sigmas: Sequence[float] | Tensor, sigma_min: float, sigma_max: float | None = None):
    """The time points `sample` evaluates f at: checked, and without a final sigma_min (which only marks the end)."""
    sigmas = check_sigmas(sigmas)
    if len(sigmas) > 1 and math.isclose(sigmas[-1], sigma_min):
        sigmas = sigmas[:-1]
    if sigmas[-1] < sigma_min:
        raise ValueError(f"time points must not go below sigma_min={sigma_min}, got {sigmas}")
    if math.isclose(sigmas[0], sigma_min):
        raise ValueError(f"the only time point is sigma_min={sigma_min}, where f is the identity; start higher")
    if sigma_max is not None and sigmas[0] > sigma_max * (1 + 1e-9):
        raise ValueError(f"the first time point {sigmas[0]} is above the model's sigma_max={sigma_max}")
    return sigmas


def noise_from(generator: Generators) -> NoiseSource:
    """Fresh noise drawn from `generator` (one per sample when a list), shaped like the tensor it is given."""

    def draw(like: Tensor) -> Tensor:
        return randn(like.shape, generator, device=like.device, dtype=like.dtype)

    return draw


def noise_given(zs: Sequence[Tensor]) -> NoiseSource:
    """The noise tensors `zs`, handed out in order (a CUDA graph's static buffers, or draws made beforehand)."""
    queue = iter(zs)

    def draw(like: Tensor) -> Tensor:
        return next(queue)

    return draw


def consistency_steps(
    f: Denoiser,
    x: Tensor,
    sigmas: Sequence[float],
    class_labels: Tensor | None,
    noise: NoiseSource,
    clamp: bool = True,
    sigma_min: float = SIGMA_MIN,
    project: Projection | None = None,
) -> Tensor:
    """The body of Algorithm 1 (and of Algorithm 4, with `project`), shared by `sample`, the CUDA-graph sampler and
    the editors.

    x: the starting point at sigmas[0], already noised (sigma_max z for sampling). sigmas: the evaluation time points,
    checked (see `evaluation_sigmas`). Each step evaluates x <- f(x, tau_n), clamps it to [-1, 1] when `clamp` and
    applies `project`; before every step after the first, x gains fresh noise of std sqrt(tau_n^2 - sigma_min^2)
    from `noise`.
    """
    for n, sigma in enumerate(sigmas):
        if n > 0:
            x = x + math.sqrt(sigma**2 - sigma_min**2) * noise(x)
        x = f(x, sigma, class_labels)
        x = x.clamp(-1, 1) if clamp else x
        x = project(x) if project is not None else x
    return x


@torch.no_grad()
def sample(
    f: Denoiser,
    noise: Tensor,
    sigmas: Sequence[float] | Tensor,
    class_labels: Tensor | None = None,
    generator: Generators = None,
    clamp: bool = True,
    sigma_min: float | None = None,
) -> Tensor:
    """Multistep consistency sampling (Algorithm 1); a single sigma is one-step generation.

    noise: (B, C, H, W) standard normal; sigmas: descending time points tau_1 > tau_2 > ...; the first is where
    sampling starts (usually sigma_max), and a last entry equal to sigma_min only marks the end (no evaluation).
    Between evaluations, fresh noise of std sqrt(tau^2 - sigma_min^2) is drawn from `generator`. Outputs are clamped
    to [-1, 1] as the official sampler does. sigma_min defaults to f.sigma_min (0.002 for plain callables).
    """
    eps = float(sigma_min if sigma_min is not None else getattr(f, "sigma_min", SIGMA_MIN))
    sigmas = evaluation_sigmas(sigmas, eps, getattr(f, "sigma_max", None))
    return consistency_steps(f, sigmas[0] * noise, sigmas, class_labels, noise_from(generator), clamp, eps)


def euler_step(D: Denoiser, x: Tensor, sigma: float, sigma_next: float, class_labels: Tensor | None = None) -> Tensor:
    """One Euler step of the PF ODE dx/dsigma = (x - D(x, sigma)) / sigma from sigma to sigma_next."""
    return x + (sigma_next - sigma) * (x - D(x, sigma, class_labels)) / sigma


def heun_step(D: Denoiser, x: Tensor, sigma: float, sigma_next: float, class_labels: Tensor | None = None) -> Tensor:
    """One Heun (2nd-order) step of the PF ODE from sigma to sigma_next > 0 (EDM Algorithm 1, REFERENCE.md s. 4)."""
    d = (x - D(x, sigma, class_labels)) / sigma
    x_euler = x + (sigma_next - sigma) * d
    d_next = (x_euler - D(x_euler, sigma_next, class_labels)) / sigma_next
    return x + (sigma_next - sigma) * (d + d_next) / 2


@torch.no_grad()
def heun_sample(
    D: Denoiser,
    noise: Tensor,
    num_steps: int = 18,
    class_labels: Tensor | None = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    clamp: bool = True,
) -> Tensor:
    """EDM's deterministic Heun sampler for teachers: num_steps Karras points, then 0; 2 num_steps - 1 evaluations.

    clamp=True clips every denoiser output to [-1, 1], as the official teacher sampler does (clip_denoised).
    """
    if int(num_steps) != num_steps or num_steps < 1:
        raise ValueError(f"the number of Heun steps must be a positive integer, got {num_steps}")
    if clamp:
        D = _clamped(D)
    sigmas = karras_sigmas(num_steps, sigma_min, sigma_max, rho).tolist() if num_steps > 1 else [sigma_max]
    x = noise * sigmas[0]
    for sigma, sigma_next in zip(sigmas, sigmas[1:]):
        x = heun_step(D, x, sigma, sigma_next, class_labels)
    return D(x, sigmas[-1], class_labels)  # the last step, to sigma = 0, is Euler: x + (0 - s) (x - D) / s = D


def _clamped(D: Denoiser) -> Denoiser:
    def clamped(x, sigma, class_labels=None):
        return D(x, sigma, class_labels).clamp(-1, 1)

    return clamped


def heun_evaluations(num_steps: int) -> int:
    return 2 * num_steps - 1
