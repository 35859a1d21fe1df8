"""On a GPU the tests must run the compiled kernels: no test module may switch Triton to its
interpreter. Only the conftests choose it, and only where no GPU is present."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# Imports every test module (and the conftests) with torch.cuda.is_available() answering True and
# TRITON_INTERPRET unset, and reports after which import the variable appeared.
_PROBE = r"""
import importlib, json, os, sys
import torch
torch.cuda.is_available = lambda: True  # a GPU machine, as far as any import-time check can tell
sys.path[:0] = [sys.argv[1], os.path.join(sys.argv[1], "tests")]
found, failed = {}, {}
for name in sys.argv[2:]:
    try:
        importlib.import_module(name)
    except Exception as exc:  # a module that needs a real GPU at import: reported, not hidden
        failed[name] = f"{type(exc).__name__}: {exc}"[:300]
    found[name] = os.environ.get("TRITON_INTERPRET")
print(json.dumps({"found": found, "failed": failed}))
"""


def _modules() -> list[str]:
    names = ["tests.conftest"]
    if (REPO / "benchmarks" / "conftest.py").exists():
        names.append("benchmarks.conftest")
    for folder in ("tests", "benchmarks"):
        names += sorted(f"{folder}.{p.stem}" for p in (REPO / folder).glob("test_*.py"))
    return names


def test_no_test_module_sets_triton_interpret_when_cuda_is_available():
    names = _modules()
    assert "tests.test_attention" in names and "tests.test_vq" in names
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(REPO), *names], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not report["failed"], report["failed"]
    setters = [n for n, value in report["found"].items() if value is not None]
    # the first module after which the variable is set is the one that set it
    assert not setters, f"TRITON_INTERPRET set on a (faked) GPU machine by {setters[0]}"


def test_the_probe_sees_a_module_that_sets_it(tmp_path):
    """The check above can fail: a module that sets the variable at import is caught."""
    (tmp_path / "tests").mkdir()
    (tmp_path / "tests" / "test_bad.py").write_text('import os\nos.environ.setdefault("TRITON_INTERPRET", "1")\n')
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", _PROBE, str(tmp_path), "tests.test_bad"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert json.loads(proc.stdout.strip().splitlines()[-1])["found"] == {"tests.test_bad": "1"}


def test_host_triton_tests_are_skipped_where_kernels_are_compiled():
    """A test that runs the triton backend on CPU tensors (marked host_triton) cannot run without the
    interpreter: with TRITON_INTERPRET=0, as on a GPU, it is skipped instead of failing."""
    env = dict(os.environ, TRITON_INTERPRET="0")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist",
                           "tests/test_backends.py", "-k", "reaches_every_op or official_vq", "-rs"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "1 passed, 1 skipped" in proc.stdout and "needs the interpreter" in proc.stdout, proc.stdout[-2000:]
