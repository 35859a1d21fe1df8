"""Tests of the triton attention backend: compiled kernels on a GPU, the Triton interpreter on a CPU
(tests/conftest.py sets TRITON_INTERPRET=1 only where no GPU is present; this module never sets it).

Case selection: the full grid L x D x H x B x lengths x dtype is 5*3*2*2*2*2 = 240 cases, too slow
for the interpreter. ``CASES`` is a pairwise covering array instead: for any two parameters, every
combination of their values occurs in at least one case (checked by ``test_cases_cover_all_pairs``),
which catches any bug that depends on at most two parameters at once, in 15 cases.

fp32 runs under torch.get_float32_matmul_precision() "highest" (exact fp32 products) unless a test
says otherwise; the tf32 tests set "high" / "medium". The interpreter multiplies in fp32 whatever
the precision, so the kernels emulate the tf32 operand rounding there (see kernels/attention.py):
the tf32 bound below is checked against real tf32 rounding, not an fp32 upper bound.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from alit_fast.kernels import attention as kern
from alit_fast.kernels._utils import is_interpreting, single_threaded_interpreter
from alit_fast.ops.attention import attention, attention_naive, flash_attention_op

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() or is_interpreting()),
    reason="triton attention needs a GPU or TRITON_INTERPRET=1",
)

# the machine decides: compiled kernels on a GPU, the interpreter (CPU tensors) otherwise
DEVICE = "cuda" if torch.cuda.is_available() and not is_interpreting() else "cpu"
TOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}
# tf32 keeps fp16's 10-bit mantissa, so fp16's bound; measured (interpreter, truncating tf32
# emulation, L = 130..289, D = 64..128): 1.6e-3..3.1e-3 for out, dq, dk and dv
TF32_TOL = 1e-2

PARAMS = {
    "L": (1, 17, 257, 289, 320),
    "D": (64, 96, 128),
    "H": (1, 2),
    "B": (1, 3),
    "mixed": (False, True),
    "dtype": (torch.float32, torch.float16),
}
f32, f16 = torch.float32, torch.float16
# (L, D, H, B, mixed lengths, dtype): a pairwise covering array of PARAMS
CASES = [
    (1, 64, 1, 3, False, f32),
    (1, 96, 2, 1, True, f16),
    (1, 128, 1, 3, False, f16),
    (17, 64, 1, 3, True, f32),
    (17, 96, 2, 1, False, f16),
    (17, 128, 1, 1, True, f32),
    (257, 64, 2, 3, True, f32),
    (257, 96, 2, 3, True, f32),
    (257, 128, 1, 1, False, f16),
    (289, 64, 2, 1, False, f16),
    (289, 96, 1, 3, False, f32),
    (289, 128, 2, 3, True, f16),
    (320, 64, 2, 3, False, f16),
    (320, 96, 1, 3, True, f16),
    (320, 128, 1, 1, True, f32),
]


def _mixed_lengths(B: int, L: int) -> torch.Tensor:
    # B=3 gives a full, a single-token and a half sample (and a 0-length one when L == 1)
    lens = [L, 1, L // 2] if B == 3 else [L // 2 + 1]
    return torch.tensor(lens, dtype=torch.int32, device=DEVICE)


def _packed_qkv(B, L, H, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, L, 3 * H * D, generator=g).to(dtype).to(DEVICE)
    return qkv


def _views(qkv, H, D):
    B, L, _ = qkv.shape
    return qkv.view(B, L, 3, H, D).unbind(2)


def _rel_err(a: torch.Tensor, ref: torch.Tensor, floor: float = 1e-30) -> float:
    """max abs error / max abs reference, the denominator floored at ``floor``."""
    scale = ref.abs().max().item() if ref.numel() else 0.0
    return (a.double() - ref).abs().max().item() / max(scale, floor)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # BLAS thread pools oversubscribe the few shared cores the interpreter runs on (~10x slower)
    with single_threaded_interpreter():
        yield


@pytest.fixture(autouse=True)
def _exact_fp32():
    """fp32 tests run with exact products unless they set a precision themselves; restored after."""
    saved = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    yield
    torch.set_float32_matmul_precision(saved)


@pytest.fixture
def poison(monkeypatch):
    """Every kernel output buffer starts as NaN, so an element no kernel writes shows up as NaN."""
    monkeypatch.setattr(kern, "POISON_OUTPUTS", True)


def test_cases_cover_all_pairs():
    names = list(PARAMS)
    for (i, a), (j, b) in itertools.combinations(enumerate(names), 2):
        seen = {(c[i], c[j]) for c in CASES}
        for pair in itertools.product(PARAMS[a], PARAMS[b]):
            assert pair in seen, f"no case has {a}={pair[0]}, {b}={pair[1]}"


def _check_forward_backward(L, D, H, B, mixed, dtype, tol, min_err=0.0):
    """Forward and dq/dk/dv of strided packed views against float64; returns the errors."""
    qkv = _packed_qkv(B, L, H, D, dtype, seed=L * 1000 + D * 10 + H + B)
    lengths = _mixed_lengths(B, L) if mixed else None
    qkv.requires_grad_(True)
    # strided views straight out of the packed projection, as the model passes them
    q, k, v = _views(qkv, H, D)
    out = attention(q, k, v, lengths, backend="triton")
    assert out.shape == (B, L, H, D) and out.dtype == dtype and out.is_contiguous()
    g = torch.randn(B, L, H, D, generator=torch.Generator().manual_seed(7)).to(dtype).to(DEVICE)
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    dq, dk, dv = _views(dqkv, H, D)

    ref_in = [t.detach().double().requires_grad_(True) for t in (q, k, v)]
    ref = attention_naive(*ref_in, lengths)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())

    assert torch.isfinite(out).all(), "unwritten (NaN-poisoned) output elements"
    assert torch.isfinite(dqkv).all(), "unwritten (NaN-poisoned) gradient elements"
    errs = {"out": _rel_err(out, ref)}
    # with L == 1 dq and dk are exactly 0 (softmax over one key is constant) and have no scale of
    # their own, so each gradient's denominator is floored at 1% of the largest gradient
    floor = 1e-2 * max(t.abs().max().item() for t in ref_grads)
    for name, got, want in zip("qkv", (dq, dk, dv), ref_grads):
        errs["d" + name] = _rel_err(got, want, floor)
    for name, err in errs.items():
        assert err <= tol, f"{name}: {err:.3g} > {tol}"
    assert errs["out"] >= min_err, f"out error {errs['out']:.3g} < {min_err}: the requested precision was not used"

    if lengths is not None:
        for b, n in enumerate(lengths.tolist()):
            for t in (out, dq, dk, dv):
                assert torch.equal(t[b, n:], torch.zeros_like(t[b, n:]))
    return errs


@pytest.mark.parametrize("L,D,H,B,mixed,dtype", CASES, ids=lambda x: str(x).replace("torch.", ""))
def test_forward_backward_vs_float64(poison, L, D, H, B, mixed, dtype):
    _check_forward_backward(L, D, H, B, mixed, dtype, TOL[dtype])


# tf32 over several tiles, both head-dim tiles, 16-wide tails and a 16-row tail block (L = 200 =
# 3 * 64 + 8), mixed lengths; "high" and "medium" are the same mode
@pytest.mark.parametrize("L,D,H,B,mixed,precision", [(200, 64, 1, 3, True, "high"), (289, 128, 1, 1, False, "medium")])
def test_tf32_forward_backward_vs_float64(poison, L, D, H, B, mixed, precision):
    torch.set_float32_matmul_precision(precision)
    # an error above 1e-5 (fp32 products give ~1e-6) shows the tf32 products were used
    _check_forward_backward(L, D, H, B, mixed, f32, TF32_TOL, min_err=1e-5)


def test_precision_switch():
    """fp32 follows torch.get_float32_matmul_precision(), read by the launcher at each call."""
    B, L, H, D = 2, 40, 1, 64
    q, k, v = _views(_packed_qkv(B, L, H, D, f32, seed=11), H, D)
    lengths = torch.tensor([L, 23], dtype=torch.int32, device=DEVICE)
    ref = attention_naive(q, k, v, lengths)
    outs = {}
    for precision, want in (("highest", "ieee"), ("high", "tf32"), ("medium", "tf32")):
        torch.set_float32_matmul_precision(precision)
        assert kern.dot_precision(f32) == want
        for dt in (f16, torch.bfloat16):  # 16-bit operands are always tensor-core products
            assert kern.dot_precision(dt) == "ieee"
        outs[precision] = attention(q, k, v, lengths, backend="triton")
    assert _rel_err(outs["highest"], ref) <= 1e-5
    assert torch.equal(outs["high"], outs["medium"])
    assert 1e-5 < _rel_err(outs["high"], ref) <= TF32_TOL


# the atomic dq path: past one tile with every tail, the 16-row tail block, a length-1 sample
@pytest.mark.parametrize("L,D,H,B,mixed,dtype", [(257, 64, 1, 3, True, f32), (289, 128, 1, 1, False, f16),
                                                 (17, 96, 2, 3, True, f16)],
                         ids=lambda x: str(x).replace("torch.", ""))
def test_atomic_dq_vs_float64(poison, monkeypatch, L, D, H, B, mixed, dtype):
    monkeypatch.setattr(kern, "DQ_MODE", "atomic")
    _check_forward_backward(L, D, H, B, mixed, dtype, TOL[dtype])


def test_dq_mode_is_checked():
    q, k, v = _views(_packed_qkv(1, 8, 1, 32, f32, seed=12), 1, 32)
    out, lse = kern.flash_attn_fwd(q, k, v)
    with pytest.raises(ValueError):
        kern.flash_attn_bwd(out, q, k, v, out, lse, dq_mode="fast")


# tile shapes other than the interpreter's one config: 128-row blocks with a 16-row tail block
# (L = 140: 12 rows past 128), blocks no larger than the tail tile (no tail dispatch), 16- and
# 128-wide streamed tiles (the atomic mode runs no dq kernel)
@pytest.mark.parametrize("configs,dq_mode", [
    ({"fwd": (128, 32, 4, 1), "dkdv": (16, 128, 4, 1)}, "atomic"),
    ({"fwd": (16, 16, 4, 1), "dkdv": (32, 64, 4, 1), "dq": (128, 16, 4, 1)}, "separate"),
])
def test_other_tile_configs(poison, monkeypatch, configs, dq_mode):
    monkeypatch.setattr(kern, "CONFIG_OVERRIDE", configs)
    monkeypatch.setattr(kern, "DQ_MODE", dq_mode)
    _check_forward_backward(140, 64, 1, 3, True, f32, TOL[f32])


def test_candidate_configs_per_arch(monkeypatch):
    """Every (arch, operands, head dim) has candidates and the autotuner's pruning hook offers
    exactly the list of the device's architecture (sm_89 never sees the larger sm_80 tiles)."""
    for kernel, table in kern.CANDIDATES.items():
        for arch in ("sm90", "sm80", "sm89"):
            for ocls in ("16bit", "tf32", "ieee"):
                for dtile in (64, 128):
                    cands = table[(arch, ocls, dtile)]
                    assert cands and len(set(cands)) == len(cands), (kernel, arch, ocls, dtile)
                    for bm, bn, warps, stages in cands:
                        assert bm in (16, 32, 64, 128) and bn in (16, 32, 64, 128)
                        assert warps in (4, 8) and 1 <= stages <= 4
    assert kern.arch_class((9, 0)) == "sm90" and kern.arch_class((8, 0)) == "sm80"
    assert kern.arch_class((8, 9)) == kern.arch_class((8, 6)) == "sm89" and kern.arch_class((7, 5)) == "old"
    q = torch.empty(1, 1, 1, 64)
    for kernel, kwargs in (("fwd", {}), ("dq", {}), ("dkdv", {"ATOMIC_DQ": False}), ("dkdv_atomic", {"ATOMIC_DQ": True})):
        name = "dkdv" if kernel.startswith("dkdv") else kernel
        configs = kern._all_configs(name)
        for cap, arch in (((9, 0), "sm90"), ((8, 0), "sm80"), ((8, 9), "sm89")):
            monkeypatch.setattr(kern, "_device_capability", lambda device, cap=cap: cap)
            for dtype, prec, ocls in ((f16, "ieee", "16bit"), (f32, "tf32", "tf32"), (f32, "ieee", "ieee")):
                for block_d in (32, 64, 128):
                    kept = kern._prune(name)(configs, {"Q": q.to(dtype)}, BLOCK_D=block_d, DOT_PREC=prec, **kwargs)
                    want = kern.CANDIDATES[kernel][(arch, ocls, 64 if block_d <= 64 else 128)]
                    assert sorted(kern._cfg_tuple(c) for c in kept) == sorted(want)


