"""Images per second the training data path delivers: cmfast's streaming datasets through the trainer's DataLoader.

    python bench/data_throughput.py [--images 20000] [--size 64] [--batch 256] [--workers 0 1 2] [--repeats 5]

Writes synthetic images into a temporary folder in each form `cmfast prepare-data` writes (a zip of PNGs, as EDM's
dataset_tool does; one tar shard of PNG members; one of raw .npy members; one .npz shard), then for each form and
worker count reads `--images` images in global batches of `--batch` (the trainer's StepSampler and make_loader, one
process) `--repeats` times. A repetition is timed from its first batch to its last, so the figure is the steady rate
(worker start-up is reported apart). The files are freshly written, so they are read from the page cache: this
measures reading, decoding and batching, not the disk.

The images are smooth colour fields with mild noise (PNGs of about 8 KiB at 64x64, near an ImageNet-64 PNG's size);
`--content noise` gives incompressible images instead.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import RESULTS, device_slug, machine  # noqa: E402
from cmfast.data import ImageDataset  # noqa: E402
from cmfast.streaming import open_dataset, write_shards  # noqa: E402
from cmfast.training.loader import BatchSplit, StepSampler, make_loader  # noqa: E402


def synthetic_images(n: int, size: int, content: str, seed: int = 0) -> np.ndarray:
    """(n, size, size, 3) uint8: bilinear upsamplings of random 4x4 colour grids plus Gaussian noise (std 6), or
    uniform noise for content="noise"."""
    rng = np.random.default_rng(seed)
    if content == "noise":
        return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        grid = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
        smooth = np.asarray(grid.resize((size, size), Image.BILINEAR), dtype=np.float32)
        out[i] = np.clip(smooth + rng.normal(0, 6, smooth.shape), 0, 255).astype(np.uint8)
    return out


def write_forms(images: np.ndarray, folder: Path) -> dict[str, str]:
    """The dataset in each form, written by `cmfast prepare-data`'s writer; returns {form: spec for open_dataset}."""
    dataset = ImageDataset(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), None, 0, "synthetic")
    n = len(images)
    return {
        "zip-png": write_shards(dataset, folder / "png.zip", members="png", progress=False),
        "tar-png": write_shards(dataset, folder / "png.tar", shard_size=n, members="png", progress=False),
        "tar-npy": write_shards(dataset, folder / "npy.tar", shard_size=n, members="npy", progress=False),
        "npz": write_shards(dataset, folder / "arrays.npz", shard_size=n, progress=False),
    }


def time_loader(dataset, batch: int, steps: int, workers: int) -> tuple[float, float]:
    """(seconds from the first batch to the last, seconds until the first batch) for one pass of `steps` batches."""
    sampler = StepSampler(len(dataset), 0, BatchSplit(batch), 0, steps)
    start = time.perf_counter()
    batches = iter(make_loader(dataset, sampler, workers, pin_memory=False))
    next(batches)
    first = time.perf_counter()
    for _ in batches:
        pass
    return time.perf_counter() - first, first - start


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000, help="images per repetition (and in the dataset)")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--batch", type=int, default=256, help="batch the loader yields")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed passes per setting (at least 5)")
    parser.add_argument("--content", choices=["smooth", "noise"], default="smooth", help="synthetic image content")
    parser.add_argument(
        "--forms", nargs="+", default=["zip-png", "tar-png", "tar-npy", "npz"], help="dataset forms to read"
    )
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/<device>-data-throughput.json)")
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error("--repeats must be at least 5 (medians of fewer runs are noise)")
    if args.images < 2 * args.batch:
        parser.error("--images must be at least two batches")
    info = machine()
    steps = args.images // args.batch
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        images = synthetic_images(args.images, args.size, args.content)
        specs = write_forms(images, Path(tmp))
        mean_png = (Path(tmp) / "png.zip").stat().st_size / args.images
        print(f"{args.images} {args.size}x{args.size} RGB images ({args.content}, {mean_png / 1024:.1f} KiB per PNG)")
        print(f"{info['device']}, torch {info['torch']}, Python {info['python']}, {info['date']}")
        print(f"{'form':<8} {'workers':>7} {'images/s median':>16} {'min':>9} {'max':>9} {'start-up ms':>12}")
        for form in args.forms:
            dataset = open_dataset(specs[form])
            for workers in args.workers:
                runs = [time_loader(dataset, args.batch, steps, workers) for _ in range(args.repeats)]
                rates = [(steps - 1) * args.batch / seconds for seconds, _ in runs]
                startup = statistics.median(s for _, s in runs) * 1e3
                row = dict(
                    form=form,
                    workers=workers,
                    images_s_median=statistics.median(rates),
                    images_s_min=min(rates),
                    images_s_max=max(rates),
                    startup_ms_median=startup,
                    repeats=args.repeats,
                )
                rows.append(row)
                print(
                    f"{form:<8} {workers:>7} {row['images_s_median']:>16.0f} {row['images_s_min']:>9.0f} "
                    f"{row['images_s_max']:>9.0f} {startup:>12.0f}"
                )
    out = args.out or RESULTS / f"{device_slug(info)}-data-throughput.json"
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    out.write_text(
        json.dumps({"machine": info, "settings": settings, "mean_png_bytes": mean_png, "rows": rows}, indent=2)
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
