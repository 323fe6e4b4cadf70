"""The command line's answers to bad input and broken models: exit code 2 and one line on stderr, never a traceback;
and the text it prints (help, counts, rates, warnings) says what is true."""

import json

import numpy as np
import pytest
import torch

from cmfast.cli import main

pytest.importorskip("torch_fidelity")

FAST = ["--no-progress", "--device", "cpu"]


@pytest.fixture
def files(tmp_path, monkeypatch):
    """Bad inputs in the working directory: an empty file, a 5-channel image .npz, a file that blocks a folder."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.npz").write_bytes(b"")
    np.savez(tmp_path / "five.npz", images=np.zeros((4, 8, 8, 5), np.uint8))
    np.savez(tmp_path / "none.npz", images=np.zeros((0, 8, 8, 1), np.uint8))
    (tmp_path / "file").write_text("not a folder")
    (tmp_path / "emptydir").mkdir()
    return tmp_path


BAD = [
    (["sample", "--model", "digits-cd", "--device", "meta"], "not on meta"),
    (["sample", "--model", "digits-cd", "--grid", "20"], "--grid 20 only applies with --ts"),
    (["sample", "--model", "digits-cd", "--steps", "100000000"], "--steps must be at most 1000"),
    (["sample", "--model", "digits-cd", "--num", "99999999999"], "GiB of memory is available"),
    (["eval", "--model", "digits-cd", "--grid", "20"], "--grid 20 only applies with --ts"),
    (["eval", "--model", "digits-cd", "--ref", "empty.npz"], "empty.npz: not a readable .npz file"),
    (["eval", "--model", "digits-cd", "--ref", "five.npz"], "'images' has shape (4, 8, 8, 5)"),
    (["eval", "--model", "digits-cd", "--ref", "missing.npz"], "missing.npz: no such file"),
    (["eval", "--model", "digits-cd", "--ref", "emptydir"], "emptydir: no image files"),
    (["eval", "--model", "digits-cd", "--ref", "missing", "--ref-split", "test"], "missing: no such file"),
    (["eval", "--model", "digits-cd", "--out", "file/eval.json"], "--out file/eval.json: cannot write there"),
    (["eval", "--model", "digits-cd", "--save-ref", "file/r.npz"], "--save-ref file/r.npz: cannot write there"),
    (["tune-steps", "--model", "digits-cd", "--ref", "empty.npz"], "empty.npz: not a readable .npz file"),
    (["tune-steps", "--model", "digits-cd", "--out", "file/t.json"], "--out file/t.json: cannot write there"),
    (["ref-stats", "--data", "empty.npz", "--out", "r.npz"], "empty.npz: not a readable .npz file"),
    (["ref-stats", "--data", "missing", "--out", "r.npz"], "missing: no such file or folder"),
    (["ref-stats", "--data", "digits8", "--out", "file/r.npz"], "--out file/r.npz: cannot write there"),
    (["edit", "super_resolve", "--model", "digits-cd", "--input", "digits-test:1", "--factor", "0"], "--factor"),
    (["edit", "super_resolve", "--model", "digits-cd", "--input", "digits-test:1", "--factor=-2"], "--factor"),
    (["edit", "interpolate", "--model", "digits-cd", "--num", "100000000"], "--num must be at most"),
    (["edit", "interpolate", "--model", "digits-cd", "--seeds=-1,2"], "--seeds must be non-negative"),
    (["edit", "interpolate", "--model", "digits-cd", "--device", "meta"], "not on meta"),
    (["edit", "inpaint", "--model", "digits-cd", "--input", "none.npz"], "none.npz"),
    (["edit", "denoise", "--model", "digits-cd"], "denoise needs --input"),
    (
        ["edit", "stroke_edit", "--model", "digits-cd", "--input", "digits-test:1", "--grid", "20"],
        "only applies with --ts",
    ),
]


@pytest.mark.parametrize("argv, message", BAD, ids=[" ".join(a[:1] + a[3:]) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(files, capsys, monkeypatch, argv, message):
    def no_work(*args, **kwargs):
        raise AssertionError("the input should have been refused before any sampling")

    monkeypatch.setattr("cmfast.cli.evaluate.generate", no_work)
    monkeypatch.setattr("cmfast.cli.sample.generate", no_work)
    assert main([*argv, "--no-progress"] if argv[0] != "edit" else [*argv, "--out", "edit"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err and "Traceback" not in err, err


def nan_batches(model, plan, noise, *args, **kwargs):
    return torch.full_like(noise, float("nan"))


@pytest.mark.parametrize("command", ["sample", "eval"])
def test_non_finite_samples_are_refused(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr("cmfast.generate.run_plan", nan_batches)
    out = ["--out", str(tmp_path / ("o" if command == "sample" else "e.json"))]
    assert main([command, "--model", "digits-cd", "--num", "4", *out, *FAST]) == 2
    err = capsys.readouterr().err.strip()
    assert "non-finite values" in err and "\n" not in err
    assert not list(tmp_path.glob("**/*.json"))


def strict_json(text: str):
    def refuse(name):
        raise AssertionError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_non_finite_metrics_are_written_as_null(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("cmfast.cli.evaluate.compute_metrics", lambda *a, **k: {"fid": float("nan"), "kid": 1.0})
    out = tmp_path / "e.json"
    assert main(["eval", "--model", "digits-cd", "--num", "4", "--out", str(out), *FAST]) == 0
    printed = strict_json(capsys.readouterr().out)
    assert printed == strict_json(out.read_text()) and printed["metrics"] == {"fid": None, "kid": 1.0}


def test_eval_of_two_images_reports_what_it_can(capsys):
    assert main(["eval", "--model", "digits-cd", "--num", "2", *FAST]) == 0
    metrics = strict_json(capsys.readouterr().out)["metrics"]
    assert metrics["precision"] is None and metrics["recall"] is None and metrics["kid_std"] is None
    assert np.isfinite(metrics["fid"]) and np.isfinite(metrics["kid"])


def test_user_reference_datasets_are_used_whole(tmp_path, capsys):
    ref = tmp_path / "real.npz"
    np.savez(ref, images=np.random.default_rng(0).integers(0, 256, (20, 8, 8, 1), dtype=np.uint8))
    assert main(["eval", "--model", "digits-cd", "--num", "6", "--ref", str(ref), *FAST]) == 0
    result = strict_json(capsys.readouterr().out)
    assert result["reference"]["num"] == 20 and result["reference"]["split"] is None
    assert main(["eval", "--model", "digits-cd", "--num", "6", *FAST]) == 0
    assert strict_json(capsys.readouterr().out)["reference"] == {"name": "digits8-test", "num": 300, "split": "test"}


def test_tune_steps_prints_its_json(tmp_path, capsys):
    out = tmp_path / "t.json"
    argv = ["tune-steps", "--model", "digits-cd", "--grid", "6", "--num", "4", "--max-steps", "2", "--out", str(out)]
    assert main([*argv, *FAST]) == 0
    printed = capsys.readouterr()
    assert strict_json(printed.out) == strict_json(out.read_text())
    assert "2 steps: ts 0," in printed.err


def test_info_reports_the_format_of_a_shipped_model(capsys):
    from cmfast.checkpoint import ASSETS

    assert main(["info", "digits-cd", "--json"]) == 0
    by_name = json.loads(capsys.readouterr().out)["format"]
    assert main(["info", str(ASSETS / "digits-cd.safetensors"), "--json"]) == 0
    by_path = json.loads(capsys.readouterr().out)["format"]
    assert by_name.startswith("cmfast safetensors v1") and by_path == "cmfast safetensors v1"


def help_of(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["sample", "eval", "tune-steps", "edit inpaint"])
def test_help_states_each_default_once(capsys, command):
    text = " ".join(help_of(capsys, command.split()).split())
    assert "else cpu) (default:" not in text and "(default: None)" not in text


def test_sample_help_names_the_shipped_models(capsys):
    from cmfast.checkpoint import SHIPPED

    text = " ".join(help_of(capsys, ["sample"]).split())
    assert all(name in text for name in SHIPPED)


def test_edit_task_help_shows_the_task_options(capsys):
    text = help_of(capsys, ["edit", "super_resolve"])
    assert "usage: cmfast edit super_resolve" in text and "--factor" in text and "--mask" not in text
    assert "--no-progress" in text
    assert "--ts 22,26" in " ".join(help_of(capsys, ["edit", "stroke_edit"]).split())
    assert "--seeds" in help_of(capsys, ["edit", "interpolate"])
    whole = help_of(capsys, ["edit"])
    assert all(task in whole for task in ("inpaint", "colorize", "super_resolve", "denoise", "interpolate"))


def test_edit_shows_progress_unless_told_not_to(tmp_path, capsys):
    argv = ["edit", "stroke_edit", "--model", "digits-cd", "--input", "digits-test:2", "--samples", "1"]
    assert main([*argv, "--out", str(tmp_path), "--device", "cpu"]) == 0
    assert "stroke_edit: 100%" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path), "--device", "cpu", "--no-progress"]) == 0
    assert capsys.readouterr().err == ""


def test_sample_output_counts_and_rate(tmp_path, capsys):
    assert main(["sample", "--model", "digits-cd", "--num", "4", "--batch", "2", "--out", str(tmp_path), *FAST]) == 0
    out = capsys.readouterr().out
    assert "4 images, 1 evaluation each" in out and "images/s after the first batch" in out
    run = json.loads((tmp_path / "samples.json").read_text())
    assert run["images_per_second_covers"] == "after the first batch" and run["images_per_second"] > 0


def test_few_heun_steps_of_a_teacher_warn(tmp_path, capsys):
    argv = ["sample", "--model", "digits-edm", "--num", "2", "--out", str(tmp_path), *FAST]
    assert main([*argv, "--steps", "1"]) == 0
    err = capsys.readouterr().err.strip()
    assert "warning" in err and "--steps 8" in err and "\n" not in err
    assert main([*argv, "--steps", "8"]) == 0
    assert capsys.readouterr().err == ""
