"""Small configurations and inputs for tests, smoke runs and benchmarks at reduced sizes, and a
counter of host-device synchronisations.

``count_syncs`` counts, on any device, the calls that would make the host wait for a GPU: value
reads (``.item()``, ``bool()``/``int()``/``float()`` of a tensor, ``.tolist()``, ``.cpu()``,
``.numpy()``) and ops whose output size depends on the data (``nonzero``, ``unique``,
``masked_select``, boolean-mask indexing, ``repeat_interleave`` without an output size). On a CPU
none of them waits for anything, which is why they are counted rather than timed: the count a test
asserts on the CPU is the count a GPU run pays.
"""
from __future__ import annotations

import contextlib
from collections import Counter
from typing import Iterator

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from .config import ALITConfig, VAEConfig, VQGANConfig


def tiny_config(**changes) -> ALITConfig:
    """A model small enough for unit tests: 32x32 images, an 8x8 grid, 4 tokens per iteration."""
    base = ALITConfig(
        image_size=32,
        patch_size=4,
        width=64,
        layers=2,
        heads=2,
        tokens_per_iter=4,
        iterations=3,
        latent_dim=12,
        codebook_size=64,
        vqgan=VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=48),
    )
    return base.replace(**changes)


def tiny_vae_config(**changes) -> ALITConfig:
    """``tiny_config`` on a KL-VAE base: a 3-level VAE (32x32 -> 8x8), attention at the 8x8 level."""
    vae = VAEConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, embed_dim=6, attn_resolutions=(8,))
    return tiny_config(base_tokenizer="vae", halting_threshold=0.025, vae=vae).replace(**changes)


def random_images(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=g)


# ---------------------------------------------------------------------------- sync counting
_DATA_SIZED_OPS = {
    "_local_scalar_dense",
    "nonzero",
    "nonzero_static",  # fixed size, but kept here only when a size is not given (see below)
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "unique_dim_consecutive",
    "masked_select",
    "repeat_interleave",
    "argwhere",
}
_BOOL_INDEX_OPS = {"index", "index_put", "index_put_", "_index_put_impl_"}
_HOST_READS = {"tolist", "cpu", "numpy"}


class SyncCount(Counter):
    """What ``count_syncs`` saw: op or method name -> number of calls; ``total`` sums them."""

    def __init__(self) -> None:
        super().__init__()
        self.state = {"inside_host_read": False}

    @property
    def total(self) -> int:
        return sum(self.values())

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Count nothing inside: for host-resident reads that are no device sync on a GPU either
        (torch's AdamW, for one, keeps its step counters on the host and reads them each step)."""
        before = self.state["inside_host_read"]
        self.state["inside_host_read"] = True
        try:
            yield
        finally:
            self.state["inside_host_read"] = before


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: SyncCount, state: dict) -> None:
        super().__init__()
        self.counts = counts
        self.state = state

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name.split("::")[-1]
        if not self.state["inside_host_read"]:
            if name in _DATA_SIZED_OPS:
                if not (name == "repeat_interleave" and kwargs.get("output_size") is not None) and name != "nonzero_static":
                    self.counts[name] += 1
            elif name in _BOOL_INDEX_OPS and _has_bool_index(args):
                self.counts[f"{name}[bool mask]"] += 1
        return func(*args, **kwargs)


def _has_bool_index(args) -> bool:
    for a in args[1:2]:  # the indices list is the second argument of index / index_put
        if isinstance(a, (list, tuple)):
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in a)
    return False


class _FunctionCounter(TorchFunctionMode):
    def __init__(self, counts: SyncCount, state: dict) -> None:
        super().__init__()
        self.counts = counts
        self.state = state

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in _HOST_READS and args and isinstance(args[0], torch.Tensor) and not self.state["inside_host_read"]:
            # one read, however many element ops it takes underneath
            self.counts[f".{name}()"] += 1
            self.state["inside_host_read"] = True
            try:
                return func(*args, **kwargs)
            finally:
                self.state["inside_host_read"] = False
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs() -> Iterator[SyncCount]:
    """Count the synchronising calls made inside the ``with`` block (see the module docstring).

    ``item()`` is counted once, as the ``_local_scalar_dense`` it dispatches to."""
    counts = SyncCount()
    with _FunctionCounter(counts, counts.state), _DispatchCounter(counts, counts.state):
        yield counts
