"""The continuous-time consistency objective (sCM: sCT and sCD) of Lu & Song, ICLR 2025 (arXiv 2410.11081).

One training step, per sample (cmfast.trigflow holds the formulas):
1. t from the log-normal proposal ln(sigma_d tan t) ~ N(P_mean, P_std^2); z ~ N(0, sigma_d^2 I);
   x_t = cos(t) x0 + sin(t) z.
2. The velocity dx_t/dt: the data's, cos(t) z - sin(t) x0 (sCT), or the teacher's PF-ODE velocity
   (cos(t) x_t - D(x_t / cos t, sigma_d tan t)) / sin(t) of an EDM denoiser D (sCD).
3. F^- and cos(t) sin(t) dF^-/dt in one `torch.func.jvp` of F(x_t, t) along (cos(t) sin(t) dx_t/dt, cos(t) sin(t)),
   without gradients (F^- is the stop-gradient network: the paper's theta^-).
4. g = -cos^2(t) (sigma_d F^- - dx_t/dt) - r cos(t) sin(t) (x_t + sigma_d dF^-/dt), r the tangent warm-up, then the
   tangent normalisation g / (||g|| + c).
5. The online F (with gradient) and the adaptive weighting's logvar from one forward; the loss
   (1 / (sigma_d tan t)) e^(-logvar) mean ||F - F^- - g||^2 + logvar, whose gradient at theta = theta^- is the sCM
   gradient (up to the weighting).

Dropout is shared between the JVP and the online forward (the same mask), as F^- must be the online network's own
output. The JVP is the same call with `cmfast.networks.set_fused_ops(net, True)`: the network's cmfast.ops then carry
their forward-mode rules.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.parallel import DistributedDataParallel

from .. import trigflow
from ..preconditioning import EDMDenoiser, TrigFlowModel
from ..sampling import Generators, randn
from .losses import SharedRNG


def teacher_velocity(teacher: EDMDenoiser, x_t: Tensor, t: Tensor, labels: Tensor | None, sigma_data: float) -> Tensor:
    """sCD's dx_t/dt from an EDM denoiser: (cos(t) x_t - D(x_t / cos t, sigma_d tan t)) / sin(t); no gradient.
    x_t: (B, C, H, W) TrigFlow coordinates with sigma_data the student's; t: (B,) in (0, pi/2)."""
    with torch.no_grad():
        sigma = trigflow.sigma_from_t(t, sigma_data)
        denoised = teacher(trigflow.edm_from_trigflow(x_t, t), sigma, labels).to(x_t.dtype)
        return trigflow.velocity_from_denoised(x_t, denoised, t)


def scaled_tangent(
    model: TrigFlowModel, x_t: Tensor, t: Tensor, dxt_dt: Tensor, labels: Tensor | None
) -> tuple[Tensor, Tensor]:
    """(F^-, cos(t) sin(t) dF^-/dt): torch.func.jvp of F(x_t, t) along (cos(t) sin(t) dx_t/dt, cos(t) sin(t)), the
    paper's scaling, without gradients. Both outputs in x_t's dtype."""
    v = torch.cos(t) * torch.sin(t)

    def F_of(x, s):
        return model(x, s, labels, raw=True)

    # SDPA's fused CPU/CUDA kernels have no forward mode: where attention falls back to SDPA (ADM without a fused
    # attention kernel), its math kernel runs instead
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        F_minus, dF = torch.func.jvp(F_of, (x_t, t), (trigflow.per_sample(v) * dxt_dt, v))
    return F_minus.to(x_t.dtype), dF.to(x_t.dtype)


def dropout_active(model) -> bool:
    """Whether a forward of `model` (a TrigFlowModel) draws dropout masks: in training mode with dropout > 0."""
    return model.training and bool(getattr(model.net.config, "dropout", 0.0))


