"""The README's Python example runs as written, and its quick-start commands are the Makefile targets CI uses."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_examples_run(tmp_path, monkeypatch):
    """Every Python block runs as written; the API example's results are checked."""
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(tmp_path)
    api = None
    for block in blocks:
        namespace = {}
        exec(compile(block, "README.md", "exec"), namespace)
        if "x1" in namespace:
            api = namespace
    assert api is not None, "README lost its sampling example (x1, x2)"
    x1, x2, f, g = (api[k] for k in ("x1", "x2", "f", "g"))
    assert x1.shape == x2.shape == (8, 3, 16, 16)
    assert x1.abs().max() <= 1 and x2.abs().max() <= 1
    assert (tmp_path / "model.safetensors").exists()
    assert all((a == b).all() for a, b in zip(f.state_dict().values(), g.state_dict().values()))


def test_quick_start_commands_exist():
    quick = README.split("## Quick start", 1)[1].split("##", 1)[0]
    commands = re.findall(r"^make (\w+)", quick, flags=re.M)
    assert commands == ["demo", "test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in commands:
        assert re.search(rf"^{target}:", makefile, flags=re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()
