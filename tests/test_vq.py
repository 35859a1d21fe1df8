"""vq_nearest on both backends against a float64 reference.

Run with TRITON_INTERPRET=1 on a CPU-only machine (the triton backend then runs in the interpreter).
"""
from __future__ import annotations

import itertools
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import alit_fast.ops.vq as vq_ops
from alit_fast.kernels._utils import is_interpreting
from alit_fast.ops.vq import vq_nearest

HAS_TRITON_TARGET = is_interpreting() or torch.cuda.is_available()
DEVICE = "cuda" if (torch.cuda.is_available() and not is_interpreting()) else "cpu"
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON_TARGET, reason="no GPU and no interpreter"))]

# The chosen code's float64 distance may exceed the float64 minimum by this much, relative. The same
# bound holds for fp16 inputs because the reference is built from the fp16-rounded values: both
# backends upcast to fp32 before any arithmetic, so fp16 adds no error of its own.
RTOL = 1e-5
# Floor for rows whose nearest distance is ~0 (a row equal to a code): fp32 rounding of the
# ||z||^2 + ||c||^2 scale the distances are computed against.
ATOL_SCALE = 2**-22


def _reference64(z: torch.Tensor, codebook: torch.Tensor, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 distance matrix of the values the op actually sees (fp16 inputs upcast, not the
    fp32 originals); float64 leaves the expansion's cancellation far below RTOL."""
    z64 = z.detach().to(torch.float64)
    c64 = codebook.detach().to(torch.float64)
    if normalize:
        z64 = F.normalize(z64, dim=1)
        c64 = F.normalize(c64, dim=1)
    dist = (z64 * z64).sum(1, keepdim=True) - 2.0 * z64 @ c64.t() + (c64 * c64).sum(1)[None, :]
    scale = (z64 * z64).sum(1) + (c64 * c64).sum(1).max()
    return dist.clamp_min(0), scale


def _assert_nearest(z, codebook, normalize, indices, score):
    n, k = z.shape[0], codebook.shape[0]
    assert indices.dtype == torch.int64 and indices.shape == (n,)
    assert score.dtype == torch.float32 and score.shape == (n,)
    assert not indices.requires_grad and not score.requires_grad
    indices, score = indices.cpu(), score.cpu()
    assert bool(((indices >= 0) & (indices < k)).all()), "index out of range"
    dist, scale = _reference64(z.cpu(), codebook.cpu(), normalize)
    best, best_idx = dist.min(dim=1)
    chosen = dist.gather(1, indices[:, None])[:, 0]
    tol = RTOL * best + ATOL_SCALE * scale
    excess = chosen - best
    assert bool((excess <= tol).all()), f"chosen code not nearest: worst excess {(excess / tol).max().item():.3g} x tol"
    # an index may differ from float64's argmin only where the two codes tie within tolerance,
    # which the distance check above already bounds; count them so a systematic slip still shows
    mismatched = indices != best_idx
    assert int(mismatched.sum()) <= max(1, n // 100), f"{int(mismatched.sum())} of {n} indices differ"
    assert torch.allclose(score.double(), chosen, rtol=1e-5, atol=float(ATOL_SCALE * scale.max()))


def _inputs(n, k, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g).to(dtype)
    codebook = torch.randn(k, d, generator=g).to(dtype)
    return z.to(DEVICE), codebook.to(DEVICE)


def _pairwise_cover(factors):
    """A small set of combinations in which every pair of values of any two factors appears.

    Greedy (always the combination covering the most uncovered pairs; first wins ties), so the
    result is deterministic.
    """
    combos = list(itertools.product(*factors))

    def pairs(c):
        return {(i, c[i], j, c[j]) for i, j in itertools.combinations(range(len(c)), 2)}

    todo = set().union(*(pairs(c) for c in combos))
    chosen = []
    while todo:
        best = max(combos, key=lambda c: len(pairs(c) & todo))
        chosen.append(best)
        todo -= pairs(best)
    return chosen


# N x K x d x normalize x dtype is 192 combinations per backend; the biggest cost ~1 s each in the
# interpreter on a shared 2-core box, too slow for the whole product. Instead: a pairwise cover
# (20 combinations, every value pair of every two factors present), plus the heaviest corners
# (N=1000, K=4096) at the extreme d values so full tiles, many programs and large d all meet.
_FACTORS = [[1, 7, 1000], [1, 5, 1024, 4096], [12, 16, 64, 256], [True, False], [torch.float32, torch.float16]]
_CASES = _pairwise_cover(_FACTORS) + [
    (1000, 4096, 256, False, torch.float32),
    (1000, 4096, 256, True, torch.float16),
    (1000, 4096, 12, True, torch.float16),
    (1000, 4096, 16, False, torch.float32),
]


def _case_id(case):
    n, k, d, normalize, dtype = case
    return f"N{n}-K{k}-d{d}-{'cos' if normalize else 'l2'}-{'fp16' if dtype == torch.float16 else 'fp32'}"


def test_case_list_covers_all_pairs():
    for i, j in itertools.combinations(range(len(_FACTORS)), 2):
        want = set(itertools.product(_FACTORS[i], _FACTORS[j]))
        assert want <= {(c[i], c[j]) for c in _CASES}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n,k,d,normalize,dtype", _CASES, ids=[_case_id(c) for c in _CASES])
def test_matches_float64(n, k, d, normalize, dtype, backend):
    z, codebook = _inputs(n, k, d, dtype, seed=n * 7919 + k * 31 + d)
    indices, score = vq_nearest(z, codebook, normalize, backend=backend)
    _assert_nearest(z, codebook, normalize, indices, score)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [12, 64])
def test_anti_aligned_partial_tiles(d, backend):
    # every cosine negative (z opposite to all codes), and N, K leave partial last blocks/tiles
    # in every config (interpreter 256 x 512, GPU 64..128)
    g = torch.Generator().manual_seed(d)
    n, k = 300, 600
    codebook = torch.rand(k, d, generator=g) + 0.05
    z = -(torch.rand(n, d, generator=g) + 0.05)
    z, codebook = z.to(DEVICE), codebook.to(DEVICE)
    for normalize in (True, False):
        indices, score = vq_nearest(z, codebook, normalize, backend=backend)
        _assert_nearest(z, codebook, normalize, indices, score)
        if normalize:
            assert bool((score.cpu() > 2.0).all())  # squared distance 2 - 2cos with cos < 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "l2"])
def test_non_contiguous_identical(normalize, backend):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(64, 2 * 300, generator=g).to(DEVICE)
    codebook = torch.randn(700, 64, generator=g).to(DEVICE)
    views = [base.t(), base.t()[::2], base.t()[:, :].as_strided((300, 64), (1, 2 * 300))]
    for z in views:
        assert not z.is_contiguous()
        i_nc, s_nc = vq_nearest(z, codebook, normalize, backend=backend)
        i_c, s_c = vq_nearest(z.contiguous(), codebook, normalize, backend=backend)
        assert torch.equal(i_nc, i_c)
        assert torch.equal(s_nc, s_c)
    # a strided codebook too (the wrapper copies it, so nothing to get wrong, but cheap to pin)
    z = base.t()[:100].contiguous()
    cb_nc = torch.randn(64, 700, generator=g).to(DEVICE).t()
    a = vq_nearest(z, cb_nc, normalize, backend=backend)
    b = vq_nearest(z, cb_nc.contiguous(), normalize, backend=backend)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("normalize", [True, False], ids=["cos", "l2"])
def test_ties_pick_lowest_index(normalize, backend):
    g = torch.Generator().manual_seed(2)
    k0, d = 700, 16
    base = torch.randn(k0, d, generator=g)
    # three copies: the second shares tiles with the first, the third lands in later tiles
    codebook = torch.cat([base, base, base]).to(DEVICE)
    z = torch.randn(500, d, generator=g).to(DEVICE)
    indices, _ = vq_nearest(z, codebook, normalize, backend=backend)
    ref, _ = vq_nearest(z, base.to(DEVICE), normalize, backend=backend)
    assert torch.equal(indices, ref)
    assert bool((indices < k0).all())
    # one code repeated: every row ties with every code
    same = base[:1].repeat(5, 1).to(DEVICE)
    indices, _ = vq_nearest(z, same, normalize, backend=backend)
    assert bool((indices == 0).all())


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors(backend):
    z = torch.randn(4, 16, device=DEVICE)
    cb = torch.randn(8, 16, device=DEVICE)
    with pytest.raises(ValueError, match="d=16"):
        vq_nearest(z, torch.randn(8, 12, device=DEVICE), True, backend=backend)
    with pytest.raises(ValueError, match="empty"):
        vq_nearest(z, cb[:0], True, backend=backend)
    with pytest.raises(ValueError, match="floating"):
        vq_nearest(z.long(), cb, True, backend=backend)
    with pytest.raises(ValueError, match="floating"):
        vq_nearest(z, cb.to(torch.int32), True, backend=backend)
    bad = z.clone()
    bad[2, 3] = float("nan")
    with pytest.raises(ValueError, match="z contains NaN"):
        vq_nearest(bad, cb, False, backend=backend)
    bad = cb.clone()
    bad[7, 0] = float("nan")
    with pytest.raises(ValueError, match="codebook contains NaN"):
        vq_nearest(z, bad, False, backend=backend)
    bad = z.clone()
    bad[1, 0] = float("-inf")
    with pytest.raises(ValueError, match="z contains inf"):
        vq_nearest(bad, cb, False, backend=backend)
    bad = cb.clone()
    bad[3, 1] = float("inf")
    with pytest.raises(ValueError, match="codebook contains inf"):
        vq_nearest(z, bad, False, backend=backend)
    with pytest.raises(ValueError, match="z \\[N, d\\]"):
        vq_nearest(z[0], cb, True, backend=backend)
    with pytest.raises(ValueError, match="unknown backend"):
        vq_nearest(z, cb, True, backend="cuda")


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_gradient_and_empty_rows(backend):
    z = torch.randn(9, 16, device=DEVICE, requires_grad=True)
    cb = torch.randn(8, 16, device=DEVICE, requires_grad=True)
    indices, score = vq_nearest(z, cb, True, backend=backend)
    assert not indices.requires_grad and not score.requires_grad
    indices, score = vq_nearest(z[:0], cb, True, backend=backend)
    assert indices.shape == (0,) and score.shape == (0,)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces: an upper bound on one intermediate's memory."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_torch_path_memory_is_chunked(monkeypatch):
    n, k, d, chunk = 1000, 1024, 16, 64
    monkeypatch.setattr(vq_ops, "TORCH_CHUNK_ROWS", chunk)
    z, codebook = _inputs(n, k, d, torch.float32)
    with _LargestTensor() as probe:
        indices, score = vq_nearest(z, codebook, True, backend="torch")
    assert probe.largest <= chunk * k < n * k
    _assert_nearest(z, codebook, True, indices, score)


@pytest.mark.skipif(not HAS_TRITON_TARGET, reason="no GPU and no interpreter")
def test_kernel_writes_zq():
    from alit_fast.kernels.vq import vq_nearest_triton

    z, codebook = _inputs(300, 600, 12, torch.float16, seed=5)
    for normalize in (True, False):
        indices, score, zq = vq_nearest_triton(z, codebook, normalize, return_zq=True)
        cb = codebook.float()
        if normalize:
            cb = F.normalize(cb, dim=1)
        torch.testing.assert_close(zq, cb[indices], rtol=1e-6, atol=1e-7)
        ref_i, ref_s = vq_nearest(z, codebook, normalize, backend="triton")
        assert torch.equal(indices, ref_i) and torch.equal(score, ref_s)


@pytest.mark.skipif(not HAS_TRITON_TARGET, reason="no GPU and no interpreter")
def test_opcheck():
    z, codebook = _inputs(33, 40, 12, torch.float32, seed=6)
    for normalize in (True, False):
        torch.library.opcheck(torch.ops.alit_fast.vq_nearest.default, (z, codebook, normalize))


def _lookup(z, codebook):
    indices, score = vq_nearest(z * 2.0, codebook, True, backend="triton")
    return indices + 1, score.sum()


@pytest.mark.skipif(not HAS_TRITON_TARGET, reason="no GPU and no interpreter")
@pytest.mark.parametrize("compile_backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(compile_backend):
    torch._dynamo.reset()
    z, codebook = _inputs(50, 70, 16, torch.float32, seed=7)
    eager = _lookup(z, codebook)
    try:
        compiled = torch.compile(_lookup, fullgraph=True, backend=compile_backend)(z, codebook)
    except Exception as exc:  # inductor needs a working C++ toolchain on CPU
        if compile_backend == "inductor" and "InductorError" in type(exc).__name__:
            pytest.skip(f"inductor unavailable here: {exc}")
        raise
    assert torch.equal(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])


def test_duplicate_map_finds_equal_codes_and_passes_distinct_ones():
    from alit_fast.ops.vq import duplicate_map

    g = torch.Generator().manual_seed(4)
    codebook = torch.randn(1024, 12, generator=g)
    assert torch.equal(duplicate_map(codebook), torch.arange(1024))
    twice = codebook.clone()
    twice[700] = twice[3]
    twice[900] = twice[3]
    expected = torch.arange(1024)
    expected[700] = expected[900] = 3
    assert torch.equal(duplicate_map(twice), expected)
    signed = codebook.clone()
    signed[5, 2] = 0.0
    signed[9] = signed[5]
    signed[9, 2] = -0.0  # equal values, different bits
    assert duplicate_map(signed)[9] == 5


def test_duplicate_map_never_merges_different_codes_on_a_hash_collision(monkeypatch):
    from alit_fast.ops import vq as vq_ops

    # every row hashes to 0: one group, whose first row differs from all the others
    monkeypatch.setattr(vq_ops, "_hash_weights", lambda dim, device: torch.zeros(dim, dtype=torch.int64, device=device))
    g = torch.Generator().manual_seed(5)
    codebook = torch.randn(64, 12, generator=g)
    codebook[40] = codebook[0]
    mapped = vq_ops.duplicate_map(codebook)
    assert torch.equal(codebook[mapped], codebook)  # each code maps onto an equal one
    assert mapped[40] == 0


def test_duplicate_map_makes_no_host_sync():
    from alit_fast.ops.vq import duplicate_map
    from alit_fast.testing import count_syncs

    codebook = torch.randn(256, 12, generator=torch.Generator().manual_seed(6))
    codebook[17] = codebook[2]
    with count_syncs() as syncs:
        duplicate_map(codebook)
    assert syncs.total == 0, dict(syncs)


def test_ties_between_signed_zeros_pick_lowest_index():
    codebook = torch.tensor([[1.0, 0.0], [-0.0, 0.5], [0.0, 0.5], [0.0, 1.0]])
    z = torch.tensor([[0.1, 0.6], [0.0, 0.0]])
    indices, _ = vq_nearest(z, codebook, False, backend="torch")
    assert indices.tolist() == [1, 1]
