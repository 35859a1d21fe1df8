"""Per-image stopping criteria for adaptive encoding.

After each iteration a criterion sees the images still being encoded (a ``StepView``) and says
which of them may stop. Criteria are objects, callables, or the strings the CLI takes:
``"tokens:64"``, ``"code-acc:0.9"``, ``"code-nll:1.5"``, ``"pixel-l1:0.05"``, for the VAE
variant (whose decoder regresses latents: no codes to score) ``"code-mae:0.05"``, and
``"fast-pixel-l1:0.07"``: the pixel criterion's threshold on the model's decode-free estimate of
the pixel L1 (alit_fast.inference.calibration; the model needs a calibration).

An image stops at the first iteration whose criterion holds (never before ``min_tokens``). One
that never meets it gets ``max_tokens`` (fallback "max"), or with fallback "best" the count whose
score was best (the official procedure's rule; only for criteria with a score: code-acc, code-nll,
code-mae, pixel-l1, fast-pixel-l1). Comparisons: tokens ``>=``, code-acc ``>=``, code-nll and code-mae
``<=``, pixel-l1 and fast-pixel-l1 ``<`` (strict, like the official threshold test).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

import math

import torch

from .calibration import flat_latents, image_detail, latent_error, model_calibration

if TYPE_CHECKING:
    from ..models import ALITCore as ALIT


def pixels_from_logits(model: "ALIT", logits: torch.Tensor) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] decoded from the soft code of decoder logits [B, g*g, K]
    (VAE variant: from the predicted latents, see ``ALITCore.reconstruct``)."""
    return model.reconstruct(logits).clamp(0.0, 1.0)


def l1_per_image(images: torch.Tensor, reconstructions: torch.Tensor) -> torch.Tensor:
    return (images.float() - reconstructions.float()).abs().flatten(1).mean(1)


@dataclass
class StepView:
    """What a criterion sees after an iteration, for the images still being encoded (n rows)."""

    model: "ALIT"
    # the step's iteration and token count; in a continuous batch (encode_stream), whose rows are
    # at different counts, int64 tensors [n] per row (a comparison like ``num_tokens >= 16`` works
    # on either)
    iteration: "int | torch.Tensor"
    num_tokens: "int | torch.Tensor"
    rows: torch.Tensor  # [n] positions of these images in the encoded batch
    gt_indices: torch.Tensor  # [n, g*g] the base tokenizer's codes
    images: torch.Tensor  # [n, 3, H, W]
    logits: torch.Tensor | None  # [n, g*g, K]; None for criteria that do not ask for them
    # [n, g*g, C] the base encoder's latents (VQGAN: before quantization); None: computed on demand
    latents: torch.Tensor | None = None
    _pixels: torch.Tensor | None = field(default=None, repr=False)

    def reconstructions(self) -> torch.Tensor:
        """Pixel reconstructions from the soft code, decoded once however many criteria ask."""
        if self.logits is None:
            raise ValueError("this criterion needs logits: give it needs_logits = True")
        if self._pixels is None:
            self._pixels = pixels_from_logits(self.model, self.logits)
        return self._pixels

    def base_latents(self) -> torch.Tensor:
        """The base encoder's latents of these images [n, g*g, C] (the VAE's are its target)."""
        if self.latents is None:
            if self.model.config.is_vae:
                self.latents = self.gt_indices
            else:
                self.latents = flat_latents(self.model, self.model.encode_base(self.images).z)
        return self.latents


def _check_threshold(name: str, value: float, lo: float, hi: float, low_open: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value > lo if low_open else value >= lo) and value <= hi
    if not ok:
        lo_text = f"({lo}" if low_open else f"[{lo}"
        hi_text = "inf)" if math.isinf(hi) else f"{hi}]"
        raise ValueError(f"{name}:{value}: the threshold must be a finite number in {lo_text}, {hi_text}")


