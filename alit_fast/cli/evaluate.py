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

import torch
import torch.distributed as dist

from ..evaluation import CROPS, FID_METHODS, METRICS, evaluate, parse_metrics, parse_tokens, write_report
from ..evaluation.report import markdown, written_here
from ..files import FolderBusy, acquire_lock, release_lock
from ..training.utils import package_version, weights_digest
from ..evaluation.data import ImageFiles
from ..io.images import describe_notes, scan_notes
from ..inference import FALLBACKS, parse_criterion
from ..models import HALTING_MODES
from ._common import (OneLineParser, check_free_space, check_output_dir, checkpoint_spec, device_from,
                      load_model_or_report)

PROG = "alit-fast evaluate"
OUTPUTS = ("metrics.json", "metrics.md", "curves.png")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", required=True, help="a folder of images (searched recursively; official center crop)")
    p.add_argument("--checkpoint", required=True, help="an alit_fast .safetensors file, an official checkpoint "
                   "(.pth; its 'ema' weights), or a bundled model name (demo)")
    p.add_argument("--tokens", default="all", help="fixed token counts to report: all (default), none, or e.g. 32,64,256")
    p.add_argument("--criterion", action="append", default=[], metavar="C",
                   help="an adaptive row (repeatable): tokens:N, code-acc:F, code-nll:F or pixel-l1:F")
    p.add_argument("--fallback", choices=FALLBACKS, default="max",
                   help="an image never meeting a criterion gets the most tokens (max) or its best-scoring count (best)")
    p.add_argument("--metrics", default=",".join(METRICS), help=f"comma-separated, from {','.join(METRICS)} (default: all)")
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
    them, the package version. Progress saved under another identity is never continued."""
    options = {k: v for k, v in sorted(vars(args).items()) if k not in ("out", "overwrite", "quiet", "workers")}
    document = json.dumps([weights, [str(f) for f in files], options, package_version()], default=str)
    return hashlib.sha256(document.encode()).hexdigest()


def _distributed_setup(device_name: str) -> tuple[bool, torch.device | None]:
    """Join the torchrun group when launched by it (WORLD_SIZE > 1); returns (joined, device)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available() or dist.is_initialized():
        return False, None
    cuda = torch.cuda.is_available() and device_name in ("auto", "cuda")
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    return True, device


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:  # what a user can get wrong, before any model or file is loaded
        metrics = parse_metrics(args.metrics)
        criteria = [parse_criterion(c) for c in args.criterion]
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        if args.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {args.workers}")
        if not os.path.isdir(args.data):
            raise ValueError(f"--data {args.data} is not a folder")
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise ValueError(f"--out {out} is a file; give a folder")
        existing = [name for name in OUTPUTS if (out / name).exists()]
        if existing and not written_here(out):  # a user's files of these names, --overwrite or not
            raise ValueError(f"--out {out} holds {', '.join(existing)}, not a report this command wrote; they are "
                             "left alone: give another folder")
        if existing and not args.overwrite:
            raise ValueError(f"--out {out} already holds {', '.join(existing)}; pass --overwrite to replace them")
        check_output_dir(str(out))
        check_free_space(str(out), 4 << 20, f"--out {out}")
        joined, device = _distributed_setup(args.device)
        if device is None:
            device = device_from(args.device)
    except ValueError as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    lock = None
    try:
        if not dist.is_initialized() or dist.get_rank() == 0:
            created = not out.exists()
            out.mkdir(parents=True, exist_ok=True)
            lock = acquire_lock(out, PROG)
        model = load_model_or_report(args.checkpoint, args.backend, device, PROG)
        if model is None:
            return 2
        try:
            counts = parse_tokens(args.tokens, model.config.tokens_per_iter, model.config.max_tokens)
            if "fid" in metrics and (not dist.is_initialized() or dist.get_world_size() == 1):
                # the progress file holds a 2048 x 2048 float64 Gram matrix per row and one for the
                # images, twice while it is replaced
                gram = 2048 * 2048 * 8 * (len(counts) + len(criteria) + 1)
                check_free_space(str(out), 2 * gram, f"--out {out} (the evaluation's saved progress)")
            digest = weights_digest(model)
            files = ImageFiles(args.data, model.config.image_size, args.crop)
            if len(files) == 0:
                raise ValueError(f"--data {args.data}: no image files found")
            converted = describe_notes(scan_notes(files.files))  # headers only: the pixels are read in workers
            if converted and (not dist.is_initialized() or dist.get_rank() == 0):
                print(f"{PROG}: {converted}", file=sys.stderr)
            report = evaluate(
                model, files, tokens=args.tokens, criteria=criteria, metrics=metrics, batch_size=args.batch_size,
                halting=args.halting, seed=args.seed, quantize=not args.no_quantize, fallback=args.fallback,
                fid_weights=args.fid_weights, lpips_vgg=args.lpips_vgg, lpips_heads=args.lpips_heads,
                fid_method=args.fid_method, crop=args.crop, num_workers=args.workers, progress=not args.quiet,
                progress_file=out / PROGRESS, identity=_identity(args, digest, files.files), save_every=SAVE_EVERY_S,
            )
        except (ValueError, TypeError, FileNotFoundError) as exc:
            print(f"{PROG}: {exc}", file=sys.stderr)
            return 2
        if not dist.is_initialized() or dist.get_rank() == 0:
            # what identifies the numbers: the weights themselves, not only their path or name
            report.settings.update(checkpoint=checkpoint_spec(args.checkpoint), weights_sha256=digest,
                                   alit_fast_version=package_version())
            print(markdown(report), end="")  # first: a write that fails still leaves the numbers on screen
            try:
                paths = write_report(report, out)
            except OSError as exc:
                print(f"{PROG}: cannot write the report to {out}: {exc.strerror or exc} (the numbers are above)",
                      file=sys.stderr)
                return 2
            (out / PROGRESS).unlink(missing_ok=True)  # done: a rerun starts over
            print(f"wrote {', '.join(str(p) for p in paths.values())}")
        return 0
    except FolderBusy as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 2
    finally:
        if lock:
            release_lock(lock)
            if created and not any(out.iterdir()):  # refused before writing: leave no trace
                out.rmdir()
        if dist.is_initialized() and joined:
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
