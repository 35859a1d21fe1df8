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


def vq_nearest_reference(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The torch backend: the distance matrix built chunk by chunk, in fp32."""
    _check_inputs(z, codebook)
    z = z.detach().float()
    codebook = codebook.detach().float()
    if normalize:
        z = F.normalize(z, dim=-1)
        codebook = F.normalize(codebook, dim=-1)
    code_sq = (codebook * codebook).sum(-1)
    indices = torch.empty(z.shape[0], dtype=torch.int64, device=z.device)
    scores = torch.empty(z.shape[0], dtype=torch.float32, device=z.device)
    for start in range(0, z.shape[0], TORCH_CHUNK_ROWS):
        rows = z[start : start + TORCH_CHUNK_ROWS]
        row_sq = (rows * rows).sum(-1, keepdim=True)
        dist = torch.addmm(code_sq[None, :], rows, codebook.t(), alpha=-2.0) + row_sq
        best, idx = dist.min(dim=1)
        indices[start : start + rows.shape[0]] = idx
        scores[start : start + rows.shape[0]] = best.clamp_min(0)
    return indices, scores


def vq_nearest(
    z: torch.Tensor, codebook: torch.Tensor, normalize: bool, backend: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (indices int64 [N], score float32 [N])."""
    if backend == "torch":
        return vq_nearest_reference(z, codebook, normalize)
    if backend == "triton":
        raise NotImplementedError("the triton vq backend is not built yet")
    raise ValueError(f"unknown backend {backend!r}; expected 'torch' or 'triton'")
