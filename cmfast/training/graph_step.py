"""The consistency-distillation step captured as one CUDA graph: `cmfast distill --graph`.

One replay runs the whole step of Algorithm 2 from static buffers: x_(t_(n+1)) = x + t_(n+1) z, the teacher's Heun
step (two evaluations), the target's evaluation, the online forward and backward, RAdam's update (capturable=True, so
its step count lives on the GPU) and the EMA updates of the target and the EMAs. The host draws the step's randomness
exactly as the eager step does (the same per-sample generators, noise then indices) and copies it in, so a captured
run follows the eager one (same weights up to float rounding; tests/training/test_graph_step.py).

What a graph cannot do, and what this step asks instead: no dropout (its masks would need the RNG replay the eager
step uses), no fp16 loss scaling (use bf16 or fp32), one process, a CD run. The non-finite check of the eager step
reads one flag per step after the replay; since the update already happened, a non-finite step stops the run with a
message instead of being skipped (the last checkpoint is intact).
"""

from __future__ import annotations

import torch

from .state import TrainingError


def captured_step_problems(trainer) -> list[str]:
    """Why this trainer's step cannot be captured (empty when it can)."""
    cfg, problems = trainer.cfg, []
    if trainer.device.type != "cuda":
        problems.append(f"CUDA graphs need a CUDA device; this run is on {trainer.device}")
    if cfg.kind != "cd":
        problems.append(f"only the distillation step is captured; this is a {cfg.kind} run")
    if trainer.dist.world > 1:
        problems.append("capture runs in one process; this run has several")
    if trainer.accum > 1:
        problems.append(f"a captured step is one batch; this run accumulates {trainer.accum} micro-batches")
    if cfg.mixed_precision == "fp16":
        problems.append("fp16 needs dynamic loss scaling, which a graph cannot skip steps for; use --precision bf16")
    if cfg.lr_decay:
        problems.append(
            f"lr_decay {cfg.lr_decay} changes the learning rate each step, which a captured update keeps fixed"
        )
    if getattr(trainer.net_config, "dropout", 0):
        problems.append(f"dropout {trainer.net_config.dropout} needs the eager step's RNG replay; use --dropout 0")
    return problems


class CapturedCDStep:
    """A trainer's CD step as a CUDA graph for batches shaped like `images` (and `labels`)."""

    def __init__(self, trainer, images, labels, z, j, warmup: int = 3):
        problems = captured_step_problems(trainer)
        if problems:
            raise TrainingError("--graph: " + "; ".join(problems))
        self.trainer = trainer
        self.images, self.z, self.j = images.clone(), z.clone(), j.clone()
        self.labels = labels.clone() if labels is not None else None
        trainer.loss_fn.share_dropout = False
        saved = _snapshot(trainer)
        side = torch.cuda.Stream(trainer.device)
        side.wait_stream(torch.cuda.current_stream(trainer.device))
        with torch.cuda.stream(side):  # settles workspaces, Triton/cuBLAS kernels and the optimizer's lazy state
            for _ in range(warmup):
                trainer.optimizer.zero_grad(set_to_none=True)
                self._body()
        torch.cuda.current_stream(trainer.device).wait_stream(side)
        _restore(trainer, saved)  # the warm-up steps must leave no trace in weights, moments or step counts
        trainer.optimizer.zero_grad(set_to_none=True)  # so the captured backward allocates the grads in its pool
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.loss, self.grads_finite = self._body()

    def _body(self):
        t = self.trainer
        loss = t.loss_fn.loss_from_draws(t.model, self.images, self.labels, self.z, self.j).mean()
        loss.backward()
        grads = [p.grad for p in t.online.parameters() if p.grad is not None]
        grads_finite = torch.stack(torch._foreach_norm(grads)).isfinite().all()
        t.optimizer.step()
        t._update_averages(t.step)  # CD's rates are constant, so the captured values hold for every step
        return loss.detach(), grads_finite

    def __call__(self, images, labels, z, j) -> float:
        """Run one step on this batch and randomness; returns the loss (raises on a non-finite step)."""
        self.images.copy_(images)
        self.z.copy_(z)
        self.j.copy_(j)
        if labels is not None:
            self.labels.copy_(labels)
        self.graph.replay()
        loss = float(self.loss)
        if not (bool(self.grads_finite) and torch.isfinite(torch.tensor(loss))):
            raise TrainingError(
                f"non-finite loss or gradients at step {self.trainer.step} in --graph mode, which cannot skip steps; "
                "rerun without --graph from the last checkpoint (--resume), or lower the learning rate"
            )
        return loss


def _models(trainer):
    return [m for m in (trainer.online, trainer.target, *trainer.emas.values()) if m is not None]


def _snapshot(trainer) -> dict:
    """Copies of everything a step changes: weights and buffers of every model, the optimizer's state."""
    tensors = [t for m in _models(trainer) for t in (*m.parameters(), *m.buffers())]
    state = {p: {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for p, s in trainer.optimizer.state.items()}  # fmt: skip
    return {"tensors": [(t, t.detach().clone()) for t in tensors], "optimizer": state}


def _restore(trainer, saved: dict) -> None:
    """Put the snapshot back in place (the captured graph holds these tensors' addresses). Optimizer state created
    since the snapshot goes back to its fresh values: step 0, zero moments."""
    with torch.no_grad():
        for t, copy in saved["tensors"]:
            t.copy_(copy)
        for p, state in trainer.optimizer.state.items():
            old = saved["optimizer"].get(p)
            for k, v in state.items():
                if torch.is_tensor(v):
                    v.copy_(old[k]) if old is not None else v.zero_()
                elif old is not None:
                    state[k] = old[k]
