"""The ops the model is built from, each with a ``torch`` reference and a ``triton`` backend.

Model code calls these functions with its backend name; it never launches a kernel itself.
"""
from __future__ import annotations

from .attention import attention
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


__all__ = ["BACKENDS", "attention", "check_backend", "duplicate_map", "vq_nearest"]
