"""Nearest-codebook lookup: for every row of z, the index of the closest code.

``normalize=True`` compares l2-normalized rows and codes (the ALIT latent quantizer, cosine);
``normalize=False`` compares raw vectors by squared distance (the VQGAN quantizer).
The score returned is the squared distance between the (normalized) row and its chosen code.
Ties resolve to the lowest index, as torch.argmin does. No gradient flows through the lookup.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

# rows per chunk in the torch path: memory stays O(chunk x K) instead of O(N x K)
TORCH_CHUNK_ROWS = 4096


def _check_inputs(z: torch.Tensor, codebook: torch.Tensor, validate_values: bool = True) -> None:
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
    # A NaN or inf row has no nearest code (argmin would silently answer 0, and the backends would
    # disagree). The check is one fused reduction and one host sync, so only direct calls make it:
    # model code validates its inputs once per call and passes validate=False. Skipped while
    # torch.compile traces (a data-dependent branch there would break the graph).
    if validate_values and not torch.compiler.is_compiling():
        if not bool(torch.isfinite(z).all() & torch.isfinite(codebook).all()):
            what = "z" if not bool(torch.isfinite(z).all()) else "the codebook"
            kind = "NaN" if bool(torch.isnan(z if what == "z" else codebook).any()) else "inf"
            raise ValueError(f"vq_nearest: {what} contains {kind}")


def vq_nearest_reference(
    z: torch.Tensor,
    codebook: torch.Tensor,
    normalize: bool,
    first_copy: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend: the distance matrix built chunk by chunk, in fp32.

    ``first_copy`` is ``duplicate_map`` of the (normalized) codebook, for callers that keep it
    between calls; without it the map is computed here."""
    _check_inputs(z, codebook, validate)
    # contiguous so a strided z takes the same BLAS path, and gives the same bits, as its copy
    z = z.detach().float().contiguous()
    codebook = codebook.detach().float().contiguous()
    if normalize:
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(codebook, dim=-1)
    code_sq = (codebook * codebook).sum(-1)
    if z.shape[0] <= TORCH_CHUNK_ROWS:
        # one chunk, without the loop: a traced graph then keeps the row count symbolic
        best, indices = _nearest_chunk(z, codebook, code_sq)
        return _first_copies(indices, codebook, first_copy), best
    indices = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    scores = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    for start in range(0, z.shape[0], TORCH_CHUNK_ROWS):
        rows = z[start : start + TORCH_CHUNK_ROWS]
        best, idx = _nearest_chunk(rows, codebook, code_sq)
        indices[start : start + rows.shape[0]] = idx
        scores[start : start + rows.shape[0]] = best
    return _first_copies(indices, codebook, first_copy), scores


