"""Running under ``torchrun``: which rank this process is, its device, and joining the group.

One place for every command that runs on several processes (training, evaluate, pretokenize),
so they agree on the backend and the timeout.
"""
from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# a collective waits for the slowest rank, and after uneven work (pretokenize's last shards,
# evaluate's final reduce, a checkpoint written by rank 0) that can take long; a rank that dies
# is ended by torchrun together with the others, so the timeout only bounds a real hang
TIMEOUT = timedelta(hours=2)


def rank_world() -> tuple[int, int]:
    """(rank, world size) as torchrun sets them; (0, 1) for a process on its own."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun a CUDA device means this rank's GPU, cuda:LOCAL_RANK (made the current one);
    anything else is returned as it is."""
    if rank_world()[1] <= 1 or device.type != "cuda":
        return device
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    torch.cuda.set_device(device)
    return device


def join_group(device: torch.device) -> bool:
    """Join torchrun's process group (nccl for a CUDA ``device``, gloo otherwise). Returns whether
    this call started it (then the caller ends it); False alone or when a group already exists."""
    if rank_world()[1] <= 1 or not dist.is_available() or dist.is_initialized():
        return False
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return True
