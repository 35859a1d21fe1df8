"""Stage-1 training (latent distillation, VQGAN frozen): ``python -m alit_fast.train`` / ``alit-fast train``.

Single process or ``torchrun --nproc_per_node=N -m alit_fast.train ...`` (DDP; gloo on CPUs, nccl
on GPUs; rank 0 logs and writes checkpoints). Defaults follow the official recipe: AdamW
(betas 0.9/0.95), blr 1.5e-4 with lr = blr * total batch / 256, weight decay 0.05, cosine schedule
after a linear warm-up of a tenth of the run, grad clip 3.0, an EMA of the weights, fp16 autocast on
GPUs (off on CPUs).

Resuming is exact: the data order is a function of (seed, epoch), every item of (seed, epoch,
index), and the checkpoint holds every RNG state, so on a CPU a resumed run logs the same losses
as an uninterrupted one. Checkpoints are written to a temporary file then renamed, so a kill
never leaves a corrupt one.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..config import PRESETS, ALITConfig
from ..distributed import join_group
from ..errors import OneLineParser, UsageError, one_line, run_command
from ..files import LOCK_NAME, acquire_lock, release_lock, write_atomic
from ..io import ALIT, METADATA_CONFIG_KEY, CheckpointError, load, load_state_strict, read_checkpoint, read_state_dict
from ..io.weights import read_safetensors, torch_load_problem
from ..models import HALTING_MODES, BaseOutput
from ..models.alit import images_in_range
from .base_cache import BaseCacheDataset
from .code_restart import DeadCodeRestarter
from .data import build_dataset
from .utils import (
    atomic_torch_save,
    check_free_space,
    check_number,
    check_writable,
    foreign_run_files,
    resolve_config,
    rng_state,
    seed_everything,
    set_rng_state,
    weights_digest,
)

CHECKPOINT = "checkpoint.pt"
LOG = "log.jsonl"
EXIT_NONFINITE = 3
WHOLE_MODEL = "the whole model"


class NonFiniteLoss(RuntimeError):
    pass


# UsageError (a user error: one line, exit status 2) lives in alit_fast.errors, shared with the CLI


RUN_FILES = (CHECKPOINT, LOG, "model.safetensors", "ema.safetensors")


def threads_note(saved: "int | None") -> str | None:
    """What a CPU run resumed on another thread count should be told (None: nothing): another split
    of the CPU's matmuls sums in another order, so the same run rounds otherwise."""
    if saved is None or saved == torch.get_num_threads():
        return None
    return (f"--resume: the run computed on {saved} CPU threads and this one on {torch.get_num_threads()} (--threads): "
            "it continues, but its losses match an uninterrupted run's only to rounding")


def resume_flag(args: argparse.Namespace) -> str:
    """How to continue this run: --resume, which a run started with --overwrite must take in its place."""
    return "--resume in place of --overwrite" if getattr(args, "overwrite", False) else "--resume"


