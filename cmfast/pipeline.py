"""The main job (`cmfast demo`): the whole pipeline on the built-in digits, on CPU, in a few minutes.

Trains a small EDM teacher, distills it into a consistency model (Algorithm 2), samples the same seeds with the
teacher's Heun sampler and with the student at one and two steps, writes the grids side by side and prints a table of
steps, network evaluations and time.
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
from .sampling import generators_from_seeds, heun_evaluations, heun_sample, multistep_sigmas, randn, sample
from .training.config import TrainConfig, preset_config
from .training.distributed import shutdown
from .training.trainer import Trainer

# The demo's training budget and its settings on top of the digits presets (tuned for the 2-core CPU). The teacher's
# EMA starts with a warm-up (rate min(0.999, (1 + k) / (10 + k))), so it does not keep its random initial weights; the
# student's EMA has a shorter horizon (0.995: 200 steps) than the presets' 0.999, so after 900 steps it no longer holds
# the teacher's weights it started from (0.995^900 = 1 %). Digits FID (2000 images) of the student: 2.71 at 1 step and
# 2.73 at 2 steps, against 4.57 and 2.91 with 3000 / 1500 steps and the presets' EMAs.
TEACHER_STEPS = 3000
CD_STEPS = 900
TEACHER_SETTINGS: dict = {"ema_warmup": True}
STUDENT_SETTINGS: dict = {"ema_rates": (0.995,)}


@dataclass
class Row:
    name: str  # e.g. "CD, 1 step"
    steps: int
    evaluations: int
    seconds: float
    grid: np.ndarray  # (H, W, C) uint8


def demo_processes() -> int:
    """Training processes the demo starts by default: one. On the 2-core CPU VM, one process with two threads runs the
    digits teacher's step in 95 ms at batch 64 and two one-thread data-parallel processes in 116 ms (idle machine);
    `--processes 2` helps only where the cores are shared and threads stall. The result is the same up to rounding."""
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
    out: Path, teacher_steps: int, cd_steps: int, seed: int, progress: bool, processes: int = 1
) -> tuple[Path, Path]:
    """Train the teacher, then the CD student, with the digits presets and the demo's settings; returns both model
    paths."""
    teacher_cfg = preset_config(
        "digits-edm",
        total_steps=teacher_steps,
        seed=seed,
        checkpoint_every=max(teacher_steps // 2, 1),
        **TEACHER_SETTINGS,
    )
    teacher_path = train(teacher_cfg, out / "teacher", progress, processes)
    cd_cfg = preset_config(
        "digits-cd",
        teacher=str(teacher_path),
        total_steps=cd_steps,
        seed=seed,
        checkpoint_every=max(cd_steps // 2, 1),
        **STUDENT_SETTINGS,
    )
    student_path = train(cd_cfg, out / "cd", progress, processes)
    return teacher_path, student_path


@torch.no_grad()
def compare(teacher_path: Path, student_path: Path, num: int = 64, seed: int = 0) -> list[Row]:
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
    teacher_steps: int,
    cd_steps: int,
    seed: int = 0,
    progress: bool = True,
    processes: int | None = None,
) -> str:
    """Train, distill, sample and compare; writes PNGs under `out` and returns the printed table.

    `out` must be missing or empty: an earlier demo there is not resumed or replaced, so nothing is lost by accident.
    processes: training processes (None: `demo_processes()`).
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty (an earlier demo?); remove it or pick another directory")
    t0 = time.perf_counter()
    processes = demo_processes() if processes is None else processes
    if processes < 1:
        raise ValueError(f"--processes must be a positive integer, got {processes}")
    teacher_path, student_path = train_models(out, teacher_steps, cd_steps, seed, progress, processes)
    train_seconds = time.perf_counter() - t0
    rows = compare(teacher_path, student_path, seed=seed)
    for row in rows:
        slug = f"{'teacher-heun' if 'teacher' in row.name else 'cd'}-{row.steps}step"
        save_png(out / f"{slug}.png", row.grid, scale=4)
    save_png(out / "panel.png", panel(rows))
    lines = [
        f"trained teacher ({teacher_steps} steps) and CD student ({cd_steps} steps) in {train_seconds:.0f} s"
        f" ({processes} process{'es' if processes > 1 else ''})",
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
