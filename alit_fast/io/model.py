"""``ALIT``, the model users hold: the nn core (alit_fast.models) with adaptive encoding and
decoding (alit_fast.inference) and saving (alit_fast.io.weights) as methods.

It sits in the io layer because it is the one class that needs all three; each method is a
one-line call into the layer that owns the behaviour."""
from __future__ import annotations

import os
from typing import Callable, Iterable, Iterator

import torch

from ..inference import DEFAULT_CRITERION, Criterion, RolloutState, StepView, TokenBatch, compile_step, decode, encode, encode_stream, start
from ..inference.calibration import PixelL1Calibration
from ..models import ALITCore
from .repo import push_to_hub, save_pretrained
from .weights import save_model


class ALIT(ALITCore):
    """ALIT with its inference API. ``ALIT(config, backend)`` builds one with random weights;
    ``alit_fast.load`` reads one from a bundled name, a file, a directory or the Hub.

    ``recommended_criterion`` (a criterion string, or None) is the stopping criterion the model's
    file recommends, saved with it; ``encode`` uses it when no criterion is given."""

    recommended_criterion: str | None = None

    # what ``fast-pixel-l1`` stops on (alit_fast.inference.calibration); read from and saved to
    # the model file's metadata, made by ``alit-fast calibrate``
    pixel_l1_calibration: PixelL1Calibration | None = None

    def start(
        self, images: torch.Tensor, halting: str = "off", generator: torch.Generator | None = None, **kwargs
    ) -> RolloutState:
        """A resumable rollout: ``state.step()`` runs one more iteration for the images still active."""
        return start(self, images, halting=halting, generator=generator, **kwargs)

    def encode(
        self,
        images: torch.Tensor,
        criterion: "str | Criterion | Callable[[StepView], object] | None" = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        batch_size: int | None = None,
        **kwargs,
    ) -> TokenBatch:
        """Per-image adaptive-length code ids (a TokenBatch); see alit_fast.inference.encode. The
        default criterion is the model's ``recommended_criterion``, else ``DEFAULT_CRITERION``."""
        if criterion is None:
            criterion = self.default_criterion
        return encode(self, images, criterion, min_tokens=min_tokens, max_tokens=max_tokens, batch_size=batch_size, **kwargs)

    def encode_stream(
        self,
        images: Iterable[torch.Tensor],
        criterion: "str | Criterion | Callable[[StepView], object] | None" = None,
        min_tokens: int | None = None,
        max_tokens: int | None = None,
        batch_size: int = 32,
        **kwargs,
    ) -> Iterator[TokenBatch]:
        """``encode`` over a stream of images (each item [3, H, W] or [b, 3, H, W]) with
        continuous batching: ``batch_size`` slots kept busy; one TokenBatch per item, in order.
        See alit_fast.inference.stream."""
        if criterion is None:
            criterion = self.default_criterion
        return encode_stream(self, images, criterion, min_tokens=min_tokens, max_tokens=max_tokens,
                             batch_size=batch_size, **kwargs)

    @property
    def default_criterion(self) -> str:
        """The criterion ``encode`` uses when given none."""
        return self.recommended_criterion or DEFAULT_CRITERION

    def decode(self, tokens: TokenBatch, batch_size: int | None = None, check_config: bool = True) -> torch.Tensor:
        """Images in [0, 1] from a TokenBatch whose images may have different lengths."""
        return decode(self, tokens, batch_size=batch_size, check_config=check_config)

    def compile_step(self, **compile_kwargs) -> Callable:
        """The iteration step under ``torch.compile(fullgraph=True)``; pass it to ``encode`` /
        ``start`` as ``step_fn`` (encode then keeps static shapes)."""
        return compile_step(self, **compile_kwargs)

    def save(self, path: str | os.PathLike) -> None:
        """Save weights (official key layout) and config to a safetensors file."""
        save_model(self, path)

    def save_pretrained(
        self, directory: str | os.PathLike, *, repo_id: str | None = None, evaluation: dict | None = None,
        overwrite: bool = False,
    ) -> None:
        """Write a Hub-layout directory (model.safetensors, config.json, a model card);
        ``alit_fast.load(directory)`` reads it back."""
        save_pretrained(self, directory, repo_id=repo_id, evaluation=evaluation, overwrite=overwrite)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Upload to the Hugging Face Hub (needs huggingface_hub and a token); see io.repo.push_to_hub."""
        return push_to_hub(self, repo_id, **kwargs)
