"""Stage 0: train the small VQGAN base tokenizer that a demo ALIT is distilled from.

``python -m alit_fast.train_vqgan --config demo --data demo --steps 3000 --out runs/vqgan``

An autoencoder with a vector-quantized bottleneck: L1 reconstruction (+ an optional image-gradient
L1, a cheap stand-in for a perceptual loss that keeps edges sharp) + codebook and commitment
losses with the straight-through estimator. No GAN and no LPIPS: they need pretrained networks
or far more compute than a demo has. Codes stay in use by initialising the codebook from encoder
outputs and re-initialising codes that went unused for a while from the current batch.
The result is written with only ``base_tokenizer.*`` keys, which ``alit_fast.train --init`` loads
into a fresh ALIT.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from ..config import ALITConfig
from ..errors import OneLineParser, UsageError, one_line, run_command
from ..files import acquire_lock, release_lock, write_atomic
from ..io import METADATA_CONFIG_KEY
from ..models import BaseTokenizer
from .data import SyntheticImages, build_dataset
from .train import CHECKPOINT, LOG, JsonlLog, prepare_out, read_training_checkpoint, resume_flag, threads_note
from .utils import atomic_torch_save, check_number, resolve_config, seed_everything


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="demo", help="preset name or JSON file of ALITConfig fields (its vqgan part is used)")
    p.add_argument("--data", default="demo", help="demo | synthetic | photos | an image folder")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--crop", type=int, default=32, help="train on random crops of this side (0: whole images); "
                   "the VQGAN is convolutional, so small crops give more steps per second")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--beta", type=float, default=0.25, help="commitment cost")
    p.add_argument("--grad-loss", type=float, default=0.5, help="weight of the image-gradient L1 (0: off)")
    p.add_argument("--active-codes", type=int, default=0,
                   help="use only this many codes (0: all); the other rows become copies of the used ones, which "
                        "the lowest-index tie rule never picks. Fewer codes make a coarser but more learnable "
                        "target for a short ALIT run")
    p.add_argument("--restart-every", type=int, default=50, help="re-init codes unused for this many steps (0: never)")
    p.add_argument("--time-limit", type=float, default=0.0, help="stop (and save) after this many seconds (0: none)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="runs/vqgan")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (the same options: it ends as an "
                        "uninterrupted run would)")
    p.add_argument("--overwrite", action="store_true", help="replace a VQGAN run already in --out")
    args = p.parse_args(argv)
    for flag in ("steps", "batch_size", "log_every"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("crop", "active_codes", "restart_every", "threads"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    try:
        check_number("--lr", args.lr, 0, None, low_open=True)
        check_number("--beta", args.beta, 0)
        check_number("--grad-loss", args.grad_loss, 0)
        check_number("--time-limit", args.time_limit, 0)
    except UsageError as exc:
        p.error(str(exc))
    return args


PROG = "python -m alit_fast.train_vqgan"
# optimizer.pt: what versions that could not resume saved instead of a checkpoint
RUN_FILES = ("vqgan.safetensors", CHECKPOINT, "optimizer.pt", LOG, "summary.json")
# what a resumed run must share with the run it continues: the data order, the losses, the schedule
RUN_OPTIONS = ("data", "steps", "batch_size", "crop", "lr", "beta", "grad_loss", "active_codes", "restart_every", "seed")
CHECKPOINT_ENTRIES = ("tokenizer", "optimizer", "scheduler", "step", "epoch", "batch", "generator", "rng", "last_used",
                      "config", "options")


def gradient_l1(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    dx = lambda t: t[..., :, 1:] - t[..., :, :-1]  # noqa: E731
    dy = lambda t: t[..., 1:, :] - t[..., :-1, :]  # noqa: E731
    return F.l1_loss(dx(x), dx(y)) + F.l1_loss(dy(x), dy(y))


def random_crops(images: torch.Tensor, side: int, generator: torch.Generator) -> torch.Tensor:
    if side <= 0 or side >= images.shape[-1]:
        return images
    B, _, H, W = images.shape
    top = torch.randint(0, H - side + 1, (B,), generator=generator).tolist()
    left = torch.randint(0, W - side + 1, (B,), generator=generator).tolist()
    return torch.stack([img[:, t : t + side, l : l + side] for img, t, l in zip(images, top, left)])


def fill_inactive(tok: BaseTokenizer, active: int) -> None:
    """Rows past ``active`` become copies of the active rows: never the nearest code (ties go to the
    lowest index), and harmless in a soft code."""
    with torch.no_grad():
        book = tok.codebook
        K = book.shape[0]
        if active < K:
            book[active:] = book[:active].repeat((K + active - 1) // active, 1)[: K - active]


def vq_step(tok: BaseTokenizer, images: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (reconstruction, vq loss, code indices [B*h*w], flat encoder outputs [B*h*w, C])."""
    z = tok.vqgan.encoder(images)
    indices = tok.vqgan.quantize.lookup(z.detach())  # [B, h*w]
    B, C, h, w = z.shape
    z_q = tok.codebook[indices].view(B, h, w, C).permute(0, 3, 1, 2)
    vq_loss = F.mse_loss(z_q, z.detach()) + beta * F.mse_loss(z, z_q.detach())
    recon = tok.vqgan.decoder(z + (z_q - z).detach())
    return recon, vq_loss, indices.flatten(), z.detach().permute(0, 2, 3, 1).reshape(-1, C)


