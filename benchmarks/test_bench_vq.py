"""Nearest-code lookup: the fused kernel, the chunked torch path and the naive N x K matrix, at the
latent quantizer's shape (cosine, d=12) and the VQGAN's (l2, d=256). Plus the one claim the CPU can
check: the chunked path's peak memory is at most 1/20 of the naive one's at N=65,536, K=4,096, d=12.
"""
from __future__ import annotations

import pytest
import torch

from alit_fast.ops import vq as vq_ops
from benchmarks.cases import MiB, VQ_PROVIDERS, Sizes, default_device, peak_memory, vq_case, vq_label

CASES = Sizes.for_device(default_device()).vq


@pytest.mark.parametrize("provider", VQ_PROVIDERS)
@pytest.mark.parametrize("n,k,d,normalize", CASES, ids=[vq_label(*c) for c in CASES])
def test_vq(run_case, device, n, k, d, normalize, provider):
    label = vq_label(n, k, d, normalize)
    run_case(vq_case(provider, n, k, d, normalize, device), f"vq {label}", kernel=True, provider=provider, case=label)


CLAIM_N, CLAIM_K, CLAIM_D = 65_536, 4_096, 12
CLAIM_RATIO = 1 / 20


def _peak(provider: str, n: int, device: torch.device) -> int:
    peak = peak_memory(vq_case(provider, n, CLAIM_K, CLAIM_D, True, device), device)
    assert peak is not None
    return peak


def claimed_peaks(device: torch.device) -> tuple[float, float, str]:
    """(chunked, naive) peak bytes at N=65,536, and how they were obtained.

    On a GPU: measured there (max_memory_allocated). On a CPU the naive path would allocate 3 GiB and
    take seconds per run, so both are measured at three smaller N (each a whole number of chunks,
    so every run reaches the steady state of the chunk loop) and extrapolated: both peaks are
    affine in N (the naive matrix grows with N; the chunked path's O(N) buffers do too, its
    chunk-sized part does not), and the third point checks that to the byte before trusting it.
    """
    if device.type == "cuda":
        return float(_peak("chunked", CLAIM_N, device)), float(_peak("naive", CLAIM_N, device)), "measured"
    rows = vq_ops.TORCH_CHUNK_ROWS
    ns = (2 * rows, 3 * rows, 4 * rows)
    out = []
    for provider in ("chunked", "naive"):
        p = [_peak(provider, n, device) for n in ns]
        slope = (p[2] - p[0]) / (ns[2] - ns[0])
        predicted_mid = p[0] + slope * (ns[1] - ns[0])
        assert abs(predicted_mid - p[1]) <= 1e-3 * p[1], f"{provider} peak is not affine in N: {p} at {ns}"
        out.append(p[0] + slope * (CLAIM_N - ns[0]))
    return out[0], out[1], f"extrapolated from N={ns}"


@pytest.fixture(scope="module")
def claim(device) -> tuple[float, float, str]:
    return claimed_peaks(device)


def test_vq_peak_memory_measurement_is_sound(claim):
    chunked, naive, how = claim
    print(f"VQ peak memory at N={CLAIM_N}, K={CLAIM_K}, d={CLAIM_D} ({how}): chunked {chunked / MiB:.1f} MiB, "
          f"naive {naive / MiB:.1f} MiB, ratio 1/{naive / chunked:.1f}")
    # the naive path must hold at least its N x K fp32 matrix, the chunked one a chunk of it
    assert naive >= CLAIM_N * CLAIM_K * 4
    assert chunked >= vq_ops.TORCH_CHUNK_ROWS * CLAIM_K * 4


def test_chunked_vq_peak_memory_is_at_most_a_twentieth_of_naive(claim):
    chunked, naive, how = claim
    assert chunked / naive <= CLAIM_RATIO, f"chunked/naive peak = 1/{naive / chunked:.1f} > 1/20 ({how})"
