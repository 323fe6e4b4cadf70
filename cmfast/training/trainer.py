"""The training loop for EDM teachers, consistency distillation (Algorithm 2) and consistency training (Algorithm 3).

Run directory layout:
    lock                        the pid and host of the process writing here (one writer at a time)
    config.json                 the resolved TrainConfig (plus the network config actually built)
    log.jsonl                   one JSON line per logged step (loss, images/s, schedule values, skipped steps);
                                "step" counts the steps done, skipped ones included
    checkpoints/ckpt-*.safetensors   the last `keep_checkpoints` training states (atomic writes)
    samples/step-*.png          sample grids from the first EMA
    model.safetensors           the first EMA of the online weights at the end (cmfast format, for sampling)
    online.safetensors          the online weights at the end

Randomness is derived, not carried: the data order comes from a per-epoch permutation of (seed, epoch), and every
sample's noise, flips and time index come from its own generator seeded by (seed, step, sample position). So a run
gives the same weights whether it is split over processes or not, and a resumed run repeats the uninterrupted one;
only dropout masks use torch's global RNG, whose state is checkpointed. The CT schedules N(k) and mu(k) advance only
on taken steps (a step skipped for non-finite values does not move them), as in the official code.
"""

from __future__ import annotations

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

from ..checkpoint import load as load_model_file
from ..checkpoint import save as save_model
from ..data import load_dataset
from ..generate import run_plan, sampling_plan
from ..io import atomic_write_bytes, image_grid, save_png, to_uint8
from ..networks import SongUNetConfig, build_network, config_to_dict, network_config, set_fused_ops
from ..preconditioning import ConsistencyModel, EDMDenoiser
from ..sampling import generators_from_seeds, randn
from . import state as ckpt
from .config import TrainConfig
from .distances import get_distance
from .distributed import init_distributed
from .graph_step import CapturedCDStep, captured_step_problems
from .losses import CDLoss, CTLoss, EDMLoss
from .state import TrainingError

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}

# A training step keeps far more than this many image-sized fp32 activations per sample (a U-Net's feature maps are
# tens to hundreds of channels at several resolutions), so batch x image bytes x this factor is a lower bound on the
# memory a batch needs; a batch above the device's memory by this bound cannot run and is refused up front.
ACTIVATION_FACTOR = 100


def sample_seed(seed: int, step: int, position: int) -> int:
    """Seed of the generator that draws one sample's randomness at one step (independent of how work is split)."""
    return hash((seed, step, position)) & (2**63 - 1)


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
            f"{available / 2**30:.1f} GiB; lower --batch"
        )


