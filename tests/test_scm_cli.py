"""`cmfast train-sct` and `cmfast distill-scd` end to end on the digits (tiny budgets): runs, resume, sampling and
evaluation of the saved TrigFlow model through the same commands as the other consistency models."""

import json
import math

import pytest
from safetensors.torch import load_file

import cmfast
from cmfast.cli import main
from cmfast.generate import sampling_plan
from cmfast.preconditioning import TrigFlowModel

TINY = ["--batch", "4", "--sample-every", "0", "--checkpoint-every", "1", "--no-progress"]


@pytest.fixture(scope="module")
def sct_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sct") / "run"
    assert main(["train-sct", "--run-dir", str(run), "--steps", "3", "--tangent-warmup", "2", *TINY]) == 0
    return run


def test_sct_run_writes_a_trigflow_model(sct_run):
    config = json.loads((sct_run / "config.json").read_text())
    assert config["kind"] == "sct" and config["resolved_network"]["time_scale"] == 1000.0
    assert config["resolved_network"]["logvar_head"] is True
    model = cmfast.load(sct_run / "model.safetensors")
    assert isinstance(model, TrigFlowModel) and model.noise_cond == "t" and model.boundary == 0.0
    plan = sampling_plan(model, steps=2)
    assert plan.evaluation_sigmas == pytest.approx((80.0, 0.5 * math.tan(1.1)))
    assert sampling_plan(model, steps=1).evaluation_sigmas == (80.0,)


def test_sct_resume_repeats_the_uninterrupted_run(sct_run, tmp_path):
    split = tmp_path / "split"
    assert main(["train-sct", "--run-dir", str(split), "--steps", "2", "--tangent-warmup", "2", *TINY]) == 0
    assert main(["train-sct", "--run-dir", str(split), "--resume", "--steps", "3", "--no-progress"]) == 0
    whole, resumed = load_file(sct_run / "online.safetensors"), load_file(split / "online.safetensors")
    assert whole.keys() == resumed.keys()
    for key in whole:
        assert (whole[key] - resumed[key]).abs().max() <= 1e-6, key


def test_sampling_and_eval_take_the_saved_model(sct_run, tmp_path):
    out = tmp_path / "samples"
    model = str(sct_run / "model.safetensors")
    assert main(["sample", "--model", model, "--steps", "2", "--num", "4", "--out", str(out), "--no-progress"]) == 0
    record = json.loads((out / "samples.json").read_text())
    assert record["evaluations"] == 2 and record["sigmas"] == pytest.approx([80.0, 0.5 * math.tan(1.1)])
    result = tmp_path / "eval.json"
    assert main(["eval", "--model", model, "--steps", "1", "--num", "16", "--out", str(result), "--no-progress"]) == 0
    assert math.isfinite(json.loads(result.read_text())["metrics"]["fid"])


def test_scd_student_starts_as_the_teacher_and_trains(tmp_path):
    run = tmp_path / "scd"
    assert main(["distill-scd", "--run-dir", str(run), "--steps", "1", *TINY]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["kind"] == "scd" and config["teacher"].endswith("digits-edm.safetensors")
    model = cmfast.load(run / "model.safetensors")
    assert isinstance(model, TrigFlowModel) and model.noise_cond == "edm"


def test_graph_and_bad_flags_are_refused(tmp_path, capsys):
    assert main(["distill-scd", "--run-dir", str(tmp_path / "g"), "--steps", "1", "--graph", *TINY]) == 2
    err = capsys.readouterr().err
    assert "--graph" in err and "jvp" in err and len(err.strip().splitlines()) == 1
    assert main(["train-sct", "--run-dir", str(tmp_path / "p"), "--p-std", "0", *TINY]) == 2
    assert "p_std" in capsys.readouterr().err


def test_fused_sct_trains_the_plain_runs_weights(sct_run, tmp_path):
    """--fused: the JVP through cmfast.ops (GroupNorm+SiLU) and the TrigFlow combination through
    cmfast.ops.trig_skip_out give the plain run's weights up to rounding."""
    fused = tmp_path / "fused"
    args = ["train-sct", "--run-dir", str(fused), "--steps", "3", "--tangent-warmup", "2", "--fused", *TINY]
    assert main(args) == 0
    plain, other = load_file(sct_run / "online.safetensors"), load_file(fused / "online.safetensors")
    assert plain.keys() == other.keys()
    for key in plain:
        assert (plain[key] - other[key]).abs().max() <= 1e-4, key
