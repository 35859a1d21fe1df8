"""A decode-free estimate of the pixel L1, fitted per model: what ``fast-pixel-l1:F`` stops on.

The pixel error of an iteration's reconstruction splits into what the base tokenizer cannot draw
at all and what ALIT's decoder still gets wrong. Two quantities the rollout has without any pixel
decode track those two parts:

- ``detail``: the mean |x - x averaged over each grid cell| of the image, the detail finer than
  the base tokenizer's grid (a flat image has none, noise the most). Once per image, from pixels.
- ``latent_error``: the mean |what the decoder hands the base decoder - the base encoder's own
  latents| over the grid: for the VQGAN variant the soft code (the codebook embedding expected
  under the decoder's distribution) against the VQGAN encoder's pre-quantization latents, for the
  VAE variant the predicted latents against the VAE's. After stage 2 the base encoder has moved
  with the decoder, so this compares two things that moved together (codes alone no longer do).

The estimate is ``a + b * detail + c * latent_error + d * detail * latent_error``, fitted by least
squares to the measured pixel L1 over every (image, iteration) pair of a calibration set, so its
value reads as a pixel L1 and takes the same thresholds. A model file stores it under the
``alit_fast.pixel_l1_calibration`` metadata key (``alit-fast calibrate`` writes it).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Iterable

import torch

if TYPE_CHECKING:
    from ..models import ALITCore

METADATA_KEY = "alit_fast.pixel_l1_calibration"
FORM = "a + b*detail + c*latent_error + d*detail*latent_error"
# thresholds whose decision agreement a calibration reports (the official default, the demo's)
REPORTED_THRESHOLDS = (0.05, 0.07, 0.1, 0.12)


@dataclass
class PixelL1Calibration:
    """The fitted estimate and how well it did on the calibration images."""

    coef: tuple[float, float, float, float]  # a, b, c, d of FORM
    cell: int  # pixels per grid cell side: the averaging window of ``detail``
    images: int = 0  # calibration images
    spearman: float = float("nan")  # estimate vs pixel L1 over (image, iteration) pairs
    # threshold -> share of images whose first count under it (or "never") is the pixel rule's
    agreement: dict[str, float] = field(default_factory=dict)
    data: str = ""  # what the calibration images were

    def predict(self, detail: torch.Tensor, latent_error: torch.Tensor) -> torch.Tensor:
        a, b, c, d = self.coef
        return a + b * detail + c * latent_error + d * detail * latent_error

    def to_json(self) -> str:
        fields = asdict(self)
        fields["spearman"] = None if math.isnan(self.spearman) else self.spearman  # strict JSON has no NaN
        return json.dumps({"form": FORM, **fields}, sort_keys=True, allow_nan=False)

    @classmethod
    def from_json(cls, text: str) -> "PixelL1Calibration":
        """Raise a ValueError naming what is wrong with a stored calibration."""
        try:
            raw = json.loads(text)
            if raw.get("form") != FORM:
                raise ValueError(f"it is of another form ({raw.get('form')!r}, this version reads {FORM!r})")
            coef = tuple(float(v) for v in raw["coef"])
            cell = int(raw["cell"])
            if len(coef) != 4 or not all(math.isfinite(v) for v in coef) or cell < 1:
                raise ValueError("it needs 4 finite coefficients and a cell size >= 1")
            return cls(coef=coef, cell=cell, images=int(raw.get("images", 0)), spearman=float(raw.get("spearman") or "nan"),
                       agreement={str(k): float(v) for k, v in raw.get("agreement", {}).items()}, data=str(raw.get("data", "")))
        except (TypeError, KeyError, AttributeError, json.JSONDecodeError) as exc:
            raise ValueError(f"the {METADATA_KEY} metadata cannot be read ({exc})") from exc


def model_calibration(model: "ALITCore") -> PixelL1Calibration:
    """The model's calibration, or a ValueError saying how to make one."""
    calibration = getattr(model, "pixel_l1_calibration", None)
    if calibration is None:
        raise ValueError("fast-pixel-l1 needs the model's pixel-L1 calibration, and this model has none: make one with "
                         "`alit-fast calibrate --checkpoint MODEL --data DIR --out CALIBRATED.safetensors`")
    return calibration


