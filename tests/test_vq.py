"""vq_nearest on both backends against a float64 reference.

The triton backend runs compiled on a GPU and in the Triton interpreter on a CPU (tests/conftest.py
sets TRITON_INTERPRET=1 only where no GPU is present; this module never sets it).
"""
from __future__ import annotations

import itertools

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
    scale = (z64 * z64).sum(1) + (c64 * c64).sum(1).max()
    return vq_ops.vq_distances_naive(z, codebook, normalize), scale


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
    # in every config (interpreter 256 x 1024, GPU 64 x 64)
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


# --------------------------------------------------------------------------------------------
# The tensor-core search with an exact fp32 re-check: indices equal the fp32 torch reference's
# (kernels/vq.py explains the bound that makes this hold whatever the tensor cores round).

needs_triton = pytest.mark.skipif(not HAS_TRITON_TARGET, reason="no GPU and no interpreter")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _vq_kernels():
    import alit_fast.kernels.vq as vq_kernels

    return vq_kernels


@pytest.fixture
def poisoned(monkeypatch):
    """Every buffer the launcher allocates starts as NaN / -1, so an element no kernel writes shows."""
    vqk = _vq_kernels()

    def alloc(shape, dtype, device):
        fill = float("nan") if dtype.is_floating_point else -1
        return torch.full(shape, fill, dtype=dtype, device=device)

    monkeypatch.setattr(vqk, "_alloc", alloc)
    return vqk


def _split(monkeypatch, splits):
    monkeypatch.setattr(_vq_kernels(), "SPLIT_OVERRIDE", splits)


def fp32_tie_bound(z64: torch.Tensor, c64: torch.Tensor) -> torch.Tensor:
    """How far apart two fp32 evaluations of ||z||^2 - 2 z.c + ||c||^2 may land, per row, from the
    bound kernels/vq.py documents: an fp32 dot of d terms errs by at most g_ex ||z|| ||c||,
    g_ex = (d + 2) 2^-23, in any summation order; each evaluation twice that for the 2 z.c term,
    plus a few roundings (2^-22 each) of the magnitudes added. Two evaluations: twice again."""
    d = z64.shape[1]
    g_ex = (d + 2) * 2.0**-23
    zn, cn = z64.norm(dim=1), c64.norm(dim=1)
    one = 2 * g_ex * zn * cn + 4 * 2.0**-22 * (zn * zn + 2 * zn * cn + cn * cn)
    return 2 * one


def assert_same_nearest(z, codebook, normalize, got, ref, exact: bool | None = None):
    """``got`` picks the reference's code (``ref``, the torch backend's fp32 argmin) for every row,
    except where the two codes' distances tie within ``fp32_tie_bound``: a GPU sums the dot products
    in another order than the reference's BLAS, so a near-tie may fall either way there. Under the
    interpreter both run the same fp32 sums on the host: no difference at all is accepted
    (``exact`` defaults to that: True on the CPU)."""
    exact = DEVICE == "cpu" if exact is None else exact
    got, ref = got.cpu(), ref.cpu()
    diff = (got != ref).nonzero()[:, 0]
    if exact or diff.numel() == 0:
        assert diff.numel() == 0, f"{diff.numel()} of {len(ref)} indices differ from the fp32 reference, e.g. rows {diff[:5].tolist()}"
        return
    z64, c64 = z.detach().cpu().double()[diff], codebook.detach().cpu().double()
    if normalize:
        z64, c64 = F.normalize(z64, dim=1), F.normalize(c64, dim=1)
    c_got, c_ref = c64[got[diff]], c64[ref[diff]]
    d_got, d_ref = ((z64 - c_got) ** 2).sum(1), ((z64 - c_ref) ** 2).sum(1)
    bound = torch.maximum(fp32_tie_bound(z64, c_got), fp32_tie_bound(z64, c_ref))
    gap = (d_got - d_ref).abs()
    bad = gap > bound
    assert not bool(bad.any()), (
        f"{int(bad.sum())} of {len(ref)} indices differ from the fp32 reference by more than a tie, "
        f"e.g. row {int(diff[bad][0])}: distance gap {float(gap[bad][0]):.3g} > bound {float(bound[bad][0]):.3g}"
    )


