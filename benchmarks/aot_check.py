"""Ahead-of-time GPU compile check of every Triton kernel launch ALIT can make, on a CPU-only box.

    python -m benchmarks.aot_check [--targets 90,80,89] [--subset ci|configs|full|sass] [--json OUT]
                                   [--only REGEX] [--workers 2] [--cache-dir DIR] [--timeout S]
                                   [--strict-wgmma] [--check-pruned] [--progress]
                                   [--progress-jsonl FILE]

Subsets (``SUBSETS``): ``full`` (the default) sweeps ALIT's shapes (B 32 / 256, L = 257 + 32k up
to 513, three head layouts, the demo preset, every VQ codebook) and compiles every unique launch,
every autotune candidate of every launch included (~900 compiles for three targets, about an hour
of CPU); ``configs`` takes a few of those shapes (which reach every launch the full sweep reaches)
and compiles a cover with every kernel, autotune candidate, operand width and constexpr value once
per target; ``ci`` (what benchmarks/test_aot_check.py runs) compiles a cover without crossing
every autotune candidate: each (target, kernel, operand width, constexpr value) once, with its
heaviest candidate (~54 compiles).

How it works:

1. Capture. The real launchers (``alit_fast.kernels.attention.flash_attn_fwd`` / ``flash_attn_bwd``
   and ``alit_fast.kernels.vq.vq_nearest_triton``) run on ``meta`` tensors at ALIT's shapes while
   ``intercept_launches`` replaces ``JITFunction.run`` / ``InterpretedFunction.run`` (every
   ``kernel[grid](...)`` ends there) and ``Autotuner.run`` (every candidate of ``autotuner.configs``
   is recorded, each marked with whether the autotuner's own pruning keeps it on that GPU). Nothing
   is launched. The kernel modules are told they run on the target GPU (see ``_pretend_gpu``), so
   they pick the configs they would pick there. The specialization of each launch (argument types,
   constexprs, divisibility-16 attributes) is computed by Triton's own binder, exactly as
   ``JITFunction.run`` does at run time.
2. Compile. Each unique (kernel, signature, constexprs, attributes, options) is compiled per
   target with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` in a pool of
   spawned worker processes (``--workers``, 2 by default). Workers start with ``TRITON_INTERPRET=0``
   so the kernel modules define real ``JITFunction`` objects. In a process that imported them
   under the interpreter (``--workers 1`` inside the test suite) ``jit_mode`` swaps every
   ``InterpretedFunction`` -- Triton's own helpers such as ``tl.zeros`` included -- for a
   ``JITFunction`` twin while compiling. A worker refuses a kernel whose code differs from the
   captured one (someone edited it mid-run), and a compile running past ``--timeout`` is killed.
   The ci and configs subsets compile only a ``cover`` of the unique launches (see ``facets``).
3. Inspect. The ``ptxas -v`` log of Triton's own cubin step (ptxas-blackwell for sm_90, the
   12.x ptxas below, Triton's flags; printed through TRITON_DUMP_PTXAS_LOG, or ptxas re-run the
   same way on a cache hit) gives registers and spill bytes; ``metadata.shared`` the shared memory;
   the PTX text the tensor-core instructions (``wgmma`` / ``mma.sync``, plus ``ldmatrix``). CTAs per
   SM follow the CUDA occupancy calculator's register, shared-memory, thread and block limits.

4. Instruction mix. ``cuobjdump -sass`` (shipped in Triton's wheel) of the cubin gives the main
   loop: the loop (a backward branch) with the most tensor-core multiply-adds of its own, the
   first in program order on a tie. The table reports its instructions per warp per iteration,
   thread-instructions per score element (attention: instructions x 32 x num_warps / (BLOCK_M x
   BLOCK_N)) or per distance (VQ: per row x code of a code tile), and its counts of wgmma
   (HGMMA), mma.sync (HMMA), TMA loads (UTMALDG) and cp.async (LDGSTS). The ``sass`` subset
   compiles every candidate at the shapes of the table in benchmarks/RESULTS.md.

It fails (exit 1, with a list) on: a compile error, any spilled byte, shared memory above the
target's per-block limit, a launch that cannot fit one CTA on an SM, and a kernel that must use
tensor cores but has no tensor-core instruction. ``tensor_cores_required`` decides the last from
the kernel's module and name (``TENSOR_CORE_RULES``) or a truthy ``TENSOR_CORES``-style constexpr,
with fp32 operands under ``DOT_PREC="ieee"`` exempt; edit that table when kernels are renamed.
Autotune candidates that the autotuner's own pruning drops on a target (the lists of the other
architectures) are counted, not compiled (``--check-pruned`` compiles and judges them too). On sm_90 a tensor-core kernel with ``mma.sync`` but no
``wgmma`` is a warning (a failure with ``--strict-wgmma``).

Triton's cache: a fresh temporary directory per run (``TRITON_CACHE_DIR`` of the workers), removed
at the end, unless ``--cache-dir`` names one to keep. The user's cache stays free of kernels for
GPUs this machine does not have, and the timing of a run is that of a cold compile, which is what
CI sees. Reusing a directory is safe (Triton's key covers source, options and its own version) and
makes a re-run after a one-kernel edit fast.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib
import inspect
import io
import json
import math
import multiprocessing
import os
import pkgutil
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import types
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any, Callable, Iterable, Iterator

import torch

import benchmarks  # noqa: F401 - makes alit_fast.kernels importable from a plain checkout

KERNEL_PACKAGE = "alit_fast.kernels"


# --------------------------------------------------------------------------------------------
# targets
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Target:
    """Per-SM limits of one architecture (CUDA programming guide, compute capabilities table)."""

    arch: int  # 90, 80, 89, 86
    smem_per_sm: int  # bytes an SM has for all its CTAs (before the 1 KB each CTA reserves)
    smem_per_block: int  # the most one CTA may ask for (opt-in maximum)
    max_threads_per_sm: int
    max_ctas_per_sm: int
    sm_count: int  # of the reference part (H100 SXM, A100, RTX 4090, RTX 3090): only for waves
    regs_per_sm: int = 65536
    # tensor-core instructions that count on this target, best first
    tc_instructions: tuple[str, ...] = ("mma",)

    @property
    def capability(self) -> tuple[int, int]:
        return divmod(self.arch, 10)

    @property
    def name(self) -> str:
        return f"sm_{self.arch}"


KB = 1024
TARGETS: dict[int, Target] = {
    90: Target(90, 228 * KB, 227 * KB, 2048, 32, 132, tc_instructions=("wgmma", "mma")),
    80: Target(80, 164 * KB, 163 * KB, 2048, 32, 108),
    89: Target(89, 100 * KB, 99 * KB, 1536, 24, 128),
    86: Target(86, 100 * KB, 99 * KB, 1536, 16, 82),
}

# register file: 4 sub-partitions per SM, 256-register allocation unit per warp; shared memory:
# 128-byte allocation unit plus 1 KB the system reserves per CTA (sm_80 and newer)
_SUB_PARTITIONS = 4
_REG_UNIT = 256
_SMEM_UNIT = 128
_SMEM_RESERVED_PER_CTA = 1024


def ctas_per_sm(target: Target, regs: int, num_warps: int, shared: int) -> tuple[int, str]:
    """(CTAs that fit on one SM, the limiting resource), as the CUDA occupancy calculator counts."""
    threads = num_warps * 32
    limits: dict[str, int] = {"blocks": target.max_ctas_per_sm}
    limits["threads"] = target.max_threads_per_sm // threads if threads <= 1024 else 0
    regs_per_warp = -(-max(regs, 1) * 32 // _REG_UNIT) * _REG_UNIT
    # a warp's registers come from one sub-partition's quarter of the register file
    warps_per_sub = (target.regs_per_sm // _SUB_PARTITIONS) // regs_per_warp
    limits["regs"] = warps_per_sub * _SUB_PARTITIONS // num_warps
    if shared > target.smem_per_block:
        limits["smem"] = 0
    elif shared > 0:
        per_cta = -(-shared // _SMEM_UNIT) * _SMEM_UNIT + _SMEM_RESERVED_PER_CTA
        limits["smem"] = target.smem_per_sm // per_cta
    which = min(limits, key=lambda k: limits[k])
    return limits[which], which


# --------------------------------------------------------------------------------------------
# the tensor-core rule table
# --------------------------------------------------------------------------------------------

# (module short name regex, kernel name regex, why). Matched against the captured kernels, so a
# renamed kernel only needs its row here; anything not matched is not required to use tensor cores
# (the check still reports whether it does).
TENSOR_CORE_RULES: list[tuple[str, str, str]] = [
    (r"attention", r"^_fwd\w*_kernel$", "attention forward: QK^T and PV products"),
    (r"attention", r"^_bwd_dkdv\w*_kernel$", "attention backward dK/dV: four products per tile"),
    (r"attention", r"^_bwd_dq\w*_kernel$", "attention backward dQ: three products per tile"),
    (r"vq", r"(^|_)(tc|tensor|approx|mma)(_|$)", "VQ tensor-core (approximate) distance pass"),
]
# any kernel whose constexprs set one of these truthy must use tensor cores
TENSOR_CORE_FLAGS = ("TENSOR_CORES", "USE_TC", "TC", "APPROX", "USE_TENSOR_CORES")
# constexprs naming the precision of tl.dot; "ieee" on fp32 operands means exact fp32 FMAs
PRECISION_FLAGS = ("DOT_PREC", "INPUT_PRECISION", "PRECISION")


def operand_dtype(signature: dict[str, str]) -> str | None:
    """Element type of the first floating-point pointer argument (q for attention, z for VQ)."""
    for ty in signature.values():
        if ty.startswith("*") and ty[1:].lstrip("k") in ("fp16", "bf16", "fp32", "fp64", "fp8e4nv", "fp8e5"):
            return ty[1:].lstrip("k")
    return None


def tensor_cores_required(
    module: str, kernel: str, constexprs: dict[str, Any], signature: dict[str, str]
) -> tuple[bool, str]:
    """(must this launch use tensor cores, why). The one place to edit when kernels change."""
    short = module.rsplit(".", 1)[-1]
    prec = next((str(constexprs[f]) for f in PRECISION_FLAGS if f in constexprs), None)
    if prec == "ieee" and operand_dtype(signature) == "fp32":
        return False, "fp32 operands with ieee precision: exact FMAs, no tensor cores (exempt)"
    for mod_re, name_re, why in TENSOR_CORE_RULES:
        if re.search(mod_re, short) and re.search(name_re, kernel):
            return True, why
    for flag in TENSOR_CORE_FLAGS:
        if constexprs.get(flag):
            return True, f"constexpr {flag}={constexprs[flag]!r}"
    return False, "no rule"


# --------------------------------------------------------------------------------------------
# capture
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Launch:
    """One recorded ``kernel[grid](...)`` call, specialized as Triton's JIT would specialize it."""

    module: str
    kernel: str  # qualname of the Python function under @triton.jit
    signature: dict[str, str]  # arg name -> "*fp16" / "i32" / "fp32" / "constexpr" ...
    constexprs: dict[str, Any]  # arg name -> value (launch constexprs and specialized 1 / None)
    attrs: dict[tuple[int, ...], list]  # arg path -> [["tt.divisibility", 16]]
    options: dict[str, Any]  # CUDAOptions fields the launch passed (num_warps, num_stages, ...)
    num_warps: int
    num_stages: int
    grid: tuple[int, int, int]
    declared: tuple[str, ...] = ()  # the kernel's own tl.constexpr parameters (the rest: specialized)
    code_digest: str = ""  # of the captured kernel's Python code: a worker refuses another version
    case: str = ""
    autotune: dict | None = None  # {"index": i, "of": n, "kept": bool} for an autotuner candidate

    def key(self) -> tuple:
        return (
            self.module,
            self.kernel,
            tuple(self.signature.items()),
            tuple(sorted((k, repr(v)) for k, v in self.constexprs.items())),
            tuple(sorted((k, repr(v)) for k, v in self.attrs.items())),
            tuple(sorted((k, repr(v)) for k, v in self.options.items())),
        )

    @property
    def ctas(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]


