"""In-memory image datasets: the built-in digits, image folders (PNG/JPEG) and .npz arrays.

Training streams everything but the digits instead (`cmfast.streaming`, which reuses the decoding and checks here).
Every loader here decodes and checks the whole dataset up front and keeps it as one uint8 tensor, so a long training run
never meets a bad file late. Each failure is a `DataError` whose one-line message names the file or folder and what
is wrong (expected vs found size or channels). Images are square; `ImageDataset.batch` maps uint8 [0, 255] to float
[-1, 1] as EDM's training loop does (x / 127.5 - 1).
"""

from __future__ import annotations

import io
import os
import re
import zipfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from tqdm import tqdm

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
NPZ_IMAGE_KEYS = ("images", "x", "arr_0")  # tried in this order when load_npz gets no key
NPZ_LABEL_KEYS = ("labels", "y")
SPLITS = ("train", "test", "all")
DIGITS_TEST_PER_CLASS = 30  # 10 classes -> 300 test images, 1497 train
PROGRESS_MIN_FILES = 256  # folders with more files than this show a progress bar

# PIL modes and what they become: grayscale -> "L" (1 channel), colour -> "RGB" (3). Alpha is dropped, not composited.
_GRAY_MODES = ("1", "L", "LA")
_RGB_MODES = ("RGB", "RGBA", "RGBX", "P", "PA", "CMYK", "YCbCr")


class DataError(ValueError):
    """A dataset that cannot be used; the one-line message names the file or folder and the problem."""


@dataclass
class ImageDataset:
    """A whole dataset in memory.

    images: (N, C, H, W) uint8 with C in {1, 3} and H == W. labels: (N,) int64 in [0, num_classes), or None when
    unconditional (num_classes == 0). class_names: one name per class (folder names, or "0".."9" for the digits).
    """

    images: Tensor
    labels: Tensor | None
    num_classes: int
    name: str
    class_names: tuple[str, ...] = ()

    def __post_init__(self):
        x = self.images
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3]:
            raise DataError(
                f"{self.name}: images must be (N, C, H, H) uint8 with C in {{1, 3}}, got {tuple(x.shape)} {x.dtype}"
            )
        if self.labels is None:
            if self.num_classes != 0:
                raise DataError(f"{self.name}: num_classes={self.num_classes} but no labels")
            return
        y = self.labels
        if y.dtype != torch.int64 or y.shape != (x.shape[0],):
            raise DataError(f"{self.name}: labels must be ({x.shape[0]},) int64, got {tuple(y.shape)} {y.dtype}")
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise DataError(
                f"{self.name}: labels must lie in [0, {self.num_classes}), found {int(y.min())}..{int(y.max())}"
            )

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __getitems__(self, indices) -> tuple[Tensor, Tensor | None]:
        """Images `indices` as (B, C, H, W) uint8 and their (B,) int64 labels or None: a whole batch at once, the
        form torch.utils.data.DataLoader asks a dataset for when it has this method (as the streaming datasets do)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return self.images[idx], None if self.labels is None else self.labels[idx]

    def batch(self, indices, device: torch.device | str | None = None) -> tuple[Tensor, Tensor | None]:
        """Images `indices` (any integer index: list, array, tensor) as (B, C, H, W) float32 in [-1, 1], and their
        (B,) int64 labels or None. The uint8 images move to `device` before the conversion (4x less to copy)."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        x = self.images[idx].to(device).float() / 127.5 - 1
        y = None if self.labels is None else self.labels[idx].to(device)
        return x, y