@torch.no_grad()
def evaluate(tok: BaseTokenizer, images: torch.Tensor) -> dict[str, float]:
    tok.eval()
    z, indices = tok.encode(images)
    recon = tok.decode_indices(indices).clamp(0, 1)
    tok.train()
    counts = torch.bincount(indices.flatten(), minlength=tok.cfg.codebook_size).float()
    p = counts / counts.sum()
    perplexity = float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))
    return {"l1": float((recon - images).abs().mean()), "codes_used": int((counts > 0).sum()), "perplexity": perplexity}


def save_base_tokenizer(tok: BaseTokenizer, cfg: ALITConfig, path: Path) -> None:
    """Weights under ``base_tokenizer.*`` with the ALIT config in the metadata."""
    tensors = {f"base_tokenizer.{k}": v.detach().contiguous().cpu() for k, v in tok.state_dict().items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata={METADATA_CONFIG_KEY: cfg.to_json(), "format": "pt"}))


def main(argv: list[str] | None = None) -> int:
    return run_command(PROG, _main, argv)


@dataclass
class _Run:
    """Everything a step changes, and so everything a checkpoint holds."""

    tok: BaseTokenizer
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    gen: torch.Generator  # random crops, the codebook's initialisation, code restarts
    last_used: torch.Tensor  # the step each active code was last picked at
    step: int = 0
    epoch: int = 0
    batch: int = 0  # batches of ``epoch`` already trained on


def _new_run(args: argparse.Namespace, cfg: ALITConfig) -> _Run:
    seed_everything(args.seed)
    tok = BaseTokenizer(cfg.vqgan)
    tok.train()
    opt = torch.optim.Adam(tok.parameters(), lr=args.lr, betas=(0.9, 0.99))
    steps = args.steps
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / steps * 3.14159265)).item()))
    )
    K = args.active_codes or cfg.vqgan.codebook_size
    return _Run(tok, opt, sched, torch.Generator().manual_seed(args.seed), torch.zeros(K, dtype=torch.long))


def _options(args: argparse.Namespace) -> dict:
    options = {name: getattr(args, name) for name in RUN_OPTIONS}
    if os.path.isdir(args.data):  # a folder however it is spelled (relative, trailing slash, a link)
        options["data"] = os.path.realpath(args.data)
    return options


def _save_checkpoint(run: _Run, cfg: ALITConfig, args: argparse.Namespace, path: Path) -> None:
    atomic_torch_save({
        "tokenizer": run.tok.state_dict(), "optimizer": run.opt.state_dict(), "scheduler": run.sched.state_dict(),
        "step": run.step, "epoch": run.epoch, "batch": run.batch, "generator": run.gen.get_state(),
        "rng": torch.get_rng_state(), "last_used": run.last_used, "config": cfg.to_json(), "options": _options(args),
        "threads": torch.get_num_threads(),
    }, path)


