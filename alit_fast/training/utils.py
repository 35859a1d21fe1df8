"""Small pieces the trainers and the CLI share: config resolution, seeding, RNG capture, atomic
writes (user errors and their one-line report are alit_fast.errors)."""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from ..config import PRESETS, ALITConfig
from ..errors import UsageError, one_line
from ..files import write_atomic
from ..io.weights import METADATA_CONFIG_KEY


def check_writable(folder: str, what: str) -> None:
    """Create and remove a file in ``folder``: the one test a read-only mount, a full disk or a
    forbidden folder cannot pass, whoever runs it (os.access says yes to root on a read-only mount)."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".alit_fast-probe-", dir=folder)
        os.close(fd)
        os.remove(probe)
    except OSError as exc:
        raise UsageError(f"{what}: the folder {folder} is not writable ({exc.strerror or exc})") from exc


def written_by_a_run(path: Path) -> bool:
    """Whether ``path`` is a file a training run writes, from its header or first line: safetensors
    with an alit_fast config in its metadata, a torch archive (.pt), a log of step records (or an
    empty one), a JSON object (a summary). A user's file of the same name is none of these."""
    try:
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                return METADATA_CONFIG_KEY in (f.metadata() or {})
        if path.suffix == ".pt":
            with zipfile.ZipFile(path) as archive:
                return any(name.endswith("/data.pkl") for name in archive.namelist())
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".jsonl":
            first = text.split("\n", 1)[0]
            record = json.loads(first) if first.strip() else {"step": None}
            return isinstance(record, dict) and "step" in record
        return isinstance(json.loads(text), dict)
    except Exception:  # unreadable as any of these: not a file a run wrote
        return False


def foreign_run_files(out: Path, names: tuple[str, ...]) -> list[str]:
    """Those of ``names`` in ``out`` that a run did not write (to be named and kept, --overwrite or not)."""
    return [name for name in names if (out / name).exists() and not written_by_a_run(out / name)]


def check_free_space(folder: str, need: int, what: str) -> None:
    """Refuse before the work an output whose estimated size the disk under ``folder`` lacks."""
    probe = os.path.abspath(folder)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    free = shutil.disk_usage(probe).free
    if need > free:
        raise UsageError(f"{what}: about {_size(need)} will be written but {probe} has {_size(free)} free")


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_number(name: str, value: float | None, low: float | None = None, high: float | None = None,
                 low_open: bool = False, high_open: bool = False) -> None:
    """Raise a UsageError unless ``value`` (if given) is finite and within the bounds."""
    if value is None:
        return
    ok = math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        lo = "-inf" if low is None else f"{low}"
        hi = "inf" if high is None else f"{high}"
        interval = ("(" if low_open or low is None else "[") + f"{lo}, {hi}" + (")" if high_open or high is None else "]")
        raise UsageError(f"{name} must be a finite number in {interval}, got {value}")


def resolve_config(spec: str) -> ALITConfig:
    """A preset name, or a JSON file of ALITConfig fields (``vqgan`` as a nested object)."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise UsageError(f"--config {spec!r} is neither a preset ({', '.join(sorted(PRESETS))}) nor a JSON file")
    try:
        fields = json.loads(path.read_text())
        if not isinstance(fields, dict):
            raise ValueError(f"expected a JSON object of ALITConfig fields, got a {type(fields).__name__}")
        if fields.get("iteration_weights") is not None:
            fields["iteration_weights"] = tuple(fields["iteration_weights"])
        return ALITConfig(**fields)
    except (OSError, ValueError, TypeError) as exc:  # unreadable, not JSON, unknown fields, invalid sizes
        raise UsageError(f"--config {spec}: {one_line(exc)}") from exc


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    """Every global RNG state, in types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    numpy_state = (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached))
    state = {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through ``write_atomic``: a kill leaves the old file or the new one."""

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)

    write_atomic(path, save)


def package_version() -> str:
    """The installed alit_fast version (a run identity's part: an upgrade may change the tokens)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("alit_fast")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over a module's state dict (names and bytes): equal digests mean equal weights."""
    import hashlib

    h = hashlib.sha256()
    for key, value in sorted(module.state_dict().items()):
        h.update(key.encode())
        h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