def _check_split(split: str, name: str) -> None:
    if split not in SPLITS:
        raise DataError(f"{name}: unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def digits_split(split: str = "train") -> np.ndarray:
    """Indices into scikit-learn's digits (its order) that make `split`, sorted ascending.

    The rule, fixed for good: rank the 1797 images by the raw 64-bit outputs of numpy's PCG64 bit generator seeded
    with 0 (a stream numpy keeps stable across versions, unlike its shuffling methods); in each class the 30
    lowest-ranked images are "test". That gives 300 test images (30 of each digit) and 1497 train images
    (148, 152, 147, 153, 151, 152, 151, 149, 144, 150 for digits 0..9); "all" is all 1797.
    """
    _check_split(split, "digits")
    from sklearn.datasets import load_digits as sklearn_digits  # lazy: importing scikit-learn takes a second

    target = sklearn_digits().target
    if split == "all":
        return np.arange(len(target))
    rank = np.argsort(np.random.PCG64(0).random_raw(len(target)), kind="stable")
    test = np.zeros(len(target), dtype=bool)
    for c in range(10):
        in_class = rank[target[rank] == c]
        test[in_class[:DIGITS_TEST_PER_CLASS]] = True
    return np.flatnonzero(test if split == "test" else ~test)


def digit_colors(indices: np.ndarray) -> torch.Tensor:
    """(N, 3) RGB colours in (0, 1] for digits by their index in the full set: hue = frac(index * golden ratio),
    saturation 0.85, value 1, so neighbouring indices get far-apart hues and every digit keeps its colour."""
    hue = (np.asarray(indices, dtype=np.float64) * 0.6180339887498949) % 1.0
    k = (np.array([5.0, 3.0, 1.0])[None] + hue[:, None] * 6) % 6  # the standard HSV -> RGB formula
    rgb = 1 - 0.85 * np.clip(np.minimum(k, 4 - k), 0, 1)
    return torch.from_numpy(rgb)


def load_digits(size: int = 16, split: str = "train", color: bool = False) -> ImageDataset:
    """The handwritten digits that ship with scikit-learn (no download): 1797 images, 10 classes, 1 channel.

    The 8x8 originals hold 0..16; they become uint8 round(x * 255 / 16). `size` is a power of two >= 8: 8 keeps the
    originals, larger sizes are upsampled bilinearly (align_corners=False; antialias only matters when shrinking, so
    it is off) from the unrounded 0..255 values and rounded once. Bilinear gives smooth strokes, where nearest would
    teach a generative model 8x8 blocks. `split`: "train" (1497), "test" (300) or "all" (1797); see `digits_split`.
    color=True gives 3-channel digits, each in its own colour (`digit_colors`): a small RGB set for colorization.
    """
    if size < 8 or size & (size - 1):
        raise DataError(f"digits: size must be a power of two >= 8, got {size}")
    from sklearn.datasets import load_digits as sklearn_digits

    idx = digits_split(split)
    raw = sklearn_digits()
    x = torch.from_numpy(raw.images[idx]).unsqueeze(1) * (255 / 16)  # (N, 1, 8, 8) float64
    if size != 8:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
    if color:
        x = x * digit_colors(idx)[:, :, None, None]
    images = x.round().clamp(0, 255).to(torch.uint8)
    labels = torch.from_numpy(raw.target[idx]).to(torch.int64)
    name = f"digits{'-rgb' if color else ''}{size}-{split}"
    return ImageDataset(images, labels, 10, name, tuple(str(c) for c in range(10)))


def _check_resolution(resolution: int | None, name: str) -> None:
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise DataError(f"{name}: resolution must be a positive integer, got {resolution!r}")


def _resize(img: Image.Image, resolution: int) -> Image.Image:
    # LANCZOS, as EDM's dataset_tool.py: antialiased when shrinking, sharp when enlarging.
    return img if img.size == (resolution, resolution) else img.resize((resolution, resolution), Image.LANCZOS)


def decode_image(path: str, resolution: int | None, data: bytes | None = None) -> np.ndarray:
    """One image file -> (H, W, C) uint8; grayscale modes give C = 1, colour modes (palette, RGBA, CMYK) C = 3.
    `data`: the file's bytes when they were read already (a member of a zip or tar file); `path` then only names it."""
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            img.load()
            if img.mode in ("L", "RGB"):
                pass  # already what we keep (convert would copy it)
            elif img.mode in _GRAY_MODES:
                img = img.convert("L")
            elif img.mode in _RGB_MODES:
                img = img.convert("RGB")
            else:
                raise DataError(
                    f"{path}: unsupported image mode {img.mode} (16-bit or float?); expected 8-bit grayscale or colour"
                )
            if img.width != img.height:
                raise DataError(f"{path}: image is {img.width}x{img.height}, not square; crop it to a square first")
            if resolution is not None:
                img = _resize(img, resolution)
            array = np.asarray(img)
    except DataError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{path}: cannot decode image ({reason})") from None
    return array[..., None] if array.ndim == 2 else array


def list_image_files(root: str) -> list[str]:
    """Paths (relative to `root`, sorted) of the .png/.jpg/.jpeg files under `root`, recursively, any case."""
    if not os.path.isdir(root):
        raise DataError(f"{root}: not a directory")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        files += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    rel = sorted(os.path.relpath(f, root) for f in files)
    if not rel:
        raise DataError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder or below")
    return rel


def folder_labels(rel: list[str]) -> tuple[Tensor | None, tuple[str, ...]]:
    """Labels from first-level folder names: when every path lies in a subdirectory, the sorted names are classes
    0..K-1; otherwise (None, ()), an unconditional dataset."""
    parts = [r.split(os.sep) for r in rel]
    if not all(len(p) > 1 for p in parts):
        return None, ()
    class_names = tuple(sorted({p[0] for p in parts}))
    index = {c: i for i, c in enumerate(class_names)}
    return torch.tensor([index[p[0]] for p in parts], dtype=torch.int64), class_names


def load_image_folder(path: str | os.PathLike, resolution: int | None = None, progress: bool = True) -> ImageDataset:
    """Every .png/.jpg/.jpeg file under `path` (recursively, any case, sorted by relative path; other files ignored).

    Labels: when every image lies inside a first-level subdirectory, the sorted subdirectory names are classes
    0..K-1; otherwise the dataset is unconditional. Channels: grayscale files ("1", "L", "LA") give 1 channel,
    colour files ("RGB", "RGBA", palette, CMYK) 3; alpha is dropped. All files must agree on channels. Size: every
    image must be square; without `resolution` all must have the first file's size, with it each is resized to
    `resolution` x `resolution` (LANCZOS). Every file is decoded here; the first bad one raises a `DataError`
    naming it.
    """
    root = os.fspath(path)
    _check_resolution(resolution, root)
    rel = list_image_files(root)
    labels, class_names = folder_labels(rel)
    images = None
    show = progress and len(rel) > PROGRESS_MIN_FILES
    for i, r in enumerate(tqdm(rel, desc=f"loading {root}", unit="img", disable=not show)):
        file = os.path.join(root, r)
        array = decode_image(file, resolution)
        if images is None:
            images, first = np.empty((len(rel), *array.shape), dtype=np.uint8), file
        elif array.shape[-1] != images.shape[-1]:
            raise DataError(f"{file}: {array.shape[-1]} channel(s), expected {images.shape[-1]} as in {first}")
        elif array.shape != images.shape[1:]:
            raise DataError(
                f"{file}: size {array.shape[1]}x{array.shape[0]}, "
                f"expected {images.shape[2]}x{images.shape[1]} as in {first}"
            )
        images[i] = array
    tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(tensor, labels, len(class_names), os.path.basename(os.path.normpath(root)), class_names)


def array_layout(shape: tuple[int, ...]) -> str | None:
    """'NHWC' or 'NCHW' for square images with 1 or 3 channels (NHWC when both fit), else None."""
    if len(shape) == 4 and shape[1] == shape[2] and shape[3] in (1, 3):
        return "NHWC"
    if len(shape) == 4 and shape[2] == shape[3] and shape[1] in (1, 3):
        return "NCHW"
    return None


def load_npz(path: str | os.PathLike, key: str | None = None, resolution: int | None = None) -> ImageDataset:
    """A .npz file of uint8 images: (N, H, H, C) or (N, C, H, H) with C in {1, 3}, NHWC when both fit (as written
    by `cmfast sample`). `key` defaults to the first of "images", "x", "arr_0" present. Optional labels under
    "labels" or "y": (N,) non-negative integers; num_classes = max label + 1. `resolution` resizes each image (LANCZOS).
    Nothing is unpickled.
    """
    file = os.fspath(path)
    _check_resolution(resolution, file)
    if not os.path.isfile(file):
        raise DataError(f"{file}: no such file")
    try:
        with np.load(file, allow_pickle=False) as npz:
            keys = list(npz.keys())
            if key is None:
                key = next((k for k in NPZ_IMAGE_KEYS if k in keys), None)
                if key is None:
                    raise DataError(
                        f"{file}: no image array; looked for {', '.join(NPZ_IMAGE_KEYS)}, "
                        f"found {', '.join(keys) or 'nothing'}"
                    )
            elif key not in keys:
                raise DataError(f"{file}: no array {key!r}; found {', '.join(keys) or 'nothing'}")
            x = npz[key]
            label_key = next((k for k in NPZ_LABEL_KEYS if k in keys), None)
            y = None if label_key is None else npz[label_key]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"{file}: not a readable .npz file ({reason})") from None

    if x.dtype != np.uint8:
        raise DataError(f"{file}: {key!r} is {x.dtype}, expected uint8 images in 0..255")
    layout = array_layout(x.shape)
    if layout is None:
        raise DataError(f"{file}: {key!r} has shape {x.shape}; expected (N, H, H, C) or (N, C, H, H), C in {{1, 3}}")
    if len(x) == 0:
        raise DataError(f"{file}: {key!r} holds no images")
    if layout == "NCHW":
        x = x.transpose(0, 2, 3, 1)
    if resolution is not None and x.shape[1] != resolution:
        mode = "L" if x.shape[-1] == 1 else "RGB"
        x = np.stack(
            [
                np.asarray(_resize(Image.fromarray(img.squeeze(-1) if mode == "L" else img, mode), resolution))
                for img in x
            ]
        ).reshape(len(x), resolution, resolution, -1)
    images = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()

    labels, num_classes = None, 0
    if y is not None:
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise DataError(f"{file}: {label_key!r} has shape {y.shape} {y.dtype}; expected ({len(x)},) integers")
        if len(y) and y.min() < 0:
            raise DataError(f"{file}: {label_key!r} holds negative labels (min {y.min()})")
        labels = torch.from_numpy(y.astype(np.int64))
        num_classes = int(y.max()) + 1 if len(y) else 0
    name = os.path.splitext(os.path.basename(file))[0]
    return ImageDataset(images, labels, num_classes, name, tuple(str(c) for c in range(num_classes)))


