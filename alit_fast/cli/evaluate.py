"""``alit-fast evaluate`` (also ``python -m alit_fast.evaluate``): L1, L2, PSNR, SSIM, LPIPS and
rFID of a model at every token count and for adaptive criteria, in one batched pass, with the
official evaluation's preprocessing. Writes OUT/metrics.json, OUT/metrics.md and OUT/curves.png.

Under ``torchrun --nproc_per_node=N`` every process evaluates its share of the images and the
sums are all-reduced (gloo on CPUs, nccl on GPUs); rank 0 writes the report.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

from ..distributed import join_group, rank_device, rank_world
from ..evaluation import (CROPS, FID_METHODS, METRICS, FIDWeightsError, evaluate, load_fid_inception, parse_metrics,
                          parse_tokens, write_report)
from ..evaluation.data import ImageFiles
from ..evaluation.report import markdown, written_here
from ..files import acquire_lock, release_lock
from ..training.utils import package_version, weights_digest
from ..evaluation.run import ProgressError, check_arguments
from ..io.images import describe_notes, scan_notes
from ..inference import FALLBACKS, parse_criterion
from ..io.lpips_weights import LPIPSWeightsError, load_lpips as _load_lpips
from ..models import HALTING_MODES
from ._common import (OneLineParser, UsageError, check_free_space, check_output_dir, check_positive, checkpoint_spec,
                      device_from, load_model_or_raise, one_line, run_command)

PROG = "alit-fast evaluate"
# what runs with nothing downloaded; LPIPS and FID need their networks' weights files
DEFAULT_METRICS = ("l1", "l2", "psnr", "ssim")
OUTPUTS = ("metrics.json", "metrics.md", "curves.png")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder of images (searched recursively; official center crop)")
    p.add_argument("--checkpoint", required=True, help="what alit_fast.load takes: a bundled model name (demo), an "
                   "alit_fast .safetensors file, an official checkpoint (.pth; its 'ema' weights), a model directory, "
                   "or hf-hub:OWNER/REPO[@REVISION]")
    p.add_argument("--tokens", default="all", help="fixed token counts to report: all (default), none, or e.g. 32,64,256")
    p.add_argument("--criterion", action="append", default=[], metavar="C",
                   help="an adaptive row (repeatable): tokens:N, code-acc:F, code-nll:F or pixel-l1:F")
    p.add_argument("--fallback", choices=FALLBACKS, default="max",
                   help="an image never meeting a criterion gets the most tokens (max) or its best-scoring count (best)")
    p.add_argument("--metrics", default=",".join(DEFAULT_METRICS),
                   help=f"comma-separated, from {','.join(METRICS)} (default: {','.join(DEFAULT_METRICS)}, which need no "
                        "download; lpips and fid need torchvision's VGG16 and pytorch-fid's Inception weights)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--backend", default="torch", help="torch, triton or official (attention / VQ kernels)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    p.add_argument("--halting", choices=HALTING_MODES, default="official",
                   help="official (default: as the official evaluation halts: stochastic with a VQGAN base, seeded by "
                        "--seed; never with a VAE), stochastic, threshold, or off (deterministic)")
    p.add_argument("--seed", type=int, default=0, help="the stochastic halting's seed (rank r uses seed + r)")
    p.add_argument("--crop", choices=CROPS, default="center",
                   help="center: the official center crop at native resolution (default); resize: shorter side to the "
                        "model's size first (the official --testing_custom_images transform)")
    p.add_argument("--no-quantize", action="store_true",
                   help="skip the uint8 truncation the official PNG round trip applies to both sets")
    p.add_argument("--fid-weights", default=None, help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                   "(default: torch hub's cache)")
    p.add_argument("--fid-method", choices=FID_METHODS, default="eigh",
                   help="eigh (default, fast) or sqrtm (pytorch-fid's scipy sqrtm; the same value, minutes per row on a CPU)")
    p.add_argument("--lpips-vgg", default=None, help="torchvision's vgg16-397923af.pth (default: torch hub's cache)")
    p.add_argument("--lpips-heads", default=None, help="lpips's weights/v0.1/vgg.pth (default: the installed lpips package's)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="image-reading processes")
    p.add_argument("--out", default="eval", help="output folder for metrics.json, metrics.md, curves.png")
    p.add_argument("--overwrite", action="store_true", help="replace a report already in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


# a long pass saves its sums this often, so that a crash late in it loses at most this much work:
# rerunning the same command continues from them (one process only)
PROGRESS = ".evaluate-progress.pt"
SAVE_EVERY_S = 300.0


def _identity(args: argparse.Namespace, weights: str, files: list) -> str:
    """What the numbers depend on: the weights themselves, the images, every option that changes
    them, the package version. Progress saved under another identity is never continued.

    An image is its path, size and modification time: a file rewritten in place between two runs
    (a re-export, a fixed crop) starts the evaluation over instead of mixing old sums with new
    images. A stat per file, not a read: hashing the contents would read the data set twice."""
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "overwrite", "quiet", "workers")}
    images = [(str(f), *_size_and_mtime(f)) for f in files]
    document = json.dumps([weights, images, options, package_version()], default=str)
    return hashlib.sha256(document.encode()).hexdigest()


def _size_and_mtime(path) -> tuple[int, int]:
    try:
        st = os.stat(path)
    except OSError as exc:  # gone, or its folder made unreadable, since the scan
        raise UsageError(f"cannot read the image {path}: {exc.strerror or exc}") from exc
    return st.st_size, st.st_mtime_ns


def main(argv: list[str] | None = None) -> int:
    # a user error is one line and exit status 2 (from rank 0: every rank meets the same one);
    # anything else is a bug and keeps its traceback
    return run_command(PROG, _main, argv, speak=rank_world()[0] == 0)


def _main(argv: list[str] | None) -> int:
    args = _parser().parse_args(argv)
    metrics, criteria, out = _check_options(args)
    main_rank = rank_world()[0] == 0
    lock, created = None, not out.exists()
    if main_rank:  # one run per folder; a second one refuses by name
        out.mkdir(parents=True, exist_ok=True)
        lock = acquire_lock(out, PROG)
    try:
        return _evaluate_into(args, metrics, criteria, out, main_rank)
    finally:
        if lock:
            release_lock(lock)
            if created and not any(out.iterdir()):  # refused before writing: leave no trace
                out.rmdir()


def _evaluate_into(args: argparse.Namespace, metrics, criteria, out: Path, main_rank: bool) -> int:
    device = rank_device(device_from(args.device))
    model = load_model_or_raise(args.checkpoint, args.backend, device)
    _check_for_model(model, args, metrics, criteria)
    files = _UserImages(args.data, model.config.image_size, args.crop, skip_unreadable=True)
    if len(files) == 0:
        raise UsageError(f"--data {args.data}: no readable image files found")
    # said after the report: a run refused on the way prints its one line and nothing else
    said = _said(files, _notes(files.files, model.config.image_size, args.crop), args.metrics)
    fid_model, lpips_model = _networks(args, metrics, device)
    digest = weights_digest(model)
    if "fid" in metrics and rank_world()[1] == 1:
        # the progress file holds a 2048 x 2048 float64 Gram matrix per row and one for the images,
        # twice while it is replaced
        rows = len(parse_tokens(args.tokens, model.config.tokens_per_iter, model.config.max_tokens)) + len(criteria)
        check_free_space(str(out), 2 * 2048 * 2048 * 8 * (rows + 1), f"--out {out} (the evaluation's saved progress)")
    # only one process saves progress (evaluate's rule), so only then does it need an identity
    identity = _identity(args, digest, files.files) if rank_world()[1] == 1 else "not saved: several processes"
    joined = join_group(device)  # after every check: a refused run leaves no rank waiting for the others
    try:
        report = _evaluate_resumable(
            model, files, tokens=args.tokens, criteria=criteria, metrics=metrics, batch_size=args.batch_size,
            halting=args.halting, seed=args.seed, quantize=not args.no_quantize, fallback=args.fallback,
            fid_method=args.fid_method, crop=args.crop, num_workers=args.workers, progress=not args.quiet,
            fid_model=fid_model, lpips_model=lpips_model, progress_file=out / PROGRESS,
            identity=identity, save_every=SAVE_EVERY_S,
        )
        if main_rank:
            _report(report, digest, args, out)
            (out / PROGRESS).unlink(missing_ok=True)  # done: a rerun starts over
            for line in said:
                print(f"{PROG}: {line}", file=sys.stderr)
    finally:
        if joined:
            dist.destroy_process_group()
    return 0


def _evaluate_resumable(*args, **kwargs):
    """``evaluate``, with a progress file it cannot continue from reported as the user's to remove."""
    try:
        return evaluate(*args, **kwargs)
    except ProgressError as exc:
        raise UsageError(str(exc)) from exc


