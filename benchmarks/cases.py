"""The benchmark cases, shared by the pytest-benchmark suite and ``benchmarks.gpu_suite``.

Every case is built by a function here that returns a ``Case``: a zero-argument callable that runs
the work once, the context it must run in (an SDPA backend choice, say), and what one run is worth
(FLOPs, minimum bytes, images). Timing and peak-memory helpers work on a CUDA device and on the
CPU, so the same code runs full size on a GPU and at ``Sizes.cpu()`` scale (with the Triton
interpreter) in CI.

Inputs are drawn on the device itself (a generator on that device), once per shape: a host draw
plus a copy would cost more than the timings of a whole section. Timed callables make no
validating call (``validate=False`` everywhere: a validation is a host sync per call).
benchmarks/test_cases_inputs.py checks both rules on this file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import statistics
import time
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from alit_fast import ALIT
from alit_fast.config import ALITConfig, get_config
from alit_fast.kernels._utils import is_interpreting, single_threaded_interpreter
from alit_fast.ops.attention import attention, attention_math, flash_attention_op
from alit_fast.ops.vq import vq_nearest
from alit_fast.testing import tiny_config
from alit_fast.models.transformer import ResidualAttentionBlock

MiB = 2**20


def device_generator(device: torch.device | str, seed: int) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def device_images(batch: int, size: int, seed: int, device: torch.device) -> torch.Tensor:
    """Images in [0, 1) drawn on ``device`` (alit_fast.testing.random_images draws on the host)."""
    return torch.rand(batch, 3, size, size, generator=device_generator(device, seed), device=device)


# the inputs of the last shape asked for: every provider of a shape shares them, and the next
# shape's replace them (one shape's tensors alive at a time)
_INPUTS: dict[tuple, tuple[torch.Tensor, ...]] = {}


def _once_per_shape(key: tuple, make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
    if key not in _INPUTS:
        _INPUTS.clear()
        _INPUTS[key] = make()
    return _INPUTS[key]

# --------------------------------------------------------------------------------------------
# sizes
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sizes:
    """Every size the suite uses; ``gpu()`` is the real thing, ``cpu()`` the CI smoke scale."""

    name: str
    attn_shapes: tuple[tuple[int, int, int], ...]  # (B, H, D)
    attn_uniform_L: tuple[int, ...]
    attn_mixed_L: tuple[int, ...]  # padded length of the mixed-length batches
    attn_dtypes: tuple[torch.dtype, ...]
    image_tokens: int  # class + 2D tokens: the shortest sequence a model ever attends over
    tokens_per_iter: int
    vq: tuple[tuple[int, int, int, bool], ...]  # (N, K, d, normalize)
    model: ALITConfig
    block_batch: int
    rollout_batch: int
    encode_batch: int
    train_batch: int
    compile_backend: str
    # timing: (warm-up runs, timed runs) for whole-model cases; kernels use do_bench on a GPU
    model_reps: tuple[int, int] = (2, 5)
    kernel_reps: tuple[int, int] = (3, 10)

    @staticmethod
    def gpu() -> "Sizes":
        cfg = get_config("alit_small")
        return Sizes(
            name="gpu",
            # alit_small / alit_semilarge heads (head_dim 128) and alit_base heads (head_dim 64)
            attn_shapes=((32, 8, 128), (32, 12, 64)),
            attn_uniform_L=(289, 385, 513),
            attn_mixed_L=(385, 513),
            attn_dtypes=(torch.bfloat16, torch.float16),
            image_tokens=cfg.num_image_tokens,
            tokens_per_iter=cfg.tokens_per_iter,
            vq=((65536, 4096, 12, True), (65536, 1024, 256, False)),
            model=cfg,
            block_batch=32,
            rollout_batch=32,
            encode_batch=32,
            train_batch=32,
            compile_backend="inductor",
        )

    @staticmethod
    def cpu() -> "Sizes":
        # width 64, 2 heads (head_dim 32, the kernel's smallest); one layer, as the interpreter pays
        # about half a second per attention forward+backward
        cfg = tiny_config(layers=1)
        return Sizes(
            name="cpu",
            # two head layouts, as at full size; head_dim >= 32 for the kernel
            attn_shapes=((2, 2, 64), (2, 3, 32)),
            attn_uniform_L=(cfg.num_image_tokens + cfg.max_tokens,),
            attn_mixed_L=(cfg.num_image_tokens + cfg.max_tokens,),
            attn_dtypes=(torch.bfloat16, torch.float16),
            image_tokens=cfg.num_image_tokens,
            tokens_per_iter=cfg.tokens_per_iter,
            vq=((2048, 512, 12, True), (2048, 256, 256, False)),
            model=cfg,
            block_batch=2,
            rollout_batch=2,
            encode_batch=2,
            train_batch=1,
            # inductor would spend most of a CI minute in its C++ compiler; aot_eager still traces
            # the model through dynamo and AOTAutograd, which is what can break
            compile_backend="aot_eager",
            model_reps=(1, 3),
            kernel_reps=(1, 5),
        )

    @staticmethod
    def for_device(device: torch.device) -> "Sizes":
        return Sizes.gpu() if device.type == "cuda" else Sizes.cpu()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def dtype_name(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[dtype]


@dataclass
class Case:
    fn: Callable[[], object]
    context: Callable[[], ContextManager] = contextlib.nullcontext
    flops: float = 0.0  # useful floating-point operations per run (valid tokens only)
    min_bytes: float = 0.0  # each input read once and each output written once
    images: int = 0  # images per run, for the model cases
    grads: list[torch.Tensor] = field(default_factory=list)  # reset to None between timed runs
    note: str = ""
    compiled: bool = False  # torch.compile'd code: a CPU dispatch mode would make dynamo skip it
    input_images: torch.Tensor | None = None  # a model case's images, for figures taken outside the timing


# --------------------------------------------------------------------------------------------
# timing and memory
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _clear(grads: list[torch.Tensor]) -> None:
    for t in grads:
        t.grad = None


def time_case(case: Case, device: torch.device, reps: tuple[int, int], kernel: bool = False) -> float:
    """Median milliseconds of one run.

    Kernels on a GPU go through triton.testing.do_bench (which also flushes the L2 between runs);
    whole-model cases get a few runs timed with CUDA events; on a CPU the host clock.
    """
    warm, runs = reps
    with case.context():
        if device.type == "cuda" and kernel:
            from triton.testing import do_bench

            return float(do_bench(case.fn, warmup=25, rep=100, grad_to_none=case.grads or None, return_mode="median"))
        for _ in range(warm):
            _clear(case.grads)
            case.fn()
        times = []
        for _ in range(runs):
            _clear(case.grads)
            if device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                case.fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                case.fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


class StorageTracker(TorchDispatchMode):
    """Peak bytes of the tensor storages that the ops run under it allocate (a CPU has no
    ``max_memory_allocated``).

    An op's output storage counts as new unless it is one of the op's inputs' (a view or an
    in-place result); it is released when its last Python or C++ reference goes, which a weakref
    on the storage object sees because torch keeps that object alive as long as the storage.
    Buffers an op uses internally and frees before returning are not seen.
    """

    def __init__(self) -> None:
        super().__init__()
        self.current = 0
        self.peak = 0
        self._live: dict[int, int] = {}

    def _release(self, key: int) -> None:
        self.current -= self._live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in torch.utils._pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or key in inputs or key in self._live:
                continue
            self._live[key] = nbytes
            self.current += nbytes
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._release, key)
        return out


def peak_memory(case: Case, device: torch.device, absolute: bool = False) -> int | None:
    """Peak bytes allocated by one run above what was allocated before it; None if unmeasurable.

    ``absolute`` (CUDA only) counts everything allocated at the peak, weights and optimizer state
    included; on a CPU only the run's own allocations can be seen."""
    _clear(case.grads)
    with case.context():
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            result = case.fn()
            torch.cuda.synchronize(device)
            del result
            return torch.cuda.max_memory_allocated(device) - (0 if absolute else base)
        if case.compiled:
            # dynamo does not trace while a dispatch mode is active (and then keeps skipping the
            # frame), so a compiled case runs plain and its CPU peak stays unknown
            case.fn()
            return None
        try:
            with StorageTracker() as tracker:
                result = case.fn()
                del result
            return tracker.peak
        except Exception:  # noqa: BLE001 - an op the tracker cannot follow: no figure rather than no run
            return None


