"""EDM preconditioning and the consistency function (REFERENCE.md section 2).

    D(x, sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

The teacher (`EDMDenoiser`) uses EDM's coefficients; the student (`ConsistencyModel`) uses the boundary-condition form
of the paper's Appendix C, so that f(x, sigma_min) == x exactly. The coefficients and the combination are computed in
float32 (float64 when x is float64) whatever precision the backbone F runs in.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import Tensor, nn

from . import trigflow

# --- coefficients: small pure functions named as in the paper -------------------------------------------------------


def edm_c_skip(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM skip scaling: sigma_data^2 / (sigma^2 + sigma_data^2)."""
    return sigma_data**2 / (sigma**2 + sigma_data**2)


def edm_c_out(sigma: Tensor, sigma_data: float) -> Tensor:
    """EDM output scaling: sigma sigma_data / sqrt(sigma^2 + sigma_data^2)."""
    return sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()


def cm_c_skip(sigma: Tensor, sigma_min: float, sigma_data: float) -> Tensor:
    """Consistency-model skip scaling (Appendix C): sigma_data^2 / ((sigma - eps)^2 + sigma_data^2); 1 at eps."""
    return sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)


def cm_c_out(sigma: Tensor, sigma_min: float, sigma_data: float) -> Tensor:
    """Consistency-model output scaling (App. C): sigma_data (sigma - eps) / sqrt(sigma_data^2 + sigma^2); 0 at eps."""
    return sigma_data * (sigma - sigma_min) / (sigma**2 + sigma_data**2).sqrt()


def c_in(sigma: Tensor, sigma_data: float) -> Tensor:
    """Input scaling: 1 / sqrt(sigma^2 + sigma_data^2), giving the network unit-variance input."""
    return 1 / (sigma**2 + sigma_data**2).sqrt()


def c_noise(sigma: Tensor, noise_cond: str) -> Tensor:
    """Noise label fed to the backbone: EDM's ln(sigma)/4, or the official ADM checkpoints' 1000 * ln(sigma)/4."""
    if noise_cond == "edm":
        return sigma.log() / 4
    if noise_cond == "adm":
        return 250 * (sigma + 1e-44).log()  # 1e-44 as in the official code, which feeds the ADM "timestep" this way
    raise ValueError(f"unknown noise_cond {noise_cond!r}; expected 'edm' or 'adm'")


# --- modules ---------------------------------------------------------------------------------------------------------