def test_launch_path_reads_no_device_values(monkeypatch):
    """No .item() / .tolist() / bool() of a tensor in the launchers (each a host sync on a GPU)."""
    B, L, H, D = 2, 20, 1, 32
    q, k, v = (t.detach().requires_grad_(True) for t in _views(_packed_qkv(B, L, H, D, f32, seed=13), H, D))
    lengths = torch.tensor([L, 9], dtype=torch.int32, device=DEVICE)

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value in the launch path")

    for mode in ("separate", "atomic"):
        monkeypatch.setattr(kern, "DQ_MODE", mode)
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__"):
                m.setattr(torch.Tensor, name, forbidden)
            out = attention(q, k, v, lengths, backend="triton", validate=False)
            out.backward(torch.ones_like(out))
        assert torch.isfinite(q.grad).all()
        q.grad = k.grad = v.grad = None


def test_launchers_write_every_element_of_given_buffers():
    B, L, H, D = 3, 70, 2, 96
    q, k, v = _views(_packed_qkv(B, L, H, D, f32, seed=1), H, D)
    lengths = torch.tensor([0, L, 33], dtype=torch.int32, device=DEVICE)
    nan = lambda *s: torch.full(s, float("nan"), device=DEVICE)  # noqa: E731
    out, lse = kern.flash_attn_fwd(q, k, v, lengths, out=nan(B, L, H, D), lse=nan(B, H, L))
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref = attention_naive(q, k, v, lengths)
    assert _rel_err(out, ref) <= 1e-3
    # lse of valid rows is the log-sum-exp of the scaled scores
    s = torch.einsum("bqhd,bkhd->bhqk", q.double(), k.double()) / D**0.5
    want = torch.logsumexp(s[2, :, :33, :33], dim=-1)
    assert torch.allclose(lse[2, :, :33].double(), want, atol=1e-4)
    g = torch.randn(B, L, H, D, device=DEVICE)
    dq, dk, dv = kern.flash_attn_bwd(g, q, k, v, out, lse, lengths,
                                     dq=nan(B, L, H, D), dk=nan(B, L, H, D), dv=nan(B, L, H, D))
    for t in (dq, dk, dv):
        assert torch.isfinite(t).all()
        assert torch.equal(t[0], torch.zeros_like(t[0])) and torch.equal(t[2, 33:], torch.zeros_like(t[2, 33:]))