def _resume(run: _Run, cfg: ALITConfig, args: argparse.Namespace, out: Path) -> bool:
    """Load ``out``'s checkpoint into ``run``; False where there is none yet (a first run killed
    before its first save: it starts from step 0)."""
    path = out / CHECKPOINT
    if not path.exists():
        if (out / "optimizer.pt").exists():
            raise UsageError(f"--resume: {out} was written by a version of {PROG} that saved no checkpoint; "
                             "start again with --overwrite")
        print(f"--resume: no checkpoint in {out} yet; starting from step 0", flush=True)
        return False
    ckpt = read_training_checkpoint(path, CHECKPOINT_ENTRIES, PROG)
    if ckpt["config"] != cfg.to_json():
        raise UsageError(f"--resume: {path} was written for a different --config")
    changed = [f"--{k.replace('_', '-')} {ckpt['options'].get(k)!r} -> {v!r}" for k, v in _options(args).items()
               if ckpt["options"].get(k) != v]
    if changed:
        raise UsageError(f"--resume: the run in {out} had other options ({', '.join(changed)}); resume it with its "
                         "own, or start again with --overwrite")
    try:
        run.tok.load_state_dict(ckpt["tokenizer"])
        run.opt.load_state_dict(ckpt["optimizer"])
        run.sched.load_state_dict(ckpt["scheduler"])
        run.gen.set_state(ckpt["generator"])
        torch.set_rng_state(ckpt["rng"])
        run.last_used.copy_(ckpt["last_used"])
    except (RuntimeError, KeyError, ValueError, TypeError) as exc:
        raise UsageError(f"--resume: {path} does not fit this run ({type(exc).__name__}: {one_line(exc)[:200]}); start "
                         "again with --overwrite") from exc
    run.step, run.epoch, run.batch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch"])
    print(f"resumed from {path} at step {run.step}", flush=True)
    note = threads_note(ckpt.get("threads"))
    if note:
        print(note, flush=True)
    return True