def interpreter_guard(provider_uses_triton: bool) -> ContextManager:
    """Single-threaded torch/BLAS while the Triton interpreter runs (else a few shared cores thrash)."""
    if provider_uses_triton and is_interpreting():
        return single_threaded_interpreter()
    return contextlib.nullcontext()


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------

# SDPA backends by name; each is forced alone with torch.nn.attention.sdpa_kernel
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
ATTENTION_PROVIDERS = ("triton",) + tuple(f"sdpa-{b}" for b in SDPA_BACKENDS) + ("eager-math",)
# also buildable: "auto", the public op's auto backend where alit_fast offers one (gpu_suite's auto section)


@dataclass(frozen=True)
class AttnShape:
    B: int
    H: int
    D: int
    L: int
    dtype: torch.dtype
    mixed: bool

    @property
    def label(self) -> str:
        kind = "mixed" if self.mixed else "uniform"
        return f"B{self.B}-H{self.H}-D{self.D}-L{self.L}-{dtype_name(self.dtype)}-{kind}"


def attention_shapes(sizes: Sizes) -> list[AttnShape]:
    out = []
    for B, H, D in sizes.attn_shapes:
        for dtype in sizes.attn_dtypes:
            out += [AttnShape(B, H, D, L, dtype, False) for L in sizes.attn_uniform_L]
            out += [AttnShape(B, H, D, L, dtype, True) for L in sizes.attn_mixed_L]
    return out