@dataclasses.dataclass
class Recorder:
    target: Target
    case: str = ""
    launches: list[Launch] = dataclasses.field(default_factory=list)
    record_pruned: bool = False  # also record autotune candidates the autotuner prunes away
    pruned: int = 0  # candidates pruned away and not recorded
    _autotune: dict | None = None
    _binders: dict = dataclasses.field(default_factory=dict)
    _config_keys: dict = dataclasses.field(default_factory=dict)
    _options: dict = dataclasses.field(default_factory=dict)
    _attrs: dict = dataclasses.field(default_factory=dict)


def _binder_for(kernel_obj, backend) -> tuple[Any, Callable]:
    """(a JITFunction for ``kernel_obj``'s Python function, Triton's argument binder for it)."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = kernel_obj if isinstance(kernel_obj, JITFunction) else JITFunction(kernel_obj.fn, **_jit_kwargs(kernel_obj))
    return jit, create_function_from_signature(jit.signature, jit.params, backend)


def _jit_kwargs(obj) -> dict:
    """The @triton.jit arguments an InterpretedFunction / JITFunction was made with."""
    if hasattr(obj, "kwargs") and isinstance(obj.kwargs, dict):  # InterpretedFunction keeps them
        return dict(obj.kwargs)
    return dict(
        version=getattr(obj, "version", None),
        do_not_specialize=getattr(obj, "do_not_specialize", None),
        do_not_specialize_on_alignment=getattr(obj, "do_not_specialize_on_alignment", None),
        debug=getattr(obj, "debug", None),
        noinline=getattr(obj, "noinline", None),
        repr=getattr(obj, "_repr", None),
        launch_metadata=getattr(obj, "launch_metadata", None),
    )


@functools.lru_cache(maxsize=None)
def _backend(arch: int):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    return make_backend(GPUTarget("cuda", arch, 32))


def _pack(rec: Recorder, jit, backend, kwargs: dict, bound_args: dict, specialization: list, leftover: dict):
    """(options, signature, constexprs, attrs) as ``JITFunction._pack_args`` makes them.

    Flat argument lists (no tuple arguments) take a shortcut that gives the same dicts: with
    autotuning every launch is recorded once per candidate, and triton's generic path-walking
    version made the capture of the CI subset take most of a minute. Options are parsed once per
    distinct set."""
    from triton.backends.nvidia.compiler import CUDAOptions

    sigvals = [x[0] for x in specialization]
    if not all(isinstance(v, str) for v in sigvals):
        return jit._pack_args(backend, kwargs, bound_args, specialization, leftover)
    names = jit.arg_names
    fields = CUDAOptions.__dataclass_fields__
    for k in kwargs:
        if k not in fields and k not in names:
            raise KeyError("Keyword argument %s was specified but unrecognised" % k)
    opt_key = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k in fields))
    options = rec._options.get(opt_key)
    if options is None:
        options = rec._options[opt_key] = backend.parse_options(kwargs)
    values = list(bound_args.values())
    signature = dict(zip(names, sigvals))
    constexprs = {(i,): values[i] for i, v in enumerate(sigvals) if v == "constexpr"}
    attrvals = ["" if x[0] == "constexpr" else x[1] for x in specialization]
    parsed = rec._attrs
    attrs = {}
    for i, a in enumerate(attrvals):
        if isinstance(a, str):
            if a not in parsed:
                parsed[a] = backend.parse_attr(a)
            attrs[(i,)] = parsed[a]
    return options, signature, constexprs, attrs


def _record(rec: Recorder, kernel_obj, args: tuple, grid, kwargs: dict) -> None:
    from triton.backends.nvidia.compiler import CUDAOptions

    backend = _backend(rec.target.arch)
    fn = kernel_obj.fn
    cached = rec._binders.get(id(fn))
    if cached is None:
        cached = rec._binders[id(fn)] = (fn, *_binder_for(kernel_obj, backend), code_digest(fn))
    _, jit, binder, _ = cached
    bound_args, specialization, leftover = binder(*args, **kwargs)
    options, signature, constexprs, attrs = _pack(rec, jit, backend, kwargs, bound_args, specialization, leftover)
    names = jit.arg_names
    named_constexprs = {names[path[0]] if len(path) == 1 else path: value for path, value in constexprs.items()}
    if callable(grid):
        grid = grid(bound_args)
    grid = tuple(int(g) for g in grid) + (1,) * (3 - len(grid))
    fields = CUDAOptions.__dataclass_fields__
    # the options the launch set, defaults dropped (an autotune Config passes num_ctas=1, a plain
    # launch does not: the same compile), warps and stages always explicit
    passed = {k: v for k, v in kwargs.items()
              if k in fields and k not in names and v is not None and v != fields[k].default}
    passed.update(num_warps=options.num_warps, num_stages=options.num_stages)
    rec.launches.append(
        Launch(
            module=fn.__module__,
            kernel=fn.__qualname__,
            signature=dict(signature),
            constexprs=named_constexprs,
            attrs={tuple(k): v for k, v in attrs.items()},
            options=passed,
            num_warps=options.num_warps,
            num_stages=options.num_stages,
            grid=grid,
            declared=tuple(p.name for p in jit.params if p.is_constexpr),
            code_digest=cached[3],
            case=rec.case,
            autotune=dict(rec._autotune) if rec._autotune else None,
        )
    )


def _kernel_modules() -> list[types.ModuleType]:
    """Every module of the kernels package, imported (the launchers' helpers live in them)."""
    package = importlib.import_module(KERNEL_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{KERNEL_PACKAGE}.{info.name}")
    inside = lambda name: name == KERNEL_PACKAGE or name.startswith(KERNEL_PACKAGE + ".")  # noqa: E731
    return [m for name, m in list(sys.modules.items()) if m is not None and inside(name)]


class _FakeDriver:
    """Just enough of Triton's active driver for launcher code that asks it about the device."""

    def __init__(self, target: Target) -> None:
        from triton.backends.compiler import GPUTarget

        self._target = GPUTarget("cuda", target.arch, 32)
        props = {
            "max_shared_mem": target.smem_per_block,
            "multiprocessor_count": target.sm_count,
            "max_num_regs": target.regs_per_sm,
            "warpSize": 32,
            "sm_clock_rate": 1_500_000,
            "mem_clock_rate": 1_500_000,
            "mem_bus_width": 4096,
        }
        self.utils = types.SimpleNamespace(get_device_properties=lambda device=0: dict(props))

    def get_current_target(self):
        return self._target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device=None) -> int:
        return 0

    def get_active_torch_device(self):
        return torch.device("meta")

    def get_benchmarker(self):
        raise RuntimeError("aot_check: nothing is benchmarked while launches are captured")


@contextlib.contextmanager
def _patched(obj, name: str, value) -> Iterator[None]:
    missing = object()
    old = obj.__dict__.get(name, missing) if isinstance(obj, type) else getattr(obj, name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)


@contextlib.contextmanager
def _pretend_gpu(target: Target) -> Iterator[None]:
    """Make the kernel modules believe they run on ``target``, not under the interpreter.

    The modules bind helpers with ``from ._utils import ...``, so the module attributes are what
    is patched, in every module of the kernels package: ``is_interpreting`` -> False,
    ``gpu_capability`` -> the target's (major, minor), ``can_launch`` -> True. Launchers that read
    the architecture another way get ``torch.cuda.get_device_capability`` / ``get_device_properties``
    and Triton's active driver answering for the target too. Module-level dicts / lists / sets
    (caches of autotuners built while pretending) are restored on exit, lru caches cleared.
    """
    from triton.runtime.driver import driver as triton_driver

    cap = target.capability
    props = types.SimpleNamespace(
        name=f"aot_check {target.name}", major=cap[0], minor=cap[1], multi_processor_count=target.sm_count,
        shared_memory_per_block_optin=target.smem_per_block, shared_memory_per_multiprocessor=target.smem_per_sm,
        max_threads_per_multi_processor=target.max_threads_per_sm, regs_per_multiprocessor=target.regs_per_sm,
        warp_size=32, total_memory=80 * 2**30, L2_cache_size=50 * 2**20,
    )
    replacements = {
        "is_interpreting": lambda: False,
        "gpu_capability": lambda device=None: cap,
        "can_launch": lambda t=None: True,
    }
    modules = _kernel_modules()
    saved_state = []
    for m in modules:
        for name, value in vars(m).items():
            if type(value) in (dict, list, set) and not name.startswith("__"):
                saved_state.append((value, value.copy()))
    _clear_lru_caches(modules)  # nothing cached from a real (or interpreter) run may leak in
    with contextlib.ExitStack() as stack:
        for m in modules:
            for name, value in replacements.items():
                if callable(getattr(m, name, None)):
                    stack.enter_context(_patched(m, name, value))
        stack.enter_context(_patched(torch.cuda, "get_device_capability", lambda device=None: cap))
        stack.enter_context(_patched(torch.cuda, "get_device_properties", lambda device=None: props))
        stack.enter_context(_patched(torch.cuda, "current_device", lambda: 0))
        saved_driver = triton_driver._active
        triton_driver._active = _FakeDriver(target)
        try:
            yield
        finally:
            triton_driver._active = saved_driver
            for live, copy in saved_state:
                live.clear()
                if isinstance(live, list):
                    live.extend(copy)
                else:
                    live.update(copy)
            _clear_lru_caches(modules)


def _clear_lru_caches(modules: list[types.ModuleType]) -> None:
    for m in modules:
        for value in list(vars(m).values()):
            if callable(getattr(value, "cache_clear", None)):
                value.cache_clear()


def _config_key(config) -> tuple:
    return tuple(sorted((k, repr(v)) for k, v in config.all_kwargs().items())) + (id(config.pre_hook),)


@contextlib.contextmanager
def intercept_launches(target: Target, record_pruned: bool = False) -> Iterator[Recorder]:
    """Record every JIT / autotuned launch made inside, for ``target``, and launch nothing.
    Autotune candidates the autotuner's own pruning drops are counted, and recorded only with
    ``record_pruned``."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    rec = Recorder(target, record_pruned=record_pruned)

    def jit_run(self, *args, grid, warmup=False, **kwargs):
        _record(rec, self, args, grid, kwargs)
        return None

    def autotuner_run(self, *args, **kwargs):
        # every candidate, in the autotuner's order; "kept" = survives its own pruning on this GPU
        self.nargs = dict(zip(self.arg_names, args))
        try:
            kept = list(self.prune_configs(kwargs))
            prune_error = None
        except Exception as e:  # noqa: BLE001 - reported, every candidate then counts as kept
            kept, prune_error = list(self.configs), f"{type(e).__name__}: {e}"
        keys = rec._config_keys  # the autotuner's Config objects live through the capture
        for c in (*self.configs, *kept):
            if id(c) not in keys:
                keys[id(c)] = (c, _config_key(c))  # c kept alive: its id stays unique
        kept_keys = {keys[id(c)][1] for c in kept}
        try:
            n = len(self.configs)
            for i, config in enumerate(self.configs):
                is_kept = keys[id(config)][1] in kept_keys
                if not (is_kept or rec.record_pruned):
                    # binding a launch costs ~0.5 ms; most of a union list is meant for other GPUs
                    rec.pruned += 1
                    continue
                rec._autotune = {"index": i, "of": n, "kept": is_kept, "prune_error": prune_error}
                self.fn.run(*args, **kwargs, **config.all_kwargs())
        finally:
            rec._autotune = None
            self.nargs = None
        return None

    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched(JITFunction, "run", jit_run))
        stack.enter_context(_patched(InterpretedFunction, "run", jit_run))
        stack.enter_context(_patched(Autotuner, "run", autotuner_run))
        stack.enter_context(_pretend_gpu(target))
        yield rec


# --------------------------------------------------------------------------------------------
# ALIT's launches
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Shapes:
    batches: tuple[int, ...]
    seq_lens: tuple[int, ...]  # latent transformer: 256 image tokens + cls + 32 per iteration
    heads_dims: tuple[tuple[int, int], ...]
    demo_seq_lens: tuple[int, ...]  # demo preset: 64 image tokens + cls + 8 per iteration
    latent_tokens: tuple[int, ...]
    demo_latent_tokens: tuple[int, ...]
    vq_batches: tuple[int, ...]
    dtypes: tuple[torch.dtype, ...] = (torch.float16, torch.bfloat16, torch.float32)
    return_zq: tuple[bool, ...] = (False, True)
    # "": compile every unique launch. "configs": a ``cover`` with every kernel, tile config
    # (autotune candidates included), operand width and constexpr value once per target. "ci":
    # the same without crossing every autotune candidate: each (target, kernel, width, flag) is
    # compiled with its heaviest candidate, the one nearest the shared-memory and register limits
    cover: str = ""


SUBSETS: dict[str, Shapes] = {
    "full": Shapes(
        batches=(32, 256),
        seq_lens=tuple(257 + 32 * k for k in range(9)),
        heads_dims=((8, 128), (12, 64), (16, 64)),
        demo_seq_lens=tuple(65 + 8 * k for k in range(9)),
        latent_tokens=tuple(range(32, 257, 32)),
        demo_latent_tokens=tuple(range(8, 65, 8)),
        vq_batches=(32, 256),
    ),
}
# two sequence lengths and one batch for attention (the launchers choose by head dim, dtype and
# precision, not by L or B, and the kernels are not specialized on H or the length bucket:
# test_aot_check asserts that these shapes reach every choice and every compile the full sweep
# reaches); B=256 for VQ too: only many rows make its launcher skip the codebook split
_FEW = dict(
    batches=(32,),
    seq_lens=(257, 513),
    heads_dims=((8, 128), (12, 64), (16, 64)),
    demo_seq_lens=(65,),
    latent_tokens=(32, 256),
    demo_latent_tokens=(8, 64),
    vq_batches=(32, 256),
)
SUBSETS["ci"] = Shapes(**_FEW, cover="ci")
# the instruction-mix table of benchmarks/RESULTS.md: bf16, B=64, H=8, D=128 and 64, L=289, every
# autotune candidate; VQ at the VQGAN's d=256 and the latent d=12 (256 rows per image)
SUBSETS["sass"] = Shapes(batches=(64,), seq_lens=(289,), heads_dims=((8, 128), (8, 64)), demo_seq_lens=(),
                         latent_tokens=(256,), demo_latent_tokens=(), vq_batches=(256,),
                         dtypes=(torch.bfloat16,), return_zq=(False,), cover="configs")
SUBSETS["configs"] = Shapes(**_FEW, cover="configs")
# VQ alone, every dtype, every unique launch (no attention): the VQGAN's d = 256 and the latent's
# d = 12 at 256 rows per image, B = 256 (the instruction mix of the VQ rows of benchmarks/RESULTS.md)
SUBSETS["vq"] = Shapes(batches=(), seq_lens=(), heads_dims=(), demo_seq_lens=(), latent_tokens=(256,),
                       demo_latent_tokens=(), vq_batches=(256,), return_zq=(False,))

DEMO_HEADS, DEMO_HEAD_DIM = 2, 64
VQ_BOOKS = (  # (name, d, K, normalize, tokens per image from Shapes or a fixed count)
    ("latent", 12, 4096, True, "latent_tokens"),
    ("vqgan", 256, 1024, False, 256),
    ("demo vqgan", 32, 512, False, 64),
    ("demo latent", 12, 1024, True, "demo_latent_tokens"),
)
_SHORT = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def _qkv(B: int, L: int, H: int, D: int, dtype: torch.dtype):
    # views of one packed in-projection, as alit_fast/models/transformer.py hands them over
    packed = torch.empty(B, L, 3 * H * D, dtype=dtype, device="meta")
    return packed.view(B, L, 3, H, D).unbind(2)


@contextlib.contextmanager
def _matmul_precision(value: str) -> Iterator[None]:
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def _fp32_precisions(dtype: torch.dtype) -> tuple[str, ...]:
    # fp32 attention follows torch's matmul precision: "highest" -> exact, "high" -> tf32
    return ("highest", "high") if dtype == torch.float32 else (torch.get_float32_matmul_precision(),)


def cases(shapes: Shapes) -> Iterator[tuple[str, Callable[[], Any]]]:
    """(label, call) for every launcher call of the subset; calls run inside ``intercept_launches``."""
    attn = importlib.import_module(KERNEL_PACKAGE + ".attention")
    vq = importlib.import_module(KERNEL_PACKAGE + ".vq")
    bwd_params = inspect.signature(attn.flash_attn_bwd).parameters
    dq_modes = tuple(getattr(attn, "DQ_MODES", ())) if "dq_mode" in bwd_params else ()

    attn_shapes = [(B, L, H, D) for B in shapes.batches for L in shapes.seq_lens for H, D in shapes.heads_dims]
    attn_shapes += [(B, L, DEMO_HEADS, DEMO_HEAD_DIM) for B in shapes.batches for L in shapes.demo_seq_lens]
    for B, L, H, D in attn_shapes:
        for dtype in shapes.dtypes:
            for prec in _fp32_precisions(dtype):
                for with_len in (False, True):
                    kind = _SHORT[dtype] + (f"/{prec}" if dtype == torch.float32 else "")
                    label = f"attn B={B} L={L} H={H} D={D} {kind}{' lengths' if with_len else ''}"

                    def fwd(B=B, L=L, H=H, D=D, dtype=dtype, prec=prec, with_len=with_len):
                        q, k, v = _qkv(B, L, H, D, dtype)
                        lengths = torch.empty(B, dtype=torch.int32, device="meta") if with_len else None
                        with _matmul_precision(prec):
                            attn.flash_attn_fwd(q, k, v, lengths)

                    def bwd(B=B, L=L, H=H, D=D, dtype=dtype, prec=prec, with_len=with_len, mode=None):
                        q, k, v = _qkv(B, L, H, D, dtype)
                        lengths = torch.empty(B, dtype=torch.int32, device="meta") if with_len else None
                        out = torch.empty(B, L, H, D, dtype=dtype, device="meta")
                        grad = torch.empty(B, L, H, D, dtype=dtype, device="meta")
                        lse = torch.empty(B, H, L, dtype=torch.float32, device="meta")
                        extra = {} if mode is None else {"dq_mode": mode}
                        with _matmul_precision(prec):
                            attn.flash_attn_bwd(grad, q, k, v, out, lse, lengths, **extra)

                    yield f"{label} fwd", fwd
                    if with_len and hasattr(attn, "flash_attn_fwd_varlen"):
                        # the same sequences packed: lengths become offsets, no padded rows

                        def fwd_varlen(B=B, L=L, H=H, D=D, dtype=dtype, prec=prec):
                            q, k, v = torch.empty(B * L, 3, H, D, dtype=dtype, device="meta").unbind(1)
                            offsets = torch.empty(B + 1, dtype=torch.int32, device="meta")
                            with _matmul_precision(prec):
                                attn.flash_attn_fwd_varlen(q, k, v, offsets, L)

                        yield f"{label} fwd varlen", fwd_varlen
                    for mode in dq_modes or (None,):
                        yield f"{label} bwd{'' if mode is None else ' dq=' + mode}", functools.partial(bwd, mode=mode)

    for name, d, K, normalize, per_image in VQ_BOOKS:
        counts = getattr(shapes, per_image) if isinstance(per_image, str) else (per_image,)
        for B in shapes.vq_batches:
            for n in counts:
                for dtype in shapes.dtypes:
                    for zq in shapes.return_zq:

                        def call(N=B * n, d=d, K=K, normalize=normalize, dtype=dtype, zq=zq):
                            z = torch.empty(N, d, dtype=dtype, device="meta")
                            codebook = torch.empty(K, d, dtype=torch.float32, device="meta")
                            vq.vq_nearest_triton(z, codebook, normalize, return_zq=zq)

                        yield f"vq {name} N={B * n} d={d} K={K} {_SHORT[dtype]}{' zq' if zq else ''}", call


CaseSource = Callable[[Shapes], Iterable[tuple[str, Callable[[], Any]]]]


def capture(target: Target, shapes: Shapes, case_source: CaseSource | None = None,
            record_pruned: bool = False) -> tuple[list[Launch], list[str], int]:
    """(every launch the launchers make for ``shapes`` on ``target``, launcher errors, autotune
    candidates pruned away and not recorded)."""
    errors = []
    with intercept_launches(target, record_pruned) as rec:
        for label, call in (case_source or cases)(shapes):
            rec.case = label
            try:
                call()
            except Exception as e:  # noqa: BLE001 - a launcher that fails to launch is a finding
                errors.append(f"{target.name} {label}: launcher raised {type(e).__name__}: {e}")
    return rec.launches, errors, rec.pruned


@dataclasses.dataclass
class Unique:
    """One compile job: a deduplicated launch on one target, with what it stands for."""

    launch: Launch  # the first launch seen with this key
    target: Target
    count: int = 1
    max_ctas: int = 0
    max_case: str = ""
    kept: bool = True  # for autotune candidates: some launch keeps it after pruning

    def add(self, launch: Launch) -> None:
        self.count += 1
        if launch.ctas > self.max_ctas:
            self.max_ctas, self.max_case = launch.ctas, launch.case
        if launch.autotune is not None:
            self.kept = self.kept or launch.autotune["kept"]


def dtype_class(launch: Launch) -> str:
    """"16-bit", "fp32/<precision>" or the operand type: what changes a kernel's tiles and dots."""
    dt = operand_dtype(launch.signature)
    if dt in ("fp16", "bf16"):
        return "16-bit"
    prec = next((str(launch.constexprs[f]) for f in PRECISION_FLAGS if f in launch.constexprs), "")
    return f"{dt}/{prec}" if prec else str(dt)


def facets(u: Unique, autotune_configs: bool = True) -> set[tuple]:
    """What one compile demonstrates, for ``cover``.

    Per target and kernel: the kernel itself, its tile config (BLOCK_* constexprs, warps,
    stages; for an autotune candidate only with ``autotune_configs``), its operand width (16-bit
    or fp32), each other declared constexpr's value (lengths on/off, dq mode, normalize, ...). Per
    target: each operand dtype (fp16, bf16, fp32) and each dot precision (tf32, ieee) somewhere.
    fp32's two precisions are not crossed with every kernel and target (a third compile per
    attention kernel and target); instead each kernel meets both on some target.
    """
    l, arch = u.launch, u.target.arch
    k = (l.module, l.kernel)
    tiles = tuple((n, v) for n, v in l.constexprs.items() if n in l.declared and n.upper().startswith("BLOCK"))
    dt = operand_dtype(l.signature)
    out = {
        ("kernel", arch, k),
        ("width", arch, k, "16-bit" if dt in ("fp16", "bf16") else dt),
        ("operand", arch, dt),
    }
    if autotune_configs or l.autotune is None:
        out.add(("config", arch, k, tiles, l.num_warps, l.num_stages))
    cls = dtype_class(l)
    if "/" in cls:
        out.add(("precision", arch, cls))
        out.add(("kernel precision", k, cls))  # across targets: each kernel meets tf32 and ieee
    for n, v in l.constexprs.items():
        if n in l.declared and not n.upper().startswith("BLOCK") and n not in PRECISION_FLAGS:
            out.add(("flag", arch, k, n, repr(v)))
    return out


def _cost_guess(launch: Launch) -> float:
    # registers, shared memory and compile time all grow with the tiles a program holds, the
    # pipeline stages and the operand width
    tiles = [v for n, v in launch.constexprs.items() if n in launch.declared and n.upper().startswith("BLOCK")
             and isinstance(v, int)]
    width = 2 if operand_dtype(launch.signature) == "fp32" else 1
    return math.prod(tiles) * width * max(1, launch.num_stages) * (2 if "bwd" in launch.kernel else 1)


def cover(uniques: list[Unique], autotune_configs: bool = True) -> list[Unique]:
    """A small subset with every facet of ``uniques`` (greedy set cover, deterministic)."""
    pending = [(u, facets(u, autotune_configs)) for u in uniques]
    todo = set().union(*(f for _, f in pending)) if pending else set()
    chosen = []
    while todo:
        # ties go to the heaviest launch (largest tiles, fp32): where shared memory and registers run out
        best = max(range(len(pending)),
                   key=lambda i: (len(pending[i][1] & todo), _cost_guess(pending[i][0].launch), -i))
        u, f = pending.pop(best)
        chosen.append(u)
        todo -= f
    return chosen


def deduplicate(launches: Iterable[Launch], target: Target) -> list[Unique]:
    out: dict[tuple, Unique] = {}
    for launch in launches:
        u = out.get(launch.key())
        if u is None:
            kept = launch.autotune["kept"] if launch.autotune is not None else True
            out[launch.key()] = Unique(launch, target, 1, launch.ctas, launch.case, kept)
        else:
            u.add(launch)
    return list(out.values())


# --------------------------------------------------------------------------------------------
# compile (in worker processes)
# --------------------------------------------------------------------------------------------


def find_ptxas(arch: int = 80) -> str | None:
    """The ptxas Triton uses for ``arch`` (its bundled one unless TRITON_PTXAS_PATH says otherwise)."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
        if path and os.path.exists(path):
            return path
    except Exception:  # noqa: BLE001 - a missing tool is reported as None
        pass
    return None


def compilable(obj):
    """The JITFunction to hand ``triton.compile`` for a captured kernel object (use inside ``jit_mode``).

    With TRITON_INTERPRET=1 at import time every @triton.jit object is an InterpretedFunction,
    which ``triton.compile`` cannot use: not only the kernel but the helpers it calls, Triton's own
    included (``tl.zeros``, the reduction combine functions of triton.language.standard). Their
    JITFunction twin is built over the same Python function; ``jit_mode`` puts the twins in place
    of every InterpretedFunction for the duration of a compile.
    """
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    while not isinstance(obj, (JITFunction, InterpretedFunction)) and hasattr(obj, "fn"):
        obj = obj.fn  # Autotuner / Heuristics wrappers
    return obj if isinstance(obj, JITFunction) else _jit_twin(obj)


_TWINS: dict[int, Any] = {}


def _jit_twin(interpreted):
    from triton.runtime.jit import JITFunction

    twin = _TWINS.get(id(interpreted))
    if twin is None:
        # keyed by id: keep the interpreted object alive with its twin so the id stays unique
        twin = JITFunction(interpreted.fn, **_jit_kwargs(interpreted))
        _TWINS[id(interpreted)] = twin
        twin._aot_original = interpreted
    return twin


@contextlib.contextmanager
def jit_mode() -> Iterator[None]:
    """Compile-ready process state: TRITON_INTERPRET off (code generation reads it to decide how
    constexprs are wrapped) and every module attribute that is an InterpretedFunction swapped for
    its JITFunction twin, in place, so kernels reach JIT helpers through their usual globals and
    module attributes. Restored on exit; a no-op swap in a process that imported in JIT mode."""
    from triton.runtime.interpreter import InterpretedFunction

    swaps = []
    for mod in list(sys.modules.values()):
        namespace = getattr(mod, "__dict__", None)
        if not isinstance(namespace, dict):
            continue
        for name, value in list(namespace.items()):
            if type(value) is InterpretedFunction:  # type(), not isinstance: no lazy-module proxies
                swaps.append((namespace, name, value))
    with _env(TRITON_INTERPRET="0"):
        for namespace, name, value in swaps:
            namespace[name] = _jit_twin(value)
        try:
            yield
        finally:
            for namespace, name, value in swaps:
                namespace[name] = value


def _python_function(obj):
    while not inspect.isfunction(obj):
        obj = obj.fn  # JITFunction / InterpretedFunction / Autotuner / Heuristics
    return obj


def _resolve(module: str, qualname: str):
    """The @triton.jit object of the Python function ``module.qualname``."""
    mod = importlib.import_module(module)
    obj: Any = mod
    try:
        for part in qualname.split("."):
            obj = getattr(obj, part)
        return obj
    except AttributeError:
        pass
    # bound under another name (k = triton.jit(f)): look for a jit object wrapping that function
    for value in vars(mod).values():
        fn = getattr(value, "fn", None)
        if inspect.isfunction(fn) and fn.__qualname__ == qualname:
            return value
    raise LookupError(f"no @triton.jit object for {module}.{qualname} (kernels must be importable module globals)")


_PTXAS_LINE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS_LINE = re.compile(r"Used (\d+) registers")


def parse_ptxas_log(log: str) -> dict | None:
    """registers, stack frame and spill bytes from a ``ptxas -v`` log (None: no entry in it)."""
    regs = [int(m.group(1)) for m in _REGS_LINE.finditer(log)]
    if not regs:
        return None
    frames = [tuple(int(x) for x in m.groups()) for m in _PTXAS_LINE.finditer(log)]
    return {
        "regs": max(regs),
        "stack": sum(f[0] for f in frames),
        "spill_stores": sum(f[1] for f in frames),
        "spill_loads": sum(f[2] for f in frames),
    }


def ptxas_stats(ptx: str, arch: int, fp_fusion: bool = True, ptx_options: str | None = None) -> dict:
    """``parse_ptxas_log`` of ``ptxas -v`` run on ``ptx`` the way Triton runs it for ``arch``."""
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    ptxas = find_ptxas(arch)
    if ptxas is None:
        raise RuntimeError(f"no ptxas for sm_{arch}")
    with tempfile.TemporaryDirectory(prefix="aot_ptxas_") as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={sm_arch_from_capability(arch)}"]
        if not fp_fusion:
            cmd.append("--fmad=false")
        if ptx_options:
            cmd += ptx_options.split()
        res = subprocess.run(cmd + [src, "-o", os.path.join(tmp, "k.o")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    stats = parse_ptxas_log(log) if res.returncode == 0 else None
    if stats is None:
        raise RuntimeError(f"ptxas -v failed ({res.returncode}): {log[-2000:]}")
    return stats


def tensor_core_use(ptx: str) -> dict:
    return {
        "wgmma": len(re.findall(r"\bwgmma\.mma_async", ptx)),
        "mma": len(re.findall(r"\bmma\.sync", ptx)),
        "ldmatrix": len(re.findall(r"\bldmatrix", ptx)),
    }


def _worker_init(cache_dir: str) -> None:
    # the parent spawns workers with TRITON_INTERPRET=0 already (modules imported while unpickling
    # this initializer must see it); repeated here for a pool made some other way
    os.environ["TRITON_INTERPRET"] = "0"
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    torch.set_num_threads(1)
    import triton.backends.nvidia.compiler  # noqa: F401 - the imports a first compile would pay
    import triton.compiler  # noqa: F401


def _warm_up() -> None:
    return None


def _stop_workers_on_error(pool: ProcessPoolExecutor, exc_type, exc, tb) -> bool:
    # on an error or an interrupt (Ctrl-C, SIGTERM via main) do not wait minutes for running
    # compiles: cancel the queue and end the workers, which would otherwise outlive this process
    if exc_type is not None:
        procs = list((getattr(pool, "_processes", None) or {}).values())  # shutdown() drops the dict
        pool.shutdown(wait=False, cancel_futures=True)
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
    return False


def _cpu_seconds() -> float:
    # this process and its finished children (ptxas): CPU time, which other load does not inflate
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def code_digest(fn) -> str:
    """Digest of a Python function's compiled code (not its line numbers): the capture process
    and a compile worker agree on it only if both run the same kernel definition."""
    h = hashlib.sha256()

    def feed(code: types.CodeType) -> None:
        h.update(code.co_code)
        h.update(repr((code.co_names, code.co_varnames, code.co_argcount, code.co_kwonlyargcount)).encode())
        for c in code.co_consts:
            if isinstance(c, types.CodeType):
                feed(c)
            else:
                h.update(repr(c).encode())

    feed(fn.__code__)
    return h.hexdigest()[:16]


class CompileTimeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: float | None) -> Iterator[None]:
    """Raise CompileTimeout after ``seconds`` of wall time (main thread only; else no limit).

    Python runs the handler between bytecodes, so a long LLVM pass finishes first, while a ptxas
    that runs for minutes (massive spills) is killed: subprocess.run kills its child on the way
    out. A pathological compile then becomes a reported failure rather than a stalled check."""
    import threading

    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise CompileTimeout(f"compile took over {seconds:.0f} s (killed); typical of massive register spills")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def find_cuobjdump() -> str | None:
    """The cuobjdump that ships in Triton's wheel (or one on PATH)."""
    try:
        import triton

        path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        if os.path.exists(path):
            return path
    except ImportError:
        pass
    return shutil.which("cuobjdump")


_SASS_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]\s+)?([A-Z][A-Za-z0-9_.]*)([^;]*);")
_BRANCH_TARGET = re.compile(r"^\s*(?:`?\(?\.?L?_?x?_?)?0x([0-9a-f]+)")