class _Preconditioned(nn.Module):
    """Shared wrapper: broadcasts sigma, runs F (optionally under autocast), combines in float32/float64."""

    def __init__(
        self,
        net: nn.Module,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        noise_cond: str | None = None,
        autocast_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be positive, got {sigma_data}")
        if autocast_dtype not in (None, torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}")
        self.net = net
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        config = getattr(net, "config", None)
        self.noise_cond = noise_cond or self.default_noise_cond(config)
        self.check_noise_cond(self.noise_cond)
        self.autocast_dtype = autocast_dtype

    @staticmethod
    def default_noise_cond(config) -> str:
        return getattr(config, "noise_cond", "edm")

    @staticmethod
    def check_noise_cond(noise_cond: str) -> None:
        c_noise(torch.ones(1), noise_cond)  # validate early

    @property
    def boundary(self) -> float:
        """The noise level where the model is the identity (EDM's coefficients: 0): the floor of Algorithm 1's
        re-noising sqrt(sigma^2 - boundary^2)."""
        return 0.0

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def forward(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        """x: (B, C, H, W) noisy images; sigma: a float or a (B,) tensor of noise levels. Returns (B, C, H, W)."""
        x, sigma = self._inputs(x, sigma)
        return self.combine(x, self._network_output(x, sigma, class_labels), sigma)

    def network_output(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        """The backbone's raw output F(c_in(sigma) x, c_noise(sigma)), before skip/out, in the backbone's dtype (the
        autocast dtype when set): what the fused ops (cmfast.ops.heun_step, skip_out) take. Arguments as `forward`."""
        return self._network_output(*self._inputs(x, sigma), class_labels)

    def combine(self, x: Tensor, F_x: Tensor, sigma: Tensor) -> Tensor:
        """c_skip(sigma) x + c_out(sigma) F_x in x's dtype (float32/float64); x: (B, C, H, W), sigma: (B,)."""
        skip, out = self.coefficients(sigma.reshape(-1, 1, 1, 1))
        return skip * x + out * F_x.to(x.dtype)

    def _inputs(self, x: Tensor, sigma: float | Tensor) -> tuple[Tensor, Tensor]:
        """x in float32 (float64 when float64) and sigma as a (B,) tensor of that dtype on x's device."""
        compute_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(compute_dtype)
        if isinstance(sigma, Tensor):
            sigma = sigma.to(device=x.device, dtype=compute_dtype).reshape(-1)
        else:  # filled on the device: no host-to-device copy, which a CUDA graph being captured forbids
            sigma = torch.full((1,), float(sigma), dtype=compute_dtype, device=x.device)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        if sigma.shape[0] != x.shape[0]:
            raise ValueError(f"sigma has {sigma.shape[0]} entries but the batch has {x.shape[0]} images")
        return x, sigma

    def _network_output(self, x: Tensor, sigma: Tensor, class_labels: Tensor | None) -> Tensor:
        net_dtype = next(self.net.parameters()).dtype
        x_in = (c_in(sigma.reshape(-1, 1, 1, 1), self.sigma_data) * x).to(net_dtype)
        # autocast's cache of cast weights must stay off while a CUDA graph is being captured (cmfast.graphs)
        capturing = x.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        autocast = (
            torch.autocast(x.device.type, dtype=self.autocast_dtype, cache_enabled=not capturing)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with autocast:
            # noise labels stay in float32/64: ADM's 250 ln(sigma) spans +-1500, too coarse in bf16
            return self.net(x_in, c_noise(sigma, self.noise_cond), class_labels=class_labels)

    def extra_repr(self) -> str:
        return (
            f"sigma_min={self.sigma_min}, sigma_max={self.sigma_max}, sigma_data={self.sigma_data}, "
            f"noise_cond={self.noise_cond!r}, autocast_dtype={self.autocast_dtype}"
        )


class EDMDenoiser(_Preconditioned):
    """Teacher denoiser D(x, sigma, class_labels=None) with EDM's preconditioning (Karras et al. 2022, Table 1)."""

    kind = "edm"

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return edm_c_skip(sigma, self.sigma_data), edm_c_out(sigma, self.sigma_data)


class ConsistencyModel(_Preconditioned):
    """Consistency function f(x, sigma, class_labels=None) -> x0 with f(x, sigma_min) == x exactly (Eq. 5-6)."""

    kind = "cm"
    # None: combine in this file's float32 arithmetic; or a function with cmfast.ops.skip_out's arguments (x, F,
    # sigma, sigma_min, sigma_data), differentiable in x and F, that combines instead (the trainer's --fused)
    skip_out_op = None

    @property
    def boundary(self) -> float:
        return self.sigma_min

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return cm_c_skip(sigma, self.sigma_min, self.sigma_data), cm_c_out(sigma, self.sigma_min, self.sigma_data)

    def combine(self, x: Tensor, F_x: Tensor, sigma: Tensor) -> Tensor:
        if self.skip_out_op is None:
            return super().combine(x, F_x, sigma)
        return self.skip_out_op(x, F_x, sigma, self.sigma_min, self.sigma_data)


TRIGFLOW_TIME_CONDS = ("t", "edm", "adm")


class TrigFlowModel(_Preconditioned):
    """The TrigFlow consistency function of sCM (Lu & Song 2025), f(x_t, t) = cos(t) x_t - sin(t) sigma_d F.

    Called like the other models, in EDM coordinates: forward(x, sigma, class_labels) -> x0 with t = arctan(sigma /
    sigma_d) and x_t = cos(t) x (see cmfast.trigflow), so Algorithm 1 and every sampler take it unchanged; f is the
    identity at sigma = 0 (`boundary`). forward(x_t, t, class_labels, raw=True) gives the backbone's F(x_t / sigma_d,
    c_noise(t)) in TrigFlow coordinates instead (what the sCM loss differentiates), and with return_logvar=True also
    the adaptive weighting's log-variance (B,) from the network's logvar head.

    noise_cond chooses c_noise(t) and F:
    - "t": c_noise(t) = t (the network's time_scale multiplies it before its embedding), F = the network's output;
    - "edm" / "adm": c_noise of EDM's sigma = sigma_d tan t as the EDM teachers take it, and F = -(network output):
      exactly EDM's preconditioning (c_in = cos t / sigma_d, c_skip = cos^2 t, c_out = sigma_d sin t), so a student
      initialised with an EDM teacher's weights starts as the teacher's denoiser.
    """

    kind = "trigflow"
    # None: combine in this file's float32 arithmetic; or a function with cmfast.ops.trig_skip_out's arguments (x, F,
    # t, sigma_data), differentiable in x and F, that combines instead (the fused path)
    skip_out_op = None

    @staticmethod
    def default_noise_cond(config) -> str:
        return "t"

    @staticmethod
    def check_noise_cond(noise_cond: str) -> None:
        if noise_cond not in TRIGFLOW_TIME_CONDS:
            raise ValueError(f"unknown TrigFlow noise_cond {noise_cond!r}; expected one of {TRIGFLOW_TIME_CONDS}")

    def forward(
        self,
        x: Tensor,
        sigma: float | Tensor,
        class_labels: Tensor | None = None,
        raw: bool = False,
        return_logvar: bool = False,
    ):
        """x: (B, C, H, W); sigma: a float or (B,). Default: EDM coordinates (x at noise level sigma) -> f, the x0
        estimate. raw=True: x is x_t and sigma is t (TrigFlow coordinates) -> F (and the logvar when asked)."""
        if raw:
            x_t, t = self._inputs(x, sigma)
            return self.trig_network_output(x_t, t, class_labels, return_logvar)
        x, sigma = self._inputs(x, sigma)
        t = trigflow.t_from_sigma(sigma, self.sigma_data)
        x_t = trigflow.trigflow_from_edm(x, t)
        return self.combine(x_t, self.trig_network_output(x_t, t, class_labels), t)

    def c_noise(self, t: Tensor) -> Tensor:
        """The backbone's time input: t itself, or EDM's c_noise of sigma_d tan t."""
        if self.noise_cond == "t":
            return t
        return c_noise(trigflow.sigma_from_t(t, self.sigma_data), self.noise_cond)

    def trig_network_output(
        self, x_t: Tensor, t: Tensor, class_labels: Tensor | None = None, return_logvar: bool = False
    ):
        """F(x_t / sigma_d, c_noise(t)) in the backbone's dtype; x_t (B, C, H, W) and t (B,) float32/64."""
        net_dtype = next(self.net.parameters()).dtype
        x_in = (x_t / self.sigma_data).to(net_dtype)
        capturing = x_t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        autocast = (
            torch.autocast(x_t.device.type, dtype=self.autocast_dtype, cache_enabled=not capturing)
            if self.autocast_dtype is not None
            else nullcontext()
        )
        with autocast:
            out = self.net(x_in, self.c_noise(t), class_labels=class_labels, return_logvar=return_logvar)
        F_x, logvar = out if return_logvar else (out, None)
        if self.noise_cond != "t":
            F_x = -F_x
        return (F_x, logvar) if return_logvar else F_x

    def network_output(self, x: Tensor, sigma: float | Tensor, class_labels: Tensor | None = None) -> Tensor:
        """F at EDM's (x, sigma): the raw output that `combine` takes with t = arctan(sigma / sigma_d)."""
        x, sigma = self._inputs(x, sigma)
        t = trigflow.t_from_sigma(sigma, self.sigma_data)
        return self.trig_network_output(trigflow.trigflow_from_edm(x, t), t, class_labels)

    def combine(self, x_t: Tensor, F_x: Tensor, t: Tensor) -> Tensor:
        """cos(t) x_t - sin(t) sigma_d F in x_t's dtype; x_t: (B, C, H, W), t: (B,)."""
        if self.skip_out_op is not None:
            return self.skip_out_op(x_t, F_x, t, self.sigma_data)
        return trigflow.consistency_function(x_t, F_x.to(x_t.dtype), t, self.sigma_data)


MODEL_KINDS: dict[str, type[_Preconditioned]] = {
    "cm": ConsistencyModel,
    "edm": EDMDenoiser,
    "trigflow": TrigFlowModel,
}


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