def test_assert_same_nearest_accepts_only_ties():
    """The GPU rule: a near-tie may pick either code, a farther code is an error; the interpreter's
    rule accepts no difference."""
    z = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    # codes 0 and 1 tie for row 0 (equal distances); 1 and 3 differ by 1e-6 for row 1, inside the bound
    codebook = torch.tensor([[1.0, 1e-4], [1.0, -1e-4], [0.0, 1.0], [1.0, -1e-4 + 5e-7]])
    assert_same_nearest(z, codebook, False, torch.tensor([1, 1]), torch.tensor([0, 1]), exact=False)
    assert_same_nearest(z, codebook, False, torch.tensor([0, 3]), torch.tensor([0, 1]), exact=False)
    with pytest.raises(AssertionError, match="more than a tie"):
        assert_same_nearest(z, codebook, False, torch.tensor([2, 1]), torch.tensor([0, 1]), exact=False)
    with pytest.raises(AssertionError, match="differ from the fp32 reference"):
        assert_same_nearest(z, codebook, False, torch.tensor([1, 1]), torch.tensor([0, 1]), exact=True)


def _check_exact(z, codebook, normalize, expected=None):
    """Triton's indices equal the fp32 reference's; the score matches the distance to the code."""
    indices, score = vq_nearest(z, codebook, normalize, backend="triton")
    ref, _ = vq_nearest(z, codebook, normalize, backend="torch")
    assert indices.dtype == torch.int64 and score.dtype == torch.float32
    assert not bool(torch.isnan(score).any()), "unwritten score"
    assert bool(((indices >= 0) & (indices < codebook.shape[0])).all()), "unwritten or bad index"
    assert_same_nearest(z, codebook, normalize, indices, ref)
    if expected is not None:
        assert torch.equal(indices.cpu(), expected)
    zf = z.float()
    cb = codebook.float()
    if normalize:
        zf, cb = F.normalize(zf, dim=1), F.normalize(cb, dim=1)
    torch.testing.assert_close(score, ((zf - cb[indices]) ** 2).sum(1), rtol=1e-5, atol=1e-5)
    return indices


# d = 13 pads to 16, 32 is the demo width, 256 takes the tiled-d path; N and K leave partial row
# blocks, tiles and splits (interpreter tiles: 256 rows x 1024 codes, in d tiles of 128 at d=256,
# so K = 1100 is two tiles, and a forced split of 3 gives two splits of 1024 and 76 codes)
_EXACT_CASES = [
    # n, k, d, normalize, dtype, splits
    (300, 1100, 12, True, "fp32", None),
    (300, 1100, 12, True, "bf16", 3),
    (77, 1100, 13, False, "fp16", 3),
    (77, 1100, 16, False, "fp32", 2),
    (260, 700, 32, True, "fp16", None),
    (40, 1100, 256, False, "fp32", 3),
    (40, 600, 256, True, "bf16", None),
]


@needs_triton
@pytest.mark.parametrize("n,k,d,normalize,dtype,splits", _EXACT_CASES, ids=[f"N{c[0]}-K{c[1]}-d{c[2]}-{'cos' if c[3] else 'l2'}-{c[4]}-s{c[5]}" for c in _EXACT_CASES])
def test_indices_equal_fp32_reference(n, k, d, normalize, dtype, splits, poisoned, monkeypatch):
    _split(monkeypatch, splits)
    g = torch.Generator().manual_seed(n + k + d)
    z = torch.randn(n, d, generator=g).to(_DTYPES[dtype]).to(DEVICE)
    codebook = torch.randn(k, d, generator=g).to(DEVICE)
    _check_exact(z, codebook, normalize)


