"""`cmfast eval`, `tune-steps`, `ref-stats` and `train-classifier` end to end on tiny models (CPU)."""

import json
import urllib.error

import numpy as np
import pytest
import torch

import cmfast
from cmfast.cli import main
from cmfast.networks import build_network

pytest.importorskip("torch_fidelity")


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory, perturb):
    """A consistency model and an EDM teacher on 8x8 grayscale images, with non-trivial random weights."""
    folder = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    cm, edm = folder / "cm.safetensors", folder / "edm.safetensors"
    cmfast.save(cmfast.ConsistencyModel(perturb(build_network("ddpmpp-digits8"), scale=0.02)), cm)
    cmfast.save(cmfast.EDMDenoiser(perturb(build_network("ddpmpp-digits8"), seed=1, scale=0.02)), edm)
    return cm, edm


def run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def error_of(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_eval_consistency_model(tmp_path, tiny_models, capsys):
    cm, _ = tiny_models
    out = tmp_path / "eval.json"
    argv = ["eval", "--model", str(cm), "--ts", "0,3,5", "--grid", "6", "--num", "24", "--batch", "10"]
    result = run_json(capsys, [*argv, "--out", str(out), "--no-progress"])
    assert result == json.loads(out.read_text())
    assert result["evaluations"] == 2 and result["ts"] == [0, 3, 5] and result["num"] == 24
    assert result["features"]["space"] == "digits"
    assert result["reference"] == {"name": "digits8-test", "num": 300, "split": "test"}
    metrics = result["metrics"]
    assert set(metrics) == {"fid", "kid", "kid_std", "precision", "recall", "is", "is_std"}
    assert metrics["kid_std"] is None  # subsets of 24 of the 24 samples: always the same set, no spread to report
    assert all(np.isfinite(v) for k, v in metrics.items() if k != "kid_std") and metrics["fid"] > 0
    again = run_json(capsys, [*argv, "--batch", "7", "--no-progress"])  # seeds per image: batch does not matter
    assert again["metrics"]["fid"] == pytest.approx(metrics["fid"], rel=1e-4)


def test_eval_teacher_with_heun_steps_and_saved_reference(tmp_path, tiny_models, capsys):
    _, edm = tiny_models
    ref = tmp_path / "ref.npz"
    assert main(["ref-stats", "--data", "digits8", "--out", str(ref), "--no-progress"]) == 0
    assert "300 images" in capsys.readouterr().out
    argv = ["eval", "--model", str(edm), "--steps", "2", "--num", "16", "--no-progress"]
    with_file = run_json(capsys, [*argv, "--ref", str(ref)])
    default = run_json(capsys, argv)
    assert with_file["sampler"] == "edm_heun" and with_file["evaluations"] == 3
    assert with_file["metrics"] == pytest.approx(default["metrics"])


def test_eval_images_gives_the_data_floor(tmp_path, capsys):
    result = run_json(capsys, ["eval", "--images", "digits8", "--no-progress"])
    assert result["num"] == 1497 and result["metrics"]["fid"] == pytest.approx(0.198, abs=0.01)
    assert result["metrics"]["precision"] > 0.8


def test_tune_steps_prints_the_chosen_time_points(tmp_path, tiny_models, capsys):
    cm, _ = tiny_models
    out = tmp_path / "tune.json"
    argv = ["tune-steps", "--model", str(cm), "--grid", "7", "--num", "12", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    assert json.loads(printed.out) == json.loads(out.read_text())
    lines = printed.err.splitlines()
    assert lines[0].startswith("1 step: ts 0,6 (grid 7): FID ")
    assert lines[1].startswith("2 steps: ts 0,") and lines[2].startswith("3 steps: ts 0,")
    result = json.loads(out.read_text())
    two, three = result["chosen"]["2"]["ts"], result["chosen"]["3"]["ts"]
    assert len(two) == 3 and three[:2] == two[:2] and 0 < two[1] < three[2] < 6
    assert result["scored"][",".join(map(str, two))] == result["chosen"]["2"]["fid"]


def test_train_classifier_command(tmp_path, capsys):
    out = tmp_path / "c.safetensors"
    assert main(["train-classifier", "--out", str(out), "--steps", "3", "--dtype", "fp16", "--no-progress"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    result = run_json(capsys, ["eval", "--images", "digits8", "--classifier", str(out), "--no-progress"])
    assert result["features"]["source"] == str(out)


def test_input_errors_are_one_line(tmp_path, tiny_models, capsys, monkeypatch):
    cm, edm = tiny_models
    assert "--ts" in error_of(capsys, ["eval", "--model", str(edm), "--ts", "0,3", "--grid", "6"])
    assert "--num must be at least 2" in error_of(capsys, ["eval", "--model", str(cm), "--num", "1"])
    assert "nope.safetensors: no such file or folder" in error_of(
        capsys, ["eval", "--model", str(tmp_path / "nope.safetensors")]
    )
    err = error_of(capsys, ["eval", "--model", str(cm), "--features", "inception", "--inception-weights", "x.pth"])
    assert "Inception weights x.pth: no such file" in err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.delenv("CMFAST_INCEPTION_WEIGHTS", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    err = error_of(capsys, ["eval", "--model", str(cm), "--features", "inception"])
    assert "downloading" in err and "--inception-weights" in err
    assert "EDM teacher" in error_of(capsys, ["tune-steps", "--model", str(edm)])
    assert "--max-steps" in error_of(capsys, ["tune-steps", "--model", str(cm), "--max-steps", "1"])
    assert "missing: no such file" in error_of(
        capsys, ["eval", "--images", "digits8", "--ref", str(tmp_path / "missing")]
    )
    assert "drop --steps" in error_of(capsys, ["eval", "--images", "digits8", "--steps", "2"])


@pytest.mark.parametrize("command", ["eval", "tune-steps", "ref-stats", "train-classifier"])
def test_help_explains_every_command(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and f"usage: cmfast {command}" in out and len(out) > 300
