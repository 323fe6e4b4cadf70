"""TrigFlow and the continuous-time consistency objective (sCM): Lu & Song, "Simplifying, Stabilizing and Scaling
Continuous-Time Consistency Models", ICLR 2025 (arXiv 2410.11081). Small pure functions named as in the paper.

TrigFlow noises data x0 with z ~ N(0, sigma_d^2 I) at time t in [0, pi/2]:

    x_t = cos(t) x0 + sin(t) z                                   (TrigFlow, Sec. 2)
    f(x_t, t) = cos(t) x_t - sin(t) sigma_d F(x_t / sigma_d, c_noise(t))   (the consistency function)

It is EDM's process in other coordinates: sigma = sigma_d tan(t) and x_edm = x_t / cos(t), so x_edm = x0 + sigma n with
n ~ N(0, I). Under that change EDM's preconditioning (c_in = cos(t) / sigma_d, c_skip = cos(t)^2, c_out = sigma_d sin t)
gives D(x_edm, sigma) = cos(t) x_t + sigma_d sin(t) F_edm: an EDM denoiser is a TrigFlow consistency function with
F = -F_edm, and its PF-ODE velocity is dx_t/dt = (cos(t) x_t - D) / sin(t) (`velocity_from_denoised`).

Tensors: t and sigma are (B,) or broadcastable to x's (B, C, H, W) after `per_sample`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

T_MID = 1.1  # the paper's intermediate time of two-step sampling


def per_sample(values: Tensor) -> Tensor:
    """(B,) -> (B, 1, 1, 1), to broadcast a per-sample time over images."""
    return values.reshape(-1, 1, 1, 1)


def t_from_sigma(sigma: Tensor, sigma_data: float) -> Tensor:
    """TrigFlow time of EDM's noise level: t = arctan(sigma / sigma_d), in [0, pi/2)."""
    return torch.atan(sigma / sigma_data)


def sigma_from_t(t: Tensor, sigma_data: float) -> Tensor:
    """EDM noise level of TrigFlow time t: sigma = sigma_d tan(t)."""
    return sigma_data * torch.tan(t)


def sigma_from_t_float(t: float, sigma_data: float) -> float:
    """`sigma_from_t` for a Python float (a sampler's time point)."""
    return sigma_data * math.tan(t)


def trigflow_noise(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """x_t = cos(t) x0 + sin(t) z, z ~ N(0, sigma_d^2 I); t: (B,)."""
    t = per_sample(t)
    return torch.cos(t) * x0 + torch.sin(t) * z


def data_velocity(x0: Tensor, z: Tensor, t: Tensor) -> Tensor:
    """dx_t/dt of one noising path, sCT's velocity: cos(t) z - sin(t) x0."""
    t = per_sample(t)
    return torch.cos(t) * z - torch.sin(t) * x0


def edm_from_trigflow(x_t: Tensor, t: Tensor) -> Tensor:
    """EDM coordinates of a TrigFlow point: x_edm = x_t / cos(t) (noise level sigma_d tan t)."""
    return x_t / torch.cos(per_sample(t))


def trigflow_from_edm(x: Tensor, t: Tensor) -> Tensor:
    """TrigFlow coordinates of an EDM point at sigma = sigma_d tan(t): x_t = cos(t) x."""
    return torch.cos(per_sample(t)) * x


def consistency_function(x_t: Tensor, F: Tensor, t: Tensor, sigma_data: float) -> Tensor:
    """f(x_t, t) = cos(t) x_t - sin(t) sigma_d F; f(x, 0) = x exactly."""
    t = per_sample(t)
    return torch.cos(t) * x_t - torch.sin(t) * sigma_data * F


def velocity_from_denoised(x_t: Tensor, denoised: Tensor, t: Tensor) -> Tensor:
    """PF-ODE velocity dx_t/dt = (cos(t) x_t - x0_hat) / sin(t) of a denoiser's estimate x0_hat = E[x0 | x_t]
    (from E[z | x_t] = (x_t - cos(t) x0_hat) / sin(t) and dx_t/dt = cos(t) z - sin(t) x0); t > 0."""
    t = per_sample(t)
    return (torch.cos(t) * x_t - denoised) / torch.sin(t)


def lognormal_proposal(u: Tensor, p_mean: float, p_std: float, sigma_data: float) -> Tensor:
    """The training times: ln(sigma_d tan t) ~ N(P_mean, P_std^2), from standard normal draws u (B,)."""
    return t_from_sigma(torch.exp(p_mean + p_std * u), sigma_data)


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """r of the tangent warm-up: linear from 0 to 1 over the first `warmup_steps` steps (0: no warm-up)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, step / warmup_steps)


def scm_tangent(
    F_minus: Tensor, dxt_dt: Tensor, x_t: Tensor, dF_scaled: Tensor, t: Tensor, sigma_data: float, r: float = 1.0
) -> Tensor:
    """g = cos(t) df^-/dt, the target direction of the sCM gradient, with the warm-up weight r on the second term:

        g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt)

    dF_scaled is cos(t) sin(t) dF^-/dt: the JVP of F^- along (cos(t) sin(t) dx_t/dt, cos(t) sin(t)), the paper's
    scaling, which stays bounded where dF/dt does not (t near 0 and pi/2)."""
    t = per_sample(t)
    cos, sin = torch.cos(t), torch.sin(t)
    return -(cos**2) * (sigma_data * F_minus - dxt_dt) - r * (cos * sin * x_t + sigma_data * dF_scaled)


def normalize_tangent(g: Tensor, c: float = 0.1) -> Tensor:
    """Tangent normalisation g / (||g|| + c), the norm per sample over (C, H, W)."""
    norm = torch.linalg.vector_norm(g, dim=tuple(range(1, g.ndim)), keepdim=True)
    return g / (norm + c)


def prior_weight(t: Tensor, sigma_data: float) -> Tensor:
    """The prior weighting 1 / (sigma_d tan t) of the sCM loss."""
    return 1 / sigma_from_t(t, sigma_data)


def scm_loss(F: Tensor, F_minus: Tensor, g: Tensor, logvar: Tensor | None, weight: Tensor | None = None) -> Tensor:
    """The adaptive-weighted sCM loss per sample, (B,):

        weight / e^(logvar) * mean_(C,H,W) ||F - F^- - g||^2 + logvar

    F carries the gradient; F^- and g are stop-gradient (detached here). logvar: (B,) the learned -w_phi(t), or None
    (then 0: no adaptive weighting). At F = F^- the gradient in F is -2 weight e^(-logvar) g / D."""
    diff = (F - F_minus.detach() - g.detach()).square().mean(dim=tuple(range(1, F.ndim)))
    if weight is not None:
        diff = weight * diff
    if logvar is None:
        return diff
    logvar = logvar.reshape(-1)
    return diff * torch.exp(-logvar) + logvar