def _integer_near_ties(n_rows, d, dtype, g):
    """Unnormalized rows and codes of small integers: every fp32 operation on them (products,
    sums, ||c||^2 - 2 z.c + ||z||^2, all below 2^24) is exact, so the reference's ranking is the
    true one. Each row has two nonzero coordinates near 2,500 (12 significant bits: tf32, bf16 and
    fp16 all round them) and codes at offsets (+-1, +-1), (+-1, 0), (0, +-2)... from it: exact ties
    between distinct codes and neighbours a distance of 1 away, i.e. expanded scores
    ||c||^2 - 2 z.c ~ -1.2e7 a few ulps apart, far inside the tensor-core error (~1e4)."""
    rows, codes = [], []
    offsets = [(1, 1), (-1, -1), (1, -1), (-1, 1), (1, 0), (0, -1), (2, 0), (0, 2), (-2, 1), (1, 2)]
    for _ in range(n_rows):
        dims = torch.randperm(d, generator=g)[:2]
        xy = torch.randint(2049, 2600, (2,), generator=g).float()
        z = torch.zeros(d)
        z[dims] = xy
        z = z.to(dtype).float()  # the values the op sees: build codes around them
        rows.append(z)
        pick = torch.randperm(len(offsets), generator=g)[:6]
        for p in pick.tolist():
            c = z.clone()
            c[dims[0]] += offsets[p][0]
            c[dims[1]] += offsets[p][1]
            codes.append(c)
    codes = torch.stack(codes)
    # far integer fillers (two coordinates in [-1500, 1500]: every value stays below 2^24), then a
    # shuffle so tied codes land in different tiles and splits; K = 1100 leaves partial tiles
    fill = torch.zeros(1100 - len(codes), d)
    for f in fill:
        f[torch.randperm(d, generator=g)[:2]] = torch.randint(-1500, 1500, (2,), generator=g).float()
    codes = torch.cat([codes, fill])
    codes = codes[torch.randperm(len(codes), generator=g)]
    z = torch.stack(rows).to(dtype)
    return z, codes


def _expected_lowest(z, codebook, normalize):
    """float64 ranking with exact-tie detection: the lowest index among equal float64 distances."""
    z64, c64 = z.double(), codebook.double()
    if normalize:
        z64, c64 = F.normalize(z64, dim=1), F.normalize(c64, dim=1)
    dist = (z64[:, None, :] - c64[None, :, :]).pow(2).sum(-1)
    return dist.argmin(1)  # torch.argmin returns the first minimum


@needs_triton
@pytest.mark.parametrize("d,dtype,splits", [(12, "fp32", None), (12, "bf16", 2), (16, "fp16", 3), (256, "fp32", 2)])
def test_integer_near_ties_unnormalized(d, dtype, splits, poisoned, monkeypatch):
    _split(monkeypatch, splits)
    g = torch.Generator().manual_seed(d + len(dtype))
    z, codebook = _integer_near_ties(40, d, _DTYPES[dtype], g)
    expected = _expected_lowest(z.float(), codebook, False)
    # the construction really is adversarial: many rows have an exact tie at the minimum
    dist = (z.double()[:, None, :] - codebook.double()[None]).pow(2).sum(-1)
    ties = (dist == dist.min(1, keepdim=True).values).sum(1)
    assert int((ties > 1).sum()) >= 10
    _check_exact(z.to(DEVICE), codebook.to(DEVICE), False, expected)


def _dyadic_near_ties(n_rows, g):
    """Normalized mode, d=16: rows with all coordinates +-1/4 and codes with one +-3/4, seven
    +-1/4 and eight zeros are unit vectors exactly, so normalizing changes nothing and every dot
    product is an exact multiple of 1/16. Each row gets four such codes agreeing with its signs
    (cos = 3/16 + 7/16 exactly: distinct codes, equal distances; other rows' and the filler codes
    can reach the same 10/16 too) and three codes whose cosine is 10/16 +- 2^-16 or 2^-15:
    rounding-safe in fp32 (an fp32 dot of unit vectors errs by at most 16 * 2^-24 = 2^-20), yet
    2^7 times inside the tf32 window."""
    d = 16

    def dyadic(signs):
        perm = torch.randperm(d, generator=g)
        c = torch.zeros(d)
        c[perm[0]] = 0.75 * signs[perm[0]]
        c[perm[1:8]] = 0.25 * signs[perm[1:8]]
        return c

    rows, codes = [], []
    for _ in range(n_rows):
        z = torch.where(torch.rand(d, generator=g) < 0.5, -0.25, 0.25)
        rows.append(z)
        codes += [dyadic(torch.sign(z)) for _ in range(4)]
        zd = z.double()
        u = torch.randn(d, generator=g, dtype=torch.float64)
        u = u - (u @ zd) * zd
        u = u / u.norm()
        for step in torch.randint(1, 3, (3,), generator=g).tolist():
            sign = 1.0 if torch.rand(1, generator=g).item() < 0.3 else -1.0
            cos = 10.0 / 16 + sign * step * 2.0**-16
            codes.append((cos * zd + (1 - cos**2) ** 0.5 * u).float())
    fill = [dyadic(torch.where(torch.rand(d, generator=g) < 0.5, -1.0, 1.0)) for _ in range(1100 - len(codes))]
    codes = torch.stack(codes + fill)
    codes = codes[torch.randperm(len(codes), generator=g)]
    return torch.stack(rows), codes


