"""The training loop for EDM teachers, consistency distillation (Algorithm 2) and consistency training (Algorithm 3).

Run directory layout:
    lock                        the pid and host of the process writing here (one writer at a time)
    config.json                 the resolved TrainConfig (plus the network config actually built)
    log.jsonl                   one JSON line per logged step (loss, images/s, schedule values, skipped steps);
                                "step" counts the steps done, skipped ones included
    checkpoints/ckpt-*.safetensors   the last `keep_checkpoints` training states (atomic writes); with
                                --sharding fsdp, checkpoints/ckpt-*.dcp/ directories (cmfast.training.sharding)
    samples/step-*.png          sample grids from the first EMA
    model.safetensors           the first EMA of the online weights at the end (cmfast format, for sampling)
    online.safetensors          the online weights at the end

Randomness is derived, not carried: the data order comes from a per-epoch permutation of (seed, epoch), and every
sample's noise, flips and time index come from its own generator seeded by (seed, step, sample position)
(cmfast.training.loader). So a run gives the same weights whether it is split over processes or into accumulated
micro-batches or not (up to float rounding), and a resumed run repeats the uninterrupted one, streaming loader and all;
only dropout masks use torch's global RNG, whose state is checkpointed. The CT schedules N(k) and mu(k) advance only
on taken steps (a step skipped for non-finite values does not move them), as in the official code.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
import weakref
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from .. import ops
from ..checkpoint import ASSETS, SHIPPED
from ..checkpoint import load as load_model_file
from ..checkpoint import save as save_model
from ..data import DataError, ImageDataset
from ..generate import run_plan, sampling_plan
from ..io import atomic_write_bytes, image_grid, save_png, to_uint8
from ..networks import SongUNetConfig, build_network, config_to_dict, network_config, set_fused_ops
from ..preconditioning import ConsistencyModel, EDMDenoiser, TrigFlowModel
from ..sampling import generators_from_seeds, randn
from ..streaming import open_dataset
from . import state as ckpt
from .config import SCM_KINDS, TEACHER_KINDS, TrainConfig
from .distances import get_distance
from .distributed import init_distributed, local_tensors
from .graph_step import CapturedCDStep, captured_step_problems
from .loader import BatchSplit, StepSampler, default_workers, make_loader, sample_seed, worker_error
from .losses import CDLoss, CTLoss, EDMLoss
from .schedules import ema_rate, learning_rate
from .scm import SCMLoss
from .sharding import full_state_dict, list_sharded_checkpoints, load_sharded, save_sharded, shard_model
from .state import TrainingError

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# A training step keeps far more than this many image-sized fp32 activations per sample (a U-Net's feature maps are
# tens to hundreds of channels at several resolutions), so batch x image bytes x this factor is a lower bound on the
# memory a batch needs; a batch above the device's memory by this bound cannot run and is refused up front.
ACTIVATION_FACTOR = 100


def batch_memory_bound(batch: int, channels: int, resolution: int) -> int:
    """Bytes a training batch needs at least: batch x one fp32 image x ACTIVATION_FACTOR."""
    return batch * channels * resolution**2 * 4 * ACTIVATION_FACTOR


def device_memory(device: torch.device) -> int:
    """Total memory of `device` in bytes: the GPU's, or the machine's physical memory for a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[1]
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_batch_fits(batch: int, channels: int, resolution: int, available: int) -> None:
    need = batch_memory_bound(batch, channels, resolution)
    if need > available:
        raise ValueError(
            f"batch {batch} cannot fit: {batch} x {channels}x{resolution}x{resolution} fp32 images x "
            f"{ACTIVATION_FACTOR} (a lower bound on activations) = {need / 2**30:.1f} GiB, but the device has "
            f"{available / 2**30:.1f} GiB; lower --batch, or raise --accum"
        )