class SCMLoss:
    """The sCM loss: sCT without a teacher, sCD with an EDM denoiser teacher (eval mode, no gradients).

    `loss(net, images, labels=None, step=0, generator=None)` -> (B,), as the other losses; net is a TrigFlowModel
    (possibly in DistributedDataParallel). p_mean, p_std: the log-normal proposal over sigma_d tan t. tangent_warmup:
    steps over which r rises from 0 to 1 (0: none). tangent_c: c of the tangent normalisation. prior_weighting:
    multiply by 1 / (sigma_d tan t). The adaptive weighting runs when the network has a logvar head.
    """

    def __init__(
        self,
        teacher: EDMDenoiser | None = None,
        p_mean: float = -1.0,
        p_std: float = 1.4,
        sigma_data: float = 0.5,
        tangent_warmup: int = 10_000,
        tangent_c: float = 0.1,
        prior_weighting: bool = True,
    ):
        if p_std <= 0:
            raise ValueError(f"p_std must be positive, got {p_std}")
        if tangent_warmup < 0 or tangent_c <= 0:
            raise ValueError(f"need tangent_warmup >= 0 and tangent_c > 0, got {tangent_warmup} and {tangent_c}")
        self.teacher = teacher
        self.p_mean, self.p_std, self.sigma_data = float(p_mean), float(p_std), float(sigma_data)
        self.tangent_warmup, self.tangent_c = int(tangent_warmup), float(tangent_c)
        self.prior_weighting = bool(prior_weighting)

    def draw(self, images: Tensor, generator: Generators = None) -> tuple[Tensor, Tensor]:
        """The step's randomness: the times t (B,), then the noise z ~ N(0, sigma_d^2 I)."""
        u = randn((images.shape[0],), generator, images.device, images.dtype)
        z = self.sigma_data * randn(images.shape, generator, images.device, images.dtype)
        return trigflow.lognormal_proposal(u, self.p_mean, self.p_std, self.sigma_data), z

    def velocity(self, images: Tensor, z: Tensor, x_t: Tensor, t: Tensor, labels: Tensor | None) -> Tensor:
        if self.teacher is None:
            return trigflow.data_velocity(images, z, t)
        return teacher_velocity(self.teacher, x_t, t, labels, self.sigma_data)

    def __call__(
        self,
        net,
        images: Tensor,
        labels: Tensor | None = None,
        step: int = 0,
        generator: Generators = None,
    ) -> Tensor:
        return self.loss_from_draws(net, images, labels, step, *self.draw(images, generator))

    def loss_from_draws(self, net, images: Tensor, labels: Tensor | None, step: int, t: Tensor, z: Tensor) -> Tensor:
        model = net.module if isinstance(net, DistributedDataParallel) else net
        x_t = trigflow.trigflow_noise(images, z, t)
        dxt_dt = self.velocity(images, z, x_t, t, labels)
        # the tangent's and the online forward's dropout masks agree by replaying torch's RNG; without active dropout
        # there is nothing to replay (and torch.compile, which cannot trace torch.get_rng_state, can take the loss)
        rng = SharedRNG(images.device) if dropout_active(model) else contextlib.nullcontext()
        with rng:
            _, dF = scaled_tangent(model, x_t, t, dxt_dt, labels)
        adaptive = bool(getattr(model.net.config, "logvar_head", False))
        with rng:  # through the DDP wrapper: its forward hooks the gradient all-reduce
            out = net(x_t, t, labels, raw=True, return_logvar=adaptive)
        F, logvar = out if adaptive else (out, None)
        F = F.to(images.dtype)
        r = trigflow.tangent_warmup(step, self.tangent_warmup)
        g = trigflow.scm_tangent(F.detach(), dxt_dt, x_t, dF, t, self.sigma_data, r)
        g = trigflow.normalize_tangent(g, self.tangent_c)
        weight = trigflow.prior_weight(t, self.sigma_data) if self.prior_weighting else None
        return trigflow.scm_loss(F, F.detach(), g, logvar, weight)
