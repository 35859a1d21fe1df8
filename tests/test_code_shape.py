"""Functions short enough to read at once: none in alit_fast/ is over 100 lines.

(The Triton kernels in kernels/ are not scanned: a kernel body is one unit the compiler sees.)"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 100


def _long_functions(files: list[Path]) -> list[str]:
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1  # signature, docstring and body; decorators aside
                if lines > LIMIT:
                    found.append(f"{path}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_in_the_package_is_over_100_lines():
    files = sorted((ROOT / "alit_fast").rglob("*.py"))
    assert len(files) > 30  # the scan sees the package
    assert _long_functions(files) == []


def test_the_scan_finds_a_101_line_method_and_passes_a_100_line_one(tmp_path):
    def source(lines: int) -> str:  # a method of ``lines`` lines, nested in a class
        body = "\n".join(f"        x{i} = {i}" for i in range(lines - 1))
        return f"class A:\n    def f(self):\n{body}\n"

    long, fine = tmp_path / "long.py", tmp_path / "fine.py"
    long.write_text(source(LIMIT + 1))
    fine.write_text(source(LIMIT))
    assert _long_functions([fine]) == []
    assert _long_functions([long]) == [f"{long}:2 f ({LIMIT + 1} lines)"]
