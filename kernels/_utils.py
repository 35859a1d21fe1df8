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
