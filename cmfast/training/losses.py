"""Training losses: EDM's denoising loss (teachers), consistency distillation (Algorithm 2) and consistency training
(Algorithm 3, with the iCT options). REFERENCE.md sections 4-5.

Each loss is a small callable in the EDM style: hyper-parameters in `__init__`, and
`loss(net, images, labels=None, step=0, generator=None)` returns the per-sample loss, a (B,) tensor; the trainer
reduces it. `net` is called as net(x, sigma, class_labels) with sigma a (B,) tensor (a ConsistencyModel or EDMDenoiser,
possibly wrapped in DistributedDataParallel). Randomness comes from `generator`: None for torch's global RNG, one
torch.Generator, or a list with one generator per sample (then sample i's noise and noise level depend on generator i
alone, whatever the batch size or the number of processes). Dropout always draws from the global RNG.

Noise levels index the descending Karras grid `karras_sigmas(N)` as the official code does: index j in {0..N-2} pairs
the online network's level sigma(j) with the target's sigma(j+1). In the paper's ascending notation t_1 < ... < t_N this
is n = N - 1 - j: the online model sees t_(n+1) = sigma(j), the target t_n = sigma(j+1).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
from torch import Tensor

from .. import ops
from ..sampling import RHO, SIGMA_MAX, SIGMA_MIN, Generators, euler_step, heun_step, karras_sigmas, randint, randn
from .distances import Distance, get_distance
from .schedules import ct_num_scales, ct_target_ema, ict_num_scales, lognormal_index_probs

Network = Callable[..., Tensor]  # net(x, sigma, class_labels=None) -> (B, C, H, W), sigma a (B,) tensor


class SharedRNG:
    """Replays torch's global random stream, so that dropout draws the same masks in several forward passes.

    The CPU RNG state, and the CUDA RNG state of `device` when it is a CUDA device, are captured at construction;
    every `with` block restarts from them. Two identical networks in train mode evaluated at the same input inside
    two such blocks give identical outputs (the paper's shared dropout of online and target networks).
    """

    def __init__(self, device: torch.device | str):
        device = torch.device(device)
        self.cuda_device = device if device.type == "cuda" else None
        self.cpu_state = torch.get_rng_state()
        self.cuda_state = torch.cuda.get_rng_state(device) if self.cuda_device is not None else None

    def __enter__(self) -> SharedRNG:
        torch.set_rng_state(self.cpu_state)
        if self.cuda_state is not None:
            torch.cuda.set_rng_state(self.cuda_state, self.cuda_device)
        return self

    def __exit__(self, *exc) -> None:
        return None


def _per_sample(values: Tensor) -> Tensor:
    return values.reshape(-1, 1, 1, 1)


class EDMLoss:
    """EDM's denoising loss (Karras et al. 2022, Section 5 and Table 1's training column), to train teachers.

    ln(sigma) ~ N(p_mean, p_std^2); loss = mean over C*H*W of lambda(sigma) (D(y + sigma n, sigma) - y)^2 with
    lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2. Draws sigma (B values) before the noise.
    """

    def __init__(self, p_mean: float = -1.2, p_std: float = 1.2, sigma_data: float = 0.5):
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)

    def __call__(
        self,
        net: Network,
        images: Tensor,
        labels: Tensor | None = None,
        step: int = 0,
        generator: Generators = None,
    ) -> Tensor:
        b = images.shape[0]
        sigma = (randn((b,), generator, images.device, images.dtype) * self.p_std + self.p_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2  # EDM Table 1, lambda(sigma)
        noise = randn(images.shape, generator, images.device, images.dtype)
        denoised = net(images + _per_sample(sigma) * noise, sigma, labels)
        return weight * (denoised - images).square().mean(dim=(1, 2, 3))


class _ConsistencyLoss:
    """What CD and CT share: the grid, the index sampling, the weighting and the two evaluations."""

    def __init__(self, target, distance, weighting, sigma_min, sigma_max, rho):
        if weighting not in ("uniform", "ict"):
            raise ValueError(f"unknown weighting {weighting!r}; expected 'uniform' or 'ict' (1 / (t_(n+1) - t_n))")
        self.target = target
        self.distance: Distance = get_distance(distance) if isinstance(distance, str) else distance
        self.weighting = weighting
        self.sigma_min, self.sigma_max, self.rho = float(sigma_min), float(sigma_max), float(rho)
        self.index_sampling = "uniform"
        self.p_mean, self.p_std = -1.1, 2.0
        # replay the RNG so online and target draw the same dropout masks; off in captured steps (no dropout there)
        self.share_dropout = True

    def grid(self, n: int) -> Tensor:
        """The descending Karras grid of n points, float64 on CPU."""
        return karras_sigmas(n, self.sigma_min, self.sigma_max, self.rho)

    def sample_sigmas(self, n: int, images: Tensor, generator: Generators) -> tuple[Tensor, Tensor]:
        """(sigma(j), sigma(j+1)) per sample, j drawn over {0..n-2} uniformly (Algorithms 2-3) or by iCT's lognormal."""
        return self.sigmas_at(n, self.sample_indices(n, images, generator))

    def sigmas_at(self, n: int, j: Tensor) -> tuple[Tensor, Tensor]:
        """(sigma(j), sigma(j+1)) of the grid of n points, float64 on j's device (the device copy is cached, so a
        CUDA graph can capture the lookup)."""
        key = (n, j.device)
        if getattr(self, "_grid_cache", (None,))[0] != key:
            self._grid_cache = (key, self.grid(n).to(j.device))
        grid = self._grid_cache[1]
        return grid[j], grid[j + 1]

    def sample_indices(self, n: int, images: Tensor, generator: Generators) -> Tensor:
        """Grid indices j in {0..n-2}, one per sample, on images' device."""
        b, grid = images.shape[0], self.grid(n)
        if self.index_sampling == "uniform":
            j = randint(n - 1, b, generator, images.device)
        else:
            probs = lognormal_index_probs(grid, self.p_mean, self.p_std)
            if generator is None or isinstance(generator, torch.Generator):
                device = generator.device if generator is not None else images.device
                j = torch.multinomial(probs.to(device), b, replacement=True, generator=generator)
            else:
                if len(generator) != b:
                    raise ValueError(f"got {len(generator)} generators for a batch of {b}")
                j = torch.cat([torch.multinomial(probs.to(g.device), 1, generator=g).cpu() for g in generator])
        return j.to(images.device)

    def consistency(
        self, net: Network, x_hi: Tensor, sigma_hi: Tensor, x_lo: Tensor, sigma_lo: Tensor, labels: Tensor | None
    ) -> Tensor:
        """lambda d(f_theta(x_hi, sigma_hi), f_theta-(x_lo, sigma_lo)), dropout shared; sigmas are (B,) float64."""
        dtype = x_hi.dtype
        rng = SharedRNG(x_hi.device) if self.share_dropout else nullcontext()
        with rng:
            online = net(x_hi, sigma_hi.to(dtype), labels)
        with rng, torch.no_grad():
            target = (self.target if self.target is not None else net)(x_lo, sigma_lo.to(dtype), labels)
        loss = self.distance(online, target)
        if self.weighting == "ict":
            loss = loss * (1 / (sigma_hi - sigma_lo)).to(loss.dtype)  # iCT: lambda = 1 / (t_(n+1) - t_n)
        return loss