def image_detail(images: torch.Tensor, cell: int) -> torch.Tensor:
    """[n] mean |x - its cell's mean| per image (``images`` [n, 3, H, W], H and W multiples of ``cell``)."""
    n, channels, height, width = images.shape
    cells = images.float().reshape(n, channels, height // cell, cell, width // cell, cell)
    return (cells - cells.mean((3, 5), keepdim=True)).abs().flatten(1).mean(1)


def flat_latents(model: "ALITCore", z: torch.Tensor) -> torch.Tensor:
    """The base encoder's latents as decoder targets: [B, C, g, g] -> [B, g*g, C] (row-major cells)."""
    return z.flatten(2).transpose(1, 2) if z.dim() == 4 else z


def latent_error(model: "ALITCore", outputs: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """[n] mean |decoder output as the base decoder reads it - base latents [n, g*g, C]|."""
    predicted = outputs.float() if model.config.is_vae else model.soft_code(outputs).float()
    return (predicted - latents.float()).abs().flatten(1).mean(1)


def cell_size(model: "ALITCore") -> int:
    return model.config.image_size // model.config.grid_size


@torch.no_grad()
def measure(model: "ALITCore", batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per (iteration, image) on the calibration images: the pixel L1 of the clamped reconstruction
    (what ``pixel-l1`` scores), ``detail`` and ``latent_error``; each [iterations, N] float64."""
    cell = cell_size(model)
    pixel, detail, error = [], [], []
    for images in batches:
        images = model.model_images(images)
        base = model.encode_base(images)
        latents = flat_latents(model, base.z)
        d = image_detail(images, cell)
        records = model.rollout(images, halting="off", base=base)
        pixel.append(torch.stack([
            (images.float() - model.reconstruct(r.logits).clamp(0, 1).float()).abs().flatten(1).mean(1) for r in records]))
        error.append(torch.stack([latent_error(model, r.logits, latents) for r in records]))
        detail.append(d.expand(len(records), -1))
    return {k: torch.cat(v, 1).double().cpu() for k, v in (("pixel", pixel), ("detail", detail), ("latent_error", error))}


def first_under(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """[N] the first iteration whose value is < threshold per column of [iterations, N], else -1."""
    under = values < threshold
    first = under.double().argmax(0)
    return torch.where(under.any(0), first, torch.full_like(first, -1))


def fit(measured: dict[str, torch.Tensor], cell: int, data: str = "") -> PixelL1Calibration:
    """Least squares of the pixel L1 on FORM's terms over every (image, iteration) pair."""
    y, det, lat = (measured[k].reshape(-1) for k in ("pixel", "detail", "latent_error"))
    terms = torch.stack([torch.ones_like(y), det, lat, det * lat], 1)
    coef = torch.linalg.lstsq(terms, y[:, None]).solution[:, 0]
    calibration = PixelL1Calibration(coef=tuple(float(v) for v in coef), cell=cell, images=int(measured["pixel"].shape[1]), data=data)
    predicted = calibration.predict(measured["detail"], measured["latent_error"])
    calibration.spearman = rank_correlation(predicted.reshape(-1), measured["pixel"].reshape(-1))
    calibration.agreement = {
        str(t): float((first_under(predicted, t) == first_under(measured["pixel"], t)).double().mean()) for t in REPORTED_THRESHOLDS
    }
    return calibration


def rank_correlation(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation of two 1D tensors (ties get their mean rank)."""
    def ranks(v: torch.Tensor) -> torch.Tensor:
        order = torch.argsort(v, stable=True)
        r = torch.empty_like(v, dtype=torch.float64)
        r[order] = torch.arange(v.numel(), dtype=torch.float64)
        values, inverse = torch.unique(v, return_inverse=True)
        mean_rank = torch.zeros(values.numel(), dtype=torch.float64).index_add_(0, inverse, r)
        mean_rank /= torch.bincount(inverse, minlength=values.numel()).double()
        return mean_rank[inverse]

    rx, ry = ranks(x.double()), ranks(y.double())
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denominator = float((rx.square().sum() * ry.square().sum()).sqrt())
    return float((rx * ry).sum()) / denominator if denominator > 0 else float("nan")