def _epoch_batches(dataset, args: argparse.Namespace, epoch: int, skip: int) -> DataLoader:
    """The epoch's batches past the first ``skip``: the order a shuffled DataLoader seeded with the
    epoch gives, drawn over indices alone so that the batches skipped are never loaded."""
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    order = DataLoader(range(len(dataset)), batch_size=args.batch_size, shuffle=True, drop_last=True,
                       generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    return DataLoader(dataset, batch_sampler=[b.tolist() for b in order][skip:])


def _init_codebook(run: _Run, images: torch.Tensor, z_channels: int) -> None:
    """Start every code on a real encoder output, so none begins dead."""
    K = run.last_used.numel()
    with torch.no_grad():
        z = run.tok.vqgan.encoder(images).permute(0, 2, 3, 1).reshape(-1, z_channels)
        pick = torch.randint(0, z.shape[0], (K,), generator=run.gen)
        run.tok.codebook.data[:K] = z[pick] + 0.01 * z.std() * torch.randn(K, z.shape[1], generator=run.gen)
        fill_inactive(run.tok, K)


def _train_step(run: _Run, images: torch.Tensor, args: argparse.Namespace) -> dict:
    """One optimizer step and the code restarts due; returns the step's figures for the log."""
    tok = run.tok
    recon, vq_loss, indices, z_flat = vq_step(tok, images, args.beta)
    l1 = F.l1_loss(recon, images)
    loss = l1 + vq_loss
    if args.grad_loss > 0:
        loss = loss + args.grad_loss * gradient_l1(recon, images)
    if not torch.isfinite(loss):
        raise SystemExit(f"train_vqgan: non-finite loss {float(loss)} at step {run.step}; stopping")
    run.opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
    run.opt.step()
    run.sched.step()
    run.step += 1
    run.last_used[indices.unique()] = run.step
    restarted = 0
    if args.restart_every and run.step % args.restart_every == 0:
        dead = (run.step - run.last_used >= args.restart_every).nonzero().flatten()
        if len(dead):
            with torch.no_grad():
                pick = torch.randint(0, z_flat.shape[0], (len(dead),), generator=run.gen)
                tok.codebook.data[dead] = z_flat[pick] + 0.01 * z_flat.std() * torch.randn(len(dead), z_flat.shape[1], generator=run.gen)
            run.last_used[dead] = run.step
            restarted = len(dead)
    fill_inactive(tok, run.last_used.numel())
    # read on the host only for a step that is logged
    return {"step": run.step, "loss": loss.detach(), "l1": l1.detach(), "vq": vq_loss.detach(),
            "lr": run.sched.get_last_lr()[0], "batch_codes": indices.unique().numel(), "restarted": restarted}


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = resolve_config(args.config)
    if args.active_codes > cfg.vqgan.codebook_size:
        raise UsageError(f"--active-codes {args.active_codes}: the VQGAN has {cfg.vqgan.codebook_size} codes")
    out = Path(args.out)
    prepare_out(out, args.resume, args.overwrite, write=False, run_files=RUN_FILES)
    _refuse_another_kind_of_run(out)
    dataset = build_dataset(args.data, cfg.image_size, seed=args.seed)  # a bad --data is refused before any write
    if len(dataset) < args.batch_size:  # drop_last would leave no batch at all, and the loop would never end
        raise UsageError(f"--data {args.data} has {len(dataset)} items: fewer than one --batch-size {args.batch_size}")
    prepare_out(out, args.resume, args.overwrite, run_files=RUN_FILES)
    lock = acquire_lock(out, PROG)
    try:
        return _run(args, cfg, dataset, out)
    finally:
        release_lock(lock)


def _refuse_another_kind_of_run(out: Path) -> None:
    """A checkpoint.pt that is not a VQGAN run's (``alit-fast train`` writes one of the same name)
    is never resumed from nor replaced."""
    path = out / CHECKPOINT
    if not path.is_file():
        return
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # damaged: --resume names the problem, --overwrite replaces it
        return
    if isinstance(ckpt, dict) and "tokenizer" not in ckpt:
        raise UsageError(f"--out {out} holds another kind of run ({CHECKPOINT} without a VQGAN in it, e.g. alit-fast "
                         "train's); it is left alone: use a new or empty directory")


def _run(args: argparse.Namespace, cfg: ALITConfig, dataset, out: Path) -> int:
    run = _new_run(args, cfg)
    resumed = _resume(run, cfg, args, out) if args.resume else False
    if resumed and run.step >= args.steps:
        print(f"{out}: the run already ended at step {run.step}; nothing to do", flush=True)
        return 0
    if args.overwrite:  # the replaced run's files that this one may not write again
        for name in ("optimizer.pt", "summary.json", CHECKPOINT):
            (out / name).unlink(missing_ok=True)
    held_out = torch.stack([build_dataset(args.data, cfg.image_size, seed=args.seed + 1)[i]["image"]
                            for i in range(min(64, len(dataset)))])
    flat_probe = torch.stack([SyntheticImages(cfg.image_size, 10, seed=args.seed + 2)[i]["image"] for i in range(10)])
    log = JsonlLog(out / LOG, run.step if resumed else None)
    start = time.time()
    try:
        _train(run, cfg, args, dataset, out, log, start, probes=(held_out, flat_probe))
    finally:
        log.close()
    final = evaluate(run.tok, held_out)
    save_base_tokenizer(run.tok, cfg, out / "vqgan.safetensors")
    summary = {"steps": run.step, "seconds": round(time.time() - start, 1), **{f"eval_{k}": v for k, v in final.items()}}
    write_atomic(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(json.dumps(summary), flush=True)
    return 0


def _train(run: _Run, cfg: ALITConfig, args: argparse.Namespace, dataset, out: Path, log: JsonlLog, start: float,
           probes: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Steps until --steps (or --time-limit, which saves a checkpoint to resume from)."""
    while run.step < args.steps:
        for images in _epoch_batches(dataset, args, run.epoch, run.batch):
            images = random_crops(images["image"], args.crop, run.gen)
            if run.step == 0:
                _init_codebook(run, images, cfg.vqgan.z_channels)
            record = _train_step(run, images, args)
            run.batch += 1
            timed_out = bool(args.time_limit) and time.time() - start > args.time_limit
            save = run.step % (args.log_every * 8) == 0 or run.step == args.steps
            if run.step % args.log_every == 0 or save:
                record = {"step": run.step, "time": round(time.time() - start, 1),
                          **{k: float(v) if isinstance(v, torch.Tensor) else v for k, v in record.items() if k != "step"}}
                if save:
                    record.update({f"eval_{k}": v for k, v in evaluate(run.tok, probes[0]).items()})
                    record["eval_flat_l1"] = evaluate(run.tok, probes[1])["l1"]
                log.write(record)
                print(json.dumps(record), flush=True)
            if save or timed_out:  # a time limit saves without a log line: the log stays an uninterrupted run's
                save_base_tokenizer(run.tok, cfg, out / "vqgan.safetensors")
                _save_checkpoint(run, cfg, args, out / CHECKPOINT)
            if run.step >= args.steps:
                return
            if timed_out:
                print(f"time limit reached at step {run.step}; continue with {resume_flag(args)}", flush=True)
                return
        run.epoch, run.batch = run.epoch + 1, 0


if __name__ == "__main__":
    raise SystemExit(main())
