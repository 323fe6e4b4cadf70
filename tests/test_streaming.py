"""Streaming datasets (folder, zip, tar shards, npz shards; PNG or .npy members) against the arrays they were written
from, and `cmfast prepare-data`'s shards read back; the step
sampler's split over processes and micro-batches; the DataLoader's workers; training on a streamed copy of the digits
equals training on the in-memory digits, and resuming a streamed run is bit-exact."""

import io
import json
import os
import tarfile
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from cmfast.cli import main
from cmfast.data import DataError, ImageDataset, load_digits, load_image_folder
from cmfast.streaming import ImageFolder, NpzShards, TarShards, ZipImages, expand_shards, open_dataset, write_shards
from cmfast.training.config import preset_config
from cmfast.training.loader import BatchSplit, StepSampler, make_loader, worker_error
from cmfast.training.trainer import Trainer

N, SIZE, CLASSES = 11, 8, 3


@pytest.fixture(scope="module")
def source():
    """N random RGB images (N, H, W, 3) uint8 and labels, the reference every form is read against."""
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (N, SIZE, SIZE, 3), dtype=np.uint8), rng.integers(0, CLASSES, N)


def png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image.squeeze(-1) if image.shape[-1] == 1 else image).save(buf, format="PNG")
    return buf.getvalue()


def write_zip(path, images, labels=None, compression=zipfile.ZIP_DEFLATED, names=None) -> list[str]:
    names = names or [f"{i // 5:05d}/img{i:08d}.png" for i in range(len(images))]
    with zipfile.ZipFile(path, "w", compression) as zf:
        for name, image in zip(names, images):
            zf.writestr(name, png(image))
        if labels is not None:
            zf.writestr("dataset.json", json.dumps({"labels": [[n, int(y)] for n, y in zip(names, labels)]}))
    return names


