"""The training loop for EDM teachers, consistency distillation (Algorithm 2) and consistency training (Algorithm 3).

Run directory layout:
    config.json                 the resolved TrainConfig (plus the network config actually built)
    log.jsonl                   one JSON line per logged step (loss, images/s, schedule values, skipped steps)
    checkpoints/ckpt-*.safetensors   the last `keep_checkpoints` training states (atomic writes)
    samples/step-*.png          sample grids from the first EMA
    model.safetensors           the first EMA of the online weights at the end (cmfast format, for sampling)
    online.safetensors          the online weights at the end

Randomness is derived, not carried: the data order comes from a per-epoch permutation of (seed, epoch), and every
sample's noise, flips and time index come from its own generator seeded by (seed, step, sample position). So a run
gives the same weights whether it is split over processes or not, and a resumed run repeats the uninterrupted one;
only dropout masks use torch's global RNG, whose state is checkpointed.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..checkpoint import load as load_model_file
from ..checkpoint import save as save_model
from ..data import load_dataset
from ..generate import run_plan, sampling_plan
from ..io import atomic_write_bytes, image_grid, save_png, to_uint8
from ..networks import build_network, config_to_dict, network_config, set_fused_ops
from ..preconditioning import ConsistencyModel, EDMDenoiser
from ..sampling import generators_from_seeds, randn
from . import state as ckpt
from .config import TrainConfig
from .distributed import init_distributed
from .graph_step import CapturedCDStep, captured_step_problems
from .losses import CDLoss, CTLoss, EDMLoss
from .state import TrainingError

AUTOCAST = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_seed(seed: int, step: int, position: int) -> int:
    """Seed of the generator that draws one sample's randomness at one step (independent of how work is split)."""
    return hash((seed, step, position)) & (2**63 - 1)


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
        self.cfg = config
        self.fused = fused
        self.run_dir = Path(run_dir)
        self.progress = progress
        self.dist = init_distributed(device)
        self.device = self.dist.device
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
        self.step = 0
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
        if cfg.dropout is not None:
            net_config = dataclasses.replace(net_config, dropout=cfg.dropout)
        size = net_config.resolution
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
        if cfg.kind == "cd":
            return CDLoss(
                self.teacher,
                self.target,
                num_scales=cfg.num_scales,
                solver=cfg.solver,
                distance=cfg.distance or "lpips",
                mu=cfg.target_ema,
                **grid,
            )
        return CTLoss(
            self.target,
            total_steps=cfg.total_steps,
            s0=cfg.s0,
            s1=cfg.s1,
            mu0=cfg.mu0,
            mu_variant=cfg.mu_variant,
            distance=cfg.distance,
            ict=cfg.ict,
            **grid,
        )

    def _start_run_dir(self) -> None:
        if ckpt.list_checkpoints(self.run_dir):
            raise ValueError(f"{self.run_dir} already holds checkpoints: pass --resume, or choose a new --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
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
        loss = self.loss_fn(self.model, images, labels, step=step, generator=gens).mean()
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        params = [p for p in self.online.parameters() if p.grad is not None]
        grads_finite = bool(torch.stack(torch._foreach_norm([p.grad for p in params])).isfinite().all())
        global_loss = float(self.dist.mean(loss.detach()))
        ok = grads_finite and math.isfinite(global_loss)
        if ok:
            self.scaler.step(self.optimizer)
            self._update_averages(step)
            self.bad_steps = 0
        else:
            self.bad_steps += 1
            why = "loss" if not math.isfinite(global_loss) else "gradients"
            self.log(
                {
                    "step": step,
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
        return {"loss": loss, "ok": True}

    @torch.no_grad()
    def _update_averages(self, step: int) -> None:
        params = list(self.online.parameters())
        buffers = list(self.online.buffers())
        averages = list(self.emas.items())
        if self.target is not None:
            averages.append((self.loss_fn.target_ema(step), self.target))
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

    def save_checkpoint(self) -> Path | None:
        if not self.dist.is_main:
            return None
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
        if self.dist.is_main:
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
            save_model(self.eval_model(), self.run_dir / "model.safetensors")
            save_model(self.online, self.run_dir / "online.safetensors")

    # --- the loop ----------------------------------------------------------------------------------------------------

    def train(self, stop_at: int | None = None) -> Path:
        """Train to `total_steps`, checkpointing and sampling along the way; returns the exported model's path.

        stop_at ends the run early at that step with a checkpoint (e.g. to end a time slot) and returns its path.
        """
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
                    record.update(
                        num_scales=self.loss_fn.num_scales(self.step - 1),
                        target_ema=self.loss_fn.target_ema(self.step - 1),
                    )
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
        self.write_samples()
        self.export()
        self.dist.barrier()
        return self.run_dir / "model.safetensors"
