"""The GPU run in two prepared calls, the figures that matter most first, each fitting its budget.

    PYTHONPATH=. python -m benchmarks.gpu_suite --out DIR             # part 1 (a CUDA machine)
    PYTHONPATH=. python -m benchmarks.gpu_suite --part 2 --out DIR    # part 2: the slow sections
    python -m benchmarks.gpu_suite --plan                             # on a CPU: what each costs
    python -m benchmarks.gpu_suite --smoke --out DIR                  # every section of both parts, tiny, on a CPU

Runs from a bare source tree with no installs and no pytest-benchmark (the GPU machine has no
package registry). Part 1, in order of value: (a) correctness of the compiled kernels against
float64 and the rollout on both backends; (b) adaptive encoding against the official procedure;
(c) the training step's time and peak memory against the official-style path; then the
ceilings, (d) attention against every SDPA backend, (e) VQ against torch's chunked path and a
TF32 cuBLAS matmul + argmin, (f) the ``auto`` backend, where alit_fast offers one. Part 2: the
second head layout, one block, the eager rollouts, a CUDA-graph replay of the rollout, the
whole-model ``torch.compile`` of the encode step, the compiled training step and stage 2.

Each section runs in its own try/except and the JSON and Markdown in DIR are rewritten after each,
so a failure keeps what came before. A section whose planned seconds (benchmarks.gpu_plan) no
longer fit the ``--budget`` is skipped, and one that overruns its own share stops at its next
case; the run then exits 0 with a line naming what it skipped. A watchdog ends a section stuck
past ``--hard-limit`` (exit 3, the files written, never 124: that reads as the tool's time-out).
The Markdown table is printed last, its summary against the goals at the very end.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
import traceback
import zlib
from pathlib import Path
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Section:
    name: str
    parts: tuple[int, ...]
    what: str


SECTIONS_TABLE = (
    Section("environment", (1, 2), "machine, versions"),
    Section("check-attention", (1,), "(a) attention fwd+bwd, bf16 and fp16, uniform and mixed, vs float64"),
    Section("check-vq", (1,), "(a) VQ at both shapes, fp32 and bf16 z, vs float64"),
    Section("check-rollout", (1,), "(a) full rollout, triton and official vs torch: latents, logits, index agreement"),
    Section("adaptive-encode", (1,), "(b) adaptive encode vs the official procedure: images/s, tokens, L1"),
    Section("train", (1,), "(c) alit_small training step: time and peak memory vs the official-style path"),
    Section("ceilings", (1, 2), "bf16 / fp32 matmul and copy ceilings for the floors"),
    Section("attention", (1,), "(d) attention vs every SDPA backend, bf16, uniform and mixed, fwd and fwd+bwd"),
    Section("vq", (1,), "(e) VQ vs the chunked torch path, a TF32 cuBLAS matmul + argmin, and the naive matrix"),
    Section("auto", (1,), "(f) the auto backend vs the fastest provider per shape, if alit_fast offers it"),
    Section("rollout", (2,), "a full rollout per backend, eager"),
    Section("rollout-graph", (2,), "the fixed-shape rollout captured once in a CUDA graph, replayed"),
    Section("encode-compiled", (2,), "adaptive encode with the whole model step torch.compile'd"),
    Section("train-compiled", (2,), "the training step with every block torch.compile'd"),
    Section("train-stage2", (2,), "stage 2 through its command line: scalers, GAN, stop and resume"),
    Section("block", (2,), "one transformer block fwd+bwd per backend"),
    Section("attention-d64", (2,), "the second head layout (D=64): fwd+bwd vs float64, then vs every SDPA backend"),
)
SECTIONS = tuple(sec.name for sec in SECTIONS_TABLE)
# run order per part: the table's, except that part 2 measures its ceilings first
ORDER = {
    1: [sec.name for sec in SECTIONS_TABLE if 1 in sec.parts],
    2: ["environment", "ceilings"] + [sec.name for sec in SECTIONS_TABLE if sec.parts == (2,)],
}


def part_sections(part: int) -> list[str]:
    return list(ORDER[part])


# the budgets of the two device calls: part 1 in a 540 s call, part 2 in what is left of a
# 15-minute lease after it and two machine starts
BUDGET = {1: 420.0, 2: 300.0}

# used for the floors when a ceiling could not be measured: the bf16 matmul rate and the copy
# bandwidth this workplace measured on its H200s, and the datasheet's fp32 (non-tensor) rate
NOMINAL = {"bf16_tflops": 790.0, "fp32_tflops": 67.0, "copy_gbs": 4300.0}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.gpu_suite", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for results.json, results.md (required unless --floors or --plan)")
    p.add_argument("--part", type=int, choices=(1, 2), default=1, help="which prepared call (default 1)")
    p.add_argument("--plan", action="store_true",
                   help="print each section's unique compiles, cases and estimated seconds, and exit (runs on a CPU)")
    p.add_argument("--compile-seconds", type=float, default=None,
                   help="with --plan: seconds per kernel compile (default: measured here, compiling a sample for sm_90)")
    p.add_argument("--floors", action="store_true",
                   help="print the FLOP / byte counts and H200 floor times of every full-size case, and exit")
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, every section of both parts (unless --sections); a CPU with the Triton interpreter")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds for the part's sections (default {BUDGET[1]:.0f} for part 1, {BUDGET[2]:.0f} for part 2)")
    p.add_argument("--hard-limit", type=float, default=None,
                   help="a watchdog writes what there is and exits (status 3) this many seconds in, even "
                        "mid-section (default: the budget + 60)")
    p.add_argument("--sections", default=None, help=f"comma-separated subset of: {', '.join(SECTIONS)}")
    args = p.parse_args(argv)
    if not args.out and not (args.floors or args.plan):
        p.error("--out is required")
    if args.sections:
        wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
        unknown = sorted(set(wanted) - set(SECTIONS))
        if unknown:
            p.error(f"unknown sections {unknown}; choose from {list(SECTIONS)}")
        args.sections = wanted
    elif args.smoke:
        args.sections = list(SECTIONS)
    else:
        args.sections = part_sections(args.part)
    if args.budget is None:
        args.budget = 1e9 if args.smoke else BUDGET[args.part]
    if args.hard_limit is None:
        args.hard_limit = args.budget + 60.0
    return args


class Suite:
    def __init__(self, args: argparse.Namespace) -> None:
        import torch

        from benchmarks.cases import Sizes

        self.t0 = time.time()
        self.budget = args.budget
        self.deadline = self.t0 + self.budget  # the running section's: its share, within the budget
        self.plan: dict[str, float] = {}  # planned seconds per section (benchmarks.gpu_plan)
        self.skipped: list[str] = []
        self.wanted: list[str] = []
        self.smoke = args.smoke
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.sizes = Sizes.cpu() if args.smoke else Sizes.gpu()
        if self.smoke:
            # the smoke run only proves the code paths: one timed run per case
            self.sizes = dataclasses.replace(self.sizes, model_reps=(0, 1), kernel_reps=(0, 1))
        self.ceilings: dict[str, float] = {}
        self.report: dict = {
            "meta": {
                "smoke": self.smoke,
                "part": args.part,
                "budget_s": self.budget,
                "device": str(self.device),
                "sizes": self.sizes.name,
                "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "argv": sys.argv,
            },
            "ceilings": self.ceilings,
            "sections": {},
        }
        self._model = None
        self.section = ""
        self.train_flops: float | None = None  # one eager step's FLOPs, reused for the compiled ones

    # ------------------------------------------------------------------ bookkeeping
    def elapsed(self) -> float:
        return time.time() - self.t0

    def out_of_time(self) -> bool:
        """Past the running section's share of the budget: stop at the next case."""
        return time.time() > self.deadline

    def ceiling(self, key: str) -> float:
        return self.ceilings.get(key) or NOMINAL[key]

    def add(self, **row) -> dict:
        row.setdefault("status", "ok")
        self.report["sections"][self.section]["rows"].append(row)
        return row

    def run(self, name: str, fn: Callable[["Suite"], None]) -> None:
        planned = self.plan.get(name, 0.0)
        entry = {"status": "running", "rows": [], "seconds": None, "error": None, "planned_s": planned}
        self.report["sections"][name] = entry
        self.section = name
        left = self.budget - self.elapsed()
        if planned > left:
            entry["status"] = f"skipped: planned {planned:.0f} s, {max(left, 0):.0f} s of the {self.budget:.0f} s budget left"
            self.skipped.append(name)
            print(f"[{self.elapsed():6.1f}s] {name}: {entry['status']}", flush=True)
            self.write()
            return
        start = time.time()
        # a section may overrun its plan (the plan is an estimate) into what is left, up to twice it
        self.deadline = self.t0 + self.budget
        if planned:
            self.deadline = min(self.deadline, start + max(2.0 * planned, planned + 30.0))
        print(f"[{self.elapsed():6.1f}s] {name} (planned {planned:.0f} s) ...", flush=True)
        try:
            fn(self)
            entry["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 - one failed section must not lose the rest
            entry["status"] = "error"
            entry["error"] = "".join(traceback.format_exception(exc))
            print(entry["error"], file=sys.stderr, flush=True)
        finally:
            entry["seconds"] = round(time.time() - start, 2)
            self._release()
            self.write()

    def _release(self) -> None:
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def model(self):
        from benchmarks.cases import build_model

        if self._model is None:
            self._model = build_model(self.sizes.model, self.device)
        return self._model

    def write(self) -> None:
        self.report["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        markdown = render_markdown(self.report)  # also fills the speed-ups the JSON carries
        (self.out / "results.json").write_text(json.dumps(self.report, indent=1, default=str))
        (self.out / "results.md").write_text(markdown)


# ---------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------


def sec_environment(s: Suite) -> None:
    import torch
    import triton

    from benchmarks import _env

    meta = s.report["meta"]
    meta.update(
        kernels_package=_env.KERNELS_FROM,
        torch=torch.__version__,
        triton=triton.__version__,
        python=platform.python_version(),
        host=platform.node(),
        cpu=_cpu_model(),
        cpu_threads=torch.get_num_threads(),
        triton_interpret=os.environ.get("TRITON_INTERPRET", ""),
    )
    if s.device.type == "cuda":
        prop = torch.cuda.get_device_properties(s.device)
        meta.update(
            gpu=prop.name,
            capability=f"{prop.major}.{prop.minor}",
            sms=prop.multi_processor_count,
            gpu_memory_gib=round(prop.total_memory / 2**30, 1),
            cuda=torch.version.cuda,
        )
        meta["nvidia_smi"] = _run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,"
                                   "temperature.gpu,power.draw,power.limit", "--format=csv"])
    meta["git"] = _run(["git", "rev-parse", "--short", "HEAD"])


