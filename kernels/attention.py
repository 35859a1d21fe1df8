"""FlashAttention-2-style non-causal attention in Triton: forward, backward, per-sample lengths.

Layout: q, k, v are [B, L, H, D] with arbitrary strides (the model hands in views of its packed
in-projection output, so no copy is made here); out / dq / dk / dv are written [B, L, H, D];
lse and delta are fp32 [B, H, L] contiguous. The softmax scale is 1/sqrt(D).

With ``lengths`` (int32 [B]) only the first lengths[b] tokens of sample b take part: every load of
a token past that length is masked to 0 (so garbage, even NaN, in padded rows cannot leak), its
scores are -inf, and its out / dq / dk / dv rows are written as exact zeros.

This module knows nothing of autograd or nn.Module; ``alit_fast.ops.attention`` wraps it.
TRITON_INTERPRET must be set before this module is imported for the CPU interpreter to be used.
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ._utils import cdiv, gpu_capability, is_interpreting, next_power_of_2

__all__ = ["flash_attn_fwd", "flash_attn_bwd", "MIN_HEAD_DIM", "MAX_HEAD_DIM", "SUPPORTED_DTYPES"]

MIN_HEAD_DIM = 32
MAX_HEAD_DIM = 128
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

_LOG2E = 1.4426950408889634

# Test hook: when True, every buffer a launcher allocates (out, lse, delta, dq, dk, dv) starts as
# NaN instead of uninitialised memory, so a test can prove each element is written by a kernel.
POISON_OUTPUTS = False


def _alloc(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    if POISON_OUTPUTS:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------


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
def _fwd_kernel(
    Q, K, V, Out, Lse, Lengths,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_ob, s_ol, s_oh, s_od,
    H, L, D, qk_scale,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
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
    o_base = Out + b64 * s_ob + h * s_oh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < seqlen

    q = tl.load(q_base + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd,
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)

    # m_i is kept in log2 units (scores pre-multiplied by log2(e)) so the inner loop uses exp2
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)

    # a query tile entirely past the sample's length does no work; its rows are zeroed below
    hi = tl.where(pid_m * BLOCK_M < seqlen, seqlen, 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seqlen
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * s_kl + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vl + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        # every tile visited holds at least one valid key (start_n < seqlen), so m_new is finite
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new

    l_safe = tl.where(l_i > 0.0, l_i, 1.0)
    o = tl.where(m_ok[:, None], acc / l_safe[:, None], 0.0)
    row_in = offs_m < L
    tl.store(o_base + offs_m[:, None] * s_ol + offs_d[None, :] * s_od,
             o.to(Out.dtype.element_ty), mask=row_in[:, None] & d_ok[None, :])
    lse = tl.where(m_ok, (m_i + tl.math.log2(l_safe)) * 0.6931471805599453, 0.0)
    tl.store(Lse + pid_bh.to(tl.int64) * L + offs_m, lse, mask=row_in)


@triton.jit
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
def _bwd_dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, Lengths,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_gb, s_gl, s_gh, s_gd,
    s_dkb, s_dkl, s_dkh, s_dkd,
    s_dvb, s_dvl, s_dvh, s_dvd,
    H, L, D, sm_scale, qk_scale,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    # one program owns a block of keys and streams every query block past it, so dk / dv are
    # accumulated in registers without atomics; dq is done by a separate kernel for the same reason
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
    row_base = pid_bh.to(tl.int64) * L

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    n_ok = offs_n < seqlen
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(k_base + offs_n[:, None] * s_kl + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + offs_n[:, None] * s_vl + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    hi = tl.where(pid_n * BLOCK_N < seqlen, seqlen, 0)
    for start_m in range(0, hi, BLOCK_M):
        rows = start_m + offs_m
        m_ok = rows < seqlen
        qmask = m_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * s_ql + offs_d[None, :] * s_qd, mask=qmask, other=0.0)
        do = tl.load(g_base + rows[:, None] * s_gl + offs_d[None, :] * s_gd, mask=qmask, other=0.0)
        if UPCAST:
            q = q.to(tl.float32)
            do = do.to(tl.float32)
        lse2 = tl.load(Lse + row_base + rows, mask=m_ok, other=0.0) * 1.4426950408889634
        delta = tl.load(Delta + row_base + rows, mask=m_ok, other=0.0)
        # transposed tile [N, M]: keeps the key block as the row dimension of every product
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        p_t = tl.math.exp2(s_t - lse2[None, :])
        p_t = tl.where(n_ok[:, None] & m_ok[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=DOT_PREC)
    dk = dk * sm_scale

    out_mask = (offs_n < L)[:, None] & d_ok[None, :]
    tl.store(DK + b64 * s_dkb + h * s_dkh + offs_n[:, None] * s_dkl + offs_d[None, :] * s_dkd,
             dk.to(DK.dtype.element_ty), mask=out_mask)
    tl.store(DV + b64 * s_dvb + h * s_dvh + offs_n[:, None] * s_dvl + offs_d[None, :] * s_dvd,
             dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, Lengths,
    s_qb, s_ql, s_qh, s_qd,
    s_kb, s_kl, s_kh, s_kd,
    s_vb, s_vl, s_vh, s_vd,
    s_gb, s_gl, s_gh, s_gd,
    s_dqb, s_dql, s_dqh, s_dqd,
    H, L, D, sm_scale, qk_scale,
    HAS_LENGTHS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PREC: tl.constexpr,
):
    pid_m = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.program_id(2)
    pid_bh = b * H + h
    seqlen = _seqlen(Lengths, b, L, HAS_LENGTHS)
    b64 = b.to(tl.int64)
    k_base = K + b64 * s_kb + h * s_kh
    v_base = V + b64 * s_vb + h * s_vh
    row_base = pid_bh.to(tl.int64) * L

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < D
    m_ok = offs_m < seqlen
    qmask = m_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b64 * s_qb + h * s_qh + offs_m[:, None] * s_ql + offs_d[None, :] * s_qd,
                mask=qmask, other=0.0)
    do = tl.load(DO + b64 * s_gb + h * s_gh + offs_m[:, None] * s_gl + offs_d[None, :] * s_gd,
                 mask=qmask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse2 = tl.load(Lse + row_base + offs_m, mask=m_ok, other=0.0) * 1.4426950408889634
    delta = tl.load(Delta + row_base + offs_m, mask=m_ok, other=0.0)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    hi = tl.where(pid_m * BLOCK_M < seqlen, seqlen, 0)
    for start_n in range(0, hi, BLOCK_N):
        cols = start_n + offs_n
        n_ok = cols < seqlen
        kv_mask = n_ok[:, None] & d_ok[None, :]
        k = tl.load(k_base + cols[:, None] * s_kl + offs_d[None, :] * s_kd, mask=kv_mask, other=0.0)
        v = tl.load(v_base + cols[:, None] * s_vl + offs_d[None, :] * s_vd, mask=kv_mask, other=0.0)
        if UPCAST:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
        p = tl.math.exp2(s - lse2[:, None])
        p = tl.where(m_ok[:, None] & n_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    dq = dq * sm_scale
    tl.store(DQ + b64 * s_dqb + h * s_dqh + offs_m[:, None] * s_dql + offs_d[None, :] * s_dqd,
             dq.to(DQ.dtype.element_ty), mask=(offs_m < L)[:, None] & d_ok[None, :])


# --------------------------------------------------------------------------------------------
# block-size table
# --------------------------------------------------------------------------------------------


def _configs(head_dim: int, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[int, int, int, int]]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel: "fwd", "dkdv", "dq".

    For "dkdv" BLOCK_N is the resident key block and BLOCK_M the streamed query block.
    The GPU rows are untuned starting points: compiled for sm_80/86/90 each needs at most ~70 KB
    of shared memory (fp32 tiles are twice as large, so they get fewer rows), but none has been
    benchmarked on hardware yet.
    """
    if is_interpreting():
        # one fixed config: multi-config autotuning crashes the interpreter, and 64-row tiles keep
        # the number of (slow, Python-level) program instances small while still testing tails
        c = (64, 64, 4, 1)
        return {"fwd": c, "dkdv": c, "dq": c}
    cap = gpu_capability(device) or (8, 0)
    big_d = head_dim > 64
    if cap[0] < 8:  # pre-Ampere: 64 KB of shared memory per block
        c = (32, 32, 4, 1) if dtype == torch.float32 else (64, 32, 4, 2)
        return {"fwd": c, "dkdv": c, "dq": c}
    if dtype == torch.float32:
        c = (32, 32, 4, 2) if big_d else (64, 32, 4, 2)
        return {"fwd": c, "dkdv": c, "dq": c}
    if cap[0] >= 9:
        fwd = (128, 64, 8, 3) if big_d else (128, 128, 8, 3)
    else:
        fwd = (128, 64, 8, 3) if big_d else (128, 64, 4, 3)
    dkdv = (32, 64, 4, 2) if big_d else (64, 64, 4, 2)
    dq = (64, 32, 4, 2) if big_d else (64, 64, 4, 2)
    return {"fwd": fwd, "dkdv": dkdv, "dq": dq}