def load_dataset(spec: str, resolution: int | None = None, split: str = "train") -> ImageDataset:
    """`spec`: "digits" (16x16 unless `resolution` says otherwise), "digits8", "digits16", "digits32", ... (the
    size is part of the name), "digits-rgb8" etc. (coloured digits), an image folder, or a .npz file. `split`
    ("train", "test", "all") divides only the digits; a folder or .npz file is one whole dataset, given for "train"
    and "all" and refused for "test".
    """
    _check_split(split, spec)
    match = re.fullmatch(r"digits(-rgb)?(\d*)", spec)
    if match:
        size = int(match.group(2)) if match.group(2) else (resolution or 16)
        if resolution is not None and resolution != size:
            raise DataError(f"{spec}: resolution {resolution} contradicts the name; use digits{resolution}")
        return load_digits(size, split, color=bool(match.group(1)))
    if split == "test":
        raise DataError(f"{spec}: only the built-in digits have a test split; point to a separate folder or file")
    if os.path.isdir(spec):
        return load_image_folder(spec, resolution)
    if spec.lower().endswith(".npz"):
        return load_npz(spec, resolution=resolution)
    raise DataError(
        f"{spec}: unknown dataset; expected digits, digits<size> (e.g. digits8, digits16), digits-rgb<size>, "
        "an image folder (PNG/JPEG) or a .npz file"
    )