class CDLoss(_ConsistencyLoss):
    """Consistency distillation (Algorithm 2): the teacher's ODE step from t_(n+1) to t_n gives the target's input.

    teacher: an EDM denoiser D(x, sigma, class_labels), run without gradients (keep it in eval mode).
    target: the target network f_theta- (the trainer keeps it as an EMA of the online weights at rate `mu`, in the
    same train/eval mode as the online network so that dropout is shared), or None for stopgrad of the online network
    (mu = 0). num_scales: N, points of the Karras grid. solver: "heun" (the paper's) or "euler". distance: a name for
    `get_distance` or a callable d(x, y) -> (B,). weighting: "uniform" (lambda = 1, the paper's) or "ict".
    fused: the teacher's step through cmfast.ops.heun_step (`fused_teacher_step`; the teacher must be an EDMDenoiser);
    the online and target models' skip/out is fused by their own `skip_out_op`.
    """

    def __init__(
        self,
        teacher: Network,
        target: Network | None,
        num_scales: int = 18,
        solver: str = "heun",
        distance: str | Distance = "lpips",
        mu: float | None = None,
        weighting: str = "uniform",
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        rho: float = RHO,
        fused: bool = False,
    ):
        if solver not in ("heun", "euler"):
            raise ValueError(f"unknown solver {solver!r}; expected 'heun' or 'euler'")
        if int(num_scales) != num_scales or num_scales < 2:
            raise ValueError(f"num_scales must be an integer >= 2, got {num_scales}")
        if target is None and mu not in (None, 0):
            raise ValueError(f"mu={mu} needs a target network; target=None means mu = 0 (stopgrad of the online net)")
        if mu is not None and not 0 <= mu < 1:
            raise ValueError(f"mu must lie in [0, 1), got {mu}")
        if fused and not hasattr(teacher, "network_output"):
            raise ValueError("fused=True needs an EDMDenoiser teacher: cmfast.ops.heun_step takes its raw output F")
        super().__init__(target, distance, weighting, sigma_min, sigma_max, rho)
        self.teacher, self.solver, self._num_scales = teacher, solver, int(num_scales)
        self.mu = 0.0 if target is None else float(0.95 if mu is None else mu)
        self.fused = bool(fused)

    def num_scales(self, step: int = 0) -> int:
        return self._num_scales

    def target_ema(self, step: int = 0) -> float:
        """The target network's EMA rate mu (0 when the target is the online network itself)."""
        return self.mu

    def teacher_step(self, x: Tensor, sigma: Tensor, sigma_next: Tensor, labels: Tensor | None) -> Tensor:
        """One Heun or Euler step of the teacher's PF ODE from per-sample sigma to sigma_next, both (B,)."""
        if self.fused:
            return fused_teacher_step(self.teacher, x, sigma, sigma_next, labels, self.solver)

        def denoiser(x, s, class_labels=None):
            return self.teacher(x, s.reshape(-1), class_labels)

        step = heun_step if self.solver == "heun" else euler_step
        return step(denoiser, x, _per_sample(sigma), _per_sample(sigma_next), labels)

    def __call__(
        self,
        net: Network,
        images: Tensor,
        labels: Tensor | None = None,
        step: int = 0,
        generator: Generators = None,
    ) -> Tensor:
        return self.loss_from_draws(net, images, labels, *self.draw(images, generator))

    def draw(self, images: Tensor, generator: Generators = None) -> tuple[Tensor, Tensor]:
        """The step's randomness: the noise z, then the grid indices j (the official code's order)."""
        z = randn(images.shape, generator, images.device, images.dtype)
        return z, self.sample_indices(self._num_scales, images, generator)

    def loss_from_draws(self, net: Network, images: Tensor, labels: Tensor | None, z: Tensor, j: Tensor) -> Tensor:
        """The per-sample loss for given noise and indices: no randomness and no host synchronisation, so a CUDA
        graph can capture it (cmfast.training.graph_step)."""
        sigma_hi, sigma_lo = self.sigmas_at(self._num_scales, j)
        dtype = images.dtype
        x_hi = images + _per_sample(sigma_hi.to(dtype)) * z  # x_(t_(n+1)) = x + t_(n+1) z
        with torch.no_grad():
            x_lo = self.teacher_step(x_hi, sigma_hi.to(dtype), sigma_lo.to(dtype), labels)  # x_hat_(t_n)
        return self.consistency(net, x_hi, sigma_hi, x_lo, sigma_lo, labels)


