"""The machinery of bench/quality_digits.py (train, tune, evaluate, plot, report) with a budget of a few steps."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch_fidelity")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "quality_digits.py"


@pytest.fixture(scope="module")
def quality_digits():
    spec = importlib.util.spec_from_file_location("quality_digits", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["quality_digits"] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    del sys.modules["quality_digits"]


def test_tiny_run_writes_the_report(tmp_path, quality_digits, capsys):
    out, doc, figdir = tmp_path / "run", tmp_path / "results-digits.md", tmp_path / "fig"
    result = quality_digits.run("tiny", out, doc, figdir)
    rows = result["rows"]
    assert [(r["name"], r["steps"]) for r in rows] == [("edm", 1), ("edm", 2)] + [
        (s.name, n) for s in quality_digits.STUDENTS for n in (1, 2, 3)
    ]
    assert [r["evaluations"] for r in rows[:5]] == [1, 3, 1, 2, 3]
    for r in rows[2:]:  # students: one step from sigma_max, tuned ts for 2 and 3 steps
        if r["steps"] == 1:
            assert r["sigmas"] == [80.0, 0.002] and "ts" not in r
            continue
        assert r["ts"][0] == 0 and r["ts"][-1] == 5 and len(r["ts"]) == r["steps"] + 1
    assert json.loads((out / "results.json").read_text())["rows"] == rows
    text = doc.read_text()
    assert "| CD (LPIPS) | Algorithm 1 | 2 | 2 | ts 0," in text and "RANDOMLY INITIALISED AlexNet" in text
    assert "cmfast tune-steps --model" in text and "TORCH_HOME=" in text
    for png in ("fid-vs-nfe.png", "samples.png"):
        assert (figdir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fig/fid-vs-nfe.png" in text
    doc.unlink()
    quality_digits.report_only(out, doc, figdir)
    assert doc.read_text() == text
    capsys.readouterr()
    quality_digits.train(quality_digits.Runner(out, False), out, quality_digits.BUDGETS["tiny"])
    assert capsys.readouterr().out.count("reusing") == 5  # finished runs are not trained again