def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception as exc:  # noqa: BLE001 - informational only
        return f"unavailable ({type(exc).__name__})"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip() + f" x{os.cpu_count()}"
    except OSError:
        pass
    return platform.processor() or "unknown"


def sec_ceilings(s: Suite) -> None:
    import torch

    from benchmarks.cases import Case, device_generator, time_case

    n = 256 if s.smoke else 8192
    g = device_generator(s.device, 0)
    for key, dtype in (("bf16_tflops", torch.bfloat16), ("fp32_tflops", torch.float32)):
        # random data: zeros ran ~13% faster on this workplace's H200
        a = torch.randn(n, n, generator=g, device=s.device, dtype=dtype)
        b = torch.randn(n, n, generator=g, device=s.device, dtype=dtype)
        # fp32 without TF32: the rate of the FMA units that the VQ kernel's exact dots run on
        saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            ms = time_case(Case(fn=lambda: a @ b), s.device, s.sizes.kernel_reps, kernel=True)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = saved
        s.ceilings[key] = 2.0 * n**3 / ms / 1e9
        s.add(case=f"matmul {n}^3", provider=str(dtype).replace("torch.", ""), ms=ms, tflops=s.ceilings[key])
        del a, b
    nbytes = (8 if s.smoke else 2048) * 2**20
    src = torch.randn(nbytes // 4, generator=g, device=s.device)
    dst = torch.empty_like(src)
    ms = time_case(Case(fn=lambda: dst.copy_(src)), s.device, s.sizes.kernel_reps, kernel=True)
    s.ceilings["copy_gbs"] = 2.0 * nbytes / ms / 1e6  # bytes read + bytes written
    s.add(case=f"copy {nbytes / 2**20:.0f} MiB", provider="device-to-device", ms=ms, gbs=s.ceilings["copy_gbs"])


def _rel(a, ref) -> float:
    import torch

    a, ref = a.double(), ref.double()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - ref).norm() / ref.norm().clamp_min(1e-30))


ATTN_TOL = {"bf16": (1e-2, 2e-2), "fp16": (2e-3, 5e-3)}  # (output, gradients): relative l2 errors


def check_shapes(s: Suite, layouts: tuple[tuple[int, int, int], ...]) -> list:
    """The correctness shapes: per head layout and 16-bit dtype, the shortest uniform length and the
    longest mixed batch (the kernels compile once per dtype, head dim and lengths-or-not, not per L)."""
    from benchmarks.cases import AttnShape

    sizes = s.sizes
    out = []
    for B, H, D in layouts:
        for dtype in sizes.attn_dtypes:
            out.append(AttnShape(B, H, D, min(sizes.attn_uniform_L), dtype, False))
            out.append(AttnShape(B, H, D, max(sizes.attn_mixed_L), dtype, True))
    return out