def _dot_flags(dtype: torch.dtype) -> tuple[bool, str]:
    """(UPCAST, DOT_PREC).

    Under the triton 3.9 interpreter tl.dot on 16-bit operands returns garbage, so operands are
    upcast to fp32 there; on a GPU the native 16-bit tensor-core dot is kept. fp32 inputs use
    exact fp32 products ("ieee") rather than tf32 so the fp32 path stays a faithful reference.
    """
    return is_interpreting(), "ieee"


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

    Inputs are assumed validated by the caller (``alit_fast.ops.attention``). ``out`` / ``lse``
    may be passed in (any strides for ``out``; ``lse`` contiguous), e.g. pre-filled with NaN by a
    test to prove every element is written.
    """
    B, L, H, D = q.shape
    if out is None:
        out = _alloc((B, L, H, D), q.dtype, q.device)
    else:
        _check_buffer(out, (B, L, H, D), q.dtype, q.device, "out")
    if lse is None:
        lse = _alloc((B, H, L), torch.float32, q.device)
    else:
        _check_buffer(lse, (B, H, L), torch.float32, q.device, "lse")
        if not lse.is_contiguous():
            raise ValueError("lse buffer must be contiguous")
    if B * H * L == 0:
        return out, lse
    bm, bn, warps, stages = _configs(D, q.dtype, q.device)["fwd"]
    upcast, prec = _dot_flags(q.dtype)
    has_len = lengths is not None
    len_arg = lengths if has_len else q  # any pointer; never read when HAS_LENGTHS is False
    # batch on the z axis (limit 65535) rather than B*H on y, which large batches would overflow
    grid = (cdiv(L, bm), H, B)
    _fwd_kernel[grid](
        q, k, v, out, lse, len_arg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out),
        H, L, D, _LOG2E / math.sqrt(D),
        HAS_LENGTHS=has_len, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=next_power_of_2(D),
        UPCAST=upcast, DOT_PREC=prec, num_warps=warps, num_stages=stages,
    )
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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch delta, dk/dv and dq kernels. Returns (dq, dk, dv), each [B, L, H, D] in q's dtype.

    ``grad_out`` and ``out`` may have any strides; ``lse`` is the fp32 [B, H, L] from the forward.
    """
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
    cfg = _configs(D, q.dtype, q.device)
    upcast, prec = _dot_flags(q.dtype)
    has_len = lengths is not None
    len_arg = lengths if has_len else q
    block_d = next_power_of_2(D)
    sm_scale = 1.0 / math.sqrt(D)

    bm_delta = 64
    _bwd_delta_kernel[(cdiv(L, bm_delta), H, B)](
        out, grad_out, delta, len_arg, *_strides(out), *_strides(grad_out), H, L, D,
        HAS_LENGTHS=has_len, BLOCK_M=bm_delta, BLOCK_D=block_d,
    )

    bm, bn, warps, stages = cfg["dkdv"]
    _bwd_dkdv_kernel[(cdiv(L, bn), H, B)](
        q, k, v, grad_out, lse, delta, dk, dv, len_arg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dk), *_strides(dv),
        H, L, D, sm_scale, sm_scale * _LOG2E,
        HAS_LENGTHS=has_len, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        UPCAST=upcast, DOT_PREC=prec, num_warps=warps, num_stages=stages,
    )

    bm, bn, warps, stages = cfg["dq"]
    _bwd_dq_kernel[(cdiv(L, bm), H, B)](
        q, k, v, grad_out, lse, delta, dq, len_arg,
        *_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq),
        H, L, D, sm_scale, sm_scale * _LOG2E,
        HAS_LENGTHS=has_len, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d,
        UPCAST=upcast, DOT_PREC=prec, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv
