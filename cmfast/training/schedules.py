"""Training schedules: those of consistency training, N(k) and mu(k) (Appendix C), iCT's curriculum and noise sampling;
the online EMAs' warm-up and the learning rate's decay.

iCT is "Improved techniques for training consistency models" (Song & Dhariwal 2023). k is the training iteration
(0-based) and K the total number of iterations. N(k) counts the points of the Karras
grid that the loss samples from at iteration k; mu(k) is the target network's EMA rate.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def _check_steps(k: int, K: int) -> None:
    if k < 0:
        raise ValueError(f"the training iteration k must be >= 0, got {k}")
    if K <= 0:
        raise ValueError(f"the total number of iterations K must be positive, got {K}")


def ema_rate(rate: float, k: int, warmup: bool = False) -> float:
    """The decay of an online-weight EMA at taken step k (0-based). Without warm-up, `rate` itself. With warm-up,
    min(rate, (1 + k) / (10 + k)): the average then spans about the last tenth of the steps taken, so a short run's
    EMA keeps no stale early weights (a fixed rate keeps a share rate^k of the initial ones: 0.999^3000 = 5 %)."""
    if k < 0:
        raise ValueError(f"the training iteration k must be >= 0, got {k}")
    return min(rate, (1 + k) / (10 + k)) if warmup else rate


def learning_rate(base: float, k: int, K: int, decay: float = 0.0) -> float:
    """The learning rate of step k (0-based) of a K-step run whose last `decay` fraction decays it linearly: `base`
    until step K (1 - decay), then base (K - k) / (decay K), reaching base / (decay K) at the last step k = K - 1 and 0
    at K. decay 0 keeps it constant. Ending on small updates lets a short run's weights settle, where a constant rate
    keeps them moving, and lets it start at a higher rate."""
    _check_steps(k, K)
    if not 0 <= decay <= 1:
        raise ValueError(f"the decay fraction must lie in [0, 1], got {decay}")
    if decay == 0:
        return base
    return base * max(0.0, min(1.0, (K - k) / (decay * K)))


def ct_num_scales(k: int, K: int, s0: int, s1: int) -> int:
    """N(k), the Karras grid size at iteration k of K: N(0) = s0 (integer s0 >= 2), rising to N(K) = s1 + 1.

    Like the official code, N(k) is kept >= 2 (a grid needs two points); it is not capped for k > K.
    """
    _check_steps(k, K)
    # N(k) = ceil(sqrt(k/K ((s1+1)^2 - s0^2) + s0^2) - 1) + 1 (Appendix C); operation order as the official code's
    scales = math.ceil(math.sqrt((k / K) * ((s1 + 1) ** 2 - s0**2) + s0**2) - 1)
    return max(scales, 1) + 1


def ct_target_ema(k: int, K: int, s0: int, s1: int, mu0: float, variant: str = "paper") -> float:
    """mu(k), the target network's EMA rate at iteration k of K.

    variant="paper": mu(k) = exp(s0 ln(mu0) / N(k)) (Appendix C), so mu(0) = mu0 for s0 = 2.
    variant="official": openai/consistency_models (cm/script_util.py) divides by N(k) - 1, so mu(0) = mu0^2 for s0 = 2.
    """
    if not 0 < mu0 < 1:
        raise ValueError(f"mu0 must lie in (0, 1), got {mu0}")
    n = ct_num_scales(k, K, s0, s1)
    if variant == "paper":
        return math.exp(s0 * math.log(mu0) / n)  # mu(k) = exp(s0 ln(mu0) / N(k)) (Appendix C)
    if variant == "official":
        return math.exp(s0 * math.log(mu0) / (n - 1))  # the official code's denominator N(k) - 1
    raise ValueError(f"unknown target EMA variant {variant!r}; expected 'paper' or 'official'")


def ict_num_scales(k: int, K: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum: N(k) = min(s0 2^floor(k/K'), s1) + 1, K' = floor(K / (log2 floor(s1/s0) + 1)).

    With the defaults, s0 2^stage doubles every K' = floor(K/8) iterations: N = 11, 21, 41, ..., 641, then 1281 for
    the rest of training. K' is kept >= 1 for tiny K.
    """
    _check_steps(k, K)
    if not 1 <= s0 <= s1:
        raise ValueError(f"need 1 <= s0 <= s1, got s0={s0}, s1={s1}")
    stage_length = max(math.floor(K / (math.log2(s1 // s0) + 1)), 1)  # K' (iCT, REFERENCE.md section 5)
    stage = min(k // stage_length, s1.bit_length())  # past this, s0 2^stage > s1 anyway; avoids huge integers
    return min(s0 * 2**stage, s1) + 1  # N(k) = min(s0 2^floor(k/K'), s1) + 1 (iCT)


def lognormal_index_probs(sigmas: Tensor, p_mean: float = -1.1, p_std: float = 2.0) -> Tensor:
    """iCT's discretized lognormal over the N - 1 intervals of a grid of N noise levels.

    sigmas: (N,) noise levels, ascending or descending. Returns (N-1,) float64 probabilities summing to 1, where entry
    i is the probability of the pair (sigmas[i], sigmas[i+1]), i.e. the lognormal(P_mean, P_std) mass between them:
    p(i) ∝ |erf((ln sigmas[i+1] - P_mean) / (sqrt2 P_std)) - erf((ln sigmas[i] - P_mean) / (sqrt2 P_std))|.
    On cmfast's descending `karras_sigmas(N)` entry j belongs to the official index j (online at sigma(j), target at
    sigma(j+1)); on the paper's ascending grid t_1 < ... < t_N entry n-1 belongs to the pair (t_n, t_{n+1}).
    """
    sigmas = torch.as_tensor(sigmas, dtype=torch.float64).reshape(-1)
    if sigmas.numel() < 2 or bool((sigmas <= 0).any()):
        raise ValueError("lognormal_index_probs needs at least two positive noise levels")
    cdf = torch.special.erf((sigmas.log() - p_mean) / (math.sqrt(2) * p_std))
    mass = (cdf[1:] - cdf[:-1]).abs()
    return mass / mass.sum()
