"""What each section of the GPU run costs, worked out on a CPU before the run.

    python -m benchmarks.gpu_suite --plan [--compile-seconds S]

Per section: the unique kernel compiles it adds (Triton compiles a kernel once per specialization
and autotune candidate; sections later in the order reuse what earlier ones compiled), the
autotuning runs it adds (each new autotune key benchmarks every candidate once), its cases and
their repeats, and the estimated seconds:

    compiles x seconds per compile + candidate runs x TUNE_S + cases x their run time + setup

The compiles are counted, not guessed: the launchers run on meta tensors at the run's full sizes
under benchmarks.aot_check's interceptor, pretending an sm_90 GPU, and Triton's own binder
specializes each launch. The seconds per compile are measured here by compiling a sample of the
attention kernels for sm_90 (``--compile-seconds`` gives a figure instead); the GPU run itself
budgets with ``COMPILE_S``, that measurement on this project's CI box. Model cases run at an
assumed quarter of the measured H100 ceilings (MODEL_EFFICIENCY): an estimate, which the first
GPU run's ``planned_s`` against ``seconds`` per section corrects.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, Iterable

# seconds per kernel compile for sm_90, CPU seconds measured by `--plan` on this project's CI box
# (2-core AMD EPYC, triton 3.9): see benchmarks/RESULTS.md, "GPU run: plan"
COMPILE_S = 1.5
TUNE_S = 0.15  # Triton's autotuner: do_bench(warmup 25 ms, rep 100 ms) per candidate, plus its launches
KERNEL_CASE_S = 0.4  # do_bench (25 + 100 ms) + a peak-memory run + a probe + the first call, per kernel case
MODEL_EFFICIENCY = 0.25  # share of the bf16 / fp32 ceiling a whole-model case is assumed to reach
RUN_OVERHEAD_S = 0.05  # per whole-model run: launches, host work, the event sync
MODEL_BUILD_S = 4.0  # alit_small built on the device (random init of ~300M parameters) + optimizer
BF16_TFLOPS, FP32_TFLOPS = 790.0, 50.0  # H100/H200 as measured here (fp32: no TF32, FMA units)
# torch.compile (inductor) of alit_small: no measurement yet; conservative figures per graph
INDUCTOR_GRAPH_S = 25.0


@dataclasses.dataclass(frozen=True)
class AttnUse:
    B: int
    L: int
    H: int
    D: int
    dtype: str  # "bf16" | "fp16" | "fp32"
    lengths: bool
    backward: bool
    precision: str = "highest"  # fp32 only: torch's matmul precision
    varlen: bool = False  # the forward on packed rows (the B sequences of L tokens, packed)


@dataclasses.dataclass(frozen=True)
class VqUse:
    N: int
    K: int
    d: int
    normalize: bool
    dtype: str


@dataclasses.dataclass
class Plan:
    name: str
    parts: tuple[int, ...]
    compiles: int = 0
    tuning_runs: int = 0
    cases: int = 0
    repeats: int = 0
    seconds: float = 0.0
    note: str = ""


def _model_lengths(cfg) -> list[int]:
    # encoder and decoder both attend over the 2D tokens + class token + the latents so far
    return [cfg.num_image_tokens + cfg.tokens_per_iter * (t + 1) for t in range(cfg.iterations)]


def _model_uses(cfg, batch: int, dtype: str, backward: bool) -> list:
    """The kernel launches of a rollout / training step of ``cfg`` (no lengths tensor: halting and
    compaction keep every sequence full)."""
    D = cfg.width // cfg.heads
    uses: list = [AttnUse(batch, L, cfg.heads, D, dtype, False, backward) for L in _model_lengths(cfg)]
    uses += [VqUse(batch * cfg.tokens_per_iter * (t + 1), cfg.codebook_size, cfg.latent_dim, True, dtype)
             for t in range(cfg.iterations)]
    uses.append(VqUse(batch * cfg.grid_size**2, cfg.vqgan.codebook_size, cfg.vqgan.z_channels, False, dtype))
    return uses


def _attn_uses(shapes, backward_too: bool = True) -> list:
    from benchmarks.cases import dtype_name

    return [AttnUse(s.B, s.L, s.H, s.D, dtype_name(s.dtype), s.mixed, bw) for s in shapes
            for bw in ((False, True) if backward_too else (True,))]


def kernel_uses(name: str, sizes) -> list:
    """The Triton launches section ``name`` makes at ``sizes`` (what its compiles depend on)."""
    from types import SimpleNamespace

    from benchmarks import gpu_suite as g
    from benchmarks.cases import dtype_name

    s = SimpleNamespace(sizes=sizes)  # what the shape helpers of gpu_suite read
    cfg, vq = sizes.model, sizes.vq
    uses = {
        "check-attention": lambda: _attn_uses(g.check_shapes(s, sizes.attn_shapes[:1]), backward_too=False) + [
            AttnUse(c.B, c.L, c.H, c.D, dtype_name(c.dtype), False, False, varlen=True)
            for c in g.check_shapes(s, sizes.attn_shapes[:1]) if c.mixed],
        "check-vq": lambda: [VqUse(n, k, d, norm, dt) for n, k, d, norm in vq for dt in ("fp32", "bf16")],
        "check-rollout": lambda: _model_uses(cfg, 8, "fp32", False),
        "adaptive-encode": lambda: _model_uses(cfg, sizes.encode_batch, "bf16", False),
        "train": lambda: _model_uses(cfg, sizes.train_batch, "bf16", True),
        "attention": lambda: _attn_uses(g.sweep_shapes(s, sizes.attn_shapes[:1])),
        "attention-d64": lambda: _attn_uses(g.check_shapes(s, sizes.attn_shapes[1:]) + g.sweep_shapes(s, sizes.attn_shapes[1:])),
        "vq": lambda: [VqUse(n, k, d, norm, "fp32") for n, k, d, norm in vq],
        "block": lambda: [AttnUse(sizes.block_batch, _model_lengths(cfg)[-1], cfg.heads, cfg.width // cfg.heads,
                                  "bf16", False, True)],
        "rollout": lambda: _model_uses(cfg, sizes.rollout_batch, "bf16", False),
        "rollout-graph": lambda: _model_uses(cfg, sizes.rollout_batch, "bf16", False),
        "encode-compiled": lambda: _model_uses(cfg, sizes.encode_batch, "bf16", False),
        "train-compiled": lambda: _model_uses(cfg, sizes.train_batch, "bf16", True),
        "train-stage2": lambda: _model_uses(cfg, 12, "fp16", True),
    }
    return uses[name]() if name in uses else []


def _calls(uses: Iterable) -> Iterable[tuple[str, Callable[[], None]]]:
    """(label, launcher call on meta tensors) for benchmarks.aot_check.capture."""
    import torch

    from alit_fast.kernels import attention as attn
    from alit_fast.kernels import vq

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    for u in uses:
        if isinstance(u, VqUse):
            def call(u=u):
                z = torch.empty(u.N, u.d, dtype=dt[u.dtype], device="meta")
                vq.vq_nearest_triton(z, torch.empty(u.K, u.d, device="meta"), u.normalize)
            yield f"vq {u}", call
            continue

        if u.varlen:
            def call(u=u):
                q, k, v = torch.empty(u.B * u.L, 3, u.H, u.D, dtype=dt[u.dtype], device="meta").unbind(1)
                attn.flash_attn_fwd_varlen(q, k, v, torch.empty(u.B + 1, dtype=torch.int32, device="meta"), u.L)
            yield f"attn varlen {u}", call
            continue

        def call(u=u):
            q, k, v = torch.empty(u.B, u.L, 3 * u.H * u.D, dtype=dt[u.dtype], device="meta").view(
                u.B, u.L, 3, u.H, u.D).unbind(2)
            lengths = torch.empty(u.B, dtype=torch.int32, device="meta") if u.lengths else None
            saved = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(u.precision)
            try:
                out, lse = attn.flash_attn_fwd(q, k, v, lengths)
                if u.backward:
                    attn.flash_attn_bwd(torch.empty_like(out), q, k, v, out, lse, lengths)
            finally:
                torch.set_float32_matmul_precision(saved)
        yield f"attn {u}", call


def compile_keys(uses: list) -> set[tuple]:
    """The unique compiles (kept autotune candidates included) the launches need on sm_90."""
    from benchmarks import aot_check

    if not uses:
        return set()
    target = aot_check.TARGETS[90]
    launches, errors, _ = aot_check.capture(target, aot_check.SUBSETS["ci"], lambda shapes: _calls(uses))
    if errors:
        raise RuntimeError("; ".join(errors[:3]))
    return {u.launch.key() for u in aot_check.deduplicate(launches, target) if u.kept}


def tuning_keys(uses: list) -> dict[tuple, int]:
    """{autotune key: candidates it benchmarks} for the attention launches (VQ is not autotuned)."""
    import torch

    from alit_fast.kernels import attention as attn
    from alit_fast.kernels._utils import next_power_of_2

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    out = {}
    for u in uses:
        if not isinstance(u, AttnUse):
            continue
        prec = "ieee" if u.dtype != "fp32" or u.precision == "highest" else "tf32"
        block_d = next_power_of_2(u.D)
        for kernel in ("fwd", "dkdv", "dq") if u.backward else ("fwd",):
            n = len(attn.candidates(kernel, (9, 0), dt[u.dtype], prec, block_d, atomic_dq=attn.DQ_MODE == "atomic"))
            if kernel == "dq" and attn.DQ_MODE == "atomic":
                continue
            out[(kernel, u.dtype, prec, block_d, u.lengths, math.ceil(u.L / 32))] = n
    return out


@functools.lru_cache(maxsize=None)
def _flops(kind: str, batch: int) -> float:
    """FLOPs of alit_small's rollout / training step / official evaluation (counted on the meta
    device, which takes a few seconds: once per figure)."""
    from benchmarks.cases import Sizes, rollout_flops, vqgan_flops

    cfg = Sizes.gpu().model
    if kind == "rollout":
        return rollout_flops(cfg, batch)
    if kind == "train":
        fwd = rollout_flops(cfg, batch, soft_code=True)
        return fwd + 2 * (fwd - vqgan_flops(cfg, batch))  # backward ~2x, the VQGAN frozen
    return rollout_flops(cfg, 1, soft_code=True, official=True) + cfg.iterations * vqgan_flops(cfg, 1, "decoder")


def _rollout_run_s(cfg, batch: int, fp32: bool = False) -> float:
    rate = (FP32_TFLOPS if fp32 else BF16_TFLOPS) * 1e12 * MODEL_EFFICIENCY
    return _flops("rollout", batch) / rate + RUN_OVERHEAD_S


def _train_run_s(cfg, batch: int) -> float:
    return _flops("train", batch) / (BF16_TFLOPS * 1e12 * MODEL_EFFICIENCY) + RUN_OVERHEAD_S


def _official_run_s(cfg) -> float:
    # batch 1: latency-bound, thousands of small launches, and fp32
    return _flops("official", 1) / (FP32_TFLOPS * 1e12 * MODEL_EFFICIENCY) + 0.1


def run_costs(name: str, sizes) -> tuple[int, int, float, str]:
    """(cases, repeats per case, seconds of running them and their set-up, note) of one section."""
    from types import SimpleNamespace

    from benchmarks import gpu_suite as g

    cfg, s = sizes.model, SimpleNamespace(sizes=sizes)
    warm, timed = sizes.model_reps
    runs = warm + timed + 2  # + the peak-memory run + the first call (or the FLOP count)
    providers = 6  # triton, 4 SDPA backends, eager math
    sweep1 = 2 * len(g.sweep_shapes(s, sizes.attn_shapes[:1]))  # fwd and fwd+bwd
    sweep2 = 2 * len(g.sweep_shapes(s, sizes.attn_shapes[1:]))
    checks1 = len(g.check_shapes(s, sizes.attn_shapes[:1]))
    checks2 = len(g.check_shapes(s, sizes.attn_shapes[1:]))
    roll, train = (lambda b: _rollout_run_s(cfg, b)), (lambda b: _train_run_s(cfg, b))
    graph = INDUCTOR_GRAPH_S
    table = {  # lambdas: only the asked section's figures are worked out
        "environment": lambda: (1, 1, 8.0, "CUDA init, nvidia-smi, versions"),
        "check-attention": lambda: (checks1, 3, 4.0, "triton, SDPA and float64, fwd+bwd each"),
        "check-vq": lambda: (4 * len(sizes.vq), 1, 8.0, "float64 reference in 8,192-row chunks on the GPU"),
        "check-rollout": lambda: (3, 1, MODEL_BUILD_S + 3 * _rollout_run_s(cfg, 8, fp32=True),
                                  "fp32, 8 images, 3 backends"),
        "adaptive-encode": lambda: (3, runs + 1, MODEL_BUILD_S + (runs + 1) * (2 * roll(sizes.encode_batch)
                                                                               + _official_run_s(cfg)),
                                    "+1 run: tokens and L1 outside the timing"),
        "train": lambda: (3, runs + 1, 3 * (MODEL_BUILD_S + (runs + 1) * train(sizes.train_batch)),
                          "a fresh model and AdamW per variant; official fp16 with a GradScaler"),
        "ceilings": lambda: (3, 1, 3 * KERNEL_CASE_S + 2.0, "8192^3 bf16 and fp32 matmuls, a 2 GiB copy"),
        "attention": lambda: (sweep1 * providers, 1, sweep1 * providers * KERNEL_CASE_S, "do_bench per case"),
        "vq": lambda: (4 * len(sizes.vq), 1, 4 * len(sizes.vq) * KERNEL_CASE_S + 2.0,
                       "the naive path writes 1 GiB per call"),
        "auto": lambda: (sweep1, 1, sweep1 * (KERNEL_CASE_S + providers * 0.05),
                         "only if alit_fast.ops offers 'auto'; its first call per shape times each candidate once"),
        "rollout": lambda: (3, runs, 3 * runs * roll(sizes.rollout_batch), ""),
        "rollout-graph": lambda: (2, runs + 2, 2 * (runs + 2) * roll(sizes.rollout_batch),
                                  "+2 eager runs before the capture"),
        "encode-compiled": lambda: (1, runs + 1, 2 * graph + (runs + 1) * roll(sizes.encode_batch),
                                    f"triton; inductor, dynamic shapes: ~2 graphs of the whole step, {graph:.0f} s "
                                    "each assumed"),
        "train-compiled": lambda: (1, runs + 1, MODEL_BUILD_S + 2 * graph + (runs + 1) * train(sizes.train_batch),
                                   f"triton; inductor: the block graph, forward and backward, {graph:.0f} s each assumed"),
        "train-stage2": lambda: (2, 16, 2 * (2 * MODEL_BUILD_S + 16 * train(12) * 1.5 + 10.0),
                                 "16 steps + a resume per backend; discriminator steps"),
        "block": lambda: (3, runs, 3 * runs * 0.05 + 3.0, ""),
        "attention-d64": lambda: (checks2 + sweep2 * providers, 1, 4.0 + sweep2 * providers * KERNEL_CASE_S,
                                  "the check, then the sweep"),
    }
    return table[name]()


@functools.lru_cache(maxsize=None)
def plans(compile_s: float) -> tuple[Plan, ...]:
    """Every section's plan, in the run's order within each part, at ``compile_s`` per compile."""
    from benchmarks.cases import Sizes
    from benchmarks.gpu_suite import ORDER

    sizes = Sizes.gpu()
    out = []
    for part in (1, 2):
        # each part is its own process: nothing compiled in part 1 is in part 2's memory (Triton's
        # disk cache does persist on the same machine, but a second call may get a fresh one)
        seen_compiles: set = set()
        seen_tunings: set = set()
        for name in ORDER[part]:
            uses = kernel_uses(name, sizes)
            compiles = compile_keys(uses) - seen_compiles
            tunings = {k: n for k, n in tuning_keys(uses).items() if k not in seen_tunings}
            seen_compiles |= compiles
            seen_tunings |= set(tunings)
            cases, repeats, run_s, note = run_costs(name, sizes)
            runs = sum(tunings.values())
            seconds = len(compiles) * compile_s + runs * TUNE_S + run_s
            out.append(Plan(name, (part,), len(compiles), runs, cases, repeats, seconds, note))
    return tuple(out)


# plans(COMPILE_S) rounded, written out so that the GPU run budgets without working it out there
# (the capture is a CPU-only step, minutes of it are no use in a device call);
# benchmarks/test_gpu_suite_smoke.py fails when this table and the plan part ways
PLANNED_S = {
    1: {"environment": 8, "check-attention": 56, "check-vq": 20, "check-rollout": 24, "adaptive-encode": 21,
        "train": 38, "ceilings": 3, "attention": 25, "vq": 5, "auto": 7},
    2: {"environment": 8, "ceilings": 3, "rollout": 22, "rollout-graph": 6, "encode-compiled": 53,
        "train-compiled": 74, "train-stage2": 77, "block": 4, "attention-d64": 104},
}


def planned_seconds(sections: list[str], part: int) -> dict[str, float]:
    """{section: planned seconds} for the run's budgeting: the part's own figures, then the other
    part's for sections asked for out of their part."""
    table = dict(PLANNED_S[3 - part], **PLANNED_S[part])
    return {name: float(table[name]) for name in sections if name in table}