def prepare_out(out: Path, resume: bool, overwrite: bool, write: bool = True,
                run_files: tuple[str, ...] = RUN_FILES) -> None:
    """Refuse to replace an earlier run (any of ``run_files`` in ``out``) without --resume or
    --overwrite, and (``write``: rank 0) clear what a killed save left behind (write_atomic's
    NAME.tmp files). Every rank runs the checks, so all of them stop on a refusal and none waits
    for the others."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file, not a directory")
    above = out.parent
    while not above.exists():
        above = above.parent
    if not above.is_dir():
        raise UsageError(f"--out {out}: {above} is a file, not a folder")
    if resume and overwrite:
        raise UsageError("--resume continues the run in --out and --overwrite replaces it: pass one of them")
    found = [name for name in run_files if (out / name).exists()]
    foreign = foreign_run_files(out, run_files)
    if foreign:  # a user's file of the same name is never replaced, --overwrite or not
        raise UsageError(f"--out {out} holds files training did not write ({', '.join(foreign)}); they are left "
                         "alone: use a new or empty directory")
    if found and not (resume or overwrite):
        raise UsageError(f"--out {out} already holds a run ({', '.join(found)}); pass --resume to continue it "
                         "or --overwrite to replace it")
    check_writable(str(above if not out.exists() else out), f"--out {out}")
    if not write:
        return
    out.mkdir(parents=True, exist_ok=True)
    # what a kill mid-write leaves: checkpoints (atomic_torch_save) and final weights (ALIT.save),
    # discriminators.safetensors: stage 2's third file; .checkpoint.pt.tmpPID: an older version's
    written = [CHECKPOINT] + [name for name in run_files if name.endswith(".safetensors")] + ["discriminators.safetensors"]
    stale = [*out.glob(f".{CHECKPOINT}.tmp*"), *(out / f"{name}.tmp" for name in written)]
    for path in stale:
        if path.is_file():
            path.unlink()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(prog="alit-fast train", description=__doc__.split("\n\n")[0])
    _model_and_data_options(p)
    _training_options(p)
    _run_options(p)
    args = p.parse_args(argv)
    _check_args(p, args)
    return args


def _model_and_data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None,
                   help=f"preset ({', '.join(PRESETS)}) or a JSON file of ALITConfig fields; default: the config "
                        "stored in --init if it has one, else 'demo'")
    p.add_argument("--stage", default="pretrain", choices=("pretrain", "finetune"),
                   help="pretrain: stage 1 (this); finetune: stage 2, pixels through the VQGAN decoder with L1, LPIPS "
                        "and PatchGAN losses (`--stage finetune --help` lists its options)")
    p.add_argument("--backend", default="auto", choices=("auto", "torch", "triton"))
    p.add_argument("--data", default="synthetic",
                   help="an image folder (recursive), 'synthetic' (complexity levels 0..4), 'photos' "
                        "(scikit-image crops) or 'demo' (both)")
    p.add_argument("--data-length", type=int, default=None, help="items in a synthetic/photos/demo dataset")
    p.add_argument("--base-cache", default=None,
                   help="a directory written by `alit-fast cache-base`: read the VQGAN outputs from it instead "
                        "of running the VQGAN every step (its images are center crops: no augmentation)")
    p.add_argument("--init", default=None,
                   help="what --checkpoint takes elsewhere (demo, a file, a model directory, hf-hub:OWNER/REPO): "
                        "the whole model, or only the VQGAN when it holds nothing but base_tokenizer.* keys")
    p.add_argument("--init-vqgan", default=None, metavar="MODEL",
                   help="take only the VQGAN (base tokenizer) of this model (demo, a file, a directory, hf-hub:...) "
                        "and train the rest from scratch; without --init or --init-vqgan the VQGAN is random")
    p.add_argument("--batch-size", type=int, default=32, help="per process")
    p.add_argument("--workers", type=int, default=0, help="data loader worker processes")


def _training_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--steps", type=int, default=None, help="total optimizer steps (overrides --epochs)")
    p.add_argument("--lr", type=float, default=None, help="absolute learning rate (overrides --blr)")
    p.add_argument("--blr", type=float, default=1.5e-4, help="lr = blr * total batch / 256")
    p.add_argument("--min-lr", type=float, default=0.0, help="the cosine schedule ends here")
    p.add_argument("--warmup", type=float, default=None,
                   help="warm-up length, in epochs (or in steps with --steps); default a tenth of the run")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--betas", type=float, nargs=2, default=(0.9, 0.95))
    p.add_argument("--grad-clip", type=float, default=3.0, help="max grad norm (0: off)")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay per step (0: no EMA)")
    p.add_argument("--ema-epoch-reset", action="store_true",
                   help="copy the live weights into the EMA at every epoch start, as the official code does (its "
                        "saved EMA is then mostly the last epoch's start); off by default")
    p.add_argument("--amp", default=None, choices=("bf16", "fp16", "off"), help="autocast; default fp16 on GPU, off on CPU")
    p.add_argument("--sample-grad-iters", type=int, default=None,
                   help="take the loss at this many random iterations per step (default: all)")
    # "official": the official rule of the model's variant (VQGAN: stochastic; VAE: its no-op)
    p.add_argument("--halting", default="official", choices=HALTING_MODES)
    p.add_argument("--linear-init-std", type=float, default=None,
                   help="re-initialise the trainable Linear weights with this std instead of the official 0.02 "
                        "(not when --init holds a whole model). Small inits put a short run on a long plateau "
                        "where the decoder ignores the latents; 0.1 leaves it within tens of steps")
    p.add_argument("--restart-dead-codes", type=int, default=0, metavar="WINDOW",
                   help="move latent codes unused for WINDOW steps onto fresh encoder outputs (0: off, as "
                        "official); keeps the latent codebook alive in short runs")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in the backward pass: far less memory, ~30%% more compute")


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads per process (0: torch's default)")
    p.add_argument("--out", default="runs/alit")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from OUT/checkpoint.pt (or the checkpoint given)")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=500, help="steps between checkpoints")
    p.add_argument("--log-every", type=int, default=1,
                   help="steps between log lines; the step that logs is the only one that waits for the device "
                        "(a NaN/inf loss is caught there, and before every checkpoint)")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop after this step with a checkpoint, as if interrupted (split a run into jobs)")
    p.add_argument("--time-limit", type=float, default=None,
                   help="stop with a checkpoint once this many seconds have passed (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (the JSONL log is still written)")
    p.add_argument("--weights-digest", action="store_true",
                   help="every rank prints a digest of its final weights (to check that DDP ranks agree)")


def _check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Numbers out of range are refused by name (one line, exit 2): they would train silently wrong."""
    if args.steps is not None and args.steps < 1:
        p.error("--steps must be >= 1")
    if args.sample_grad_iters is not None and args.sample_grad_iters < 1:
        p.error("--sample-grad-iters must be >= 1")
    if args.log_every < 1:
        p.error("--log-every must be >= 1")
    if args.save_every < 1:
        p.error("--save-every must be >= 1")
    for name in ("batch_size", "epochs"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    check_args(p, args)
    return args


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Every number in range, before any work (``p.error``: one line, exit status 2)."""
    for name in ("lr", "blr"):
        value = getattr(args, name)
        if value is not None and not (value >= 0 and math.isfinite(value)):
            p.error(f"--{name} must be a finite number >= 0, got {value}")
    for name in ("data_length", "stop_at"):
        if getattr(args, name, None) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("workers", "threads", "restart_dead_codes"):
        if getattr(args, name, 0) < 0:
            p.error(f"--{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    # (flag, value, low, high, low open, high open): a value out of range would train silently wrong
    ranges = [("--warmup", args.warmup, 0, None, False, False), ("--min-lr", args.min_lr, 0, None, False, False),
              ("--weight-decay", args.weight_decay, 0, None, False, False),
              ("--grad-clip", args.grad_clip, 0, None, False, False), ("--ema", args.ema, 0, 1, False, True),
              ("--linear-init-std", args.linear_init_std, 0, None, True, False),
              ("--time-limit", args.time_limit, 0, None, True, False)]
    ranges += [("--betas", beta, 0, 1, False, True) for beta in args.betas]
    try:
        for flag, value, low, high, low_open, high_open in ranges:
            check_number(flag, value, low, high, low_open, high_open)
    except UsageError as exc:
        p.error(str(exc))


# ---------------------------------------------------------------------------- distributed
class Dist:
    """Who this process is. Started by torchrun (RANK/WORLD_SIZE in the environment) or alone."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        if self.enabled:
            join_group(self.device)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a collective, and a host read: for rare checks)."""
        if not self.enabled:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.device)
        dist.all_reduce(t)
        return t.item() == 0.0

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """All-reduce (sum) on the device, in place; no host read."""
        if self.enabled:
            dist.all_reduce(values)
        return values

    def gather(self, obj):
        if not self.enabled:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


# ---------------------------------------------------------------------------- model set-up
def initial_weights(path: str, flag: str = "--init") -> tuple[dict[str, torch.Tensor], ALITConfig | None]:
    """The state dict of an official or alit_fast checkpoint, and the config stored with it if any;
    a bundled name, a model directory or ``hf-hub:`` spec is read as ``alit_fast.load`` reads it."""
    try:
        if not os.path.isfile(path):  # everything --checkpoint takes: demo, a directory, hf-hub:
            model = load(path, backend="torch")
            return {k: v.clone() for k, v in model.state_dict().items()}, model.config
        if path.endswith(".safetensors") and os.path.isfile(path):
            state, meta = read_safetensors(path, "cpu")  # names a damaged file, checks the fingerprint
            cfg = ALITConfig.from_json(meta[METADATA_CONFIG_KEY]) if METADATA_CONFIG_KEY in meta else None
            return read_state_dict(state, "cpu"), cfg
        return read_checkpoint(path, "cpu")  # a training checkpoint.pt records its config
    except (CheckpointError, FileNotFoundError, ValueError, TypeError) as exc:
        raise UsageError(f"{flag}: {one_line(exc)}") from exc


RANDOM_VQGAN_WARNING = (
    "alit-fast train: warning: no --init or --init-vqgan, so the VQGAN is random: its codes say nothing about "
    "the images and stage 1 can learn nothing useful (pass --init-vqgan demo for the bundled model's VQGAN, "
    "or a VQGAN trained by alit_fast.train_vqgan)")


def load_initial(model: ALIT, state: dict[str, torch.Tensor], flag: str = "--init") -> str:
    """Load ``state`` into ``model``: all of it, or only the VQGAN. Returns what was loaded."""
    prefix = "base_tokenizer."
    try:
        if state and all(k.startswith(prefix) for k in state):
            load_state_strict(model.base_tokenizer, {k[len(prefix):]: v for k, v in state.items()})
            return "the base tokenizer (base_tokenizer.*)"
        load_state_strict(model, state)
    except CheckpointError as exc:  # the checkpoint fits another config: name the flag, in one line
        raise UsageError(f"{flag}: {one_line(exc)} (pass the --config it was trained with)") from exc
    return WHOLE_MODEL


def reinit_linear(model: ALIT, std: float) -> None:
    """Every trainable nn.Linear weight ~ truncated normal(0, std); seeded, so runs stay reproducible."""
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.requires_grad:
            torch.nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)


def lr_lambda(warmup: int, total: int, min_ratio: float):
    """Linear warm-up to 1 over ``warmup`` steps, then a half cosine down to ``min_ratio``."""

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return f


@torch.no_grad()
def update_ema(ema: ALIT, model: ALIT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.lerp_(p.detach().to(e.dtype), 1.0 - decay)


# ---------------------------------------------------------------------------- data
def build_training_data(args: argparse.Namespace, cfg: ALITConfig, model: ALIT) -> Dataset:
    if args.base_cache:
        try:
            ds = BaseCacheDataset(args.base_cache)
            ds.check_model(model)
        except (OSError, ValueError, KeyError) as exc:  # missing, unfinished, damaged or another model's
            raise UsageError(f"--base-cache {args.base_cache}: {one_line(exc)}") from exc
        return ds
    return build_dataset(args.data, cfg.image_size, seed=args.seed, augment=True, length=args.data_length)


class EpochBatches:
    """The batches of one epoch for one rank: a function of (seed, epoch) only, skippable."""

    def __init__(self, dataset: Dataset, d: Dist, args: argparse.Namespace) -> None:
        self.dataset = dataset
        self.sampler = DistributedSampler(dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=args.seed, drop_last=True)
        self.batch_size = args.batch_size
        self.workers = args.workers
        self.steps_per_epoch = len(self.sampler) // self.batch_size
        if self.steps_per_epoch == 0:
            raise UsageError(f"the dataset has {len(dataset)} items: fewer than one batch of {self.batch_size} per process "
                             f"({d.world} processes)")

    def epoch(self, epoch: int, skip_batches: int = 0):
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        indices = list(self.sampler)[skip_batches * self.batch_size : self.steps_per_epoch * self.batch_size]
        # an explicit generator: creating the loader must not draw from the global RNG
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=indices, num_workers=self.workers,
                          drop_last=True, generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------- logging
def _step_of(line: str) -> int | None:
    """The step of a log line; None for a blank line or one a kill cut off mid-write."""
    try:
        return int(json.loads(line).get("step", 0)) if line.strip() else None
    except (ValueError, AttributeError):
        return None


class JsonlLog:
    """One JSON object per step. On resume, lines past the checkpoint's step are dropped, so the
    log matches an uninterrupted run's."""

    def __init__(self, path: Path, keep_until_step: int | None) -> None:
        if keep_until_step is not None and path.exists():
            kept = [ln for ln in path.read_text().splitlines() if _step_of(ln) is not None and _step_of(ln) <= keep_until_step]
            text = "".join(ln + "\n" for ln in kept)  # atomic: a kill or a full disk here keeps the old log whole
            write_atomic(path, lambda tmp: Path(tmp).write_text(text))
        elif keep_until_step is None and path.exists():
            path.unlink()
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _fmt_iters(values: dict[int, float]) -> str:
    return " ".join(f"{v:.2f}" for _, v in sorted(values.items()))


