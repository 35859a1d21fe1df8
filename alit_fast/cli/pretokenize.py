"""``alit-fast pretokenize``: a whole image folder (or webdataset ``.tar`` shards) to sharded token
files and one index, for training a generator on tokens. Resumes after a kill (finished shards
are kept, unless their images changed on disk since: each shard's stamps record says); under
``torchrun --nproc_per_node=N`` each rank writes its own shards (k mod N) and their stamps
records, and rank 0 writes the index, which is then the same, byte for byte, as a one-process run's.
Also reached as ``alit-fast encode DIR --shard-size S --out OUT_DIR``."""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..distributed import join_group, rank_device, rank_world
from ..files import acquire_lock, release_lock
from ..io.images import PREPROCESSING, READER_VERSION, describe_notes, image_notes
from ..training.utils import package_version, weights_digest
from ..inference import (
    FALLBACKS,
    criterion_name,
)
from ..io.token_dataset import (
    INDEX_NAME,
    Plan,
    encode_shard,
    list_sources,
    recorded_plan,
    owned_files,
    read_source,
    save_shard,
    shard_status,
    stamp_shard,
    write_index,
)
from ._common import (
    OneLineParser,
    UsageError,
    add_model_args,
    add_reader_args,
    check_encode_options,
    check_free_space,
    check_output_dir,
    check_positive,
    checkpoint_spec,
    device_from,
    CRITERION_HELP,
    histogram,
    unmet_line,
    load_model_or_raise,
    parse_encode_options,
    run_command,
)

PROG = "alit-fast pretokenize"


def _parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Tokenize a dataset into shards plus an index.", epilog=PREPROCESSING)
    p.add_argument("inputs", nargs="+", help="image folders (recursive), image files, or .tar shards")
    add_model_args(p, "demo")
    p.add_argument("--out", required=True, help="the output directory (new, empty, or a run of the same plan to resume)")
    p.add_argument("--shard-size", type=int, default=1000, help="images per shard file (default 1000)")
    p.add_argument("--criterion", default=None, help=CRITERION_HELP)
    p.add_argument("--min-tokens", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--fallback", choices=FALLBACKS, default="max",
                   help="an image that never meets the criterion gets max_tokens (max) or its best-scoring count (best)")
    p.add_argument("--overwrite", action="store_true",
                   help="remove the shards and index of an earlier run of another plan in --out first")
    add_reader_args(p)
    return p


def main(argv: list[str] | None = None, prog: str = PROG) -> int:
    # every rank meets the same user error; one line from the first is enough
    return run_command(prog, lambda a: _main(a, prog), argv, speak=rank_world()[0] == 0)


def _main(argv: list[str] | None, prog: str) -> int:
    args = _parser(prog).parse_args(argv)
    rank, world = rank_world()
    check_positive("--shard-size", args.shard_size)
    criterion = parse_encode_options(args)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out} is a file; give a directory")
    check_output_dir(args.out)
    try:
        sources = list_sources(args.inputs)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if not sources:
        raise UsageError(f"no images found in {', '.join(args.inputs)}")
    device = rank_device(device_from(args.device))
    model = load_model_or_raise(args.checkpoint, args.backend, device)
    criterion = check_encode_options(model, criterion, args)
    # the encode options are part of the plan: another choice is another run
    options = criterion_name(criterion) + "".join(
        f" {flag}={value}" for flag, value in (("min_tokens", args.min_tokens), ("max_tokens", args.max_tokens),
                                               ("fallback", args.fallback)) if value not in (None, "max"))
    # the weights, not only their path or name: a file replaced by other weights is another run
    plan = Plan(tuple(sources), args.shard_size, model.config.to_json(), checkpoint_spec(args.checkpoint),
                options, args.batch_size, weights_digest(model), f"{package_version()} reader {READER_VERSION}")

    created = not os.path.exists(args.out)
    os.makedirs(args.out, exist_ok=True)
    lock = acquire_lock(args.out, "alit-fast pretokenize") if rank == 0 else None
    try:
        foreign = _check_out(args, plan, len(sources), model.config.max_tokens)
        _run(args, plan, model, criterion, device, rank, world, foreign)
    finally:
        if lock:
            release_lock(lock)
            if created and not os.listdir(args.out):  # refused before writing: leave no trace
                os.rmdir(args.out)
    return 0


