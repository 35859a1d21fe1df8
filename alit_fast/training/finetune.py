"""Stage-2 training ("full fine-tuning"): ``python -m alit_fast.train --stage finetune --init STAGE1``.

ALIT, the VQGAN encoder and the VQGAN decoder train; the VQGAN codebook and LPIPS stay frozen.
Each step takes the loss at one rollout iteration k, rebuilds the pixels from the decoder's soft
code through the VQGAN decoder, and is either a generator step (L1 + LPIPS + adaptive weight x
GAN factor x hinge GAN loss + 1D VQ loss) or a discriminator step (hinge loss of D_k). There is
one PatchGAN per iteration, with its own AdamW and GradScaler. See finetune_loss.py for the math.

With a KL-VAE base (as the official ``adaptive_vae.py``) the same loop trains ALIT and the whole
KL-VAE (encoder, decoder, quant_conv, post_quant_conv: the official stage 2 sets requires_grad on
every base-tokenizer parameter, and the VAE has no codebook to keep frozen); only LPIPS is
frozen. The pixels are the KL-VAE decode of the regressed latents (not unscaled, as official),
the adaptive weight is taken at the VAE decoder's conv_out, and there is no KL term. The
posterior sample is drawn from the run's device stream (seeded per rank, in the checkpoint), so
a run repeats and resumes exactly; the official code draws it from the global CPU generator.

Official defaults (github.com/ShivamDuggal4/adaptive-length-tokenizer @ 8c0b4ec: main_full_finetuning.py,
engines/full_finetuning.py, run_scripts/full_finetuning.sh): k is round-robin over the iterations, a
counter reset at each epoch and advanced on generator steps; while the GAN factor is above 0,
every ``--disc-every``-th step (9) of an epoch is a discriminator step; the GAN factor is 0, then
0.2, then 0.8 from 21/200 and 101/200 of the run (``--gan-schedule``); blr 1e-4, EMA 0.9999,
discriminator AdamW with PyTorch's default weight decay 0.01.

The official code's quirks are fixed by default and reproduced with ``--official-quirks``:

1. Discriminator steps use the generator's counter, which with 8 iterations and a step in 9 is
   always a multiple of 8: only discriminator 0 ever gets a hinge update. Fixed: discriminator
   steps have their own round-robin counter, so every D_k trains in turn.
2. The generator optimizer also holds the discriminators, so on generator steps D_k gets the
   gradient of the generator's GAN term (the wrong direction) and weight decay 0.05. Fixed:
   discriminators are only in their own optimizer and take no gradient in generator steps.
3. The EMA is reset to the live weights at every epoch start (stage 1 does the same in the
   official code; alit_fast's stage 1 never resets it). Fixed: no reset.
4. LPIPS is fed [0, 1] images (its scaling assumes [-1, 1]) with its dropout on. Fixed: [-1, 1],
   eval mode.

With the quirks on, the GAN term and its adaptive weight are also computed while the factor is 0
(as the official code does: the discriminator's BatchNorm statistics move and it takes zero
gradients that weight decay acts on); fixed, nothing of the GAN runs then.

Distributed (torchrun): gradients are averaged over ranks explicitly after each backward (the
adaptive weight takes ``autograd.grad`` inside the forward, which DDP's hooks do not see), and the
discriminators' BatchNorm buffers are broadcast from rank 0, so every rank holds the same weights.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from ..config import PRESETS, ALITConfig
from ..errors import UsageError
from ..files import write_atomic
from ..io import ALIT, CheckpointError, load_state_strict
from ..io.gan_checkpoint import DISCRIMINATOR_PREFIX, discriminator_state, read_discriminators
from ..io.lpips_weights import LPIPSWeightsError, load_lpips
from ..models.alit import images_in_range
from ..models.discriminator import NLayerDiscriminator
from .finetune_loss import (
    OFFICIAL_GAN_SCHEDULE,
    LossOptions,
    discriminator_loss,
    gan_factor,
    generator_loss,
    parse_gan_schedule,
)
from .train import (
    CHECKPOINT,
    Dist,
    EpochBatches,
    Health,
    Progress,
    Stage,
    build_training_data,
    drive,
    read_training_checkpoint,
    release_run_lock,
    ema_epoch_reset,
    open_run,
    initial_weights,
    load_initial,
    lr_lambda,
    nonfinite_message,
    update_ema,
)
from .train import parse_args as parse_stage1_args
from .utils import atomic_torch_save, one_line, resolve_config, rng_state, seed_everything, set_rng_state, weights_digest

STAGE = "finetune"
# stage-1 options that mean nothing here: refused by name rather than silently ignored
STAGE1_ONLY = (
    "--base-cache", "--sample-grad-iters", "--halting", "--linear-init-std", "--restart-dead-codes", "--compile", "--init-vqgan",
)
DEFAULT_SCHEDULE = ",".join(f"{start}:{value}" for start, value in OFFICIAL_GAN_SCHEDULE)


def finetune_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="alit-fast train --stage finetune",
        allow_abbrev=False,  # a prefix (--init) must reach stage 1's parser, not match --init-discriminators
        description=__doc__.split("\n\n")[0] + " Every stage-1 option applies too, except "
        + ", ".join(STAGE1_ONLY) + ".",
    )
    p.add_argument("--stage", choices=(STAGE,), required=True)
    p.add_argument("--official-quirks", action="store_true",
                   help="reproduce the official code's quirks (see the module docstring): discriminator steps on "
                        "the generator's counter (D0 only), discriminators in the generator optimizer, EMA reset every "
                        "epoch, LPIPS fed [0, 1] with dropout on")
    p.add_argument("--blr", type=float, default=1e-4, help="lr = blr * total batch / 256 (both optimizers)")
    p.add_argument("--ema", type=float, default=0.9999, help="EMA decay per step (0: no EMA)")
    p.add_argument("--lpips", choices=("on", "off"), default="on",
                   help="the LPIPS term (off: no VGG16 weights needed, e.g. offline demos)")
    p.add_argument("--lpips-weight", type=float, default=1.0)
    p.add_argument("--vgg-weights", default=None,
                   help="torchvision's vgg16-397923af.pth (default: torch hub's cache)")
    p.add_argument("--lpips-heads", default=None,
                   help="lpips's weights/v0.1/vgg.pth (default: inside the installed lpips package)")
    p.add_argument("--lpips-checkpoint", default=None,
                   help="take LPIPS (VGG16 and heads) from an official stage-2 checkpoint's "
                        "gan_losses.0.perceptual_loss.* instead of the two files")
    p.add_argument("--gan-schedule", default=DEFAULT_SCHEDULE,
                   help="FRACTION:FACTOR,...: the GAN factor from each fraction of the run on (0 before the "
                        "first; 'off': never). Default: the official epochs 21 and 101 of 200")
    p.add_argument("--disc-every", type=int, default=9,
                   help="while the GAN is on, step i of an epoch trains a discriminator when i %% N == N - 1")
    p.add_argument("--disc-ndf", type=int, default=64, help="discriminator width (official 64)")
    p.add_argument("--disc-layers", type=int, default=3, help="discriminator stride-2 layers (official 3)")
    p.add_argument("--disc-weight-decay", type=float, default=0.01,
                   help="the discriminator AdamW's weight decay (official: PyTorch's default 0.01)")
    p.add_argument("--init-discriminators", default=None,
                   help="discriminators to start from (an official stage-2 checkpoint or discriminators.safetensors); "
                        "by default they are read from --init when it holds them, else initialised at random")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Stage-2 options first; the rest go through stage 1's parser and its checks."""
    for flag in STAGE1_ONLY:
        if any(a == flag or a.startswith(flag + "=") for a in argv):
            raise UsageError(f"{flag} is a stage-1 option; stage 2 (--stage finetune) does not take it")
    ours, rest = finetune_parser().parse_known_args(argv)
    args = parse_stage1_args(rest)
    for key, value in vars(ours).items():
        setattr(args, key, value)
    problems = []
    if not (args.blr >= 0 and math.isfinite(args.blr)):
        problems.append(f"--blr must be a finite number >= 0, got {args.blr}")
    if not 0 <= args.ema < 1:
        problems.append(f"--ema must be in [0, 1), got {args.ema}")
    if args.disc_every < 2:
        problems.append(f"--disc-every must be >= 2 (some steps must train the generator), got {args.disc_every}")
    if args.disc_ndf < 1 or args.disc_layers < 1:
        problems.append("--disc-ndf and --disc-layers must be >= 1")
    if not (args.lpips_weight >= 0 and math.isfinite(args.lpips_weight)):
        problems.append(f"--lpips-weight must be a finite number >= 0, got {args.lpips_weight}")
    if args.init is None:
        problems.append("--init is required: stage 2 starts from a stage-1 model (alit_fast safetensors or official .pth)")
    try:
        args.gan_schedule_points = parse_gan_schedule(args.gan_schedule)
    except ValueError as exc:
        problems.append(str(exc))
    if problems:
        raise UsageError("; ".join(problems))
    return args


