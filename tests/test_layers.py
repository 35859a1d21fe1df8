"""The package's layers import only downward, and no module imports itself back through others.

Every import counts, including those inside functions and under ``if TYPE_CHECKING``: a cycle
hidden in a function body is still a cycle a reader has to untangle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "alit_fast"
KERNELS = ROOT / "kernels"

# lower number = lower layer; a module may import its own layer's modules or lower ones
LAYERS = {
    "alit_fast.kernels": 0,
    "alit_fast.config": 1,
    "alit_fast.testing": 1,
    "alit_fast.files": 1,  # atomic file writes: a leaf every writer may use
    "alit_fast.errors": 2.5,  # UsageError, the one-line parser (it refuses a backend that cannot run here) and run_command
    "alit_fast.distributed": 1,  # torchrun's rank, device and process group: a leaf every command may use
    "alit_fast.ops": 2,
    "alit_fast.models": 3,
    "alit_fast.inference": 4,
    "alit_fast.io": 5,
    "alit_fast.evaluation": 5.5,  # metrics and the evaluation pass: loads models and images (io)
    "alit_fast.training": 6,
    "alit_fast.cli": 7,
    # `python -m alit_fast.train` / `-m alit_fast.train_vqgan`: entry points, like the CLI
    "alit_fast.train": 7,
    "alit_fast.train_vqgan": 7,
    "alit_fast.evaluate": 7,  # `python -m alit_fast.evaluate`
    "alit_fast": 8,  # the package root: the public API, re-exports only
}


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    for path in sorted(KERNELS.glob("*.py")):
        name = "alit_fast.kernels" + ("" if path.stem == "__init__" else f".{path.stem}")
        found[name] = path
    return found


def _layer(module: str) -> tuple[str, int]:
    best = max((prefix for prefix in LAYERS if module == prefix or module.startswith(prefix + ".")), key=len)
    return best, LAYERS[best]


def _imports(module: str, path: Path, known: set[str]) -> set[str]:
    """The alit_fast modules ``module`` imports, wherever in the file the import stands."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [prefix] + [f"{prefix}.{alias.name}" for alias in node.names]
        for name in names:
            if not name.startswith("alit_fast"):
                continue
            # the longest known module the name refers to (``from .x import y`` may name a function y)
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
    return targets


GRAPH = {name: _imports(name, path, set(_modules())) for name, path in _modules().items()}


@pytest.mark.parametrize("module", sorted(GRAPH))
def test_module_imports_only_its_own_layer_or_lower(module):
    own, level = _layer(module)
    upward = []
    for target in sorted(GRAPH[module]):
        if module.startswith(target + ".") and target != "alit_fast":
            continue  # a submodule's import of its own package's __init__ (re-exports of the same layer)
        other, other_level = _layer(target)
        if other_level > level:
            upward.append(f"{target} ({other}, layer {other_level})")
    assert not upward, f"{module} ({own}, layer {level}) imports upward: {upward}"


def test_no_import_cycles():
    # a cycle through package __init__ re-exports is still a cycle
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if module_is_parent(node, nxt):
                continue
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(GRAPH):
        if node not in state:
            visit(node)
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def module_is_parent(module: str, target: str) -> bool:
    """Python imports a package's __init__ before its submodules; that edge is not a dependency."""
    return module.startswith(target + ".")


def test_the_layer_table_covers_every_module():
    assert "alit_fast.models.alit" in GRAPH and "alit_fast.kernels.attention" in GRAPH
    for module in GRAPH:
        _layer(module)  # raises for a module outside every layer


def test_the_check_sees_function_local_imports(tmp_path):
    path = tmp_path / "mod.py"
    path.write_text("def f():\n    from ..io import load\n    return load\n")
    assert _imports("alit_fast.models.mod", path, {"alit_fast.io", "alit_fast.models"}) == {"alit_fast.io"}
