"""``alit-fast calibrate``: fit a model's decode-free pixel-L1 estimate (what ``--criterion
fast-pixel-l1:F`` stops on) on calibration images, and write the model with it in its metadata.

    alit-fast calibrate --checkpoint demo --data validation --out demo-calibrated.safetensors

``--data validation`` is the built-in set (synthetic images of every complexity level on a seed
that neither training nor the held-out evaluation uses, and center crops of the scikit-image
photographs the held-out set does not use); otherwise a folder of images, center-cropped to the
model's size. Calibrate on images like the ones you will encode, and never on the images you
then evaluate on.
"""
from __future__ import annotations

import argparse
import os

import torch

from ..inference.calibration import METADATA_KEY, PixelL1Calibration, cell_size, fit, measure
from ..io import ALIT
from ..io.images import find_images, load_image
from ..io.pretrained import PRETRAINED, pretrained_path
from ..io.weights import METADATA_CONFIG_KEY, read_safetensors, write_with_metadata
from ._common import (
    OneLineParser,
    UsageError,
    add_model_args,
    check_output_file,
    check_positive,
    device_from,
    load_model_or_raise,
    run_command,
)

PROG = "alit-fast calibrate"
# benchmarks.demo_criterion_sweep's validation seed: disjoint from training and from demo.HELD_OUT_SEED
VALIDATION_SEED = 555_555


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    add_model_args(p, "demo")
    p.add_argument("--data", required=True, help="a folder of images, or 'validation' (the built-in calibration set)")
    p.add_argument("--per-level", type=int, default=20, help="with --data validation: synthetic images per complexity level")
    p.add_argument("--out", required=True, help="the calibrated model file (.safetensors); may name --checkpoint's file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    return p


def validation_images(size: int, per_level: int) -> tuple[torch.Tensor, str]:
    """The built-in calibration images and their description."""
    from ..training.data import PHOTO_NAMES
    from ..io.images import center_crop, to_tensor
    from .demo import DEMO_PHOTOS, demo_images

    items = demo_images(size, per_level=per_level, photos=False, seed=VALIDATION_SEED)
    names = tuple(n for n in PHOTO_NAMES if n not in DEMO_PHOTOS)
    try:
        from ..training.data import load_photos

        photos = [to_tensor(center_crop(p, size)) for p in load_photos(names)]
    except ImportError:
        photos = []
    images = torch.stack([it.image for it in items] + photos)
    return images, f"validation: {len(items)} synthetic (seed {VALIDATION_SEED}) + {len(photos)} photo crops"


def folder_images(folder: str, size: int) -> tuple[torch.Tensor, str]:
    if not os.path.isdir(folder):
        raise UsageError(f"--data {folder}: not a folder (give a folder of images, or 'validation')")
    files = find_images([folder])
    if len(files) < 4:
        raise UsageError(f"--data {folder}: {len(files)} image(s) found; a calibration needs at least 4")
    images = []
    for path in files:
        try:
            images.append(load_image(path, size))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--data: {path} cannot be read as an image ({exc})") from exc
    return torch.stack(images), f"{len(files)} images from {os.path.basename(os.path.abspath(folder))}"


def source_file(spec: str) -> str | None:
    """The alit_fast safetensors file behind --checkpoint (its tensors are copied as they are), or
    None when the model comes from elsewhere (an official checkpoint: it is saved anew)."""
    path = str(pretrained_path(spec)) if spec in PRETRAINED and not os.path.exists(spec) else spec
    if os.path.isfile(path) and path.endswith(".safetensors") and METADATA_CONFIG_KEY in read_safetensors(path, "cpu")[1]:
        return path
    return None


def write_calibrated(model: ALIT, spec: str, calibration: PixelL1Calibration, out: str) -> None:
    source = source_file(spec)
    if source is not None:
        write_with_metadata(source, out, {METADATA_KEY: calibration.to_json()})
    else:
        model.pixel_l1_calibration = calibration
        model.save(out)


def report(calibration: PixelL1Calibration) -> str:
    agreement = ", ".join(f"{t}: {100 * a:.0f}%" for t, a in calibration.agreement.items())
    a, b, c, d = calibration.coef
    return (f"calibrated on {calibration.data}\n"
            f"  estimate = {a:.5f} + {b:.5f}*detail + {c:.5f}*latent_error + {d:.5f}*detail*latent_error\n"
            f"  Spearman with the pixel L1 over (image, iteration) pairs: {calibration.spearman:.3f}\n"
            f"  images whose first count under the threshold is the pixel criterion's: {agreement}")


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    check_positive("--batch-size", args.batch_size)
    check_positive("--per-level", args.per_level)
    check_positive("--threads", args.threads)
    same = os.path.exists(args.out) and source_file(args.checkpoint) is not None and os.path.samefile(args.out, source_file(args.checkpoint))
    check_output_file(args.out, (lambda p: args.overwrite or same), overwrite_flag="--overwrite")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model_or_raise(args.checkpoint, args.backend, device_from(args.device))
    size = model.config.image_size
    images, data = validation_images(size, args.per_level) if args.data == "validation" else folder_images(args.data, size)
    device = model.latent_tokens.device
    batches = (images[i : i + args.batch_size].to(device) for i in range(0, len(images), args.batch_size))
    calibration = fit(measure(model, batches), cell_size(model), data)
    write_calibrated(model, args.checkpoint, calibration, args.out)
    print(report(calibration))
    print(f"wrote {args.out} (use it with --criterion fast-pixel-l1:THRESHOLD)")
    return 0