def fused_teacher_step(
    teacher, x: Tensor, sigma: Tensor, sigma_next: Tensor, labels: Tensor | None = None, solver: str = "heun"
) -> Tensor:
    """`heun_step` (or `euler_step`) of an EDMDenoiser teacher through cmfast.ops.heun_step: the teacher's network
    gives its raw outputs F (under the teacher's autocast), and the op does EDM's skip/out, the Euler predictor and the
    corrector, without clamping (as the plain step). x: (B, C, H, W) float32/64; sigma, sigma_next: (B,) with
    0 <= sigma_next < sigma. A sample whose sigma_next is 0 takes the Euler step, x + (0 - sigma) d = D(x, sigma), as
    EDM's sampler ends (heun_sample); the Heun corrector would divide by sigma_next. Returns x's dtype; no gradients."""
    with torch.no_grad():
        F = teacher.network_output(x, sigma, labels).to(x.dtype)  # one dtype, as the fused kernels take
        x_e = ops.heun_step(x, F, sigma, sigma_next, sigma_data=teacher.sigma_data)  # Euler: the predictor
        if solver == "euler":
            return x_e
        last = sigma_next == 0
        s = torch.where(last, sigma, sigma_next)  # any positive level for those samples: their Heun result is unused
        F_next = teacher.network_output(x_e, s, labels).to(x.dtype)
        x_hat = ops.heun_step(x, F, sigma, s, F_next=F_next, sigma_data=teacher.sigma_data)
        return torch.where(_per_sample(last), x_e, x_hat)