def _report(report, digest: str, args: argparse.Namespace, out: Path) -> None:
    # what identifies the numbers: the weights themselves, not only their path or name
    report.settings.update(checkpoint=checkpoint_spec(args.checkpoint), weights_sha256=digest,
                           alit_fast_version=package_version())
    print(markdown(report), end="")  # first: a write that fails still leaves the numbers on screen
    try:
        paths = write_report(report, out)
    except OSError as exc:
        raise UsageError(f"cannot write the report to {out}: {exc.strerror or exc} (the numbers are above)") from exc
    print(f"wrote {', '.join(str(p) for p in paths.values())}")


def _check_options(args: argparse.Namespace) -> tuple[tuple[str, ...], list, Path]:
    """What a user can get wrong before any model or file is loaded."""
    try:
        metrics = parse_metrics(args.metrics)
        criteria = [parse_criterion(c) for c in args.criterion]
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    check_positive("--batch-size", args.batch_size)
    if args.workers < 0:
        raise UsageError(f"--workers must be >= 0, got {args.workers}")
    if not os.path.isdir(args.data):
        raise UsageError(f"--data {args.data} is not a folder")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; give a folder")
    existing = [name for name in OUTPUTS if (out / name).exists()]
    if existing and not written_here(out):  # a user's files of these names, --overwrite or not
        raise UsageError(f"--out {out} holds {', '.join(existing)}, not a report this command wrote; they are "
                         "left alone: give another folder")
    if existing and not args.overwrite:
        raise UsageError(f"--out {out} already holds {', '.join(existing)}; pass --overwrite to replace them")
    check_output_dir(str(out))
    check_free_space(str(out), 4 << 20, f"--out {out}")
    return metrics, criteria, out


