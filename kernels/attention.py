"""FlashAttention-2-style non-causal attention in Triton: forward, backward, per-sample lengths.

Layout: q, k, v are [B, L, H, D] with arbitrary strides (the model hands in views of its packed
in-projection output, so no copy is made here); out / dq / dk / dv are written [B, L, H, D];
lse and delta are fp32 [B, H, L] contiguous. The softmax scale is 1/sqrt(D).

With ``lengths`` (int32 [B]) only the first lengths[b] tokens of sample b take part: every load of
a token past that length is masked to 0 (so garbage, even NaN, in padded rows cannot leak), its
scores are -inf, and its out / dq / dk / dv rows are written as exact zeros.

Precision (``DOT_PREC``, read on the host once per launcher call, never in a kernel)
-----------------------------------------------------------------------------------
16-bit inputs always run on tensor cores (16-bit operands, fp32 accumulation). fp32 inputs follow
``torch.get_float32_matmul_precision()``, PyTorch's own switch for its fp32 matmuls:

=========== ========== ===================================================== ============ ============
precision   DOT_PREC   the matrix products                                    tested bound measured (1)
=========== ========== ===================================================== ============ ============
"highest"   "ieee"     exact fp32 on the FMA units (no tensor cores)          1e-3 (2)     0.4-7e-6
"high"      "tf32"     tf32 tensor cores: operands keep 10 mantissa bits      1e-2 (3)     1.6-3.1e-3
"medium"    "tf32"     the same as "high"                                     1e-2         1.6-3.1e-3
=========== ========== ===================================================== ============ ============

(1) max |error| / max |reference| against a float64 reference, for each of out, dq, dk and dv, under
    the interpreter (tests/test_attention.py; L = 130..289, D = 64..128, mixed lengths).
(2) the file's historical fp32 bound. (3) tf32 has fp16's 10-bit mantissa: fp16's bound, 3x above
    the largest measured error.

"high" maps to plain tf32, as PyTorch's own CUDA matmuls do under "high" (cuBLAS TF32), rather than
to Triton's "tf32x3" (three tf32 products per product, ~fp32 accuracy): tf32x3 triples the
tensor-core work and does not compile clean on the tf32 tiles (AOT: the 64 x 32 forward at D = 128
spills 292 B on sm_90 and 2.9 KB on sm_80, the sm_80 dq kernel 968 B, the sm_90 dk/dv kernel goes
from 124 to 255 registers), for an accuracy "highest" already gives; no setting of PyTorch's asks
for that middle ground.

The PTX of the tf32 kernels has no cvt.rna.tf32.f32: mma.sync / wgmma get the raw fp32 bits and use
the top 19 of them, i.e. the operands are truncated (up to 2^-10 relative each). The CPU interpreter
ignores input_precision and multiplies in full fp32, so under the interpreter (``UPCAST``) the
kernels truncate the operands of every tf32 product themselves: the interpreter tests measure tf32
rounding (the truncating kind, the worse of the two), not an fp32 upper bound.

Tiles, lengths 1 mod 32, autotuning
-----------------------------------
ALIT's lengths are L = 257 + 32k (and 65 + 8k for the demo preset): one token past a multiple of
32, so with 64-wide tiles the last key tile and the last query tile would each run a whole tile for
one token (320 x 320 tile work for 257 x 257 at L = 257, 55% more). Every kernel therefore splits
both dimensions:

* streamed dimension (keys in the forward and the dq kernel, queries in the dk/dv kernel): the
  full BLOCK_N (BLOCK_M) tiles run without any length mask, then the remainder with the mask. In
  the sm_90 16-bit forward (``tail_full``) that is one tile: a full-width one when the remainder
  is wider than BLOCK_T = 16, else one BLOCK_T-wide tile (16 is the smallest tile a tensor-core
  product takes); several 16-wide tiles cost more than one full one (a 16-wide tile took 62% of a
  64-wide iteration's instructions on sm_90). Its tail loops run at most once and are not
  software-pipelined (``num_stages=1``): pipelining them only added registers (the 128 x 128
  forward at D = 128 spilled with it). The backward kernels follow the same rule where
  ``tail_full`` says so; everything else runs the remainder in BLOCK_T-wide tiles;
* resident dimension (one program's query or key block): a program whose block holds at most
  BLOCK_T valid rows computes a BLOCK_T-row tile (and writes zeros for the rest of its block)
  instead of a BLOCK_M-row one.

At L = 257 with 64 x 64 tiles this is 272 x 272 tile work per (batch, head), 12% above 257 x 257.
BLOCK_T = 32 would cost a 32-wide tile for the one token at L = 257 + 64k, and tile sizes that
divide 257 + 32k exactly do not exist (tiles are powers of two, these lengths are odd). A remainder
of 33 (L = 289 + 64k) takes one masked full-width tile (three 16-wide ones without ``tail_full``),
and a resident block with 17..BLOCK_M - 1
valid rows still computes all BLOCK_M rows.

The forward keeps the running row max on the raw scores q.k and applies the softmax scale inside
the exponent, exp2(s * c - m * c) with c = log2(e) / sqrt(D): one FFMA per score where scaling
the scores first costs a multiply and a subtraction (benchmarks/RESULTS.md, instruction mix).

On a GPU the block sizes come from ``triton.autotune`` over a small, per-architecture candidate
set (``CANDIDATES``; every candidate compiles without spills and within the shared-memory limit of
its architecture, see the comment there), keyed on the length bucket cdiv(L, 32) (each of ALIT's
lengths is its own bucket: their tails differ), the head-dim tile, the precision, HAS_LENGTHS and
the dtypes. Each list offers tiles that fit two or more CTAs per SM next to larger ones at one CTA
per SM (on sm_90 the old 128 x 64 x 3-stage forward took 128 KB of shared memory at D = 128: one
CTA per SM). Tuning benchmarks each candidate once per key and process (results also cached on
disk by Triton): run one call per shape before capturing a CUDA graph. After that the launch path
makes no host sync and no host-to-device copy. Under the interpreter one fixed config is used
(multi-config autotuning crashes the interpreter).

Backward: dq
------------
``DQ_MODE = "separate"`` (the default): dk/dv and dq are computed by two kernels that both
recompute the scores and dp, 7 matrix products, no atomics, deterministic. ``"atomic"``: the dk/dv
kernel also computes dq tiles (ds @ k) and adds them with fp32 atomics into a zeroed fp32 buffer,
FlashAttention-2's 5 products but a non-deterministic summation order. Which one is faster on a
given GPU has not been measured (no GPU was available when this was written): decide with
benchmarks/run_gpu.sh; the environment variable ALIT_FAST_ATTN_DQ selects the default.

This module knows nothing of autograd or nn.Module; ``alit_fast.ops.attention`` wraps it.
TRITON_INTERPRET must be set before this module is imported for the CPU interpreter to be used.
"""
from __future__ import annotations

import functools
import math
import os

import torch
import triton
import triton.language as tl

from ._utils import cdiv, gpu_capability, is_interpreting, next_power_of_2

__all__ = [
    "flash_attn_fwd", "flash_attn_fwd_varlen", "flash_attn_bwd", "dot_precision", "MIN_HEAD_DIM", "MAX_HEAD_DIM", "SUPPORTED_DTYPES",
    "CANDIDATES", "DQ_MODES", "candidates",
]

MIN_HEAD_DIM = 32
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = 1.4426950408889634
BLOCK_T = 16  # the tail tile (see the module docstring)

DQ_MODES = ("separate", "atomic")
DQ_MODE = os.environ.get("ALIT_FAST_ATTN_DQ", "separate").strip().lower() or "separate"
if DQ_MODE not in DQ_MODES:
    raise ValueError(f"ALIT_FAST_ATTN_DQ must be one of {DQ_MODES}, got {DQ_MODE!r}")

# Test hook: when True, every buffer a launcher allocates (out, lse, delta, dq, dk, dv) starts as
# NaN instead of uninitialised memory, so a test can prove each element is written by a kernel.
POISON_OUTPUTS = False

# Test hook: {"fwd" | "dkdv" | "dq": (BLOCK_M, BLOCK_N, num_warps, num_stages)}: those kernels launch
# with that one config instead of the fixed interpreter config (or the autotuner), so tests can run
# other tile shapes than the interpreter's one. Empty in normal use.
CONFIG_OVERRIDE: dict[str, tuple[int, int, int, int]] = {}


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------
# Layout of every kernel: a program owns one block of the resident dimension (queries in the
# forward and the dq kernel, keys in the dk/dv kernel) and streams the other one. The per-tile body
# is written once and unrolled twice by tl.static_range(2): phase 0 streams the full tiles without
# any length mask, phase 1 the remainder in BLOCK_T-wide tiles with it. The per-tile code calls no
# other @triton.jit function: the CPU interpreter re-patches triton.language at every nested call
# (~10 ms each), which made the tests several times slower.
#
# Under the interpreter (UPCAST) with DOT_PREC "tf32" every operand of a product is cut to tf32
# (the `& -8192` lines): the interpreter itself computes each tl.dot in full fp32.
#
# H and L_BUCKET (only the autotuning key) are not specialized on: Triton would compile another
# variant whenever one of them is divisible by 16 (H = 16, L = 481..512) for no gain in the code.
_NO_SPECIALIZE = ["H", "L_BUCKET"]


@triton.jit
def _seqlen(Lengths, b, L, HAS_LENGTHS: tl.constexpr):
    if HAS_LENGTHS:
        n = tl.load(Lengths + b).to(tl.int32)
        # clamped so that a bad length can never index out of bounds; the Python side rejects them
        # anyway, but cannot check values without a device sync under torch.compile
        n = tl.minimum(tl.maximum(n, 0), L)
    else:
        n = L + tl.zeros((), dtype=tl.int32)
    return n


