""""naive" names the float64 oracle beside each op (attention_naive, vq_nearest_naive); the
official-style fp32 baselines are the "official" backend."""
from __future__ import annotations

import torch

from alit_fast.ops.attention import attention, attention_naive
from alit_fast.ops.vq import vq_nearest, vq_nearest_naive, vq_nearest_official


def test_vq_nearest_naive_is_float64_with_lowest_index_ties():
    g = torch.Generator().manual_seed(0)
    book = torch.randn(9, 6, generator=g)
    book[7] = book[2]  # a duplicate code: the lower index must win
    z = torch.cat([book[2:3] + 1e-3, torch.randn(20, 6, generator=g)])
    indices, dist = vq_nearest_naive(z, book, normalize=False)
    assert dist.dtype == torch.float64 and indices.dtype == torch.int64
    assert indices[0] == 2
    want = ((z.double()[:, None, :] - book.double()[None]) ** 2).sum(-1).min(1)
    torch.testing.assert_close(dist, want.values, rtol=1e-12, atol=1e-12)


def test_official_vq_backend_is_the_fp32_baseline():
    g = torch.Generator().manual_seed(1)
    z, book = torch.randn(30, 12, generator=g), torch.randn(16, 12, generator=g)
    got = vq_nearest(z, book, normalize=True, backend="official")
    assert got[1].dtype == torch.float32
    assert torch.equal(got[0], vq_nearest_official(z, book, True)[0])
    assert torch.equal(got[0], vq_nearest_naive(z, book, normalize=True)[0])


def test_attention_naive_is_float64():
    q = torch.randn(2, 5, 1, 32, generator=torch.Generator().manual_seed(2))
    ref = attention_naive(q, q, q)
    assert ref.dtype == torch.float64
    torch.testing.assert_close(attention(q, q, q, backend="torch").double(), ref, rtol=1e-5, atol=1e-5)