def mixed_lengths(shape: AttnShape, sizes: Sizes, device: torch.device | str = "cpu") -> torch.Tensor:
    """Per-sample lengths of an adaptive batch padded to L: L, L - T, ..., down to one iteration's
    worth of latents (image_tokens + T), cycling over the batch, as images that stopped at
    different token counts."""
    T = sizes.tokens_per_iter
    steps = max(1, (shape.L - sizes.image_tokens) // T)
    return torch.tensor([shape.L - T * (b % steps) for b in range(shape.B)], dtype=torch.int32, device=device)


def attention_flops(shape: AttnShape, lengths: torch.Tensor | None, backward: bool) -> float:
    """4*B*H*L^2*D for the forward (QK^T and PV), 2.5x that more for the backward; with mixed
    lengths only the valid tokens count, so a padded run gets no credit for the padding."""
    sq = float((lengths.double() ** 2).sum()) if lengths is not None else shape.B * shape.L**2
    fwd = 4.0 * shape.H * shape.D * sq
    return fwd * (3.5 if backward else 1.0)


def attention_bytes(shape: AttnShape, lengths: torch.Tensor | None, backward: bool) -> float:
    """Minimum traffic: fwd reads q, k, v and writes out and the fp32 lse; the backward reads q, k,
    v, out, dout and lse and writes dq, dk, dv."""
    tokens = float(lengths.sum()) if lengths is not None else shape.B * shape.L
    elt = torch.finfo(shape.dtype).bits // 8
    row = shape.H * shape.D * elt
    fwd = tokens * (4 * row + shape.H * 4)
    bwd = tokens * (8 * row + shape.H * 4)
    return fwd + (bwd if backward else 0.0)


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend

    return {
        "flash": SDPBackend.FLASH_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "math": SDPBackend.MATH,
    }[name]


def attention_inputs(shape: AttnShape, sizes: Sizes, device: torch.device, seed: int = 0):
    """(packed qkv [B, L, 3, H, D], grad_out [B, L, H, D], lengths or None), drawn on the device
    once per shape and seed."""

    def make():
        g = device_generator(device, seed)
        B, L, H, D = shape.B, shape.L, shape.H, shape.D
        qkv = torch.randn(B, L, 3, H, D, generator=g, device=device, dtype=shape.dtype)
        grad_out = torch.randn(B, L, H, D, generator=g, device=device, dtype=shape.dtype)
        return qkv, grad_out, mixed_lengths(shape, sizes, device) if shape.mixed else None

    return _once_per_shape(("attention", shape, str(device), seed), make)


def attention_case(provider: str, shape: AttnShape, sizes: Sizes, device: torch.device, backward: bool, seed: int = 0) -> Case:
    """One attention call as the model makes it: q, k, v are views of one packed [B, L, 3, H, D]
    projection. SDPA gets the padded batch and a boolean key mask (built outside the timed region)
    for mixed lengths; the Triton kernel gets the lengths."""
    B, L, H, D = shape.B, shape.L, shape.H, shape.D
    packed, grad_out, lengths = attention_inputs(shape, sizes, device, seed)
    # a leaf of its own over the shared storage: each case's gradients stay its own
    qkv = packed.detach().requires_grad_(backward)
    ctx: Callable[[], ContextManager] = contextlib.nullcontext

    if provider == "triton":

        def forward():
            q, k, v = qkv.unbind(2)
            # the custom op itself: the public wrapper's input checks read `lengths` on the host,
            # which SDPA's raw calls below do not pay either
            return flash_attention_op(q, k, v, lengths)[0]

        ctx = lambda: interpreter_guard(True)  # noqa: E731
    elif provider.startswith("sdpa-"):
        backend = _sdpa_backend(provider[len("sdpa-"):])
        mask = None
        if lengths is not None:
            valid = torch.arange(L, device=device)[None, :] < lengths[:, None]
            # as the torch backend builds it: padded queries keep one visible key so no row is NaN
            mask = valid[:, None, None, :] | ~valid[:, None, :, None]

        def forward():
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2)

        def ctx():
            from torch.nn.attention import sdpa_kernel

            return sdpa_kernel([backend])
    elif provider == "auto":

        def forward():
            q, k, v = qkv.unbind(2)
            return attention(q, k, v, lengths, backend="auto", validate=False)
    elif provider == "eager-math":

        def forward():
            q, k, v = qkv.unbind(2)
            return attention_math(q, k, v, lengths, validate=False)
    else:
        raise ValueError(f"unknown attention provider {provider!r}")

    if backward:

        def fn():
            forward().backward(grad_out)
    else:

        def fn():
            with torch.no_grad():
                return forward()

    return Case(
        fn=fn,
        context=ctx,
        flops=attention_flops(shape, lengths, backward),
        min_bytes=attention_bytes(shape, lengths, backward),
        grads=[qkv] if backward else [],
    )


def probe(case: Case) -> str | None:
    """Run a case once; the reason it cannot run here (an SDPA backend that refuses these inputs,
    say), or None. SDPA explains a refusal in warnings and raises a generic error: both are kept."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with case.context():
                case.fn()
            return None
        except Exception as exc:  # noqa: BLE001 - SDPA backends refuse inputs with several exception types
            first = str(exc).split(". ")[0].splitlines()[0] if str(exc) else ""
            why = []
            for w in caught:
                text = " ".join(str(w.message).split())
                if text not in why:
                    why.append(text)
            return (f"{type(exc).__name__}: {first}" + (" (" + "; ".join(why) + ")" if why else ""))[:300]
        finally:
            _clear(case.grads)


# --------------------------------------------------------------------------------------------
# VQ lookup
# --------------------------------------------------------------------------------------------

# cublas-tf32: the shortest torch path a user would write, one TF32 matmul over all N x K and an
# argmin (approximate: TF32 rounds the dot products, so near-ties may pick another code)
VQ_PROVIDERS = ("triton", "chunked", "cublas-tf32", "naive")
_VQ_BACKEND = {"triton": "triton", "chunked": "torch", "naive": "official"}


def vq_label(n: int, k: int, d: int, normalize: bool) -> str:
    return f"N{n}-K{k}-d{d}-{'cosine' if normalize else 'l2'}"


def vq_inputs(n: int, k: int, d: int, device: torch.device, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(z [N, d], codebook [K, d]) fp32, drawn on the device once per shape and seed."""

    def make():
        g = device_generator(device, seed)
        return torch.randn(n, d, generator=g, device=device), torch.randn(k, d, generator=g, device=device)

    return _once_per_shape(("vq", n, k, d, str(device), seed), make)