def test_zero_length_and_garbage_in_padding(poison):
    """A length-0 sample gives zeros; NaN in padded tokens or in their grad_out cannot leak."""
    B, L, H, D = 3, 40, 2, 64
    qkv = _packed_qkv(B, L, H, D, f32, seed=2)
    lengths = torch.tensor([0, 25, L], dtype=torch.int32, device=DEVICE)
    clean = qkv.clone()
    qkv = qkv.clone()
    qkv[0] = float("nan")
    qkv[1, 25:] = float("nan")
    q, k, v = (t.detach().requires_grad_(True) for t in _views(qkv, H, D))
    out = attention(q, k, v, lengths, backend="triton")
    g = torch.randn(B, L, H, D, device=DEVICE)
    g[1, 25:] = float("nan")
    out.backward(g)
    ref = attention_naive(*_views(clean, H, D), lengths)
    assert torch.isfinite(out).all() and _rel_err(out, ref) <= 1e-3
    for t in (out, q.grad, k.grad, v.grad):
        assert torch.isfinite(t).all()
        assert torch.equal(t[0], torch.zeros_like(t[0]))
        assert torch.equal(t[1, 25:], torch.zeros_like(t[1, 25:]))


def test_strided_views_match_contiguous(monkeypatch):
    monkeypatch.setattr(kern, "DQ_MODE", "separate")  # the deterministic dq: bitwise comparisons below
    B, L, H, D = 2, 45, 2, 96
    qkv = _packed_qkv(B, L, H, D, f16, seed=3).requires_grad_(True)
    lengths = torch.tensor([L, 20], dtype=torch.int32, device=DEVICE)
    views = _views(qkv, H, D)
    assert not views[0].is_contiguous()
    conts = [t.detach().clone().contiguous().requires_grad_(True) for t in views]
    g = torch.randn(B, L, H, D, device=DEVICE).to(f16)
    out_v = attention(*views, lengths, backend="triton")
    out_c = attention(*conts, lengths, backend="triton")
    assert torch.equal(out_v, out_c)
    grads_v = _views(torch.autograd.grad(out_v, qkv, g)[0], H, D)
    grads_c = torch.autograd.grad(out_c, conts, g)
    for a, b in zip(grads_v, grads_c):
        assert torch.equal(a, b)
    # a strided, non-contiguous grad_out (e.g. from a transposed consumer) works too
    g_t = g.transpose(1, 2).contiguous().transpose(1, 2)
    (dq_t,) = torch.autograd.grad(attention(*conts, lengths, backend="triton"), conts[0], g_t)
    assert torch.equal(dq_t, grads_c[0])


