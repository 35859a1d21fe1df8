"""The ahead-of-time GPU compile check (benchmarks/aot_check.py): the CI subset must pass on
sm_90 / sm_80 / sm_89, and the harness must see what it claims to see (every autotune candidate,
spills, shared-memory overflow, a missing tensor-core instruction), with and without
TRITON_INTERPRET=1. Needs no GPU, only the ptxas bundled with the triton wheel.
"""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from benchmarks import aot_check as aot

# the tests that compile; capture and the rule table need no ptxas
needs_ptxas = pytest.mark.skipif(
    aot.find_ptxas(80) is None or aot.find_ptxas(90) is None,
    reason="ptxas not found (triton/backends/nvidia/bin or TRITON_PTXAS_PATH): cannot compile for a GPU",
)


# --------------------------------------------------------------------------------------------
# toy kernels (module level: compile workers and jit_mode find them by module and name)
# --------------------------------------------------------------------------------------------

_TOY_CONFIGS = [
    triton.Config({"BLOCK": 64}, num_warps=1, num_stages=1),
    triton.Config({"BLOCK": 128}, num_warps=2, num_stages=2),
    triton.Config({"BLOCK": 256}, num_warps=4, num_stages=3),
]


@triton.jit
def _toy_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


_toy_autotuned = triton.autotune(configs=_TOY_CONFIGS, key=["n"])(_toy_copy)


def _drop_big(configs, named_args, **kwargs):
    return [c for c in configs if c.kwargs["BLOCK"] <= 128]


_toy_pruned = triton.autotune(configs=_TOY_CONFIGS, key=["n"], prune_configs_by={"early_config_prune": _drop_big})(
    _toy_copy
)


@triton.jit
def _toy_spill(x_ptr, y_ptr, BLOCK: tl.constexpr):
    # the whole row stays live across the reduction: BLOCK / 32 fp32 values per thread of one warp
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    total = tl.sum(x, axis=0)
    tl.store(y_ptr + offs, x * total)


@triton.jit
def _toy_matmul(a_ptr, b_ptr, c_ptr, K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rm = tl.arange(0, BLOCK_M)
    rn = tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rm[:, None] * K + (k0 + rk)[None, :])
        b = tl.load(b_ptr + (k0 + rk)[:, None] * BLOCK_N + rn[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rm[:, None] * BLOCK_N + rn[None, :], acc)


@triton.jit
def _toy_claims_tc(x_ptr, y_ptr, BLOCK: tl.constexpr, TENSOR_CORES: tl.constexpr):
    # says it is a tensor-core pass but has no tl.dot: the check must flag it
    offs = tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, tl.load(x_ptr + offs) * 2.0)


def _meta(n: int, dtype=torch.float32) -> torch.Tensor:
    return torch.empty(n, dtype=dtype, device="meta")


def _only(*calls):
    """A case_source for run_check: the given (label, call) pairs whatever the shapes."""
    return lambda shapes: list(calls)


# --------------------------------------------------------------------------------------------
# the check itself
# --------------------------------------------------------------------------------------------


@needs_ptxas
def test_ci_subset_passes_on_sm90_sm80_sm89(capsys):
    report = aot.run_check([90, 80, 89], aot.SUBSETS["ci"], workers=2)
    with capsys.disabled():
        print(f"\naot_check ci: {len(report.results)} compiles, {report.seconds['total']:.0f} s "
              f"({report.seconds['compile_cpu']:.0f} CPU s compiling)")
    kernels = {r.launch.kernel for r in report.results}
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        assert name in kernels, f"{name} was never launched by the attention launchers"
    assert any(k.startswith("_vq") for k in kernels), "no VQ kernel was launched"
    assert report.ok, "aot_check failed:\n" + "\n".join(report.failures) + "\n\n" + aot.format_table(report.results)


def test_ci_shapes_reach_every_launch_of_the_full_shapes():
    # capture only (no compile): the few shapes of the ci / configs subsets must make the launchers
    # make every distinct launch (kernel, autotune candidate, dtype, constexprs, specialization)
    # that the full ALIT shape sweep makes. One target: the choices depend on shapes the same way
    # on each
    target = aot.TARGETS[90]
    keys, facets = {}, {}
    for subset in ("ci", "full"):
        launches, errors, _ = aot.capture(target, aot.SUBSETS[subset])
        assert not errors, errors[:5]
        uniques = aot.deduplicate(launches, target)
        keys[subset] = {u.launch.key() for u in uniques}
        facets[subset] = set().union(*(aot.facets(u) for u in uniques))
    missing = facets["full"] - facets["ci"]
    assert not missing, f"{target.name}: the ci shapes miss {sorted(map(str, missing))[:20]}"
    missing = keys["full"] - keys["ci"]
    assert not missing, f"{target.name}: the ci shapes miss {len(missing)} launches, e.g. {sorted(missing)[:2]}"


