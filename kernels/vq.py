"""Fused nearest-code search: argmin_k ||z_n - c_k||^2 without an N x K distance matrix.

Each program owns a block of rows of z and streams the codebook through in tiles, keeping only a
running (best partial distance, best index) per row, so memory is O(BLOCK_N x BLOCK_K) per program
however large N and K are. The 65,536 x 4,096 fp32 matrix the plain form needs (1 GiB) never exists.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import cdiv, is_interpreting, next_power_of_2

# F.normalize's floor on the norm; the same value keeps both backends choosing the same codes for
# (near-)zero rows.
_NORM_EPS = 1e-12


@triton.jit
def _vq_nearest_kernel(
    z_ptr,
    cb_ptr,
    idx_ptr,
    score_ptr,
    zq_ptr,
    N,
    K,
    D,
    stride_zn,
    stride_zd,
    NORMALIZE: tl.constexpr,
    WRITE_ZQ: tl.constexpr,
    IEEE_DOT: tl.constexpr,  # False only under the interpreter
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < N
    # int64 offsets: N * stride can pass 2**31 for large batches of strided views
    rows64 = rows.to(tl.int64)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < D

    # padded dims (d=12 -> 16) load as 0, so they add nothing to norms or dot products
    z = tl.load(
        z_ptr + rows64[:, None] * stride_zn + dims[None, :] * stride_zd,
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    ).to(tl.float32)
    if NORMALIZE:
        norm = tl.sqrt(tl.sum(z * z, axis=1))
        z = z / tl.maximum(norm, 1e-12)[:, None]

    # ||z||^2 is the same for every code of a row, so the search ranks ||c||^2 - 2 z.c alone and the
    # exact score is recomputed from the winning code at the end
    best = tl.full([BLOCK_N], float("inf"), tl.float32)
    best_idx = tl.zeros([BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        codes_k = k0 + tl.arange(0, BLOCK_K)
        code_ok = codes_k < K
        c = tl.load(
            cb_ptr + codes_k[:, None] * D + dims[None, :],
            mask=code_ok[:, None] & dim_ok[None, :],
            other=0.0,
        )
        c_sq = tl.sum(c * c, axis=1)
        if IEEE_DOT:
            # tf32 would round operands to 10 mantissa bits: too coarse to pick the true nearest code
            zc = tl.dot(z, tl.trans(c), input_precision="ieee")
        else:
            # The interpreter's numpy matmul rounds differently at different tile positions, so two
            # copies of one code could land an ulp apart and break the lowest-index tie-break. In
            # fp64 those differences vanish when rounded back to fp32, as the GPU's in-order fp32
            # FMA chain gives every column the same bits.
            zc = tl.dot(z.to(tl.float64), tl.trans(c.to(tl.float64))).to(tl.float32)
        partial = c_sq[None, :] - 2.0 * zc
        partial = tl.where(code_ok[None, :], partial, float("inf"))
        # first minimum within the tile, as torch.argmin; across tiles only a strictly smaller
        # value wins, so an earlier (lower-index) tie is kept
        tile_best, tile_arg = tl.min(partial, axis=1, return_indices=True, return_indices_tie_break_left=True)
        better = tile_best < best
        best = tl.where(better, tile_best, best)
        best_idx = tl.where(better, tile_arg + k0, best_idx)

    # exact (non-expanded) distance to the chosen code: no cancellation, and it is also z_q
    c_best = tl.load(
        cb_ptr + best_idx.to(tl.int64)[:, None] * D + dims[None, :],
        mask=row_ok[:, None] & dim_ok[None, :],
        other=0.0,
    )
    diff = z - c_best
    score = tl.sum(diff * diff, axis=1)
    tl.store(idx_ptr + rows64, best_idx.to(tl.int64), mask=row_ok)
    tl.store(score_ptr + rows64, score, mask=row_ok)
    if WRITE_ZQ:
        tl.store(
            zq_ptr + rows64[:, None] * D + dims[None, :],
            c_best.to(zq_ptr.dtype.element_ty),
            mask=row_ok[:, None] & dim_ok[None, :],
        )


# (BLOCK_N, BLOCK_K, num_warps) by padded d on a GPU. The whole (padded) row stays in registers,
# so the tiles shrink as d grows.
_GPU_CONFIGS = {
    16: (128, 128, 4),
    32: (128, 128, 4),
    64: (128, 64, 4),
    128: (64, 64, 4),
    256: (64, 64, 8),
}
# The interpreter pays per op, not per element: big tiles mean few programs and few loop trips.
# One fixed config there (autotuning with several configs crashes under the interpreter).
_INTERP_CONFIG = (256, 512, 1)


def _pick_config(block_d: int) -> tuple[int, int, int]:
    if is_interpreting():
        return _INTERP_CONFIG
    if block_d in _GPU_CONFIGS:
        return _GPU_CONFIGS[block_d]
    return (32, 32, 8)


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
    caller (alit_fast.ops.vq) does it.
    """
    n, d = z.shape
    k = codebook.shape[0]
    cb = prepare_codebook(codebook, normalize)
    indices = torch.empty(n, dtype=torch.int64, device=z.device)
    score = torch.empty(n, dtype=torch.float32, device=z.device)
    zq = torch.empty((n, d) if return_zq else (0, d), dtype=torch.float32, device=z.device)
    if n > 0:
        z = z.detach()
        block_d = max(16, next_power_of_2(d))  # tl.dot needs at least 16 along the reduction
        block_n, block_k, num_warps = _pick_config(block_d)
        interp = is_interpreting()
        _vq_nearest_kernel[(cdiv(n, block_n),)](
            z,
            cb,
            indices,
            score,
            zq if return_zq else score,  # never written when WRITE_ZQ is off
            n,
            k,
            d,
            z.stride(0),
            z.stride(1),
            NORMALIZE=bool(normalize),
            WRITE_ZQ=bool(return_zq),
            IEEE_DOT=not interp,
            BLOCK_N=block_n,
            BLOCK_K=block_k,
            BLOCK_D=block_d,
            num_warps=num_warps,
        )
    return (indices, score, zq) if return_zq else (indices, score)
