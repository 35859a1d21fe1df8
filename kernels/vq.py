"""Fused nearest-code search: argmin_k ||z_n - c_k||^2 without an N x K distance matrix.

Design (one call = one small prep launch, one search launch, and a combine launch only when the
codebook is split across programs):

1. ``_vq_prep_codes_kernel`` (once per call, K x d work): writes the codebook rounded to the
   tensor-core operand type (tf32-rounded fp32 for fp32 z, bf16/fp16 for 16-bit z), zero-padded
   to the tile width, and per code ``||c||^2``, ``||c~||`` and ``||c - c~||`` (the rounding error
   actually made, flush-aware).
2. ``_vq_tc_kernel`` (grid: row blocks x codebook splits). Each program streams its share of the
   codebook in tiles. For every tile a tensor-core dot gives approximate scores
   ``s~ = ||c||^2 - 2 z~.c~``; the program keeps the running minimum ``b`` of ``s~`` per row and a
   rigorous bound ``W`` (below) such that the code the exact fp32 ranking picks always satisfies
   ``s~ <= b + W``. Every code of the tile under that threshold (usually none, sometimes one per
   row) is re-ranked exactly: its fp32 distance ``(||c||^2 - 2 z.c) + ||z||^2`` -- the same
   expression, in the same order of operations, that the torch reference ranks -- is computed from
   the fp32 row and code, and the lowest index wins among equal exact values. The threshold only
   shrinks as ``b`` falls, so each code under the final threshold was re-ranked when its tile was
   visited; re-ranking extra codes is harmless. So the answer is the exact fp32 argmin (lowest
   index on ties) of the program's codes, whatever the tensor cores rounded.
   That is the path up to d = 64 (``_search_small``: the row in registers, one short fp32 dot
   per re-checked code). Above (``_search_wide``, the VQGAN's d = 256) the row block is loaded
   once, in the operand type, and stays resident (shared memory for wgmma on sm_90, registers for
   mma.sync) while the code tiles stream through it; the main loop does not re-check anything. It
   shifts the scores by one constant per block so they are non-negative, packs each code's column
   into the low bits of its score and takes one integer minimum per row (best code and score at
   once; cutting those bits lowers a score by at most 2^-17 of the largest shifted score, and
   ``W`` widens by twice that), then the second best, and keeps up to four candidates per row in slots (a slot whose
   score rose above the threshold is reused). After the loop one exact fp32 distance is computed
   per slot still under the final threshold ``b + W`` (almost always one code per row). A row that
   dropped a candidate still under the final threshold (five or more live at once, or three in one
   tile: ~0.1-0.4% of random rows at d = 256) gets a rescan of the codebook with that threshold
   and inline re-checks in index order, so the answer is the same exact argmin.
3. With a split codebook, each program writes its (exact distance, index) and
   ``_vq_finalize_kernel`` takes, per row, the first strict minimum over the splits in split order
   (splits cover increasing index ranges), so ties still resolve to the lowest index. It also
   computes the returned score and z_q. Without a split the search kernel writes them itself.

The error bound (``_window``): let ``z`` be the fp32 (normalized) row, ``z~``, ``c~`` the operands
the tensor cores multiply, ``ez >= ||z - z~||``, ``ec >= ||c - c~||``. By Cauchy-Schwarz
``|z.c - z~.c~| <= ||z|| ec + ez ||c~||``. Products of tf32/bf16/fp16 values are exact in fp32; the
tensor cores' fp32 accumulation of the ``d`` products (truncating, aligned adds) errs by at most
``g_tc ||z~|| ||c~||`` with ``g_tc = (d + 16) 2^-20``, 16 times the round-to-nearest bound
``d 2^-24``; the exact fp32 dot errs by at most ``g_ex ||z|| ||c||``, ``g_ex = (d + 2) 2^-23``
(twice the textbook ``gamma_d``, any summation order). Each score is then off from the real
``||c||^2 - 2 z.c`` by at most twice its dot error plus a rounding of its magnitude, so the exact
winner ``k*`` and the approximate minimum ``j`` satisfy ``s~_k* <= s~_j + 4 dot_err + slack``,
where the slack ``2^-19 (max ||c||^2 + 2 ||z~|| max ||c|| + ||z||^2)`` (32 ulps of the largest
magnitude involved) covers the roundings of both scores, of adding ``||z||^2`` before ranking,
and of forming and comparing the threshold. ``ez``: measured per row where the row sits in
registers (d <= 64), else the a priori relative error of the conversion (2^-10 for fp32 -> tf32,
valid whether the hardware rounds or truncates; 2^-8 bf16; 2^-11 fp16; 0 when z already is the
operand type) plus, for every value under the operand type's smallest normal (2^-14 for fp16,
2^-126 otherwise), the value itself (a flush-to-zero). ``ec`` is measured the same flush-aware way
in the prep kernel; codes out of fp16's range are clamped there, which makes ``ec`` (and the
window) huge: correct, only slower. All maxima are over the program's own codes.

In practice the window is narrow: for the latent quantizer (d = 12, cosine, fp32 z on tf32) on
random data W is ~2.4e-3 in score units (scores span [-1, 3]), ~1.1 candidate codes per row
survive to the end and a 64 x 64 tile takes ~1.2 re-check trips on average, so the exact pass
costs little next to the tensor-core pass.

Grid (d <= 64; above, 128-row blocks for 16-bit z on sm_90, else 64, see _GPU_WIDE): 64-row blocks x codebook splits (``_pick_splits``): N = 8,192 rows and K = 4,096 (latent)
or K = 1,024 (VQGAN) give 128 x 4 = 512 programs, ~3.9 per SM of a 132-SM H100/H200; N = 65,536
gives 1,024 row blocks and no split; N = 1,024 with K = 4,096 gives 16 x 16. Registers, spills,
shared memory and the tensor-core instructions of every compiled variant: benchmarks/RESULTS.md
("Ahead-of-time compile check"), re-measured by ``python -m benchmarks.aot_check``.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._utils import cdiv, is_interpreting, next_power_of_2

# F.normalize's floor on the norm; the same value keeps both backends choosing the same codes for
# (near-)zero rows.
_NORM_EPS = 1e-12

# Reductions through tl.reduce with triton's own combine functions: the same code as tl.sum / tl.min
# / tl.max when compiled, and under the interpreter a single numpy call instead of a device-function
# call (tl.sum and friends are @jit functions there, each call re-patching triton.language: ~5 ms).
_SUM = tl.standard._sum_combine
_MIN = tl.standard._elementwise_min
_MAX = tl.standard._elementwise_max

# Rows are held whole in registers up to this padded width; above it the row block stays resident
# in the operand type and the exact re-check is deferred (_search_wide).
_SMALL_D_MAX = 64


@triton.jit
def _round_to_operand(x, OP_KIND: tl.constexpr):
    """x (fp32) rounded to the tensor-core operand type: 0 tf32 (kept in fp32), 1 bf16, 2 fp16."""
    if OP_KIND == 0:
        # round half away at 10 mantissa bits (cvt.rna.tf32.f32), in integer arithmetic so the
        # interpreter does the same; the tensor cores then see exact tf32 values
        bits = x.to(tl.int32, bitcast=True)
        return ((bits + 0x1000) & -8192).to(tl.float32, bitcast=True)
    elif OP_KIND == 1:
        return x.to(tl.bfloat16)
    else:
        return tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16)


@triton.jit
def _rounding_error_sq(x, xr, OP_KIND: tl.constexpr):
    """Per element squared bound on |x - operand|, counting a flush-to-zero of values the operand
    type holds only as subnormals."""
    xr = xr.to(tl.float32)
    if OP_KIND == 2:
        tiny = 6.103515625e-05  # 2^-14, fp16's smallest normal
    else:
        tiny = 1.1754943508222875e-38  # 2^-126
    err = tl.abs(x - xr)
    err = tl.where(tl.abs(xr) < tiny, tl.maximum(err, tl.abs(x)), err)
    return err * err


@triton.jit
def _row_norm(z_ptr, rows64, row_ok, D, stride_zn, stride_zd, NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr,
              BLOCK_D: tl.constexpr, D_PAD: tl.constexpr):
    """max(||z||, eps) per row (1 when not normalizing), over d tiles of BLOCK_D."""
    if NORMALIZE:
        ssq = tl.zeros([BLOCK_N], dtype=tl.float32)
        for d0 in range(0, D_PAD, BLOCK_D):
            dk = d0 + tl.arange(0, BLOCK_D)
            zc = tl.load(
                z_ptr + rows64[:, None] * stride_zn + dk[None, :] * stride_zd,
                mask=row_ok[:, None] & (dk[None, :] < D),
                other=0.0,
            ).to(tl.float32)
            ssq += tl.reduce(zc * zc, 1, _SUM)
        nrm = tl.maximum(tl.sqrt_rn(ssq), 1e-12)
    else:
        nrm = tl.full([BLOCK_N], 1.0, tl.float32)
    return nrm


@triton.jit
def _write_result(
    z_ptr, cb_ptr, idx_ptr, score_ptr, zq_ptr, write_zq, rows64, row_ok, best_i, nrm, D, stride_zn, stride_zd,
    NORMALIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, D_PAD: tl.constexpr,
):
    """Index, exact (non-expanded) squared distance to the chosen code, and z_q when ``write_zq``
    (a runtime flag, so a call with z_q runs the very same compiled code and gets the same bits)."""
    code64 = best_i.to(tl.int64)
    # rows taken through best_i (always >= 0): the z addresses are formed here, not shared with the
    # identical ones before the search and kept in registers all through it
    zrows = tl.where(code64 >= 0, rows64, 0)
    score = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        m = row_ok[:, None] & (dk[None, :] < D)
        zc = tl.load(z_ptr + zrows[:, None] * stride_zn + dk[None, :] * stride_zd, mask=m, other=0.0).to(tl.float32)
        if NORMALIZE:
            zc = tl.div_rn(zc, nrm[:, None])
        c = tl.load(cb_ptr + code64[:, None] * D + dk[None, :], mask=m, other=0.0)
        diff = zc - c
        score += tl.reduce(diff * diff, 1, _SUM)
        if write_zq != 0:
            tl.store(zq_ptr + rows64[:, None] * D + dk[None, :], c.to(zq_ptr.dtype.element_ty), mask=m)
    tl.store(idx_ptr + rows64, code64, mask=row_ok)
    tl.store(score_ptr + rows64, score, mask=row_ok)


@triton.jit
def _window(nz, ez, r, csq_m, nct_m, ec_m, D):
    """Half-width W of the candidate window: see the module docstring."""
    nc_m = tl.sqrt_rn(csq_m)
    ncm = tl.maximum(nc_m, nct_m)
    nzt = nz + ez
    g_tc = (D + 16) * 9.5367431640625e-07  # 2^-20
    g_ex = (D + 2) * 1.1920928955078125e-07  # 2^-23
    dot_err = nz * ec_m + ez * nct_m + g_tc * nzt * nct_m + g_ex * nz * nc_m
    mag = csq_m + 2.0 * nzt * ncm + r
    # (1 + 2^-10) absorbs the rounding of this very computation; 2^-100 any underflow
    return 4.0 * dot_err * 1.0009765625 + mag * 1.9073486328125e-06 + 7.888609052210118e-31


@triton.jit
def _vq_prep_codes_kernel(
    cb_ptr,
    cbt_ptr,
    aux_ptr,
    K,
    D,
    stride_cbt,
    OP_KIND: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_PAD: tl.constexpr,
):
    """cbt [K, D_PAD]: codes in the operand type, zero-padded; aux [3, K]: ||c||^2, ||c~||, ||c - c~||."""
    pid = tl.program_id(0)
    codes = pid * BLOCK_K + tl.arange(0, BLOCK_K)
    code_ok = codes < K
    codes64 = codes.to(tl.int64)
    csq = tl.zeros([BLOCK_K], dtype=tl.float32)
    nct2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    ec2 = tl.zeros([BLOCK_K], dtype=tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):
        dims = d0 + tl.arange(0, BLOCK_D)
        c = tl.load(cb_ptr + codes64[:, None] * D + dims[None, :], mask=code_ok[:, None] & (dims[None, :] < D), other=0.0)
        ct = _round_to_operand(c, OP_KIND)
        tl.store(cbt_ptr + codes64[:, None] * stride_cbt + dims[None, :], ct, mask=code_ok[:, None])
        csq += tl.reduce(c * c, 1, _SUM)
        ctf = ct.to(tl.float32)
        nct2 += tl.reduce(ctf * ctf, 1, _SUM)
        ec2 += tl.reduce(_rounding_error_sq(c, ct, OP_KIND), 1, _SUM)
    tl.store(aux_ptr + codes64, csq, mask=code_ok)
    tl.store(aux_ptr + K + codes64, tl.sqrt_rn(nct2), mask=code_ok)
    tl.store(aux_ptr + 2 * K + codes64, tl.sqrt_rn(ec2), mask=code_ok)


@triton.jit
def _code_maxima(aux_ptr, k_lo, k_hi, K, BLOCK_K: tl.constexpr):
    """max ||c||^2, max ||c~|| and max ||c - c~|| over this program's codes."""
    cols = tl.arange(0, BLOCK_K)
    csq_m = tl.zeros([BLOCK_K], dtype=tl.float32)
    nct_m = tl.zeros([BLOCK_K], dtype=tl.float32)
    ec_m = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        codes = k0 + cols
        ok = codes < k_hi
        csq_m = tl.maximum(csq_m, tl.load(aux_ptr + codes, mask=ok, other=0.0))
        nct_m = tl.maximum(nct_m, tl.load(aux_ptr + K + codes, mask=ok, other=0.0))
        ec_m = tl.maximum(ec_m, tl.load(aux_ptr + 2 * K + codes, mask=ok, other=0.0))
    return tl.reduce(csq_m, 0, _MAX), tl.reduce(nct_m, 0, _MAX), tl.reduce(ec_m, 0, _MAX)


