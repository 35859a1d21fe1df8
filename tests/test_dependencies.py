"""setup.py's install_requires is what the package imports: nothing listed goes unused, and
every package imported when a module loads is listed (optional ones are imported where used)."""
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULE_OF = {"pillow": "PIL"}  # distribution name -> import name, where they differ


def _required() -> set[str]:
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.keyword) and n.arg == "install_requires")
    names = set()
    for item in call.value.elts:
        dist = item.value.split(">")[0].split("=")[0].split("<")[0].strip().lower()
        names.add(MODULE_OF.get(dist, dist))
    return names


def _third_party(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names = [node.module]
    else:
        return []
    tops = [n.split(".")[0] for n in names]
    return [t for t in tops if t not in sys.stdlib_module_names and t != "alit_fast"]


def _sources() -> list[Path]:
    return sorted([*(ROOT / "alit_fast").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")])


def test_every_required_package_is_imported():
    imported = {name for path in _sources() for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
                for name in _third_party(node)}
    assert _required() - imported == set()


def test_every_package_a_module_imports_as_it_loads_is_required():
    at_load = {}
    for path in _sources():
        for node in ast.parse(path.read_text(encoding="utf-8")).body:  # module level, not inside functions
            for name in _third_party(node):
                at_load.setdefault(name, str(path.relative_to(ROOT)))
    missing = {name: where for name, where in at_load.items() if name not in _required()}
    assert missing == {}