def _attention_errors(s: Suite, shape, backend: str, qkv, go, lengths, ref, ref_grads) -> dict:
    import torch

    from alit_fast.ops.attention import attention
    from benchmarks.cases import interpreter_guard

    x = qkv.detach().clone().requires_grad_()
    with interpreter_guard(backend == "triton"):
        out = attention(*x.unbind(2), lengths, backend=backend)
        out.backward(go)
    e = {"out": _rel(out, ref)}
    for name, gr, gref in zip("qkv", x.grad.unbind(2), ref_grads):
        e["d" + name] = _rel(gr, gref)
    if lengths is not None and backend == "triton":
        valid = torch.arange(shape.L, device=s.device)[None, :] < lengths[:, None]
        e["padded_rows_zero"] = bool((out[~valid] == 0).all())
    return e


def _varlen_error(s: Suite, qkv, lengths, ref) -> float:
    """The Triton varlen forward on the same sequences packed (their valid rows only) against the
    float64 reference's valid rows."""
    import torch

    from alit_fast.ops import VarlenLayout, attention_varlen
    from benchmarks.cases import interpreter_guard

    host = lengths.tolist()  # a check, not a timing: one read
    packed = torch.cat([qkv[b, :n] for b, n in enumerate(host)])
    with torch.no_grad(), interpreter_guard(True):
        out = attention_varlen(packed, VarlenLayout.from_lengths(host, s.device), backend="triton")
    return _rel(out, torch.cat([ref[b, :n] for b, n in enumerate(host)]))


def check_attention(s: Suite, layouts: tuple[tuple[int, int, int], ...]) -> None:
    from alit_fast.ops.attention import attention_naive
    from benchmarks.cases import attention_inputs, dtype_name

    for shape in check_shapes(s, layouts):
        if s.out_of_time():
            s.add(case=shape.label, provider="triton fwd+bwd vs float64", status="skipped", note="time budget spent")
            continue
        qkv, go, lengths = attention_inputs(shape, s.sizes, s.device, seed=zlib.crc32(shape.label.encode()))
        q64 = qkv.detach().double().requires_grad_()
        ref = attention_naive(*q64.unbind(2), lengths)
        ref.backward(go.double())
        ref_grads = q64.grad.unbind(2)
        t = _attention_errors(s, shape, "triton", qkv, go, lengths, ref, ref_grads)
        if lengths is not None:
            t["varlen_out"] = _varlen_error(s, qkv, lengths, ref)
        sdpa = _attention_errors(s, shape, "torch", qkv, go, lengths, ref, ref_grads)
        tol_out, tol_grad = ATTN_TOL[dtype_name(shape.dtype)]
        ok = t["out"] <= tol_out and max(t["dq"], t["dk"], t["dv"]) <= tol_grad and t.get("padded_rows_zero") is not False
        ok = ok and t.get("varlen_out", 0.0) <= tol_out
        s.add(case=shape.label, provider="triton fwd+bwd vs float64", status="pass" if ok else "fail",
              errors=t, sdpa_errors=sdpa, tol={"out": tol_out, "grads": tol_grad})
        del q64, ref, ref_grads


def sec_check_attention(s: Suite) -> None:
    check_attention(s, s.sizes.attn_shapes[:1])


def sec_check_vq(s: Suite) -> None:
    import torch
    import torch.nn.functional as F

    from alit_fast.ops.vq import vq_nearest
    from benchmarks.cases import interpreter_guard, vq_inputs, vq_label

    for n, k, d, normalize in s.sizes.vq:
        for zdtype in (torch.float32, torch.bfloat16):
            z, cb = vq_inputs(n, k, d, s.device, seed=7)
            z = z.to(zdtype)
            z64, cb64 = z.double(), cb.double()
            if normalize:
                z64, cb64 = F.normalize(z64, dim=-1), F.normalize(cb64, dim=-1)
            ref_best = torch.empty(n, dtype=torch.float64, device=s.device)
            ref_idx = torch.empty(n, dtype=torch.int64, device=s.device)
            csq = (cb64 * cb64).sum(1)
            for lo in range(0, n, 8192):
                rows = z64[lo : lo + 8192]
                dist = (rows * rows).sum(1, keepdim=True) + csq[None] - 2 * rows @ cb64.T
                ref_best[lo : lo + 8192], ref_idx[lo : lo + 8192] = dist.min(1)
            scale = (z64 * z64).sum(1) + csq[ref_idx]
            for provider, backend in (("triton", "triton"), ("chunked", "torch")):
                with interpreter_guard(backend == "triton"):
                    idx, _ = vq_nearest(z, cb, normalize, backend=backend)
                chosen = ((z64 - cb64[idx]) ** 2).sum(1)
                gap = (chosen - ref_best) / scale  # how much farther the chosen code is, relative
                mismatches = int((idx != ref_idx).sum())
                worst = float(gap.max())
                ok = worst <= 1e-5
                s.add(case=f"{vq_label(n, k, d, normalize)} z {str(zdtype).replace('torch.', '')}",
                      provider=f"{provider} vs float64", status="pass" if ok else "fail",
                      errors={"index_mismatches": mismatches, "max_relative_gap": worst}, tol={"max_relative_gap": 1e-5})


# the two backends sum in different orders, so a code whose distance ties another's within fp32
# rounding may be picked differently, and that token's latent differs from there on: the rollout
# check asks for an agreement rate on the indices and a tolerance on latents and logits, not
# bit-identity (first guesses, to be confirmed by the first GPU run)
ROLLOUT_TOL = {"index_agreement": 0.98, "latents_rel": 2e-2, "logits_rel": 2e-2}


def rollout_agreement(ref: list, other: list) -> dict:
    """Per-iteration share of equal indices and relative l2 errors of latents and logits."""
    agree = [float((a.indices == b.indices).float().mean()) for a, b in zip(ref, other)]
    return {
        "index_agreement_min": min(agree),
        "index_agreement_per_iteration": agree,
        "latents_rel_max": max(_rel(b.latents, a.latents) for a, b in zip(ref, other)),
        "logits_rel_max": max(_rel(b.logits, a.logits) for a, b in zip(ref, other)),
    }


def sec_check_rollout(s: Suite) -> None:
    import torch

    from benchmarks.cases import device_images, interpreter_guard

    model = s.model().eval()
    batch = 2 if s.smoke else 8
    images = device_images(batch, s.sizes.model.image_size, 11, s.device)
    records = {}
    for backend in ("torch", "triton", "official"):
        model.set_backend(backend)
        with torch.no_grad(), interpreter_guard(backend == "triton"):
            records[backend] = model.rollout(images)
    for backend in ("triton", "official"):
        e = rollout_agreement(records["torch"], records[backend])
        ok = (e["index_agreement_min"] >= ROLLOUT_TOL["index_agreement"] and e["latents_rel_max"] <= ROLLOUT_TOL["latents_rel"]
              and e["logits_rel_max"] <= ROLLOUT_TOL["logits_rel"])
        s.add(case=f"rollout fp32, {len(records[backend])} iterations, {batch} images", provider=f"{backend} vs torch",
              status="pass" if ok else "fail", errors=e, tol=ROLLOUT_TOL)