def parse_sass(text: str) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of each instruction of the first function in ``cuobjdump -sass``."""
    out = []
    for line in text.split("Function :", 2)[1 if "Function :" in text else 0].splitlines():
        m = _SASS_LINE.search(line)
        if m:
            out.append((int(m.group(1), 16), m.group(2), m.group(3)))
    return out


def _macs(opcode: str) -> int:
    """Multiply-adds of one tensor-core instruction (per warp's view; 0 for anything else)."""
    m = re.match(r"HGMMA\.(\d+)x(\d+)x(\d+)", opcode)
    if m:
        return math.prod(int(x) for x in m.groups())
    m = re.match(r"HMMA\.16(8)(\d+)", opcode)
    if m:
        return 16 * 8 * int(m.group(2))
    return 0


def sass_loops(insts: list[tuple[int, str, str]]) -> list[dict]:
    """Every loop (a backward branch): its address range, instructions of its own (nested loops'
    bodies excluded), tensor-core multiply-adds of its own, and the loop enclosing it."""
    loops = []
    for addr, op, rest in insts:
        if op.startswith("BRA"):
            t = _BRANCH_TARGET.match(rest)
            if t and int(t.group(1), 16) < addr:
                loops.append({"lo": int(t.group(1), 16), "hi": addr})
    for lp in loops:
        inner = [o for o in loops if o is not lp and lp["lo"] <= o["lo"] and o["hi"] <= lp["hi"]]
        own = [(a, op) for a, op, _ in insts if lp["lo"] <= a <= lp["hi"] and op != "NOP"
               and not any(o["lo"] <= a <= o["hi"] for o in inner)]
        lp["own"] = own
        lp["macs"] = sum(_macs(op) for _, op in own)
        outer = [o for o in loops if o is not lp and o["lo"] <= lp["lo"] and lp["hi"] <= o["hi"]]
        lp["parent"] = min(outer, key=lambda o: o["hi"] - o["lo"]) if outer else None
    return loops


MIX_OPS = {"HGMMA": "wgmma", "HMMA": "mma.sync", "UTMALDG": "TMA load", "LDGSTS": "cp.async"}


def sass_mix(sass: str, launch_constexprs: dict, num_warps: int, kernel: str) -> dict | None:
    """The main loop's instruction mix: the loop with the most tensor-core work of its own, the
    first such in program order (or the longest loop where none has any). ``per_elem`` is thread-instructions per score element
    (attention: BLOCK_M x BLOCK_N per iteration) or per distance (VQ: BLOCK_N rows x BLOCK_K codes
    per code tile, the d loop's body counted D_PAD / BLOCK_D times plus the code loop's own)."""
    loops = sass_loops(parse_sass(sass))
    if not loops:
        return None
    # ties (the full tiles and a masked tail tile of the same width) go to the first in program
    # order: the kernels stream their unmasked full tiles first
    main = max(loops, key=lambda lp: (lp["macs"], 0 if lp["macs"] else len(lp["own"]), -lp["lo"]))
    c = launch_constexprs
    count = len(main["own"])
    ops = {name: sum(op.startswith(prefix) for _, op in main["own"]) for prefix, name in MIX_OPS.items()}
    if "BLOCK_K" in c:  # VQ: rows x codes per code tile (the code-prep kernel has no rows: None)
        elems = c.get("BLOCK_N", 0) * c["BLOCK_K"]
        per_tile = count
        if c.get("D_PAD", 0) > c.get("BLOCK_D", 0) and main["parent"] is not None:
            per_tile = count * (c["D_PAD"] // c["BLOCK_D"]) + len(main["parent"]["own"])
    else:
        elems = c.get("BLOCK_M", 0) * c.get("BLOCK_N", 0)
        per_tile = count
    out = {"loop_insts": count, "loop_macs": main["macs"], **ops}
    out["per_elem"] = round(per_tile * num_warps * 32 / elems, 2) if elems else None
    return out


def sass_of(cubin: bytes) -> str | None:
    tool = find_cuobjdump()
    if tool is None:
        return None
    with tempfile.TemporaryDirectory(prefix="aot_sass_") as tmp:
        path = os.path.join(tmp, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([tool, "-sass", path], capture_output=True, text=True)
    return res.stdout if res.returncode == 0 else None


def _mix_of(compiled, launch: Launch) -> dict | None:
    # a report, not a verdict: a SASS the parser does not understand must not fail the compile
    try:
        sass = sass_of(compiled.asm["cubin"]) if "cubin" in compiled.asm else None
        return sass_mix(sass, dict(launch.constexprs), int(compiled.metadata.num_warps), launch.kernel) if sass else None
    except Exception as e:  # noqa: BLE001
        return {"error": f"{type(e).__name__}: {e}"}


def compile_launch(launch: Launch, arch: int, timeout: float | None = None) -> dict:
    """Compile one launch for sm_<arch>; never raises (errors come back in "error")."""
    t0, c0 = time.perf_counter(), _cpu_seconds()
    try:
        kernel = _resolve(launch.module, launch.kernel)
        if launch.code_digest and code_digest(_python_function(kernel)) != launch.code_digest:
            raise RuntimeError(f"{launch.module}.{launch.kernel} is not the kernel that was captured (its source "
                               "changed since the capturing process imported it): run the check again")
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource

        log = io.StringIO()
        # Triton runs ptxas -v itself; TRITON_DUMP_PTXAS_LOG makes it print the log, which saves
        # running ptxas a second time (a cache hit prints nothing: then ptxas_stats runs it)
        with _deadline(timeout), jit_mode(), _env(TRITON_DUMP_PTXAS_LOG="1"), contextlib.redirect_stdout(log):
            jit = compilable(kernel)
            src = ASTSource(jit, dict(launch.signature), constexprs=dict(launch.constexprs), attrs=dict(launch.attrs))
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(launch.options))
        ptx = compiled.asm["ptx"]
        md = compiled.metadata
        out = {"shared": int(md.shared), "num_warps": int(md.num_warps), "num_stages": int(md.num_stages)}
        stats = parse_ptxas_log(log.getvalue())
        if stats is None:
            fusion = bool(getattr(md, "enable_fp_fusion", True))
            stats = ptxas_stats(ptx, arch, fusion, getattr(md, "ptx_options", None))
        out.update(stats)
        out.update(tensor_core_use(ptx))
        out["mix"] = _mix_of(compiled, launch)
        out["error"] = None
    except Exception as e:  # noqa: BLE001
        msg = f"{type(e).__name__}: {e}"
        out = {"error": msg if len(msg) < 4000 else msg[:1500] + "\n...\n" + msg[-2000:]}
    out["seconds"] = time.perf_counter() - t0
    out["cpu_seconds"] = _cpu_seconds() - c0
    return out


def _compile_job(job: tuple[Launch, int, float | None]) -> dict:
    return compile_launch(*job)


# --------------------------------------------------------------------------------------------
# verdict
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Result:
    unique: Unique
    stats: dict
    tc_required: bool = False
    tc_why: str = ""
    ctas_per_sm: int = 0
    limiter: str = ""
    failures: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def launch(self) -> Launch:
        return self.unique.launch

    @property
    def target(self) -> Target:
        return self.unique.target

    def tc_label(self) -> str:
        s = self.stats
        if s.get("error"):
            return "?"
        kinds = [k for k in ("wgmma", "mma") if s.get(k)]
        label = "+".join(kinds) if kinds else "no"
        if s.get("ldmatrix"):
            label += " ldm"
        return label


def judge(unique: Unique, stats: dict, strict_wgmma: bool = False) -> Result:
    launch, target = unique.launch, unique.target
    r = Result(unique, stats)
    r.tc_required, r.tc_why = tensor_cores_required(launch.module, launch.kernel, launch.constexprs, launch.signature)
    if stats.get("error"):
        r.failures.append(f"compile error: {stats['error'].splitlines()[0][:300]}")
        return r
    if stats["spill_stores"] or stats["spill_loads"]:
        r.failures.append(f"spills {stats['spill_stores']} B stores / {stats['spill_loads']} B loads")
    if stats["shared"] > target.smem_per_block:
        r.failures.append(f"shared memory {stats['shared']} B > {target.smem_per_block} B per block on {target.name}")
    r.ctas_per_sm, r.limiter = ctas_per_sm(target, stats["regs"], stats["num_warps"], stats["shared"])
    if r.ctas_per_sm == 0 and stats["shared"] <= target.smem_per_block:
        r.failures.append(f"not one CTA fits on an SM of {target.name} (limit: {r.limiter})")
    has_tc = any(stats.get(k) for k in target.tc_instructions)
    if r.tc_required and not has_tc:
        r.failures.append(f"no tensor-core instruction ({'/'.join(target.tc_instructions)}) but required: {r.tc_why}")
    if r.tc_required and has_tc and target.arch >= 90 and not stats.get("wgmma"):
        msg = "uses mma.sync, not wgmma, on sm_90"
        (r.failures if strict_wgmma else r.warnings).append(msg)
    if stats.get("stack") and not (stats["spill_stores"] or stats["spill_loads"]):
        r.warnings.append(f"{stats['stack']} B stack frame (local memory) without spills")
    return r


def _short_constexprs(launch: Launch) -> str:
    # the kernel's declared constexprs; arguments Triton specialized (strides of 1, None) are not
    # part of the config
    parts = [f"{k}={int(v) if isinstance(v, bool) else v}"
             for k, v in launch.constexprs.items() if k in launch.declared]
    return " ".join(parts)


def _dtypes(launch: Launch) -> str:
    return operand_dtype(launch.signature) or "-"


def format_table(results: list[Result]) -> str:
    header = ["kernel", "dtype", "config", "w/s", "target", "regs", "spill st/ld B", "smem KB", "CTAs/SM", "TC",
              "grid CTAs", "loop insts", "/elem", "wgmma/mma/TMA/cp.async", "verdict"]
    rows = []
    for r in results:
        s, l = r.stats, r.launch
        tag = ""
        if l.autotune is not None:
            tag = f" [cand {l.autotune['index'] + 1}/{l.autotune['of']}{'' if r.unique.kept else ', pruned'}]"
        ok = "FAIL" if r.failures else ("warn" if r.warnings else "ok")
        head = [l.kernel, _dtypes(l), _short_constexprs(l) + tag, f"{l.num_warps}/{l.num_stages}", r.target.name]
        if s.get("error"):
            rows.append(head + ["-", "-", "-", "-", "-", str(r.unique.max_ctas), "-", "-", "-", ok])
            continue
        spill = f"{s['spill_stores']}/{s['spill_loads']}" if s["spill_stores"] or s["spill_loads"] else "0"
        mix = s.get("mix") or {}
        rows.append(head + [
            str(s["regs"]), spill, f"{s['shared'] / KB:.1f}", f"{r.ctas_per_sm} ({r.limiter})",
            r.tc_label() + ("" if r.tc_required else " (n/r)"), str(r.unique.max_ctas),
            str(mix.get("loop_insts", "-")), str(mix.get("per_elem", "-")),
            "/".join(str(mix.get(k, "-")) for k in MIX_OPS.values()) if mix else "-", ok,
        ])
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)), "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Report:
    results: list[Result]
    launcher_errors: list[str]
    seconds: dict[str, float]
    captured: int
    pruned_launches: int = 0  # autotune candidates pruned away on their target: not captured, not judged

    @property
    def failures(self) -> list[str]:
        out = list(self.launcher_errors)
        for r in self.results:
            # (pruned candidates are only here with --check-pruned, which asks for them to be judged)
            out += [f"{r.launch.kernel} {_short_constexprs(r.launch)} w{r.launch.num_warps}/s{r.launch.num_stages} "
                    f"{_dtypes(r.launch)} on {r.target.name}: {f}  [e.g. {r.unique.max_case}]" for f in r.failures]
        return out

    @property
    def ok(self) -> bool:
        return not self.failures


