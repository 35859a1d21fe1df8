"""The ops the model is built from, each with a ``torch`` reference and a ``triton`` backend.

Model code calls these functions with its backend name; it never launches a kernel itself.
"""
from __future__ import annotations

import torch

from .attention import VarlenLayout, attention, attention_varlen, concat_ranges, to_device
from .vq import duplicate_map, vq_nearest

# "auto" (the default): per shape, the fastest of "triton" and torch's kernels on this GPU, measured
# once (alit_fast.ops.auto); "torch" on a CPU.
# "official" re-creates the official implementation's kernels (nn.MultiheadAttention's math,
# the full N x K distance matrix): a baseline for benchmarks, not a fast path
BACKENDS: tuple[str, ...] = ("auto", "torch", "triton", "official")


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    return name


def check_backend_here(name: str, device: torch.device | None = None) -> str:
    """``check_backend``, and refuse at once the Triton backend where its kernels cannot run (no
    CUDA GPU on this machine, or a CPU ``device``, without TRITON_INTERPRET=1): otherwise the
    error would come from deep inside the first kernel launch, after the work before it."""
    check_backend(name)
    if name == "triton" and not _interpreting():
        on_cpu = device.type == "cpu" if device is not None else not torch.cuda.is_available()
        if on_cpu:
            raise ValueError("the Triton backend needs a CUDA GPU (or TRITON_INTERPRET=1, the slow CPU interpreter "
                             "for tests); use the 'torch' backend on a CPU")
    return name


def _interpreting() -> bool:
    from alit_fast.kernels._utils import is_interpreting  # no triton import: safe on any machine

    return is_interpreting()


__all__ = ["BACKENDS", "VarlenLayout", "attention", "attention_varlen", "concat_ranges", "to_device", "check_backend", "check_backend_here", "duplicate_map", "vq_nearest"]
