"""The ``auto`` backend: per shape, the fastest implementation of an op on this GPU.

For each key (op, dtype, head dim or code size, length bucket, lengths given or not, GPU name) every
implementation that accepts the inputs is timed once on the device, on the call's own inputs, and
the fastest is remembered: in memory, and on disk in a JSON file beside Triton's cache keyed by the
GPU name and the torch / triton versions, so a new process does not time again. Timing syncs the
host (CUDA events); it happens once per key and process at most. After that a call is a dict
lookup on Python ints and strings: no host sync, no device work of its own.

No timing ever happens while torch.compile traces or a CUDA graph is being captured (timing
would launch and sync inside them): there the cached choice is used, or, for a key never timed,
the op's documented static default (see ``alit_fast.ops.attention`` and ``alit_fast.ops.vq``).
While torch.compile traces, "cached" means chosen by an eager call of this process (a dict lookup
the tracer can follow: ``traced_choice``); run each shape once eagerly before compiling.
On a CPU, ``auto`` is ``torch``: the ops decide that before any of this runs.

A cache file that cannot be read (corrupt, unreadable) is ignored and, where the folder is
writable, replaced; one that cannot be written (read-only folder, full disk) leaves the choices
in memory only. ``ALIT_FAST_AUTO_CACHE`` names another file; "" or "off" keeps choices in memory.
"""
from __future__ import annotations

import functools
import json
import os
import statistics
import warnings
from typing import Callable, Hashable

import torch

from ..files import write_atomic

Candidates = dict[str, Callable[[], object]]

_CHOICES: dict[str, str] = {}  # key string -> implementation name (this process's view of the file)
_LOADED_FROM: str | None = None  # the cache file _CHOICES was merged from, if any
_WARNED: set[str] = set()

# timing per candidate: one warm-up call (run-time compiles, Triton's own autotuning, cuDNN plans),
# then the median of REPEATS timed calls
REPEATS = 5


def length_bucket(L: int) -> int:
    """The length bucket of a key: cdiv(L, 32), as the Triton autotuner keys (ALIT's lengths are
    257 + 32k: each is its own bucket, and their tail tiles differ)."""
    return -(-int(L) // 32)


@functools.lru_cache(maxsize=None)
def gpu_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return gpu_name(device.index if device.index is not None else torch.cuda.current_device())


def cache_path() -> str | None:
    """The JSON file of measured choices, or None for memory only."""
    env = os.environ.get("ALIT_FAST_AUTO_CACHE")
    if env is not None:
        return None if env.strip().lower() in ("", "off", "0", "none") else env
    triton_dir = os.environ.get("TRITON_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".triton", "cache")
    return os.path.join(triton_dir, "alit_fast_auto", f"choices-{_versions()}.json")


def _versions() -> str:
    try:
        import triton

        tv = triton.__version__
    except ImportError:
        tv = "none"
    return _slug(f"torch{torch.__version__}-triton{tv}")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in ".-" else "_" for c in text)


def _key_string(key: tuple[Hashable, ...]) -> str:
    return "|".join(str(part) for part in key)


def _warn_once(what: str, message: str) -> None:
    if what not in _WARNED:
        _WARNED.add(what)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _load() -> None:
    global _LOADED_FROM
    path = cache_path()
    if path is None or path == _LOADED_FROM:
        return
    _LOADED_FROM = path
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return
    except (OSError, ValueError) as e:
        _warn_once(f"read {path}", f"alit_fast auto backend: ignoring the unreadable choice cache {path} ({e})")
        return
    if isinstance(data, dict):
        for key, name in data.items():
            if isinstance(key, str) and isinstance(name, str):
                _CHOICES.setdefault(key, name)


def _save() -> None:
    path = cache_path()
    if path is None:
        return
    text = json.dumps(_CHOICES, indent=1, sort_keys=True)

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, write)
    except OSError as e:
        _warn_once(f"write {path}", f"alit_fast auto backend: choices stay in memory, cannot write {path} ({e})")


def clear_memory() -> None:
    """Forget the in-memory choices (the disk cache stays): the next lookup re-reads the file."""
    global _LOADED_FROM
    _CHOICES.clear()
    _TRACED.clear()
    _LOADED_FROM = None


def active(device: torch.device) -> bool:
    """Whether ``auto`` chooses on ``device``; elsewhere (the CPU) it means ``torch``."""
    return device.type == "cuda"


def cannot_time() -> bool:
    """True while torch.compile traces or the current CUDA stream captures a graph."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def time_ms(fn: Callable[[], object]) -> float:
    """Median device time of ``fn()`` in ms (CUDA events), after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(REPEATS):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def measure(name: str, fn: Callable[[], object]) -> float:
    """The time of candidate ``name``: ``time_ms(fn)``. Tests replace this with a fake timer."""
    return time_ms(fn)


# choices by a key torch.compile can trace (op fields and the device index, no GPU name, no file):
# filled by every eager call, read while compiling
_TRACED: dict[tuple, str] = {}


def device_index(device: torch.device) -> int:
    return -1 if device.index is None else device.index


def remember_for_tracing(local_key: tuple, name: str) -> None:
    _TRACED[local_key] = name


def traced_choice(local_key: tuple, default: str) -> str:
    """The choice an eager call made for ``local_key`` in this process, else ``default``: a plain
    dict lookup that torch.compile(fullgraph=True) traces (the file cache and the GPU-name lookup
    would break the graph)."""
    return _TRACED.get(local_key, default)


def cached(key: tuple[Hashable, ...]) -> str | None:
    _load()
    return _CHOICES.get(_key_string(key))


def choose(key: tuple[Hashable, ...], candidates: Callable[[], Candidates], default: str) -> str:
    """The implementation to run for ``key``: cached, else measured now, else ``default``.

    ``candidates()`` builds {name: zero-argument call} for every implementation that accepts the
    inputs (called only when timing). A candidate that raises while timed is left out. With
    nothing measurable (or while compiling / capturing) the answer is ``default``, not cached."""
    hit = cached(key)
    if hit is not None:
        return hit
    if cannot_time():
        return default
    timings = {}
    for name, call in candidates().items():
        try:
            with torch.no_grad():  # the forward's time decides; no autograd graph for the timing runs
                timings[name] = measure(name, call)
        except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. an SDPA backend refusing the shape
            _warn_once(f"{name} {key}", f"alit_fast auto backend: {name} left out for {key} ({e})")
    if not timings:
        return default
    best = min(timings, key=timings.__getitem__)
    _CHOICES[_key_string(key)] = best
    _save()
    return best