def _check_for_model(model, args: argparse.Namespace, metrics: tuple[str, ...], criteria: list) -> None:
    """The token counts and criteria against this model: the checks ``evaluate`` makes, made here
    so that what they refuse is a user error and not a traceback."""
    try:
        check_arguments(model, args.tokens, criteria, metrics, args.fallback, args.halting, args.fid_method,
                        args.batch_size)
    except ValueError as exc:
        raise UsageError(str(exc)) from exc


def _networks(args: argparse.Namespace, metrics: tuple[str, ...], device):
    """FID's Inception and LPIPS when asked for, loaded before any image is read; a missing or
    wrong weights file is a user error naming it."""
    try:
        fid = load_fid_inception(args.fid_weights, device) if "fid" in metrics else None
        lpips = _load_lpips(args.lpips_vgg, args.lpips_heads, device) if "lpips" in metrics else None
    except (FIDWeightsError, LPIPSWeightsError) as exc:
        raise UsageError(one_line(exc)) from exc
    return fid, lpips


def _said(files: "_UserImages", notes: str | None, metrics: str) -> list[str]:
    """The lines evaluate adds to its report: files skipped, images converted or cropped, metrics off."""
    lines = []
    if files.skipped:
        more = f", and {len(files.skipped) - 3} more" if len(files.skipped) > 3 else ""
        lines.append(f"skipped {len(files.skipped)} unreadable file(s): {', '.join(files.skipped[:3])}{more}")
    if notes:
        lines.append(notes)
    if metrics == ",".join(DEFAULT_METRICS):
        lines.append(f"LPIPS and FID are off by default; --metrics {','.join(METRICS)} adds them (they need "
                     "torchvision's VGG16 and pytorch-fid's Inception weights: see --help)")
    return lines


def _notes(files: list, size: int, crop: str) -> str | None:
    """The one line on what reading ``files`` converts and sizes (headers only: the pixels are read in
    workers); --crop center sizes no image, so it says what it took instead."""
    notes = scan_notes(files, size)
    cropped = notes.pop("resized", 0) if crop == "center" else 0
    line = describe_notes(notes, size)
    if cropped:
        said = (f"{cropped} image(s) were not {size}x{size}: --crop center took their central {size}x{size} pixels "
                "at native size (the official benchmark's crop; --crop resize sizes them as encode does)")
        line = f"{line}; {said}" if line else f"note: {said}"
    return line


class _UserImages(ImageFiles):
    """The --data files: one that cannot be read is the user's to fix, not a bug."""

    def __getitem__(self, index: int):
        try:
            return super().__getitem__(index)
        except ValueError as exc:  # read_image's "cannot read the image PATH: ..."
            raise UsageError(one_line(exc)) from exc


if __name__ == "__main__":
    sys.exit(main())
