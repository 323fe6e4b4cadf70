"""Inpainting masks: 1 marks a pixel to generate, 0 one to keep. Boxes, random brush strokes, PNG files, and the
spec strings `cmfast edit --mask` takes ("center", "box:x0,y0,x1,y1", "strokes:SEED" or a PNG path). A size is
the side of a square image or its (height, width)."""

from __future__ import annotations

import os

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import Tensor

Size = int | tuple[int, int]


def height_width(size: Size) -> tuple[int, int]:
    """(H, W) of a size given as a side or as (H, W)."""
    h, w = (size, size) if isinstance(size, int) else size
    if h < 1 or w < 1:
        raise ValueError(f"a mask needs a positive size, got {h}x{w} (height x width)")
    return int(h), int(w)


def box_mask(size: Size, x0: int, y0: int, x1: int, y1: int) -> Tensor:
    """(H, W) mask, 1 on the pixels x0 <= x < x1, y0 <= y < y1 (to generate)."""
    h, w = height_width(size)
    if not (0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h):
        raise ValueError(f"box {x0},{y0},{x1},{y1} must satisfy 0 <= x0 < x1 <= {w} and 0 <= y0 < y1 <= {h}")
    mask = torch.zeros(h, w)
    mask[y0:y1, x0:x1] = 1
    return mask


def center_mask(size: Size) -> Tensor:
    """A centred box of half each side (a quarter of the pixels) to generate."""
    h, w = height_width(size)
    return box_mask((h, w), w // 4, h // 4, w - w // 4, h - h // 4)


def stroke_mask(size: Size, generator: torch.Generator | None = None, num_strokes: int | None = None) -> Tensor:
    """(H, W) mask of random brush strokes: 1 to 3 polylines of 2 to 4 random points, width about min(H, W) / 5."""

    def uniform(n: int) -> list[float]:
        return torch.rand(n, generator=generator, dtype=torch.float64).tolist()

    if num_strokes is None:
        num_strokes = 1 + int(uniform(1)[0] * 3)
    h, w = height_width(size)
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    width = max(1, round(min(h, w) / 5))
    for _ in range(num_strokes):
        n = 2 + int(uniform(1)[0] * 3)
        points = [(u * (w - 1), v * (h - 1)) for u, v in zip(uniform(n), uniform(n))]
        draw.line(points, fill=255, width=width, joint="curve")
        for px, py in points:  # round caps and joints
            r = (width - 1) / 2
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return torch.from_numpy(np.asarray(canvas) > 127).float()


def load_mask(path: str | os.PathLike, size: Size) -> Tensor:
    """A mask PNG (any mode): bright pixels (> 127 in grayscale) are the ones to generate."""
    try:
        with Image.open(path) as img:
            gray = np.asarray(img.convert("L"))
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot read the mask image ({err})")
    h, w = height_width(size)
    if gray.shape != (h, w):
        raise ValueError(f"{path}: mask is {gray.shape[1]}x{gray.shape[0]} but the images are {w}x{h}")
    return torch.from_numpy(gray > 127).float()


def make_mask(spec: str, size: Size) -> Tensor:
    """An (H, W) mask from a spec: "center", "box:x0,y0,x1,y1", "strokes:SEED" (random strokes) or a PNG file."""
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