class Criterion:
    """Base class: ``__call__(view) -> bool [n]`` says which images may stop now."""

    # whether the decoder must run (the fixed-count criterion lets iterations skip it)
    needs_logits: bool = True
    # whether it reads ``StepView.base_latents()`` (encode then hands them over instead of recomputing)
    needs_latents: bool = False
    # criteria with a per-image ``score(view)`` say which way is better; None: no score, so no
    # "best" fallback
    higher_is_better: bool | None = None
    # the base tokenizers whose decoder outputs the criterion can read
    bases: tuple[str, ...] = ("vqgan", "vae")

    def __call__(self, view: StepView) -> torch.Tensor:
        return self.meets(self.score(view))

    def score(self, view: StepView) -> torch.Tensor:
        raise TypeError(f"{type(self).__name__} has no per-image score")

    def meets(self, score: torch.Tensor) -> torch.Tensor:
        """bool [n]: which scores meet the criterion (for criteria that decide on their score)."""
        raise NotImplementedError

    def judge(self, view: StepView, with_score: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(which images may stop, their scores when ``with_score``): a criterion that decides on
        its score computes it once for both."""
        # a criterion that decides otherwise (no ``meets``, or its own ``__call__``, perhaps in a
        # subclass of a built-in one) is asked as it says
        if type(self).meets is Criterion.meets or type(self).__call__ is not Criterion.__call__:
            return self(view), (self.score(view) if with_score else None)
        score = self.score(view)
        return self.meets(score), score

    # with fallback "best", whether an image ``never_met`` rules out may take the last count as its
    # best without being scored (then its decoder is skipped under "best" too)
    last_is_best_when_never_met: bool = False

    def never_met(self, model: "ALIT", images: torch.Tensor) -> torch.Tensor | None:
        """bool [n]: images this criterion can be met for at no token count, known from the images
        alone (encode then skips their decoder); None: no such knowledge."""
        return None


@dataclass
class TokenCount(Criterion):
    """Stop at the first iteration with at least ``tokens`` tokens."""

    tokens: int
    needs_logits = False

    def __post_init__(self) -> None:
        if isinstance(self.tokens, bool) or not isinstance(self.tokens, int) or self.tokens < 1:
            raise ValueError(f"tokens:{self.tokens}: the token count must be a whole number >= 1")

    def __call__(self, view: StepView) -> torch.Tensor:
        return torch.full((view.rows.numel(),), view.num_tokens >= self.tokens, dtype=torch.bool)


@dataclass
class CodeAccuracy(Criterion):
    """Stop once the fraction of grid cells whose argmax code is the base tokenizer's is >= threshold."""

    threshold: float
    higher_is_better = True
    bases = ("vqgan",)

    def __post_init__(self) -> None:
        _check_threshold("code-acc", self.threshold, 0.0, 1.0)

    def score(self, view: StepView) -> torch.Tensor:
        return (view.logits.argmax(-1) == view.gt_indices).float().mean(-1)

    def meets(self, score: torch.Tensor) -> torch.Tensor:
        return score >= self.threshold


@dataclass
class CodeNLL(Criterion):
    """Stop once the mean negative log-likelihood of the true codes is <= threshold."""

    threshold: float
    higher_is_better = False
    bases = ("vqgan",)

    def __post_init__(self) -> None:
        _check_threshold("code-nll", self.threshold, 0.0, math.inf)

    def score(self, view: StepView) -> torch.Tensor:
        logp = view.logits.float().log_softmax(-1)
        return -logp.gather(-1, view.gt_indices[..., None]).squeeze(-1).mean(-1)

    def meets(self, score: torch.Tensor) -> torch.Tensor:
        return score <= self.threshold


@dataclass
class CodeMAE(Criterion):
    """VAE variant: stop once the mean |predicted - VAE latent| over the grid is <= threshold
    (per cell, the quantity the VAE's halting compares with 0.025)."""

    threshold: float
    higher_is_better = False
    bases = ("vae",)

    def __post_init__(self) -> None:
        _check_threshold("code-mae", self.threshold, 0.0, math.inf)

    def score(self, view: StepView) -> torch.Tensor:
        return (view.logits.float() - view.gt_indices.float()).abs().flatten(1).mean(1)

    def meets(self, score: torch.Tensor) -> torch.Tensor:
        return score <= self.threshold


@dataclass
class PixelL1(Criterion):
    """The official criterion, per image: mean |x - x_hat| of the decoded soft code < threshold."""

    threshold: float
    higher_is_better = False

    def __post_init__(self) -> None:
        # strict "<": a threshold of 0 could never be met
        _check_threshold("pixel-l1", self.threshold, 0.0, 1.0, low_open=True)

    def score(self, view: StepView) -> torch.Tensor:
        return l1_per_image(view.images, view.reconstructions())

    def meets(self, score: torch.Tensor) -> torch.Tensor:
        return score < self.threshold


@dataclass
class FastPixelL1(Criterion):
    """``pixel-l1`` without the pixel decode: the same threshold on the model's calibrated
    estimate of the pixel L1 from the image's sub-grid detail and the decoder's latent error
    (alit_fast.inference.calibration). Works for both base tokenizers, after stage 1 or 2.

    An image whose detail alone puts the estimate at or above the threshold (``never_met``) runs
    without the decoder after the first judged count and gets the last count, with fallback
    "best" too (there, an approximation of its lowest estimate: see below)."""

    threshold: float
    higher_is_better = False
    needs_latents = True
    # out of reach, the estimate moves with the latent error alone, which falls with the count: on
    # the demo model's validation images the estimate was lowest at the last count for 98% of such
    # images with max_tokens 48 (66% at 64, within 1e-4 of the lowest pixel L1 on average)
    last_is_best_when_never_met = True

    def __post_init__(self) -> None:
        _check_threshold("fast-pixel-l1", self.threshold, 0.0, 1.0, low_open=True)

    def score(self, view: StepView) -> torch.Tensor:
        calibration = model_calibration(view.model)
        detail = image_detail(view.images, calibration.cell)
        return calibration.predict(detail, latent_error(view.model, view.logits, view.base_latents()))

    def meets(self, score: torch.Tensor) -> torch.Tensor:
        return score < self.threshold

    def never_met(self, model: "ALIT", images: torch.Tensor) -> torch.Tensor:
        # the estimate is floor + slope * latent_error with latent_error >= 0: where the slope is
        # not negative it never falls below the floor, the part that the image's detail alone sets
        a, b, c, d = model_calibration(model).coef
        detail = image_detail(images, model_calibration(model).cell)
        return (c + d * detail >= 0) & (a + b * detail >= self.threshold)


class FunctionCriterion(Criterion):
    """A user callable ``fn(view) -> bool [n]`` (or anything ``torch.as_tensor`` makes one of)."""

    def __init__(self, fn: Callable[[StepView], object], needs_logits: bool = True) -> None:
        self.fn = fn
        self.needs_logits = needs_logits

    def __call__(self, view: StepView) -> torch.Tensor:
        raw = self.fn(view)
        try:
            answer = torch.as_tensor(raw)
        except (TypeError, ValueError, RuntimeError) as exc:  # None, a string, an object
            raise TypeError(f"a criterion callable must return bools (one per image), got a "
                            f"{type(raw).__name__}") from exc
        if answer.dtype != torch.bool:
            # a float score cast to bool would stop every image with a nonzero score
            raise ValueError(f"a criterion callable must return bools (one per image), got {answer.dtype}")
        met = answer.reshape(-1)
        n = view.rows.numel()
        if met.numel() == 1 and n != 1:
            met = met.expand(n)
        if met.numel() != n:
            raise ValueError(f"a criterion callable returned {met.numel()} decisions for {n} images")
        return met

    def __repr__(self) -> str:
        return f"FunctionCriterion({getattr(self.fn, '__name__', self.fn)!r})"


# what encode uses when not told: the official encode API's rule and threshold. It reads pixels,
# so it fits both base tokenizers and models after stage 2, whose codes no longer track the
# VQGAN's (a code criterion, faster since it needs no pixel decode, is for stage-1 VQGAN models)
DEFAULT_CRITERION = "pixel-l1:0.07"

# name -> (criterion class, how its value is read: int("7.5") raises, a count is whole)
_PARSERS: dict[str, tuple[type, Callable[[str], float]]] = {
    "tokens": (TokenCount, int),
    "code-acc": (CodeAccuracy, float),
    "code-nll": (CodeNLL, float),
    "code-mae": (CodeMAE, float),
    "pixel-l1": (PixelL1, float),
    "fast-pixel-l1": (FastPixelL1, float),
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
        cls, read = _PARSERS[name]
        try:
            number = read(value.strip())
        except ValueError as exc:
            kind = "a whole number" if read is int else "a number"
            raise ValueError(f"criterion {spec!r}: {value.strip()!r} is not {kind}") from exc
        return cls(number)  # which checks the range, in its own words
    if callable(spec):
        return FunctionCriterion(spec)
    raise TypeError(f"a criterion must be a Criterion, a callable or a string, got {type(spec).__name__}")


def criterion_name(criterion: Criterion) -> str:
    """The CLI spelling of a built-in criterion (for file metadata and summaries)."""
    for name, cls, attr in (
        ("tokens", TokenCount, "tokens"),
        ("code-acc", CodeAccuracy, "threshold"),
        ("code-nll", CodeNLL, "threshold"),
        ("code-mae", CodeMAE, "threshold"),
        ("pixel-l1", PixelL1, "threshold"),
        ("fast-pixel-l1", FastPixelL1, "threshold"),
    ):
        if type(criterion) is cls:
            return f"{name}:{getattr(criterion, attr)}"
    return repr(criterion)


__all__ = [
    "DEFAULT_CRITERION",
    "CodeAccuracy",
    "CodeMAE",
    "CodeNLL",
    "Criterion",
    "FastPixelL1",
    "FunctionCriterion",
    "PixelL1",
    "StepView",
    "TokenCount",
    "criterion_name",
    "l1_per_image",
    "parse_criterion",
    "pixels_from_logits",
]