# ---------------------------------------------------------------------------- a run
@dataclass
class FinetuneRun:
    args: argparse.Namespace
    d: Dist
    cfg: ALITConfig
    model: ALIT
    ema: ALIT | None
    discriminators: nn.ModuleList
    lpips: nn.Module | None
    gen_params: list[nn.Parameter]  # what the generator clip covers (never the discriminators)
    disc_params: list[nn.Parameter]
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler | None
    scaler_d: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    batches: EpochBatches
    total_steps: int
    total_batch: int
    lr: float
    lr_at: Callable[[int], float]  # step -> multiplier of lr
    options: LossOptions
    out: Path
    step: int = 0
    gen_counter: int = 0  # the official round-robin: reset each epoch, advanced on generator steps
    disc_counter: int = 0  # the fixed discriminator round-robin (not reset)
    last_good: int | None = None
    per_epoch: bool = True  # the run is measured in epochs (the GAN schedule steps per epoch)
    latent_gen: torch.Generator | None = None  # device stream: the VAE's posterior samples

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT

    @property
    def steps_per_epoch(self) -> int:
        return self.batches.steps_per_epoch

    def progress(self) -> float:
        """The fraction of the run the GAN schedule reads: whole epochs, as the official code."""
        if self.per_epoch:
            return (self.step // self.steps_per_epoch) / self.args.epochs
        return self.step / self.total_steps


def _decay_groups(named: list[tuple[str, nn.Parameter]], weight_decay: float) -> list[dict]:
    """timm's add_weight_decay: no decay on 1-D tensors and biases."""
    decay = [p for n, p in named if p.ndim >= 2 and not n.endswith(".bias")]
    no_decay = [p for n, p in named if p.ndim < 2 or n.endswith(".bias")]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def init_discriminators(count: int, ndf: int, layers: int, seed: int) -> nn.ModuleList:
    """One PatchGAN per iteration, from ``seed`` alone: every rank builds the same ones, and the
    global random stream is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return nn.ModuleList(NLayerDiscriminator(3, ndf, layers) for _ in range(count))


def build(args: argparse.Namespace, d: Dist) -> FinetuneRun:
    device = d.device
    amp = args.amp or ("fp16" if device.type == "cuda" else "off")
    seed_everything(args.seed + d.rank)
    init_state, init_cfg = initial_weights(args.init)
    cfg = resolve_config(args.config) if args.config else (init_cfg or PRESETS["demo"])
    model = ALIT(cfg)
    what = load_initial(model, init_state)
    if d.main:
        print(f"initialised {what} from {args.init}", flush=True)
    # stage 2 trains everything but the VQGAN codebook (it only ever enters detached); a KL-VAE
    # base has no codebook and trains whole, as official
    model.requires_grad_(True)
    if not cfg.is_vae:
        model.base_tokenizer.vqgan.quantize.requires_grad_(False)
    model.set_backend(args.backend)
    model.set_activation_checkpointing(args.activation_checkpointing)

    discs = init_discriminators(cfg.iterations, args.disc_ndf, args.disc_layers, args.seed)
    source = args.init_discriminators or args.init
    try:
        found = read_discriminators(source, "cpu")
    except (CheckpointError, FileNotFoundError) as exc:
        if args.init_discriminators:
            raise UsageError(f"--init-discriminators: {exc}") from exc
        found = {}
    if found:
        for i, disc in enumerate(discs):
            if i in found:
                try:
                    load_state_strict(disc, found[i])
                except CheckpointError as exc:
                    raise UsageError(f"discriminator {i} in {source} does not fit --disc-ndf/--disc-layers: "
                                     f"{str(exc).splitlines()[-1].strip()}") from exc
        if d.main:
            print(f"initialised discriminators {sorted(found)} from {source}", flush=True)
    elif args.init_discriminators:
        raise UsageError(f"--init-discriminators: {source} holds no {DISCRIMINATOR_PREFIX}* discriminators")

    lpips = None
    if args.lpips == "on":
        try:
            lpips = load_lpips(args.vgg_weights, args.lpips_heads, checkpoint=args.lpips_checkpoint)
        except LPIPSWeightsError as exc:
            raise UsageError(f"{exc} (or --lpips off)") from exc
        if args.official_quirks:
            lpips.train()  # the official quirk: lpips's dropout active while training
    model.to(device)
    discs.to(device)
    if lpips is not None:
        lpips.to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else None

    batches = EpochBatches(build_training_data(args, cfg, model), d, args)
    total_batch = args.batch_size * d.world
    per_epoch = args.steps is None
    total_steps = args.steps if not per_epoch else args.epochs * batches.steps_per_epoch
    unit = 1 if not per_epoch else batches.steps_per_epoch
    warmup = int(round((args.warmup if args.warmup is not None else total_steps / unit / 10) * unit))
    lr = args.lr if args.lr is not None else args.blr * total_batch / 256

    gen_named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    disc_named = [(f"{DISCRIMINATOR_PREFIX}{n}", p) for n, p in discs.named_parameters()]
    groups = _decay_groups(gen_named + (disc_named if args.official_quirks else []), args.weight_decay)
    opt_g = torch.optim.AdamW(groups, lr=lr, betas=tuple(args.betas))
    opt_d = torch.optim.AdamW([p for _, p in disc_named], lr=lr, betas=tuple(args.betas),
                              weight_decay=args.disc_weight_decay)
    scaler_g = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    scaler_d = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    # the VAE's posterior samples; seeded as stage 1's device stream
    latent_gen = torch.Generator(device=device).manual_seed(args.seed * 1009 + d.rank + 1)
    options = LossOptions(lpips_weight=args.lpips_weight, lpips_unit_range=args.official_quirks,
                          gan_term_when_off=args.official_quirks)
    return FinetuneRun(
        args=args, d=d, cfg=cfg, model=model, ema=ema, discriminators=discs, lpips=lpips,
        gen_params=[p for _, p in gen_named], disc_params=[p for _, p in disc_named], opt_g=opt_g, opt_d=opt_d,
        scaler_g=scaler_g, scaler_d=scaler_d, amp_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp),
        batches=batches, total_steps=total_steps, total_batch=total_batch, lr=lr,
        lr_at=lr_lambda(warmup, total_steps, args.min_lr / lr if lr > 0 else 0.0), options=options,
        out=Path(args.out), per_epoch=per_epoch, latent_gen=latent_gen,
    )


# ---------------------------------------------------------------------------- checkpoints
def save(run: FinetuneRun) -> None:
    d = run.d
    rng = d.gather(rng_state())
    latent = d.gather(run.latent_gen.get_state().cpu()) if run.latent_gen is not None else None
    if d.main:
        atomic_torch_save({
            "stage": STAGE,
            "model": run.model.state_dict(),
            "ema": run.ema.state_dict() if run.ema is not None else None,
            "discriminators": discriminator_state(run.discriminators),
            "optimizer": run.opt_g.state_dict(),
            "optimizer_discriminator": run.opt_d.state_dict(),
            "scaler": run.scaler_g.state_dict() if run.scaler_g is not None else None,
            "scaler_discriminator": run.scaler_d.state_dict() if run.scaler_d is not None else None,
            "rng": rng,  # one entry per rank
            "latent_generator": latent,  # one entry per rank
            "counters": {"generator": run.gen_counter, "discriminator": run.disc_counter},
            "step": run.step,
            "epoch": run.step // run.steps_per_epoch,
            "config": run.model.config.to_json(),
            "args": {k: v for k, v in vars(run.args).items() if k != "gan_schedule_points"},
        }, run.ckpt_path)
    d.barrier()
    run.last_good = run.step


def resume(run: FinetuneRun, spec: str) -> None:
    d = run.d
    path = run.ckpt_path if spec == "auto" else Path(spec)
    if not path.exists():
        raise UsageError(f"--resume: no checkpoint at {path}")
    # stage 1's reader: a truncated, garbled, incomplete or untrusted file is one line naming it
    ckpt = read_training_checkpoint(path, ("stage", "config", "rng", "step"), "alit-fast finetune")
    if ckpt.get("stage") != STAGE:
        raise UsageError(f"--resume: {path} is not a stage-2 checkpoint (start stage 2 from it with --init instead)")
    missing = [k for k in STAGE2_ENTRIES if k not in ckpt]
    if missing:
        raise UsageError(f"--resume: {path} is incomplete (no {', '.join(missing)})")
    if ckpt["config"] != run.cfg.to_json():
        raise UsageError(f"--resume: {path} was written for a different config")
    if not isinstance(ckpt["rng"], (list, tuple)) or len(ckpt["rng"]) != d.world:
        raise UsageError(f"--resume: {path} was written by another number of processes than this run's {d.world}")
    try:
        _load_stage2_state(run, ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError, AttributeError) as exc:
        raise UsageError(f"--resume: {path} does not fit this run ({type(exc).__name__}: {one_line(exc)[:200]})") from exc
    if d.main:
        print(f"resumed from {path} at step {run.step}", flush=True)


STAGE2_ENTRIES = ("model", "ema", "discriminators", "optimizer", "optimizer_discriminator", "scaler",
                  "scaler_discriminator", "counters")


def _load_stage2_state(run: FinetuneRun, ckpt: dict) -> None:
    d = run.d
    run.model.load_state_dict(ckpt["model"])
    if run.ema is not None and ckpt["ema"] is not None:
        run.ema.load_state_dict(ckpt["ema"])
    found = read_discriminators(ckpt["discriminators"], "cpu")
    for i, disc in enumerate(run.discriminators):
        disc.load_state_dict(found[i])
    run.opt_g.load_state_dict(ckpt["optimizer"])
    run.opt_d.load_state_dict(ckpt["optimizer_discriminator"])
    for scaler, key in ((run.scaler_g, "scaler"), (run.scaler_d, "scaler_discriminator")):
        if scaler is not None and ckpt[key] is not None:
            scaler.load_state_dict(ckpt[key])
    set_rng_state(ckpt["rng"][d.rank])
    if run.latent_gen is not None and ckpt.get("latent_generator") is not None:
        run.latent_gen.set_state(ckpt["latent_generator"][d.rank])
    run.gen_counter = ckpt["counters"]["generator"]
    run.disc_counter = ckpt["counters"]["discriminator"]
    run.step = run.last_good = int(ckpt["step"])


def write_final(run: FinetuneRun) -> None:
    if run.d.main:
        from safetensors.torch import save_file

        run.model.save(str(run.out / "model.safetensors"))
        if run.ema is not None:
            run.ema.save(str(run.out / "ema.safetensors"))
        state = {k: v.detach().contiguous().cpu() for k, v in discriminator_state(run.discriminators).items()}
        write_atomic(run.out / "discriminators.safetensors", lambda tmp: save_file(state, tmp))


# ---------------------------------------------------------------------------- one step
@dataclass
class StepOutput:
    kind: str  # "generator" or "discriminator"
    iteration: int
    factor: float
    terms: dict[str, torch.Tensor]  # 0-d, on the device
    loss: torch.Tensor  # what Health checks
    grad_norm: torch.Tensor
    skipped: torch.Tensor  # the fp16 GradScaler skipped the step (an overflow while it finds its scale)
    images_ok: torch.Tensor
    lr: float = 0.0


def _reduce_grads(params: list[nn.Parameter], d: Dist) -> None:
    """Average the gradients over ranks in one all-reduce (every rank took the loss at the same
    iteration, so the same parameters have gradients everywhere)."""
    if not d.enabled:
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= d.world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset : offset + n].view_as(g))
        offset += n


def _sync_buffers(module: nn.Module, d: Dist) -> None:
    """BatchNorm statistics from rank 0 (as DDP's broadcast_buffers would)."""
    if d.enabled:
        for b in module.buffers():
            dist.broadcast(b, 0)


def _optimize(
    run: FinetuneRun, loss: torch.Tensor, opt, scaler, clip_params, reduce_params
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward, rank average, unscale, clip, step. Returns the pre-clip grad norm and whether
    the GradScaler skipped the step (0-d tensors on the device): an fp16 overflow is how the
    scaler finds its scale, not a diverged run, so Health forgives an inf norm on such a step."""
    opt.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
    else:
        loss.backward()
    _reduce_grads(reduce_params, run.d)
    if scaler is not None:
        scaler.unscale_(opt)
    clip = run.args.grad_clip if run.args.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(clip_params, clip)
    skipped = torch.zeros((), dtype=torch.bool, device=grad_norm.device)
    if scaler is not None:
        scale = scaler.get_scale() if scaler._scale is None else scaler._scale.clone()
        scaler.step(opt)
        scaler.update()
        # update() lowers the scale exactly when the step was skipped (a device compare, no read)
        skipped = (scaler._scale < scale).reshape(()).to(grad_norm.device)
    else:
        opt.step()
    opt.zero_grad(set_to_none=True)
    return grad_norm.detach(), skipped


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def finetune_step(run: FinetuneRun, batch: dict) -> StepOutput:
    args, device = run.args, run.d.device
    step_in_epoch = run.step % run.steps_per_epoch
    if step_in_epoch == 0:
        run.gen_counter = 0
    factor = gan_factor(run.args.gan_schedule_points, run.progress())
    images = batch["image"].to(device, non_blocking=True)
    images_ok = images_in_range(images)
    images = run.model.model_images(images)
    lr = run.lr * run.lr_at(run.step)
    autocast = torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None)
    n_iter = run.cfg.iterations

    if factor > 0 and step_in_epoch % args.disc_every == args.disc_every - 1:
        if args.official_quirks:
            k = run.gen_counter % n_iter  # the official code: always 0 with 8 iterations and a step in 9
        else:
            k = run.disc_counter % n_iter
            run.disc_counter += 1
        disc = run.discriminators[k]
        with autocast:
            terms = discriminator_loss(run.model, disc, images, k, factor, run.latent_gen)
        _set_lr(run.opt_d, lr)
        loss = terms.pop("loss_graph")
        grad_norm, skipped = _optimize(run, loss, run.opt_d, run.scaler_d, run.disc_params, run.disc_params)
        _sync_buffers(disc, run.d)
        kind = "discriminator"
    else:
        k = run.gen_counter % n_iter
        run.gen_counter += 1
        disc = run.discriminators[k]
        # fixed: the generator's GAN term must not train the discriminator; a frozen D also
        # skips computing gradients nobody uses
        disc.requires_grad_(args.official_quirks)
        try:
            with autocast:
                terms = generator_loss(run.model, disc, run.lpips, images, k, factor, run.options, run.latent_gen)
            _set_lr(run.opt_g, lr)
            loss = terms.pop("loss_graph")
            reduce = run.gen_params + (run.disc_params if args.official_quirks else [])
            grad_norm, skipped = _optimize(run, loss, run.opt_g, run.scaler_g, run.gen_params, reduce)
        finally:
            disc.requires_grad_(True)
        if factor > 0 or args.official_quirks:
            _sync_buffers(disc, run.d)
        kind = "generator"
    run.step += 1
    if run.ema is not None:
        update_ema(run.ema, run.model, args.ema)  # after every step, both kinds (as official)
    return StepOutput(kind=kind, iteration=k, factor=factor, terms=terms, loss=terms.get("loss", terms.get("d_loss")),
                      grad_norm=grad_norm, skipped=skipped, images_ok=images_ok, lr=lr)


# ---------------------------------------------------------------------------- logging
def read_step(run: FinetuneRun, out: StepOutput, health: Health) -> dict:
    """The one host read of a logging step: the step's terms (averaged over ranks) and the flags."""
    d = run.d
    names = sorted(out.terms)
    values = torch.stack([out.terms[n].float() for n in names] + [out.grad_norm.float()]) / d.world
    flags = torch.stack([(health.first_bad >= 0).float(), health.images_bad.float()])
    shared = d.sum_(torch.cat([values, flags]))
    host = torch.cat([shared, health.first_bad.float().reshape(1)]).tolist()
    n = len(names)
    return {"terms": dict(zip(names, host[:n])), "grad_norm": host[n], "bad": host[n + 1] > 0,
            "images_bad": host[n + 2] > 0, "first_bad": int(host[n + 3])}


# ---------------------------------------------------------------------------- the loop
def _record(run: FinetuneRun) -> Callable[[int, dict, StepOutput], dict]:
    def record(epoch: int, host: dict, out: StepOutput) -> dict:
        return {"step": run.step, "epoch": epoch, "kind": out.kind, "iteration": out.iteration,
                "gan_factor": out.factor, **host["terms"], "grad_norm": host["grad_norm"], "lr": out.lr}

    return record


def _postfix(host: dict, out: StepOutput, rate: float) -> str:
    return f"{out.kind[0]} k={out.iteration} " + " ".join(f"{k} {v:.3f}" for k, v in host["terms"].items())


def train(args: argparse.Namespace) -> int:
    try:
        return _train(args)
    finally:
        release_run_lock(args.out)


def _train(args: argparse.Namespace) -> int:
    run = open_run(args, build, resume)
    run.model.train()
    run.discriminators.train()
    return drive(run, args, Stage(
        step=lambda batch: finetune_step(run, batch),
        read=lambda out, health: read_step(run, out, health),
        nonfinite_message=lambda host: nonfinite_message(run, host, f"terms {host['terms']}"),
        save=lambda: save(run),
        write_final=lambda: write_final(run),
        progress=Progress(run, bool(args.resume), _record(run), _postfix),
        digest=lambda: f"{weights_digest(run.model)} discriminators {weights_digest(run.discriminators)}",
        epoch_start=ema_epoch_reset(run, args.official_quirks or args.ema_epoch_reset),  # a quirk, or asked for
    ))


def main(argv: list[str]) -> int:
    try:
        return train(parse_args(argv))
    except UsageError as exc:
        print(f"alit-fast train: {exc}", file=sys.stderr)
        return 2