def tf32_matmul_argmin(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> torch.Tensor:
    """argmin_k ||c_k||^2 - 2 z.c_k through one [N, K] matmul (||z||^2 does not change the argmin)."""
    if normalize:
        z, codebook = F.normalize(z, dim=-1), F.normalize(codebook, dim=-1)
    scores = torch.addmm((codebook * codebook).sum(1)[None, :], z, codebook.t(), alpha=-2.0)
    return scores.argmin(1)


@contextlib.contextmanager
def allow_tf32():
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = True
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved


def vq_flops(n: int, k: int, d: int) -> float:
    return 2.0 * n * k * d


def vq_bytes(n: int, k: int, d: int) -> float:
    """z and the codebook in fp32 once, indices (int64) and scores (fp32) out."""
    return 4.0 * (n * d + k * d) + 12.0 * n


def vq_case(provider: str, n: int, k: int, d: int, normalize: bool, device: torch.device) -> Case:
    z, codebook = vq_inputs(n, k, d, device)
    if provider == "cublas-tf32":
        return Case(fn=lambda: tf32_matmul_argmin(z, codebook, normalize), context=allow_tf32,
                    flops=vq_flops(n, k, d), min_bytes=vq_bytes(n, k, d))
    backend = _VQ_BACKEND[provider]
    return Case(
        # the inputs are finite by construction: no NaN / inf check (a host sync) per timed call
        fn=lambda: vq_nearest(z, codebook, normalize, backend=backend, validate=False),
        context=lambda: interpreter_guard(provider == "triton"),
        flops=vq_flops(n, k, d),
        min_bytes=vq_bytes(n, k, d),
    )


# --------------------------------------------------------------------------------------------
# the model
# --------------------------------------------------------------------------------------------

MODEL_BACKENDS = ("torch", "triton", "official")


def build_model(cfg: ALITConfig, device: torch.device, seed: int = 0) -> ALIT:
    torch.manual_seed(seed)
    with torch.device(device):
        model = ALIT(cfg)
    return model.to(device)


def _autocast(device: torch.device, dtype: torch.dtype | None, cache: bool = True) -> ContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    # a graph capture must not keep autocast's cached weight casts (they die with the context)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=cache)


def _both(*makers: Callable[[], ContextManager]) -> Callable[[], ContextManager]:
    def ctx():
        stack = contextlib.ExitStack()
        for make in makers:
            stack.enter_context(make())
        return stack

    return ctx


def block_flops(batch: int, L: int, width: int, backward: bool, kept: int | None = None) -> float:
    """q/k/v projections (6 W^2) per token, the out projection (2 W^2) and the 4x MLP (16 W^2)
    per kept token (``kept`` output rows: all L by default), 2 FLOPs per MAC, plus attention."""
    kept = L if kept is None else kept
    fwd = 2.0 * 3 * batch * L * width**2 + 2.0 * 9 * batch * kept * width**2 + 4.0 * batch * L**2 * width
    return fwd * (3.0 if backward else 1.0)


def block_case(backend: str, sizes: Sizes, device: torch.device, amp: torch.dtype = torch.bfloat16, seed: int = 0) -> Case:
    """Forward + backward of one transformer block at the longest sequence, under autocast."""
    cfg = sizes.model
    torch.manual_seed(seed)
    with torch.device(device):
        block = ResidualAttentionBlock(cfg.width, cfg.heads, cfg.mlp_ratio)
    block.attn.backend = backend
    L = cfg.num_image_tokens + cfg.max_tokens
    B = sizes.block_batch
    g = device_generator(device, seed)
    x = torch.randn(B, L, cfg.width, generator=g, device=device, requires_grad=True)
    grad = torch.randn(B, L, cfg.width, generator=g, device=device)

    def fn():
        with _autocast(device, amp):
            y = block(x)
        y.backward(grad)

    return Case(
        fn=fn,
        context=lambda: interpreter_guard(backend == "triton"),
        flops=block_flops(B, L, cfg.width, True),
        images=B,
        grads=[x] + list(block.parameters()),
    )


def rollout_case(model: ALIT, backend: str, sizes: Sizes, device: torch.device, amp: torch.dtype | None = torch.bfloat16,
                 autocast_cache: bool = True) -> Case:
    """Inference: every iteration with its decoder, halting off."""
    images = device_images(sizes.rollout_batch, sizes.model.image_size, 1, device)
    model.set_backend(backend).eval()

    def fn():
        with torch.no_grad(), _autocast(device, amp, autocast_cache):
            return model.rollout(images)

    return Case(fn=fn, context=lambda: interpreter_guard(backend == "triton"), images=sizes.rollout_batch,
                input_images=images)


def graphed_case(case: Case, device: torch.device) -> Case:
    """``case``'s work captured once in a CUDA graph and replayed: one launch for the whole rollout,
    its inputs and outputs the static tensors of the capture. Two eager runs on a side stream
    first (autotuning, the allocator's pools). On a CPU there are no graphs: the case itself."""
    if device.type != "cuda":
        return dataclasses.replace(case, note="no CUDA graphs on a CPU: eager")
    with case.context():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                case.fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = case.fn()

    def fn():
        graph.replay()
        return static_out

    return dataclasses.replace(case, fn=fn, context=contextlib.nullcontext, note="CUDA graph replay")


ENCODE_CRITERION = "code-acc:0.9"


def encode_case(model: ALIT, backend: str, sizes: Sizes, device: torch.device, amp: torch.dtype | None = torch.bfloat16,
                step_fn: Callable | None = None) -> Case:
    """alit_fast's adaptive encoding of a batch: each image stops at its own token count.

    With untrained weights no image meets the criterion, so every image runs all iterations: the
    slowest case for the adaptive path (trained models stop many images early)."""
    images = device_images(sizes.encode_batch, sizes.model.image_size, 2, device)
    model.set_backend(backend).eval()

    extra = {} if step_fn is None else {"step_fn": step_fn}  # e.g. model.compile_step(): the whole step compiled

    def fn():
        with _autocast(device, amp):
            return model.encode(images, criterion=ENCODE_CRITERION, **extra)

    return Case(fn=fn, context=lambda: interpreter_guard(backend == "triton"), images=sizes.encode_batch,
                input_images=images)


def official_encode_case(model: ALIT, sizes: Sizes, device: torch.device) -> Case:
    """The official evaluation: one image at a time, fp32, every iteration and every pixel decode."""
    from alit_fast.inference import official_encode

    image = device_images(1, sizes.model.image_size, 2, device)
    model.set_backend("official").eval()

    def fn():
        return official_encode(model, image, threshold=0.07)

    return Case(fn=fn, images=1, input_images=image)


# (name, attention/VQ backend, autocast dtype, compiled): the training-step variants
TRAIN_VARIANTS = (
    ("torch-bf16", "torch", torch.bfloat16, False),
    ("triton-bf16", "triton", torch.bfloat16, False),
    ("official-fp16", "official", torch.float16, False),
    ("torch-bf16-compiled", "torch", torch.bfloat16, True),
    ("triton-bf16-compiled", "triton", torch.bfloat16, True),
)
TRAIN_BASELINE = "official-fp16"


def compile_blocks(model: ALIT, backend: str) -> None:
    """torch.compile every transformer block in place.

    Blocks, not the whole model: the rollout unrolls 8 iterations of 16 blocks and breaks the graph
    at each iteration's host-side loss logging, so a whole-model compile costs minutes; the blocks
    share one compiled graph (dynamic in the sequence length after the second length seen)."""
    for block in list(model.encoder.transformer) + list(model.decoder.transformer):
        block.compile(backend=backend)


def train_case(variant: str, sizes: Sizes, device: torch.device, model: ALIT | None = None) -> Case:
    """One stage-1 step as alit_fast.train takes it: autocast forward over all iterations with
    stochastic halting, backward (through a GradScaler for fp16), grad-norm clip 3.0, AdamW.
    The EMA update is left out: it is the same for every variant."""
    spec = {name: rest for name, *rest in TRAIN_VARIANTS}
    backend, amp, compiled = spec[variant]
    if model is None:
        model = build_model(sizes.model, device)
    model.set_backend(backend)
    model.train()
    if compiled:
        compile_blocks(model, sizes.compile_backend)
    params = model.trainable_parameters()
    # alit_fast.train's optimizer: no weight decay on biases and norms
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.05},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-4, betas=(0.9, 0.95))
    scaler = torch.amp.GradScaler(device.type) if amp == torch.float16 else None
    images = device_images(sizes.train_batch, sizes.model.image_size, 3, device)

    def fn():
        with _autocast(device, amp):
            loss = model(images, halting="stochastic").loss
        opt.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
        else:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 3.0)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()

    def ctx():
        stack = contextlib.ExitStack()
        stack.enter_context(interpreter_guard(backend == "triton"))
        if compiled:
            # every block instance and sequence length must reuse the compiled graph, not fall
            # back to eager once dynamo's default cache of 8 entries is full
            limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
            stack.enter_context(torch._dynamo.config.patch(**{limit: 64}))
        return stack

    return Case(fn=fn, context=ctx, images=sizes.train_batch, compiled=compiled,
                note=f"blocks compiled ({sizes.compile_backend})" if compiled else "")