# bf16 forward and backward: on a GPU the kernels round P and dS to bf16 before their products
@pytest.mark.parametrize("L,D,H,B,mixed", [(289, 128, 1, 3, True), (257, 64, 2, 1, False)])
def test_bf16_forward_backward_vs_float64(poison, L, D, H, B, mixed):
    _check_forward_backward(L, D, H, B, mixed, torch.bfloat16, TOL[torch.bfloat16])


def _rounded_kernel_model(q, k, v, g, lengths, dtype):
    """float64 model of what the compiled 16-bit kernels round (the interpreter skips these casts):
    the unnormalized P before P @ V and P^T @ dO, dS before dS @ K and dS^T @ Q, and every output.
    Accumulations stay exact: fp32 accumulation errs far below one 16-bit rounding."""
    r = lambda t: t.to(dtype).double()  # noqa: E731
    q, k, v, g = (t.double() for t in (q, k, v, g))
    B, L, H, D = q.shape
    s = torch.einsum("bqhd,bkhd->bhqk", q, k) / D**0.5
    valid = torch.ones(B, L, dtype=torch.bool) if lengths is None else torch.arange(L)[None] < lengths.cpu()[:, None]
    s = s.masked_fill(~valid[:, None, None, :], float("-inf"))
    m = s.amax(-1, keepdim=True).clamp_min(-1e300)
    p = torch.exp(s - m).masked_fill(~valid[:, None, :, None], 0.0)  # padded queries attend to nothing
    l_sum = p.sum(-1, keepdim=True).clamp_min(1e-300)
    out = r(torch.einsum("bhqk,bkhd->bqhd", r(p), v) / l_sum.permute(0, 2, 1, 3))
    p_norm = p / l_sum  # the backward recomputes P from the saved log-sum-exp: normalized
    delta = (g * out).sum(-1).permute(0, 2, 1)[..., None]  # [B, H, L, 1]
    dv = torch.einsum("bhqk,bqhd->bkhd", r(p_norm), g)
    ds = r(p_norm * (torch.einsum("bqhd,bkhd->bhqk", g, v) - delta))
    dq = torch.einsum("bhqk,bkhd->bqhd", ds, k) / D**0.5
    dk = torch.einsum("bhqk,bqhd->bkhd", ds, q) / D**0.5
    pad = (~valid)[:, :, None, None]
    return [r(t).masked_fill(pad, 0.0) for t in (out, dq, dk, dv)]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_tolerances_hold_with_p_and_ds_rounded(dtype):
    """TOL was measured under the interpreter, which keeps P and dS in fp32; the compiled kernels
    round both to the input dtype. A float64 model of those roundings must stay within half of
    TOL, so the bound holds on a GPU with room for its fp32 accumulation order."""
    worst = 0.0
    for L, D, H, B, mixed in [(320, 128, 2, 3, True), (289, 64, 2, 1, False), (257, 96, 1, 3, True)]:
        qkv = _packed_qkv(B, L, H, D, dtype, seed=L + D).cpu()
        q, k, v = _views(qkv, H, D)
        g = torch.randn(B, L, H, D, generator=torch.Generator().manual_seed(7)).to(dtype)
        lengths = _mixed_lengths(B, L).cpu() if mixed else None
        ref_in = [t.double().requires_grad_(True) for t in (q, k, v)]
        ref = attention_naive(*ref_in, lengths)
        ref_grads = torch.autograd.grad(ref, ref_in, g.double())
        got = _rounded_kernel_model(q, k, v, g, lengths, dtype)
        floor = 1e-2 * max(t.abs().max().item() for t in ref_grads)
        errs = [_rel_err(got[0], ref)] + [_rel_err(a, b, floor) for a, b in zip(got[1:], ref_grads)]
        worst = max(worst, *errs)
    print(f"{dtype}: worst modelled error {worst:.3g}")
    assert worst <= TOL[dtype] / 2, f"{worst:.3g} > TOL/2 = {TOL[dtype] / 2}"
    assert worst > TOL[dtype] / 200, "the model rounds nothing: 16-bit rounding must show"


