"""Values derived from weights (normalized codebooks, duplicate-code maps, the decoder's queries),
computed once and kept until the weights change."""
from __future__ import annotations

from typing import Callable

import torch


def _key(t: torch.Tensor) -> tuple:
    # every in-place write through the tensor (an optimizer step, load_state_dict, a restart of
    # dead codes) bumps _version; .to() and to_empty() give new storage, so a new data_ptr
    return (t.data_ptr(), t._version, t.shape, t.stride(), t.dtype, t.device)


class WeightsCache:
    """``cache(*tensors)`` returns ``fn(*tensors)``, recomputed only when one of the tensors changed.

    The tensors it was computed from are kept alive, so their storage cannot be freed and reused at
    the same address by another tensor that would then look unchanged. Not used while
    torch.compile traces: there the value is simply computed, and the graph stays pure. Writes
    through ``.data`` do not bump ``_version``; weights must be changed in place under no_grad."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self._sources: tuple[torch.Tensor, ...] = ()
        self._keys: tuple | None = None
        self._value: torch.Tensor | None = None

    def __call__(self, *tensors: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return self.fn(*tensors)
        keys = tuple(_key(t) for t in tensors)
        if keys != self._keys:
            # ordinary tensors even when first asked inside inference_mode (encode's compute): a
            # cached inference tensor would fail a later forward that keeps a graph
            with torch.inference_mode(False), torch.no_grad():
                self._value = self.fn(*(t.detach() for t in tensors))
            self._sources = tuple(t.detach() for t in tensors)
            self._keys = keys
        return self._value
