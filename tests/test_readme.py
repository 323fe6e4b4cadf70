"""The README's Python example runs as written, and its quick-start commands are the Makefile targets CI uses."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README, flags=re.S)
    assert blocks, "README has no Python example"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(blocks[0], "README.md", "exec"), namespace)
    x1, x2, f, g = (namespace[k] for k in ("x1", "x2", "f", "g"))
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