class CTLoss(_ConsistencyLoss):
    """Consistency training (Algorithm 3): the target sees x + t_n z with the online network's z.

    The grid size N(k) follows the training iteration `step` of `total_steps` (K; capped there): "ct" curriculum N(k)
    of Appendix C (s0=2, s1=150 by default) or iCT's exponential "ict" curriculum (s0=10, s1=1280).
    `target_ema(step)` gives the trainer mu(k) (`mu_variant` "paper" or "official", see schedules.ct_target_ema), or
    0 when target is None (stopgrad of the online network).

    ict=True switches on all iCT options (Song & Dhariwal 2023): pseudo-Huber distance, lognormal index sampling
    (p_mean, p_std), the exponential curriculum, weighting 1 / (t_(n+1) - t_n) and mu = 0 (target must be None).
    Each can also be chosen on its own with distance=, index_sampling= ("uniform" | "lognormal"), curriculum=
    ("ct" | "ict"), weighting= ("uniform" | "ict") and target=None; arguments left None follow `ict`.
    """

    def __init__(
        self,
        target: Network | None,
        total_steps: int,
        s0: int | None = None,
        s1: int | None = None,
        mu0: float = 0.9,
        mu_variant: str = "paper",
        distance: str | Distance | None = None,
        ict: bool = False,
        curriculum: str | None = None,
        index_sampling: str | None = None,
        weighting: str | None = None,
        p_mean: float = -1.1,
        p_std: float = 2.0,
        sigma_min: float = SIGMA_MIN,
        sigma_max: float = SIGMA_MAX,
        rho: float = RHO,
    ):
        if ict and target is not None:
            raise ValueError("iCT uses mu = 0: pass target=None (stopgrad of the online network), or ict=False")
        curriculum = curriculum or ("ict" if ict else "ct")
        index_sampling = index_sampling or ("lognormal" if ict else "uniform")
        if curriculum not in ("ct", "ict"):
            raise ValueError(f"unknown curriculum {curriculum!r}; expected 'ct' or 'ict'")
        if index_sampling not in ("uniform", "lognormal"):
            raise ValueError(f"unknown index_sampling {index_sampling!r}; expected 'uniform' or 'lognormal'")
        if curriculum == "ict" and target is not None:
            raise ValueError("the exponential curriculum has no mu(k) schedule; use it with target=None (mu = 0)")
        if mu_variant not in ("paper", "official"):
            raise ValueError(f"unknown mu_variant {mu_variant!r}; expected 'paper' or 'official'")
        if int(total_steps) != total_steps or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps}")
        distance = distance if distance is not None else ("pseudo-huber" if ict else "lpips")
        super().__init__(target, distance, weighting or ("ict" if ict else "uniform"), sigma_min, sigma_max, rho)
        self.total_steps, self.curriculum, self.index_sampling = int(total_steps), curriculum, index_sampling
        default_s0, default_s1 = (10, 1280) if curriculum == "ict" else (2, 150)
        self.s0 = int(default_s0 if s0 is None else s0)
        self.s1 = int(default_s1 if s1 is None else s1)
        self.mu0, self.mu_variant = float(mu0), mu_variant
        self.p_mean, self.p_std = float(p_mean), float(p_std)
        if self.target is not None:
            ct_target_ema(0, self.total_steps, self.s0, self.s1, self.mu0, mu_variant)  # validate mu0 early

    def num_scales(self, step: int) -> int:
        """N(k) at training iteration k = step; past K (a run trained on beyond its schedule) N(K)."""
        step = min(step, self.total_steps)
        if self.curriculum == "ict":
            return ict_num_scales(step, self.total_steps, self.s0, self.s1)
        return ct_num_scales(step, self.total_steps, self.s0, self.s1)

    def target_ema(self, step: int) -> float:
        """mu(k), the target network's EMA rate after iteration k = step (mu(K) past K); 0 without a target network
        (iCT)."""
        if self.target is None:
            return 0.0
        return ct_target_ema(min(step, self.total_steps), self.total_steps, self.s0, self.s1, self.mu0, self.mu_variant)

    def __call__(
        self,
        net: Network,
        images: Tensor,
        labels: Tensor | None = None,
        step: int = 0,
        generator: Generators = None,
    ) -> Tensor:
        z = randn(images.shape, generator, images.device, images.dtype)
        sigma_hi, sigma_lo = self.sample_sigmas(self.num_scales(step), images, generator)
        dtype = images.dtype
        x_hi = images + _per_sample(sigma_hi.to(dtype)) * z  # x + t_(n+1) z
        x_lo = images + _per_sample(sigma_lo.to(dtype)) * z  # x + t_n z, the same z
        return self.consistency(net, x_hi, sigma_hi, x_lo, sigma_lo, labels)