def pinned_teacher(cfg: TrainConfig) -> TrainConfig:
    """cfg with the teacher's absolute path and content hash; a teacher whose hash differs from the recorded one (a
    different file, or a moved one replaced by another) is refused."""
    path = Path(cfg.teacher).expanduser().resolve()
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
    ):
        self.run_dir = Path(run_dir)
        if resume and not self.run_dir.is_dir():
            raise ckpt.ResumeError(f"--resume: {self.run_dir} does not exist")
        if config.kind == "cd":
            config = pinned_teacher(config)
        if config.kind == "ct" and config.schedule_steps is None and not resume:
            config = dataclasses.replace(config, schedule_steps=config.total_steps)  # K stays fixed if the run grows
        self.cfg = config
        self.fused = fused
        self.progress = progress
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
        if config.batch_size % self.dist.world:
            raise ValueError(f"batch size {config.batch_size} does not split evenly over {self.dist.world} processes")
        if config.deterministic:
            torch.use_deterministic_algorithms(True)
        self.data = load_dataset(config.dataset)
        self._build_models()
        self.graph = graph
        if graph and self.device.type != "cuda":
            print(f"cmfast: --graph: CUDA graphs need a CUDA device, this run is on {self.device}; training eagerly")
            self.graph = False
        problems = captured_step_problems(self) if self.graph else []
        if problems:
            raise TrainingError("--graph: " + "; ".join(problems))
        self._captured = None
        # capturable: RAdam keeps its step count on the GPU, as a captured step needs
        self.optimizer = torch.optim.RAdam(self.online.parameters(), lr=config.lr, capturable=self.graph)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.mixed_precision == "fp16")
        self.loss_fn = self._build_loss()
        self.step = 0  # steps done, skipped ones included: indexes the data order and the noise
        self.taken_steps = 0  # steps applied: the k of the CT schedules N(k) and mu(k)
        self.bad_steps = 0
        self._perms: dict[int, torch.Tensor] = {}
        if resume:
            self._restore()
        elif self.dist.is_main:
            self._start_run_dir()
        self.dist.barrier()

    # --- set-up ------------------------------------------------------------------------------------------------------

    def _build_models(self) -> None:
        cfg, device = self.cfg, self.device
        self.teacher = None
        if cfg.kind == "cd":
            self.teacher = load_model_file(cfg.teacher, device=device).eval().requires_grad_(False)
            if not isinstance(self.teacher, EDMDenoiser):
                raise ValueError(f"{cfg.teacher}: the teacher must be an EDM denoiser checkpoint (train-edm output)")
            net_config = self.teacher.net.config
        else:
            net_config = network_config(cfg.network)
        # students use dropout 0 unless asked (the paper and the official scripts), whatever the teacher trained with
        dropout = 0.0 if cfg.dropout is None and cfg.kind == "cd" else cfg.dropout
        if dropout is not None:
            net_config = dataclasses.replace(net_config, dropout=dropout)
        if cfg.fourier_scale is not None:
            if cfg.kind == "cd" or not isinstance(net_config, SongUNetConfig) or net_config.embedding_type != "fourier":
                raise ValueError("fourier_scale applies to NCSN++ networks (Fourier embedding) trained from scratch")
            net_config = dataclasses.replace(net_config, fourier_scale=cfg.fourier_scale)
        size = net_config.resolution
        check_batch_fits(cfg.batch_size // self.dist.world, net_config.in_channels, size, device_memory(device))
        if (self.data.channels, self.data.resolution) != (net_config.in_channels, size):
            raise ValueError(
                f"dataset {self.data.name} has {self.data.channels}x{self.data.resolution}x{self.data.resolution} "
                f"images but the network takes {net_config.in_channels}x{size}x{size}"
            )
        self.net_config = net_config
        torch.manual_seed(cfg.seed)  # the initial weights of CT and EDM runs
        net = build_network(net_config)
        if self.teacher is not None:  # CD students start from the teacher's weights
            net.load_state_dict(self.teacher.net.state_dict())
        kind = EDMDenoiser if cfg.kind == "edm" else ConsistencyModel
        self.online = kind(net, cfg.sigma_min, cfg.sigma_max, cfg.sigma_data).to(device).train()
        needs_target = cfg.kind == "cd" or (cfg.kind == "ct" and not cfg.ict)
        self.target = copy.deepcopy(self.online).requires_grad_(False) if needs_target else None
        self.emas = {rate: copy.deepcopy(self.online).eval().requires_grad_(False) for rate in cfg.ema_rates}
        for model in (self.online, self.target, self.teacher, *self.emas.values()):
            if model is not None:
                model.autocast_dtype = AUTOCAST[cfg.mixed_precision]
                set_fused_ops(model.net, self.fused)  # cmfast.ops' kernels; the weights are the same either way
        self.model = (
            DistributedDataParallel(self.online, device_ids=[device.index] if device.type == "cuda" else None)
            if self.dist.world > 1
            else self.online
        )
        cond = net_config.num_classes
        self.use_labels = bool(cond) and self.data.labels is not None
        if cond and self.data.labels is None:
            raise ValueError(f"the network is class-conditional but dataset {self.data.name} has no labels")

    def _build_loss(self):
        cfg = self.cfg
        grid = dict(sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho)
        if cfg.kind == "edm":
            return EDMLoss(p_mean=cfg.p_mean, p_std=cfg.p_std, sigma_data=cfg.sigma_data)
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
        if ckpt.list_checkpoints(self.run_dir):
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

    def _indices(self, positions: range) -> list[int]:
        """Dataset indices of global sample positions: epoch e visits a permutation seeded by (seed, e)."""
        n = len(self.data)
        out = []
        for p in positions:
            epoch = p // n
            if epoch not in self._perms:
                self._perms = {
                    epoch: torch.randperm(
                        n, generator=torch.Generator().manual_seed(sample_seed(self.cfg.seed, -1, epoch))
                    )
                }
            out.append(int(self._perms[epoch][p % n]))
        return out

    def _batch(self, step: int):
        local = self.cfg.batch_size // self.dist.world
        start = step * self.cfg.batch_size + self.dist.rank * local
        positions = range(start, start + local)
        gens = [torch.Generator().manual_seed(sample_seed(self.cfg.seed, step, p)) for p in positions]
        images, labels = self.data.batch(self._indices(positions))
        if self.cfg.xflip:
            flip = torch.stack([torch.rand((), generator=g) < 0.5 for g in gens])
            images = torch.where(flip[:, None, None, None], images.flip(-1), images)
        labels = labels.to(self.device) if self.use_labels else None
        return images.to(self.device), labels, gens

    def train_step(self) -> dict:
        """One optimizer step (or a skipped one); returns the values to log."""
        cfg, step = self.cfg, self.step
        images, labels, gens = self._batch(step)
        if self.graph:
            return self._captured_train_step(images, labels, gens)
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.loss_fn(self.model, images, labels, step=self.taken_steps, generator=gens).mean()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.online.parameters() if p.grad is not None]
        grads_finite = all_finite([p.grad for p in params])
        global_loss = float(self.dist.mean(loss.detach()))
        ok = grads_finite and math.isfinite(global_loss)
        if ok:
            self.scaler.step(self.optimizer)
            if not all_finite(params):
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
        """EMA updates after taken step k (0-based; the k of mu(k))."""
        params = list(self.online.parameters())
        buffers = list(self.online.buffers())
        averages = list(self.emas.items())
        if self.target is not None:
            averages.append((self.loss_fn.target_ema(k), self.target))
        for rate, model in averages:
            torch._foreach_lerp_(list(model.parameters()), params, 1.0 - rate)
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
        for name, module in self._modules().items():
            if not all_finite(module.state_dict().values()):
                raise TrainingError(
                    f"the {name} weights are not finite at step {self.step}; no {what} was written "
                    f"(the last checkpoint is intact)"
                )

    def save_checkpoint(self) -> Path | None:
        if not self.dist.is_main:
            return None
        self._check_finite("checkpoint")
        tensors = {}
        for prefix, module in self._modules().items():
            tensors.update(ckpt.prefixed(prefix, module.state_dict()))
        optim_tensors, optim_meta = ckpt.optimizer_tensors(self.optimizer)
        tensors.update(optim_tensors)
        tensors.update(ckpt.rng_tensors())
        meta = {
            "step": self.step,
            "config": self.cfg.to_dict(),
            "optimizer": optim_meta,
            "scaler": self.scaler.state_dict(),
            "bad_steps": self.bad_steps,
            "taken_steps": self.taken_steps,
        }
        return ckpt.write_checkpoint(self.run_dir, self.step, tensors, meta, self.cfg.keep_checkpoints)

    def _restore(self) -> None:
        path, tensors, meta = ckpt.latest_checkpoint(self.run_dir)
        for prefix, module in self._modules().items():
            state = ckpt.unprefixed(prefix, tensors)
            if not state:
                raise ckpt.ResumeError(f"{path}: holds no '{prefix}' weights; was it written by another kind of run?")
            module.load_state_dict(state)
        self.optimizer.load_state_dict(ckpt.optimizer_state(tensors, meta["optimizer"]))
        if meta.get("scaler"):
            self.scaler.load_state_dict(meta["scaler"])
        ckpt.restore_rng(tensors)
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

    # --- outputs -----------------------------------------------------------------------------------------------------

    def log(self, record: dict) -> None:
        if self.dist.is_main:
            with open(self.run_dir / "log.jsonl", "a") as fh:
                fh.write(json.dumps(record) + "\n")

    def eval_model(self):
        """The model samples are drawn from: the first EMA, else the online weights."""
        return next(iter(self.emas.values())) if self.emas else self.online

    @torch.no_grad()
    def write_samples(self, num: int = 64) -> list[Path]:
        if not self.dist.is_main:
            return []
        model = self.eval_model()
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
        if self.dist.is_main:
            self._check_finite("model")
            save_model(self.eval_model(), self.run_dir / "model.safetensors")
            save_model(self.online, self.run_dir / "online.safetensors")

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
        while self.step < end:
            out = self.train_step()
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