def run_check(
    targets: Iterable[int],
    shapes: Shapes,
    *,
    only: str | None = None,
    workers: int = 2,
    cache_dir: str | None = None,
    strict_wgmma: bool = False,
    check_pruned: bool = False,
    timeout: float | None = 300.0,
    case_source: CaseSource | None = None,
    progress=None,
    progress_jsonl: str | None = None,
) -> Report:
    """Capture, deduplicate, compile and judge. ``case_source`` replaces ``cases`` (tests);
    ``progress``: a stream that gets one line per finished compile; ``progress_jsonl``: a file each
    finished compile's JSON row is appended to."""
    t0 = time.perf_counter()
    own_cache = cache_dir is None
    cache = tempfile.mkdtemp(prefix="aot_check_triton_cache_") if own_cache else cache_dir
    try:
        with contextlib.ExitStack() as stack:
            pool = None
            # in-process compiles are not reliable in a process that has used the interpreter:
            # after a torch.compile of the interpreted kernels, triton.compile here failed
            # ("'block_argument' object has no attribute 'dtype'"), so such a process always
            # compiles in spawned workers, even for one
            if workers > 1 or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
                # spawn, not fork: a fresh interpreter that imports the kernels with
                # TRITON_INTERPRET=0 (real JITFunctions) and inherits no torch / triton state. The
                # workers start now, so their imports overlap the capture; the variables are set
                # only while they start, this process keeps its own mode
                with _env(TRITON_INTERPRET="0", TRITON_CACHE_DIR=cache):
                    pool = stack.enter_context(ProcessPoolExecutor(
                        max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                        initializer=_worker_init, initargs=(cache,)))
                    for _ in range(workers):
                        pool.submit(_warm_up)
                stack.push(functools.partial(_stop_workers_on_error, pool))
            uniques: list[Unique] = []
            errors: list[str] = []
            captured = pruned_launches = 0
            for arch in targets:
                target = TARGETS[arch]
                launches, errs, n_pruned = capture(target, shapes, case_source, record_pruned=check_pruned)
                captured += len(launches)
                pruned_launches += n_pruned
                errors += errs
                if only:
                    launches = [l for l in launches if re.search(only, l.kernel)]
                uniques += deduplicate(launches, target)
            # the autotuner's pruning drops candidates meant for other GPUs: listed, not judged
            todo = list(uniques)
            if shapes.cover:
                todo = cover(todo, autotune_configs=shapes.cover == "configs")
                todo.sort(key=lambda u: -_cost_guess(u.launch))  # longest first: the pool drains evenly
            else:
                # every launch, but the ``configs`` cover first (each config and constexpr value
                # once per target), so that a run stopped early has judged every config already
                first = cover(todo, autotune_configs=True)
                chosen = {id(u) for u in first}
                rest = [u for u in todo if id(u) not in chosen]
                first.sort(key=lambda u: -_cost_guess(u.launch))
                rest.sort(key=lambda u: -_cost_guess(u.launch))
                todo = first + rest
            t_capture = time.perf_counter() - t0
            t1 = time.perf_counter()
            jobs = [(u.launch, u.target.arch, timeout) for u in todo]
            stats: list[dict] = [{}] * len(jobs)
            done = 0

            def finished(i: int, st: dict) -> None:
                nonlocal done
                stats[i] = st
                done += 1
                if progress is not None or progress_jsonl is not None:
                    # one line per compile: a long run shows where it is, and a stopped one keeps
                    # what it judged
                    r = judge(todo[i], st, strict_wgmma)
                    l = todo[i].launch
                    verdict = "FAIL " + "; ".join(r.failures) if r.failures else "ok"
                    if progress is not None:
                        print(f"[{done}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {l.kernel} {_dtypes(l)} "
                              f"{_short_constexprs(l)} w{l.num_warps}/s{l.num_stages} {r.target.name}: "
                              f"regs {st.get('regs', '-')} smem {st.get('shared', '-')} {verdict}",
                              file=progress, flush=True)
                    if progress_jsonl is not None:
                        with open(progress_jsonl, "a") as f:
                            f.write(json.dumps(result_row(r), default=repr) + "\n")

            if pool is None:
                with _env(TRITON_CACHE_DIR=cache):
                    for i, job in enumerate(jobs):
                        finished(i, compile_launch(*job))
            else:
                futures = {pool.submit(_compile_job, job): i for i, job in enumerate(jobs)}
                for f in as_completed(futures):
                    try:
                        st = f.result()
                    except Exception as e:  # noqa: BLE001 - e.g. a worker killed by a crashing compiler
                        st = {"error": f"worker failed: {type(e).__name__}: {e}"}
                    finished(futures[f], st)
            t_compile = time.perf_counter() - t1
    finally:
        if own_cache:
            shutil.rmtree(cache, ignore_errors=True)
    results = [judge(u, s, strict_wgmma) for u, s in zip(todo, stats)]
    results.sort(key=lambda r: (r.launch.module, r.launch.kernel, r.target.arch != 90, r.target.arch, _dtypes(r.launch),
                                _short_constexprs(r.launch), r.launch.num_warps, r.launch.num_stages))
    seconds = {"capture": t_capture, "compile": t_compile, "total": time.perf_counter() - t0,
               "compile_cpu": sum(s.get("cpu_seconds", 0.0) for s in stats)}
    return Report(results, errors, seconds, captured, pruned_launches)