# ---------------------------------------------------------------------------- checkpoints
def save_checkpoint(path: Path, *, model: ALIT, ema: ALIT | None, opt, sched, scaler, step: int, epoch: int,
                    rng: list, gen_states: list, args: argparse.Namespace, code_restart: dict | None = None) -> None:
    atomic_torch_save(
        {
            "model": model.state_dict(),
            "ema": ema.state_dict() if ema is not None else None,
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng,  # one entry per rank
            # one entry per rank: {"sample": the host stream (which iterations take the loss),
            # "halting": the device stream (stochastic halting draws)}
            "generator": gen_states,
            "code_restart": code_restart,
            "step": step,
            "epoch": epoch,
            "config": model.config.to_json(),
            "args": vars(args),
            "threads": torch.get_num_threads(),
        },
        path,
    )


# ---------------------------------------------------------------------------- a run
@dataclass
class Run:
    """Everything a training run holds between steps."""

    args: argparse.Namespace
    d: Dist
    cfg: ALITConfig
    model: ALIT
    ema: ALIT | None
    runner: torch.nn.Module  # the model as stepped: compiled and/or DDP-wrapped
    params: list[torch.nn.Parameter]
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    sample_gen: torch.Generator  # host stream: which iterations take the loss
    halting_gen: torch.Generator  # device stream: stochastic halting draws
    restarter: DeadCodeRestarter | None
    batches: EpochBatches
    total_steps: int
    total_batch: int
    out: Path
    step: int = 0
    last_good: int | None = None  # the step of the last checkpoint known to be finite

    @property
    def ckpt_path(self) -> Path:
        return self.out / CHECKPOINT


