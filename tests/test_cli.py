"""The `cmfast` command line end to end on small presets (CPU)."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cmfast
from cmfast.cli import main
from cmfast.networks import build_network


@pytest.fixture
def trained_like(tmp_path, perturb):
    """A small class-conditional checkpoint with non-trivial weights, saved in the own format."""
    torch.manual_seed(0)
    path = tmp_path / "adm.safetensors"
    cmfast.save(cmfast.ConsistencyModel(perturb(build_network("adm-tiny"), scale=0.1)), path)
    return path


def read_npz(path):
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def test_sample_writes_png_and_npz(tmp_path, trained_like, capsys):
    out = tmp_path / "out"
    rc = main(
        [
            "sample",
            "--model",
            str(trained_like),
            "--steps",
            "2",
            "--num",
            "5",
            "--batch",
            "2",
            "--seed",
            "3",
            "--out",
            str(out),
            "--no-progress",
        ]
    )
    assert rc == 0
    data = read_npz(out / "samples.npz")
    assert data["images"].shape == (5, 16, 16, 3) and data["images"].dtype == np.uint8
    assert data["seeds"].tolist() == [3, 4, 5, 6, 7] and data["labels"].shape == (5,)
    assert data["sigmas"].tolist() == pytest.approx(cmfast.karras_sigmas(3).tolist())
    png = Image.open(out / "samples.png")
    assert png.size[0] >= 3 * 16 and png.mode == "RGB"
    assert "5 images, 2 evaluations each" in capsys.readouterr().out


def test_samples_do_not_depend_on_batch_size(tmp_path, trained_like):
    runs = {}
    for batch in (1, 3, 5):
        out = tmp_path / f"b{batch}"
        assert (
            main(
                [
                    "sample",
                    "--model",
                    str(trained_like),
                    "--steps",
                    "2",
                    "--num",
                    "5",
                    "--batch",
                    str(batch),
                    "--out",
                    str(out),
                    "--no-progress",
                ]
            )
            == 0
        )
        runs[batch] = read_npz(out / "samples.npz")
    for batch in (3, 5):
        assert np.array_equal(runs[batch]["labels"], runs[1]["labels"])
        # The noise is identical (see test_sampling); convolutions may round differently per batch size, so the
        # uint8 images agree to within one level.
        diff = np.abs(runs[batch]["images"].astype(int) - runs[1]["images"].astype(int))
        assert diff.max() <= 1 and diff.mean() < 0.01
    assert len({runs[1]["images"][i].tobytes() for i in range(5)}) == 5  # different seeds, different images


def test_low_precision_sampling_is_close_to_fp32(tmp_path, trained_like):
    for dtype in ("fp32", "bf16"):
        assert (
            main(
                [
                    "sample",
                    "--model",
                    str(trained_like),
                    "--num",
                    "3",
                    "--dtype",
                    dtype,
                    "--out",
                    str(tmp_path / dtype),
                    "--no-progress",
                ]
            )
            == 0
        )
    fp32, bf16 = (read_npz(tmp_path / d / "samples.npz")["images"].astype(int) for d in ("fp32", "bf16"))
    assert (fp32 != bf16).any()  # bf16 really ran
    assert np.abs(fp32 - bf16).mean() < 4  # uint8 levels; bf16 keeps about 3 significant digits


def test_sample_with_ts_and_class_label(tmp_path, trained_like):
    out = tmp_path / "o"
    assert (
        main(
            [
                "sample",
                "--model",
                str(trained_like),
                "--ts",
                "0,22,39",
                "--grid",
                "40",
                "--class-label",
                "7",
                "--num",
                "2",
                "--out",
                str(out),
                "--no-progress",
            ]
        )
        == 0
    )
    data = read_npz(out / "samples.npz")
    assert data["labels"].tolist() == [7, 7]
    assert data["sigmas"].tolist() == pytest.approx(cmfast.sigmas_from_ts([0, 22, 39], 40).tolist())


def test_teacher_checkpoint_uses_heun(tmp_path, capsys, perturb):
    path = tmp_path / "edm.safetensors"
    torch.manual_seed(0)
    cmfast.save(cmfast.EDMDenoiser(perturb(build_network("ddpmpp-tiny"))), path)
    assert (
        main(
            [
                "sample",
                "--model",
                str(path),
                "--steps",
                "3",
                "--num",
                "2",
                "--out",
                str(tmp_path / "o"),
                "--no-progress",
            ]
        )
        == 0
    )
    assert "5 evaluations each" in capsys.readouterr().out
    assert main(["sample", "--model", str(path), "--ts", "0,39", "--out", str(tmp_path / "o")]) == 2


def test_info_prints_architecture_and_parameters(trained_like, capsys):
    assert main(["info", str(trained_like)]) == 0
    out = capsys.readouterr().out
    n = sum(p.numel() for p in build_network("adm-tiny").parameters())
    assert str(n) in out and "adm" in out and "consistency model" in out
    assert main(["info", "ddpmpp-tiny", "--json"]) == 0
    assert '"arch": "song_unet"' in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, message",
    [
        (["sample", "--model", "missing.safetensors"], "missing.safetensors: no such file or folder"),
        (["sample", "--model", "digits-cdd"], "neither a shipped model"),
        (["sample", "--model", "."], "is a folder, but not a diffusers pipeline"),
        (["sample", "--model", "ddpmpp-tiny", "--class-label", "3"], "unconditional"),
        (["sample", "--model", "adm-tiny", "--class-label", "10"], "out of range"),
        (["sample", "--model", "ddpmpp-tiny", "--sigmas", "1,5"], "decreasing"),
        (["sample", "--model", "ddpmpp-tiny", "--sigmas", "0.002"], "only time point is sigma_min"),
        (["sample", "--model", "ddpmpp-tiny", "--sigmas", "1000"], "above the model's sigma_max"),
        (["sample", "--model", "ddpmpp-tiny", "--ts", "0,50"], "ts"),
        (["sample", "--model", "ddpmpp-tiny", "--batch", "0"], "--batch must be a positive integer"),
        (["sample", "--model", "ddpmpp-tiny", "--num", "0"], "--num must be a positive integer"),
        (["sample", "--model", "ddpmpp-tiny", "--steps", "0"], "--steps must be a positive integer"),
        (["sample", "--model", "ddpmpp-tiny", "--seed", "99999999999999999999999"], "--seed must lie"),
        (["sample", "--model", "ddpmpp-tiny", "--device", "foo"], "not a torch device"),
        (["sample", "--model", "ddpmpp-tiny", "--out", "garbage.pt"], "garbage.pt"),
        (["info", "garbage.pt"], "garbage.pt"),
        (["demo", "--cd-steps", "0"], "--cd-steps must be a positive integer"),
        (["demo", "--processes", "0"], "--processes must be a positive integer"),
        (["demo", "--train-teacher", "--teacher", "digits-edm"], "give one of them"),
        (["demo", "--teacher", "digits-cd"], "needs an EDM teacher"),
        (["demo", "--teacher", "missing.safetensors"], "missing.safetensors"),
    ],
)
def test_bad_input_is_one_line(tmp_path, monkeypatch, capsys, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.pt").write_bytes(b"PK\x03\x04 this is not a zip")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err


def test_demo_distills_the_shipped_teacher(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--cd-steps", "2", "--out", str(out), "--no-progress"]) == 0
    table = capsys.readouterr().out
    assert table.startswith("distilled teacher digits-edm into a CD student (2 steps)")
    assert not (out / "teacher").exists() and (out / "panel.png").exists()
    config = json.loads((out / "cd" / "config.json").read_text())
    shipped = Path(cmfast.__file__).parent / "assets" / "digits-edm.safetensors"
    assert config["teacher_sha256"] == hashlib.sha256(shipped.read_bytes()).hexdigest()
    rows = [line.split() for line in table.splitlines() if line.startswith(("EDM", "CD"))]
    assert [(r[-4], r[-3]) for r in rows] == [("18", "35"), ("2", "3"), ("1", "1"), ("2", "2")]  # steps, evaluations


def test_demo_runs_the_whole_pipeline(tmp_path, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--train-teacher", "--teacher-steps", "2", "--cd-steps", "2", "--out", str(out), "--no-progress"]
    assert main(args) == 0
    table = capsys.readouterr().out
    for name in ("panel.png", "teacher-heun-18step.png", "teacher-heun-2step.png", "cd-1step.png", "cd-2step.png"):
        assert (out / name).exists(), name
    assert isinstance(cmfast.load(out / "teacher" / "model.safetensors"), cmfast.EDMDenoiser)
    assert isinstance(cmfast.load(out / "cd" / "model.safetensors"), cmfast.ConsistencyModel)
    rows = [line.split() for line in table.splitlines() if line.startswith(("EDM", "CD"))]
    assert [(r[-4], r[-3]) for r in rows] == [("18", "35"), ("2", "3"), ("1", "1"), ("2", "2")]  # steps, evaluations
    assert (out / "table.txt").read_text().strip() == table.strip()


def test_export_half_precision_round_trip(tmp_path, trained_like, capsys):
    dest = tmp_path / "half.safetensors"
    assert main(["export", str(trained_like), str(dest), "--dtype", "fp16"]) == 0
    full, half = cmfast.load(trained_like), cmfast.load(dest)
    assert dest.stat().st_size < 0.6 * trained_like.stat().st_size
    for a, b in zip(full.net.parameters(), half.net.parameters()):
        assert b.dtype == torch.float32
        torch.testing.assert_close(b, a.half().float(), rtol=0, atol=0)


@pytest.mark.parametrize(
    "command", ["sample", "info", "export", "demo", "train-edm", "distill", "train-ct", "edit", "prepare-data"]
)
def test_help_explains_every_command(command):
    proc = subprocess.run([sys.executable, "-m", "cmfast", command, "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: cmfast" in proc.stdout and len(proc.stdout) > 300


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_cuda_request_without_cuda_is_one_line(capsys):
    assert main(["sample", "--model", "ddpmpp-tiny", "--device", "cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err


def test_sample_writes_the_resolved_run(tmp_path):
    assert (
        main(
            [
                "sample",
                "--model",
                "adm-tiny",
                "--steps",
                "3",
                "--num",
                "2",
                "--seed",
                "5",
                "--out",
                str(tmp_path),
                "--no-progress",
            ]
        )
        == 0
    )
    run = json.loads((tmp_path / "samples.json").read_text())
    assert run["evaluations"] == 3 and run["seed"] == 5 and run["num"] == 2 and run["kind"] == "cm"
    assert run["sigmas"] == pytest.approx(cmfast.karras_sigmas(4).tolist())


def test_demo_panel_captions_are_readable():
    """The captions use a scalable font of about 15 px, not Pillow's fixed 11 px bitmap font: the ink of a caption
    with capitals and descenders spans at least 12 pixel rows."""
    from cmfast.pipeline import Row, panel

    grid = np.full((32, 32, 1), 255, np.uint8)  # white tiles: every dark pixel is caption text
    image = panel([Row("CD student", 1, 1, 0.0, grid), Row("EDM teacher", 18, 35, 0.0, grid)])
    rows = np.flatnonzero((image.min(axis=2) < 128).any(axis=1))
    assert rows.size and rows[-1] - rows[0] + 1 >= 12, rows
