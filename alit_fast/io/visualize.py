"""Pictures of what ALIT does, drawn with Pillow alone (no plotting library is needed):

- a token sheet per image: the input, its reconstruction at every token count, and the decoder's
  attention from the grid cells to each of the first K 1D tokens as heat maps over the image;
- for several images, all of them sorted by the token count a criterion chose, the count on each.

Heat maps follow the official notebook's drawing (token_visualization.ipynb in
github.com/ShivamDuggal4/adaptive-length-tokenizer @ 8c0b4ec): bilinear upsampling, min-max
normalised per panel, a jet colour map blended over the image at alpha 0.4; the token index is
the corrected one (see alit_fast.inference.attention_maps).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..inference.attention_maps import token_attention_maps
from ..models import ALITCore

Box = tuple[int, int, int, int]
LABEL_HEIGHT = 12
GAP = 2
BACKGROUND = (255, 255, 255)
ALPHA = 0.4


def jet(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB of the jet colour map (blue, cyan, yellow, red)."""
    v = np.clip(values, 0.0, 1.0)[..., None]
    knots = np.array([0.0, 0.125, 0.375, 0.625, 0.875, 1.0])
    colours = np.array([[0, 0, 0.5], [0, 0, 1], [0, 1, 1], [1, 1, 0], [1, 0, 0], [0.5, 0, 0]])
    rgb = np.stack([np.interp(v[..., 0], knots, colours[:, c]) for c in range(3)], axis=-1)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def heat_overlay(image: np.ndarray, heat: torch.Tensor, alpha: float = ALPHA) -> np.ndarray:
    """``heat`` [g, g] upsampled bilinearly to the image's size, min-max normalised, coloured and
    blended over ``image`` (uint8 [H, W, 3])."""
    H, W = image.shape[:2]
    up = F.interpolate(heat[None, None].double(), size=(H, W), mode="bilinear", align_corners=False)[0, 0]
    lo, hi = up.min(), up.max()
    norm = ((up - lo) / (hi - lo)) if float(hi - lo) > 0 else torch.zeros_like(up)
    colour = jet(norm.numpy()).astype(np.float64)
    return (image.astype(np.float64) * (1.0 - alpha) + colour * alpha + 0.5).astype(np.uint8)


def _uint8(image: torch.Tensor, scale: int) -> np.ndarray:
    """[3, h, w] in [0, 1] -> uint8 [h*scale, w*scale, 3], nearest-neighbour enlarged."""
    array = (image.detach().float().clamp(0, 1) * 255.0).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return array.repeat(scale, axis=0).repeat(scale, axis=1)


@dataclass
class Sheet:
    """A drawn picture and where each panel is in it (for readers and tests)."""

    image: Image.Image
    boxes: dict[tuple, Box] = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)
    maps: torch.Tensor | None = None  # the attention maps drawn, [B, K, g, g]


def _canvas(rows: list[list[tuple[np.ndarray, str]]], tag_rows: list[list[tuple]]) -> Sheet:
    font = ImageFont.load_default()
    width = max(sum(p.shape[1] + GAP for p, _ in row) for row in rows) + GAP
    height = sum(max(p.shape[0] for p, _ in row) + LABEL_HEIGHT + GAP for row in rows) + GAP
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    sheet = Sheet(canvas)
    y = GAP
    for row, tags in zip(rows, tag_rows):
        x = GAP
        for (panel, label), tag in zip(row, tags):
            draw.text((x, y), label, fill=(0, 0, 0), font=font)
            top = y + LABEL_HEIGHT
            canvas.paste(Image.fromarray(panel), (x, top))
            sheet.boxes[tag] = (x, top, x + panel.shape[1], top + panel.shape[0])
            x += panel.shape[1] + GAP
        y += max(p.shape[0] for p, _ in row) + LABEL_HEIGHT + GAP
    return sheet


@torch.no_grad()
def token_sheet(
    model: ALITCore,
    images: torch.Tensor,
    first: int = 8,
    layers: str | int = "mean",
    scale: int = 4,
    halting: str = "off",
) -> Sheet:
    """Per image two rows: [input | reconstruction at every token count], then the attention of the
    grid cells to each of the first ``first`` tokens (after the last iteration) over the input."""
    records = model.rollout(images, halting=halting)
    recon = [model.reconstruct(r.logits).clamp(0, 1) for r in records]
    maps = token_attention_maps(model, records[-1].z_q, first=first, layers=layers)
    per_iter = model.config.tokens_per_iter
    rows, tags = [], []
    for b in range(images.shape[0]):
        source = _uint8(images[b], scale)
        rows.append([(source, "input")] + [(_uint8(recon[t][b], scale), f"{per_iter * (t + 1)} tok") for t in range(len(recon))])
        tags.append([("input", b)] + [("recon", b, t) for t in range(len(recon))])
        rows.append([(heat_overlay(source, maps[b, j]), f"token {j}") for j in range(maps.shape[1])])
        tags.append([("attention", b, j) for j in range(maps.shape[1])])
    sheet = _canvas(rows, tags)
    sheet.maps = maps
    return sheet


def sorted_by_count(images: torch.Tensor, counts: list[int], scale: int = 4, columns: int = 8) -> Sheet:
    """The images ordered by their token counts (stable: ties keep input order), each labelled."""
    order = sorted(range(len(counts)), key=lambda i: counts[i])
    rows, tags = [], []
    for start in range(0, len(order), columns):
        chunk = order[start : start + columns]
        rows.append([(_uint8(images[i], scale), f"{counts[i]} tok") for i in chunk])
        tags.append([("sorted", i) for i in chunk])
    sheet = _canvas(rows, tags)
    sheet.counts = [counts[i] for i in order]
    return sheet


def stack(sheets: list[Sheet]) -> Sheet:
    """Sheets one under another in one picture; boxes keep their tags, moved."""
    width = max(s.image.width for s in sheets)
    height = sum(s.image.height for s in sheets)
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    out = Sheet(canvas)
    y = 0
    for s in sheets:
        canvas.paste(s.image, (0, y))
        out.boxes.update({tag: (x0, y0 + y, x1, y1 + y) for tag, (x0, y0, x1, y1) in s.boxes.items()})
        out.counts += s.counts
        y += s.image.height
    return out