@contextlib.contextmanager
def _env(**values: str) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def result_row(r: Result) -> dict:
    """One result as a JSON-ready dict (``--json`` and ``--progress-jsonl``)."""
    l = r.launch
    return {
        "module": l.module, "kernel": l.kernel, "target": r.target.name, "dtype": _dtypes(l),
        "signature": l.signature, "constexprs": {k: v for k, v in l.constexprs.items()},
        "attrs": {",".join(map(str, k)): v for k, v in l.attrs.items()},
        "num_warps": l.num_warps, "num_stages": l.num_stages, "options": l.options,
        "autotune": l.autotune, "kept_by_pruning": r.unique.kept,
        "launches": r.unique.count, "max_grid_ctas": r.unique.max_ctas, "max_case": r.unique.max_case,
        "stats": r.stats,
        "ctas_per_sm": r.ctas_per_sm, "limiter": r.limiter,
        "tensor_cores_required": r.tc_required, "tensor_cores_why": r.tc_why,
        "failures": r.failures, "warnings": r.warnings,
    }


def report_json(report: Report) -> dict:
    rows = [result_row(r) for r in report.results]
    return {"ok": report.ok, "failures": report.failures, "launcher_errors": report.launcher_errors,
            "seconds": report.seconds, "captured_launches": report.captured, "results": rows}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--targets", default="90,80,89", help="comma-separated compute capabilities (90,80,89,86)")
    parser.add_argument("--subset", choices=sorted(SUBSETS), default="full")
    parser.add_argument("--json", dest="json_out", default=None, help="write every result here")
    parser.add_argument("--only", default=None, help="regex on kernel names: check only those")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cache-dir", default=None, help="Triton cache to (re)use; default: a temporary one")
    parser.add_argument("--strict-wgmma", action="store_true", help="fail sm_90 tensor-core kernels without wgmma")
    parser.add_argument("--timeout", type=float, default=300.0, help="wall seconds one compile may take")
    parser.add_argument("--check-pruned", action="store_true",
                        help="also compile autotune candidates the autotuner prunes away on that GPU")
    parser.add_argument("--progress", action="store_true", help="a line on stderr per finished compile")
    parser.add_argument("--progress-jsonl", default=None, help="append each finished compile's JSON row here")
    args = parser.parse_args(argv)
    targets = [int(t) for t in args.targets.split(",") if t.strip()]
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown targets {unknown}; known: {sorted(TARGETS)}")
    missing = [t for t in targets if find_ptxas(t) is None]
    if missing:
        print(f"aot_check: no ptxas for {missing} (triton/backends/nvidia/bin or TRITON_PTXAS_PATH)", file=sys.stderr)
        return 2
    report = run_check(targets, SUBSETS[args.subset], only=args.only, workers=args.workers, cache_dir=args.cache_dir,
                       strict_wgmma=args.strict_wgmma, check_pruned=args.check_pruned, timeout=args.timeout,
                       progress=sys.stderr if args.progress else None, progress_jsonl=args.progress_jsonl)
    print(format_table(report.results))
    s = report.seconds
    print(f"\n{report.captured} launches captured, {len(report.results)} unique compiles "
          f"({report.pruned_launches} launches of autotune candidates pruned away on their target skipped); "
          f"capture {s['capture']:.1f} s, compile {s['compile']:.1f} s wall ({s['compile_cpu']:.1f} CPU s in workers), "
          f"total {s['total']:.1f} s")
    warnings = sorted({f"{r.launch.kernel} {_short_constexprs(r.launch)} {_dtypes(r.launch)} on {r.target.name}: {w}"
                       for r in report.results for w in r.warnings})
    if warnings:
        print(f"\n{len(warnings)} warnings:")
        for w in warnings:
            print("  " + w)
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(report_json(report), f, indent=1, default=repr)
    if report.failures:
        print(f"\nFAILED: {len(report.failures)} problems")
        for f in report.failures:
            print("  " + f)
        return 1
    print("\nOK: no spills, shared memory within limits, tensor cores where required")
    return 0


if __name__ == "__main__":
    # SIGTERM as an exception, so the worker processes are ended with this one (set here, not in
    # main(), which tests call in their own process)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
