"""Atomic file writes and image outputs (PNG grids, uint8 .npz arrays)."""

from __future__ import annotations

import io
import math
import os
import tempfile

import numpy as np
import torch
from PIL import Image, ImageFont
from torch import Tensor


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never a partial write.

    Temporary file in the same directory, fsync, rename over the target, then fsync the directory so the rename
    itself survives a crash.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual permissions of a new file
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, C, H, W) images in [-1, 1] -> (B, H, W, C) uint8, rounding to nearest as EDM's generate.py does."""
    x = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def image_grid(images: np.ndarray, ncols: int | None = None, pad: int = 1) -> np.ndarray:
    """(B, H, W, C) uint8 -> one (rows*(H+pad)-pad, cols*(W+pad)-pad, C) grid, filled row by row."""
    b, h, w, c = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = np.full((nrows * (h + pad) - pad, ncols * (w + pad) - pad, c), 255, dtype=np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, ncols)
        grid[r * (h + pad) : r * (h + pad) + h, col * (w + pad) : col * (w + pad) + w] = img
    return grid


def png_bytes(image: np.ndarray, scale: int = 1) -> bytes:
    """(H, W, C) uint8 with C in {1, 3} -> PNG bytes, optionally enlarged by an integer factor (nearest)."""
    if image.shape[-1] == 1:
        image = image[..., 0]
    pil = Image.fromarray(image)
    if scale > 1:
        pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def save_png(path: str | os.PathLike, image: np.ndarray, scale: int = 1) -> None:
    atomic_write_bytes(path, png_bytes(image, scale))


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def label_font(size: int):
    """A scalable font of `size` pixels for panel captions (Pillow's bundled one), or the small fixed bitmap font on
    Pillow < 10.1, which cannot scale."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()
