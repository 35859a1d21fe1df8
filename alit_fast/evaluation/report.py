"""The evaluation report on disk: ``metrics.json`` (settings and one row per token count and per
criterion), ``metrics.md`` (the same as a table) and ``curves.png`` (each metric against the token
count; adaptive rows as points). The plot uses matplotlib when it is installed and Pillow (always
there) otherwise."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from PIL import Image, ImageDraw

from ..files import write_atomic
from .run import EvalReport

LOWER_IS_BETTER = {"l1": True, "l2": True, "psnr": False, "ssim": False, "lpips": True, "fid": True}
FORMATS = {"l1": "{:.4f}", "l2": "{:.5f}", "psnr": "{:.2f}", "ssim": "{:.4f}", "lpips": "{:.4f}", "fid": "{:.3f}"}


def _fmt(name: str, value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return FORMATS.get(name, "{:.4g}").format(value)


def markdown(report: EvalReport) -> str:
    metrics = [m for m in report.settings.get("metrics", []) if any(m in r.metrics for r in report.rows)]
    s = report.settings
    lines = [
        f"{report.images} images, {report.seconds:.1f} s ({report.images / max(report.seconds, 1e-9):.1f} images/s), "
        f"world size {s.get('world_size', 1)}, {s.get('device')}, {s.get('dtype')}",
        f"halting {s.get('halting')}" + (f" (seed {s.get('seed')}: stochastic, as the official evaluation)"
                                         if not s.get("deterministic") else " (deterministic)")
        + f"; crop {s.get('crop')}; uint8 truncation {'on' if s.get('quantize_uint8') else 'off'}"
        + (f"; FID {s.get('fid_method')}" if s.get("fid_method") else ""),
        "",
    ]
    arrows = {m: ("↓" if LOWER_IS_BETTER[m] else "↑") for m in metrics}
    header = ["row", "tokens"] + [f"{m.upper()} {arrows[m]}" for m in metrics] + ["images"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "---|" * len(header))
    for r in report.rows:
        tokens = f"{int(r.tokens)}" if r.kind == "fixed" else f"{r.tokens:.1f} (mean)"
        cells = [r.name, tokens] + [_fmt(m, r.metrics.get(m)) for m in metrics] + [str(r.images)]
        lines.append("| " + " | ".join(cells) + " |")
    notes = []
    if any(r.psnr_exact_images for r in report.rows):
        notes.append("PSNR averages the images not reconstructed exactly; the exact ones (infinite PSNR) are counted in "
                     "metrics.json as psnr_exact_images.")
    adaptive = [r for r in report.rows if r.kind == "adaptive"]
    for r in adaptive:
        hist = ", ".join(f"{k}: {v}" for k, v in r.histogram.items() if v)
        notes.append(f"{r.name}: images per token count {{{hist}}}; Spearman(token count, PNG bytes per pixel) = "
                     f"{_fmt('x', r.spearman_png)}")
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines) + "\n"


def write_report(report: EvalReport, out: str | os.PathLike) -> dict[str, Path]:
    """Write the three files into the folder ``out`` (created if missing); returns their paths."""
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"json": folder / "metrics.json", "md": folder / "metrics.md", "png": folder / "curves.png"}
    # each through a temporary file: a full disk leaves the earlier report whole, and no fragment
    text = json.dumps(report.as_dict(), indent=1) + "\n"
    write_atomic(paths["json"], lambda tmp: Path(tmp).write_text(text))
    write_atomic(paths["md"], lambda tmp: Path(tmp).write_text(markdown(report)))
    write_atomic(paths["png"], lambda tmp: plot_curves(report, tmp))
    return paths


def written_here(folder: str | os.PathLike) -> bool:
    """Whether ``folder``'s metrics.json is a report this package wrote (so --overwrite may
    replace the report's three files): a user's file of that name is never replaced."""
    try:
        document = json.loads((Path(folder) / "metrics.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(document, dict) and {"rows", "settings"} <= set(document)


def plot_curves(report: EvalReport, path: str | os.PathLike) -> None:
    metrics = [m for m in report.settings.get("metrics", []) if any(m in r.metrics for r in report.rows)]
    series = []
    for m in metrics:
        fixed = [(r.tokens, r.metrics[m]) for r in report.rows if r.kind == "fixed" and _finite(r.metrics.get(m))]
        points = [(r.tokens, r.metrics[m], r.name) for r in report.rows if r.kind == "adaptive" and _finite(r.metrics.get(m))]
        series.append((m, fixed, points))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        _plot_pillow(series, path)
        return
    cols = min(3, max(1, len(series)))
    rows = max(1, math.ceil(len(series) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, (m, fixed, points) in zip(axes.flat, series):
        if fixed:
            ax.plot([p[0] for p in fixed], [p[1] for p in fixed], "o-", label="fixed count")
        for x, y, name in points:
            ax.plot([x], [y], "s", label=name)
        ax.set_xlabel("tokens")
        ax.set_title(f"{m.upper()} ({'lower' if LOWER_IS_BETTER[m] else 'higher'} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


COLOURS = [(214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14), (23, 190, 207)]


def _plot_pillow(series, path) -> None:
    """A small-multiples line chart drawn with Pillow's primitives (no matplotlib here)."""
    pw, ph, margin = 360, 260, 48
    cols = min(3, max(1, len(series)))
    rows = max(1, math.ceil(len(series) / cols))
    image = Image.new("RGB", (cols * pw, rows * ph), "white")
    draw = ImageDraw.Draw(image)
    for k, (m, fixed, points) in enumerate(series):
        ox, oy = (k % cols) * pw, (k // cols) * ph
        left, top, right, bottom = ox + margin + 10, oy + 28, ox + pw - 14, oy + ph - margin
        draw.text((ox + margin, oy + 8), f"{m.upper()} ({'lower' if LOWER_IS_BETTER[m] else 'higher'} is better)", fill="black")
        draw.rectangle([left, top, right, bottom], outline=(120, 120, 120))
        xs = [p[0] for p in fixed] + [p[0] for p in points]
        ys = [p[1] for p in fixed] + [p[1] for p in points]
        if not xs:
            draw.text((left + 10, top + 10), "no values", fill="gray")
            continue
        x0, x1 = min(xs), max(xs)
        y0, y1 = min(ys), max(ys)
        if x1 == x0:
            x0, x1 = x0 - 1, x1 + 1
        if y1 == y0:
            y0, y1 = y0 - abs(y0) * 0.05 - 1e-6, y1 + abs(y1) * 0.05 + 1e-6
        pad = (y1 - y0) * 0.08
        y0, y1 = y0 - pad, y1 + pad

        def at(x, y):
            return (left + (x - x0) / (x1 - x0) * (right - left), bottom - (y - y0) / (y1 - y0) * (bottom - top))

        for frac in (0.0, 0.5, 1.0):  # y ticks
            y = y0 + frac * (y1 - y0)
            _, py = at(x0, y)
            draw.line([left - 4, py, left, py], fill="black")
            draw.text((ox + 2, py - 6), f"{y:.4g}", fill="black")
        for x in sorted(set(p[0] for p in fixed)) or [x0, x1]:  # x ticks at the token counts
            px, _ = at(x, y0)
            draw.line([px, bottom, px, bottom + 4], fill="black")
            draw.text((px - 8, bottom + 6), f"{x:g}", fill="black")
        draw.text((right - 40, bottom + 22), "tokens", fill="black")
        pts = [at(x, y) for x, y in fixed]
        if len(pts) > 1:
            draw.line(pts, fill=(31, 119, 180), width=2)
        for px, py in pts:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=(31, 119, 180))
        for j, (x, y, name) in enumerate(points):
            px, py = at(x, y)
            colour = COLOURS[j % len(COLOURS)]
            draw.rectangle([px - 4, py - 4, px + 4, py + 4], fill=colour)
            draw.text((left + 6, top + 4 + 12 * j), f"[] {name}", fill=colour)
    image.save(path, format="PNG")