def _measure(s: Suite, case, *, kernel: bool, absolute_memory: bool = False) -> dict:
    from benchmarks.cases import MiB, peak_memory, time_case

    ms = time_case(case, s.device, s.sizes.kernel_reps if kernel else s.sizes.model_reps, kernel=kernel)
    peak = peak_memory(case, s.device)
    row = {"ms": ms, "peak_mib": None if peak is None else peak / MiB}
    if absolute_memory and s.device.type == "cuda":
        row["peak_abs_mib"] = peak_memory(case, s.device, absolute=True) / MiB
    if case.flops:
        row["tflops"] = case.flops / ms / 1e9
    if case.min_bytes:
        row["gbs"] = case.min_bytes / ms / 1e6
    if case.images:
        row["images_per_s"] = case.images / ms * 1e3
    if case.note:
        row["note"] = case.note
    return row


def _floor_ms(s: Suite, flops: float, nbytes: float, rate_key: str) -> float:
    return max(flops / (s.ceiling(rate_key) * 1e9), nbytes / (s.ceiling("copy_gbs") * 1e6))


def sweep_shapes(s: Suite, layouts: tuple[tuple[int, int, int], ...]) -> list:
    """The timing sweep: bf16 only (fp16 runs the same tiles), every uniform and mixed length."""
    import torch

    from benchmarks.cases import AttnShape

    sizes = s.sizes
    return [AttnShape(B, H, D, L, torch.bfloat16, mixed) for B, H, D in layouts
            for mixed, lengths in ((False, sizes.attn_uniform_L), (True, sizes.attn_mixed_L)) for L in lengths]


def sec_attention(s: Suite) -> None:
    attention_sweep(s, s.sizes.attn_shapes[:1])


def sec_attention_d64(s: Suite) -> None:
    # one section: the sweep would compile these kernels anyway, the check first makes them count
    check_attention(s, s.sizes.attn_shapes[1:])
    attention_sweep(s, s.sizes.attn_shapes[1:])


def attention_sweep(s: Suite, layouts: tuple[tuple[int, int, int], ...]) -> None:
    from benchmarks.cases import ATTENTION_PROVIDERS, attention_case, probe

    for shape in sweep_shapes(s, layouts):
        for backward in (False, True):
            passes = "fwd+bwd" if backward else "fwd"
            for provider in ATTENTION_PROVIDERS:
                label = f"{shape.label} {passes}"
                if s.out_of_time():
                    s.add(case=label, provider=provider, status="skipped", note="time budget spent")
                    continue
                case = attention_case(provider, shape, s.sizes, s.device, backward)
                if provider.startswith("sdpa-"):
                    reason = probe(case)
                    if reason is not None:
                        s.add(case=label, provider=provider, status="unsupported", note=reason)
                        continue
                try:
                    row = _measure(s, case, kernel=True)
                except Exception as exc:  # noqa: BLE001 - e.g. out of memory for eager math
                    s.add(case=label, provider=provider, status="error", note=f"{type(exc).__name__}: {exc}"[:300])
                    continue
                row["frac_ceiling"] = row["tflops"] / s.ceiling("bf16_tflops")
                row["floor_ms"] = _floor_ms(s, case.flops, case.min_bytes, "bf16_tflops")
                s.add(case=label, provider=provider, mixed=shape.mixed, passes=passes, **row)
                del case


def sec_vq(s: Suite) -> None:
    from benchmarks.cases import VQ_PROVIDERS, vq_case, vq_label

    for n, k, d, normalize in s.sizes.vq:
        for provider in VQ_PROVIDERS:
            if s.out_of_time():
                s.add(case=vq_label(n, k, d, normalize), provider=provider, status="skipped", note="time budget spent")
                continue
            case = vq_case(provider, n, k, d, normalize, s.device)
            row = _measure(s, case, kernel=True)
            # the kernel's exact fp32 dots run on the FMA units, not the tensor cores
            row["frac_ceiling"] = row["tflops"] / s.ceiling("fp32_tflops")
            row["floor_ms"] = _floor_ms(s, case.flops, case.min_bytes, "fp32_tflops")
            s.add(case=vq_label(n, k, d, normalize), provider=provider, **row)


def sec_block(s: Suite) -> None:
    from benchmarks.cases import MODEL_BACKENDS, block_case

    cfg = s.sizes.model
    for backend in MODEL_BACKENDS:
        case = block_case(backend, s.sizes, s.device)
        row = _measure(s, case, kernel=False)
        row["frac_ceiling"] = row["tflops"] / s.ceiling("bf16_tflops")
        s.add(case=f"B{s.sizes.block_batch} L{cfg.num_image_tokens + cfg.max_tokens} W{cfg.width} fwd+bwd bf16",
              provider=backend, **row)


def sec_rollout(s: Suite) -> None:
    from benchmarks.cases import MODEL_BACKENDS, count_flops, rollout_case

    model = s.model()
    flops = None
    for backend in MODEL_BACKENDS:
        case = rollout_case(model, backend, s.sizes, s.device)
        if flops is None:
            flops = count_flops(case.fn)  # same arithmetic for every backend; the torch one is countable
        case.flops = flops
        row = _measure(s, case, kernel=False)
        row["frac_ceiling"] = row["tflops"] / s.ceiling("bf16_tflops")
        s.add(case=f"B{s.sizes.rollout_batch} all iterations, bf16 autocast, no grad", provider=backend, **row)


def auto_backend_available() -> bool:
    from alit_fast import ops

    return "auto" in getattr(ops, "BACKENDS", ())


def _auto_table() -> str | None:
    """The auto backend's own record of its choices, where its module offers one (issue 23)."""
    import importlib

    for module in ("alit_fast.ops.auto", "alit_fast.ops"):
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name in ("calibration_table", "auto_table", "table"):
            fn = getattr(mod, name, None)
            if callable(fn):
                try:
                    return str(fn())[:4000]
                except Exception as exc:  # noqa: BLE001 - informational
                    return f"{module}.{name}() raised {type(exc).__name__}: {exc}"
    return None


def sec_auto(s: Suite) -> None:
    """auto's pick per attention shape, timed as the attention section times the providers: its
    first call (where it calibrates) apart, then the same do_bench; the verdict is its time over the
    fastest provider the attention section measured for that case."""
    if not auto_backend_available():
        s.add(case="-", provider="auto", status="skipped", note="alit_fast.ops offers no 'auto' backend in this tree")
        print("auto: skipped, alit_fast.ops.BACKENDS has no 'auto'", flush=True)
        return
    from benchmarks.cases import attention_case

    measured = {}
    for r in _ok(_rows(s.report, "attention")):
        key = r["case"]
        measured[key] = min(measured.get(key, math.inf), r["ms"])
    for shape in sweep_shapes(s, s.sizes.attn_shapes[:1]):
        for backward in (False, True):
            label = f"{shape.label} {'fwd+bwd' if backward else 'fwd'}"
            if s.out_of_time():
                s.add(case=label, provider="auto", status="skipped", note="time budget spent")
                continue
            case = attention_case("auto", shape, s.sizes, s.device, backward)
            t0 = time.time()
            with case.context():
                case.fn()  # calibrates this shape's key
            first = time.time() - t0
            row = _measure(s, case, kernel=True)
            best = measured.get(label)
            row.update(first_call_s=first, best_measured_ms=best, auto_over_best=row["ms"] / best if best else None)
            s.add(case=label, provider="auto", **row)
    table = _auto_table()
    if table is not None:
        s.report["sections"][s.section]["auto_table"] = table