@needs_triton
@pytest.mark.parametrize("dtype,splits", [("fp32", 2), ("bf16", None), ("fp16", 3)])
def test_dyadic_near_ties_normalized(dtype, splits, poisoned, monkeypatch):
    _split(monkeypatch, splits)
    g = torch.Generator().manual_seed(11 + len(dtype))
    z, codebook = _dyadic_near_ties(48, g)
    z = z.to(_DTYPES[dtype])  # +-1/4 is exact in every dtype
    expected = _expected_lowest(z.float(), codebook, True)
    _check_exact(z.to(DEVICE), codebook.to(DEVICE), True, expected)


@needs_triton
@pytest.mark.parametrize("normalize,dtype", [(True, "fp32"), (False, "bf16"), (True, "fp16"), (False, "fp32")])
def test_many_duplicates_across_splits_pick_lowest_index(normalize, dtype, poisoned, monkeypatch):
    # every row's nearest code exists in 5 copies spread over all splits, more than one row block
    # of candidates per tile: the re-check must take them all and keep the lowest
    _split(monkeypatch, 3)
    g = torch.Generator().manual_seed(3 + len(dtype))
    d, k0 = 12, 230
    base = torch.randn(k0, d, generator=g)
    codebook = torch.cat([base] * 5)
    z = (base[torch.randint(0, k0, (90,), generator=g)] + 0.01 * torch.randn(90, d, generator=g)).to(_DTYPES[dtype])
    indices = _check_exact(z.to(DEVICE), codebook.to(DEVICE), normalize)
    ref, _ = vq_nearest(z.to(DEVICE), base.to(DEVICE), normalize, backend="triton")
    assert torch.equal(indices, ref)
    assert bool((indices < k0).all())


# d > 64 runs kernels/vq.py's _search_wide: the row block resident, four candidate slots per row,
# one exact re-check after the code loop, a rescan for rows with more live candidates than slots.
# Awkward sizes: one row, one row past a 128-row GPU block, K under one code tile and one code
# past the interpreter's, d padded (100 -> 128).
_WIDE_CASES = [
    (1, 5, 256, False, "bf16", None),
    (129, 1025, 100, True, "fp32", None),
    (129, 77, 256, False, "fp16", 2),
    (40, 1100, 256, True, "fp16", 3),
]


@needs_triton
@pytest.mark.parametrize("n,k,d,normalize,dtype,splits", _WIDE_CASES, ids=[f"N{c[0]}-K{c[1]}-d{c[2]}-{c[4]}-s{c[5]}" for c in _WIDE_CASES])
def test_wide_rows_awkward_sizes_equal_fp32_reference(n, k, d, normalize, dtype, splits, poisoned, monkeypatch):
    _split(monkeypatch, splits)
    g = torch.Generator().manual_seed(n * 3 + k + d)
    z = torch.randn(n, d, generator=g).to(_DTYPES[dtype]).to(DEVICE)
    codebook = torch.randn(k, d, generator=g).to(DEVICE)
    _check_exact(z, codebook, normalize)


