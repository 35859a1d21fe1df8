"""Per-image stopping criteria for adaptive encoding.

After each iteration a criterion sees the images still being encoded (a ``StepView``) and says
which of them may stop. Criteria are objects, callables, or the strings the CLI takes:
``"tokens:64"``, ``"code-acc:0.9"``, ``"code-nll:1.5"``, ``"pixel-l1:0.05"``.

An image stops at the first iteration whose criterion holds (never before ``min_tokens``). One
that never meets it gets ``max_tokens`` (fallback "max"), or with fallback "best" the count whose
score was best (the official procedure's rule; only for criteria with a score: code-acc, code-nll,
pixel-l1). Comparisons: tokens ``>=``, code-acc ``>=``, code-nll ``<=``, pixel-l1 ``<`` (strict,
like the official threshold test).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from ..models import ALITCore as ALIT


def pixels_from_logits(model: "ALIT", logits: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] decoded from the soft code of decoder logits [B, g*g, K]."""
    return model.base_tokenizer.decode_latents(model.soft_code(logits)).clamp(0.0, 1.0)


def l1_per_image(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    return (images.float() - reconstructions.float()).abs().flatten(1).mean(1)


@dataclass
class StepView:
    """What a criterion sees after an iteration, for the images still being encoded (n rows)."""

    model: "ALIT"
    iteration: int
    num_tokens: int
    rows: torch.Tensor  # [n] positions of these images in the encoded batch
    gt_indices: torch.Tensor  # [n, g*g] the base tokenizer's codes
    images: torch.Tensor  # [n, 3, H, W]
    logits: torch.Tensor | None  # [n, g*g, K]; None for criteria that do not ask for them
    _pixels: torch.Tensor | None = field(default=None, repr=False)

    def reconstructions(self) -> torch.Tensor:
        """Pixel reconstructions from the soft code, decoded once however many criteria ask."""
        if self.logits is None:
            raise ValueError("this criterion needs logits: give it needs_logits = True")
        if self._pixels is None:
            self._pixels = pixels_from_logits(self.model, self.logits)
        return self._pixels


class Criterion:
    """Base class: ``__call__(view) -> bool [n]`` says which images may stop now."""

    # whether the decoder must run (the fixed-count criterion lets iterations skip it)
    needs_logits: bool = True
    # criteria with a per-image ``score(view)`` say which way is better; None: no score, so no
    # "best" fallback
    higher_is_better: bool | None = None

    def __call__(self, view: StepView) -> torch.Tensor:
        raise NotImplementedError

    def score(self, view: StepView) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} has no per-image score")


@dataclass
class TokenCount(Criterion):
    """Stop at the first iteration with at least ``tokens`` tokens."""

    tokens: int
    needs_logits = False

    def __call__(self, view: StepView) -> torch.Tensor:
        return torch.full((view.rows.numel(),), view.num_tokens >= self.tokens, dtype=torch.bool)


@dataclass
class CodeAccuracy(Criterion):
    """Stop once the fraction of grid cells whose argmax code is the base tokenizer's is >= threshold."""

    threshold: float
    higher_is_better = True

    def score(self, view: StepView) -> torch.Tensor:
        return (view.logits.argmax(-1) == view.gt_indices).float().mean(-1)

    def __call__(self, view: StepView) -> torch.Tensor:
        return self.score(view) >= self.threshold


@dataclass
class CodeNLL(Criterion):
    """Stop once the mean negative log-likelihood of the true codes is <= threshold."""

    threshold: float
    higher_is_better = False

    def score(self, view: StepView) -> torch.Tensor:
        logp = view.logits.float().log_softmax(-1)
        return -logp.gather(-1, view.gt_indices[..., None]).squeeze(-1).mean(-1)

    def __call__(self, view: StepView) -> torch.Tensor:
        return self.score(view) <= self.threshold


@dataclass
class PixelL1(Criterion):
    """The official criterion, per image: mean |x - x_hat| of the decoded soft code < threshold."""

    threshold: float
    higher_is_better = False

    def score(self, view: StepView) -> torch.Tensor:
        return l1_per_image(view.images, view.reconstructions())

    def __call__(self, view: StepView) -> torch.Tensor:
        return self.score(view) < self.threshold


class FunctionCriterion(Criterion):
    """A user callable ``fn(view) -> bool [n]`` (or anything ``torch.as_tensor`` makes one of)."""

    def __init__(self, fn: Callable[[StepView], object], needs_logits: bool = True) -> None:
        self.fn = fn
        self.needs_logits = needs_logits

    def __call__(self, view: StepView) -> torch.Tensor:
        met = torch.as_tensor(self.fn(view), dtype=torch.bool).reshape(-1)
        n = view.rows.numel()
        if met.numel() == 1 and n != 1:
            met = met.expand(n)
        if met.numel() != n:
            raise ValueError(f"a criterion callable returned {met.numel()} decisions for {n} images")
        return met

    def __repr__(self) -> str:
        return f"FunctionCriterion({getattr(self.fn, '__name__', self.fn)!r})"


_PARSERS: dict[str, Callable[[str], Criterion]] = {
    "tokens": lambda v: TokenCount(int(v)),
    "code-acc": lambda v: CodeAccuracy(float(v)),
    "code-nll": lambda v: CodeNLL(float(v)),
    "pixel-l1": lambda v: PixelL1(float(v)),
}


def parse_criterion(spec: "str | Criterion | Callable[[StepView], object]") -> Criterion:
    """A Criterion from an object, a callable, or a ``"name:value"`` string."""
    if isinstance(spec, Criterion):
        return spec
    if isinstance(spec, str):
        name, sep, value = spec.partition(":")
        name = name.strip().lower()
        if not sep or name not in _PARSERS:
            raise ValueError(f"unknown criterion {spec!r}; expected one of {[n + ':VALUE' for n in _PARSERS]}")
        try:
            return _PARSERS[name](value.strip())
        except ValueError as exc:
            raise ValueError(f"criterion {spec!r}: {value!r} is not a number") from exc
    if callable(spec):
        return FunctionCriterion(spec)
    raise TypeError(f"a criterion must be a Criterion, a callable or a string, got {type(spec).__name__}")


def criterion_name(criterion: Criterion) -> str:
    """The CLI spelling of a built-in criterion (for file metadata and summaries)."""
    for name, cls, attr in (
        ("tokens", TokenCount, "tokens"),
        ("code-acc", CodeAccuracy, "threshold"),
        ("code-nll", CodeNLL, "threshold"),
        ("pixel-l1", PixelL1, "threshold"),
    ):
        if type(criterion) is cls:
            return f"{name}:{getattr(criterion, attr)}"
    return repr(criterion)


__all__ = [
    "CodeAccuracy",
    "CodeNLL",
    "Criterion",
    "FunctionCriterion",
    "PixelL1",
    "StepView",
    "TokenCount",
    "criterion_name",
    "l1_per_image",
    "parse_criterion",
    "pixels_from_logits",
]