def _encoded_quality(model, images, result) -> dict:
    """Mean tokens and mean pixel L1 of what an encoding chose, decoded outside the timed region."""
    import torch

    from alit_fast.inference.criteria import l1_per_image

    with torch.no_grad():
        if hasattr(result, "lengths"):  # alit_fast's TokenBatch
            tokens = float(result.lengths.float().mean())
            pixels = model.decode(result)
        else:  # the official procedure: one length for the batch, its reconstructions kept
            tokens, pixels = float(result.num_tokens), result.reconstructions
        return {"mean_tokens": tokens, "mean_l1": float(l1_per_image(images, pixels.float()).mean())}


def sec_rollout_graph(s: Suite) -> None:
    from benchmarks.cases import graphed_case, rollout_case

    model = s.model()
    # a CPU has no graphs: the smoke run proves the path once, on the cheaper backend
    for backend in ("torch",) if s.device.type != "cuda" else ("triton", "torch"):
        if s.out_of_time():
            s.add(case="rollout graph", provider=backend, status="skipped", note="time budget spent")
            continue
        try:
            case = graphed_case(rollout_case(model, backend, s.sizes, s.device, autocast_cache=False), s.device)
            row = _measure(s, case, kernel=False)
        except Exception as exc:  # noqa: BLE001 - e.g. a capture-unsafe op: keep the other backend's row
            s.add(case="rollout graph", provider=backend, status="error",
                  note="".join(traceback.format_exception_only(exc)).strip()[:500])
            continue
        s.add(case=f"B{s.sizes.rollout_batch} all iterations, bf16 autocast, no grad, one graph", provider=backend, **row)


def sec_encode_compiled(s: Suite) -> None:
    """model.encode with its step compiled whole (``model.compile_step()``: fullgraph, static
    shapes, one graph per iteration index); the first call, which compiles, timed apart."""
    from benchmarks.cases import ENCODE_CRITERION, encode_case

    model = s.model()
    # one backend: on a GPU the triton one (inductor costs minutes per model); on the smoke run the
    # torch one, the same code path without half a minute of the interpreter under dynamo
    for backend in ("torch",) if s.smoke else ("triton",):
        if s.out_of_time():
            s.add(case="encode compiled", provider=backend, status="skipped", note="time budget spent")
            continue
        model.set_backend(backend)
        # on a GPU dynamic shapes: one graph serves every iteration's length (static ones compile
        # one per iteration index, 8 inductor compiles of the whole model). The smoke run compiles
        # static graphs: tracing symbolic shapes took 44 s there against 12 s (both ran clean)
        dynamic = not s.smoke
        step = model.compile_step(backend=s.sizes.compile_backend, dynamic=dynamic)
        case = encode_case(model, backend, s.sizes, s.device, step_fn=step)
        t0 = time.time()
        with case.context():
            case.fn()
        first = time.time() - t0
        row = _measure(s, case, kernel=False)
        row.update(first_call_s=first,
                   note=f"step compiled whole ({s.sizes.compile_backend}, {'dynamic' if dynamic else 'static'} shapes)")
        s.add(case=f"encode B{s.sizes.encode_batch} criterion {ENCODE_CRITERION}, bf16", provider=f"{backend}-compiled", **row)


def sec_adaptive(s: Suite) -> None:
    from benchmarks.cases import ENCODE_CRITERION, encode_case, official_encode_case

    model = s.model()
    for backend in ("triton", "torch"):
        case = encode_case(model, backend, s.sizes, s.device)
        row = _measure(s, case, kernel=False)
        with case.context():
            row.update(_encoded_quality(model, case.input_images, case.fn()))
        s.add(case=f"encode B{s.sizes.encode_batch} criterion {ENCODE_CRITERION}, bf16", provider=f"{backend}-bf16", **row)
    case = official_encode_case(model, s.sizes, s.device)
    row = _measure(s, case, kernel=False)
    row.update(_encoded_quality(model, case.input_images, case.fn()))
    s.add(case="official evaluation: B1, fp32, all iterations + pixel decodes", provider="official-b1-fp32", **row)


def _train(s: Suite, variants: list[str]) -> None:
    from benchmarks.cases import build_model, count_flops, train_case

    for variant in variants:
        if s.out_of_time():
            s.add(case="training step", provider=variant, status="skipped", note="time budget spent")
            continue
        try:
            t0 = time.time()
            case = train_case(variant, s.sizes, s.device, build_model(s.sizes.model, s.device))
            if s.train_flops is None and not case.compiled:
                s.train_flops = count_flops(case.fn)  # also the first (warm-up) step
            case.flops = s.train_flops or 0.0
            first = time.time()
            case.fn()  # compiles, for the compiled variants
            first = time.time() - first
            row = _measure(s, case, kernel=False, absolute_memory=True)
            row["first_step_s"] = first
            row["setup_s"] = time.time() - t0
            if row.get("tflops"):
                row["frac_ceiling"] = row["tflops"] / s.ceiling("bf16_tflops")
            s.add(case=f"alit training step B{s.sizes.train_batch}", provider=variant, **row)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: keep the other variants
            s.add(case="training step", provider=variant, status="error",
                  note="".join(traceback.format_exception_only(exc)).strip()[:500])
        finally:
            case = None
            s._release()


def sec_train(s: Suite) -> None:
    from benchmarks.cases import TRAIN_VARIANTS

    _train(s, [name for name, _, _, compiled in TRAIN_VARIANTS if not compiled])


def sec_train_compiled(s: Suite) -> None:
    from benchmarks.cases import TRAIN_VARIANTS

    # the triton variant only: on a GPU each costs a minute or more of inductor
    _train(s, [name for name, backend, _, compiled in TRAIN_VARIANTS if compiled and backend == "triton"])