def build(args: argparse.Namespace, d: Dist) -> Run:
    """Model, EMA, data, optimizer, schedule and random streams of a fresh run (before resuming)."""
    device = d.device
    amp = args.amp or ("fp16" if device.type == "cuda" else "off")
    seed_everything(args.seed + d.rank)
    init_state, init_cfg = initial_weights(args.init) if args.init else (None, None)
    vqgan_state, vqgan_cfg = initial_weights(args.init_vqgan, "--init-vqgan") if args.init_vqgan else (None, None)
    cfg = resolve_config(args.config) if args.config else (init_cfg or vqgan_cfg or PRESETS["demo"])
    if args.sample_grad_iters is not None and args.sample_grad_iters > cfg.iterations:
        raise UsageError(f"--sample-grad-iters {args.sample_grad_iters}: the model has only {cfg.iterations} iterations")
    model = ALIT(cfg)
    whole_model = False
    if init_state is not None:
        what = load_initial(model, init_state)
        whole_model = what == WHOLE_MODEL
        if d.main:
            print(f"initialised {what} from {args.init}", flush=True)
    if vqgan_state is not None:
        what = load_initial(model, {k: v for k, v in vqgan_state.items() if k.startswith("base_tokenizer.")}, "--init-vqgan")
        if d.main:
            print(f"initialised {what} from {args.init_vqgan}", flush=True)
    if args.linear_init_std is not None and not whole_model:
        reinit_linear(model, args.linear_init_std)
    model.set_backend(args.backend)
    model.set_activation_checkpointing(args.activation_checkpointing)
    model.to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else None

    batches = EpochBatches(build_training_data(args, cfg, model), d, args)
    total_batch = args.batch_size * d.world
    total_steps = args.steps if args.steps is not None else args.epochs * batches.steps_per_epoch
    unit = 1 if args.steps is not None else batches.steps_per_epoch
    warmup = int(round((args.warmup if args.warmup is not None else total_steps / unit / 10) * unit))
    lr = args.lr if args.lr is not None else args.blr * total_batch / 256

    params = model.trainable_parameters()  # the VQGAN is frozen and stays out of the optimizer
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]  # biases and norms, as in MAE
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=tuple(args.betas))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(warmup, total_steps, args.min_lr / lr if lr > 0 else 0.0))
    scaler = torch.amp.GradScaler(device.type) if amp == "fp16" else None
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
    # two streams, both in the checkpoint: iteration sampling runs on the host (the same draws on
    # every device), halting draws where the model runs
    stream_seed = args.seed * 1009 + d.rank
    sample_gen = torch.Generator().manual_seed(stream_seed)
    halting_gen = torch.Generator(device=device).manual_seed(stream_seed + 1)
    if args.restart_dead_codes > 0 and model.quantize is None:
        raise UsageError("--restart-dead-codes: this model's 1D tokens are continuous; it has no latent codebook")
    restarter = DeadCodeRestarter(model.quantize, args.restart_dead_codes, args.seed) if args.restart_dead_codes > 0 else None

    runner: torch.nn.Module = torch.compile(model) if args.compile else model
    if d.enabled:
        from torch.nn.parallel import DistributedDataParallel as DDP

        # some parameters get no gradient in a step: with halting off the mask token is never used,
        # and with sampled iterations the later ones may not reach the loss
        unused = args.halting == "off" or (args.sample_grad_iters is not None and args.sample_grad_iters < cfg.iterations)
        runner = DDP(runner, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused)
    return Run(args=args, d=d, cfg=cfg, model=model, ema=ema, runner=runner, params=params, opt=opt, sched=sched,
               scaler=scaler, amp_dtype=amp_dtype, sample_gen=sample_gen, halting_gen=halting_gen, restarter=restarter,
               batches=batches, total_steps=total_steps, total_batch=total_batch, out=Path(args.out))


