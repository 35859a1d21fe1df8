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
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from ..config import ALITConfig
from ..errors import OneLineParser, UsageError, run_command
from ..files import write_atomic
from ..io import METADATA_CONFIG_KEY
from ..models import BaseTokenizer
from .data import SyntheticImages, build_dataset
from .utils import atomic_torch_save, check_number, foreign_run_files, resolve_config, seed_everything


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    foreign = foreign_run_files(out, RUN_FILES)
    if foreign:  # a user's file of the same name is never replaced, --overwrite or not
        raise UsageError(f"--out {out} holds files training did not write ({', '.join(foreign)}); they are left "
                         "alone: use a new or empty directory")
    found = [name for name in RUN_FILES if (out / name).exists()]
    if found and not overwrite:  # an earlier run's weights are never replaced unasked
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); pass --overwrite to replace it")


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
RUN_FILES = ("vqgan.safetensors", "optimizer.pt", "log.jsonl", "summary.json")


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


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = resolve_config(args.config)
    if args.active_codes > cfg.vqgan.codebook_size:
        raise UsageError(f"--active-codes {args.active_codes}: the VQGAN has {cfg.vqgan.codebook_size} codes")
    out = Path(args.out)
    _check_out(out, args.overwrite)
    dataset = build_dataset(args.data, cfg.image_size, seed=args.seed)  # a bad --data is refused before any write
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite and (out / "log.jsonl").exists():
        (out / "log.jsonl").unlink()
    seed_everything(args.seed)
    gen = torch.Generator().manual_seed(args.seed)

    tok = BaseTokenizer(cfg.vqgan)
    tok.train()
    if len(dataset) < args.batch_size:  # drop_last would leave no batch at all, and the loop would never end
        raise UsageError(f"--data {args.data} has {len(dataset)} items: fewer than one --batch-size {args.batch_size}")
    held_out = torch.stack([build_dataset(args.data, cfg.image_size, seed=args.seed + 1)[i]["image"]
                            for i in range(min(64, len(dataset)))])
    flat_probe = torch.stack([SyntheticImages(cfg.image_size, 10, seed=args.seed + 2)[i]["image"] for i in range(10)])
    opt = torch.optim.Adam(tok.parameters(), lr=args.lr, betas=(0.9, 0.99))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 100) * (0.1 + 0.9 * 0.5 * (1 + torch.cos(torch.tensor(s / args.steps * 3.14159265)).item()))
    )
    K = args.active_codes or cfg.vqgan.codebook_size
    last_used = torch.zeros(K, dtype=torch.long)
    log = open(out / "log.jsonl", "a", encoding="utf-8")
    start = time.time()
    step, epoch, initialised = 0, 0, False
    while step < args.steps:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True,
                            generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        for batch in loader:
            images = random_crops(batch["image"], args.crop, gen)
            if not initialised:
                # start every code on a real encoder output, so none begins dead
                with torch.no_grad():
                    z = tok.vqgan.encoder(images).permute(0, 2, 3, 1).reshape(-1, cfg.vqgan.z_channels)
                    pick = torch.randint(0, z.shape[0], (K,), generator=gen)
                    tok.codebook.data[:K] = z[pick] + 0.01 * z.std() * torch.randn(K, z.shape[1], generator=gen)
                    fill_inactive(tok, K)
                initialised = True
            recon, vq_loss, indices, z_flat = vq_step(tok, images, args.beta)
            l1 = F.l1_loss(recon, images)
            loss = l1 + vq_loss
            if args.grad_loss > 0:
                loss = loss + args.grad_loss * gradient_l1(recon, images)
            if not torch.isfinite(loss):
                raise SystemExit(f"train_vqgan: non-finite loss {float(loss)} at step {step}; stopping")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(tok.parameters(), 1.0)
            opt.step()
            sched.step()
            step += 1
            last_used[indices.unique()] = step
            restarted = 0
            if args.restart_every and step % args.restart_every == 0:
                dead = (step - last_used >= args.restart_every).nonzero().flatten()
                if len(dead):
                    with torch.no_grad():
                        pick = torch.randint(0, z_flat.shape[0], (len(dead),), generator=gen)
                        tok.codebook.data[dead] = z_flat[pick] + 0.01 * z_flat.std() * torch.randn(len(dead), z_flat.shape[1], generator=gen)
                    last_used[dead] = step
                    restarted = len(dead)
            fill_inactive(tok, K)
            if step % args.log_every == 0 or step == args.steps:
                record = {"step": step, "time": round(time.time() - start, 1), "loss": float(loss), "l1": float(l1),
                          "vq": float(vq_loss), "lr": sched.get_last_lr()[0], "batch_codes": int(indices.unique().numel()),
                          "restarted": restarted}
                if step % (args.log_every * 8) == 0 or step == args.steps:
                    record.update({f"eval_{k}": v for k, v in evaluate(tok, held_out).items()})
                    record["eval_flat_l1"] = evaluate(tok, flat_probe)["l1"]
                    save_base_tokenizer(tok, cfg, out / "vqgan.safetensors")
                    atomic_torch_save({"step": step, "optimizer": opt.state_dict()}, out / "optimizer.pt")
                log.write(json.dumps(record) + "\n")
                log.flush()
                print(json.dumps(record), flush=True)
            if step >= args.steps or (args.time_limit and time.time() - start > args.time_limit):
                args.steps = step
                break
        epoch += 1
    final = evaluate(tok, held_out)
    save_base_tokenizer(tok, cfg, out / "vqgan.safetensors")
    summary = {"steps": step, "seconds": round(time.time() - start, 1), **{f"eval_{k}": v for k, v in final.items()}}
    write_atomic(out / "summary.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    print(json.dumps(summary), flush=True)
    log.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
