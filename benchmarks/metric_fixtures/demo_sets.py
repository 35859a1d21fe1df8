"""Write the image folders the README's evaluation table and pictures are made from:

    python -m benchmarks.metric_fixtures.demo_sets --out eval_sets
    # eval_sets/heldout: the 100 held-out synthetic images of `alit-fast demo --evaluate` (seed 777777,
    #                    20 per complexity level; training never drew this seed), 32x32 PNGs, lossless
    # eval_sets/photos:  scikit-image's bundled colour photographs (no download), as PNGs at full size
    # eval_sets/demo:    the 14 images of `alit-fast demo` (32x32), named so that a flat colour, a
    #                    few shapes and a photograph come first: docs/visualize.png's token sheets
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from alit_fast.cli.demo import HELD_OUT_SEED
from alit_fast.training.data import COMPLEXITY_LEVELS, SyntheticImages

# scikit-image's RGB photographs that ship with the package (the others need a download)
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field", "retina", "skin",
          "colorwheel", "logo", "lily")


def write_heldout(folder: Path, per_level: int = 20, size: int = 32, seed: int = HELD_OUT_SEED) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    data = SyntheticImages(size, length=per_level * len(COMPLEXITY_LEVELS), seed=seed)
    for i in range(len(data)):
        array = (data[i]["image"].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{COMPLEXITY_LEVELS[data.level(i)]}_{i:03d}.png")
    return len(data)


def write_photos(folder: Path) -> int:
    import skimage.data

    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name in PHOTOS:
        try:
            array = getattr(skimage.data, name)()
        except Exception:  # a data file this scikit-image lacks
            continue
        if array.ndim != 3:
            continue
        Image.fromarray(np.asarray(array)[..., :3].astype(np.uint8)).save(folder / f"{name}.png")
        count += 1
    return count


def write_demo(folder: Path, size: int = 32) -> int:
    from alit_fast.cli.demo import demo_images

    folder.mkdir(parents=True, exist_ok=True)
    items = demo_images(size)
    first = ["flat-0", "few_shapes-0", "chelsea"]
    ordered = [it for name in first for it in items if it.name == name] + [it for it in items if it.name not in first]
    for k, item in enumerate(ordered):
        array = (item.image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{k:02d}_{item.name}.png")
    return len(ordered)


WRITERS = {"heldout": (write_heldout, "held-out images"), "photos": (write_photos, "photographs"),
           "demo": (write_demo, "demo images")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="eval_sets")
    p.add_argument("--only", choices=tuple(WRITERS), default=None, help="write this one set (default: all three)")
    args = p.parse_args()
    out = Path(args.out)
    written = [f"{WRITERS[name][0](out / name)} {WRITERS[name][1]}" for name in WRITERS if args.only in (None, name)]
    print(", ".join(written) + f" -> {out}")


if __name__ == "__main__":
    main()
