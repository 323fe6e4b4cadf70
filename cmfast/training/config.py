"""Training run configuration (one dataclass) and the one table of presets: every column of the paper's Table 3,
and small CPU presets for the built-in digits.

The resolved config is written as JSON into the run directory (`config.json`) and read back on --resume.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

from ..networks import NETWORK_PRESETS

KINDS = ("edm", "cd", "ct", "sct", "scd")
SCM_KINDS = ("sct", "scd")  # continuous-time consistency models (cmfast.training.scm)
TEACHER_KINDS = ("cd", "scd")
SHARDING = ("ddp", "fsdp")
LPIPS_POOLING = ("max", "avg")


@dataclass
class TrainConfig:
    kind: str = "cd"  # "edm" (teacher), "cd"/"ct" (consistency distillation/training), "sct"/"scd" (sCM)
    network: str = (
        "ddpmpp-digits8"  # network preset (cmfast.NETWORK_PRESETS); CD students use the teacher's architecture
    )
    dataset: str | None = "digits8"  # "digits8/16/32", an image folder or an .npz file
    teacher: str | None = None  # CD, sCD: path of the EDM teacher checkpoint (.safetensors); absolute once run
    teacher_sha256: str | None = None  # CD, sCD: content hash of the teacher, so a moved teacher can be found again

    total_steps: int = 2000  # optimizer steps to train for
    schedule_steps: int | None = None  # CT: K of N(k), mu(k) and iCT's K'; None: total_steps (kept when a run grows)
    batch_size: int = 64  # global batch, split evenly over processes
    accum: int | None = None  # micro-batches per optimizer step and process (gradient accumulation); None: 1
    micro_batch: int | None = None  # per-process micro-batch; sets accum = batch_size / (processes x micro_batch)
    sharding: str = "ddp"  # with several processes: "ddp" (replicated) or "fsdp" (FSDP2: weights, EMAs, optimizer)
    lr: float = 4e-4  # RAdam (no warm-up, no weight decay); constant unless lr_decay is set
    lr_decay: float = 0.0  # fraction of the run at its end over which lr falls linearly towards 0 (0: constant)
    ema_rates: tuple[float, ...] = (0.9999,)  # online-weight EMAs kept for evaluation
    ema_warmup: bool = False  # EMA decay min(rate, (1 + k) / (10 + k)) at step k (schedules.ema_rate)
    dropout: float | None = None  # overrides the network's dropout when set; None: the preset's (CD students: 0)
    fourier_scale: float | None = None  # overrides the NCSN++ Fourier-embedding scale when set (iCT: 0.02)
    xflip: bool = False  # horizontal flips (off for digits: a flipped digit is not a digit)
    mixed_precision: str = "no"  # "no", "bf16" or "fp16" (fp16 uses dynamic loss scaling); master weights are fp32

    # EDM teacher loss; sCM: the log-normal proposal over sigma_d tan t
    p_mean: float = -1.2
    p_std: float = 1.2

    # sCM (Lu & Song 2025)
    tangent_warmup: int = 10_000  # steps over which the tangent's second term's weight r rises from 0 to 1
    tangent_c: float = 0.1  # c of the tangent normalisation g / (||g|| + c)
    prior_weighting: bool = True  # weight 1 / (sigma_d tan t)
    time_cond: str | None = None  # TrigFlow c_noise: "t", or "edm"/"adm" (EDM's); None: "t" (sCT), the teacher's (sCD)
    time_scale: float | None = None  # network option: multiplier of c_noise before the embedding; None: the preset's
    adaptive_double_norm: bool | None = None  # network option (pixel-normalised scale and shift); None: the preset's
    logvar_head: bool | None = None  # network option: adaptive weighting's log-variance head; None: the preset's

    # Consistency losses
    distance: str | None = None  # "l2", "l1", "l2-32", "lpips", "lpips-alex", "pseudo-huber"; None: LPIPS (iCT: p.-H.)
    lpips_pooling: str = "max"  # LPIPS backbone pooling: "max" (CIFAR-10 JAX code) or "avg" (ImageNet-64/LSUN code)
    num_scales: int = 18  # CD: N, points of the Karras grid
    solver: str = "heun"  # CD: teacher ODE solver, "heun" or "euler"
    target_ema: float = 0.0  # CD: mu, EMA rate of the target network
    s0: int | None = None  # CT: initial discretization steps; None: 2 (iCT: 10)
    s1: int | None = None  # CT: final discretization steps; None: 150 (iCT: 1280)
    mu0: float = 0.9  # CT: target EMA at the start
    mu_variant: str = "paper"  # CT: "paper" mu(k) = exp(s0 ln mu0 / N(k)), or "official" (N(k) - 1)
    ict: bool = False  # CT: all improved-CT options (pseudo-Huber, lognormal indices, curriculum, 1/dt weight, mu=0)

    sigma_min: float = 0.002
    sigma_max: float = 80.0
    sigma_data: float = 0.5
    rho: float = 7.0

    seed: int = 0
    log_every: int = 50  # steps between log lines in log.jsonl
    checkpoint_every: int = 500  # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3  # the last M checkpoints are kept
    sample_every: int = 16384  # training images between sample grids in the run directory; 0 = only at the end
    max_bad_steps: int = 20  # consecutive skipped (non-finite) steps tolerated; one more stops the run
    deterministic: bool = False  # torch.use_deterministic_algorithms, for bit-exact resume tests
    extra: dict = field(default_factory=dict)  # free-form notes kept with the run

    def __post_init__(self):
        self.ema_rates = tuple(self.ema_rates)
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be 'no', 'bf16' or 'fp16', got {self.mixed_precision!r}")
        for name in ("total_steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        for name in ("accum", "micro_batch"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.sharding not in SHARDING:
            raise ValueError(f"sharding must be one of {SHARDING}, got {self.sharding!r}")
        if self.sharding == "fsdp" and self.mixed_precision == "fp16":
            raise ValueError("sharding 'fsdp' trains in fp32 or bf16; fp16's loss scaling is not sharded: use bf16")
        if self.schedule_steps is not None and self.schedule_steps < 1:
            raise ValueError(f"schedule_steps must be a positive integer, got {self.schedule_steps}")
        if self.seed < 0 or self.max_bad_steps < 0 or self.sample_every < 0:
            raise ValueError("seed, max_bad_steps and sample_every must not be negative")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"the learning rate must be a positive finite number, got {self.lr}")
        if not 0 <= self.lr_decay <= 1:
            raise ValueError(
                f"lr_decay is the fraction of the run that decays the learning rate: 0..1, got {self.lr_decay}"
            )
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {self.dropout}")
        if self.fourier_scale is not None and not (math.isfinite(self.fourier_scale) and self.fourier_scale > 0):
            raise ValueError(f"fourier_scale must be a positive finite number, got {self.fourier_scale}")
        if self.lpips_pooling not in LPIPS_POOLING:
            raise ValueError(f"lpips_pooling must be one of {LPIPS_POOLING}, got {self.lpips_pooling!r}")
        if self.kind in TEACHER_KINDS and not self.teacher:
            raise ValueError("consistency distillation needs a teacher checkpoint (--teacher)")
        if self.tangent_warmup < 0 or not (math.isfinite(self.tangent_c) and self.tangent_c > 0):
            raise ValueError("tangent_warmup must be >= 0 and tangent_c a positive finite number")
        if self.time_cond not in (None, "t", "edm", "adm"):
            raise ValueError(f"time_cond must be 't', 'edm' or 'adm', got {self.time_cond!r}")
        if self.time_scale is not None and not (math.isfinite(self.time_scale) and self.time_scale > 0):
            raise ValueError(f"time_scale must be a positive finite number, got {self.time_scale}")
        if self.p_std <= 0:
            raise ValueError(f"p_std must be positive, got {self.p_std}")
        if self.dataset is None:
            raise ValueError("no dataset: pass --data (digits16, an image folder or an .npz file)")
        if not all(0 <= r < 1 for r in self.ema_rates) or not 0 <= self.target_ema < 1:
            raise ValueError("EMA rates must lie in [0, 1)")

    def accumulation(self, world: int) -> int:
        """K, the micro-batches per optimizer step on each of `world` processes; refuses batches that do not split."""
        return resolve_accum(self.batch_size, world, self.accum, self.micro_batch)

    @property
    def schedule_total(self) -> int:
        """K of the CT schedules: fixed when the run started, unless a resume asked to stretch it."""
        return self.schedule_steps or self.total_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> TrainConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training config fields: {', '.join(unknown)}")
        return cls(**data)


def resolve_accum(batch: int, world: int, accum: int | None, micro_batch: int | None) -> int:
    """K such that batch = world x K x micro: from `micro_batch` when given, else `accum` (default 1)."""
    if batch % world:
        raise ValueError(f"batch size {batch} does not split evenly over {world} processes")
    local = batch // world
    if micro_batch is not None:
        if local % micro_batch:
            raise ValueError(
                f"--micro-batch {micro_batch} does not divide the per-process batch {local} "
                f"(global batch {batch} over {world} processes)"
            )
        if accum is not None and accum != local // micro_batch:
            raise ValueError(
                f"--accum {accum} contradicts --micro-batch {micro_batch}: the per-process batch {local} "
                f"(global batch {batch} over {world} processes) makes {local // micro_batch} micro-batches"
            )
        return local // micro_batch
    k = accum or 1
    if local % k:
        raise ValueError(
            f"--accum {k} does not divide the per-process batch {local} (global batch {batch} over {world} processes)"
        )
    return k


# sCM at scale: the paper's appendix hyper-parameter table (Lu & Song 2025, Table "training details" for CIFAR-10 and
# ImageNet 64x64), as NVlabs/FastGen's sCM configs implement it for CIFAR-10 (config_sct_cifar10: batch 512,
# P_mean -1.0, P_std 1.4, tangent warm-up 10k steps, c 0.1, dropout 0.2, 350k iterations) and the paper's ImageNet-64
# values (P_mean -0.8, P_std 1.6). The paper's ImageNet networks are EDM2 U-Nets; here they are cmfast's ADM with the
# sCM options (adaptive double normalisation, logvar head). sCD presets need --teacher (an EDM teacher checkpoint).
_SCM_CIFAR = dict(
    sample_every=1_024_000,
    batch_size=512,
    lr=1e-4,
    ema_rates=(0.9999,),
    total_steps=350_000,
    xflip=True,
    dropout=0.2,
    p_mean=-1.0,
    p_std=1.4,
    tangent_warmup=10_000,
    time_scale=1000.0,
    logvar_head=True,
)
_SCM_IN64 = dict(
    sample_every=1_024_000,
    batch_size=2048,
    lr=1e-4,
    ema_rates=(0.9999,),
    mixed_precision="bf16",
    xflip=True,
    p_mean=-0.8,
    p_std=1.6,
    tangent_warmup=10_000,
    logvar_head=True,
)


def _paper(kind, network, dataset, **kw) -> dict:
    return dict(kind=kind, network=network, dataset=dataset, **kw)


# Table 3 of the paper (REFERENCE.md section 6). Datasets are not shipped: pass --data. CD presets need --teacher.
_CIFAR = dict(
    sample_every=1_024_000,
    batch_size=512,
    lr=4e-4,
    ema_rates=(0.9999,),
    total_steps=800_000,
    xflip=True,
    dropout=0.0,
    lpips_pooling="max",
)
_IN64 = dict(
    sample_every=1_024_000,
    batch_size=2048,
    lr=8e-6,
    ema_rates=(0.999943,),
    mixed_precision="fp16",
    xflip=True,
    dropout=0.0,
    lpips_pooling="avg",
)
_LSUN = dict(
    sample_every=1_024_000,
    batch_size=2048,
    lr=1e-5,
    ema_rates=(0.999943,),
    mixed_precision="fp16",
    xflip=True,
    dropout=0.0,
    lpips_pooling="avg",
)
_DIGITS = dict(network="ddpmpp-digits8", dataset="digits8", batch_size=64, ema_rates=(0.999,), checkpoint_every=1000)
_RGB = dict(network="ddpmpp-digits8-rgb", dataset="digits-rgb8")
TRAIN_PRESETS: dict[str, dict] = {
    "cifar10-cd-lpips": _paper("cd", "ncsnpp-cifar10", None, distance="lpips", num_scales=18, target_ema=0.0, **_CIFAR),
    "cifar10-ct": _paper("ct", "ncsnpp-cifar10", None, distance="lpips", s0=2, s1=150, mu0=0.9, **_CIFAR),
    "imagenet64-cd-l2": _paper(
        "cd", "adm-imagenet64", None, distance="l2", num_scales=40, target_ema=0.95, total_steps=600_000, **_IN64
    ),
    "imagenet64-cd-lpips": _paper(
        "cd", "adm-imagenet64", None, distance="lpips", num_scales=40, target_ema=0.95, total_steps=600_000, **_IN64
    ),
    "imagenet64-ct": _paper(
        "ct", "adm-imagenet64", None, distance="lpips", s0=2, s1=200, mu0=0.95, total_steps=800_000, **_IN64
    ),
    "lsun256-cd-lpips": _paper(
        "cd", "adm-lsun256", None, distance="lpips", num_scales=40, target_ema=0.95, total_steps=600_000, **_LSUN
    ),
    "lsun256-cd-l2": _paper(
        "cd", "adm-lsun256", None, distance="l2", num_scales=40, target_ema=0.95, total_steps=600_000, **_LSUN
    ),
    "lsun256-ct": _paper(
        "ct", "adm-lsun256", None, distance="lpips", s0=2, s1=150, mu0=0.95, total_steps=1_000_000, **_LSUN
    ),
    "cifar10-sct": _paper("sct", "ddpmpp-cifar10", None, **_SCM_CIFAR),
    "imagenet64-sct": _paper(
        "sct",
        "adm-imagenet64",
        None,
        dropout=0.2,
        total_steps=400_000,
        time_scale=1000.0,
        adaptive_double_norm=True,
        **_SCM_IN64,
    ),
    "imagenet64-scd": _paper("scd", "adm-imagenet64", None, dropout=0.0, total_steps=400_000, **_SCM_IN64),
    # Small CPU presets on the built-in digits (8x8, the originals' size; 1 channel; labels unused).
    "digits-edm": dict(kind="edm", lr=1e-3, total_steps=4000, **_DIGITS),
    "digits-cd": dict(kind="cd", lr=2e-4, total_steps=2000, distance="l2", num_scales=18, target_ema=0.95, **_DIGITS),
    "digits-ct": dict(kind="ct", lr=4e-4, total_steps=4000, distance="l2", s0=2, s1=150, mu0=0.9, **_DIGITS),
    "digits-ict": dict(kind="ct", lr=4e-4, total_steps=4000, ict=True, **_DIGITS),
    # sCM on the digits: the paper's sCT / sCD losses at the CD students' budget (2000 steps at batch 64). sCT learns a
    # TrigFlow network from scratch (c_noise(t) = t, positional embedding at 1000 t, logvar head, EMA with warm-up);
    # sCD starts from the teacher's weights with EDM's time input (TrigFlowModel noise_cond "edm": the teacher's
    # denoiser exactly) plus a logvar head.
    "digits-sct": dict(
        kind="sct",
        lr=4e-4,
        total_steps=2000,
        p_mean=-1.0,
        p_std=1.4,
        tangent_warmup=400,
        time_scale=1000.0,
        logvar_head=True,
        ema_warmup=True,
        **_DIGITS,
    ),
    "digits-scd": dict(
        kind="scd",
        teacher="digits-edm",
        lr=5e-4,
        total_steps=2000,
        p_mean=-0.8,
        p_std=1.6,
        tangent_warmup=400,
        logvar_head=True,
        ema_warmup=True,
        **_DIGITS,
    ),
    # Coloured digits (3 channels), for colorization demos.
    "digits-rgb-edm": dict(kind="edm", lr=1e-3, total_steps=4000, **{**_DIGITS, **_RGB}),
    "digits-rgb-cd": dict(
        kind="cd", lr=2e-4, total_steps=2000, distance="l2", num_scales=18, target_ema=0.95, **{**_DIGITS, **_RGB}
    ),
}


# iCT's settings (Song & Dhariwal 2023) that differ from CT's: pseudo-Huber, the exponential curriculum's s0 and s1,
# the dropout of its CIFAR-10 and ImageNet-64 networks, and NCSN++'s Fourier scale (0.02 instead of EDM's 16).
ICT_SETTINGS = dict(distance="pseudo-huber", s0=10, s1=1280)
ICT_DROPOUT = {"ncsnpp-cifar10": 0.3, "ddpmpp-cifar10": 0.3, "adm-imagenet64": 0.2}
ICT_FOURIER_SCALE = 0.02


def ict_settings(network: str) -> dict:
    """The config values an iCT run of `network` takes unless a flag names them."""
    out = dict(ICT_SETTINGS)
    if network in ICT_DROPOUT:
        out["dropout"] = ICT_DROPOUT[network]
    if getattr(NETWORK_PRESETS.get(network), "embedding_type", None) == "fourier":
        out["fourier_scale"] = ICT_FOURIER_SCALE
    return out


def preset_config(name: str, **overrides) -> TrainConfig:
    """The preset `name` with `overrides` applied (None values are ignored), validated.

    With ict=True the iCT values (`ict_settings`) replace the preset's CT values (a CT preset's l2 or LPIPS, s0=2,
    s1=150, dropout 0, Fourier scale 16); an override still wins, as does an iCT preset's own value.
    """
    if name not in TRAIN_PRESETS:
        raise ValueError(f"unknown training preset {name!r}; presets: {', '.join(TRAIN_PRESETS)}")
    preset = TRAIN_PRESETS[name]
    explicit = {k: v for k, v in overrides.items() if v is not None}
    values = {**preset, **explicit}
    if values.get("ict"):
        keep = set(explicit) | (set(preset) if preset.get("ict") else set())
        values.update({k: v for k, v in ict_settings(values.get("network", "")).items() if k not in keep})
    return TrainConfig(**values)