@triton.jit
def _exact_distance(z_ptr, cb_ptr, aux_ptr, rows64, code, has, nrm, r, D, stride_zn, stride_zd,
                    NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr, D_PAD: tl.constexpr):
    """fp32 (||c||^2 - 2 z.c) + ||z||^2 of one code per row (rows without ``has`` load nothing):
    the torch reference ranks addmm(code_sq, z, c.T, alpha=-2) + row_sq, the same two roundings."""
    code64 = code.to(tl.int64)
    zc_dot = tl.zeros(rows64.shape, dtype=tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        m = has[:, None] & (dk[None, :] < D)
        # addresses from `has`, formed here: hoisted out of the callers' loops, a rows x BLOCK_D
        # tile of 64-bit addresses per d tile would stay live through the whole search (spills)
        zx = tl.load(z_ptr + tl.where(has, rows64, 0)[:, None] * stride_zn + dk[None, :] * stride_zd,
                     mask=m, other=0.0).to(tl.float32)
        if NORMALIZE:
            zx = tl.div_rn(zx, nrm[:, None])
        c = tl.load(cb_ptr + code64[:, None] * D + dk[None, :], mask=m, other=0.0)
        zc_dot += tl.reduce(zx * c, 1, _SUM)
    csq_c = tl.load(aux_ptr + code64, mask=has, other=0.0)
    return (csq_c - 2.0 * zc_dot) + r


@triton.jit
def _search_small(z_ptr, cb_ptr, cbt_ptr, aux_ptr, rows64, row_ok, nrm, k_lo, k_hi, K, D, stride_zn, stride_zd,
                  stride_cbt, NORMALIZE: tl.constexpr, OP_KIND: tl.constexpr, INTERP: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr):
    """d <= 64: the whole row in registers, fp32 and operand copies; every code under the running
    threshold is re-ranked exactly when its tile is visited (one short fp32 dot from registers)."""
    cols = tl.arange(0, BLOCK_K)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D
    # padded dims (d=12 -> 16) load as 0, so they add nothing to norms or dot products
    z = tl.load(z_ptr + rows64[:, None] * stride_zn + dims[None, :] * stride_zd,
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
    if NORMALIZE:
        z = tl.div_rn(z, nrm[:, None])
    r = tl.reduce(z * z, 1, _SUM)
    zt = _round_to_operand(z, OP_KIND)
    ez = tl.sqrt_rn(tl.reduce(_rounding_error_sq(z, zt, OP_KIND), 1, _SUM))
    if INTERP:
        zt = zt.to(tl.float32)
    csq_m, nct_m, ec_m = _code_maxima(aux_ptr, k_lo, k_hi, K, BLOCK_K)
    win = _window(tl.sqrt_rn(r), ez, r, csq_m, nct_m, ec_m, D)

    b = tl.full([BLOCK_N], float("inf"), tl.float32)  # running minimum of the approximate score
    best_r = tl.full([BLOCK_N], float("inf"), tl.float32)  # exact ranked distance of the best code
    best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
    # each code tile is loaded one trip ahead: the candidate loop nested in this one keeps
    # triton's software pipeliner off it
    nxt = k_lo + cols
    ct_next = tl.load(cbt_ptr + nxt.to(tl.int64)[:, None] * stride_cbt + dims[None, :], mask=(nxt < k_hi)[:, None], other=0.0)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        codes = k0 + cols
        # codes past the end score +inf (inf - 2 * 0), so they never pass the threshold
        csq = tl.load(aux_ptr + codes, mask=codes < k_hi, other=float("inf"))
        ct = ct_next
        nxt = k0 + BLOCK_K + cols
        ct_next = tl.load(cbt_ptr + nxt.to(tl.int64)[:, None] * stride_cbt + dims[None, :], mask=(nxt < k_hi)[:, None], other=0.0)
        if INTERP:
            ct = ct.to(tl.float32)
        s = csq[None, :] - 2.0 * tl.dot(zt, tl.trans(ct), input_precision="tf32")
        b = tl.minimum(b, tl.reduce(s, 1, _MIN))
        thr = b + win
        cand = (s <= thr[:, None]) & row_ok[:, None]
        # candidates in increasing index order, one per row per trip; a row's trips end when its
        # candidates do, the loop when every row's have
        first = tl.reduce(tl.where(cand, cols[None, :], BLOCK_K), 1, _MIN)
        while tl.reduce(first, 0, _MIN) < BLOCK_K:
            has = first < BLOCK_K
            code = k0 + tl.minimum(first, BLOCK_K - 1)
            c = tl.load(cb_ptr + code.to(tl.int64)[:, None] * D + dims[None, :], mask=has[:, None] & dim_ok[None, :], other=0.0)
            csq_c = tl.load(aux_ptr + code, mask=has, other=0.0)
            exact = (csq_c - 2.0 * tl.reduce(z * c, 1, _SUM)) + r
            # strictly smaller only: candidates come in increasing index order, so the first of
            # equal exact distances (the lowest index) stays
            better = has & (exact < best_r)
            best_r = tl.where(better, exact, best_r)
            best_i = tl.where(better, code, best_i)
            first = tl.reduce(tl.where(cand & (cols[None, :] > first[:, None]), cols[None, :], BLOCK_K), 1, _MIN)
    return best_r, best_i


@triton.jit
def _slot_insert(sc, ic, has, thr, s0, i0, s1, i1, s2, i2, s3, i3, ovf):
    """Keep candidate (approximate score sc, index ic) in one of four slots per row: the one with
    the largest score if that is above the current threshold (stale: it can no longer win; an empty
    slot holds +inf). With no stale slot the candidate is dropped and ``ovf`` keeps the lowest
    dropped score: the row needs the rescan only if that is still under the final threshold."""
    m = tl.maximum(tl.maximum(s0, s1), tl.maximum(s2, s3))
    rep = has & (m > thr)
    r0 = rep & (s0 == m)
    r1 = rep & (s1 == m) & (s0 != m)
    r2 = rep & (s2 == m) & (s0 != m) & (s1 != m)
    r3 = rep & (s3 == m) & (s0 != m) & (s1 != m) & (s2 != m)
    s0 = tl.where(r0, sc, s0)
    i0 = tl.where(r0, ic, i0)
    s1 = tl.where(r1, sc, s1)
    i1 = tl.where(r1, ic, i1)
    s2 = tl.where(r2, sc, s2)
    i2 = tl.where(r2, ic, i2)
    s3 = tl.where(r3, sc, s3)
    i3 = tl.where(r3, ic, i3)
    ovf = tl.where(has & (m <= thr), tl.minimum(ovf, sc), ovf)
    return s0, i0, s1, i1, s2, i2, s3, i3, ovf


@triton.jit
def _keep_lowest(e, i, ok, best_r, best_i):
    """(best_r, best_i) <- (e, i) where ok and (e, i) ranks first: lower distance, then lower index."""
    better = ok & ((e < best_r) | ((e == best_r) & (i < best_i)))
    return tl.where(better, e, best_r), tl.where(better, i, best_i)


@triton.jit
def _check_slot(z_ptr, cb_ptr, aux_ptr, rows64, sj, ij, ok, thr, nrm, r, best_r, best_i, D, stride_zn, stride_zd,
                NORMALIZE: tl.constexpr, BLOCK_D: tl.constexpr, D_PAD: tl.constexpr):
    """The exact re-check of one slot, if its code is still under the final threshold (skipped when
    no row's is: after the first slot, most rows have one live candidate)."""
    has = ok & (sj <= thr)
    if tl.reduce(has.to(tl.int32), 0, _MAX) > 0:
        e = _exact_distance(z_ptr, cb_ptr, aux_ptr, rows64, ij, has, nrm, r, D, stride_zn, stride_zd, NORMALIZE,
                            BLOCK_D, D_PAD)
        best_r, best_i = _keep_lowest(e, ij, has, best_r, best_i)
    return best_r, best_i


@triton.jit
def _tile_keys(zt, aux_ptr, ct, k0, k_hi, shift, INTERP: tl.constexpr, BLOCK_K: tl.constexpr):
    """One code tile against the resident row block: the bits of the shifted approximate scores
    x = ||c||^2 + shift - 2 z~.c~ (>= 0), low log2(BLOCK_K) bits replaced by the column."""
    cols = tl.arange(0, BLOCK_K)
    codes = k0 + cols
    # codes past the end score +inf, whose bits with a column are a NaN: never under a threshold
    csq = tl.load(aux_ptr + codes, mask=codes < k_hi, other=float("inf")) + shift
    if INTERP:
        ct = ct.to(tl.float32)
    x = csq[None, :] - 2.0 * tl.dot(zt, tl.trans(ct), input_precision="tf32")
    return (x.to(tl.int32, bitcast=True) & -BLOCK_K) | cols[None, :]


@triton.jit
def _code_tile(cbt_ptr, k0, k_hi, stride_cbt, BLOCK_K: tl.constexpr, D_PAD: tl.constexpr):
    codes = k0 + tl.arange(0, BLOCK_K)
    dims = tl.arange(0, D_PAD)
    return tl.load(cbt_ptr + codes.to(tl.int64)[:, None] * stride_cbt + dims[None, :], mask=(codes < k_hi)[:, None], other=0.0)


@triton.jit
def _search_wide(z_ptr, cb_ptr, cbt_ptr, aux_ptr, rows64, row_ok, nrm, k_lo, k_hi, K, D, stride_zn, stride_zd,
                 stride_cbt, NORMALIZE: tl.constexpr, OP_KIND: tl.constexpr, Z_EPS: tl.constexpr,
                 Z_TINY: tl.constexpr, INTERP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 BLOCK_D: tl.constexpr, D_PAD: tl.constexpr, NUM_STAGES: tl.constexpr = 2):
    """d > 64: the row block, in the operand type, stays resident (loaded once) and the code tiles
    stream through it, one tensor-core dot of the full width per tile. The main loop only collects
    candidates (codes under the running threshold) into four slots per row; the exact fp32
    re-check runs once, after the loop, on the slots still under the final threshold. A row that
    had more than four live candidates at once (duplicate codes, heavy near-ties) gets a rescan
    of the codebook with the final threshold and inline re-checks."""
    cols = tl.arange(0, BLOCK_K)
    dims = tl.arange(0, D_PAD)
    zt = tl.load(z_ptr + rows64[:, None] * stride_zn + dims[None, :] * stride_zd,
                 mask=row_ok[:, None] & (dims[None, :] < D), other=0.0)
    if NORMALIZE:
        zt = tl.div_rn(zt.to(tl.float32), nrm[:, None])
    if OP_KIND == 0:
        zt = zt.to(tl.float32)  # the dot's own fp32 -> tf32 conversion: Z_EPS = 2^-10
    elif OP_KIND == 1:
        zt = zt.to(tl.bfloat16)
    else:
        zt = zt.to(tl.float16)
    if INTERP:
        zt = zt.to(tl.float32)
    # ||z||^2 in d tiles, the order the exact distances use
    r = tl.zeros([BLOCK_N], dtype=tl.float32)
    for d0 in range(0, D_PAD, BLOCK_D):
        dk = d0 + tl.arange(0, BLOCK_D)
        zc = tl.load(z_ptr + rows64[:, None] * stride_zn + dk[None, :] * stride_zd,
                     mask=row_ok[:, None] & (dk[None, :] < D), other=0.0).to(tl.float32)
        if NORMALIZE:
            zc = tl.div_rn(zc, nrm[:, None])
        r += tl.reduce(zc * zc, 1, _SUM)
    ez = Z_EPS * tl.sqrt_rn(r) + Z_TINY * tl.sqrt_rn(D * 1.0)
    nz = tl.sqrt_rn(r)
    csq_m, nct_m, ec_m = _code_maxima(aux_ptr, k_lo, k_hi, K, BLOCK_K)
    win = _window(nz, ez, r, csq_m, nct_m, ec_m, D)
    # Scores are taken shifted by one constant per block, x = s + shift with shift >= r + W, which
    # makes every x >= 0 (the exact x is ||z - c||^2 + shift - r, and x errs by at most W / 2), so
    # x's bits order as integers: the low log2(BLOCK_K) bits can then carry the code's column and
    # one integer minimum gives a row's best code with its score. Cutting those bits lowers an x by
    # at most 2^-17 of its size: the window widens by twice that, for the largest x.
    shift = tl.reduce(r + win, 0, _MAX)
    x_max = shift + csq_m + 2.0 * tl.reduce(nz + ez, 0, _MAX) * tl.maximum(tl.sqrt_rn(csq_m), nct_m)
    win = win + x_max * 1.52587890625e-05  # 2^-16

    inf = tl.full([BLOCK_N], float("inf"), tl.float32)
    zero = tl.zeros([BLOCK_N], dtype=tl.int32)
    b = inf  # running minimum of the (truncated) shifted score
    s0, s1, s2, s3, ovf = inf, inf, inf, inf, inf
    i0, i1, i2, i3 = zero, zero, zero, zero
    for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=NUM_STAGES):
        ct = _code_tile(cbt_ptr, k0, k_hi, stride_cbt, BLOCK_K, D_PAD)
        key = _tile_keys(zt, aux_ptr, ct, k0, k_hi, shift, INTERP, BLOCK_K)
        # the tile's two best codes per row go to the slots when under the threshold; a third
        # under it marks the row for the rescan (the second and third only where some row has a
        # second: rare after the first tiles)
        m1 = tl.reduce(key, 1, _MIN)
        x1 = (m1 & -BLOCK_K).to(tl.float32, bitcast=True)
        b = tl.minimum(b, x1)
        thr = b + win
        m2 = tl.reduce(tl.where(key > m1[:, None], key, 2147483647), 1, _MIN)
        x2 = (m2 & -BLOCK_K).to(tl.float32, bitcast=True)
        s0, i0, s1, i1, s2, i2, s3, i3, ovf = _slot_insert(x1, k0 + (m1 & (BLOCK_K - 1)), row_ok & (x1 <= thr), thr,
                                                           s0, i0, s1, i1, s2, i2, s3, i3, ovf)
        two = row_ok & (x2 <= thr)
        if tl.reduce(two.to(tl.int32), 0, _MAX) > 0:
            s0, i0, s1, i1, s2, i2, s3, i3, ovf = _slot_insert(x2, k0 + (m2 & (BLOCK_K - 1)), two, thr,
                                                               s0, i0, s1, i1, s2, i2, s3, i3, ovf)
            m3 = tl.reduce(tl.where(key > m2[:, None], key, 2147483647), 1, _MIN)
            x3 = (m3 & -BLOCK_K).to(tl.float32, bitcast=True)
            ovf = tl.where(two & (x3 <= thr), tl.minimum(ovf, x3), ovf)

    thr = b + win
    rescan = row_ok & (ovf <= thr)
    best_r, best_i = inf, zero
    ok = row_ok & (ovf > thr)
    best_r, best_i = _check_slot(z_ptr, cb_ptr, aux_ptr, rows64, s0, i0, ok, thr, nrm, r, best_r, best_i, D, stride_zn,
                                 stride_zd, NORMALIZE, BLOCK_D, D_PAD)
    best_r, best_i = _check_slot(z_ptr, cb_ptr, aux_ptr, rows64, s1, i1, ok, thr, nrm, r, best_r, best_i, D, stride_zn,
                                 stride_zd, NORMALIZE, BLOCK_D, D_PAD)
    best_r, best_i = _check_slot(z_ptr, cb_ptr, aux_ptr, rows64, s2, i2, ok, thr, nrm, r, best_r, best_i, D, stride_zn,
                                 stride_zd, NORMALIZE, BLOCK_D, D_PAD)
    best_r, best_i = _check_slot(z_ptr, cb_ptr, aux_ptr, rows64, s3, i3, ok, thr, nrm, r, best_r, best_i, D, stride_zn,
                                 stride_zd, NORMALIZE, BLOCK_D, D_PAD)
    if tl.reduce(rescan.to(tl.int32), 0, _MAX) > 0:
        best_r, best_i = _rescan(z_ptr, cb_ptr, cbt_ptr, aux_ptr, zt, rows64, rescan, nrm, r, shift, thr, best_r, best_i,
                                 k_lo, k_hi, D, stride_zn, stride_zd, stride_cbt, NORMALIZE, INTERP, BLOCK_K, BLOCK_D, D_PAD)
    return best_r, best_i


@triton.jit
def _rescan(z_ptr, cb_ptr, cbt_ptr, aux_ptr, zt, rows64, rescan, nrm, r, shift, thr, best_r, best_i, k_lo, k_hi, D,
            stride_zn, stride_zd, stride_cbt, NORMALIZE: tl.constexpr, INTERP: tl.constexpr, BLOCK_K: tl.constexpr,
            BLOCK_D: tl.constexpr, D_PAD: tl.constexpr):
    """Rows in ``rescan``: every code under the final threshold, re-checked exactly in index order."""
    cols = tl.arange(0, BLOCK_K)
    for k0 in range(k_lo, k_hi, BLOCK_K):
        ct = _code_tile(cbt_ptr, k0, k_hi, stride_cbt, BLOCK_K, D_PAD)
        x = (_tile_keys(zt, aux_ptr, ct, k0, k_hi, shift, INTERP, BLOCK_K) & -BLOCK_K).to(tl.float32, bitcast=True)
        key = tl.where((x <= thr[:, None]) & rescan[:, None], cols[None, :], BLOCK_K)
        first = tl.reduce(key, 1, _MIN)
        while tl.reduce(first, 0, _MIN) < BLOCK_K:
            has = first < BLOCK_K
            code = k0 + tl.minimum(first, BLOCK_K - 1)
            e = _exact_distance(z_ptr, cb_ptr, aux_ptr, rows64, code, has, nrm, r, D, stride_zn, stride_zd, NORMALIZE, BLOCK_D, D_PAD)
            best_r, best_i = _keep_lowest(e, code, has, best_r, best_i)
            first = tl.reduce(tl.where(key > first[:, None], key, BLOCK_K), 1, _MIN)
    return best_r, best_i


# write_zq stays a runtime value: Triton would otherwise specialize 1 to a constant, and a call
# with z_q would run different code (and could get different bits) than one without
@triton.jit(do_not_specialize=["write_zq"])
def _vq_tc_kernel(
    z_ptr,
    cb_ptr,
    cbt_ptr,
    aux_ptr,
    idx_ptr,
    score_ptr,
    zq_ptr,
    part_r_ptr,
    part_i_ptr,
    write_zq,
    N,
    K,
    D,
    stride_zn,
    stride_zd,
    stride_cbt,
    codes_per_split,
    NORMALIZE: tl.constexpr,
    FINAL: tl.constexpr,  # one split: write index and score here; else (distance, index) partials
    OP_KIND: tl.constexpr,  # tensor-core operand type: 0 tf32, 1 bf16, 2 fp16
    Z_EPS: tl.constexpr,  # a priori relative rounding error of z -> operand (wide path)
    Z_TINY: tl.constexpr,  # smallest normal of the operand type (flush-to-zero term)
    INTERP: tl.constexpr,  # the interpreter's dot is wrong on 16-bit operands: upcast there
    WIDE: tl.constexpr,  # d > 64: resident operand row block, deferred re-check (_search_wide)
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,  # the whole padded row (small path) or the d tile of the exact dots
    D_PAD: tl.constexpr,
    TENSOR_CORES: tl.constexpr = True,  # tells benchmarks/aot_check.py to require mma/wgmma
):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # int64 offsets: N * stride can pass 2**31 for large batches of strided views
    rows64 = rows.to(tl.int64)
    k_lo = pid_s * codes_per_split
    k_hi = tl.minimum(k_lo + codes_per_split, K)
    nrm = _row_norm(z_ptr, rows64, row_ok, D, stride_zn, stride_zd, NORMALIZE, BLOCK_N, BLOCK_D, D_PAD)
    if WIDE:
        best_r, best_i = _search_wide(z_ptr, cb_ptr, cbt_ptr, aux_ptr, rows64, row_ok, nrm, k_lo, k_hi, K, D,
                                      stride_zn, stride_zd, stride_cbt, NORMALIZE, OP_KIND, Z_EPS, Z_TINY, INTERP,
                                      BLOCK_N, BLOCK_K, BLOCK_D, D_PAD)
    else:
        best_r, best_i = _search_small(z_ptr, cb_ptr, cbt_ptr, aux_ptr, rows64, row_ok, nrm, k_lo, k_hi, K, D,
                                       stride_zn, stride_zd, stride_cbt, NORMALIZE, OP_KIND, INTERP, BLOCK_N,
                                       BLOCK_K, BLOCK_D)
    if FINAL:
        _write_result(
            z_ptr, cb_ptr, idx_ptr, score_ptr, zq_ptr, write_zq, rows64, row_ok, best_i, nrm, D, stride_zn, stride_zd,
            NORMALIZE, BLOCK_N, BLOCK_D, D_PAD,
        )
    else:
        part = pid_s.to(tl.int64) * N + rows64
        tl.store(part_r_ptr + part, best_r, mask=row_ok)
        tl.store(part_i_ptr + part, best_i, mask=row_ok)


@triton.jit(do_not_specialize=["write_zq", "SPLITS"])
def _vq_finalize_kernel(
    z_ptr,
    cb_ptr,
    part_r_ptr,
    part_i_ptr,
    idx_ptr,
    score_ptr,
    zq_ptr,
    write_zq,
    N,
    D,
    stride_zn,
    stride_zd,
    SPLITS,
    NORMALIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    D_PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    rows64 = rows.to(tl.int64)
    best_r = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_i = tl.zeros([BLOCK_N], dtype=tl.int32)
    # splits hold increasing index ranges: the first strict minimum is the lowest index of a tie
    part = rows64  # int64: SPLITS * N may pass 2**31
    for s in range(0, SPLITS):
        rs = tl.load(part_r_ptr + part, mask=row_ok, other=float("inf"))
        i_s = tl.load(part_i_ptr + part, mask=row_ok, other=0)
        part += N
        better = rs < best_r
        best_r = tl.where(better, rs, best_r)
        best_i = tl.where(better, i_s, best_i)
    nrm = _row_norm(z_ptr, rows64, row_ok, D, stride_zn, stride_zd, NORMALIZE, BLOCK_N, BLOCK_D, D_PAD)
    _write_result(
        z_ptr, cb_ptr, idx_ptr, score_ptr, zq_ptr, write_zq, rows64, row_ok, best_i, nrm, D, stride_zn, stride_zd,
        NORMALIZE, BLOCK_N, BLOCK_D, D_PAD,
    )


# ---------------------------------------------------------------------------------------------
# launch configuration

# (BLOCK_N, BLOCK_K, num_warps, num_stages) by padded d on a GPU, up to d=64: the row stays whole
# in registers (BLOCK_D = padded d).
_GPU_SMALL = {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 2)}
# Above (_search_wide), by operand bytes and architecture (wgmma reads the resident block from
# shared memory on sm_90; mma.sync holds it in registers on sm_80 / sm_89): (BLOCK_N, BLOCK_K,
# num_warps) at D_PAD = 256. 16-bit on sm_90: 128 rows (two warpgroups), a 64 KB resident block and
# 32 KB code tiles. In registers the block costs 64 registers a thread at 64 rows and 4 warps: with
# 64-code tiles beside it sm_80 compiles clean (216 registers under triton 3.9, 255 under 3.6) but
# sm_89 (and sm_86, same register file, 99 KB of shared memory) spilled 16 B under 3.6 (8 warps:
# clean but one CTA per SM), so 32-code tiles there. fp32 (tf32): 64 rows, 32-code tiles (64-code
# tiles spilled 36 B on sm_90). Wider rows shrink both in proportion (_pick_config). BLOCK_D = 32
# is the d tile of the exact fp32 dots (64 would carry 64-bit address tiles across them and spill
# on sm_80/89).
_GPU_WIDE = {
    (4, "sm90"): (64, 32, 4), (2, "sm90"): (128, 64, 8),
    (4, "sm80"): (64, 32, 4), (2, "sm80"): (64, 64, 4),
    (4, "sm89"): (64, 32, 4), (2, "sm89"): (64, 32, 4),
}
_WIDE_BLOCK_D = 32
# An explicit register cap: without one ptxas aims at an occupancy step (128 or 168 registers) and
# may spill to reach it (seen on sm_80 and sm_89). 128 keeps four 4-warp programs per SM where that
# fits without spilling (d <= 16); at d = 32 the fp32 (tf32) variants need ~185-200, so 192; 255
# leaves the choice to ptxas.
_GPU_MAXNREG = {16: 128, 32: 192, 64: 255, "wide": 255}
# ...but the fp32 (tf32) variant at d <= 16 spills 12 B at 128 on sm_90 under triton 3.6 (three
# programs per SM then, as at d = 32)
_GPU_MAXNREG_TF32_16 = 168
_FINALIZE_MAXNREG = 255
_FINALIZE_GPU = (64, 4)
_PREP_GPU = (64, 4)
# The interpreter pays per op, not per element: big tiles mean few programs and few loop trips.
# One fixed config there (autotuning with several configs crashes under the interpreter).
_INTERP_SMALL = (256, 1024)
_INTERP_WIDE = (256, 1024, 128)
_FINALIZE_INTERP = (1024, 1)
_PREP_INTERP = (1024, 1)

# A fixed codebook split (tests set it to exercise the split path under the interpreter).
SPLIT_OVERRIDE: int | None = None
# programs aimed for per SM: enough warps to hide latency (4 warps each) and a short last wave
_CTAS_PER_SM = 3
_MAX_SPLITS = 16
_OP_KIND = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
# a priori relative error of z's conversion to the operand type (wide path only)
_Z_EPS = {0: 2.0**-10, 1: 2.0**-8, 2: 2.0**-11}
_Z_TINY = {0: 2.0**-126, 1: 2.0**-126, 2: 2.0**-14}


def _pick_config(d: int, op_bytes: int = 2, arch: str = "sm90") -> dict:
    """Tile sizes for a row width d, tensor-core operand width (4: tf32, 2: bf16 / fp16) and
    architecture (``_arch``): the same dict on every call with the same arguments."""
    small = next_power_of_2(max(d, 16)) <= _SMALL_D_MAX
    d_pad = max(16, next_power_of_2(d))  # tl.dot needs at least 16 along the reduction
    if is_interpreting():
        if small:
            bn, bk = _INTERP_SMALL
            bd = d_pad
        else:
            bn, bk, bd = _INTERP_WIDE
        warps, stages = 1, 1
    elif small:
        bd = d_pad
        bn, bk, warps, stages = _GPU_SMALL[bd]
    else:
        bn, bk, warps = _GPU_WIDE[(op_bytes, arch)]
        shrink = max(1, d_pad // 256)  # same bytes per resident block and per code tile
        bn, bk, bd, stages = max(16, bn // shrink), max(16, bk // shrink), _WIDE_BLOCK_D, 1
        warps = warps if shrink == 1 else 4
    cfg = dict(BLOCK_N=bn, BLOCK_K=bk, BLOCK_D=bd, D_PAD=d_pad, WIDE=not small, num_warps=warps, num_stages=stages)
    if not is_interpreting():
        cfg["maxnreg"] = _GPU_MAXNREG[bd if small else "wide"]
        if small and bd == 16 and op_bytes == 4:
            cfg["maxnreg"] = _GPU_MAXNREG_TF32_16
    return cfg


def _launch_options(cfg: dict) -> dict:
    return {k: cfg[k] for k in ("num_warps", "num_stages", "maxnreg") if k in cfg}


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(device_index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device_index)


def _arch(device: torch.device) -> str:
    """"sm90" (sm_90 or newer), "sm80" (A100's 163 KB of shared memory) or "sm89" (sm_86 / sm_89);
    "sm90" where no GPU answers (the interpreter ignores the choice)."""
    try:
        # meta tensors: an ahead-of-time check that presents a GPU through torch.cuda
        if device.type == "meta" and not is_interpreting():
            cap = torch.cuda.get_device_capability()
        elif device.type == "cuda":
            cap = _capability(device.index if device.index is not None else torch.cuda.current_device())
        else:
            return "sm90"
    except (AssertionError, RuntimeError):  # no CUDA here
        return "sm90"
    return "sm90" if cap[0] >= 9 else ("sm80" if cap == (8, 0) else "sm89")


def _num_sms(device: torch.device) -> int:
    # meta tensors: an ahead-of-time check that presents a GPU through torch.cuda
    if device.type == "cuda" or (device.type == "meta" and not is_interpreting()):
        try:
            return _sm_count(device.index if device.index is not None else torch.cuda.current_device())
        except (AssertionError, RuntimeError):  # no CUDA here
            pass
    return 132  # an H100/H200


def _pick_splits(n: int, k: int, block_n: int, block_k: int, device: torch.device) -> int:
    """Codebook splits: enough programs to fill the GPU when there are few row blocks.

    N = 8,192 rows at BLOCK_N = 64 is 128 row blocks, under one per SM of a 132-SM H200 and with a
    single 4-warp program per SM too few warps to hide latency; splitting K = 4,096 in 4 gives
    512 programs of 16 tiles (~3.9 per SM, all resident at once). Splitting K rather than shrinking
    the row block keeps the 64-row tile the tensor cores (wgmma's M = 64) want and also fills the
    GPU at N = 1,024. Each split keeps at least 2 code tiles so the per-program setup stays small.
    """
    tiles = cdiv(k, block_k)
    if SPLIT_OVERRIDE is not None:
        return max(1, min(int(SPLIT_OVERRIDE), tiles))
    if is_interpreting():
        return 1
    row_blocks = cdiv(n, block_n)
    want = cdiv(_CTAS_PER_SM * _num_sms(device), row_blocks)
    return max(1, min(want, tiles // 2, _MAX_SPLITS))


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Every output and scratch buffer comes from here (tests poison them to catch unwritten
    elements)."""
    return torch.empty(shape, dtype=dtype, device=device)


def prepare_codebook(codebook: torch.Tensor, normalize: bool) -> torch.Tensor:
    """fp32, contiguous, l2-normalized when ``normalize``: done once per call on the host (K x d)."""
    # contiguous before the norm: a strided reduction may sum in another order and change the bits
    cb = codebook.detach().to(torch.float32).contiguous()
    if normalize:
        cb = cb / cb.norm(dim=1, keepdim=True).clamp_min(_NORM_EPS)
    return cb.contiguous()


def vq_nearest_triton(
    z: torch.Tensor, codebook: torch.Tensor, normalize: bool, return_zq: bool = False
) -> tuple[torch.Tensor, ...]:
    """(indices int64 [N], score float32 [N]) and, with ``return_zq``, z_q float32 [N, d].

    ``z`` [N, d] may be strided and fp16/bf16/fp32; ``codebook`` [K, d]. No input validation: the
    caller (alit_fast.ops.vq) does it. No host sync and no host-to-device copy: every buffer is
    allocated on z's device and every choice depends on shapes only.
    """
    n, d = z.shape
    k = codebook.shape[0]
    cb = prepare_codebook(codebook, normalize)
    dev = z.device
    indices = _alloc((n,), torch.int64, dev)
    score = _alloc((n,), torch.float32, dev)
    zq = _alloc((n, d) if return_zq else (0, d), torch.float32, dev)
    if n == 0:
        return (indices, score, zq) if return_zq else (indices, score)
    # contiguous, as the torch reference does: a strided view and its copy then run the same
    # compiled kernel and get the same bits (a device copy, only for strided inputs)
    z = z.detach().contiguous()
    if z.dtype not in _OP_KIND:
        z = z.float()
    interp = is_interpreting()
    op_kind = _OP_KIND[z.dtype]
    cfg = _pick_config(d, 4 if op_kind == 0 else 2, _arch(dev) if d > _SMALL_D_MAX else "sm90")
    bn, bk, bd, d_pad = cfg["BLOCK_N"], cfg["BLOCK_K"], cfg["BLOCK_D"], cfg["D_PAD"]
    op_dtype = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16}[op_kind]

    cbt = _alloc((k, d_pad), op_dtype, dev)
    aux = _alloc((3, k), torch.float32, dev)
    pbk, pwarps = _PREP_INTERP if interp else _PREP_GPU
    _vq_prep_codes_kernel[(cdiv(k, pbk),)](
        cb, cbt, aux, k, d, d_pad, OP_KIND=op_kind, BLOCK_K=pbk, BLOCK_D=bd, D_PAD=d_pad, num_warps=pwarps,
    )

    splits = _pick_splits(n, k, bn, bk, dev)
    codes_per_split = cdiv(cdiv(k, splits), bk) * bk
    splits = cdiv(k, codes_per_split)  # no empty split
    final = splits == 1
    if final:
        part_r = part_i = score  # never touched
    else:
        part_r = _alloc((splits, n), torch.float32, dev)
        part_i = _alloc((splits, n), torch.int32, dev)
    zq_arg = zq if return_zq else score  # never written when write_zq is 0
    # a priori z error (used on the wide path only): none when z already is the operand type
    z_eps = 0.0 if (op_kind != 0 and not normalize) else _Z_EPS[op_kind]
    _vq_tc_kernel[(cdiv(n, bn), splits)](
        z, cb, cbt, aux, indices, score, zq_arg, part_r, part_i, int(return_zq),
        n, k, d, z.stride(0), z.stride(1), d_pad, codes_per_split,
        NORMALIZE=bool(normalize),
        FINAL=final,
        OP_KIND=op_kind,
        Z_EPS=z_eps,
        Z_TINY=_Z_TINY[op_kind],
        INTERP=interp,
        WIDE=cfg["WIDE"],
        BLOCK_N=bn,
        BLOCK_K=bk,
        BLOCK_D=bd,
        D_PAD=d_pad,
        **_launch_options(cfg),
    )
    if not final:
        fbn, fwarps = _FINALIZE_INTERP if interp else _FINALIZE_GPU
        _vq_finalize_kernel[(cdiv(n, fbn),)](
            z, cb, part_r, part_i, indices, score, zq_arg, int(return_zq),
            n, d, z.stride(0), z.stride(1), splits,
            NORMALIZE=bool(normalize), BLOCK_N=fbn, BLOCK_D=bd, D_PAD=d_pad, num_warps=fwarps,
            **({} if interp else {"maxnreg": _FINALIZE_MAXNREG}),
        )
    return (indices, score, zq) if return_zq else (indices, score)