def count_flops(fn: Callable[[], object]) -> float:
    """FLOPs torch's FlopCounterMode sees in one call (matmuls, convolutions, SDPA)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# --------------------------------------------------------------------------------------------
# analytic floors (for RESULTS.md and the GPU report)
# --------------------------------------------------------------------------------------------


def vqgan_flops(cfg: ALITConfig, batch: int, part: str = "encoder") -> float:
    """FLOPs of the VQGAN encoder (with its code lookup) or decoder, counted by FlopCounterMode on
    the meta device: shapes only, nothing computed, so alit_small's costs nothing to count."""
    from torch.utils.flop_counter import FlopCounterMode

    from alit_fast.models.vqgan import VQGANDecoder, VQGANEncoder

    vq, g = cfg.vqgan, cfg.grid_size
    with torch.device("meta"):
        if part == "encoder":
            net, x = VQGANEncoder(vq), torch.empty(batch, 3, cfg.image_size, cfg.image_size)
        else:
            net, x = VQGANDecoder(vq), torch.empty(batch, vq.z_channels, g, g)
        with FlopCounterMode(display=False) as counter:
            net(x)
    lookup = vq_flops(batch * g * g, vq.codebook_size, vq.z_channels) if part == "encoder" else 0.0
    return float(counter.get_total_flops()) + lookup


