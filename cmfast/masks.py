"""Inpainting masks: 1 marks a pixel to generate, 0 one to keep. Boxes, random brush strokes, PNG files, and the
spec strings `cmfast edit --mask` takes ("center", "box:x0,y0,x1,y1", "strokes:SEED" or a PNG path)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor


def box_mask(size: int, x0: int, y0: int, x1: int, y1: int) -> Tensor:
    """(size, size) mask, 1 on the pixels x0 <= x < x1, y0 <= y < y1 (to generate)."""
    if not (0 <= x0 < x1 <= size and 0 <= y0 < y1 <= size):
        raise ValueError(f"box {x0},{y0},{x1},{y1} must satisfy 0 <= x0 < x1 <= {size} and 0 <= y0 < y1 <= {size}")
    mask = torch.zeros(size, size)
    mask[y0:y1, x0:x1] = 1
    return mask


def center_mask(size: int) -> Tensor:
    """A centred box of half the side (a quarter of the pixels) to generate."""
    lo = size // 4
    return box_mask(size, lo, lo, size - lo, size - lo)


def stroke_mask(size: int, generator: torch.Generator | None = None, num_strokes: int | None = None) -> Tensor:
    """(size, size) mask of random brush strokes: 1 to 3 polylines of 2 to 4 random points, width about size / 5."""

    def uniform(n: int) -> list[float]:
        return torch.rand(n, generator=generator, dtype=torch.float64).tolist()

    if num_strokes is None:
        num_strokes = 1 + int(uniform(1)[0] * 3)
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(size / 5))
    for _ in range(num_strokes):
        n = 2 + int(uniform(1)[0] * 3)
        points = [(u * (size - 1), v * (size - 1)) for u, v in zip(uniform(n), uniform(n))]
        draw.line(points, fill=255, width=width, joint="curve")
        for px, py in points:  # round caps and joints
            r = (width - 1) / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return torch.from_numpy(np.asarray(canvas) > 127).float()


def load_mask(path: str | os.PathLike, size: int) -> Tensor:
    """A mask PNG (any mode): bright pixels (> 127 in grayscale) are the ones to generate."""
    try:
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the mask image ({err})")
    if gray.shape != (size, size):
        raise ValueError(f"{path}: mask is {gray.shape[1]}x{gray.shape[0]} but the images are {size}x{size}")
    return torch.from_numpy(gray > 127).float()


def make_mask(spec: str, size: int) -> Tensor:
    """A mask from a spec: "center", "box:x0,y0,x1,y1", "strokes:SEED" (random strokes) or a PNG file."""
    kind, _, arg = spec.partition(":")
    if spec == "center":
        return center_mask(size)
    if kind == "box":
        try:
            x0, y0, x1, y1 = (int(v) for v in arg.split(","))
        except ValueError:
            raise ValueError(f"mask {spec!r}: expected box:x0,y0,x1,y1 with four integers")
        return box_mask(size, x0, y0, x1, y1)
    if kind == "strokes":
        try:
            seed = int(arg)
        except ValueError:
            raise ValueError(f"mask {spec!r}: expected strokes:SEED with an integer seed")
        return stroke_mask(size, torch.Generator().manual_seed(seed))
    if not os.path.isfile(spec):
        raise ValueError(f"mask {spec!r}: neither center, box:x0,y0,x1,y1, strokes:SEED nor an existing PNG file")
    return load_mask(spec, size)
