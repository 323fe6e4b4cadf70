"""The main job (`cmfast demo`): consistency distillation on the built-in digits, on CPU, in a few minutes.

Distills an EDM teacher into a consistency model (Algorithm 2): by default the shipped `digits-edm` teacher, as the
paper distills pre-trained EDM models; with teacher_steps > 0 it trains a small teacher first (the whole pipeline,
several times as long). Then it samples the same seeds with the teacher's Heun sampler and with the student at one and
two steps, writes the grids side by side and prints a table of steps, network evaluations and time.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp
from PIL import Image, ImageDraw

from .checkpoint import load
from .io import atomic_write_bytes, image_grid, label_font, save_png, to_uint8
from .preconditioning import EDMDenoiser
from .sampling import generators_from_seeds, heun_evaluations, heun_sample, multistep_sigmas, randn, sample
from .training.config import TrainConfig, preset_config
from .training.distributed import shutdown
from .training.trainer import Trainer

# The demo's budgets and settings on top of the digits presets (tuned for the 2-core CPU). By default it distills the
# shipped teacher (digits FID 0.64, Heun with 18 steps) for 450 steps at twice the preset's learning rate, with a
# student EMA of shorter horizon (0.993: about 140 steps) than the preset's 0.999, so that at the end the EMA no longer
# holds the teacher's weights it started from. Digits FID (2000 images, seed 1000000) of its student: 3.02 at 1 step
# and 2.68 at 2 steps. Searched on the 2-core CPU (1-step / 2-step FID, seed 0 unless named): 500 steps gave 2.44 /
# 2.69 (seed 1: 2.34 / 2.57); EMA 0.995 3.60 / 2.58 at 500 steps (seed 1: 3.57 / 2.49), 0.99 2.34 / 2.84 at 450; the
# preset's rate 2e-4 4.75 / 2.78 at 500 steps (EMA 0.995), 8e-4 3.58 / 2.74; an EMA with warm-up 2.34 / 2.98.
SHIPPED_TEACHER = "digits-edm"
CD_STEPS = 450
STUDENT_SETTINGS: dict = {"lr": 4e-4, "ema_rates": (0.993,)}
# The whole pipeline (train_teacher): the teacher's EMA starts with a warm-up (rate min(0.999, (1 + k) / (10 + k))),
# so it does not keep its random initial weights. Teacher 3000 steps (FID 0.82) and student 900 steps at the preset's
# rate: 2.71 at 1 step and 2.73 at 2 steps.
TEACHER_STEPS = 3000
TEACHER_SETTINGS: dict = {"ema_warmup": True}
CD_STEPS_AFTER_TRAINING = 900
STUDENT_SETTINGS_AFTER_TRAINING: dict = {"ema_rates": (0.995,)}


@dataclass
class Row:
    name: str  # e.g. "CD, 1 step"
    steps: int
    evaluations: int
    seconds: float
    grid: np.ndarray  # (H, W, C) uint8


def demo_processes() -> int:
    """Training processes the demo starts by default: one. On the 2-core CPU VMs one process with two threads has been
    the faster: the digits teacher's step at batch 64 in 95 ms against 116 ms with two one-thread data-parallel
    processes on one, the CD step in 457 ms against 484 ms on another (idle machines). `--processes 2` helps only
    where the cores are shared and threads stall. The result is the same up to rounding."""
    return 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _train_worker(rank: int, world: int, port: int, config: dict, run_dir: str, progress: bool) -> None:
    """One process of a data-parallel CPU run (torch.distributed over gloo, as torchrun would set it up)."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
    )
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        Trainer(TrainConfig.from_dict(config), run_dir, progress=progress and rank == 0, device="cpu").train()
    finally:
        shutdown()


def train(config: TrainConfig, run_dir: Path, progress: bool, processes: int) -> Path:
    """Train one model to its end in `processes` processes; returns the exported model's path."""
    if processes == 1:
        return Trainer(config, run_dir, progress=progress).train()
    args = (processes, _free_port(), dataclasses.asdict(config), str(run_dir), progress)
    try:
        mp.start_processes(_train_worker, args=args, nprocs=processes, start_method="spawn")
    except mp.ProcessRaisedException as err:  # the worker's traceback is in the message: keep its last line
        lines = [line for line in str(err).splitlines() if line.strip()]
        raise RuntimeError(f"training {run_dir.name} failed: {lines[-1] if lines else err}") from None
    return run_dir / "model.safetensors"


