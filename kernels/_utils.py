"""Small helpers shared by the Triton kernels (no triton import needed to use most of them).

Importing this module must stay safe on a CPU-only machine without TRITON_INTERPRET: nothing here
touches a GPU driver at import time.
"""
from __future__ import annotations

import os

import torch


def is_interpreting() -> bool:
    """True when Triton runs kernels through its CPU interpreter (TRITON_INTERPRET=1).

    Read at call time, not import time, so tests that set the variable late still see it (triton
    itself reads it when a kernel is first decorated, so it must be set before kernels are defined
    for the interpreter to actually be used).
    """
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def next_power_of_2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1); tl.arange needs power-of-two extents."""
    n = int(n)
    if n <= 1:
        return 1
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def can_launch(t: torch.Tensor) -> bool:
    """Whether a Triton kernel can run on ``t``: a GPU tensor, or any tensor under the interpreter."""
    return is_interpreting() or t.device.type in ("cuda", "xpu")


def gpu_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device, None elsewhere (CPU, interpreter, ROCm reports its own)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_capability(device)


def triton_dtype_is_supported(dtype: torch.dtype) -> bool:
    return dtype in (torch.float16, torch.bfloat16, torch.float32)


def _numpy_openblas():
    """ctypes handle of the OpenBLAS bundled with numpy, or None (best effort, never raises)."""
    try:
        import ctypes
        import glob

        import numpy

        libdir = os.path.join(os.path.dirname(numpy.__file__), os.pardir, "numpy.libs")
        for path in glob.glob(os.path.join(libdir, "*openblas*")):
            lib = ctypes.CDLL(path)
            for prefix in ("scipy_openblas", "openblas"):
                for suffix in ("64_", ""):
                    get = getattr(lib, f"{prefix}_get_num_threads{suffix}", None)
                    set_ = getattr(lib, f"{prefix}_set_num_threads{suffix}", None)
                    if get is not None and set_ is not None:
                        return get, set_
    except Exception:  # noqa: BLE001 - purely an optimisation
        pass
    return None


class single_threaded_interpreter:
    """Context manager: run torch and numpy's BLAS single-threaded while interpreting.

    The interpreter executes each tile op as a small numpy/torch call; on a few shared cores the
    BLAS thread pools then oversubscribe the machine and a test can run 10x slower. numpy is often
    imported (by pytest plugins) before a test can set OPENBLAS_NUM_THREADS, hence the runtime calls.
    Does nothing when not interpreting.
    """

    def __enter__(self):
        self._saved = None
        if not is_interpreting():
            return self
        blas = _numpy_openblas()
        self._saved = (torch.get_num_threads(), blas, blas[0]() if blas else None)
        torch.set_num_threads(1)
        if blas:
            blas[1](1)
        return self

    def __exit__(self, *exc):
        if self._saved is not None:
            threads, blas, blas_threads = self._saved
            torch.set_num_threads(threads)
            if blas and blas_threads:
                blas[1](blas_threads)
        return False
