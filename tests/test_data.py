"""Datasets: the built-in digits and its fixed split, image folders, .npz arrays, and the bad-data errors."""

import os

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits as sklearn_digits

from cmfast.data import (
    DataError,
    ImageDataset,
    digits_split,
    load_dataset,
    load_digits,
    load_image_folder,
    load_npz,
)


@pytest.fixture(scope="module")
def sk():
    return sklearn_digits()


def scaled_originals(sk, idx):
    """(N, 1, 8, 8) uint8: the sklearn digits at `idx`, mapped 0..16 -> 0..255 and rounded."""
    return torch.from_numpy(np.round(sk.images[idx] * 255 / 16).astype(np.uint8)).unsqueeze(1)


def bilinear_reference(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear upsampling of (..., n, n) with half-pixel centres (align_corners=False), written out in numpy."""
    n = x.shape[-1]
    src = np.clip((np.arange(size) + 0.5) * n / size - 0.5, 0, n - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n - 1)
    w = src - lo
    rows = x[..., lo, :] * (1 - w)[:, None] + x[..., hi, :] * w[:, None]
    return rows[..., lo] * (1 - w) + rows[..., hi] * w


# --- digits -------------------------------------------------------------------------------------------------------


def test_digits_split_counts(sk):
    train, test, every = digits_split("train"), digits_split("test"), digits_split("all")
    assert (len(train), len(test), len(every)) == (1497, 300, 1797)
    assert np.bincount(sk.target[test]).tolist() == [30] * 10
    assert np.bincount(sk.target[train]).tolist() == [148, 152, 147, 153, 151, 152, 151, 149, 144, 150]
    for split, n in (("train", 1497), ("test", 300), ("all", 1797)):
        assert len(load_digits(8, split)) == n


def test_digits_split_disjoint_and_covering():
    train, test = digits_split("train"), digits_split("test")
    assert not set(train) & set(test)
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(1797))
    # The same on the images themselves (the 1797 originals are all distinct).
    as_bytes = lambda ds: {img.numpy().tobytes() for img in ds.images}  # noqa: E731
    tr, te, al = as_bytes(load_digits(8, "train")), as_bytes(load_digits(8, "test")), as_bytes(load_digits(8, "all"))
    assert len(tr) == 1497 and len(te) == 300 and len(al) == 1797
    assert not tr & te and tr | te == al


def test_digits_split_is_pinned():
    # The split must never change: its first test indices and the index sums, recorded when it was made.
    test = digits_split("test")
    assert test[:10].tolist() == [2, 3, 11, 13, 15, 20, 21, 32, 48, 53]
    assert int(test.sum()) == 280136
    assert int(digits_split("train").sum()) == 1333570


def test_digits_deterministic():
    a, b = load_digits(16, "train"), load_digits(16, "train")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


@pytest.mark.parametrize("size", [8, 16, 32])
def test_digits_value_range(size):
    ds = load_digits(size, "all")
    assert ds.images.dtype == torch.uint8
    assert ds.images.shape == (1797, 1, size, size)
    assert int(ds.images.min()) == 0 and int(ds.images.max()) == 255
    assert (ds.resolution, ds.channels, ds.num_classes) == (size, 1, 10)


@pytest.mark.parametrize("split", ["train", "test", "all"])
def test_digits8_are_the_scaled_originals(sk, split):
    ds = load_digits(8, split)
    assert torch.equal(ds.images, scaled_originals(sk, digits_split(split)))


@pytest.mark.parametrize("split", ["train", "test"])
def test_digits_labels_match_sklearn(sk, split):
    ds = load_digits(16, split)
    idx = digits_split(split)
    assert ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == sk.target[idx].tolist()
    # Each image still shows the digit sklearn says: its 8x8 original is the one at the same index.
    assert torch.equal(load_digits(8, split).images, scaled_originals(sk, idx))


def test_digits16_downsamples_back_to_the_originals(sk):
    ds = load_digits(16, "all")
    assert ds.images.shape == (1797, 1, 16, 16)
    x = sk.images * 255 / 16
    pooled = ds.images.double().reshape(1797, 1, 8, 2, 8, 2).mean((3, 5)).squeeze(1).numpy()
    # Close: within a blur of the 8x8 original.
    assert np.abs(pooled - x).mean() < 20
    assert np.corrcoef(pooled.ravel(), x.ravel())[0, 1] > 0.97
    # Exactly what 2x bilinear then 2x2 averaging predicts: the 3-tap filter [1/8, 3/4, 1/8] along each axis with the
    # edges repeated, up to the per-pixel rounding (at most 0.5 level after averaging).
    p = np.pad(x, ((0, 0), (1, 1), (0, 0)), mode="edge")
    x = p[:, :-2] / 8 + p[:, 1:-1] * 3 / 4 + p[:, 2:] / 8
    p = np.pad(x, ((0, 0), (0, 0), (1, 1)), mode="edge")
    x = p[:, :, :-2] / 8 + p[:, :, 1:-1] * 3 / 4 + p[:, :, 2:] / 8
    assert np.abs(pooled - x).max() <= 0.5 + 1e-9


@pytest.mark.parametrize("size", [16, 32])
def test_digits_resize_matches_a_numpy_bilinear(sk, size):
    ref = np.clip(np.round(bilinear_reference(sk.images * 255 / 16, size)), 0, 255)
    got = load_digits(size, "all").images[:, 0].numpy().astype(np.float64)
    assert np.abs(got - ref).max() <= 1  # rounding ties may differ by one level
    assert np.mean(got != ref) < 1e-3


def test_digits_bad_arguments():
    for size in (4, 12, 0):
        with pytest.raises(DataError, match="power of two"):
            load_digits(size)
    with pytest.raises(DataError, match="unknown split 'val'"):
        load_digits(16, "val")


def test_batch_maps_to_minus_one_one():
    ds = load_digits(8, "all")
    idx = [5, 0, 1796, 5]
    x, y = ds.batch(idx)
    assert x.dtype == torch.float32 and x.shape == (4, 1, 8, 8)
    assert torch.equal(x, ds.images[idx].float() / 127.5 - 1)
    assert torch.equal(y, ds.labels[idx])
    x, _ = ds.batch(torch.arange(len(ds)))
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    unconditional = ImageDataset(ds.images[:3], None, 0, "u")
    x, y = unconditional.batch(np.array([2, 1]))
    assert y is None and torch.equal(x, ds.images[[2, 1]].float() / 127.5 - 1)


def test_image_dataset_validates():
    img = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    with pytest.raises(DataError, match="uint8"):
        ImageDataset(img.float(), None, 0, "f")
    with pytest.raises(DataError, match="C in"):
        ImageDataset(img[:, :2], None, 0, "c2")
    with pytest.raises(DataError, match=r"\[0, 3\)"):
        ImageDataset(img, torch.tensor([0, 1, 2, 3]), 3, "range")
    with pytest.raises(DataError, match="no labels"):
        ImageDataset(img, None, 3, "nolabels")


# --- image folders ------------------------------------------------------------------------------------------------


def random_images(n, size, channels, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, channels), dtype=np.uint8)


def write_png(path, array):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(path)


def test_folder_grayscale_unconditional(tmp_path):
    imgs = random_images(3, 6, 1)
    for name, img in zip(["b.png", "a.PNG", "c.png"], imgs):
        write_png(str(tmp_path / name), img)
    (tmp_path / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path)
    assert ds.labels is None and ds.num_classes == 0 and ds.channels == 1 and ds.resolution == 6
    order = [1, 0, 2]  # sorted names: a.PNG, b.png, c.png
    assert torch.equal(ds.images, torch.from_numpy(imgs[order]).permute(0, 3, 1, 2))


def test_folder_rgb_with_class_subfolders(tmp_path):
    imgs = random_images(5, 7, 3, seed=1)
    layout = ["dog/1.png", "cat/z.png", "dog/sub/0.png", "cat/a.png", "emu/x.png"]
    for rel, img in zip(layout, imgs):
        write_png(str(tmp_path / rel), img)
    ds = load_image_folder(tmp_path)
    # Sorted relative paths: cat/a, cat/z, dog/1, dog/sub/0, emu/x; classes cat=0, dog=1, emu=2.
    order = [3, 1, 0, 2, 4]
    assert torch.equal(ds.images, torch.from_numpy(imgs[order]).permute(0, 3, 1, 2))
    assert ds.labels.tolist() == [0, 0, 1, 1, 2]
    assert ds.num_classes == 3 and ds.class_names == ("cat", "dog", "emu") and ds.channels == 3


def test_folder_with_a_top_level_image_is_unconditional(tmp_path):
    imgs = random_images(2, 5, 3, seed=2)
    write_png(str(tmp_path / "cat" / "a.png"), imgs[0])
    write_png(str(tmp_path / "top.png"), imgs[1])
    ds = load_image_folder(tmp_path)
    assert ds.labels is None and ds.num_classes == 0 and len(ds) == 2


def test_folder_mode_conversions(tmp_path):
    rgba = random_images(1, 4, 4, seed=3)[0]
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a_rgba.png")
    pal = Image.fromarray(random_images(1, 4, 3, seed=4)[0]).convert("P", palette=Image.ADAPTIVE, colors=8)
    pal.save(tmp_path / "b_palette.png")
    ds = load_image_folder(tmp_path)
    assert ds.channels == 3
    assert torch.equal(ds.images[0], torch.from_numpy(rgba[..., :3]).permute(2, 0, 1))  # alpha dropped
    assert torch.equal(ds.images[1], torch.from_numpy(np.array(pal.convert("RGB"))).permute(2, 0, 1))


def test_folder_jpeg(tmp_path):
    img = np.full((8, 8, 3), (200, 40, 90), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "a.jpg", quality=95)
    Image.fromarray(img).save(tmp_path / "b.JPEG", quality=95)
    ds = load_image_folder(tmp_path)
    assert ds.images.shape == (2, 3, 8, 8)
    assert (ds.images.int() - torch.tensor([200, 40, 90])[:, None, None]).abs().max() <= 3


def test_folder_resolution(tmp_path):
    write_png(str(tmp_path / "a.png"), np.full((8, 8, 1), 77, dtype=np.uint8))
    write_png(str(tmp_path / "b.png"), np.full((12, 12, 1), 150, dtype=np.uint8))  # mixed sizes are fine here
    ds = load_image_folder(tmp_path, resolution=4)
    assert ds.images.shape == (2, 1, 4, 4)
    assert ds.images[0].eq(77).all() and ds.images[1].eq(150).all()


def test_folder_corrupt_file_is_named(tmp_path):
    write_png(str(tmp_path / "a.png"), random_images(1, 4, 3)[0])
    (tmp_path / "broken.png").write_bytes(b"\x89PNG garbage, not an image" * 3)
    with pytest.raises(DataError, match=r"broken\.png: cannot decode") as err:
        load_image_folder(tmp_path)
    assert "\n" not in str(err.value)


def test_folder_truncated_file_is_named(tmp_path):
    write_png(str(tmp_path / "a.png"), random_images(1, 32, 3)[0])
    data = (tmp_path / "a.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"b\.png: cannot decode"):
        load_image_folder(tmp_path)


def test_folder_mixed_sizes_are_named(tmp_path):
    write_png(str(tmp_path / "a.png"), random_images(1, 4, 3)[0])
    write_png(str(tmp_path / "b.png"), random_images(1, 5, 3)[0])
    with pytest.raises(DataError, match=r"b\.png: size 5x5, expected 4x4 as in .*a\.png"):
        load_image_folder(tmp_path)


def test_folder_mixed_channels_are_named(tmp_path):
    write_png(str(tmp_path / "a.png"), random_images(1, 4, 1)[0])
    write_png(str(tmp_path / "b.png"), random_images(1, 4, 3)[0])
    with pytest.raises(DataError, match=r"b\.png: 3 channel\(s\), expected 1 as in .*a\.png"):
        load_image_folder(tmp_path)


def test_folder_non_square_and_16bit_are_named(tmp_path):
    Image.fromarray(np.zeros((4, 6), dtype=np.uint8)).save(tmp_path / "wide.png")
    with pytest.raises(DataError, match=r"wide\.png: image is 6x4, not square"):
        load_image_folder(tmp_path)
    os.remove(tmp_path / "wide.png")
    Image.fromarray(np.full((4, 4), 1000, dtype=np.uint16)).save(tmp_path / "deep.png")
    with pytest.raises(DataError, match=r"deep\.png: unsupported image mode"):
        load_image_folder(tmp_path)


def test_folder_empty_or_missing_is_named(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("no images")
    with pytest.raises(DataError, match=f"{tmp_path}: no image files"):
        load_image_folder(tmp_path)
    with pytest.raises(DataError, match="nowhere: not a directory"):
        load_image_folder(tmp_path / "nowhere")


def test_folder_progress_bar_only_for_large_folders(tmp_path, capsys):
    img = random_images(1, 2, 1)[0]
    for i in range(3):
        write_png(str(tmp_path / "small" / f"{i}.png"), img)
    load_image_folder(tmp_path / "small")
    assert "loading" not in capsys.readouterr().err
    for i in range(300):
        write_png(str(tmp_path / "large" / f"{i:03d}.png"), img)
    assert len(load_image_folder(tmp_path / "large")) == 300
    assert "300/300" in capsys.readouterr().err


# --- .npz ---------------------------------------------------------------------------------------------------------


def test_npz_nhwc_with_labels(tmp_path):
    imgs = random_images(6, 5, 3, seed=5)
    labels = np.array([3, 0, 1, 3, 2, 0], dtype=np.int32)
    np.savez(tmp_path / "d.npz", images=imgs, labels=labels, seeds=np.arange(6))  # as `cmfast sample` writes
    ds = load_npz(tmp_path / "d.npz")
    assert torch.equal(ds.images, torch.from_numpy(imgs).permute(0, 3, 1, 2))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.num_classes == 4 and ds.name == "d"


def test_npz_nchw_and_key_detection(tmp_path):
    imgs = random_images(4, 6, 1, seed=6).transpose(0, 3, 1, 2)  # (4, 1, 6, 6)
    np.savez(tmp_path / "pos.npz", imgs)  # stored as arr_0
    np.savez(tmp_path / "x.npz", x=imgs, y=np.array([1, 1, 0, 2]))
    for name in ("pos.npz", "x.npz"):
        ds = load_npz(tmp_path / name)
        assert torch.equal(ds.images, torch.from_numpy(imgs))
    assert load_npz(tmp_path / "pos.npz").labels is None
    assert load_npz(tmp_path / "x.npz").labels.tolist() == [1, 1, 0, 2]
    np.savez(tmp_path / "named.npz", data=imgs, images=imgs[:1], x=imgs[:2])  # "images" wins over "x"
    assert len(load_npz(tmp_path / "named.npz", key="data")) == 4
    assert len(load_npz(tmp_path / "named.npz")) == 1


def test_npz_nchw_rgb(tmp_path):
    imgs = random_images(3, 5, 3, seed=7)
    np.savez(tmp_path / "c.npz", images=imgs.transpose(0, 3, 1, 2))
    assert torch.equal(load_npz(tmp_path / "c.npz").images, torch.from_numpy(imgs).permute(0, 3, 1, 2))


def test_npz_resolution(tmp_path):
    np.savez(tmp_path / "a.npz", images=np.full((2, 8, 8, 3), 123, dtype=np.uint8))
    ds = load_npz(tmp_path / "a.npz", resolution=4)
    assert ds.images.shape == (2, 3, 4, 4) and ds.images.eq(123).all()


def test_npz_errors_name_the_file(tmp_path):
    imgs = random_images(3, 4, 3)
    cases = {
        "nokey.npz": ({"pixels": imgs}, r"no image array; looked for images, x, arr_0, found pixels"),
        "float.npz": ({"images": imgs.astype(np.float32)}, r"'images' is float32, expected uint8"),
        "shape.npz": ({"images": imgs[..., :2]}, r"'images' has shape \(3, 4, 4, 2\)"),
        "nonsquare.npz": ({"images": imgs[:, :3]}, r"'images' has shape \(3, 3, 4, 3\)"),
        "labellen.npz": ({"images": imgs, "labels": np.arange(2)}, r"'labels' has shape \(2,\)"),
        "labelfloat.npz": ({"images": imgs, "y": np.zeros(3)}, r"'y' has shape \(3,\) float64"),
        "negative.npz": (
            {"images": imgs, "labels": np.array([0, -1, 2])},
            r"'labels' holds negative labels \(min -1\)",
        ),
    }
    for name, (arrays, message) in cases.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(DataError, match=rf"{name}: {message}"):
            load_npz(tmp_path / name)
    with pytest.raises(DataError, match=r"nokey\.npz: no array 'foo'; found pixels"):
        load_npz(tmp_path / "nokey.npz", key="foo")
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"garbage\.npz: not a readable \.npz file"):
        load_npz(tmp_path / "garbage.npz")
    np.savez(tmp_path / "pickled.npz", images=np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"pickled\.npz: not a readable \.npz file"):
        load_npz(tmp_path / "pickled.npz")
    with pytest.raises(DataError, match=r"missing\.npz: no such file"):
        load_npz(tmp_path / "missing.npz")
    np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8, 3), np.uint8))
    with pytest.raises(DataError, match=r"empty\.npz: 'images' holds no images"):
        load_npz(tmp_path / "empty.npz")


# --- load_dataset -------------------------------------------------------------------------------------------------


def test_load_dataset_specs(tmp_path):
    assert load_dataset("digits").images.shape == (1497, 1, 16, 16)
    assert load_dataset("digits8", split="test").images.shape == (300, 1, 8, 8)
    assert load_dataset("digits32", split="all").resolution == 32
    assert load_dataset("digits", resolution=8).resolution == 8
    with pytest.raises(DataError, match="contradicts"):
        load_dataset("digits16", resolution=32)
    write_png(str(tmp_path / "f" / "a.png"), random_images(1, 4, 3)[0])
    assert load_dataset(str(tmp_path / "f")).images.shape == (1, 3, 4, 4)
    assert load_dataset(str(tmp_path / "f"), resolution=2).resolution == 2
    np.savez(tmp_path / "a.npz", images=random_images(2, 4, 1))
    assert load_dataset(str(tmp_path / "a.npz"), split="all").images.shape == (2, 1, 4, 4)
    with pytest.raises(DataError, match="only the built-in digits have a test split"):
        load_dataset(str(tmp_path / "f"), split="test")
    with pytest.raises(DataError, match="cifar10: unknown dataset; expected digits, digits<size>"):
        load_dataset("cifar10")
    with pytest.raises(DataError, match="unknown split"):
        load_dataset("digits", split="validation")
    assert issubclass(DataError, ValueError)


def test_coloured_digits_are_the_gray_digits_times_their_colour():
    from cmfast.data import digit_colors, load_dataset

    gray, rgb = load_digits(8, split="test"), load_dataset("digits-rgb8", split="test")
    assert rgb.images.shape == (300, 3, 8, 8) and torch.equal(rgb.labels, gray.labels)
    colors = digit_colors(digits_split("test")).float()
    expected = gray.images.double()[:, 0:1] * colors[:, :, None, None]
    assert (rgb.images.double() - expected).abs().max() <= 1.0  # the gray and the colour images are each rounded
    # index 0 has hue 0: red at saturation 0.85, value 1
    reds = digit_colors(np.array([0]))
    torch.testing.assert_close(reds, torch.tensor([[1.0, 0.15, 0.15]], dtype=torch.float64))