def train_models(
    out: Path,
    cd_steps: int,
    seed: int,
    progress: bool,
    processes: int = 1,
    teacher: str | os.PathLike = SHIPPED_TEACHER,
    teacher_steps: int = 0,
) -> tuple[Path | str, Path]:
    """Distill `teacher` (a shipped name or a model file) into a CD student with the digits preset and the demo's
    settings; with teacher_steps > 0 train a digits teacher for that many steps first (in out/teacher) and distill it
    instead. Returns the teacher's name or path and the student's path."""
    if teacher_steps:
        teacher_cfg = preset_config(
            "digits-edm",
            total_steps=teacher_steps,
            seed=seed,
            checkpoint_every=max(teacher_steps // 2, 1),
            **TEACHER_SETTINGS,
        )
        teacher = train(teacher_cfg, out / "teacher", progress, processes)
    cd_cfg = preset_config(
        "digits-cd",
        teacher=str(teacher),
        total_steps=cd_steps,
        seed=seed,
        checkpoint_every=max(cd_steps // 2, 1),
        **(STUDENT_SETTINGS_AFTER_TRAINING if teacher_steps else STUDENT_SETTINGS),
    )
    student_path = train(cd_cfg, out / "cd", progress, processes)
    return teacher, student_path


@torch.no_grad()
def compare(teacher_path: Path | str, student_path: Path, num: int = 64, seed: int = 0) -> list[Row]:
    """Sample the same seeds from the teacher (Heun) and the student (1 and 2 steps); time each."""
    teacher, student = load(teacher_path).eval(), load(student_path).eval()
    cfg = student.net.config
    shape = (num, cfg.in_channels, cfg.img_resolution, cfg.img_resolution)
    runs = [
        ("EDM teacher, Heun", 18, heun_evaluations(18), lambda z, g: heun_sample(teacher, z, 18)),
        ("EDM teacher, Heun", 2, heun_evaluations(2), lambda z, g: heun_sample(teacher, z, 2)),
        ("CD student", 1, 1, lambda z, g: sample(student, z, multistep_sigmas(1), generator=g)),
        ("CD student", 2, 2, lambda z, g: sample(student, z, multistep_sigmas(2), generator=g)),
    ]
    rows = []
    for name, steps, evals, run in runs:
        gens = generators_from_seeds(range(seed, seed + num))
        noise = randn(shape, gens)
        t0 = time.perf_counter()
        x = run(noise, gens)
        rows.append(Row(name, steps, evals, time.perf_counter() - t0, image_grid(to_uint8(x), ncols=8)))
    return rows


def panel(rows: list[Row], scale: int = 4) -> np.ndarray:
    """The grids side by side, each under a caption, as one RGB image."""
    tiles = []
    for row in rows:
        img = Image.fromarray(row.grid[..., 0] if row.grid.shape[-1] == 1 else row.grid).convert("RGB")
        tiles.append(np.asarray(img.resize((img.width * scale, img.height * scale), Image.NEAREST)))
    font = label_font(15)
    pad = 8
    caption = font.getbbox("Ag")[3] + 6
    h = max(t.shape[0] for t in tiles) + caption + pad
    w = sum(t.shape[1] for t in tiles) + pad * (len(tiles) + 1)
    canvas = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(canvas)
    x = pad
    for row, tile in zip(rows, tiles):
        draw.text((x, 2), f"{row.name}: {row.steps} step(s), {row.evaluations} eval(s)", fill="black", font=font)
        canvas.paste(Image.fromarray(tile), (x, caption))
        x += tile.shape[1] + pad
    return np.asarray(canvas)


def run_pipeline(
    out: str | Path,
    cd_steps: int | None = None,
    seed: int = 0,
    progress: bool = True,
    processes: int | None = None,
    teacher: str | os.PathLike = SHIPPED_TEACHER,
    teacher_steps: int = 0,
) -> str:
    """Distill (after training a teacher when teacher_steps > 0), sample and compare; writes PNGs under `out` and
    returns the printed table.

    `out` must be missing or empty: an earlier demo there is not resumed or replaced, so nothing is lost by accident.
    cd_steps: None takes the demo's budget (CD_STEPS, or CD_STEPS_AFTER_TRAINING after a trained teacher).
    processes: training processes (None: `demo_processes()`).
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty (an earlier demo?); remove it or pick another directory")
    t0 = time.perf_counter()
    processes = demo_processes() if processes is None else processes
    if processes < 1:
        raise ValueError(f"--processes must be a positive integer, got {processes}")
    if cd_steps is None:
        cd_steps = CD_STEPS_AFTER_TRAINING if teacher_steps else CD_STEPS
    if not teacher_steps and not isinstance(load(teacher), EDMDenoiser):  # before anything is written
        raise ValueError(f"--teacher {teacher} is a consistency model; distillation needs an EDM teacher (denoiser)")
    teacher_path, student_path = train_models(out, cd_steps, seed, progress, processes, teacher, teacher_steps)
    train_seconds = time.perf_counter() - t0
    rows = compare(teacher_path, student_path, seed=seed)
    for row in rows:
        slug = f"{'teacher-heun' if 'teacher' in row.name else 'cd'}-{row.steps}step"
        save_png(out / f"{slug}.png", row.grid, scale=4)
    save_png(out / "panel.png", panel(rows))
    if teacher_steps:
        what = f"trained teacher ({teacher_steps} steps) and CD student ({cd_steps} steps)"
    else:
        what = f"distilled teacher {teacher} into a CD student ({cd_steps} steps)"
    lines = [
        f"{what} in {train_seconds:.0f} s ({processes} process{'es' if processes > 1 else ''})",
        "",
        f"{'model':<20} {'steps':>5} {'evals':>5} {'seconds':>8} {'images/s':>9}",
    ]
    for row in rows:
        lines.append(f"{row.name:<20} {row.steps:>5} {row.evaluations:>5} {row.seconds:>8.3f} {64 / row.seconds:>9.1f}")
    lines += [
        "",
        f"grids: {out}/panel.png (all four side by side), {out}/teacher-heun-*.png, {out}/cd-*.png",
        f"models: {teacher_path}, {student_path}",
    ]
    table = "\n".join(lines)
    atomic_write_bytes(out / "table.txt", (table + "\n").encode())
    return table