def rollout_flops(
    cfg: ALITConfig, batch: int, iterations: int | None = None, vqgan: bool = True, soft_code: bool = False,
    official: bool = False,
) -> float:
    """Matmul/conv FLOPs of a forward rollout with a decode at every iteration: the VQGAN encoder
    and its lookup (``vqgan``), the patch embedding, then per iteration the encoder and decoder
    blocks, the latent VQ, the decoder head, and the soft code where the loss takes it. The
    elementwise work is left out. ``official``: as the official code computes it, every row of
    every block (alit_fast's last blocks skip the rows nobody reads)."""
    W, T, G2 = cfg.width, cfg.tokens_per_iter, cfg.grid_size**2
    iterations = cfg.iterations if iterations is None else iterations
    total = vqgan_flops(cfg, batch) if vqgan else 0.0
    total += 2.0 * batch * G2 * (W - cfg.vqgan.z_channels) * 3 * cfg.patch_size**2  # patch embedding
    for t in range(iterations):
        n = T * (t + 1)
        L = cfg.num_image_tokens + n
        # the last block keeps only the rows that are read: the encoder's latents at the final
        # iteration (no carry follows), the decoder's grid cells always
        final = t == iterations - 1 and not official
        total += (cfg.layers - 1) * block_flops(batch, L, W, False) + block_flops(batch, L, W, False, n if final else L)
        total += 2.0 * batch * n * W * cfg.latent_dim  # pre-quantizer projection
        total += vq_flops(batch * n, cfg.codebook_size, cfg.latent_dim)
        total += 2.0 * batch * n * cfg.latent_dim * W  # decoder embedding
        kept = L if official else G2
        total += (cfg.layers - 1) * block_flops(batch, L, W, False) + block_flops(batch, L, W, False, kept)  # decoder
        if not official:  # ... whose first block projects the G2 + 1 queries, the same for every image, once per batch
            total -= 2.0 * 3 * (batch - 1) * (G2 + 1) * W**2
        total += 2.0 * batch * G2 * (W * 2 * W + 2 * W * cfg.vqgan.codebook_size)  # decoder head
        if soft_code:
            total += 2.0 * batch * G2 * cfg.vqgan.codebook_size * cfg.vqgan.z_channels
    return total