def sec_train_stage2(s: Suite) -> None:
    """Stage 2 (``--stage finetune``) through its command line on this device, both backends: the
    two GradScalers under the GPU's default fp16 autocast, the adaptive GAN weight, discriminator
    steps, a stop and an exact-position resume. Seeded random weights of the suite's model (the
    official per-GPU batch of 12 at full size); LPIPS off, as no VGG16 weights are on the machine."""
    import shutil
    import tempfile

    import torch

    from alit_fast import ALIT
    from alit_fast.training.stages import main as train_main

    cfg = s.sizes.model
    batch, steps = (2, 4) if s.smoke else (12, 16)
    scratch = Path(tempfile.mkdtemp(prefix="alit_stage2_"))
    try:
        torch.manual_seed(0)
        init = scratch / "stage1.safetensors"
        ALIT(cfg).save(str(init))
        for backend in ("triton", "torch"):
            if s.out_of_time():
                s.add(case="stage-2 step", provider=backend, status="skipped", note="time budget spent")
                continue
            out = scratch / backend
            argv = ["--stage", "finetune", "--init", str(init), "--data", "synthetic", "--data-length", "100000",
                    "--batch-size", str(batch), "--steps", str(steps), "--warmup", "0", "--lpips", "off",
                    "--gan-schedule", "0:0.2", "--disc-every", "3", "--backend", backend, "--workers", "0",
                    "--threads", "0", "--log-every", "1", "--save-every", str(steps), "--no-progress",
                    "--out", str(out)]
            if s.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            first = train_main(argv + ["--stop-at", str(steps // 2)])
            second = train_main(argv + ["--resume"]) if first == 0 else None
            records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()] if (out / "log.jsonl").exists() else []
            numbers = [v for r in records for k, v in r.items() if isinstance(v, float) and k not in ("lr", "time")]
            kinds = {r.get("kind") for r in records}
            ok = (first == 0 and second == 0 and [r["step"] for r in records] == list(range(1, steps + 1))
                  and all(math.isfinite(v) for v in numbers) and kinds == {"generator", "discriminator"}
                  and (out / "ema.safetensors").exists())
            # the resumed half, past its first step (which pays for the restart)
            rates = sorted(r["images_per_s"] for r in records[steps // 2 + 1:] if r.get("kind") == "generator")
            row = {"case": f"stage-2 step B{batch} ({cfg.image_size}px, {cfg.iterations} iterations), "
                           f"{'fp16' if s.device.type == 'cuda' else 'fp32'}, LPIPS off",
                   "provider": backend, "status": "ok" if ok else "fail",
                   "images_per_s": rates[len(rates) // 2] if rates else None,
                   "note": f"exit {first}/{second}; {len(records)} log rows; kinds {sorted(k for k in kinds if k)}"}
            if s.device.type == "cuda":
                row["peak_abs_mib"] = torch.cuda.max_memory_allocated() / 2**20
            s.add(**row)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


RUNNERS: dict[str, Callable[[Suite], None]] = {
    "environment": sec_environment,
    "ceilings": sec_ceilings,
    "check-attention": sec_check_attention,
    "check-vq": sec_check_vq,
    "check-rollout": sec_check_rollout,
    "attention": sec_attention,
    "vq": sec_vq,
    "block": sec_block,
    "rollout": sec_rollout,
    "adaptive-encode": sec_adaptive,
    "train": sec_train,
    "train-compiled": sec_train_compiled,
    "train-stage2": sec_train_stage2,
    "auto": sec_auto,
    "attention-d64": sec_attention_d64,
    "rollout-graph": sec_rollout_graph,
    "encode-compiled": sec_encode_compiled,
}
assert set(RUNNERS) == set(SECTIONS)


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------


def _fmt(x, digits: int = 3) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        if math.isinf(x) or math.isnan(x):
            return str(x)
        if x == 0:
            return "0"
        if abs(x) >= 100:
            return f"{x:,.0f}"
        return f"{x:.{digits}g}"
    return str(x)


def _rows(report: dict, section: str) -> list[dict]:
    return report["sections"].get(section, {}).get("rows", [])


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("status") == "ok" and r.get("ms")]


def baseline_speedups(report: dict) -> None:
    """Fill ``speedup`` (throughput over the section's baseline, same case) in every timed row."""
    fastest_sdpa = lambda rows: min((r for r in rows if r["provider"].startswith("sdpa-")), key=lambda r: r["ms"], default=None)  # noqa: E731
    for section, pick in (
        ("attention", fastest_sdpa),
        ("attention-d64", fastest_sdpa),
        ("vq", lambda rows: next((r for r in rows if r["provider"] == "naive"), None)),
        ("block", lambda rows: next((r for r in rows if r["provider"] == "official"), None)),
        ("rollout", lambda rows: next((r for r in rows if r["provider"] == "official"), None)),
    ):
        groups: dict[str, list[dict]] = {}
        for r in _ok(_rows(report, section)):
            groups.setdefault(r["case"], []).append(r)
        for rows in groups.values():
            base = pick(rows)
            for r in rows:
                r["baseline"] = base["provider"] if base else None
                r["speedup"] = base["ms"] / r["ms"] if base else None
    enc = _ok(_rows(report, "adaptive-encode")) + _ok(_rows(report, "encode-compiled"))
    off = next((r for r in enc if r["provider"] == "official-b1-fp32"), None)
    for r in enc:
        r["baseline"] = off["provider"] if off else None
        r["speedup"] = r["images_per_s"] / off["images_per_s"] if off else None
    train = _ok(_rows(report, "train")) + _ok(_rows(report, "train-compiled"))
    ref = next((r for r in train if r["provider"] == "official-fp16"), None)
    for r in train:
        r["baseline"] = ref["provider"] if ref else None
        r["speedup"] = r["images_per_s"] / ref["images_per_s"] if ref else None
        key = "peak_abs_mib" if ref and ref.get("peak_abs_mib") else "peak_mib"
        if ref and ref.get(key) and r.get(key):
            r["memory_ratio"] = r[key] / ref[key]


def goals(report: dict) -> list[tuple[str, str, str]]:
    """(goal, what was measured, verdict) for each goal of benchmarks/RESULTS.md."""
    out = _goals(report)
    if report["meta"].get("smoke"):
        # tiny sizes on a CPU, Triton interpreted: the numbers say nothing about a GPU
        out = [(g, m, "n/a (smoke)") for g, m, _ in out]
    return out


def _goals(report: dict) -> list[tuple[str, str, str]]:
    out = []
    attn = _ok(_rows(report, "attention")) + _ok(_rows(report, "attention-d64"))
    tri = [r for r in attn if r["provider"] == "triton" and r.get("speedup") is not None]
    for mixed, need, text in ((False, 1.0, "attention >= fastest SDPA backend (uniform lengths)"),
                              (True, 1.5, "attention >= 1.5x fastest SDPA backend (mixed lengths)")):
        rows = [r for r in tri if r.get("mixed") == mixed]
        if rows:
            worst = min(rows, key=lambda r: r["speedup"])
            met = sum(r["speedup"] >= need for r in rows)
            out.append((text, f"{met}/{len(rows)} cases; worst {worst['speedup']:.2f}x ({worst['case']}, vs {worst['baseline']})",
                        "PASS" if met == len(rows) else "FAIL"))
        else:
            out.append((text, "not measured", "-"))
    vq = [r for r in _ok(_rows(report, "vq")) if r["provider"] == "triton" and r.get("speedup")]
    if vq:
        out.append(("VQ kernel >= 10x the naive path", "; ".join(f"{r['case']}: {r['speedup']:.1f}x" for r in vq),
                    "PASS" if all(r["speedup"] >= 10 for r in vq) else "FAIL"))
    else:
        out.append(("VQ kernel >= 10x the naive path", "not measured", "-"))
    train = [r for r in _ok(_rows(report, "train")) + _ok(_rows(report, "train-compiled"))
             if r["provider"] != "official-fp16" and r.get("speedup")]
    if train:
        best = max(train, key=lambda r: r["speedup"])
        both = [r for r in train if r["speedup"] >= 1.5 and (r.get("memory_ratio") or 9) <= 0.6]
        out.append(("training step >= 1.5x official images/s at <= 0.6x its peak memory",
                    "; ".join(f"{r['provider']}: {r['speedup']:.2f}x, memory {_fmt(r.get('memory_ratio'))}x" for r in train),
                    f"PASS ({both[0]['provider']})" if both else f"FAIL (best speed {best['provider']})"))
    else:
        out.append(("training step >= 1.5x official images/s at <= 0.6x its peak memory", "not measured", "-"))
    enc = [r for r in _ok(_rows(report, "adaptive-encode")) + _ok(_rows(report, "encode-compiled"))
           if r["provider"] != "official-b1-fp32" and r.get("speedup")]
    if enc:
        best = max(enc, key=lambda r: r["speedup"])
        out.append(("adaptive encode >= 20x the official evaluation procedure",
                    "; ".join(f"{r['provider']}: {r['speedup']:.1f}x" for r in enc), "PASS" if best["speedup"] >= 20 else "FAIL"))
    else:
        out.append(("adaptive encode >= 20x the official evaluation procedure", "not measured", "-"))
    return out


_TIMED_COLUMNS = (
    ("case", "case"), ("provider", "provider"), ("status", "status"), ("ms", "ms"), ("floor_ms", "floor ms"),
    ("tflops", "TFLOP/s"), ("frac_ceiling", "of ceiling"), ("gbs", "GB/s (min bytes)"), ("images_per_s", "images/s"),
    ("peak_mib", "peak MiB"), ("peak_abs_mib", "peak abs MiB"), ("mean_tokens", "mean tokens"), ("mean_l1", "mean L1"),
    ("speedup", "speed-up"), ("baseline", "vs"), ("memory_ratio", "memory vs ref"), ("first_call_s", "first call s"),
    ("auto_over_best", "auto / fastest"), ("note", "note"),
)


def _table(rows: list[dict], columns) -> list[str]:
    used = [(k, h) for k, h in columns if any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(h for _, h in used) + " |", "|" + "---|" * len(used)]
    for r in rows:
        cells = []
        for k, _ in used:
            v = r.get(k)
            if k == "frac_ceiling" and isinstance(v, float):
                cells.append(f"{100 * v:.1f}%")
            elif k in ("speedup", "memory_ratio") and isinstance(v, float):
                cells.append(f"{v:.2f}x")
            else:
                cells.append(_fmt(v).replace("|", "/"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(report: dict) -> str:
    baseline_speedups(report)
    meta = report["meta"]
    lines = [
        "# alit_fast GPU suite" + (" (SMOKE: tiny sizes, not performance figures)" if meta.get("smoke") else ""),
        "",
        f"- device: {meta.get('gpu', meta.get('device'))} (capability {meta.get('capability', '-')}, "
        f"{meta.get('sms', '-')} SMs); host CPU {meta.get('cpu', '-')}",
        f"- torch {meta.get('torch', '?')} (CUDA {meta.get('cuda', '-')}), triton {meta.get('triton', '?')}, "
        f"python {meta.get('python', '?')}, git {meta.get('git', '?')}",
        f"- started {meta.get('started')}, elapsed {meta.get('elapsed_s')} s, sizes '{meta.get('sizes')}'",
        "",
    ]
    ceil = report.get("ceilings", {})
    if ceil:
        lines.append("Ceilings measured here: " + ", ".join(
            f"{k.replace('_', ' ')} {_fmt(v)}" for k, v in ceil.items()) + ". Floors use them (nominal values where missing).")
        lines.append("")
    checks = [r for name in SECTIONS for r in _rows(report, name) if r.get("status") in ("pass", "fail")]
    if checks:
        lines += ["## Correctness", ""]
        lines += ["| case | check | result | errors | tolerance |", "|---|---|---|---|---|"]
        for r in checks:
            errs = ", ".join(f"{k} {_fmt(v)}" for k, v in (r.get("errors") or {}).items()
                             if not isinstance(v, list)).replace("|", "/")
            lines.append(f"| {r['case']} | {r['provider']} | {r['status'].upper()} | {errs} | {_fmt(r.get('tol'))} |")
        lines.append("")
    for name in [n for n in SECTIONS if n != "environment" and not n.startswith("check-")]:
        sec = report["sections"].get(name)
        if not sec:
            continue
        lines += [f"## {name}", ""]
        timed = [r for r in sec.get("rows", []) if r.get("status") not in ("pass", "fail")]
        if timed:
            lines += _table(timed, _TIMED_COLUMNS)
            lines.append("")
        if sec["status"] != "ok":
            lines += [f"section status: {sec['status']}", ""]
    errors = [(n, sec) for n, sec in report["sections"].items() if sec.get("status") not in ("ok", "running")]
    if errors:
        lines += ["## Sections that did not finish", ""]
        for n, sec in errors:
            last = (sec.get("error") or "").strip().splitlines()[-1:] or [""]
            lines.append(f"- {n}: {sec['status']} {last[0]}")
        lines.append("")
    lines += ["## Summary against the goals", "", "| goal | measured | verdict |", "|---|---|---|"]
    for goal, measured, verdict in goals(report):
        lines.append(f"| {goal} | {measured} | {verdict} |")
    failed = [r for r in checks if r["status"] != "pass"]
    lines += ["", f"Correctness: {len(checks) - len(failed)}/{len(checks)} checks pass"
              + (": FAILED " + "; ".join(f"{r['case']} {r['provider']}" for r in failed) if failed else ".")]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# floors: what the counted work allows on an H200, before any run
# ---------------------------------------------------------------------------------------------


def floors_markdown(ceilings: dict[str, float] | None = None) -> str:
    """FLOPs, minimum bytes and floor times of the full-size cases at the given ceilings."""
    import torch

    from benchmarks.cases import (
        Sizes, attention_bytes, attention_flops, attention_shapes, block_flops, mixed_lengths, rollout_flops,
        vq_bytes, vq_flops, vqgan_flops,
    )

    c = dict(NOMINAL, **(ceilings or {}))
    bf16, fp32, bw = c["bf16_tflops"] * 1e12, c["fp32_tflops"] * 1e12, c["copy_gbs"] * 1e9
    sizes = Sizes.gpu()
    cfg = sizes.model

    def us(x: float) -> str:
        return f"{x * 1e6:,.1f} us" if x < 1e-3 else f"{x * 1e3:,.2f} ms"

    lines = [
        f"Ceilings: bf16 tensor cores {c['bf16_tflops']:.0f} TFLOP/s, fp32 FMA {c['fp32_tflops']:.0f} TFLOP/s, "
        f"memory {c['copy_gbs'] / 1e3:.1f} TB/s. Floor = max(FLOPs / rate, bytes / bandwidth).",
        "",
        "| attention case | GFLOP | min MB | compute | memory | floor | bound |",
        "|---|---|---|---|---|---|---|",
    ]
    for shape in attention_shapes(sizes):
        if shape.dtype != torch.bfloat16:
            continue  # fp16 counts the same
        lengths = mixed_lengths(shape, sizes) if shape.mixed else None
        for backward in (False, True):
            f, b = attention_flops(shape, lengths, backward), attention_bytes(shape, lengths, backward)
            tc, tm = f / bf16, b / bw
            lines.append(f"| {shape.label.replace('-bf16', '')} {'fwd+bwd' if backward else 'fwd'} | {f / 1e9:.1f} | "
                         f"{b / 1e6:.0f} | {us(tc)} | {us(tm)} | {us(max(tc, tm))} | "
                         f"{'compute' if tc > tm else 'memory'} |")
    lines += ["", "| VQ case | path | GFLOP | min MB | floor | note |", "|---|---|---|---|---|---|"]
    for n, k, d, normalize in sizes.vq:
        f, b = vq_flops(n, k, d), vq_bytes(n, k, d)
        pad = max(16, 1 << (d - 1).bit_length())
        label = f"N{n} K{k} d{d}"
        lines.append(f"| {label} | kernel (exact fp32 dots on the FMA units) | {f / 1e9:.1f} | {b / 1e6:.1f} | "
                     f"{us(max(f * pad / d / fp32, b / bw))} | d padded to {pad} in the dot |")
        # the naive path: the [N, K] fp32 sum, product and difference written, then read by min
        mat = 4.0 * n * k
        nb = b + 3 * mat + 3 * mat  # written: sum, mm, difference; read: sum and mm by the sub, diff by min
        lines.append(f"| {label} | naive N x K (cuBLAS fp32 + 3 passes over {mat / 2**30:.2f} GiB) | {f / 1e9:.1f} | "
                     f"{nb / 1e6:,.0f} | {us(f / fp32 + nb / bw)} | mm and elementwise passes do not overlap |")
    B, L, W = sizes.block_batch, cfg.num_image_tokens + cfg.max_tokens, cfg.width
    roll = rollout_flops(cfg, sizes.rollout_batch)
    train_fwd = rollout_flops(cfg, sizes.train_batch, soft_code=True)
    vq_enc = vqgan_flops(cfg, sizes.train_batch)
    train = train_fwd + 2 * (train_fwd - vq_enc)  # backward ~2x the forward of everything but the frozen VQGAN
    dec1 = vqgan_flops(cfg, 1, "decoder")
    official = rollout_flops(cfg, 1, soft_code=True, official=True) + cfg.iterations * dec1
    ours = rollout_flops(cfg, sizes.encode_batch, soft_code=False) / sizes.encode_batch
    lines += [
        "",
        "| model case | TFLOP | floor | note |",
        "|---|---|---|---|",
        f"| one block B{B} L{L} W{W} fwd+bwd | {block_flops(B, L, W, True) / 1e12:.2f} | "
        f"{us(block_flops(B, L, W, True) / bf16)} | bf16 |",
        f"| rollout B{sizes.rollout_batch}, all {cfg.iterations} iterations decoded | {roll / 1e12:.1f} | {us(roll / bf16)} | "
        f"bf16; VQGAN encoder {vqgan_flops(cfg, sizes.rollout_batch) / 1e12:.1f} of it |",
        f"| training step B{sizes.train_batch} | ~{train / 1e12:.0f} | {us(train / bf16)} | "
        f"forward {train_fwd / 1e12:.1f} + backward ~2x (VQGAN frozen) |",
        f"| adaptive encode, per image, worst case (every iteration decoded) | {ours / 1e12:.2f} | {us(ours / bf16)} | "
        f"bf16, batch {sizes.encode_batch}, no pixel decode |",
        f"| official evaluation, per image | {official / 1e12:.2f} | {us(official / fp32)} | "
        f"fp32 batch 1: rollout + {cfg.iterations} VQGAN decodes ({dec1 / 1e9:.0f} GFLOP each; cuDNN may run "
        f"those convs in TF32) |",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------


HARD_LIMIT_EXIT = 3  # not 124: the device tool reads 124 as its own time-out


def _start_watchdog(suite: Suite, limit: float) -> None:
    """A section cannot be interrupted from inside (a compile, a hung kernel): past ``limit`` this
    thread saves the report and ends the process, so the files still say how far it got."""

    def watch():
        time.sleep(max(0.0, limit - suite.elapsed()))
        sec = suite.report["sections"].get(suite.section)
        if sec is not None and sec.get("status") == "running":
            sec["status"] = f"killed at the hard limit of {limit:.0f} s"
        for _ in range(3):  # the main thread may be changing the report under us
            try:
                suite.write()
                break
            except Exception:  # noqa: BLE001
                time.sleep(0.2)
        left = [n for n in suite.wanted if n not in suite.report["sections"]]
        print(f"\ngpu_suite: hard limit of {limit:.0f} s reached in section {suite.section!r}; not run: "
              f"{', '.join(left) or 'none'}; partial results in {suite.out}", flush=True)
        sys.stdout.flush()
        os._exit(HARD_LIMIT_EXIT)

    threading.Thread(target=watch, daemon=True, name="gpu_suite-watchdog").start()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import benchmarks  # noqa: F401 - the interpreter switch and the kernels package, before triton loads
    import torch

    if args.floors:
        print(floors_markdown())
        return 0
    if args.plan:
        from benchmarks import gpu_plan

        print(gpu_plan.plan_text(args.compile_seconds))
        return 0
    if not torch.cuda.is_available() and not args.smoke:
        print("gpu_suite: no CUDA device; run with --smoke for the CPU (interpreter) code-path check", file=sys.stderr)
        return 2
    suite = Suite(args)
    order = ORDER[args.part] + [n for n in ORDER[3 - args.part] if n not in ORDER[args.part]]
    suite.wanted = [n for n in order if n in args.sections]
    if not args.smoke:
        from benchmarks import gpu_plan

        suite.plan = gpu_plan.planned_seconds(suite.wanted, args.part)
    _start_watchdog(suite, args.hard_limit)
    if suite.device.type == "cpu":
        # two shared cores: OpenMP threads fighting other jobs cost more than they bring
        torch.set_num_threads(1)
    for name in suite.wanted:
        suite.run(name, RUNNERS[name])
    suite.write()
    print(f"[{suite.elapsed():6.1f}s] done; wrote {suite.out / 'results.json'} and {suite.out / 'results.md'}\n", flush=True)
    print((suite.out / "results.md").read_text(), flush=True)
    # the last line: what the budget left out (exit 0 all the same: a planned, clean stop)
    print(f"gpu_suite part {args.part}: skipped for the budget: {', '.join(suite.skipped)}" if suite.skipped
          else f"gpu_suite part {args.part}: every section ran", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