# what a checkpoint.pt must hold to resume from (written by save_checkpoint)
CHECKPOINT_ENTRIES = ("model", "ema", "optimizer", "scheduler", "scaler", "rng", "generator", "step", "config")


def _other_checkpoints(path: Path) -> str:
    """What the user can fall back on when ``path`` cannot be resumed from, for the message."""
    folder = path.parent if path.parent.is_dir() else None
    others = sorted(p.name for p in folder.glob("*.pt") if p != path and p.is_file()) if folder else []
    if others:
        return f"; other checkpoints in {folder}: {', '.join(others)} (pass one as --resume PATH)"
    return "; no earlier checkpoint is kept there: start again with --overwrite"


def read_training_checkpoint(path: Path, entries: tuple[str, ...] = CHECKPOINT_ENTRIES,
                             writer: str = "alit-fast train") -> dict:
    """A checkpoint.pt to resume from; a missing, damaged or incomplete one is a UsageError naming it."""
    if path.is_dir():
        raise UsageError(f"--resume: {path} is a directory, not a checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/pickle/zip errors of a truncated, garbled or untrusted file
        raise UsageError(f"--resume: {torch_load_problem(str(path), exc)}{_other_checkpoints(path)}") from exc
    if not isinstance(ckpt, dict):
        raise UsageError(f"--resume: {path} holds a {type(ckpt).__name__}, not a training checkpoint"
                         f"{_other_checkpoints(path)}")
    missing = [k for k in entries if k not in ckpt]
    if missing:
        raise UsageError(f"--resume: {path} is incomplete (no {', '.join(missing)}): not a checkpoint written by "
                         f"{writer}{_other_checkpoints(path)}")
    return ckpt


def resume(run: Run, spec: str) -> None:
    """Load a checkpoint into ``run``: weights, EMA, optimizer, schedule, scaler, every random stream.

    A bare ``--resume`` with no checkpoint in --out yet (a first run killed before, or during, its
    first save) starts the run from step 0."""
    d = run.d
    path = run.ckpt_path if spec == "auto" else Path(spec)
    if not path.exists():
        if spec == "auto":
            if d.main:
                print(f"--resume: no checkpoint in {run.out} yet; starting from step 0", flush=True)
            return
        raise UsageError(f"--resume: no checkpoint at {path}")
    ckpt = read_training_checkpoint(path)
    if ckpt["config"] != run.cfg.to_json():
        raise UsageError(f"--resume: {path} was written for a different config")
    if len(ckpt["rng"]) != d.world:
        raise UsageError(f"--resume: {path} was written by {len(ckpt['rng'])} processes, this run has {d.world}")
    try:
        _load_run_state(run, ckpt)
    except (RuntimeError, KeyError, ValueError, TypeError, IndexError) as exc:
        raise UsageError(f"--resume: {path} does not fit this run ({type(exc).__name__}: {one_line(exc)[:200]})"
                         f"{_other_checkpoints(path)}") from exc
    run.step = run.last_good = ckpt["step"]
    if d.main:
        print(f"resumed from {path} at step {run.step}", flush=True)
        note = threads_note(ckpt.get("threads")) if d.device.type == "cpu" else None
        if note:
            print(note, flush=True)


def _load_run_state(run: Run, ckpt: dict) -> None:
    d = run.d
    run.model.load_state_dict(ckpt["model"])
    if run.ema is not None and ckpt["ema"] is not None:
        run.ema.load_state_dict(ckpt["ema"])
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    if run.scaler is not None and ckpt["scaler"] is not None:
        run.scaler.load_state_dict(ckpt["scaler"])
    set_rng_state(ckpt["rng"][d.rank])
    streams = ckpt["generator"][d.rank]
    if isinstance(streams, dict):
        run.sample_gen.set_state(streams["sample"])
        run.halting_gen.set_state(streams["halting"])
    elif streams is not None:  # written before the streams were split: one CPU generator drove both
        run.sample_gen.set_state(streams)
        if run.halting_gen.device.type == "cpu":
            run.halting_gen.set_state(streams)
    if run.restarter is not None and ckpt.get("code_restart") is not None:
        run.restarter.load_state_dict(ckpt["code_restart"])


def save(run: Run) -> None:
    """A checkpoint of the run at its current step, on rank 0; every rank takes part."""
    d = run.d
    rng = d.gather(rng_state())
    gens = d.gather({"sample": run.sample_gen.get_state(), "halting": run.halting_gen.get_state().cpu()})
    if d.main:
        save_checkpoint(run.ckpt_path, model=run.model, ema=run.ema, opt=run.opt, sched=run.sched, scaler=run.scaler,
                        step=run.step, epoch=run.step // run.batches.steps_per_epoch, rng=rng, gen_states=gens,
                        args=run.args, code_restart=run.restarter.state_dict() if run.restarter is not None else None)
    d.barrier()
    run.last_good = run.step


def write_final(run: Run) -> None:
    if run.d.main:
        run.model.save(str(run.out / "model.safetensors"))
        if run.ema is not None:
            run.ema.save(str(run.out / "ema.safetensors"))


def written_message(out: Path, ema: bool) -> str:
    """Where the trained model is and how to use it: the last line of a finished run."""
    best = out / ("ema.safetensors" if ema else "model.safetensors")
    return (f"wrote {out / 'model.safetensors'}" + (f" and {best} (the EMA weights)" if ema else "")
            + f"; use it with --checkpoint {best} or alit_fast.load({str(best)!r})")


# ---------------------------------------------------------------------------- one step
@dataclass
class StepResult:
    """A step's figures, left on the device until a log line needs them."""

    loss: torch.Tensor
    per_iteration: dict[int, torch.Tensor]
    nll: dict[int, torch.Tensor]
    grad_norm: torch.Tensor
    codes_moved: int
    images_ok: torch.Tensor  # 0-d bool: the batch's values were in [0, 1]
    # 0-d bool: the fp16 GradScaler skipped the step. An inf gradient then is how the scaler finds
    # its scale (its first steps overflow as a rule), not a diverged run
    skipped: torch.Tensor | None = None


def train_step(run: Run, batch: dict) -> StepResult:
    """Forward, backward, clip, optimizer, schedule, code restarts and EMA: no host read of the
    device (with --amp fp16, torch's GradScaler reads its inf flag once)."""
    device = run.d.device
    args = run.args
    images = batch["image"].to(device, non_blocking=True)
    base = None
    if "z" in batch:
        base = BaseOutput(z=batch["z"].to(device).float(), gt_indices=batch["gt_indices"].to(device).long())
    elif "mean" in batch:  # a VAE posterior from the cache: the model draws this step's sample
        base = BaseOutput(z=None, mean=batch["mean"].to(device).float(), std=batch["std"].to(device).float())
    with torch.autocast(device.type, dtype=run.amp_dtype, enabled=run.amp_dtype is not None):
        result = run.runner(images, base=base, halting=args.halting, sample_grad_iters=args.sample_grad_iters,
                            generator=run.sample_gen, halting_generator=run.halting_gen, check_images=False)
    run.opt.zero_grad(set_to_none=True)
    if run.scaler is not None:
        run.scaler.scale(result.loss).backward()
        run.scaler.unscale_(run.opt)
    else:
        result.loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(run.params, args.grad_clip if args.grad_clip > 0 else float("inf"))
    skipped = None
    if run.scaler is not None:
        scale = run.scaler._scale.clone()
        run.scaler.step(run.opt)
        run.scaler.update()
        # update() lowers the scale exactly when it skipped the step: a device compare, no read
        skipped = (run.scaler._scale < scale).reshape(())
    else:
        run.opt.step()
    run.sched.step()
    run.step += 1
    moved = run.restarter.after_step(run.step, run.opt) if run.restarter is not None else None
    if run.ema is not None:
        if moved is not None and len(moved):  # an average of an old and a moved code is neither
            with torch.no_grad():
                run.ema.quantize.embedding.weight[moved] = run.model.quantize.embedding.weight[moved]
        update_ema(run.ema, run.model, args.ema)
    return StepResult(loss=result.loss.detach(), per_iteration=result.per_iteration, nll=result.nll,
                      grad_norm=grad_norm.detach(), codes_moved=0 if moved is None else len(moved),
                      images_ok=images_in_range(images), skipped=skipped)


class Health:
    """Whether every step since the last read had images in [0, 1] and a finite loss and gradient,
    kept on the device and read only when a log line or a checkpoint needs it (in that read).
    Every stage's step result has the fields it checks (loss, grad_norm, skipped, images_ok)."""

    def __init__(self, device: torch.device) -> None:
        self.first_bad = torch.full((), -1, dtype=torch.int64, device=device)
        self.images_bad = torch.zeros((), dtype=torch.bool, device=device)

    def update(self, step: int, result: StepResult) -> None:
        grad_ok = torch.isfinite(result.grad_norm)
        if result.skipped is not None:
            grad_ok = grad_ok | result.skipped.to(grad_ok.device)
        bad = ~(torch.isfinite(result.loss) & grad_ok & result.images_ok)
        self.first_bad = torch.where(bad & (self.first_bad < 0), step, self.first_bad)
        self.images_bad = self.images_bad | ~result.images_ok


def read_step(run: Run, result: StepResult, health: Health) -> dict:
    """The one host read of a logging step: the rank-mean loss, whether any rank saw a non-finite
    step (and the first one), and this rank's per-iteration figures."""
    d = run.d
    loss = result.loss.float().reshape(1)
    # summed over ranks: the mean loss, and a count of ranks that went bad (all ranks see it,
    # so all stop together)
    flags = torch.stack([(health.first_bad >= 0).float(), health.images_bad.float()])
    shared = d.sum_(torch.cat([loss, flags]))
    first_bad = health.first_bad.float().reshape(1)
    iters = sorted(result.per_iteration)
    local = [result.grad_norm.float().reshape(1), first_bad]
    local += [result.per_iteration[t].float().reshape(1) for t in iters] + [result.nll[t].float().reshape(1) for t in iters]
    values = torch.cat([shared, *local]).tolist()
    n = len(iters)
    return {
        "loss": values[0] / d.world,
        "bad": values[1] > 0,
        "images_bad": values[2] > 0,
        "grad_norm": values[3],
        "first_bad": int(values[4]),
        "per_iteration": dict(zip(iters, values[5 : 5 + n])),
        "nll": dict(zip(iters, values[5 + n : 5 + 2 * n])),
    }


def nonfinite_message(run, host: dict, values: str, data_hint: str = "") -> str:
    """Why a training stage stops at a bad step (``host`` from its ``read``): the first bad step,
    the read ``values`` (the stage's own figures), and where to resume from."""
    at = host["first_bad"] if host["first_bad"] > 0 else run.step
    where = (f"the last good checkpoint is {run.ckpt_path} (step {run.last_good})." if run.last_good is not None
             else "no checkpoint had been written yet.")
    if host["images_bad"]:
        return (f"a batch had image values outside [0, 1] (first bad step {at}, read at step {run.step}). Stopping; "
                f"{where}{data_hint}")
    return (f"non-finite loss or gradient at step {at} (read at step {run.step}); {values}. Stopping; {where} "
            "Try a lower --lr/--blr, --grad-clip, or --amp off.")


def _stage1_nonfinite_message(run: Run, host: dict) -> str:
    return nonfinite_message(run, host, f"loss {host['loss']:.4g}, per-iteration losses {host['per_iteration']}",
                             " Check the data (a --base-cache written from other images?).")


# ---------------------------------------------------------------------------- logging
class Progress:
    """The JSONL log and the progress bar (rank 0). ``record(epoch, host, result)`` gives a read
    step's log fields and ``postfix(host, result, rate)`` the bar's text; the throughput and the
    elapsed time are added here."""

    def __init__(
        self,
        run,
        resumed: bool,
        record: Callable[[int, dict, object], dict],
        postfix: Callable[[dict, object, float], str],
    ) -> None:
        self.run, self.record, self.postfix = run, record, postfix
        self.log = JsonlLog(run.out / LOG, run.step if resumed else None) if run.d.main else None
        self.bar = None
        if run.d.main and not run.args.no_progress:
            from tqdm import tqdm

            self.bar = tqdm(total=run.total_steps, initial=run.step, unit="step", dynamic_ncols=True, file=sys.stderr)
        self.start = time.time()
        self._since = (time.time(), run.step)

    def write(self, epoch: int, host: dict, result) -> None:
        run = self.run
        now = time.time()
        t0, s0 = self._since
        rate = run.total_batch * (run.step - s0) / max(now - t0, 1e-9)
        self._since = (now, run.step)
        if self.log is None:
            return
        self.log.write({**self.record(epoch, host, result), "images_per_s": rate, "time": round(now - self.start, 3)})
        if self.bar is not None:
            self.bar.set_postfix_str(self.postfix(host, result, rate))

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.log is not None:
            self.log.close()


def _stage1_record(run: Run) -> Callable[[int, dict, StepResult], dict]:
    def record(epoch: int, host: dict, result: StepResult) -> dict:
        return {"step": run.step, "epoch": epoch, "loss": host["loss"],
                "per_iteration": {str(k): v for k, v in host["per_iteration"].items()},
                "nll": {str(k): v for k, v in host["nll"].items()},
                "lr": run.opt.param_groups[0]["lr"], "grad_norm": host["grad_norm"],
                **({"codes_moved": result.codes_moved} if run.restarter is not None else {})}

    return record


def _stage1_postfix(host: dict, result: StepResult, rate: float) -> str:
    return f"loss {host['loss']:.3f} | iters {_fmt_iters(host['per_iteration'])} | {rate:.1f} img/s"


# ---------------------------------------------------------------------------- the loop
@dataclass
class Stage:
    """What a training stage plugs into the shared loop: its step and how to read, log, save it."""

    step: Callable[[object], object]  # one optimizer step on a batch -> its (device-side) result
    read: Callable[[object, "Health"], dict]  # the one host read of a logging step; "bad" says stop
    nonfinite_message: Callable[[dict], str]
    save: Callable[[], None]
    write_final: Callable[[], None]
    progress: Progress
    digest: Callable[[], str]
    epoch_start: Callable[[int], None] | None = None  # before an epoch's first step


def drive(run, args: argparse.Namespace, stage: Stage) -> int:
    """Steps until ``--steps``/``--stop-at`` or ``--time-limit``, reading the device only where a
    log line or a checkpoint needs it; a non-finite step stops the run with EXIT_NONFINITE."""
    d = run.d
    health = Health(d.device)
    stop_at = min(run.total_steps, args.stop_at) if args.stop_at is not None else run.total_steps
    status = 0
    timed_out = False
    try:
        while run.step < stop_at and not timed_out:
            epoch, skip = divmod(run.step, run.batches.steps_per_epoch)
            if skip == 0 and stage.epoch_start is not None:
                stage.epoch_start(epoch)
            for batch in run.batches.epoch(epoch, skip):
                result = stage.step(batch)
                health.update(run.step, result)
                stage.progress.tick()
                at_end = run.step >= stop_at
                saving = run.step % args.save_every == 0 or at_end
                # host-only on one process; on several, every rank must agree (a collective), so
                # it is asked only where the step reads the device anyway
                reading = saving or run.step % args.log_every == 0
                if args.time_limit is not None and (reading or not d.enabled):
                    timed_out = not d.all_true(time.time() - stage.progress.start <= args.time_limit)
                    saving = saving or timed_out
                if reading or timed_out:
                    host = stage.read(result, health)
                    if host["bad"]:
                        raise NonFiniteLoss(stage.nonfinite_message(host))
                    stage.progress.write(epoch, host, result)
                if saving:
                    stage.save()
                if at_end or timed_out:
                    break
        if timed_out and run.step < run.total_steps and d.main:
            print(f"time limit reached at step {run.step}; continue with {resume_flag(args)}", flush=True)
        if run.step >= run.total_steps:
            stage.write_final()
            if d.main:
                print(written_message(run.out, run.ema is not None), flush=True)
    except NonFiniteLoss as exc:
        if d.main:
            print(f"\nalit-fast train: {exc}", file=sys.stderr, flush=True)
        status = EXIT_NONFINITE
    finally:
        stage.progress.close()
    if args.weights_digest:
        print(f"rank {d.rank} weights sha256 {stage.digest()}", flush=True)
    d.close()
    return status


def ema_epoch_reset(run, enabled: bool) -> Callable[[int], None] | None:
    """The official per-epoch EMA reset (the live weights copied into the EMA) as a
    ``Stage.epoch_start``; None when it is off or the run keeps no EMA."""
    if not enabled or run.ema is None:
        return None
    return lambda epoch: update_ema(run.ema, run.model, 0.0)


def open_run(args: argparse.Namespace, build: Callable, resume: Callable):
    """The process group, threads, the output folder (rank 0 prepares it while the others wait),
    then ``build(args, d)`` and, with ``--resume``, ``resume(run, path)``."""
    d = Dist()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    prepare_out(Path(args.out), bool(args.resume), args.overwrite, write=d.main)
    if d.main:  # one run per folder: a second one refuses by name (released by release_run_lock)
        acquire_lock(args.out, "alit-fast train")
    d.barrier()
    run = build(args, d)
    if d.main:  # checkpoint.pt (weights, EMA, two Adam moments) and the two final weight files
        params = sum(p.numel() * p.element_size() for p in run.model.parameters())
        check_free_space(args.out, 7 * params + (1 << 20), f"--out {args.out}")
    if args.resume:
        resume(run, args.resume)
    return run


def release_run_lock(out: str | os.PathLike) -> None:
    release_lock(os.path.join(os.fspath(out), LOCK_NAME))


def train(args: argparse.Namespace) -> int:
    try:
        return _train(args)
    finally:
        release_run_lock(args.out)


def _train(args: argparse.Namespace) -> int:
    run = open_run(args, build, resume)
    # after every check (data, free space, --resume): a refused run prints its one line and nothing else
    if not (args.init or args.init_vqgan or args.base_cache or args.resume) and run.d.main:
        print(RANDOM_VQGAN_WARNING, file=sys.stderr, flush=True)
    run.model.train()
    return drive(run, args, Stage(
        step=lambda batch: train_step(run, batch),
        read=lambda result, health: read_step(run, result, health),
        nonfinite_message=lambda host: _stage1_nonfinite_message(run, host),
        save=lambda: save(run),
        write_final=lambda: write_final(run),
        progress=Progress(run, bool(args.resume), _stage1_record(run), _stage1_postfix),
        digest=lambda: weights_digest(run.model),
        epoch_start=ema_epoch_reset(run, args.ema_epoch_reset),
    ))


def main(argv: list[str] | None = None) -> int:
    # a user error is one line and exit status 2; anything else is a bug and keeps its traceback
    return run_command("alit-fast train", _main, argv)


def _main(argv: list[str] | None) -> int:
    args = parse_args(argv)
    if args.stage != "pretrain":  # stage 2 is routed by alit_fast.training.stages, before parsing
        raise UsageError(f"--stage {args.stage}: run it as `python -m alit_fast.train` or `alit-fast train`")
    return train(args)


if __name__ == "__main__":
    sys.exit(main())
