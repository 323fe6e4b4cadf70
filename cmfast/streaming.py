"""Streaming image datasets: files are read and decoded a batch at a time, in DataLoader workers, never held whole.

Four forms, each a map-style dataset (index -> image) so that any sample can be read in any order, which keeps the
trainer's data order (a seeded permutation per epoch) and with it the bit-exact resume:
    ImageFolder   a folder of .png/.jpg/.jpeg files (recursive, sorted by relative path)
    ZipImages     a .zip of image files, EDM's dataset convention, members read at their offsets
    TarShards     uncompressed .tar shards of images (WebDataset layout: "<key>.png" and optionally "<key>.cls")
    NpzShards     .npz shards of uint8 image arrays; stored (np.savez) arrays are memory-mapped, compressed ones loaded

Labels: a dataset.json (EDM's convention, {"labels": [["path/in/dataset.png", 3], ...]} or {"labels": null}) at the
folder's root or inside the zip; otherwise a folder's first-level subdirectory names; a tar sample's "<key>.cls" text;
an npz shard's "labels" (or "y") array. Every image must be square and the same size and channel count as the first.

Members of a zip or tar may be PNG/JPEG files or ".npy" arrays, (H, W, C) or (H, W) uint8 (`write_tar_shards` writes
either): an .npy member is read with no decoding, several times faster than a PNG, for twice a PNG's bytes.

The index (names, offsets, labels) is built once when a dataset is opened and kept in numpy arrays, not Python
objects, so forked workers share it without copying. Files are opened lazily in each process. A bad image is found
when it is read: the `DataError` names the file (and the member) and the problem.
"""

from __future__ import annotations

import glob
import io
import json
import math
import os
import re
import struct
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from tqdm import tqdm

from .data import (
    IMAGE_EXTENSIONS,
    NPZ_IMAGE_KEYS,
    NPZ_LABEL_KEYS,
    DataError,
    array_layout,
    decode_image,
    folder_labels,
    list_image_files,
    load_dataset,
)

DATASET_JSON = "dataset.json"
MEMBER_EXTENSIONS = (*IMAGE_EXTENSIONS, ".npy")  # what a zip or tar member may hold
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, then the name and extra-field lengths at bytes 26..29
_BRACES = re.compile(r"\{(\d+)\.\.(\d+)\}")