def test_bf16_small():
    B, L, H, D = 2, 33, 1, 32
    q, k, v = _views(_packed_qkv(B, L, H, D, torch.bfloat16, seed=4), H, D)
    lengths = torch.tensor([33, 9], dtype=torch.int32, device=DEVICE)
    out = attention(q, k, v, lengths, backend="triton")
    assert _rel_err(out, attention_naive(q, k, v, lengths)) <= TOL[torch.bfloat16]


def test_torch_backend_matches_naive():
    B, L, H, D = 3, 21, 2, 32
    q, k, v = _views(_packed_qkv(B, L, H, D, f32, seed=5), H, D)
    lengths = torch.tensor([0, 21, 5], dtype=torch.int32, device=DEVICE)
    for lens in (None, lengths):
        ref = attention_naive(q, k, v, lens)
        assert _rel_err(attention(q, k, v, lens, backend="torch"), ref) <= 1e-5


@pytest.mark.parametrize("with_lengths", [False, True])
def test_opcheck(with_lengths):
    B, L, H, D = 2, 17, 2, 32
    q, k, v = (t.detach().requires_grad_(True) for t in _views(_packed_qkv(B, L, H, D, f32, seed=6), H, D))
    lengths = torch.tensor([17, 5], dtype=torch.int32, device=DEVICE) if with_lengths else None
    torch.library.opcheck(flash_attention_op, (q, k, v, lengths))


