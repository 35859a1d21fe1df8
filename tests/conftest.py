import os

import pytest

# Triton kernels run in the interpreter where there is no GPU; this must be set before triton loads.
# Nowhere else: on a GPU the tests run the compiled kernels (tests/test_triton_interpret_env.py).
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "host_triton: runs the triton backend on CPU tensors, which only the Triton interpreter can do; "
        "skipped where the kernels are compiled (a GPU without TRITON_INTERPRET=1)",
    )


def pytest_collection_modifyitems(config, items):
    from alit_fast.kernels._utils import is_interpreting

    if is_interpreting():
        return
    skip = pytest.mark.skip(reason="triton backend on CPU tensors needs the interpreter; on a GPU the compiled "
                                   "kernels are checked by test_attention.py, test_vq.py and benchmarks.gpu_suite")
    for item in items:
        if item.get_closest_marker("host_triton"):
            item.add_marker(skip)
