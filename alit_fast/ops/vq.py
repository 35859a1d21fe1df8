"""Nearest-codebook lookup: for every row of z, the index of the closest code.

``normalize=True`` compares l2-normalized rows and codes (the ALIT latent quantizer, cosine);
``normalize=False`` compares raw vectors by squared distance (the VQGAN quantizer).
The score returned is the squared distance between the (normalized) row and its chosen code.
Ties resolve to the lowest index, as torch.argmin does. No gradient flows through the lookup.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

# rows per chunk in the torch path: memory stays O(chunk x K) instead of O(N x K)
TORCH_CHUNK_ROWS = 4096


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor) -> None:
    if z.dim() != 2 or codebook.dim() != 2:
        raise ValueError(f"vq_nearest expects z [N, d] and codebook [K, d], got {tuple(z.shape)} and {tuple(codebook.shape)}")
    if z.shape[1] != codebook.shape[1]:
        raise ValueError(f"vq_nearest: z has d={z.shape[1]} but the codebook has d={codebook.shape[1]}")
    if codebook.shape[0] == 0:
        raise ValueError("vq_nearest: the codebook is empty (K=0)")
    if not z.is_floating_point() or not codebook.is_floating_point():
        raise ValueError(f"vq_nearest expects floating tensors, got z {z.dtype} and codebook {codebook.dtype}")
    if z.device != codebook.device:
        raise ValueError(f"vq_nearest: z is on {z.device} but the codebook is on {codebook.device}")
    # a NaN row has no nearest code (argmin would silently answer 0); the check costs one reduction
    # and a host sync, and is skipped while torch.compile traces (a data-dependent branch there
    # would break the graph)
    if not torch.compiler.is_compiling():
        if torch.isnan(z).any():
            raise ValueError("vq_nearest: z contains NaN")
        if torch.isnan(codebook).any():
            raise ValueError("vq_nearest: the codebook contains NaN")


def vq_nearest_reference(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend: the distance matrix built chunk by chunk, in fp32."""
    _check_inputs(z, codebook)
    # contiguous so a strided z takes the same BLAS path, and gives the same bits, as its copy
    z = z.detach().float().contiguous()
    codebook = codebook.detach().float().contiguous()
    if normalize:
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(codebook, dim=-1)
    code_sq = (codebook * codebook).sum(-1)
    indices = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    scores = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    for start in range(0, z.shape[0], TORCH_CHUNK_ROWS):
        rows = z[start : start + TORCH_CHUNK_ROWS]
        row_sq = (rows * rows).sum(-1, keepdim=True)
        # in place, and dropped before the next chunk: one [chunk, K] buffer alive at a time
        dist = torch.addmm(code_sq[None, :], rows, codebook.t(), alpha=-2.0).add_(row_sq)
        best, idx = dist.min(dim=1)
        del dist
        indices[start : start + rows.shape[0]] = idx
        scores[start : start + rows.shape[0]] = best.clamp_min(0)
    if codebook.shape[0] > 1 and not torch.compiler.is_compiling() and _may_have_duplicates(codebook):
        indices = _first_duplicate(codebook)[indices]
    return indices, scores


def _may_have_duplicates(codebook: torch.Tensor) -> bool:
    """False only when no two codes are equal: rows with different hashes of their bits differ.

    torch.unique(dim=0) costs milliseconds per call on a CPU (about 6% of an adaptive encode with the
    demo model, by benchmarks.profile_encode), and trained codebooks rarely hold duplicates, so a
    sort of K hashes screens it out."""
    # + 0.0 maps -0.0 to 0.0, which compare equal and so must hash alike
    bits = (codebook + 0.0).view(torch.int32).to(torch.int64)
    hashes = (bits * _hash_weights(codebook.shape[1]).to(bits.device)).sum(-1)  # int64 products wrap, which is fine for a hash
    return torch.unique(hashes).numel() < codebook.shape[0]


@functools.lru_cache(maxsize=None)
def _hash_weights(dim: int) -> torch.Tensor:
    # fixed random weights, drawn once per code width; a collision only costs the exact check,
    # never a wrong answer
    return torch.randint(1, 2**31, (dim,), generator=torch.Generator().manual_seed(0x5EED))


def _first_duplicate(codebook: torch.Tensor) -> torch.Tensor:
    """For each code, the lowest index holding the same values.

    BLAS may round the edge columns of a matmul differently from the bulk (MKL does for K=5), so
    duplicate codes can get distances an ulp apart and argmin would not pick the first. Mapping
    the winner back to its first copy restores torch.argmin's tie-break for exact duplicates.
    Skipped while compiling: unique's data-dependent size would break a fullgraph trace.
    """
    _, group = torch.unique(codebook, dim=0, return_inverse=True)
    k = codebook.shape[0]
    order = torch.arange(k, device=codebook.device)
    first = torch.full((k,), k, dtype=torch.int64, device=codebook.device)
    first.scatter_reduce_(0, group, order, reduce="amin")
    return first[group]


@torch.library.custom_op("alit_fast::vq_nearest", mutates_args=())
def _vq_nearest_op(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    # imported here, not at module import: triton picks interpreter or GPU mode when the kernel is
    # defined, so defining it late honours a TRITON_INTERPRET set after `import alit_fast`
    from ..kernels._utils import can_launch
    from ..kernels.vq import vq_nearest_triton

    if not can_launch(z):
        raise RuntimeError(
            f"vq_nearest(backend='triton') needs a GPU tensor or TRITON_INTERPRET=1; z is on {z.device}"
        )
    return vq_nearest_triton(z, codebook, normalize)


@_vq_nearest_op.register_fake
def _(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = z.shape[0]
    return z.new_empty(n, dtype=torch.int64), z.new_empty(n, dtype=torch.float32)


def vq_nearest_triton_op(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The triton backend: one fused launch, no N x K matrix. Inputs are detached: the lookup is not
    differentiable (the quantizer builds its straight-through estimator around it)."""
    _check_inputs(z, codebook)
    return _vq_nearest_op(z.detach(), codebook.detach(), bool(normalize))


def vq_nearest(
    z: torch.Tensor, codebook: torch.Tensor, normalize: bool, backend: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (indices int64 [N], score float32 [N])."""
    if backend == "torch":
        return vq_nearest_reference(z, codebook, normalize)
    if backend == "triton":
        return vq_nearest_triton_op(z, codebook, normalize)
    if backend == "official":
        return vq_nearest_naive(z, codebook, normalize)
    raise ValueError(f"unknown backend {backend!r}; expected 'torch', 'triton' or 'official'")


def vq_nearest_naive(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole N x K distance matrix at once, as the official quantizers build it: the baseline
    the benchmarks compare against (its memory grows as N x K)."""
    _check_inputs(z, codebook)
    z = z.detach().float()
    codebook = codebook.detach().float()
    if normalize:
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(codebook, dim=-1)
    dist = (z * z).sum(1, keepdim=True) + (codebook * codebook).sum(1)[None, :] - 2.0 * z @ codebook.t()
    best, indices = dist.min(dim=1)
    return indices, best.clamp_min(0)