def _compiled_fn(qkv, lengths, H, D):
    q, k, v = _views(qkv, H, D)
    out = attention(q, k, v, lengths, backend="triton")
    return (out.view(out.shape[0], out.shape[1], H * D) * 2.0).sum(-1)


@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    B, L, H, D = 2, 19, 2, 32
    qkv = _packed_qkv(B, L, H, D, f32, seed=8)
    lengths = torch.tensor([19, 7], dtype=torch.int32, device=DEVICE)
    torch._dynamo.reset()
    fn = torch.compile(_compiled_fn, backend=compile_backend, fullgraph=True)
    x_c = qkv.clone().requires_grad_(True)
    x_e = qkv.clone().requires_grad_(True)
    y_c = fn(x_c, lengths, H, D)
    y_e = _compiled_fn(x_e, lengths, H, D)
    torch.testing.assert_close(y_c, y_e, rtol=1e-5, atol=1e-5)
    y_c.sum().backward()
    y_e.sum().backward()
    torch.testing.assert_close(x_c.grad, x_e.grad, rtol=1e-5, atol=1e-5)


def _bad_inputs():
    B, L, H, D = 2, 8, 2, 32
    r = lambda *s, dt=f32: torch.randn(*s, device=DEVICE).to(dt)  # noqa: E731
    q = r(B, L, H, D)
    ok_len = torch.tensor([8, 3], dtype=torch.int32, device=DEVICE)
    return {
        "3d": ((r(B, L, H * D),) * 3, None),
        "shape_mismatch": ((q, r(B, L + 1, H, D), q), None),
        "dtype_mismatch": ((q, q.half(), q), None),
        "integer": ((q.long(),) * 3, None),
        "float64": ((q.double(),) * 3, None),
        "head_dim_16": ((r(B, L, H, 16),) * 3, None),
        "head_dim_160": ((r(B, L, H, 160),) * 3, None),
        "lengths_float": ((q, q, q), ok_len.float()),
        "lengths_shape": ((q, q, q), torch.tensor([8], dtype=torch.int32, device=DEVICE)),
        "lengths_2d": ((q, q, q), ok_len[:, None]),
        "lengths_negative": ((q, q, q), torch.tensor([8, -1], dtype=torch.int32, device=DEVICE)),
        "lengths_too_long": ((q, q, q), torch.tensor([9, 3], dtype=torch.int32, device=DEVICE)),
        "lengths_list": ((q, q, q), [8, 3]),
    }


# named here, not by calling _bad_inputs(): collection must not touch the device
_BAD_CASES = ("3d", "shape_mismatch", "dtype_mismatch", "integer", "float64", "head_dim_16", "head_dim_160",
              "lengths_float", "lengths_shape", "lengths_2d", "lengths_negative", "lengths_too_long", "lengths_list")


@pytest.mark.parametrize("case", _BAD_CASES)
def test_bad_inputs_raise_value_error(case):
    cases = _bad_inputs()
    assert set(cases) == set(_BAD_CASES)
    (q, k, v), lengths = cases[case]
    with pytest.raises(ValueError):
        attention(q, k, v, lengths, backend="triton")


def test_unknown_backend_raises():
    q = torch.randn(1, 4, 1, 32, device=DEVICE)
    with pytest.raises(ValueError):
        attention(q, q, q, backend="cuda")
