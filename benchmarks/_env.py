"""Import-time set-up shared by the pytest suite and the GPU script.

The GPU machine runs the suite from a bare source tree (``PYTHONPATH=.``, no ``pip install``), where
``alit_fast.kernels`` does not exist: setup.py maps that package onto the top-level ``kernels/``
folder, which only an installed (or editable) copy knows about.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# how alit_fast.kernels was found: "installed" (setup.py's mapping) or "source tree" (loaded here)
KERNELS_FROM = "not imported yet"


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def use_interpreter_if_no_gpu() -> None:
    # triton reads TRITON_INTERPRET when a kernel is decorated, so this must run before the first
    # kernel module is imported; an explicit setting (either way) is left alone
    if "TRITON_INTERPRET" not in os.environ and not _has_gpu():
        os.environ["TRITON_INTERPRET"] = "1"


def ensure_kernels_package() -> None:
    """Make ``alit_fast.kernels`` importable from a plain checkout, as setup.py's package_dir would."""
    import alit_fast

    global KERNELS_FROM
    if "alit_fast.kernels" in sys.modules or importlib.util.find_spec("alit_fast.kernels") is not None:
        KERNELS_FROM = "installed"
        return
    folder = REPO / "kernels"
    spec = importlib.util.spec_from_file_location(
        "alit_fast.kernels", folder / "__init__.py", submodule_search_locations=[str(folder)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load the kernels package from {folder}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["alit_fast.kernels"] = module
    spec.loader.exec_module(module)
    alit_fast.kernels = module
    KERNELS_FROM = "source tree"


def prepare() -> None:
    use_interpreter_if_no_gpu()
    ensure_kernels_package()
