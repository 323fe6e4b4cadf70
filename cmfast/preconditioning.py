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
        self.noise_cond = noise_cond or getattr(config, "noise_cond", "edm")
        c_noise(torch.ones(1), self.noise_cond)  # validate early
        self.autocast_dtype = autocast_dtype

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

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor]:
        return cm_c_skip(sigma, self.sigma_min, self.sigma_data), cm_c_out(sigma, self.sigma_min, self.sigma_data)

    def combine(self, x: Tensor, F_x: Tensor, sigma: Tensor) -> Tensor:
        if self.skip_out_op is None:
            return super().combine(x, F_x, sigma)
        return self.skip_out_op(x, F_x, sigma, self.sigma_min, self.sigma_data)


MODEL_KINDS: dict[str, type[_Preconditioned]] = {"cm": ConsistencyModel, "edm": EDMDenoiser}


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