def pinned_teacher(cfg: TrainConfig) -> TrainConfig:
    """cfg with the teacher's absolute path and content hash; a teacher whose hash differs from the recorded one (a
    different file, or a moved one replaced by another) is refused. A shipped model's name (e.g. digits-edm) names
    its file in the package, unless a file of that name exists here."""
    named = Path(cfg.teacher).expanduser()
    path = (ASSETS / f"{cfg.teacher}.safetensors" if cfg.teacher in SHIPPED and not named.exists() else named).resolve()
    if not path.is_file():
        hint = "; if it moved, pass --teacher with its new path (checked by SHA-256)" if cfg.teacher_sha256 else ""
        raise ValueError(f"teacher {cfg.teacher}: no such file{hint}")
    digest = ckpt.file_sha256(path)
    if cfg.teacher_sha256 and digest != cfg.teacher_sha256:
        raise ValueError(f"teacher {path} is not this run's teacher: its SHA-256 differs from the one in config.json")
    return dataclasses.replace(cfg, teacher=str(path), teacher_sha256=digest)


def all_finite(tensors) -> bool:
    tensors = [t for t in tensors if t.is_floating_point()]
    return not tensors or bool(torch.stack(torch._foreach_norm(tensors)).isfinite().all())


class Trainer:
    def __init__(
        self,
        config: TrainConfig,
        run_dir: str | Path,
        resume: bool = False,
        progress: bool = True,
        device: str | None = None,
        graph: bool = False,
        fused: bool = False,
        workers: int | None = None,
    ):
        """workers: DataLoader processes that read and decode ahead; None: 0 for the in-memory digits, else a share
        of this machine's cores (see `loader.default_workers`)."""
        self.run_dir = Path(run_dir)
        if resume and not self.run_dir.is_dir():
            raise ckpt.ResumeError(f"--resume: {self.run_dir} does not exist")
        if config.kind in TEACHER_KINDS:
            config = pinned_teacher(config)
        if config.kind == "ct" and config.schedule_steps is None and not resume:
            config = dataclasses.replace(config, schedule_steps=config.total_steps)  # K stays fixed if the run grows
        self.cfg = config
        self.fused = fused
        self.progress = progress
        self.workers = workers
        self.dist = init_distributed(device)
        self.device = self.dist.device
        self._lock = ckpt.RunLock(self.run_dir) if self.dist.is_main else None
        if self._lock is not None:
            self._lock.acquire()
            weakref.finalize(self, self._lock.release)  # a Trainer dropped without train() frees the directory
        try:
            self._set_up(config, resume, graph)
        except BaseException:
            if self._lock is not None:
                self._lock.release()
            raise

    def _set_up(self, config: TrainConfig, resume: bool, graph: bool) -> None:
        if self.dist.is_main:
            ckpt.remove_stale_temporaries(self.run_dir)  # left by a run killed mid-write; we hold the lock
        self.accum = config.accumulation(self.dist.world)
        self.split = BatchSplit(config.batch_size, self.dist.world, self.dist.rank, self.accum)
        self.sharded = config.sharding == "fsdp"
        if self.sharded and self.dist.world == 1:
            raise ValueError("--sharding fsdp needs several processes (torchrun --nproc_per_node N with N >= 2)")
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        self.data = open_dataset(config.dataset)
        if self.workers is None:
            self.workers = default_workers(isinstance(self.data, ImageDataset))
        self._order = StepSampler(len(self.data), config.seed, self.split, 0, 0)
        self._build_models()
        if graph and config.kind in SCM_KINDS:
            raise TrainingError(
                "--graph: the sCM step (a torch.func.jvp through the network) is not captured; train without --graph"
            )
        self.graph = graph
        if graph and self.device.type != "cuda":
            print(f"cmfast: --graph: CUDA graphs need a CUDA device, this run is on {self.device}; training eagerly")
            self.graph = False
        problems = captured_step_problems(self) if self.graph else []
        if problems:
            raise TrainingError("--graph: " + "; ".join(problems))
        self._captured = None
        # capturable: RAdam keeps its step count on the GPU, as a captured step needs. foreach: PyTorch picks the
        # multi-tensor update on CUDA only; on CPU its per-parameter loop of small ops costs more than their arithmetic
        # for small networks (the same update, rounding aside).
        self.optimizer = torch.optim.RAdam(
            self.online.parameters(),
            lr=config.lr,
            capturable=self.graph,
            foreach=True if self.device.type == "cpu" else None,
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.loss_fn = self._build_loss()
        self.step = 0  # steps done, skipped ones included: indexes the data order and the noise
        self.taken_steps = 0  # steps applied: the k of the CT schedules N(k) and mu(k)
        self.bad_steps = 0
        if resume:
            self._restore()
        elif self.dist.is_main:
            self._start_run_dir()
        self.dist.barrier()

    # --- set-up ------------------------------------------------------------------------------------------------------

    def _build_models(self) -> None:
        cfg, device = self.cfg, self.device
        self.teacher = None
        if cfg.kind in TEACHER_KINDS:
            self.teacher = load_model_file(cfg.teacher, device=device).eval().requires_grad_(False)
            if not isinstance(self.teacher, EDMDenoiser):
                raise ValueError(f"{cfg.teacher}: the teacher must be an EDM denoiser checkpoint (train-edm output)")
            net_config = self.teacher.net.config
        else:
            net_config = network_config(cfg.network)
        # students use dropout 0 unless asked (the paper and the official scripts), whatever the teacher trained with
        dropout = 0.0 if cfg.dropout is None and cfg.kind in TEACHER_KINDS else cfg.dropout
        if dropout is not None:
            net_config = dataclasses.replace(net_config, dropout=dropout)
        net_config = self._scm_options(net_config)
        if cfg.fourier_scale is not None:
            if (
                cfg.kind in TEACHER_KINDS
                or not isinstance(net_config, SongUNetConfig)
                or net_config.embedding_type != "fourier"
            ):
                raise ValueError("fourier_scale applies to NCSN++ networks (Fourier embedding) trained from scratch")
            net_config = dataclasses.replace(net_config, fourier_scale=cfg.fourier_scale)
        size = net_config.resolution
        check_batch_fits(self.split.micro, net_config.in_channels, size, device_memory(device))
        if (self.data.channels, self.data.resolution) != (net_config.in_channels, size):
            raise ValueError(
                f"dataset {self.data.name} has {self.data.channels}x{self.data.resolution}x{self.data.resolution} "
                f"images but the network takes {net_config.in_channels}x{size}x{size}"
            )
        self.net_config = net_config
        torch.manual_seed(cfg.seed)  # the initial weights of CT and EDM runs
        net = build_network(net_config)
        if self.teacher is not None:  # CD and sCD students start from the teacher's weights (the logvar head: new)
            missing, _ = net.load_state_dict(self.teacher.net.state_dict(), strict=False)
            if any(not k.startswith(("map_logvar.", "logvar_head.")) for k in missing):
                raise ValueError(f"the teacher's weights do not fit the student network (missing {missing[:3]})")
        if cfg.kind in SCM_KINDS:
            # sCT: c_noise(t) = t; sCD: the teacher's own time input, so the student starts as the teacher's denoiser
            time_cond = cfg.time_cond or (self.teacher.noise_cond if self.teacher is not None else "t")
            self.online = TrigFlowModel(net, cfg.sigma_min, cfg.sigma_max, cfg.sigma_data, noise_cond=time_cond)
        else:
            kind = EDMDenoiser if cfg.kind == "edm" else ConsistencyModel
            self.online = kind(net, cfg.sigma_min, cfg.sigma_max, cfg.sigma_data)
        self.online = self.online.to(device).train()
        needs_target = cfg.kind == "cd" or (cfg.kind == "ct" and not cfg.ict)
        self.target = copy.deepcopy(self.online).requires_grad_(False) if needs_target else None
        self.emas = {rate: copy.deepcopy(self.online).eval().requires_grad_(False) for rate in cfg.ema_rates}
        for model in (self.online, self.target, self.teacher, *self.emas.values()):
            if model is not None:
                model.autocast_dtype = AUTOCAST[cfg.mixed_precision]
                set_fused_ops(model.net, self.fused)  # cmfast.ops' kernels; the weights are the same either way
        for model in (self.online, self.target):  # the models autograd and the loss run: skip/out fused as well
            if isinstance(model, ConsistencyModel):
                model.skip_out_op = ops.skip_out if self.fused else None
            elif isinstance(model, TrigFlowModel):
                model.skip_out_op = ops.trig_skip_out if self.fused else None
        if self.sharded:  # the teacher stays whole on every process (see cmfast.training.sharding)
            for model in (self.online, self.target, *self.emas.values()):
                if model is not None:
                    shard_model(model, device, self.dist.world)
            self.model = self.online
        elif self.dist.world > 1:
            self.model = DistributedDataParallel(
                self.online, device_ids=[device.index] if device.type == "cuda" else None
            )
        else:
            self.model = self.online
        cond = net_config.num_classes
        self.use_labels = bool(cond) and self.data.labels is not None
        if cond and self.data.labels is None:
            raise ValueError(f"the network is class-conditional but dataset {self.data.name} has no labels")

    def _scm_options(self, net_config):
        """The network config with the run's sCM options (time_scale, adaptive_double_norm, logvar_head) applied;
        a student initialised from a teacher keeps the teacher's layer shapes and time input."""
        cfg = self.cfg
        options = {
            name: getattr(cfg, name)
            for name in ("time_scale", "adaptive_double_norm", "logvar_head")
            if getattr(cfg, name) is not None
        }
        if not options:
            return net_config
        if cfg.kind == "scd" and (options.get("adaptive_double_norm") or options.get("time_scale", 1.0) != 1.0):
            raise ValueError(
                "sCD students start from the teacher's weights: adaptive_double_norm and time_scale would change "
                "its layers or its time input; leave them unset"
            )
        return dataclasses.replace(net_config, **options)

    def _build_loss(self):
        cfg = self.cfg
        grid = dict(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
        if cfg.kind == "edm":
            return EDMLoss(p_mean=cfg.p_mean, p_std=cfg.p_std, sigma_data=cfg.sigma_data)
        if cfg.kind in SCM_KINDS:
            return SCMLoss(
                self.teacher,
                p_mean=cfg.p_mean,
                p_std=cfg.p_std,
                sigma_data=cfg.sigma_data,
                tangent_warmup=cfg.tangent_warmup,
                tangent_c=cfg.tangent_c,
                prior_weighting=cfg.prior_weighting,
            )
        name = cfg.distance or ("pseudo-huber" if cfg.kind == "ct" and cfg.ict else "lpips")
        distance = get_distance(name, avg_pooling=cfg.lpips_pooling == "avg") if "lpips" in name else name
        if cfg.kind == "cd":
            return CDLoss(
                self.teacher,
                self.target,
                num_scales=cfg.num_scales,
                solver=cfg.solver,
                distance=distance,
                mu=cfg.target_ema,
                fused=self.fused,
                **grid,
            )
        return CTLoss(
            self.target,
            total_steps=cfg.schedule_total,
            s0=cfg.s0,
            s1=cfg.s1,
            mu0=cfg.mu0,
            mu_variant=cfg.mu_variant,
            distance=distance,
            ict=cfg.ict,
            **grid,
        )

    def _start_run_dir(self) -> None:
        if ckpt.list_checkpoints(self.run_dir) or list_sharded_checkpoints(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds checkpoints: pass --resume, or choose a new --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "log.jsonl").unlink(missing_ok=True)  # a run that stopped before its first checkpoint
        self._write_config()

    def _write_config(self) -> None:
        resolved = {
            **self.cfg.to_dict(),
            "resolved_network": config_to_dict(self.net_config),
            "world_size": self.dist.world,
            "torch": torch.__version__,
        }
        atomic_write_bytes(self.run_dir / "config.json", json.dumps(resolved, indent=2).encode())

    # --- one step ----------------------------------------------------------------------------------------------------

    def _read_step(self, step: int) -> list[tuple]:
        """This process's micro-batches of `step`, read here (uint8 images, labels): what the loader yields."""
        return [self.data.__getitems__(self._order.indices(self.split.positions(step, m))) for m in range(self.accum)]

    def _micro_batch(self, step: int, micro: int, images, labels):
        """Micro-batch `micro` of `step` ready for the loss: images in [-1, 1] on the device, flipped by each sample's
        generator, labels (or None) and the per-sample generators."""
        gens = [
            torch.Generator().manual_seed(sample_seed(self.cfg.seed, step, p))
            for p in self.split.positions(step, micro)
        ]
        images = images.to(self.device, non_blocking=True).float() / 127.5 - 1
        if self.cfg.xflip:
            flip = torch.stack([torch.rand((), generator=g) < 0.5 for g in gens]).to(self.device)
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        labels = labels.to(self.device, non_blocking=True) if self.use_labels else None
        return images, labels, gens

    def _finite(self, tensors) -> bool:
        """all_finite over every process's shards (sharded), or over the replicated tensors themselves."""
        if not self.sharded:
            return all_finite(tensors)
        return self.dist.all_true(all_finite(local_tensors(tensors)))

    def _accumulate(self, micro: list[tuple]) -> torch.Tensor:
        """Forward and backward of each micro-batch with its mean loss divided by K: the summed gradients are those
        of the mean loss over the whole batch (the micro-batches are equal). DDP all-reduces on the last micro-batch
        only (no_sync before); FSDP reduce-scatters each time, so only gradient shards are ever accumulated."""
        total = torch.zeros((), device=self.device)
        for m, (images, labels, gens) in enumerate(micro):
            last = m == len(micro) - 1
            skip_sync = isinstance(self.model, DistributedDataParallel) and not last
            with self.model.no_sync() if skip_sync else contextlib.nullcontext():
                loss = self.loss_fn(self.model, images, labels, step=self.taken_steps, generator=gens).mean()
                loss = loss / len(micro)
                self.scaler.scale(loss).backward()
            total = total + loss.detach()
        return total

    def train_step(self, raw: list[tuple] | None = None) -> dict:
        """One optimizer step (or a skipped one) over `raw`, this process's K micro-batches of (uint8 images,
        labels) for this step (read here when None); returns the values to log."""
        cfg, step = self.cfg, self.step
        micro = [self._micro_batch(step, m, *r) for m, r in enumerate(raw or self._read_step(step))]
        if self.graph:
            return self._captured_train_step(*micro[0])
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._accumulate(micro)
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.online.parameters() if p.grad is not None]
        grads_finite = self._finite([p.grad for p in params])
        global_loss = float(self.dist.mean(loss))
        ok = grads_finite and math.isfinite(global_loss)
        if ok:
            if cfg.lr_decay:  # otherwise the optimizer keeps the rate it was built with
                for group in self.optimizer.param_groups:
                    group["lr"] = learning_rate(cfg.lr, step, cfg.total_steps, cfg.lr_decay)
            self.scaler.step(self.optimizer)
            if not self._finite(params):
                raise TrainingError(
                    f"step {step + 1}: the update made the weights non-finite (learning rate "
                    f"{self.optimizer.param_groups[0]['lr']}); nothing was written, the last checkpoint is intact"
                )
            self._update_averages(self.taken_steps)
            self.taken_steps += 1
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            why = "loss" if not math.isfinite(global_loss) else "gradients"
            self.log(
                {
                    "step": step + 1,  # steps done, as in the other lines
                    "skipped": f"non-finite {why}",
                    "loss": global_loss,
                    "loss_scale": self.scaler.get_scale() if self.scaler.is_enabled() else None,
                }
            )
            if self.bad_steps > cfg.max_bad_steps:
                raise TrainingError(
                    f"{self.bad_steps} consecutive steps had non-finite {why} (last at step {step}); lower the "
                    f"learning rate, use mixed_precision=no/bf16, or check the data; the last checkpoint is intact"
                )
        self.scaler.update()
        self.step += 1
        return {"loss": global_loss, "ok": ok}

    def _captured_train_step(self, images, labels, gens) -> dict:
        """The same step through one CUDA graph (captured at the first step); the randomness is drawn here, as the
        eager step draws it."""
        z, j = self.loss_fn.draw(images, gens)
        if self._captured is None:
            self._captured = CapturedCDStep(self, images, labels, z, j)
        loss = self._captured(images, labels, z, j)
        self.step += 1
        self.taken_steps += 1
        return {"loss": loss, "ok": True}

    @torch.no_grad()
    def _update_averages(self, k: int) -> None:
        """EMA updates after taken step k (0-based; the k of mu(k)); on local shards when sharded (all copies are
        sharded alike)."""
        params = local_tensors(self.online.parameters())
        buffers = list(self.online.buffers())
        averages = [(ema_rate(rate, k, self.cfg.ema_warmup), model) for rate, model in self.emas.items()]
        if self.target is not None:
            averages.append((self.loss_fn.target_ema(k), self.target))
        if self.sharded:  # FSDP keeps a root's weights gathered after a forward without backward (the target's)
            for _, model in averages:
                model.reshard()
        for rate, model in averages:
            torch._foreach_lerp_(local_tensors(model.parameters()), params, 1.0 - rate)
            for b_avg, b in zip(model.buffers(), buffers):
                b_avg.copy_(b)

    # --- checkpoints -------------------------------------------------------------------------------------------------

    def _modules(self) -> dict[str, torch.nn.Module]:
        out = {"online": self.online.net}
        if self.target is not None:
            out["target"] = self.target.net
        out.update({f"ema/{rate}": m.net for rate, m in self.emas.items()})
        return out

    def _check_finite(self, what: str) -> None:
        """Refuse to write non-finite weights (a collective check when sharded: every process calls it)."""
        for name, module in self._modules().items():
            if not self._finite(list(module.state_dict().values())):
                raise TrainingError(
                    f"the {name} weights are not finite at step {self.step}; no {what} was written "
                    f"(the last checkpoint is intact)"
                )

    def _meta(self) -> dict:
        return {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "scaler": self.scaler.state_dict(),
            "bad_steps": self.bad_steps,
            "taken_steps": self.taken_steps,
        }

    def save_checkpoint(self) -> Path | None:
        """Write a checkpoint: one safetensors file from process 0, or (sharded) a DCP directory every process
        writes to; returns its path (None on the processes that do not write)."""
        if self.sharded:
            self._check_finite("checkpoint")
            meta = self._meta()
            return save_sharded(
                self.run_dir,
                self.step,
                self._modules(),
                self.online,
                self.optimizer,
                meta,
                self.cfg.keep_checkpoints,
                self.dist,
            )
        if not self.dist.is_main:
            return None
        self._check_finite("checkpoint")
        tensors = {}
        for prefix, module in self._modules().items():
            tensors.update(ckpt.prefixed(prefix, module.state_dict()))
        optim_tensors, optim_meta = ckpt.optimizer_tensors(self.optimizer)
        tensors.update(optim_tensors)
        tensors.update(ckpt.rng_tensors())
        meta = {**self._meta(), "optimizer": optim_meta}
        return ckpt.write_checkpoint(self.run_dir, self.step, tensors, meta, self.cfg.keep_checkpoints)

    def _restore(self) -> None:
        if self.sharded:
            path, meta = load_sharded(self.run_dir, self._modules(), self.online, self.optimizer)
        else:
            path, meta = self._restore_file()
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        self.step, self.bad_steps = meta["step"], meta["bad_steps"]
        self.taken_steps = meta.get("taken_steps", self.step)  # older checkpoints: no step was skipped
        if self.step > self.cfg.total_steps:
            raise ckpt.ResumeError(
                f"--steps {self.cfg.total_steps} is below the run's step {self.step} ({path.name}); "
                "pass a larger --steps, or none"
            )
        if self.dist.is_main:
            ckpt.truncate_log(self.run_dir / "log.jsonl", self.step)  # the steps after the checkpoint run again
            self._write_config()  # a grown run, a moved teacher
            print(f"cmfast: resumed from {path} at step {self.step}")

    def _restore_file(self) -> tuple[Path, dict]:
        path, tensors, meta = ckpt.latest_checkpoint(self.run_dir)
        for prefix, module in self._modules().items():
            state = ckpt.unprefixed(prefix, tensors)
            if not state:
                raise ckpt.ResumeError(f"{path}: holds no '{prefix}' weights; was it written by another kind of run?")
            module.load_state_dict(state)
        self.optimizer.load_state_dict(ckpt.optimizer_state(tensors, meta["optimizer"]))
        ckpt.restore_rng(tensors)
        return path, meta

    # --- outputs -----------------------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.run_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def eval_model(self):
        """The model samples are drawn from: the first EMA, else the online weights."""
        return next(iter(self.emas.values())) if self.emas else self.online

    def whole(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """`model` with all its weights on process 0 (None elsewhere): itself, or when sharded a plain copy of the
        gathered weights (every process must call it then)."""
        if not self.sharded:
            return model if self.dist.is_main else None
        state = full_state_dict(model)
        if not self.dist.is_main:
            return None
        cfg = self.cfg
        plain = type(model)(
            build_network(self.net_config), cfg.sigma_min, cfg.sigma_max, cfg.sigma_data, noise_cond=model.noise_cond
        )
        plain.load_state_dict(state)
        plain.autocast_dtype = model.autocast_dtype
        set_fused_ops(plain.net, self.fused)
        return plain.to(self.device).train(model.training)

    @torch.no_grad()
    def write_samples(self, num: int = 64) -> list[Path]:
        model = self.whole(self.eval_model())
        if model is None:
            return []
        was_training = model.training
        model.eval()
        c, size = self.net_config.in_channels, self.data.resolution
        gens = generators_from_seeds(range(num))
        noise = randn((num, c, size, size), gens, device=self.device)
        folder = self.run_dir / "samples"
        written = []
        plan = sampling_plan(model)  # a teacher: EDM's Heun sampler, 18 steps; a student: Algorithm 1
        plans = (
            {f"heun{plan.heun_steps}": plan}
            if plan.teacher
            else {f"{n}step": sampling_plan(model, steps=n) for n in (1, 2)}
        )
        for name, plan in plans.items():
            path = folder / f"step-{self.step:08d}-{name}.png"
            save_png(
                path, image_grid(to_uint8(run_plan(model, plan, noise, generator=gens))), scale=max(1, 128 // size)
            )
            written.append(path)
        model.train(was_training)
        return written

    def export(self) -> None:
        """model.safetensors (the first EMA) and online.safetensors, whole (gathered when sharded)."""
        self._check_finite("model")
        for model, name in ((self.eval_model(), "model"), (self.online, "online")):
            whole = self.whole(model)
            if whole is not None:
                save_model(whole, self.run_dir / f"{name}.safetensors")

    # --- the loop ----------------------------------------------------------------------------------------------------

    def train(self, stop_at: int | None = None) -> Path:
        """Train to `total_steps`, checkpointing and sampling along the way; returns the exported model's path.

        stop_at ends the run early at that step with a checkpoint (e.g. to end a time slot) and returns its path.
        """
        if self._lock is not None and not self._lock.held:
            self._lock.acquire()
        try:
            return self._train(stop_at)
        finally:
            if self._lock is not None:
                self._lock.release()

    def _train(self, stop_at: int | None) -> Path:
        cfg = self.cfg
        end = cfg.total_steps if stop_at is None else min(stop_at, cfg.total_steps)
        bar = tqdm(
            total=cfg.total_steps,
            initial=self.step,
            desc=f"{cfg.kind}",
            unit="step",
            disable=not (self.progress and self.dist.is_main),
        )
        window_start, window_steps = time.perf_counter(), 0
        sampler = StepSampler(len(self.data), cfg.seed, self.split, self.step, end)
        batches = iter(make_loader(self.data, sampler, self.workers, pin_memory=self.device.type == "cuda"))
        while self.step < end:
            try:
                raw = [next(batches) for _ in range(self.accum)]
            except DataError as err:  # raised in a worker: keep the one line that names the file
                raise DataError(worker_error(err)) from None
            out = self.train_step(raw)
            window_steps += 1
            if self.step % cfg.log_every == 0 or self.step == cfg.total_steps:
                elapsed = time.perf_counter() - window_start
                rate = window_steps * cfg.batch_size / elapsed
                record = {"step": self.step, "loss": out["loss"], "images_per_s": rate}
                if cfg.kind == "ct":
                    k = max(self.taken_steps - 1, 0)  # the schedule's k at the last taken step
                    record.update(num_scales=self.loss_fn.num_scales(k), target_ema=self.loss_fn.target_ema(k))
                self.log(record)
                bar.set_postfix(loss=f"{out['loss']:.4g}", img_s=f"{rate:.0f}")
                window_start, window_steps = time.perf_counter(), 0
            if self.step % cfg.checkpoint_every == 0 or self.step == end:
                self.save_checkpoint()
            if (
                cfg.sample_every
                and (self.step * cfg.batch_size) // cfg.sample_every
                > ((self.step - 1) * cfg.batch_size) // cfg.sample_every
            ):
                self.write_samples()
            bar.update(1)
        bar.close()
        if self.step < cfg.total_steps:  # stopped early: the checkpoint is the output
            return ckpt.checkpoint_path(self.run_dir, self.step)
        if self.taken_steps == 0:
            raise TrainingError(f"all {self.step} steps were skipped (non-finite values); no model was written")
        self.write_samples()
        self.export()
        self.dist.barrier()
        return self.run_dir / "model.safetensors"