def _crowded_windows(n_rows: int, d: int, dtype: torch.dtype, g: torch.Generator, tile: int):
    """Integer rows (exact fp32 arithmetic, as in _integer_near_ties), each with four codes at
    squared distance 2 in the first two code tiles, two per tile, and its nearest code (distance 1)
    in the last tile: five codes far inside the tensor-core window, the nearest arriving when the
    four slots are all live, so only the rescan can find it. Far integer fillers in between."""
    rows, near, best = [], [[], []], []
    for _ in range(n_rows):
        dims = torch.randperm(d, generator=g)[:2]
        z = torch.zeros(d)
        z[dims] = torch.randint(2049, 2600, (2,), generator=g).float()
        z = z.to(dtype).float()  # the values the op sees: codes are built around them
        rows.append(z)
        for j, (a, b) in enumerate([(1, 1), (-1, -1), (1, -1), (-1, 1)]):
            c = z.clone()
            c[dims[0]] += a
            c[dims[1]] += b
            near[j // 2].append(c)
        c = z.clone()
        c[dims[0]] += 1
        best.append(c)

    def fill(count):
        f = torch.zeros(count, d)
        for row in f:
            row[torch.randperm(d, generator=g)[:2]] = torch.randint(-1500, 1500, (2,), generator=g).float()
        return f

    first, second = torch.stack(near[0]), torch.stack(near[1])
    codes = [first, fill(tile - len(first)), second, fill(tile - len(second)), fill(3 * tile + 5), torch.stack(best)]
    return torch.stack(rows).to(dtype), torch.cat(codes)


@needs_triton
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_wide_rows_more_live_candidates_than_slots_rescan(dtype, poisoned, monkeypatch):
    vqk = _vq_kernels()
    if is_interpreting():  # 64-code tiles, as on a GPU, so the candidates meet in separate tiles
        monkeypatch.setattr(vqk, "_INTERP_WIDE", (64, 64, 128))
    _split(monkeypatch, 1)  # the tiles as built: one program per row block sees them in order
    tile = vqk._pick_config(256, 4 if dtype == "fp32" else 2)["BLOCK_K"]
    n = tile // 2
    z, codebook = _crowded_windows(n, 256, _DTYPES[dtype], torch.Generator().manual_seed(5), tile)
    expected = torch.arange(n) + codebook.shape[0] - n
    _check_exact(z.to(DEVICE), codebook.to(DEVICE), False, expected)
    # random rows through many small tiles: slots go stale and are replaced as the minimum falls
    g = torch.Generator().manual_seed(6)
    _check_exact(torch.randn(70, 256, generator=g).to(_DTYPES[dtype]).to(DEVICE), torch.randn(700, 256, generator=g).to(DEVICE), False)


@needs_triton
def test_split_and_return_zq_give_the_same_answer(monkeypatch):
    vqk = _vq_kernels()
    z, codebook = _inputs(100, 1100, 12, torch.float32, seed=9)
    for normalize in (True, False):
        _split(monkeypatch, None)
        one = vqk.vq_nearest_triton(z, codebook, normalize)
        _split(monkeypatch, 3)
        split = vqk.vq_nearest_triton(z, codebook, normalize)
        i, s, zq = vqk.vq_nearest_triton(z, codebook, normalize, return_zq=True)
        assert torch.equal(one[0], split[0]) and torch.equal(split[0], i)
        # one split writes the score from the search kernel, several from the combine kernel
        torch.testing.assert_close(one[1], split[1], rtol=1e-6, atol=1e-7)
        assert torch.equal(split[1], s)  # with or without z_q: the same compiled code
        cb = F.normalize(codebook.float(), dim=1) if normalize else codebook.float()
        assert torch.equal(zq, cb[i])


def test_split_choice_fills_an_h200():
    """Splits from shapes alone: enough programs for 132 SMs at the latent quantizer's 8,192 rows,
    none needed at 65,536, never an empty split."""
    vqk = _vq_kernels()
    cpu = torch.device("cpu")
    saved = vqk.is_interpreting
    try:
        vqk.is_interpreting = lambda: False
        cfg = vqk._pick_config(12)
        bn, bk = cfg["BLOCK_N"], cfg["BLOCK_K"]
        s = vqk._pick_splits(8192, 4096, bn, bk, cpu)
        assert (8192 // bn) * s >= 3 * 132
        assert vqk._pick_splits(65536, 4096, bn, bk, cpu) == 1
        assert vqk._pick_splits(1024, 512, bn, bk, cpu) <= 512 // bk
        cfg = vqk._pick_config(256)
        assert cfg["WIDE"] and cfg["D_PAD"] == 256 and cfg["BLOCK_N"] == 128  # 16-bit: 128 resident rows
    finally:
        vqk.is_interpreting = saved


@needs_triton
def test_launch_path_makes_no_host_sync(monkeypatch):
    from alit_fast.testing import count_syncs

    vqk = _vq_kernels()
    launches = []

    class _Stub:
        def __init__(self, name):
            self.name = name

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.name, grid))

    for name in ("_vq_prep_codes_kernel", "_vq_tc_kernel", "_vq_finalize_kernel"):
        monkeypatch.setattr(vqk, name, _Stub(name))
    z, codebook = _inputs(300, 1100, 12, torch.float32, seed=10)
    for splits in (None, 3):
        _split(monkeypatch, splits)
        launches.clear()
        with count_syncs() as syncs:
            vqk.vq_nearest_triton(z[:, ::1], codebook, True)
        assert syncs.total == 0, dict(syncs)
        names = [n for n, _ in launches]
        assert names == ["_vq_prep_codes_kernel", "_vq_tc_kernel"] + (["_vq_finalize_kernel"] if splits else [])