def _nearest_chunk(rows: torch.Tensor, codebook: torch.Tensor, code_sq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(squared distance to the nearest code, its index) per row."""
    row_sq = (rows * rows).sum(-1, keepdim=True)
    # in place, and dropped on return: one [chunk, K] buffer alive at a time
    dist = torch.addmm(code_sq[None, :], rows, codebook.t(), alpha=-2.0).add_(row_sq)
    best, idx = dist.min(dim=1)
    return best.clamp_min(0), idx


def _first_copies(indices: torch.Tensor, codebook: torch.Tensor, first_copy: torch.Tensor | None) -> torch.Tensor:
    if codebook.shape[0] > 1:
        if first_copy is None:
            first_copy = duplicate_map(codebook)
        indices = first_copy[indices]
    return indices


def duplicate_map(codebook: torch.Tensor) -> torch.Tensor:
    """For each code, the lowest index holding the same values: int64 [K].

    BLAS may round the edge columns of a matmul differently from the bulk (MKL does for K=5), so
    duplicate codes can get distances an ulp apart and argmin would not pick the first. Mapping
    the winner back to its first copy restores torch.argmin's tie-break for exact duplicates.

    Every step has a size fixed by K (no ``unique``, no ``nonzero``): no host sync, and
    torch.compile traces it. Rows are grouped by a 64-bit hash of their bits, sorted stably, and
    each row is mapped to the first row of its hash group only if the two are equal, so a hash
    collision can never map a code onto a different one (at worst, with odds near 2^-64, a
    duplicate keeps its own index)."""
    k = codebook.shape[0]
    # + 0.0 maps -0.0 to 0.0, which compare equal and so must hash alike
    rows = (codebook.detach().float() + 0.0).contiguous()
    bits = rows.view(torch.int32).to(torch.int64)
    hashes = (bits * _hash_weights(rows.shape[1], bits.device)).sum(-1)  # int64 products wrap: fine for a hash
    sorted_hashes, order = torch.sort(hashes, stable=True)
    starts = torch.ones(k, dtype=torch.bool, device=rows.device)
    starts[1:] = sorted_hashes[1:] != sorted_hashes[:-1]
    group = torch.cumsum(starts.to(torch.int64), 0) - 1  # group of each sorted position
    # stable sort: the first position of a group holds its lowest index
    group_first = torch.full((k,), k, dtype=torch.int64, device=rows.device)
    group_first.scatter_reduce_(0, group, order, reduce="amin")
    candidate = torch.empty(k, dtype=torch.int64, device=rows.device)
    candidate[order] = group_first[group]
    same = (rows == rows[candidate]).all(-1)
    return torch.where(same, candidate, torch.arange(k, device=rows.device))


def _hash_weights(dim: int, device: torch.device) -> torch.Tensor:
    # fixed, distinct, odd-ish weights from a multiplicative hash of the column index: no random
    # generator, so torch.compile traces it and every device computes the same map
    cols = torch.arange(1, dim + 1, dtype=torch.int64, device=device)
    return (cols * 2654435761) % 2147483647 + 1


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


def vq_nearest_triton_op(
    z: torch.Tensor, codebook: torch.Tensor, normalize: bool, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The triton backend: no N x K matrix (a small codebook-prep launch, the search, and a combine
    launch when the codebook is split across programs). The search ranks codes with a tensor-core
    dot (tf32 for fp32 z, the input dtype for bf16 / fp16) and re-ranks, exactly in fp32, every
    code within a proven error bound of the best approximate distance: the indices are the fp32
    reference's, lowest index on ties (see ``alit_fast.kernels.vq``). No host sync, no
    host-to-device copy. Inputs are detached: the lookup is not differentiable (the quantizer
    builds its straight-through estimator around it)."""
    _check_inputs(z, codebook, validate)
    return _vq_nearest_op(z.detach(), codebook.detach(), bool(normalize))


def vq_nearest(
    z: torch.Tensor,
    codebook: torch.Tensor,
    normalize: bool,
    backend: str = "auto",
    first_copy: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (indices int64 [N], score float32 [N]).

    ``validate=False`` skips the NaN/inf check of the values (a host sync): for callers that have
    validated their inputs already. ``first_copy``: see ``vq_nearest_reference``."""
    if backend == "auto":
        return vq_nearest_auto(z, codebook, normalize, first_copy, validate)
    if backend == "torch":
        return vq_nearest_reference(z, codebook, normalize, first_copy, validate)
    if backend == "triton":
        return vq_nearest_triton_op(z, codebook, normalize, validate)
    if backend == "official":
        return vq_nearest_official(z, codebook, normalize, validate)
    raise ValueError(f"unknown backend {backend!r}; expected 'auto', 'torch', 'triton' or 'official'")


# the choice for a key never timed while nothing may be timed (torch.compile, CUDA-graph capture):
# the kernel, which never builds the N x K matrix
VQ_STATIC_DEFAULT = "triton"


def vq_auto_key(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> tuple:
    from .auto import device_name

    rows = 1 << max(int(z.shape[0]) - 1, 0).bit_length()  # power-of-two bucket of the row count
    return ("vq", str(z.dtype).replace("torch.", ""), z.shape[1], codebook.shape[0], bool(normalize), rows,
            device_name(z.device))


def vq_nearest_auto(
    z: torch.Tensor,
    codebook: torch.Tensor,
    normalize: bool,
    first_copy: torch.Tensor | None = None,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``auto`` backend: the faster of ``triton`` and ``torch`` for this shape on this GPU,
    measured once per key (``alit_fast.ops.auto``); ``torch`` on a CPU. Both return the same
    indices (the exact fp32 argmin, lowest index on ties)."""
    from . import auto

    if not auto.active(z.device):
        return vq_nearest_reference(z, codebook, normalize, first_copy, validate)

    if validate:
        _check_inputs(z, codebook, validate)  # once here, not once per timed candidate
    candidates = {
        "triton": lambda: vq_nearest_triton_op(z, codebook, normalize, False),
        "torch": lambda: vq_nearest_reference(z, codebook, normalize, first_copy, False),
    }
    rows = 1 << max(int(z.shape[0]) - 1, 0).bit_length()
    local = ("vq", z.dtype, z.shape[1], codebook.shape[0], bool(normalize), rows, auto.device_index(z.device))
    if torch.compiler.is_compiling():
        name = auto.traced_choice(local, VQ_STATIC_DEFAULT)
    else:
        name = auto.choose(vq_auto_key(z, codebook, normalize), lambda: candidates, VQ_STATIC_DEFAULT)
        auto.remember_for_tracing(local, name)
    return candidates.get(name, candidates["torch"])()


def vq_nearest_official(
    z: torch.Tensor, codebook: torch.Tensor, normalize: bool, validate: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``official`` backend: the whole N x K distance matrix at once, in fp32, as the official
    quantizers build it: the baseline the benchmarks compare against (its memory grows as N x K)."""
    _check_inputs(z, codebook, validate)
    z = z.detach().float()
    codebook = codebook.detach().float()
    if normalize:
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(codebook, dim=-1)
    dist = (z * z).sum(1, keepdim=True) + (codebook * codebook).sum(1)[None, :] - 2.0 * z @ codebook.t()
    best, indices = dist.min(dim=1)
    return indices, best.clamp_min(0)


def vq_distances_naive(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> torch.Tensor:
    """The float64 oracle for tests: squared distances [N, K] between the rows of z and the codes
    (both l2-normalized in float64 first when ``normalize``), of the values as given (fp16 inputs
    upcast exactly), clamped at 0."""
    z64 = z.detach().to(torch.float64)
    c64 = codebook.detach().to(torch.float64)
    if normalize:
        z64 = F.normalize(z64, dim=1)
        c64 = F.normalize(c64, dim=1)
    dist = (z64 * z64).sum(1, keepdim=True) - 2.0 * z64 @ c64.t() + (c64 * c64).sum(1)[None, :]
    return dist.clamp_min(0)


def vq_nearest_naive(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The float64 oracle: (argmin index int64 [N], lowest index on ties; its distance float64 [N])."""
    best, indices = vq_distances_naive(z, codebook, normalize).min(dim=1)
    return indices, best
