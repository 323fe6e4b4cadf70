"""The main job (`cmfast demo`): the whole pipeline on the built-in digits, on CPU, in a few minutes.

Trains a small EDM teacher, distills it into a consistency model (Algorithm 2), samples the same seeds with the
teacher's Heun sampler and with the student at one and two steps, writes the grids side by side and prints a table of
steps, network evaluations and time.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from .checkpoint import load
from .io import atomic_write_bytes, image_grid, label_font, save_png, to_uint8
from .sampling import generators_from_seeds, heun_evaluations, heun_sample, multistep_sigmas, randn, sample
from .training.config import preset_config
from .training.trainer import Trainer

# The demo's training budget and its settings on top of the digits presets (tuned for the 2-core CPU).
TEACHER_STEPS = 3000
CD_STEPS = 1500
TEACHER_SETTINGS: dict = {}
STUDENT_SETTINGS: dict = {}


@dataclass
class Row:
    name: str  # e.g. "CD, 1 step"
    steps: int
    evaluations: int
    seconds: float
    grid: np.ndarray  # (H, W, C) uint8


def train_models(out: Path, teacher_steps: int, cd_steps: int, seed: int, progress: bool) -> tuple[Path, Path]:
    """Train the teacher, then the CD student, with the digits presets; returns both model paths."""
    teacher_cfg = preset_config(
        "digits-edm",
        total_steps=teacher_steps,
        seed=seed,
        checkpoint_every=max(teacher_steps // 2, 1),
        **TEACHER_SETTINGS,
    )
    teacher_path = Trainer(teacher_cfg, out / "teacher", progress=progress).train()
    cd_cfg = preset_config(
        "digits-cd",
        teacher=str(teacher_path),
        total_steps=cd_steps,
        seed=seed,
        checkpoint_every=max(cd_steps // 2, 1),
        **STUDENT_SETTINGS,
    )
    student_path = Trainer(cd_cfg, out / "cd", progress=progress).train()
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


def run_pipeline(out: str | Path, teacher_steps: int, cd_steps: int, seed: int = 0, progress: bool = True) -> str:
    """Train, distill, sample and compare; writes PNGs under `out` and returns the printed table.

    `out` must be missing or empty: an earlier demo there is not resumed or replaced, so nothing is lost by accident.
    """
    out = Path(out)
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"--out {out} is not empty (an earlier demo?); remove it or pick another directory")
    t0 = time.perf_counter()
    teacher_path, student_path = train_models(out, teacher_steps, cd_steps, seed, progress)
    train_seconds = time.perf_counter() - t0
    rows = compare(teacher_path, student_path, seed=seed)
    for row in rows:
        slug = f"{'teacher-heun' if 'teacher' in row.name else 'cd'}-{row.steps}step"
        save_png(out / f"{slug}.png", row.grid, scale=4)
    save_png(out / "panel.png", panel(rows))
    lines = [
        f"trained teacher ({teacher_steps} steps) and CD student ({cd_steps} steps) in {train_seconds:.0f} s",
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