@triton.jit
def _store_zero_rows(base, s_l, s_d, row0, L, D, BLOCK: tl.constexpr, SKIP: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """Zeros in rows [row0 + SKIP, row0 + BLOCK) below L: the rows of a block a tail tile left."""
    rows = row0 + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    mask = ((rows >= row0 + SKIP) & (rows < L))[:, None] & (offs_d < D)[None, :]
    tl.store(base + rows[:, None] * s_l + offs_d[None, :] * s_d,
             tl.zeros((BLOCK, BLOCK_D), dtype=base.dtype.element_ty), mask=mask)


@triton.jit
def _fwd_rows(q_base, k_base, v_base, o_base, lse_base,
              s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_ol, s_od,
              row0, seqlen, L, D, qk_scale,
              ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
              UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TAIL_FULL: tl.constexpr, TMA: tl.constexpr = False):
    offs_m = row0 + tl.arange(0, ROWS)
    if TMA:
        # full K / V tiles (phase 0: every row below the sample's length, so never out of bounds)
        # come through TMA; the masked tail tiles keep the pointer loads
        k_desc = tl.make_tensor_descriptor(k_base, shape=[L, D], strides=[s_kl, 1], block_shape=[BLOCK_N, BLOCK_D])
        v_desc = tl.make_tensor_descriptor(v_base, shape=[L, D], strides=[s_vl, 1], block_shape=[BLOCK_N, BLOCK_D])
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < seqlen
    q = tl.load(q_base + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    if UPCAST and DOT_PREC == "tf32":
        q = (q.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)

    # m_i is the running row max of the raw scores q.k: the scale (log2(e) / sqrt(D)) is applied
    # inside the exponent, exp2(s * qk_scale - m * qk_scale), one FFMA per score instead of a
    # multiply before the max and a subtraction after it (qk_scale > 0, so max commutes with it)
    m_i = tl.full((ROWS,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((ROWS,), dtype=tl.float32)
    acc = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)

    # a query block entirely past the sample's length does no work; its rows are zeroed below
    hi = tl.where(row0 < seqlen, seqlen, 0)
    n_full = hi - hi % BLOCK_N
    rem = hi - n_full
    # phase 0: the full tiles, no length mask. With TAIL_FULL the remainder then runs as one tile:
    # a masked full-width tile when it is wider than BLOCK_T (phase 1), else one BLOCK_T-wide tile
    # (phase 2), neither software-pipelined (they run at most once: pipelining only added registers,
    # and the 128 x 128 tiles at D = 128 spilled with it). Without it (see ``tail_full``: the extra
    # tile body made other tiles spill) the remainder runs in BLOCK_T-wide tiles (phase 2).
    for phase in tl.static_range(3):
        if phase != 1 or TAIL_FULL:  # static: phase 1 exists only with TAIL_FULL
            if phase == 0:
                lo, top = 0, n_full
            elif phase == 1:
                lo, top = n_full, tl.where(rem > BLOCK_T, hi, n_full)
            elif TAIL_FULL:
                lo, top = n_full, tl.where(rem > BLOCK_T, n_full, hi)
            else:
                lo, top = n_full, hi
            for start_n in tl.range(lo, top, BLOCK_T if phase == 2 else BLOCK_N,
                                    num_stages=None if phase == 0 or not TAIL_FULL else 1):
                cols = start_n + tl.arange(0, BLOCK_T if phase == 2 else BLOCK_N)
                if phase == 0:
                    kv_mask = d_ok[None, :]
                else:
                    kv_mask = (cols < seqlen)[:, None] & d_ok[None, :]
                if TMA and phase == 0:
                    k = k_desc.load([start_n, 0])
                    v = v_desc.load([start_n, 0])
                else:
                    k = tl.load(k_base + cols[:, None] * s_kl + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
                    v = tl.load(v_base + cols[:, None] * s_vl + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                if UPCAST and DOT_PREC == "tf32":
                    k = (k.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                    v = (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
                if phase != 0:
                    # a tail tile holds at least one valid key (start_n < seqlen): m_new stays finite
                    s = tl.where((cols < seqlen)[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_scaled = m_new * qk_scale
                alpha = tl.math.exp2(m_i * qk_scale - m_scaled)
                p = tl.math.exp2(s * qk_scale - m_scaled[:, None])
                l_i = l_i * alpha + tl.sum(p, 1)
                p_op = p.to(v.dtype)
                if UPCAST and DOT_PREC == "tf32":
                    p_op = (p_op.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                acc = tl.dot(p_op, v, acc * alpha[:, None], input_precision=DOT_PREC)
                m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = tl.where(m_ok[:, None], acc / l_safe[:, None], 0.0)
    row_in = offs_m < L
    tl.store(o_base + offs_m[:, None] * s_ol + offs_d[None, :] * s_od,
             o.to(o_base.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :])
    lse = tl.where(m_ok, (m_i * qk_scale + tl.math.log2(l_safe)) * 0.6931471805599453, 0.0)
    tl.store(lse_base + offs_m, lse, mask=row_in)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _fwd_kernel(
    Q, K, V, Out, Lse, Lengths,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_ob, s_ol, s_oh, s_od,
    H, L, D, qk_scale, L_BUCKET,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TAIL_FULL: tl.constexpr, TMA: tl.constexpr = False,
    VARLEN: tl.constexpr = False,
):
    # L_BUCKET (= cdiv(L, 32)) is only the autotuning key; the kernel does not read it.
    # VARLEN: packed sequences, FlashAttention's varlen layout. Lengths holds the int32 offsets
    # cu_seqlens [B + 1]; Q/K/V/Out are [N, H, D] (the *_b strides are unused), Lse is [H, N] and
    # L is N. Sequence b's rows are cu[b]..cu[b+1]: its programs read and write those rows only
    # (a program past its sequence's length writes nothing), so no row is padded or zeroed.
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    if VARLEN:
        start = tl.load(Lengths + b).to(tl.int64)
        seqlen = (tl.load(Lengths + b + 1) - tl.load(Lengths + b)).to(tl.int32)
        rows = seqlen  # the rows a program may write: its own sequence's
        q_base = Q + start * s_ql + h * s_qh
        k_base = K + start * s_kl + h * s_kh
        v_base = V + start * s_vl + h * s_vh
        o_base = Out + start * s_ol + h * s_oh
        lse_base = Lse + h.to(tl.int64) * L + start
    else:
        seqlen = _seqlen(Lengths, b, L, HAS_LENGTHS)
        rows = L
        b64 = b.to(tl.int64)
        q_base = Q + b64 * s_qb + h * s_qh
        k_base = K + b64 * s_kb + h * s_kh
        v_base = V + b64 * s_vb + h * s_vh
        o_base = Out + b64 * s_ob + h * s_oh
        lse_base = Lse + (b * H + h).to(tl.int64) * L
    row0 = pid_m * BLOCK_M
    if BLOCK_T < BLOCK_M:
        if seqlen - row0 <= BLOCK_T:
            # the block's valid rows (if any) lie in its first BLOCK_T rows: a BLOCK_T-row tile
            _fwd_rows(q_base, k_base, v_base, o_base, lse_base, s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_ol, s_od,
                      row0, seqlen, rows, D, qk_scale, BLOCK_T, BLOCK_N, BLOCK_T, BLOCK_D, UPCAST, DOT_PREC,
                      TAIL_FULL, TMA)
            _store_zero_rows(o_base, s_ol, s_od, row0, rows, D, BLOCK_M, BLOCK_T, BLOCK_D)
            offs = row0 + tl.arange(0, BLOCK_M)
            tl.store(lse_base + offs, tl.zeros((BLOCK_M,), dtype=tl.float32),
                     mask=(offs >= row0 + BLOCK_T) & (offs < rows))
        else:
            _fwd_rows(q_base, k_base, v_base, o_base, lse_base, s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_ol, s_od,
                      row0, seqlen, rows, D, qk_scale, BLOCK_M, BLOCK_N, BLOCK_T, BLOCK_D, UPCAST, DOT_PREC,
                      TAIL_FULL, TMA)
    else:
        _fwd_rows(q_base, k_base, v_base, o_base, lse_base, s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_ol, s_od,
                  row0, seqlen, rows, D, qk_scale, BLOCK_M, BLOCK_N, BLOCK_T, BLOCK_D, UPCAST, DOT_PREC,
                      TAIL_FULL, TMA)


@triton.jit(do_not_specialize=["H"])
def _bwd_delta_kernel(
    Out, DO, Delta, Lengths,
    s_ob, s_ol, s_oh, s_od,
    s_gb, s_gl, s_gh, s_gd,
    H, L, D,
    HAS_LENGTHS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H + h
    seqlen = _seqlen(Lengths, b, L, HAS_LENGTHS)
    b64 = b.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m < seqlen)[:, None] & (offs_d < D)[None, :]
    o = tl.load(Out + b64 * s_ob + h * s_oh + offs_m[:, None] * s_ol + offs_d[None, :] * s_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b64 * s_gb + h * s_gh + offs_m[:, None] * s_gl + offs_d[None, :] * s_gd,
                 mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    tl.store(Delta + pid_bh.to(tl.int64) * L + offs_m, delta, mask=offs_m < L)


@triton.jit
def _dkdv_cols(q_base, k_base, v_base, g_base, dk_base, dv_base, dq_base, lse_base, delta_base,
               s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_gl, s_gd, s_dkl, s_dkd, s_dvl, s_dvd, s_dql, s_dqd,
               col0, seqlen, L, D, sm_scale, qk_scale,
               COLS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
               ATOMIC_DQ: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TAIL_FULL: tl.constexpr):
    offs_n = col0 + tl.arange(0, COLS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < seqlen
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * s_kl + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * s_vl + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if UPCAST and DOT_PREC == "tf32":
        k = (k.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        v = (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)

    dk = tl.zeros((COLS, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((COLS, BLOCK_D), dtype=tl.float32)
    hi = tl.where(col0 < seqlen, seqlen, 0)
    m_full = hi - hi % BLOCK_M
    rem = hi - m_full
    # the forward's tail rule (see _fwd_rows and ``tail_full``) over the streamed query tiles
    for phase in tl.static_range(3):
        if phase != 1 or TAIL_FULL:  # static: phase 1 exists only with TAIL_FULL
            if phase == 0:
                lo, top = 0, m_full
            elif phase == 1:
                lo, top = m_full, tl.where(rem > BLOCK_T, hi, m_full)
            elif TAIL_FULL:
                lo, top = m_full, tl.where(rem > BLOCK_T, m_full, hi)
            else:
                lo, top = m_full, hi
            for start_m in tl.range(lo, top, BLOCK_T if phase == 2 else BLOCK_M,
                                    num_stages=None if phase == 0 or not TAIL_FULL else 1):
                rows = start_m + tl.arange(0, BLOCK_T if phase == 2 else BLOCK_M)
                if phase == 0:
                    q_mask = d_ok[None, :]
                    lse2 = tl.load(lse_base + rows) * 1.4426950408889634
                    delta = tl.load(delta_base + rows)
                    p_mask = n_ok[:, None]
                else:
                    m_ok = rows < seqlen
                    q_mask = m_ok[:, None] & d_ok[None, :]
                    lse2 = tl.load(lse_base + rows, mask=m_ok, other=0.0) * 1.4426950408889634
                    delta = tl.load(delta_base + rows, mask=m_ok, other=0.0)
                    p_mask = n_ok[:, None] & m_ok[None, :]
                q = tl.load(q_base + rows[:, None] * s_ql + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
                do = tl.load(g_base + rows[:, None] * s_gl + offs_d[None, :] * s_gd, mask=q_mask, other=0.0)
                if UPCAST:
                    q = q.to(tl.float32)
                    do = do.to(tl.float32)
                if UPCAST and DOT_PREC == "tf32":
                    q = (q.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                    do = (do.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                # transposed tile [N, M]: keeps the key block as the row dimension of every product
                s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
                p_t = tl.where(p_mask, tl.math.exp2(s_t - lse2[None, :]), 0.0)
                p_op = p_t.to(do.dtype)
                if UPCAST and DOT_PREC == "tf32":
                    p_op = (p_op.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                dv = tl.dot(p_op, do, dv, input_precision=DOT_PREC)
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
                ds_op = (p_t * (dp_t - delta[None, :])).to(q.dtype)
                if UPCAST and DOT_PREC == "tf32":
                    ds_op = (ds_op.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                dk = tl.dot(ds_op, q, dk, input_precision=DOT_PREC)
                if ATOMIC_DQ:
                    dq = tl.dot(tl.trans(ds_op), k, input_precision=DOT_PREC) * sm_scale
                    tl.atomic_add(dq_base + rows[:, None] * s_dql + offs_d[None, :] * s_dqd, dq,
                                  mask=(rows < seqlen)[:, None] & d_ok[None, :], sem="relaxed")
    dk = dk * sm_scale
    out_mask = (offs_n < L)[:, None] & d_ok[None, :]
    tl.store(dk_base + offs_n[:, None] * s_dkl + offs_d[None, :] * s_dkd,
             dk.to(dk_base.dtype.element_ty), mask=out_mask)
    tl.store(dv_base + offs_n[:, None] * s_dvl + offs_d[None, :] * s_dvd,
             dv.to(dv_base.dtype.element_ty), mask=out_mask)


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, DQ, Lengths,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_gb, s_gl, s_gh, s_gd,
    s_dkb, s_dkl, s_dkh, s_dkd,
    s_dvb, s_dvl, s_dvh, s_dvd,
    s_dqb, s_dql, s_dqh, s_dqd,
    H, L, D, sm_scale, qk_scale, L_BUCKET,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    ATOMIC_DQ: tl.constexpr, UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TAIL_FULL: tl.constexpr,
):
    # one program owns a block of keys and streams every query block past it, so dk / dv are
    # accumulated in registers without atomics. With ATOMIC_DQ it also adds ds @ k (times the
    # softmax scale) into the zeroed fp32 buffer DQ; otherwise DQ is never touched and dq is the
    # separate kernel's job.
    pid_n = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H + h
    seqlen = _seqlen(Lengths, b, L, HAS_LENGTHS)
    b64 = b.to(tl.int64)
    q_base = Q + b64 * s_qb + h * s_qh
    k_base = K + b64 * s_kb + h * s_kh
    v_base = V + b64 * s_vb + h * s_vh
    g_base = DO + b64 * s_gb + h * s_gh
    dk_base = DK + b64 * s_dkb + h * s_dkh
    dv_base = DV + b64 * s_dvb + h * s_dvh
    dq_base = DQ + b64 * s_dqb + h * s_dqh
    lse_base = Lse + pid_bh.to(tl.int64) * L
    delta_base = Delta + pid_bh.to(tl.int64) * L
    col0 = pid_n * BLOCK_N
    if BLOCK_T < BLOCK_N:
        if seqlen - col0 <= BLOCK_T:
            _dkdv_cols(q_base, k_base, v_base, g_base, dk_base, dv_base, dq_base, lse_base, delta_base,
                       s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_gl, s_gd, s_dkl, s_dkd, s_dvl, s_dvd, s_dql, s_dqd,
                       col0, seqlen, L, D, sm_scale, qk_scale,
                       BLOCK_T, BLOCK_M, BLOCK_T, BLOCK_D, ATOMIC_DQ, UPCAST, DOT_PREC, TAIL_FULL)
            _store_zero_rows(dk_base, s_dkl, s_dkd, col0, L, D, BLOCK_N, BLOCK_T, BLOCK_D)
            _store_zero_rows(dv_base, s_dvl, s_dvd, col0, L, D, BLOCK_N, BLOCK_T, BLOCK_D)
        else:
            _dkdv_cols(q_base, k_base, v_base, g_base, dk_base, dv_base, dq_base, lse_base, delta_base,
                       s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_gl, s_gd, s_dkl, s_dkd, s_dvl, s_dvd, s_dql, s_dqd,
                       col0, seqlen, L, D, sm_scale, qk_scale,
                       BLOCK_N, BLOCK_M, BLOCK_T, BLOCK_D, ATOMIC_DQ, UPCAST, DOT_PREC, TAIL_FULL)
    else:
        _dkdv_cols(q_base, k_base, v_base, g_base, dk_base, dv_base, dq_base, lse_base, delta_base,
                   s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_gl, s_gd, s_dkl, s_dkd, s_dvl, s_dvd, s_dql, s_dqd,
                   col0, seqlen, L, D, sm_scale, qk_scale,
                   BLOCK_N, BLOCK_M, BLOCK_T, BLOCK_D, ATOMIC_DQ, UPCAST, DOT_PREC, TAIL_FULL)


@triton.jit
def _dq_rows(q_base, k_base, v_base, g_base, dq_base, lse_base, delta_base,
             s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_gl, s_gd, s_dql, s_dqd,
             row0, seqlen, L, D, sm_scale, qk_scale,
             ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
             UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TAIL_FULL: tl.constexpr):
    offs_m = row0 + tl.arange(0, ROWS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < seqlen
    q_mask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(q_base + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd, mask=q_mask, other=0.0)
    do = tl.load(g_base + offs_m[:, None] * s_gl + offs_d[None, :] * s_gd, mask=q_mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    if UPCAST and DOT_PREC == "tf32":
        q = (q.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
        do = (do.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
    lse2 = tl.load(lse_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(delta_base + offs_m, mask=m_ok, other=0.0)

    dq = tl.zeros((ROWS, BLOCK_D), dtype=tl.float32)
    hi = tl.where(row0 < seqlen, seqlen, 0)
    n_full = hi - hi % BLOCK_N
    rem = hi - n_full
    # the forward's tail rule (see _fwd_rows and ``tail_full``)
    for phase in tl.static_range(3):
        if phase != 1 or TAIL_FULL:  # static: phase 1 exists only with TAIL_FULL
            if phase == 0:
                lo, top = 0, n_full
            elif phase == 1:
                lo, top = n_full, tl.where(rem > BLOCK_T, hi, n_full)
            elif TAIL_FULL:
                lo, top = n_full, tl.where(rem > BLOCK_T, n_full, hi)
            else:
                lo, top = n_full, hi
            for start_n in tl.range(lo, top, BLOCK_T if phase == 2 else BLOCK_N,
                                    num_stages=None if phase == 0 or not TAIL_FULL else 1):
                cols = start_n + tl.arange(0, BLOCK_T if phase == 2 else BLOCK_N)
                if phase == 0:
                    kv_mask = d_ok[None, :]
                    p_mask = m_ok[:, None]
                else:
                    n_ok = cols < seqlen
                    kv_mask = n_ok[:, None] & d_ok[None, :]
                    p_mask = m_ok[:, None] & n_ok[None, :]
                k = tl.load(k_base + cols[:, None] * s_kl + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
                v = tl.load(v_base + cols[:, None] * s_vl + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
                if UPCAST:
                    k = k.to(tl.float32)
                    v = v.to(tl.float32)
                if UPCAST and DOT_PREC == "tf32":
                    k = (k.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                    v = (v.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
                p = tl.where(p_mask, tl.math.exp2(s - lse2[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
                ds_op = (p * (dp - delta[:, None])).to(k.dtype)
                if UPCAST and DOT_PREC == "tf32":
                    ds_op = (ds_op.to(tl.int32, bitcast=True) & -8192).to(tl.float32, bitcast=True)
                dq = tl.dot(ds_op, k, dq, input_precision=DOT_PREC)
    dq = dq * sm_scale
    tl.store(dq_base + offs_m[:, None] * s_dql + offs_d[None, :] * s_dqd,
             dq.to(dq_base.dtype.element_ty), mask=(offs_m < L)[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=_NO_SPECIALIZE)
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Lengths,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_gb, s_gl, s_gh, s_gd,
    s_dqb, s_dql, s_dqh, s_dqd,
    H, L, D, sm_scale, qk_scale, L_BUCKET,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr, TAIL_FULL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H + h
    seqlen = _seqlen(Lengths, b, L, HAS_LENGTHS)
    b64 = b.to(tl.int64)
    q_base = Q + b64 * s_qb + h * s_qh
    k_base = K + b64 * s_kb + h * s_kh
    v_base = V + b64 * s_vb + h * s_vh
    g_base = DO + b64 * s_gb + h * s_gh
    dq_base = DQ + b64 * s_dqb + h * s_dqh
    lse_base = Lse + pid_bh.to(tl.int64) * L
    delta_base = Delta + pid_bh.to(tl.int64) * L
    row0 = pid_m * BLOCK_M
    if BLOCK_T < BLOCK_M:
        if seqlen - row0 <= BLOCK_T:
            _dq_rows(q_base, k_base, v_base, g_base, dq_base, lse_base, delta_base,
                     s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_gl, s_gd, s_dql, s_dqd,
                     row0, seqlen, L, D, sm_scale, qk_scale, BLOCK_T, BLOCK_N, BLOCK_T, BLOCK_D, UPCAST, DOT_PREC,
                     TAIL_FULL)
            _store_zero_rows(dq_base, s_dql, s_dqd, row0, L, D, BLOCK_M, BLOCK_T, BLOCK_D)
        else:
            _dq_rows(q_base, k_base, v_base, g_base, dq_base, lse_base, delta_base,
                     s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_gl, s_gd, s_dql, s_dqd,
                     row0, seqlen, L, D, sm_scale, qk_scale, BLOCK_M, BLOCK_N, BLOCK_T, BLOCK_D, UPCAST, DOT_PREC,
                     TAIL_FULL)
    else:
        _dq_rows(q_base, k_base, v_base, g_base, dq_base, lse_base, delta_base,
                 s_ql, s_qd, s_kl, s_kd, s_vl, s_vd, s_gl, s_gd, s_dql, s_dqd,
                 row0, seqlen, L, D, sm_scale, qk_scale, BLOCK_M, BLOCK_N, BLOCK_T, BLOCK_D, UPCAST, DOT_PREC,
                     TAIL_FULL)


# --------------------------------------------------------------------------------------------
# tile configs
# --------------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner tries, per kernel ("dkdv_atomic": the
# dk/dv kernel with ATOMIC_DQ), architecture class (``arch_class``), operand class ("16bit": fp16 /
# bf16, "tf32", "ieee": exact fp32 on the FMA units) and head-dim tile (BLOCK_D 32 and 64 use the 64
# lists, 96 and 128 the 128 lists). For the dk/dv kernels BLOCK_N is the resident key block and
# BLOCK_M the streamed query block.
#
# Every entry compiles ahead of time (triton 3.9, ptxas 12.9 for sm_80 / sm_89, 13.4 for sm_90a)
# with 0 spills, within its architecture's shared memory per block (227 / 163 / 99 KB) and, except
# for "ieee", on tensor cores (wgmma on sm_90 where the tile allows, mma.sync otherwise). Each list
# mixes one large tile at one CTA per SM with smaller tiles (or fewer stages) that fit two or more
# CTAs per SM by registers and shared memory: which wins depends on the batch size and the length,
# which is what the autotuner measures (benchmarks/aot_check.py re-measures registers, spills and
# shared memory of compiled kernels). Sizes were chosen from a sweep of ~800 AOT compiles:
# * 16-bit forward: BLOCK_M 128 (one wgmma per warpgroup of 8 warps) or 64 with 4 warps, BLOCK_N 64;
#   on sm_90 only 128 x 128 (2 or 3 stages): the only tiles whose main loop takes at most 9
#   thread-instructions per score element (8.7 at D = 128, 7.4 at D = 64; 128 x 64 takes 11.6 and
#   9.6: the acc * alpha rescale and the per-iteration address / barrier work are spread over half
#   the scores), measured from the SASS by benchmarks/aot_check.py (issue 23). One CTA per SM; the
#   auto backend picks SDPA where that loses (small batches);
# * sm_90 16-bit backward at D = 128: dk/dv 64 x 128 (a 128-key resident block: 14.3 instructions
#   per score element against 33.2 for 64 x 64, which spills with the tail rule); the dk/dv
#   candidates that compiled to mma.sync only (64 x 32 with 4 warps, atomic 32 x 32) are gone. dq
#   128 x 128 (9.1 against 11.3 for 128 x 64) compiles clean under triton 3.9 but spills 16 B
#   under 3.6 (the GPU image's), so it is not a candidate;
# * fp32 tiles are twice the bytes, so tf32 keeps BLOCK_N 32-64 and "ieee" (FMA: the whole dot
#   lives in registers) 16-64 with 8 warps: 4-warp FMA tiles spilled at every size above 32 x 32;
# * the dk/dv kernel holds k, v, dk, dv of its key block: BLOCK_N 64 needs 8 warps for D = 128;
#   with atomics it also keeps a dq tile, so its lists are one step smaller;
# * sm_89 (99 KB) only gets entries of at most 99 KB, e.g. no 3-stage 128 x 64 fp16 forward at D = 128.
# The full AOT check at ALIT's shapes (2026-12-03, benchmarks/RESULTS.md) then removed the 29
# entries that spilled 4-36 bytes in some variant, nearly always the one without lengths: ptxas
# settles on an occupancy step (64, 80 or 128 registers) and spills to stay there, or runs out at
# 255. That is why some lists are shorter (sm_89's 16-bit dq at D = 128 keeps one entry) or differ
# per architecture; an explicit maxnreg per config (as kernels/vq.py passes) may recover them, to
# be checked by another full run.
_T = tuple[int, int, int, int]
# the FMA ("ieee") lists: one code on every architecture, but ptxas allocates differently per target
_FMA_FWD = {64: [(32, 64, 8, 1), (32, 64, 8, 2), (64, 16, 8, 1), (32, 32, 8, 2)],
            128: [(32, 64, 8, 1), (32, 64, 8, 2), (32, 16, 8, 2), (16, 32, 8, 2)],
            ("sm89", 64): [(32, 64, 8, 2), (64, 16, 8, 1), (32, 32, 8, 2)],  # 32 x 64 x 1 stage: 4 B spilled (3.6)
            ("sm89", 128): [(32, 16, 8, 1), (32, 16, 8, 2), (16, 32, 8, 2)]}
_FMA_DKDV = {64: [(32, 32, 8, 1), (32, 16, 8, 2), (64, 16, 8, 1)],
             ("sm90", 64): [(32, 32, 8, 1), (16, 32, 8, 2), (32, 16, 8, 2), (64, 16, 8, 1)],
             ("sm89", 64): [(32, 32, 8, 1), (16, 32, 8, 2), (32, 16, 8, 2), (32, 16, 8, 1)],
             128: [(32, 32, 8, 2), (64, 16, 8, 1)],
             ("sm90", 128): [(16, 32, 8, 1), (32, 16, 8, 2), (64, 16, 8, 1)],
             ("sm89", 128): [(16, 32, 8, 1), (16, 32, 8, 2), (32, 16, 8, 2), (32, 16, 8, 1)]}
_FMA_DKDV_ATOMIC = {64: [(32, 32, 8, 2), (16, 32, 8, 2), (64, 16, 8, 1), (32, 16, 8, 2)],
                    ("sm90", 64): [(32, 32, 8, 2), (32, 32, 8, 1), (16, 32, 8, 2), (64, 16, 8, 1)],
                    ("sm89", 64): [(32, 32, 8, 2), (32, 32, 8, 1), (16, 32, 8, 2), (64, 16, 8, 1)],
                    128: [(32, 32, 8, 2), (32, 16, 8, 2), (64, 16, 8, 1)],
                    ("sm90", 128): [(16, 32, 8, 2), (32, 16, 8, 2), (64, 16, 8, 1)],
                    ("sm89", 128): [(16, 32, 8, 2), (32, 16, 8, 1)]}  # 32 x 32 spilled 428 B under triton 3.6
_FMA_DQ = {64: [(32, 64, 8, 2), (32, 32, 8, 1), (16, 32, 8, 2)],
           ("sm90", 64): [(32, 64, 8, 2), (64, 16, 8, 2), (16, 32, 8, 2)],
           ("sm89", 64): [(32, 64, 8, 2), (64, 16, 8, 2), (32, 32, 8, 1), (16, 32, 8, 2)],
           128: [(16, 32, 8, 2), (64, 16, 8, 2)],
           ("sm90", 128): [(16, 32, 8, 2), (32, 16, 8, 2), (64, 16, 8, 2), (32, 16, 8, 1)],
           ("sm89", 128): [(16, 32, 8, 2), (64, 16, 8, 2), (32, 16, 8, 1)]}


def _lists(tc: dict[tuple[str, str, int], list[_T]], fma: dict) -> dict[tuple[str, str, int], list[_T]]:
    out = dict(tc)
    for arch in ("sm90", "sm80", "sm89"):
        for d in (64, 128):
            out[(arch, "ieee", d)] = fma.get((arch, d), fma[d])
    return out


CANDIDATES: dict[str, dict[tuple[str, str, int], list[_T]]] = {
    "fwd": _lists({
        ("sm90", "16bit", 64): [(128, 128, 8, 2), (128, 128, 8, 3)],
        ("sm90", "16bit", 128): [(128, 128, 8, 2), (128, 128, 8, 3)],
        # 128 x 64 with 4 warps and 3 stages spilled 8 B at D = 64 (sm_80 fp16 under triton 3.9,
        # sm_89 bf16 under 3.6) once the scale moved into the exp2 FFMA
        ("sm80", "16bit", 64): [(64, 64, 4, 3), (128, 64, 8, 2)],
        ("sm80", "16bit", 128): [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (64, 32, 4, 3)],
        ("sm89", "16bit", 64): [(64, 64, 4, 3), (128, 64, 8, 2)],
        ("sm89", "16bit", 128): [(128, 64, 8, 2), (64, 64, 4, 2), (64, 32, 4, 2), (64, 32, 4, 3)],
        ("sm90", "tf32", 64): [(128, 32, 8, 2), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2)],
        ("sm90", "tf32", 128): [(64, 32, 4, 2), (64, 32, 4, 3), (128, 32, 8, 2), (64, 64, 8, 2)],
        ("sm80", "tf32", 64): [(64, 32, 4, 2), (64, 64, 4, 3), (128, 64, 4, 2)],
        ("sm80", "tf32", 128): [(64, 32, 4, 2), (64, 32, 8, 2), (64, 64, 8, 2), (128, 32, 8, 2)],
        ("sm89", "tf32", 64): [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (64, 32, 4, 3)],
        ("sm89", "tf32", 128): [(64, 32, 4, 2), (64, 32, 8, 2), (128, 32, 8, 2)],
    }, _FMA_FWD),
    "dkdv": _lists({
        ("sm90", "16bit", 64): [(64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (64, 64, 8, 3)],
        ("sm90", "16bit", 128): [(64, 128, 8, 2), (64, 128, 8, 3)],
        ("sm80", "16bit", 64): [(64, 128, 8, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
        ("sm80", "16bit", 128): [(64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 2), (64, 32, 4, 2)],
        ("sm89", "16bit", 64): [(64, 64, 4, 2), (64, 32, 4, 2), (128, 32, 8, 2)],
        ("sm89", "16bit", 128): [(64, 64, 8, 2), (64, 32, 8, 2), (64, 32, 4, 2), (32, 64, 8, 2)],
        ("sm90", "tf32", 64): [(64, 64, 4, 2), (32, 64, 4, 2)],
        ("sm90", "tf32", 128): [(64, 32, 8, 2), (32, 32, 8, 2), (128, 32, 8, 2)],
        ("sm80", "tf32", 64): [(64, 32, 4, 2), (64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
        ("sm80", "tf32", 128): [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (32, 16, 8, 2)],
        ("sm89", "tf32", 64): [(64, 32, 4, 2), (64, 32, 8, 2), (32, 64, 4, 2), (32, 32, 4, 2)],
        ("sm89", "tf32", 128): [(32, 32, 4, 2), (32, 16, 8, 2), (16, 64, 8, 2), (64, 16, 4, 2)],
    }, _FMA_DKDV),
    "dkdv_atomic": _lists({
        ("sm90", "16bit", 64): [(64, 64, 4, 2), (32, 64, 8, 2), (64, 32, 8, 2), (64, 64, 8, 2)],
        ("sm90", "16bit", 128): [(64, 32, 8, 2), (32, 64, 8, 2)],
        ("sm80", "16bit", 64): [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 8, 2)],
        ("sm80", "16bit", 128): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
        ("sm89", "16bit", 64): [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 8, 2)],
        ("sm89", "16bit", 128): [(64, 64, 8, 2), (64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2)],
        ("sm90", "tf32", 64): [(64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (64, 32, 8, 2)],
        ("sm90", "tf32", 128): [(64, 32, 8, 2), (32, 32, 4, 2), (32, 32, 8, 2), (16, 32, 4, 2)],
        ("sm80", "tf32", 64): [(64, 32, 4, 2), (32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 8, 2)],
        ("sm80", "tf32", 128): [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2), (32, 32, 4, 2)],
        ("sm89", "tf32", 64): [(64, 32, 4, 2), (32, 32, 4, 2), (32, 64, 4, 2), (64, 32, 8, 2)],
        ("sm89", "tf32", 128): [(32, 32, 8, 2), (32, 32, 4, 2), (32, 16, 4, 2), (32, 16, 8, 2)],
    }, _FMA_DKDV_ATOMIC),
    "dq": _lists({
        ("sm90", "16bit", 64): [(128, 64, 8, 2), (128, 64, 8, 3), (64, 64, 4, 2), (128, 32, 8, 2)],
        ("sm90", "16bit", 128): [(128, 64, 8, 2), (64, 64, 4, 2)],
        ("sm80", "16bit", 64): [(64, 64, 4, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3)],
        ("sm80", "16bit", 128): [(128, 32, 8, 2), (64, 64, 8, 3)],
        ("sm89", "16bit", 64): [(64, 64, 4, 2), (128, 32, 8, 2), (128, 32, 8, 3), (64, 64, 8, 3)],
        ("sm89", "16bit", 128): [(128, 32, 8, 2)],
        ("sm90", "tf32", 64): [(64, 32, 4, 2), (64, 64, 4, 2), (128, 32, 8, 2), (32, 64, 4, 2)],
        ("sm90", "tf32", 128): [(64, 32, 4, 2), (32, 32, 4, 2), (128, 32, 8, 2)],
        ("sm80", "tf32", 64): [(64, 32, 4, 2), (64, 64, 4, 2), (32, 64, 4, 2), (128, 32, 8, 2)],
        ("sm80", "tf32", 128): [(32, 32, 4, 2), (32, 32, 8, 2), (64, 32, 4, 2), (64, 32, 8, 2)],
        ("sm89", "tf32", 64): [(64, 32, 4, 2), (32, 32, 4, 2), (32, 64, 4, 2), (128, 32, 8, 2)],
        ("sm89", "tf32", 128): [(32, 32, 4, 2), (32, 16, 4, 2), (16, 32, 4, 2)],
    }, _FMA_DQ),
}

# the one config of the interpreter: 64-row tiles keep the number of (slow, Python-level) program
# instances small while the 16-wide tails and the 16-row tail blocks are still exercised at L = 257
_INTERPRETER_CONFIG = (64, 64, 4, 1)


def arch_class(cap: tuple[int, int] | None) -> str:
    """The candidate list an architecture gets: "sm90" (227 KB of shared memory per block, wgmma),
    "sm80" (A100 / Orin: 163 KB), "sm89" (sm_86 / sm_89 / sm_120: 99 KB), "old" (pre-Ampere)."""
    if cap is None:
        return "sm80"
    if cap[0] == 9:
        return "sm90"
    if cap in ((8, 0), (8, 7)) or cap[0] == 10:
        return "sm80"  # sm_100 has 227 KB: the sm_80 lists fit (no tcgen05-specific tuning here)
    if cap[0] >= 8:
        return "sm89"
    return "old"


def operand_class(dtype: torch.dtype, dot_prec: str) -> str:
    return "16bit" if dtype != torch.float32 else dot_prec  # "16bit" | "tf32" | "ieee"


def _dtile(block_d: int) -> int:
    return 64 if block_d <= 64 else 128


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _device_capability(device: torch.device) -> tuple[int, int] | None:
    if device.type != "cuda" or not torch.cuda.is_available():
        return gpu_capability(device)
    return _capability(device.index if device.index is not None else torch.cuda.current_device())


def _fixed_config(kernel: str, cap: tuple[int, int] | None, ocls: str) -> tuple[int, int, int, int]:
    if kernel in CONFIG_OVERRIDE:
        return CONFIG_OVERRIDE[kernel]
    if is_interpreting():
        return _INTERPRETER_CONFIG
    # pre-Ampere (64-96 KB of shared memory, no bf16 / tf32 tensor cores): small, untuned tiles
    return (32, 32, 4, 1) if ocls != "16bit" else (64, 32, 4, 2)


def tail_full(cap: tuple[int, int] | None, ocls: str) -> bool:
    """Whether the kernels run a length remainder above BLOCK_T as one masked full-width tile
    (TAIL_FULL): for 16-bit operands on sm_90, and under the interpreter (so the tests run it).
    Elsewhere the extra tile body made ptxas spill (sm_80 / sm_89 128 x 64 at D = 128: 4-12 B;
    the fp32 FMA 32 x 64 on sm_90: 2.1 KB), so those keep the 16-wide tail tiles."""
    return is_interpreting() or (arch_class(cap) == "sm90" and ocls == "16bit")


def use_tma(cap: tuple[int, int] | None, ocls: str, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the forward loads its full K / V tiles through tensor descriptors (TMA): sm_90 with
    16-bit operands, where K and V meet TMA's rules (last dimension contiguous, 16-byte aligned
    base and strides: the packed in-projection views meet them when D is a multiple of 8). Off
    under the interpreter unless a test forces it (tests/test_attention_tiles.py); sm_80 / sm_89
    and fp32 keep cp.async."""
    if is_interpreting() or arch_class(cap) != "sm90" or ocls != "16bit":
        return False
    return all(t.stride(3) == 1 and t.data_ptr() % 16 == 0 and all(t.stride(i) * t.element_size() % 16 == 0 for i in range(3))
               for t in (k, v))


def _tma_scratch(device: torch.device, size: int, alignment: int, stream: int | None) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device=device)


def dot_precision(dtype: torch.dtype) -> str:
    """DOT_PREC for inputs of ``dtype``: fp32 follows torch.get_float32_matmul_precision()."""
    if dtype != torch.float32:
        return "ieee"  # ignored by tl.dot for 16-bit operands (always tensor cores)
    return "ieee" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PREC), read once per launcher call.

    Under the triton 3.9 interpreter tl.dot on 16-bit operands returns garbage, so operands are
    upcast to fp32 there (and with DOT_PREC "tf32" cut to tf32, which the interpreter does not do
    itself); on a GPU the native 16-bit tensor-core dot is kept.
    """
    return is_interpreting(), dot_precision(dtype)


def _table(kernel: str, atomic_dq: bool = False) -> str:
    return "dkdv_atomic" if kernel == "dkdv" and atomic_dq else kernel


def candidates(kernel: str, cap: tuple[int, int] | None, dtype: torch.dtype, dot_prec: str, block_d: int,
               atomic_dq: bool = False) -> list[tuple[int, int, int, int]]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner tries for ``kernel`` ("fwd" |
    "dkdv" | "dq") on a GPU of capability ``cap``, e.g. for an ahead-of-time check of each."""
    return list(CANDIDATES[_table(kernel, atomic_dq)][(arch_class(cap), operand_class(dtype, dot_prec),
                                                       _dtile(block_d))])


def _prune(kernel: str):
    # the autotuner's early_config_prune: of the union of every list, keep the device's list
    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        wanted = set(candidates(kernel, _device_capability(q.device), q.dtype, kwargs["DOT_PREC"], kwargs["BLOCK_D"],
                                bool(kwargs.get("ATOMIC_DQ", False))))
        return [c for c in configs if _cfg_tuple(c) in wanted]

    return prune


def _cfg_tuple(c: triton.Config) -> tuple[int, int, int, int]:
    return (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)


def _all_configs(kernel: str) -> list[triton.Config]:
    tables = ("dkdv", "dkdv_atomic") if kernel == "dkdv" else (kernel,)
    tuples = sorted({t for name in tables for lst in CANDIDATES[name].values() for t in lst})
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in tuples]


def _autotuned(kernel: str, fn, reset_to_zero=None):
    return triton.autotune(
        configs=_all_configs(kernel),
        key=["L_BUCKET", "BLOCK_D", "DOT_PREC", "HAS_LENGTHS"] + {"dkdv": ["ATOMIC_DQ"], "fwd": ["VARLEN"]}.get(kernel, []),
        prune_configs_by={"early_config_prune": _prune(kernel)},
        reset_to_zero=reset_to_zero,
        cache_results=True,  # also on disk (Triton's cache dir): a new process does not re-tune
    )(fn)


_JIT = {"fwd": _fwd_kernel, "dkdv": _bwd_dkdv_kernel, "dq": _bwd_dq_kernel}
_TUNED_CACHE: dict = {}


class _Tuned:
    """The autotuned kernels, built on first use (never under the interpreter)."""

    def __getitem__(self, kernel: str):
        if kernel not in _TUNED_CACHE:
            # the autotuner's benchmark runs repeat the atomic adds: DQ is zeroed before each
            _TUNED_CACHE[kernel] = _autotuned(kernel, _JIT[kernel], ["DQ"] if kernel == "dkdv" else None)
        return _TUNED_CACHE[kernel]


_TUNED = _Tuned()


# --------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def _check_buffer(buf: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, name: str):
    if tuple(buf.shape) != tuple(shape) or buf.dtype != dtype or buf.device != device:
        raise ValueError(
            f"{name} buffer must be {dtype} {tuple(shape)} on {device}, got {buf.dtype} {tuple(buf.shape)} on {buf.device}"
        )


def _launch(kernel: str, grid_of, args, cap, ocls, **constexprs):
    """Launch ``kernel`` ("fwd" | "dkdv" | "dq"): autotuned on Ampere and newer GPUs, one fixed
    config under the interpreter and on older GPUs. ``grid_of(BLOCK_M, BLOCK_N)`` gives the grid."""
    if is_interpreting() or arch_class(cap) == "old" or kernel in CONFIG_OVERRIDE:
        bm, bn, warps, stages = _fixed_config(kernel, cap, ocls)
        _JIT[kernel][grid_of(bm, bn)](*args, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages,
                                      **constexprs)
    else:
        _TUNED[kernel][lambda meta: grid_of(meta["BLOCK_M"], meta["BLOCK_N"])](*args, **constexprs)


def _fwd_outputs(q: torch.Tensor, out_shape: tuple[int, ...], lse_shape: tuple[int, ...],
                 out: torch.Tensor | None, lse: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward's out (q's dtype, any strides) and lse (fp32, contiguous): allocated, or the
    caller's checked."""
    if out is None:
        out = _alloc(out_shape, q.dtype, q.device)
    else:
        _check_buffer(out, out_shape, q.dtype, q.device, "out")
    if lse is None:
        lse = _alloc(lse_shape, torch.float32, q.device)
    else:
        _check_buffer(lse, lse_shape, torch.float32, q.device, "lse")
        if not lse.is_contiguous():
            raise ValueError("lse buffer must be contiguous")
    return out, lse


def flash_attn_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel. Returns (out [B, L, H, D] in q's dtype, lse fp32 [B, H, L]).

    Inputs are assumed validated by the caller (``alit_fast.ops.attention``); ``lengths`` must be
    int32 on q's device (converted by the caller, once). ``out`` / ``lse`` may be passed in (any
    strides for ``out``; ``lse`` contiguous), e.g. pre-filled with NaN by a test to prove every
    element is written.
    """
    B, L, H, D = q.shape
    out, lse = _fwd_outputs(q, (B, L, H, D), (B, H, L), out, lse)
    if B * H * L == 0:
        return out, lse
    has_len = lengths is not None
    len_arg = lengths if has_len else q  # any pointer; never read when HAS_LENGTHS is False
    _launch_fwd(q, k, v, (q, k, v, out, lse, len_arg, *_strides(q), *_strides(k), *_strides(v), *_strides(out)),
                B, L, L, HAS_LENGTHS=has_len)
    return out, lse


def _launch_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args: tuple, B: int, L: int, rows: int,
                **constexprs) -> None:
    """Launch the forward kernel on ``args`` (pointers and strides) for B sequences of at most L
    tokens (``rows``: the kernel's L argument); k and v are 4-D, for the descriptor check."""
    H, D = q.shape[-2], q.shape[-1]
    upcast, prec = _dot_flags(q.dtype)
    cap = _device_capability(q.device)
    ocls = operand_class(q.dtype, prec)
    tma = use_tma(cap, ocls, k, v)
    if tma:
        # the kernel builds its descriptors in a global scratch buffer that Triton asks the
        # context's allocator for at launch
        triton.set_allocator(functools.partial(_tma_scratch, q.device))
    # batch on the z axis (limit 65535) rather than B*H on y, which large batches would overflow
    _launch(
        "fwd", lambda bm, bn: (cdiv(L, bm), H, B),
        (*args, H, rows, D, _LOG2E / math.sqrt(D), cdiv(L, 32)),
        cap, ocls,
        BLOCK_T=BLOCK_T, BLOCK_D=next_power_of_2(D), UPCAST=upcast, DOT_PREC=prec, TAIL_FULL=tail_full(cap, ocls),
        TMA=tma, **constexprs,
    )


def flash_attn_fwd_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    *,
    out: torch.Tensor | None = None,
    lse: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward kernel on packed sequences: q, k, v [N, H, D] (any strides: views of a packed
    [N, 3, H, D] projection), sequence b in rows cu_seqlens[b]..cu_seqlens[b+1] (int32 [B+1] on q's
    device), ``max_seqlen`` >= every length (a host int the caller knows: no sync). Returns (out
    [N, H, D] in q's dtype, lse fp32 [H, N]). Sequences never see each other; no row is padded.

    One program per (query block, head, sequence), as the padded kernel with per-sample lengths;
    blocks past a sequence's length exit without work. On sm_90 the full K / V tiles come through
    tensor descriptors made per program at its sequence's first row (16-byte aligned wherever the
    row stride is, which ``use_tma`` checks), bounded by that sequence's length."""
    N, H, D = q.shape
    B = cu_seqlens.shape[0] - 1
    out, lse = _fwd_outputs(q, (N, H, D), (H, N), out, lse)
    if N * H == 0 or B == 0:
        return out, lse

    def strides(t: torch.Tensor) -> tuple[int, int, int, int]:
        return (0, *t.stride())  # no batch stride: the offsets place each sequence

    _launch_fwd(q, k[None], v[None], (q, k, v, out, lse, cu_seqlens, *strides(q), *strides(k), *strides(v), *strides(out)),
                B, max_seqlen, N, HAS_LENGTHS=False, VARLEN=True)
    return out, lse


def flash_attn_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    lengths: torch.Tensor | None = None,
    *,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
    dq_mode: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch delta, dk/dv and (``dq_mode="separate"``) dq kernels. Returns (dq, dk, dv), each
    [B, L, H, D] in q's dtype.

    ``grad_out`` and ``out`` may have any strides; ``lse`` is the fp32 [B, H, L] from the forward.
    ``dq_mode`` defaults to ``DQ_MODE`` (see the module docstring).
    """
    dq_mode = DQ_MODE if dq_mode is None else dq_mode
    if dq_mode not in DQ_MODES:
        raise ValueError(f"dq_mode must be one of {DQ_MODES}, got {dq_mode!r}")
    B, L, H, D = q.shape
    bufs = []
    for name, buf in (("dq", dq), ("dk", dk), ("dv", dv)):
        if buf is None:
            buf = _alloc((B, L, H, D), q.dtype, q.device)
        else:
            _check_buffer(buf, (B, L, H, D), q.dtype, q.device, name)
        bufs.append(buf)
    dq, dk, dv = bufs
    if B * H * L == 0:
        return dq, dk, dv
    lse = lse.contiguous()
    delta = _alloc((B, H, L), torch.float32, q.device)
    upcast, prec = _dot_flags(q.dtype)
    cap = _device_capability(q.device)
    ocls = operand_class(q.dtype, prec)
    has_len = lengths is not None
    len_arg = lengths if has_len else q
    block_d = next_power_of_2(D)
    sm_scale = 1.0 / math.sqrt(D)
    bucket = cdiv(L, 32)

    # 32 rows at D > 64: the 64 x 128 fp32 tiles spilled 4 B on sm_89 under triton 3.6 (ptxas 12.8)
    bm_delta = 64 if block_d <= 64 else 32
    _bwd_delta_kernel[(cdiv(L, bm_delta), H, B)](
        out, grad_out, delta, len_arg, *_strides(out), *_strides(grad_out), H, L, D,
        HAS_LENGTHS=has_len, BLOCK_M=bm_delta, BLOCK_D=block_d,
    )

    atomic = dq_mode == "atomic"
    if atomic:
        # fp32 accumulator of the atomic adds: dq itself when it is fp32, else a scratch buffer
        dq_acc = dq if dq.dtype == torch.float32 else torch.empty((B, L, H, D), dtype=torch.float32, device=q.device)
        dq_acc.zero_()
    else:
        dq_acc = dk  # never touched by the kernel (zeroed only by the autotuner's benchmark runs)
    _launch(
        "dkdv", lambda bm, bn: (cdiv(L, bn), H, B),
        (q, k, v, grad_out, lse, delta, dk, dv, dq_acc, len_arg,
         *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
         *_strides(dq_acc), H, L, D, sm_scale, sm_scale * _LOG2E, bucket),
        cap, ocls,
        HAS_LENGTHS=has_len, BLOCK_T=BLOCK_T, BLOCK_D=block_d, ATOMIC_DQ=atomic, UPCAST=upcast, DOT_PREC=prec,
        TAIL_FULL=tail_full(cap, ocls),
    )
    if atomic:
        if dq_acc is not dq:
            dq.copy_(dq_acc)
        return dq, dk, dv

    _launch(
        "dq", lambda bm, bn: (cdiv(L, bm), H, B),
        (q, k, v, grad_out, lse, delta, dq, len_arg,
         *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
         H, L, D, sm_scale, sm_scale * _LOG2E, bucket),
        cap, ocls,
        HAS_LENGTHS=has_len, BLOCK_T=BLOCK_T, BLOCK_D=block_d, UPCAST=upcast, DOT_PREC=prec,
        TAIL_FULL=tail_full(cap, ocls),
    )
    return dq, dk, dv