def add_member(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def write_tar_shards(folder, images, labels=None, per_shard=4) -> str:
    for s, start in enumerate(range(0, len(images), per_shard)):
        with tarfile.open(folder / f"train-{s:03d}.tar", "w") as tf:
            for i in range(start, min(start + per_shard, len(images))):
                add_member(tf, f"{i:06d}.png", png(images[i]))
                if labels is not None:
                    add_member(tf, f"{i:06d}.cls", str(int(labels[i])).encode())
    return str(folder / f"train-{{000..{s:03d}}}.tar")


def as_chw(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2)


def read_all(ds, order=None):
    order = list(range(len(ds))) if order is None else order
    return ds.__getitems__(order)


# --- each form, read back ---------------------------------------------------------------------------------------


def test_folder_matches_the_in_memory_loader(tmp_path, source):
    images, labels = source
    for i, (image, y) in enumerate(zip(images, labels)):
        (tmp_path / f"class{y}").mkdir(exist_ok=True)
        Image.fromarray(image).save(tmp_path / f"class{y}" / f"{i:03d}.png")
    ds = open_dataset(str(tmp_path))
    assert isinstance(ds, ImageFolder) and (len(ds), ds.resolution, ds.channels) == (N, SIZE, 3)
    ref = load_image_folder(tmp_path, progress=False)  # decodes everything up front
    x, y = read_all(ds)
    assert torch.equal(x, ref.images) and torch.equal(y, ref.labels)
    assert ds.class_names == ref.class_names and ds.num_classes == ref.num_classes


def test_folder_labels_from_dataset_json(tmp_path, source):
    images, labels = source
    names = [f"sub/{i:03d}.png" for i in range(N)]
    (tmp_path / "sub").mkdir()
    for name, image in zip(names, images):
        Image.fromarray(image).save(tmp_path / name)
    (tmp_path / "dataset.json").write_text(json.dumps({"labels": [[n, int(y)] for n, y in zip(names, labels)]}))
    x, y = read_all(open_dataset(str(tmp_path)))  # one subfolder would be one class; dataset.json wins
    assert torch.equal(x, as_chw(images)) and y.tolist() == labels.tolist()


@pytest.mark.parametrize("compression", [zipfile.ZIP_DEFLATED, zipfile.ZIP_STORED])
def test_zip_reads_members_in_name_order_with_labels(tmp_path, source, compression):
    images, labels = source
    write_zip(tmp_path / "d.zip", images, labels, compression)
    ds = open_dataset(str(tmp_path / "d.zip"))
    assert isinstance(ds, ZipImages) and ds.name == "d" and ds.num_classes == int(labels.max()) + 1
    order = [7, 0, 10, 3, 3]
    x, y = read_all(ds, order)
    assert torch.equal(x, as_chw(images[order])) and y.tolist() == labels[order].tolist()


def test_zip_without_dataset_json_is_unconditional(tmp_path, source):
    write_zip(tmp_path / "d.zip", source[0])
    ds = open_dataset(str(tmp_path / "d.zip"))
    x, y = read_all(ds)
    assert y is None and ds.labels is None and ds.num_classes == 0 and torch.equal(x, as_chw(source[0]))


def test_tar_shards_in_shard_then_member_order(tmp_path, source):
    images, labels = source
    spec = write_tar_shards(tmp_path, images, labels)
    assert len(expand_shards(spec)) == 3  # 4 + 4 + 3 samples
    ds = open_dataset(spec)
    assert isinstance(ds, TarShards) and len(ds) == N and ds.name == "train"
    x, y = read_all(ds)
    assert torch.equal(x, as_chw(images)) and y.tolist() == labels.tolist()
    globbed = open_dataset(str(tmp_path / "train-*.tar"))
    assert torch.equal(read_all(globbed, [9, 2])[0], as_chw(images[[9, 2]]))


def test_npz_shards_stored_compressed_nchw(tmp_path, source):
    images, labels = source
    np.savez(tmp_path / "part-0.npz", images=images[:5], labels=labels[:5])  # stored: memory-mapped
    np.savez_compressed(tmp_path / "part-1.npz", x=images[5:].transpose(0, 3, 1, 2), y=labels[5:])  # read whole
    ds = open_dataset(str(tmp_path / "part-{0..1}.npz"))
    assert isinstance(ds, NpzShards) and len(ds) == N
    assert isinstance(ds._array(0), np.memmap) and not isinstance(ds._array(1), np.memmap)
    order = [10, 4, 5, 0]
    x, y = read_all(ds, order)
    assert torch.equal(x, as_chw(images[order])) and y.tolist() == labels[order].tolist()


def test_grayscale_streams_with_one_channel(tmp_path, source):
    gray = source[0][..., :1]
    write_zip(tmp_path / "g.zip", gray)
    ds = open_dataset(str(tmp_path / "g.zip"))
    assert ds.channels == 1 and torch.equal(read_all(ds)[0], as_chw(gray))


@pytest.mark.parametrize("out, members, files", [("s.tar", "png", 3), ("s.tar", "npy", 3), ("s.npz", "png", 3),
                                                 ("s.zip", "png", 1), ("s.zip", "npy", 1)])  # fmt: skip
def test_written_shards_read_back(tmp_path, source, out, members, files):
    images, labels = source
    dataset = ImageDataset(as_chw(images).contiguous(), torch.from_numpy(labels), CLASSES, "src")
    spec = write_shards(dataset, tmp_path / out, shard_size=4, members=members, progress=False)
    written = sorted(p.name for p in tmp_path.iterdir())
    assert len(written) == files and not [n for n in written if n.endswith(".tmp")]
    x, y = read_all(open_dataset(spec))
    assert torch.equal(x, as_chw(images)) and y.tolist() == labels.tolist()


def test_prepare_data_command(tmp_path, source, capsys):
    images, labels = source
    write_zip(tmp_path / "d.zip", images, labels)
    assert main(["prepare-data", str(tmp_path / "d.zip"), str(tmp_path / "out" / "t.tar"), "--shard-size", "5",
                 "--members", "npy", "--resolution", "4", "--no-progress"]) == 0  # fmt: skip
    spec = capsys.readouterr().out.strip().split("--data ")[-1].strip("'")
    assert spec == str(tmp_path / "out" / "t-{000000..000002}.tar")
    ds = open_dataset(spec)
    assert (len(ds), ds.resolution) == (N, 4) and ds.labels.tolist() == labels.tolist()
    reference = [np.asarray(Image.fromarray(x).resize((4, 4), Image.LANCZOS)) for x in images]  # PIL's own resize
    assert torch.equal(read_all(ds)[0], as_chw(np.stack(reference)))
    assert main(["prepare-data", str(tmp_path / "d.zip"), str(tmp_path / "x.csv")]) == 2
    assert "x.csv: the output must end in .tar, .zip, .npz" in capsys.readouterr().err


def test_npy_members_of_the_wrong_type_are_named(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        buf = io.BytesIO()
        np.save(buf, np.zeros((8, 8, 3), np.float32))
        add_member(tf, "000000.npy", buf.getvalue())
    with pytest.raises(DataError, match=r"s\.tar:000000\.npy: \.npy image must be .* uint8.*float32"):
        open_dataset(str(tmp_path / "s.tar"))


# --- bad data: one line naming the file -----------------------------------------------------------------------------


def test_bad_member_is_named_when_read(tmp_path, source):
    names = write_zip(tmp_path / "d.zip", source[0][:3])
    with zipfile.ZipFile(tmp_path / "d.zip", "a") as zf:
        zf.writestr("00000/zz-broken.png", b"not a png")
    ds = open_dataset(str(tmp_path / "d.zip"))
    read_all(ds, [0, 1, 2])
    with pytest.raises(DataError, match=r"d\.zip:00000/zz-broken\.png: cannot decode image") as err:
        read_all(ds, [3])
    assert "\n" not in str(err.value) and names[0] < "00000/zz-broken.png"


def test_an_image_of_another_size_is_named(tmp_path, source):
    images = list(source[0][:3]) + [np.zeros((SIZE * 2, SIZE * 2, 3), np.uint8)]
    write_zip(tmp_path / "d.zip", images)
    with pytest.raises(DataError, match=r"img00000003\.png: 16x16 with 3 channel\(s\), expected 8x8 with 3"):
        read_all(open_dataset(str(tmp_path / "d.zip")))


@pytest.mark.parametrize(
    "files, spec, match",
    [
        ({"d.tar.gz": b""}, "d.tar.gz", "compressed tar files cannot be read"),
        ({"d.tar": b"x" * 600}, "d.tar", r"d\.tar: not an uncompressed tar file"),
        ({"d.zip": b"PK not a zip"}, "d.zip", r"d\.zip: not a readable zip file"),
        ({}, "train-{000..002}.tar", r"train-000\.tar: no such file"),
        ({}, "nothing-*.npz", r"nothing-\*\.npz: no files match"),
        ({"d.csv": b""}, "d.csv", r"d\.csv: unknown dataset"),
    ],
)
def test_bad_datasets_are_refused_in_one_line(tmp_path, files, spec, match):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(DataError, match=match) as err:
        open_dataset(str(tmp_path / spec))
    assert "\n" not in str(err.value)


def test_dataset_json_must_label_every_image(tmp_path, source):
    write_zip(tmp_path / "d.zip", source[0], source[1])
    with zipfile.ZipFile(tmp_path / "d.zip", "a") as zf:
        zf.writestr("extra.png", png(source[0][0]))
    with pytest.raises(DataError, match=r"d\.zip:dataset\.json: no label for extra\.png"):
        open_dataset(str(tmp_path / "d.zip"))


def test_tar_labels_must_cover_every_sample(tmp_path, source):
    images, labels = source
    with tarfile.open(tmp_path / "s.tar", "w") as tf:
        for i in range(3):
            add_member(tf, f"{i:06d}.png", png(images[i]))
        add_member(tf, "000000.cls", b"1")
    with pytest.raises(DataError, match="sample 000001 has no .cls label"):
        open_dataset(str(tmp_path / "s.tar"))


def test_npz_shards_must_agree(tmp_path, source):
    np.savez(tmp_path / "a-0.npz", images=source[0])
    np.savez(tmp_path / "a-1.npz", images=source[0][:, :4, :4])
    with pytest.raises(DataError, match=r"a-1\.npz: images are \(4, 4, 3\)"):
        open_dataset(str(tmp_path / "a-*.npz"))


# --- the data order and the loader ------------------------------------------------------------------------------


def test_sampler_splits_each_global_batch_over_ranks_and_micro_batches():
    """Every (rank, micro-batch) slice of a step, put together in rank-then-micro order, is the one-process batch;
    over an epoch every index comes exactly once."""
    n, batch, world, accum, steps = 24, 12, 2, 3, 4
    whole = list(StepSampler(n, 5, BatchSplit(batch), 0, steps))
    assert len(whole) == steps and all(len(b) == batch for b in whole)
    pieces = [list(StepSampler(n, 5, BatchSplit(batch, world, r, accum), 0, steps)) for r in range(world)]
    for step in range(steps):
        joined = [i for r in range(world) for b in pieces[r][step * accum : (step + 1) * accum] for i in b]
        assert joined == whole[step]
    assert sorted(whole[0] + whole[1]) == list(range(n))  # epoch 0: a permutation
    assert sorted(whole[2] + whole[3]) == list(range(n)) and whole[2] + whole[3] != whole[0] + whole[1]
    resumed = list(StepSampler(n, 5, BatchSplit(batch), 3, steps))
    assert resumed == whole[3:]


def test_worker_processes_read_what_this_process_reads(tmp_path, source):
    spec = write_tar_shards(tmp_path, *source)
    ds = open_dataset(spec)
    sampler = StepSampler(len(ds), 1, BatchSplit(4, accum=2), 0, 5)
    inline = list(make_loader(ds, sampler, workers=0, pin_memory=False))
    workers = list(make_loader(ds, sampler, workers=2, pin_memory=False))
    assert len(inline) == len(workers) == 10
    for (xa, ya), (xb, yb), idx in zip(inline, workers, sampler):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa, as_chw(source[0][idx]))


def test_worker_error_keeps_the_one_line(tmp_path, source):
    write_zip(tmp_path / "d.zip", source[0][:2], names=["a.png", "b.png"])
    with zipfile.ZipFile(tmp_path / "d.zip", "a") as zf:
        zf.writestr("c.png", b"broken")
    ds = open_dataset(str(tmp_path / "d.zip"))
    loader = make_loader(ds, StepSampler(3, 0, BatchSplit(3), 0, 1), workers=1, pin_memory=False)
    with pytest.raises(DataError) as err:
        next(iter(loader))
    assert "\n" in str(err.value)  # the loader adds the worker's traceback
    assert worker_error(err.value).startswith(f"{tmp_path / 'd.zip'}:c.png: cannot decode image")


# --- training on streamed data -------------------------------------------------------------------------------------


def weights(run) -> dict[str, torch.Tensor]:
    """The online weights and the EMA's (model.safetensors), as written at the end of a run."""
    out = {f"online/{k}": v for k, v in load_file(str(run / "online.safetensors")).items()}
    return {**out, **{f"ema/{k}": v for k, v in load_file(str(run / "model.safetensors")).items()}}


def test_streamed_training_equals_in_memory_and_resumes_bit_exactly(tmp_path):
    """The digits written to a zip train to the same bits as the in-memory digits (same order, same noise), with a
    worker process reading; a run stopped at step 2 and resumed from its checkpoint ends on the same bits."""
    digits = load_digits(8, "train")
    write_zip(tmp_path / "digits.zip", digits.images.permute(0, 2, 3, 1).numpy())
    common = dict(total_steps=4, batch_size=8, log_every=1, checkpoint_every=1000, ema_rates=(0.9,), dropout=0.2)
    streamed_cfg = preset_config("digits-ct", dataset=str(tmp_path / "digits.zip"), **common)
    torch.use_deterministic_algorithms(True)
    try:
        Trainer(preset_config("digits-ct", **common), tmp_path / "memory", progress=False).train()
        Trainer(streamed_cfg, tmp_path / "streamed", progress=False, workers=1).train()
        Trainer(streamed_cfg, tmp_path / "split", progress=False, workers=1).train(stop_at=2)
        resumed = Trainer(streamed_cfg, tmp_path / "split", resume=True, progress=False, workers=1)
        assert resumed.step == 2
        resumed.train()
    finally:
        torch.use_deterministic_algorithms(False)
    memory, streamed, split = (weights(tmp_path / d) for d in ("memory", "streamed", "split"))
    initial = Trainer(preset_config("digits-ct", **common), tmp_path / "init", progress=False).online.net.state_dict()
    assert any(not torch.equal(memory[f"online/{k}"], v) for k, v in initial.items())  # it trained
    for key in memory:
        assert torch.equal(streamed[key], memory[key]), key
        assert torch.equal(split[key], memory[key]), key


def test_a_bad_file_met_in_training_is_one_line(tmp_path):
    digits = load_digits(8, "train")
    names = write_zip(tmp_path / "d.zip", digits.images[:15].permute(0, 2, 3, 1).numpy())
    with zipfile.ZipFile(tmp_path / "d.zip", "a") as zf:
        zf.writestr(names[-1].replace("img", "zz"), b"broken")
    cfg = preset_config("digits-edm", dataset=str(tmp_path / "d.zip"), total_steps=4, batch_size=16, ema_rates=())
    with pytest.raises(DataError, match=r"d\.zip:00002/zz00000014\.png: cannot decode image") as err:
        Trainer(cfg, tmp_path / "run", progress=False, workers=1).train()
    assert "\n" not in str(err.value)
    assert os.path.isdir(tmp_path / "run")
