"""The package's import graph, read from the source with `ast`: no cycles, no import hidden inside a function, and
each layer imports only from the layers below it (math <- kernels <- ops <- networks <- models and checkpoints <-
engine <- generate, training, editing, evaluation <- cli)."""

import ast
from pathlib import Path

import pytest

import cmfast

ROOT = Path(cmfast.__file__).resolve().parent
OPTIONAL = {"cmfast._C"}  # the compiled extension, loaded only where it was built


def _module_name(path: Path) -> str:
    parts = ["cmfast", *path.relative_to(ROOT).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name a relative `from ... import` in `module` refers to."""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - node.level + 1] if node.level else []
    return ".".join([*base, *([node.module] if node.module else [])])


def _imports(module: str) -> list[tuple[str, bool]]:
    """(imported cmfast module, whether the import sits inside a function) for every import in `module`."""
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    nested = {id(n) for f in functions for n in ast.walk(f) if n is not f}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(module, path.name == "__init__.py", node)
            names = [f"{target}.{a.name}" if f"{target}.{a.name}" in MODULES | {n: 0 for n in OPTIONAL} else target
                     for a in node.names]  # fmt: skip
        else:
            continue
        found += [(n, id(node) in nested) for n in names if n == "cmfast" or n.startswith("cmfast.")]
    return found


GRAPH = {m: sorted({n for n, _ in _imports(m) if n in MODULES and n != m}) for m in MODULES}


def test_the_graph_is_read():
    assert "cmfast.ops" in GRAPH["cmfast.networks.adm"]
    assert "cmfast.generate" in GRAPH["cmfast.cli.sample"]
    assert len(MODULES) > 30


def test_no_import_cycle():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in GRAPH[m]:
            if state.get(n) == 1:
                cycle = path[path.index(n) :] + [n]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if n not in state:
                visit(n, [*path, n])
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m, [m])


def test_no_cmfast_import_inside_a_function():
    hidden = [f"{m} imports {n}" for m in MODULES for n, inside in _imports(m) if inside and n not in OPTIONAL]
    assert not hidden, "imports hidden inside functions: " + "; ".join(hidden)


LAYERS = [  # (layer, module prefixes); a module may import its own layer and those listed before it
    ("math", ["cmfast.preconditioning", "cmfast.sampling", "cmfast.training.schedules"]),
    ("kernels", ["cmfast.kernels"]),
    ("ops", ["cmfast.ops"]),
    ("networks", ["cmfast.networks"]),
    ("models", ["cmfast.checkpoint", "cmfast.graphs", "cmfast.interop.diffusers_layout"]),
    ("engine", ["cmfast.engine"]),
    (
        "work",
        [
            "cmfast.generate",
            "cmfast.training",
            "cmfast.editing",
            "cmfast.masks",
            "cmfast.evaluation",
            "cmfast.pipeline",
            "cmfast.interop.accelerate",
        ],
    ),
    ("cli", ["cmfast.cli"]),
]


def _layer(module: str) -> int | None:
    best = None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and (best is None or len(p) > best[1]):
                best = (i, len(p))
    return None if best is None else best[0]


def test_layers_import_downwards():
    upward = []
    for m, targets in GRAPH.items():
        for n in targets:
            lm, ln = _layer(m), _layer(n)
            if lm is not None and ln is not None and ln > lm:
                upward.append(f"{m} ({LAYERS[lm][0]}) imports {n} ({LAYERS[ln][0]})")
    assert not upward, "; ".join(upward)