def _check_out(args: argparse.Namespace, plan: Plan, images: int, max_tokens: int) -> list:
    """What is already in --out: nothing, or this plan's own files (resume), or refuse; and room
    for the shards (at most max_tokens int32 codes per image), their stamps records and the index."""
    ours = owned_files(args.out)
    strangers = sorted(set(os.listdir(args.out)) - {p.name for p in ours})
    if strangers:  # only files it can prove it wrote are ever replaced, --overwrite or not
        raise UsageError(f"--out {args.out} holds files this command did not write ({', '.join(strangers[:3])}"
                         f"{', ...' if len(strangers) > 3 else ''}); they are left alone: use a new or empty directory")
    foreign = [p for p in ours if p.suffix in (".safetensors", ".json") and recorded_plan(p) != plan.fingerprint]
    if foreign and not args.overwrite:
        old = next((p for p in foreign if p.name == INDEX_NAME), foreign[0])
        raise UsageError(f"--out {args.out} holds a run of other images, model weights, options or alit_fast "
                         f"version ({old.name}); pass --overwrite to replace it")
    # each image: its codes and its source name three times (shard, index, stamps record); each
    # shard, and the index: the model's config and their own metadata
    names = sum(len(source.encode()) for source in plan.sources)
    files = (plan.num_shards + 1) * (2 * len(plan.config_json) + 2048)
    check_free_space(args.out, images * (4 * max_tokens + 200) + 3 * names + files, f"--out {args.out}")
    return foreign


def _run(args: argparse.Namespace, plan: Plan, model, criterion, device: torch.device, rank: int, world: int,
         foreign: list) -> None:
    """The shards still to do (this rank's share), then the index (rank 0)."""
    ours = owned_files(args.out)
    join_group(device)
    try:
        if rank == 0:  # leftovers of a killed save, and (only with --overwrite) another run's files
            for path in [p for p in ours if p.name.endswith(".tmp")] + foreign:
                path.unlink(missing_ok=True)
        if world > 1:
            dist.barrier()
        status = {k: shard_status(args.out, plan, k) for k in range(plan.num_shards) if k % world == rank}
        todo = [k for k, state in status.items() if state != "done"]

        def encode(batches):
            # continuous batching within the shard: its tokens still depend on its images alone
            return model.encode_stream((images.to(device) for images in batches), criterion, min_tokens=args.min_tokens,
                                       max_tokens=args.max_tokens, fallback=args.fallback, batch_size=args.batch_size)

        started, done_images = time.perf_counter(), 0
        with image_notes() as notes, tqdm(total=sum(len(plan.shard_sources(k)) for k in todo), unit="img",
                                          desc=f"pretokenize[{rank}]", file=sys.stderr,
                                          disable=rank != 0 and world > 1) as bar:
            for k in todo:
                stamps = stamp_shard(plan.shard_sources(k))  # before the images are read
                batch = encode_shard(plan, k, lambda s: read_source(s, model.config.image_size), encode, args.workers)
                save_shard(args.out, plan, k, batch, stamps)
                done_images += len(plan.shard_sources(k))
                bar.update(len(plan.shard_sources(k)))
        elapsed = time.perf_counter() - started
        redone, changed = len(todo), sum(state == "changed" for state in status.values())
        if world > 1:  # every rank's counts, and the barrier before the index
            counts = torch.tensor([redone, changed], device=device)
            dist.all_reduce(counts)
            redone, changed = counts.tolist()
        if rank == 0:
            index = write_index(args.out, plan)
            lengths = [item[1] for item in index["items"]]
            mean = sum(lengths) / max(1, len(lengths))
            resumed = plan.num_shards - redone
            print(f"wrote {args.out}: {len(lengths)} images in {plan.num_shards} shards, mean {mean:.1f} tokens"
                  + (f", {len(index['skipped'])} unreadable (listed in {INDEX_NAME})" if index["skipped"] else "")
                  + (f"; {resumed} shards kept from an earlier run" if resumed else "")
                  + (f"; {changed} redone because their images changed (size, times or inode) since the "
                     "earlier run, or had been written too shortly before it read them to tell" if changed else "")
                  + (f"; {done_images / max(elapsed, 1e-9):.1f} images/s on rank 0" if done_images else ""))
            print(histogram(lengths, model.config.tokens_per_iter, model.config.max_tokens))
            unmet = unmet_line(lengths, criterion, args, model.config.max_tokens)
            if unmet:
                print(unmet)
            if describe_notes(notes, model.config.image_size):
                print(f"{PROG}: {describe_notes(notes, model.config.image_size)}", file=sys.stderr)
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