class StringTable:
    """Strings packed into one byte buffer with offsets: millions of file names without a Python object each, so a
    forked worker reading them does not touch (and copy) the parent's pages through reference counts."""

    def __init__(self, strings: list[str]):
        encoded = [s.encode() for s in strings]
        self._data = np.frombuffer(b"".join(encoded), dtype=np.uint8)
        self._ends = np.cumsum([len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return len(self._ends)

    def __getitem__(self, i: int) -> str:
        start = int(self._ends[i - 1]) if i else 0
        return self._data[start : int(self._ends[i])].tobytes().decode()


class _Files:
    """Read-only file descriptors opened on first use in each process (a descriptor must not cross a fork)."""

    def __init__(self):
        self._pid, self._fds = None, {}

    def fd(self, path: str) -> int:
        if self._pid != os.getpid():
            self._pid, self._fds = os.getpid(), {}
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def __getstate__(self) -> dict:  # a spawned worker opens its own
        return {"_pid": None, "_fds": {}}


def read_at(files: _Files, path: str, offset: int, size: int) -> bytes:
    data = os.pread(files.fd(path), size, offset)
    if len(data) != size:
        raise DataError(f"{path}: truncated (wanted {size} bytes at offset {offset}, got {len(data)})")
    return data


def decode_member(name: str, data: bytes) -> np.ndarray:
    """A zip or tar member's bytes -> (H, W, C) uint8: an .npy array read in place, else a PNG/JPEG decoded."""
    if not name.lower().endswith(".npy"):
        return decode_image(name, None, data)
    try:
        buf = io.BytesIO(data)
        version = np.lib.format.read_magic(buf)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(buf)
        array = np.frombuffer(data, dtype=dtype, count=math.prod(shape), offset=buf.tell())
    except ValueError as err:
        raise DataError(f"{name}: not a readable .npy array ({err})") from None
    if dtype != np.uint8 or len(shape) not in (2, 3) or (len(shape) == 3 and shape[2] not in (1, 3)):
        raise DataError(f"{name}: .npy image must be (H, W) or (H, W, C) uint8 with C in {{1, 3}}, got {shape} {dtype}")
    array = array.reshape(shape[::-1]).transpose() if fortran else array.reshape(shape)
    return array[..., None] if array.ndim == 2 else array


def labels_from_json(text: str, where: str, names: list[str]) -> np.ndarray | None:
    """Labels of `names` (paths with '/' separators) from a dataset.json's text: (N,) int64, or None for
    {"labels": null}. Every name needs a non-negative integer label."""
    try:
        table = json.loads(text).get("labels")
    except (json.JSONDecodeError, AttributeError) as err:
        raise DataError(f'{where}: not a dataset.json ({err}); expected {{"labels": [[path, label], ...]}}')
    if table is None:
        return None
    try:
        lookup = {str(path): label for path, label in table}
    except (TypeError, ValueError):
        raise DataError(f'{where}: "labels" must be a list of [path, label] pairs')
    bad = next((v for v in lookup.values() if not isinstance(v, int) or isinstance(v, bool) or v < 0), None)
    if bad is not None:
        raise DataError(f"{where}: labels must be non-negative integers, found {bad!r}")
    missing = next((n for n in names if n not in lookup), None)
    if missing is not None:
        raise DataError(f"{where}: no label for {missing}")
    return np.array([lookup[n] for n in names], dtype=np.int64)


def expand_shards(spec: str) -> list[str]:
    """Shard paths of `spec`: a brace range as WebDataset writes it ("shard-{000..099}.tar", zero-padded like the
    first bound), a glob ("shards/*.tar", sorted), or one file. Every path must exist."""
    match = _BRACES.search(spec)
    if match:
        lo, hi = match.group(1), match.group(2)
        if int(hi) < int(lo):
            raise DataError(f"{spec}: empty shard range {{{lo}..{hi}}}")
        paths = [
            spec[: match.start()] + str(i).zfill(len(lo)) + spec[match.end() :] for i in range(int(lo), int(hi) + 1)
        ]
    elif glob.has_magic(spec):
        paths = sorted(glob.glob(spec))
        if not paths:
            raise DataError(f"{spec}: no files match")
    else:
        paths = [spec]
    missing = next((p for p in paths if not os.path.isfile(p)), None)
    if missing is not None:
        raise DataError(f"{missing}: no such file")
    return paths


class StreamingDataset:
    """What the trainer needs of a dataset: len, `__getitems__` (a batch of indices -> (B, C, H, W) uint8 images,
    (B,) int64 labels or None), and name, resolution, channels, labels (None when unconditional), num_classes,
    class_names. Subclasses fill the index and `read_image(i)` -> (H, W, C) uint8."""

    name: str
    labels: np.ndarray | None
    class_names: tuple[str, ...]

    def __init__(self):
        self._files = _Files()
        first = self.read_image(0)
        self.resolution, self.channels = first.shape[0], first.shape[2]

    def __len__(self) -> int:
        raise NotImplementedError

    def read_image(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def describe(self, i: int) -> str:
        """The file (and member) sample i comes from, for error messages."""
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        if self.labels is None:
            return 0
        return max(len(self.class_names), int(self.labels.max()) + 1 if len(self.labels) else 0)

    def __getitems__(self, indices) -> tuple[Tensor, Tensor | None]:
        size, c = self.resolution, self.channels
        out = np.empty((len(indices), size, size, c), dtype=np.uint8)
        for row, i in enumerate(indices):
            image = self.read_image(int(i))
            if image.shape != out.shape[1:]:
                raise DataError(
                    f"{self.describe(int(i))}: {image.shape[1]}x{image.shape[0]} with {image.shape[2]} channel(s), "
                    f"expected {size}x{size} with {c} as the dataset's first image"
                )
            out[row] = image
        images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
        labels = None if self.labels is None else torch.from_numpy(self.labels[np.asarray(indices, dtype=np.int64)])
        return images, labels


class ImageFolder(StreamingDataset):
    """The image files under `root` (as `cmfast.data.load_image_folder` lists them), decoded when read. Labels from
    root/dataset.json when present, else from first-level subdirectory names, else none."""

    def __init__(self, root: str | os.PathLike):
        self.root = os.fspath(root)
        rel = list_image_files(self.root)
        self._names = StringTable(rel)
        json_path = os.path.join(self.root, DATASET_JSON)
        if os.path.isfile(json_path):
            with open(json_path) as fh:
                self.labels = labels_from_json(fh.read(), json_path, [r.replace(os.sep, "/") for r in rel])
            self.class_names = ()
        else:
            labels, self.class_names = folder_labels(rel)
            self.labels = None if labels is None else labels.numpy()
        self.name = os.path.basename(os.path.normpath(self.root))
        super().__init__()

    def __len__(self) -> int:
        return len(self._names)

    def describe(self, i: int) -> str:
        return os.path.join(self.root, self._names[i])

    def read_image(self, i: int) -> np.ndarray:
        path = self.describe(i)
        try:
            with open(path, "rb") as fh:
                data = fh.read()
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err.strerror})") from None
        return decode_image(path, None, data)


class ZipImages(StreamingDataset):
    """The image members of a .zip (EDM's dataset_tool layout; any depth, sorted by name), stored or deflated. Labels
    from its dataset.json, else none (EDM's folders inside a zip are shards, not classes)."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.fspath(path)
        try:
            with zipfile.ZipFile(self.path) as zf:
                infos = sorted(
                    (i for i in zf.infolist() if not i.is_dir() and i.filename.lower().endswith(MEMBER_EXTENSIONS)),
                    key=lambda i: i.filename,
                )
                text = zf.read(DATASET_JSON).decode() if DATASET_JSON in zf.namelist() else None
        except (OSError, zipfile.BadZipFile, EOFError) as err:
            raise DataError(f"{self.path}: not a readable zip file ({err})") from None
        if not infos:
            raise DataError(f"{self.path}: no image members ({', '.join(MEMBER_EXTENSIONS)})")
        odd = next((i for i in infos if i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED)), None)
        if odd is not None:
            raise DataError(
                f"{self.path}: {odd.filename} uses zip compression method {odd.compress_type}; "
                "expected stored or deflated"
            )
        if any(i.flag_bits & 1 for i in infos):
            raise DataError(f"{self.path}: encrypted members cannot be read")
        names = [i.filename for i in infos]
        self._names = StringTable(names)
        self._offsets = np.array([i.header_offset for i in infos], dtype=np.int64)
        self._sizes = np.array([i.compress_size for i in infos], dtype=np.int64)
        self._deflated = np.array([i.compress_type == zipfile.ZIP_DEFLATED for i in infos])
        where = f"{self.path}:{DATASET_JSON}"
        self.labels = None if text is None else labels_from_json(text, where, names)
        self.class_names = ()
        self.name = os.path.splitext(os.path.basename(self.path))[0]
        super().__init__()

    def __len__(self) -> int:
        return len(self._names)

    def describe(self, i: int) -> str:
        return f"{self.path}:{self._names[i]}"

    def read_image(self, i: int) -> np.ndarray:
        offset = int(self._offsets[i])
        signature, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(read_at(self._files, self.path, offset, 30))
        if signature != b"PK\x03\x04":
            raise DataError(f"{self.describe(i)}: no local file header at offset {offset}; the zip is damaged")
        data = read_at(self._files, self.path, offset + 30 + name_len + extra_len, int(self._sizes[i]))
        if self._deflated[i]:
            try:
                data = zlib.decompress(data, -15)
            except zlib.error as err:
                raise DataError(f"{self.describe(i)}: cannot inflate ({err})") from None
        return decode_member(self.describe(i), data)


def _tar_key(member: str) -> tuple[str, str]:
    """WebDataset's split of a member name: the key is everything before the first dot of the base name."""
    folder, _, base = member.rpartition("/")
    stem, _, ext = base.partition(".")
    return f"{folder}/{stem}" if folder else stem, ext.lower()


class TarShards(StreamingDataset):
    """Samples of uncompressed .tar shards in shard order, then member order: "<key>.png|jpg|jpeg" and, for labels,
    "<key>.cls" holding the class index as text (all samples or none). Members are read at their offsets."""

    def __init__(self, paths: list[str], name: str | None = None):
        shard, offsets, sizes, names, labels = [], [], [], [], []
        labelled = None  # whether the shards carry .cls labels: all of them or none
        for s, path in enumerate(paths):
            images, classes = self._scan(path)
            if classes and set(classes) != set(images):
                key = next(k for k in images if k not in classes)
                raise DataError(f"{path}: sample {key} has no .cls label while others have one")
            if images and labelled is not None and labelled != bool(classes):
                raise DataError(f"{path}: labels (.cls members) in some shards but not in others")
            labelled = bool(classes) if images else labelled
            for key, (member, offset, size) in images.items():
                shard.append(s)
                offsets.append(offset)
                sizes.append(size)
                names.append(member)
                if classes:
                    labels.append(classes[key])
        if not names:
            raise DataError(f"{paths[0]}: no image members ({', '.join(MEMBER_EXTENSIONS)}) in {len(paths)} shard(s)")
        self.paths = list(paths)
        self._shard = np.array(shard, dtype=np.int32)
        self._offsets = np.array(offsets, dtype=np.int64)
        self._sizes = np.array(sizes, dtype=np.int64)
        self._names = StringTable(names)
        self.labels = np.array(labels, dtype=np.int64) if labels else None
        self.class_names = ()
        self.name = name or os.path.splitext(os.path.basename(paths[0]))[0]
        super().__init__()

    @staticmethod
    def _scan(path: str) -> tuple[dict, dict]:
        """{key: (member, data offset, size)} of the images and {key: label} of the .cls members of one shard."""
        images, classes = {}, {}
        try:
            with tarfile.open(path, "r:") as tf:
                for m in tf:
                    if not m.isfile():
                        continue
                    key, ext = _tar_key(m.name)
                    if f".{ext}" in MEMBER_EXTENSIONS:
                        if key in images:
                            raise DataError(f"{path}: two images for sample {key}")
                        images[key] = (m.name, m.offset_data, m.size)
                    elif ext == "cls":
                        text = tf.extractfile(m).read().decode(errors="replace").strip()
                        if not text.isdigit():
                            raise DataError(f"{path}:{m.name}: expected a non-negative class index, found {text!r}")
                        classes[key] = int(text)
        except tarfile.ReadError as err:
            raise DataError(f"{path}: not an uncompressed tar file ({err}); write shards as plain .tar") from None
        except OSError as err:
            raise DataError(f"{path}: cannot read ({err})") from None
        return images, classes

    def __len__(self) -> int:
        return len(self._names)

    def describe(self, i: int) -> str:
        return f"{self.paths[self._shard[i]]}:{self._names[i]}"

    def read_image(self, i: int) -> np.ndarray:
        data = read_at(self._files, self.paths[self._shard[i]], int(self._offsets[i]), int(self._sizes[i]))
        return decode_member(self.describe(i), data)


@dataclass(frozen=True)
class _NpzShard:
    """One .npz shard's image array: where it lies (a stored member, memory-mapped) or the array (a compressed one)."""

    path: str
    count: int
    hwc: tuple[int, int, int]  # one image's (H, W, C)
    layout: str  # "NHWC" or "NCHW"
    fortran: bool
    offset: int | None  # of the raw array data in the file, when stored
    array: np.ndarray | None  # the decompressed array, when compressed


def _npy_member(
    path: str, zf: zipfile.ZipFile, key: str
) -> tuple[tuple, np.dtype, bool, int | None, np.ndarray | None]:
    """(shape, dtype, fortran order, data offset, None) of a stored .npy member, which can be memory-mapped; or
    (shape, dtype, False, None, array) of a compressed one, which is read whole."""
    info = zf.getinfo(f"{key}.npy")
    if info.compress_type != zipfile.ZIP_STORED:
        array = np.load(zf.open(info), allow_pickle=False)
        return array.shape, array.dtype, False, None, array
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        _, name_len, extra_len = _ZIP_LOCAL_HEADER.unpack(fh.read(30))
        fh.seek(info.header_offset + 30 + name_len + extra_len)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        return shape, dtype, fortran, fh.tell(), None


def _open_npz_shard(path: str) -> tuple[_NpzShard, np.ndarray | None]:
    """One shard and its (N,) int64 labels or None, checked as `cmfast.data.load_npz` checks a file."""
    try:
        with zipfile.ZipFile(path) as zf:
            keys = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            key = next((k for k in NPZ_IMAGE_KEYS if k in keys), None)
            if key is None:
                found = ", ".join(keys) or "nothing"
                raise DataError(f"{path}: no image array; looked for {', '.join(NPZ_IMAGE_KEYS)}, found {found}")
            shape, dtype, fortran, offset, array = _npy_member(path, zf, key)
            label_key = next((k for k in NPZ_LABEL_KEYS if k in keys), None)
            y = None if label_key is None else np.load(zf.open(f"{label_key}.npy"), allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise DataError(f"{path}: not a readable .npz file ({str(err).splitlines()[0]})") from None
    if dtype != np.uint8:
        raise DataError(f"{path}: {key!r} is {dtype}, expected uint8 images in 0..255")
    layout = array_layout(tuple(shape))
    if layout is None or shape[0] == 0:
        raise DataError(f"{path}: {key!r} has shape {shape}; expected (N, H, H, C) or (N, C, H, H), C in {{1, 3}}")
    if y is not None:
        if y.shape != (shape[0],) or not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
            raise DataError(f"{path}: labels have shape {y.shape} {y.dtype}; expected ({shape[0]},) integers >= 0")
        y = y.astype(np.int64)
    hwc = tuple(shape[1:]) if layout == "NHWC" else (shape[2], shape[3], shape[1])
    return _NpzShard(path, int(shape[0]), hwc, layout, fortran, offset, array), y


class NpzShards(StreamingDataset):
    """Images of one or more .npz files (as `cmfast.data.load_npz` reads one: "images", "x" or "arr_0", NHWC or
    NCHW uint8; labels "labels" or "y"), concatenated. Arrays saved with np.savez are memory-mapped, so only the rows
    read are paged in; np.savez_compressed arrays cannot be, and are read whole when the dataset is opened."""

    def __init__(self, paths: list[str], name: str | None = None):
        self.paths = list(paths)
        self._shards, labels = [], []
        for path in self.paths:
            shard, y = _open_npz_shard(path)
            if self._shards and shard.hwc != self._shards[0].hwc:
                raise DataError(
                    f"{path}: images are {shard.hwc} (H, W, C), expected {self._shards[0].hwc} as in {self.paths[0]}"
                )
            if labels and (y is None) != (labels[0] is None):
                raise DataError(f"{path}: labels in some shards but not in others")
            self._shards.append(shard)
            labels.append(y)
        self._starts = np.cumsum([0, *(s.count for s in self._shards)])
        self.labels = None if labels[0] is None else np.concatenate(labels)
        self.class_names = ()
        self.name = name or os.path.splitext(os.path.basename(self.paths[0]))[0]
        self._maps: dict[int, np.ndarray] = {}
        self._pid = None
        super().__init__()

    def __len__(self) -> int:
        return int(self._starts[-1])

    def _locate(self, i: int) -> tuple[int, int]:
        s = int(np.searchsorted(self._starts, i, side="right")) - 1
        return s, i - int(self._starts[s])

    def describe(self, i: int) -> str:
        s, row = self._locate(i)
        return f"{self.paths[s]}[{row}]"

    def _array(self, s: int) -> np.ndarray:
        if self._pid != os.getpid():
            self._pid, self._maps = os.getpid(), {}
        if s not in self._maps:
            shard = self._shards[s]
            h, w, c = shard.hwc
            shape = (shard.count, h, w, c) if shard.layout == "NHWC" else (shard.count, c, h, w)
            self._maps[s] = (
                shard.array
                if shard.array is not None
                else np.memmap(
                    shard.path, np.uint8, "r", offset=shard.offset, shape=shape, order="F" if shard.fortran else "C"
                )
            )
        return self._maps[s]

    def read_image(self, i: int) -> np.ndarray:
        s, row = self._locate(i)
        image = np.asarray(self._array(s)[row])
        return image if self._shards[s].layout == "NHWC" else image.transpose(1, 2, 0)

    def __getstate__(self) -> dict:  # a spawned worker maps the files itself
        return {**self.__dict__, "_maps": {}, "_pid": None}


def open_dataset(spec: str, split: str = "train"):
    """The dataset `spec` names, for training: the built-in digits in memory (`cmfast.data.load_dataset`), else a
    streaming dataset: an image folder, a .zip of images, .tar shards or .npz shards (one file, a brace range such as
    "shard-{0000..0099}.tar", or a glob)."""
    if re.fullmatch(r"digits(-rgb)?\d*", spec) or split == "test":
        return load_dataset(spec, split=split)  # its own split rules and errors
    lower = spec.lower()
    if os.path.isdir(spec):
        return ImageFolder(spec)
    if lower.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")):
        raise DataError(f"{spec}: compressed tar files cannot be read at random offsets; write plain .tar shards")
    if lower.endswith(".zip"):
        if not os.path.isfile(spec):
            raise DataError(f"{spec}: no such file")
        return ZipImages(spec)
    if lower.endswith(".tar"):
        return TarShards(expand_shards(spec), name=_spec_name(spec))
    if lower.endswith(".npz"):
        return NpzShards(expand_shards(spec), name=_spec_name(spec))
    raise DataError(
        f"{spec}: unknown dataset; expected digits<size>, digits-rgb<size>, an image folder, a .zip of images, "
        ".tar shards or .npz shards (a file, a {{000..099}} range or a glob)"
    )


def _spec_name(spec: str) -> str:
    return re.sub(r"[-_.]*(\{.*\}|\*).*$", "", os.path.splitext(os.path.basename(spec))[0]) or "shards"


# --- writing shards ----------------------------------------------------------------------------------------------

SHARD_FORMATS = (".tar", ".zip", ".npz")


def _samples(dataset, resolution: int | None):
    """(index, (H, W, C) uint8 image, label or None) of every sample, resized to `resolution` (LANCZOS) if given."""
    for i in range(len(dataset)):
        if isinstance(dataset, StreamingDataset):
            image = dataset.read_image(i)
        else:
            image = dataset.images[i].permute(1, 2, 0).numpy()
        if resolution is not None and image.shape[0] != resolution:
            resized = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)  # mode L or RGB
            image = np.asarray(resized.resize((resolution, resolution), Image.LANCZOS)).reshape(
                resolution, resolution, -1
            )
        yield i, image, None if dataset.labels is None else int(dataset.labels[i])


def encode_member(image: np.ndarray, members: str) -> bytes:
    """(H, W, C) uint8 -> a PNG file's bytes (members="png") or an .npy file's (members="npy")."""
    buf = io.BytesIO()
    if members == "npy":
        np.save(buf, np.ascontiguousarray(image), allow_pickle=False)
    else:
        Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def _tar_add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # the same dataset gives the same bytes
    tf.addfile(info, io.BytesIO(data))


def _atomic_file(path: Path):
    """A temporary path beside `path`, and a function that moves it into place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    return tmp, lambda: os.replace(tmp, path)


def write_shards(
    dataset,
    out: str | os.PathLike,
    shard_size: int = 10_000,
    members: str = "png",
    resolution: int | None = None,
    progress: bool = True,
) -> str:
    """Write `dataset` (any dataset `open_dataset` gives) for streaming, each file atomically; returns the spec to
    train from (`--data`).

    out "DIR/NAME.tar": tar shards DIR/NAME-000000.tar, ... of `shard_size` samples ("<index>.png" or ".npy", and
    "<index>.cls" when labelled). out "DIR/NAME.npz": .npz shards of stored (memory-mappable) arrays "images" (N, H,
    W, C) and "labels". out "DIR/NAME.zip": one zip of stored members "<index // 1000>/img<index>.png" (EDM's layout)
    with a dataset.json. members: "png" (lossless, small) or "npy" (raw, no decoding when read; tar and zip only).
    """
    path = Path(out)
    ext = path.suffix.lower()
    if ext not in SHARD_FORMATS:
        raise DataError(f"{out}: the output must end in {', '.join(SHARD_FORMATS)}")
    if members not in ("png", "npy"):
        raise DataError(f"members must be png or npy, got {members!r}")
    if shard_size < 1:
        raise DataError(f"shard size must be a positive integer, got {shard_size}")
    path.parent.mkdir(parents=True, exist_ok=True)
    samples = tqdm(
        _samples(dataset, resolution), total=len(dataset), desc=f"writing {out}", unit="img", disable=not progress
    )
    if ext == ".zip":
        tmp, commit = _atomic_file(path)
        labels = []
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED) as zf:
            for i, image, label in samples:
                name = f"{i // 1000:05d}/img{i:08d}.{members}"
                zf.writestr(name, encode_member(image, members))
                labels.append([name, label])
            has_labels = dataset.labels is not None
            zf.writestr(DATASET_JSON, json.dumps({"labels": labels if has_labels else None}))
        commit()
        return str(path)
    count = math.ceil(len(dataset) / shard_size)
    width = max(6, len(str(count - 1)))
    names = [path.with_name(f"{path.stem}-{s:0{width}d}{ext}") for s in range(count)]
    batch: list[tuple] = []
    for i, image, label in samples:
        batch.append((i, image, label))
        if len(batch) == shard_size or i == len(dataset) - 1:
            target = names[i // shard_size]
            tmp, commit = _atomic_file(target)
            if ext == ".tar":
                with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tf:
                    for j, img, y in batch:
                        _tar_add(tf, f"{j:08d}.{members}", encode_member(img, members))
                        if y is not None:
                            _tar_add(tf, f"{j:08d}.cls", str(y).encode())
            else:
                arrays = {"images": np.stack([img for _, img, _ in batch])}
                if dataset.labels is not None:
                    arrays["labels"] = np.array([y for _, _, y in batch], dtype=np.int64)
                with open(tmp, "wb") as fh:
                    np.savez(fh, **arrays)
            commit()
            batch = []
    return str(path.with_name(f"{path.stem}-{{{0:0{width}d}..{count - 1:0{width}d}}}{ext}"))