# --------------------------------------------------------------------------------------------
# the harness
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("record_pruned", [False, True])
def test_capture_records_every_autotune_candidate(record_pruned):
    x, y = _meta(1000), _meta(1000)
    with aot.intercept_launches(aot.TARGETS[80], record_pruned=record_pruned) as rec:
        _toy_autotuned[lambda meta: (triton.cdiv(1000, meta["BLOCK"]),)](x, y, 1000)
        _toy_pruned[lambda meta: (triton.cdiv(1000, meta["BLOCK"]),)](x, y, 1000)
    got = [(l.constexprs["BLOCK"], l.num_warps, l.num_stages, l.grid, l.autotune["kept"]) for l in rec.launches]
    kept = [
        (64, 1, 1, (16, 1, 1), True), (128, 2, 2, (8, 1, 1), True), (256, 4, 3, (4, 1, 1), True),
        (64, 1, 1, (16, 1, 1), True), (128, 2, 2, (8, 1, 1), True),
    ]
    # the candidate the autotuner's pruning drops is counted, and recorded only when asked for
    assert got == kept + ([(256, 4, 3, (4, 1, 1), False)] if record_pruned else [])
    assert rec.pruned == (0 if record_pruned else 1)
    # specialized as the JIT would: 16-byte aligned pointers and n (1000 = 16 * 62.5: not divisible)
    first = rec.launches[0]
    assert first.signature == {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
    assert {k for k, v in first.attrs.items() if v} == {(0,), (1,)}
    assert [l.autotune["index"] for l in rec.launches] == [0, 1, 2, 0, 1] + ([2] if record_pruned else [])


def test_capture_mimics_the_jit_specialization():
    with aot.intercept_launches(aot.TARGETS[90]) as rec:
        _toy_copy[(1,)](_meta(64)[1:], _meta(64), 1024, BLOCK=64)  # misaligned view, n % 16 == 0
        _toy_copy[(1,)](_meta(64), _meta(64), 1, BLOCK=64)  # n == 1 becomes a constexpr
    a, b = rec.launches
    assert {k for k, v in a.attrs.items() if v} == {(1,), (2,)}
    assert b.signature["n"] == "constexpr" and b.constexprs["n"] == 1
    assert b.declared == ("BLOCK",)


def test_capture_pretends_to_be_the_target_and_restores_the_modules():
    from alit_fast.kernels import _utils, attention

    saved = (_utils.gpu_capability, attention.gpu_capability, attention.is_interpreting,
             torch.cuda.get_device_capability)
    interpreting = _utils.is_interpreting()
    with aot.intercept_launches(aot.TARGETS[89]):
        assert attention.gpu_capability(torch.device("meta")) == (8, 9)
        assert _utils.gpu_capability(torch.device("meta")) == (8, 9)
        assert attention.is_interpreting() is False and _utils.is_interpreting() is False
        assert torch.cuda.get_device_capability() == (8, 9)
    assert (_utils.gpu_capability, attention.gpu_capability, attention.is_interpreting,
            torch.cuda.get_device_capability) == saved
    assert _utils.is_interpreting() == interpreting


@needs_ptxas
def test_spills_are_reported():
    def call():
        _toy_spill[(1,)](_meta(8192), _meta(8192), BLOCK=8192, num_warps=1)

    report = aot.run_check([80], aot.SUBSETS["ci"], workers=1, case_source=_only(("spill", call)))
    (r,) = report.results
    assert r.stats["spill_stores"] > 0, r.stats
    assert any("spills" in f for f in r.failures) and not report.ok


@needs_ptxas
def test_shared_memory_overflow_is_reported():
    # 4 buffered 64 x 128 + 128 x 64 fp16 tiles: 128 KB, over sm_89's 99 KB per block
    def call():
        a, b, c = _meta(64 * 1024, torch.float16), _meta(1024 * 64, torch.float16), _meta(64 * 64)
        _toy_matmul[(1,)](a, b, c, 1024, BLOCK_M=64, BLOCK_N=64, BLOCK_K=128, num_warps=4, num_stages=5)

    report = aot.run_check([89], aot.SUBSETS["ci"], workers=1, case_source=_only(("smem", call)))
    (r,) = report.results
    assert r.stats["shared"] > aot.TARGETS[89].smem_per_block
    assert any("shared memory" in f for f in r.failures), r.failures
    assert r.stats["mma"] > 0 and r.stats["ldmatrix"] > 0  # and tensor cores are seen when used


@needs_ptxas
def test_missing_tensor_cores_are_reported():
    def call():
        _toy_claims_tc[(1,)](_meta(128), _meta(128), BLOCK=128, TENSOR_CORES=True)

    report = aot.run_check([90], aot.SUBSETS["ci"], workers=1, case_source=_only(("tc", call)))
    (r,) = report.results
    assert r.tc_required and any("tensor-core" in f for f in r.failures), r.failures


def test_tensor_core_rule_table():
    att, vq = aot.KERNEL_PACKAGE + ".attention", aot.KERNEL_PACKAGE + ".vq"
    sig16, sig32 = {"Q": "*fp16"}, {"Q": "*fp32"}
    for name in ("_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel"):
        assert aot.tensor_cores_required(att, name, {"DOT_PREC": "ieee"}, sig16)[0]  # ignored on 16-bit
        assert aot.tensor_cores_required(att, name, {"DOT_PREC": "tf32"}, sig32)[0]
        assert not aot.tensor_cores_required(att, name, {"DOT_PREC": "ieee"}, sig32)[0]  # exempt
    assert not aot.tensor_cores_required(att, "_bwd_delta_kernel", {}, sig16)[0]
    assert aot.tensor_cores_required(vq, "_vq_tc_kernel", {"OP_KIND": 0}, {"z": "*fp32"})[0]
    assert not aot.tensor_cores_required(vq, "_vq_prep_codes_kernel", {}, {"z": "*fp32"})[0]
    assert aot.tensor_cores_required(vq, "_vq_anything", {"TENSOR_CORES": True}, {"z": "*fp32"})[0]


def test_occupancy_and_ptxas_log_parsing():
    # 255 registers: 8192 per warp, two warps per sub-partition, so two 4-warp CTAs per SM
    assert aot.ctas_per_sm(aot.TARGETS[80], 255, 4, 0) == (2, "regs")
    assert aot.ctas_per_sm(aot.TARGETS[90], 32, 4, 0) == (16, "threads")
    assert aot.ctas_per_sm(aot.TARGETS[89], 64, 4, 60 * 1024) == (1, "smem")
    assert aot.ctas_per_sm(aot.TARGETS[89], 64, 4, 100 * 1024)[0] == 0
    log = """ptxas info    : Compiling entry function 'k' for 'sm_80'
ptxas info    : Function properties for k
    16 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size"""
    assert aot.parse_ptxas_log(log) == {"regs": 255, "stack": 16, "spill_stores": 12, "spill_loads": 8}
    assert aot.parse_ptxas_log("nothing") is None


@needs_ptxas
def test_command_line_compiles_and_reports(capsys):
    # in this process the kernels are InterpretedFunctions (the test suite runs under
    # TRITON_INTERPRET=1) or JITFunctions: both compile (jit_mode); the CI subset test covers the
    # spawned workers, which always import in JIT mode
    rc = aot.main(["--targets", "80", "--subset", "ci", "--only", "^_bwd_delta_kernel$", "--workers", "1"])
    out = capsys.readouterr().out
    assert rc == 0, out[-3000:]
    assert "_bwd_delta_kernel" in out and "OK:" in out


# --------------------------------------------------------------------------------------------
# the GPU launch path: no host sync, no host-to-device copy (issue 13, point 4)
# --------------------------------------------------------------------------------------------


class _HostToDevice(TorchDispatchMode):
    """Ops that take a host tensor and give a device one (the meta device stands in for a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        ins = {t.device.type for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        outs = {t.device.type for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)}
        if "cpu" in ins and outs - {"cpu"}:
            self.copies.append(str(func))
        return out


class _NewDeviceTensors(TorchFunctionMode):
    """torch.tensor(data, device=...) copies host data to the device without a visible aten op."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (torch.tensor, torch.as_tensor) and torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.calls.append(func.__name__)
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch", [90, 89])
def test_gpu_launch_path_makes_no_host_sync_and_no_host_to_device_copy(arch):
    # the launchers as they run on a GPU (autotuned, codebook split or not), at ALIT's shapes on
    # meta tensors: a value read would fail on meta, and is counted besides; so is any op that
    # moves host data to the device. A CUDA graph of a rollout can then hold every launch
    from alit_fast.kernels import attention as attn
    from alit_fast.kernels import vq
    from alit_fast.testing import count_syncs

    B, L, H, D = 32, 289, 12, 64
    h2d, new = _HostToDevice(), _NewDeviceTensors()
    with aot.intercept_launches(aot.TARGETS[arch]) as rec, count_syncs() as syncs, h2d, new:
        for dtype, prec in ((torch.bfloat16, "highest"), (torch.float32, "high"), (torch.float32, "highest")):
            with aot._matmul_precision(prec):
                q, k, v = aot._qkv(B, L, H, D, dtype)
                lengths = torch.empty(B, dtype=torch.int32, device="meta")
                out, lse = attn.flash_attn_fwd(q, k, v, lengths)
                for mode in attn.DQ_MODES:
                    attn.flash_attn_bwd(torch.empty_like(out), q, k, v, out, lse, lengths, dq_mode=mode)
        for n, d, K, normalize in ((B * 32, 12, 4096, True), (B * 256 * 8, 12, 4096, True), (B * 256, 256, 1024, False)):
            for dtype in (torch.float32, torch.float16):
                z = torch.empty(n, d, dtype=dtype, device="meta")
                vq.vq_nearest_triton(z, torch.empty(K, d, device="meta"), normalize, return_zq=True)
    assert syncs.total == 0, dict(syncs)
    assert not h2d.copies and not new.calls, (h2d.copies, new.calls)
    kernels = {l.kernel for l in rec.launches}
    assert {"_fwd_kernel", "_bwd_dkdv_kernel", "_bwd_dq_kernel", "_vq_tc_kernel", "_vq_finalize_kernel"} <= kernels
    assert any(l.autotune for l in rec.launches)  # the autotuned path, not the interpreter's config