def measure_compile_seconds() -> tuple[float, int]:
    """(CPU seconds per compile, compiles): the attention kernels at bf16, D=128, with lengths, one
    candidate each (fwd, delta, dk/dv, dq), compiled for sm_90 into an empty cache here."""
    from benchmarks import aot_check

    sample = [AttnUse(32, 513, 8, 128, "bf16", True, True)]
    shapes = aot_check.SUBSETS["ci"]
    report = aot_check.run_check([90], shapes, workers=1, case_source=lambda _: _calls(sample), timeout=300)
    n = len(report.results)
    if not report.ok or n == 0:
        raise RuntimeError("the sample compile failed: " + "; ".join(report.failures[:3]))
    return report.seconds["compile_cpu"] / n, n


def expected_skips(rows: list[Plan], budget: float) -> list[str]:
    """The sections the run's rule (start a section only if its plan fits what is left) skips,
    if every section takes its planned time."""
    used, out = 0.0, []
    for p in rows:
        if used + p.seconds > budget:
            out.append(p.name)
        else:
            used += p.seconds
    return out


def plan_text(compile_s: float | None = None) -> str:
    how = "given"
    if compile_s is None:
        compile_s, n = measure_compile_seconds()
        how = f"measured here: {n} attention kernels compiled for sm_90, CPU seconds each"
    lines = [f"seconds per compile: {compile_s:.2f} ({how}); autotune: {TUNE_S} s per candidate run; "
             f"model cases at {MODEL_EFFICIENCY:.0%} of {BF16_TFLOPS:.0f} bf16 / {FP32_TFLOPS:.0f} fp32 TFLOP/s", ""]
    for part in (1, 2):
        from benchmarks.gpu_suite import BUDGET

        rows = [p for p in plans(compile_s) if part in p.parts]
        lines += [f"part {part} (budget {BUDGET[part]:.0f} s)", "",
                  "| section | new compiles | autotune runs | cases | repeats | est. s | cumulative s | note |",
                  "|---|---|---|---|---|---|---|---|"]
        total = 0.0
        for p in rows:
            total += p.seconds
            lines.append(f"| {p.name} | {p.compiles} | {p.tuning_runs} | {p.cases} | {p.repeats} | {p.seconds:.0f} | "
                         f"{total:.0f} | {p.note} |")
        fits = "fits" if total <= BUDGET[part] else "does not fit"
        lines += ["", f"part {part} total: {total:.0f} s, {fits} the {BUDGET[part]:.0f} s budget "
                      f"({sum(p.compiles for p in rows)} compiles, {sum(p.compiles for p in rows) * compile_s:.0f} s of them)"]
        skipped = expected_skips(rows, BUDGET[part])
        if skipped:
            lines.append(f"if the estimates hold, the run skips: {', '.join(skipped)} (a section runs only if its "
                         "estimate fits what is left)")
        lines.append("")
    return "\n".join(lines)
