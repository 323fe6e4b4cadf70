"""Training configs as the command line resolves them: presets x flags (iCT's settings), refused values, and what
--resume accepts."""

import json
import math

import pytest

from cmfast.cli import build_parser, main
from cmfast.cli.train import train_config
from cmfast.training.config import TRAIN_PRESETS, TrainConfig, preset_config

CT = dict(distance="l2", s0=2, s1=150)
ICT = dict(distance="pseudo-huber", s0=10, s1=1280)


def resolve(tmp_path, *argv: str) -> TrainConfig:
    return train_config(build_parser().parse_args([*argv, "--run-dir", str(tmp_path / "run")]))


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["train-ct"], {**CT, "ict": False, "dropout": None, "fourier_scale": None}),
        (["train-ct", "--ict"], {**ICT, "ict": True, "dropout": None, "fourier_scale": None}),
        (["train-ct", "--preset", "digits-ict"], {**ICT, "ict": True}),
        (["train-ct", "--ict", "--distance", "l2"], {**ICT, "distance": "l2"}),
        (["train-ct", "--ict", "--s0", "5"], {**ICT, "s0": 5}),
        (["train-ct", "--ict", "--s1", "640"], {**ICT, "s1": 640}),
        (["train-ct", "--ict", "--network", "ncsnpp-tiny"], {**ICT, "fourier_scale": 0.02, "dropout": None}),
        (["train-ct", "--preset", "digits-ict", "--distance", "l1"], {**ICT, "distance": "l1"}),
        (
            ["train-ct", "--preset", "cifar10-ct", "--data", "x.npz"],
            {"distance": "lpips", "s0": 2, "s1": 150, "dropout": 0.0, "fourier_scale": None, "lpips_pooling": "max"},
        ),
        (
            ["train-ct", "--preset", "cifar10-ct", "--data", "x.npz", "--ict"],
            {**ICT, "ict": True, "dropout": 0.3, "fourier_scale": 0.02},
        ),
        (
            ["train-ct", "--preset", "cifar10-ct", "--data", "x.npz", "--ict", "--dropout", "0.1"],
            {**ICT, "dropout": 0.1, "fourier_scale": 0.02},
        ),
        (
            ["train-ct", "--preset", "cifar10-ct", "--data", "x.npz", "--ict", "--network", "ddpmpp-cifar10"],
            {**ICT, "dropout": 0.3, "fourier_scale": None},
        ),
        (
            ["train-ct", "--preset", "imagenet64-ct", "--data", "x.npz", "--ict"],
            {**ICT, "dropout": 0.2, "fourier_scale": None, "lpips_pooling": "avg"},
        ),
        (
            ["train-ct", "--preset", "lsun256-ct", "--data", "x.npz", "--ict", "--distance", "lpips"],
            {**ICT, "distance": "lpips", "dropout": 0.0, "lpips_pooling": "avg"},
        ),
    ],
)
def test_ict_settings_by_preset_and_flags(tmp_path, argv, expected):
    """--ict takes iCT's values over a CT preset's; a flag naming a value keeps it."""
    cfg = resolve(tmp_path, *argv)
    assert {k: getattr(cfg, k) for k in expected} == expected


@pytest.mark.parametrize("name", sorted(n for n, p in TRAIN_PRESETS.items() if p["kind"] in ("cd", "ct")))
def test_lpips_pooling_follows_the_official_code(name):
    """Average pooling in the ImageNet-64 and LSUN code (piq, replace_pooling=True), max pooling elsewhere."""
    cfg = preset_config(name, dataset="x.npz", teacher="t.safetensors")
    assert cfg.lpips_pooling == ("avg" if name.startswith(("imagenet64", "lsun256")) else "max")


@pytest.mark.parametrize(
    "field, value",
    [
        ("log_every", 0),
        ("checkpoint_every", 0),
        ("keep_checkpoints", 0),
        ("lr", math.inf),
        ("lr", math.nan),
        ("lr", -1e-4),
        ("seed", -1),
        ("max_bad_steps", -1),
        ("schedule_steps", 0),
        ("lpips_pooling", "mean"),
        ("fourier_scale", 0.0),
        ("dropout", 1.0),
        ("lr_decay", -0.1),
        ("lr_decay", 1.5),
    ],
)
def test_config_refuses_bad_values(field, value):
    with pytest.raises(ValueError, match=field.split("_")[0] if field != "lr" else "learning rate"):
        preset_config("digits-edm", **{field: value})


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--lr", "inf"], "--lr must be a positive finite number"),
        (["--seed", "-3"], "--seed must not be negative"),
        (["--checkpoint-every", "0"], "checkpoint_every must be a positive integer"),
        (["--log-every", "0"], "log_every must be a positive integer"),
        (["--lr-decay", "2"], "lr_decay is the fraction of the run"),
    ],
)
def test_cli_refuses_bad_flags_in_one_line(tmp_path, argv, message):
    with pytest.raises(ValueError, match=message) as err:
        resolve(tmp_path, "train-ct", *argv)
    assert "\n" not in str(err.value)


@pytest.fixture
def ct_run(tmp_path):
    """A run directory with the config.json of `train-ct` (the digits-ct preset, K = 4)."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = preset_config("digits-ct", total_steps=4, schedule_steps=4)
    (run / "config.json").write_text(json.dumps(cfg.to_dict()))
    return tmp_path


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--preset", "digits-ct"], "drop --preset"),
        (["--lr", "1e-3"], "--lr 0.001 differs from the run's lr = 0.0004"),
        (["--network", "ncsnpp-tiny"], "--network ncsnpp-tiny differs"),
        (["--batch", "8"], "--batch 8 differs"),
        (["--ict"], "--ict True differs"),
        (["--rescale-schedule"], "--rescale-schedule needs"),
    ],
)
def test_resume_refuses_flags_it_would_ignore(ct_run, argv, message):
    with pytest.raises(ValueError, match=message):
        resolve(ct_run, "train-ct", "--resume", *argv)


def test_resume_accepts_flags_that_agree(ct_run):
    cfg = resolve(ct_run, "train-ct", "--resume", "--lr", "4e-4", "--batch", "64")
    assert cfg.total_steps == 4


def test_resume_keeps_the_schedule_unless_asked(ct_run, capsys):
    grown = resolve(ct_run, "train-ct", "--resume", "--steps", "8")
    assert (grown.total_steps, grown.schedule_steps) == (8, 4)
    assert "keep K = 4" in capsys.readouterr().out
    stretched = resolve(ct_run, "train-ct", "--resume", "--steps", "8", "--rescale-schedule")
    assert (stretched.total_steps, stretched.schedule_steps) == (8, 8)
    assert "K changes from 4 to 8" in capsys.readouterr().out


def test_resume_pins_the_schedule_of_older_runs(ct_run):
    """A config.json written before schedule_steps existed: its total_steps was the schedule's K."""
    path = ct_run / "run" / "config.json"
    data = json.loads(path.read_text())
    del data["schedule_steps"]
    path.write_text(json.dumps(data))
    assert resolve(ct_run, "train-ct", "--resume", "--steps", "8").schedule_steps == 4


@pytest.mark.parametrize("argv", [["--checkpoint-every", "0"], ["--log-every", "0"], ["--lr", "inf"], ["--seed", "-1"]])
def test_cli_exits_2_with_one_line(tmp_path, capsys, argv):
    assert main(["train-ct", "--run-dir", str(tmp_path / "run"), "--no-progress", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cmfast train-ct: error: ") and err.count("\n") == 1
