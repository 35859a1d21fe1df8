"""Per-image reconstruction metrics and the running sums they are averaged and FID'd with.

Every per-image value is computed on the device in one batched call; what is kept across batches
is a float64 sum (per metric) or, for FID, a feature count, sum and Gram matrix per image set.
Sums add, so a data set is reduced batch by batch, and ranks of a distributed run by one
``all_reduce``; nothing grows with the number of images.

Conventions (all images in [0, 1], data range 1):

- ``l1`` / ``l2``: mean |x - y| and mean (x - y)^2 over C x H x W, as the official evaluation
  prints them ("Log-Laplace" / "Log-Gaussian").
- ``psnr``: 10 log10(1 / mse) per image, averaged over images; an image reconstructed exactly
  (PSNR infinite) is left out of the mean and counted apart, so one perfect image cannot turn the
  average into infinity.
- ``ssim``: scikit-image's ``structural_similarity(x, y, data_range=1, gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, channel_axis=0)``: an 11-tap Gaussian window
  (truncated at 3.5 sigma), the map cropped by the window radius, averaged over pixels and then
  channels.
- FID: pytorch-fid's ``calculate_frechet_distance`` on the means and covariances (scipy sqrtm).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5  # scipy.ndimage.gaussian_filter's default, which scikit-image uses
SSIM_K1, SSIM_K2 = 0.01, 0.03


def quantize_uint8(images: torch.Tensor) -> torch.Tensor:
    """What the official evaluation's PNG round trip does to an image in [0, 1]: clip x*255 to
    [0, 255] and cast to uint8 by truncation (no rounding), read back as k / 255."""
    return (images.float() * 255.0).clamp_(0.0, 255.0).floor_().div_(255.0)


def l1_l2(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image mean |x - y| and mean (x - y)^2, float64 [B]."""
    diff = x.double() - y.double()
    return diff.abs().flatten(1).mean(1), diff.square().flatten(1).mean(1)


def psnr_from_mse(mse: torch.Tensor) -> torch.Tensor:
    """10 log10(1 / mse) (data range 1); +inf where mse is 0."""
    return 10.0 * torch.log10(1.0 / mse)


def gaussian_window(sigma: float = SSIM_SIGMA, truncate: float = SSIM_TRUNCATE) -> np.ndarray:
    """scipy's 1-D Gaussian kernel: radius int(truncate * sigma + 0.5), normalised to sum 1."""
    radius = int(truncate * sigma + 0.5)
    x = np.arange(-radius, radius + 1, dtype=np.float64)
    w = np.exp(-0.5 * x * x / (sigma * sigma))
    return w / w.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Per-image SSIM [B] (scikit-image's Gaussian-window form, data range 1), in ``dtype``.

    scikit-image filters the whole image (reflecting at the borders) and then crops the window
    radius away, so every pixel kept saw only real pixels: a valid convolution is the same thing."""
    window = torch.from_numpy(gaussian_window()).to(device=x.device, dtype=dtype)
    k = window.numel()
    if min(x.shape[-2:]) < k:
        raise ValueError(f"SSIM's {k}x{k} window needs images of at least {k}x{k} pixels, got {list(x.shape[-2:])}")
    B, C, H, W = x.shape
    x = x.to(dtype).reshape(B * C, 1, H, W)
    y = y.to(dtype).reshape(B * C, 1, H, W)
    # the five filtered maps in one separable pass: [5 * B * C, 1, H, W]
    stack = torch.cat([x, y, x * x, y * y, x * y])
    stack = F.conv2d(stack, window.view(1, 1, 1, k))
    stack = F.conv2d(stack, window.view(1, 1, k, 1))
    ux, uy, uxx, uyy, uxy = stack.chunk(5)
    vx, vy, vxy = uxx - ux * ux, uyy - uy * uy, uxy - ux * uy
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    return s.reshape(B, C, -1).mean(-1).mean(-1).double()


# ---------------------------------------------------------------------- running sums
@dataclass
class FeatureStats:
    """Count, sum and Gram matrix of a set's feature vectors, in float64.

    While a set has at most ``dim`` vectors the vectors themselves are kept too (no more memory
    than the Gram matrix): the Fréchet distance of such a set is then computed in the n x n space
    the covariance lives in, which for a few hundred images is a small SVD instead of two
    2048 x 2048 eigendecompositions."""

    dim: int
    device: torch.device | str = "cpu"
    count: torch.Tensor = field(init=False)
    total: torch.Tensor = field(init=False)
    gram: torch.Tensor = field(init=False)
    rows: list[torch.Tensor] | None = field(init=False)
    _kept: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.count = torch.zeros((), dtype=torch.float64, device=self.device)
        self.total = torch.zeros(self.dim, dtype=torch.float64, device=self.device)
        self.gram = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.device)
        self.rows = []

    def add(self, features: torch.Tensor) -> None:
        f = features.double()
        self.count += f.shape[0]
        self.total += f.sum(0)
        self.gram.addmm_(f.T, f)
        if self.rows is not None:
            self._kept += f.shape[0]
            self.rows = self.rows + [f] if self._kept <= self.dim else None

    def drop_rows(self) -> None:
        """Forget the kept vectors (after a cross-process reduction, which sums only the Gram)."""
        self.rows = None

    def tensors(self) -> list[torch.Tensor]:
        return [self.count, self.total, self.gram]

    def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance (np.cov's, which pytorch-fid uses) as float64 numpy arrays."""
        n = float(self.count)
        if n < 2:
            raise ValueError(f"FID needs at least 2 images per set, got {int(n)}")
        mu = (self.total / n).cpu().numpy()
        gram = self.gram.cpu().numpy()
        cov = (gram - n * np.outer(mu, mu)) / (n - 1)
        return mu, (cov + cov.T) / 2  # symmetric to the last bit, as np.cov's is


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray, eps: float = 1e-6) -> float:
    """The Fréchet distance between two Gaussians, computed the way pytorch-fid does: scipy's
    sqrtm of sigma1 @ sigma2; when that is not finite (singular products: fewer images than
    dimensions), eps on both diagonals and again; a complex result with a sizeable imaginary
    diagonal is an error, a small one is dropped."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(mu1), np.atleast_1d(mu2)
    sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("the two sets' means and covariances must have the same shapes")
    diff = mu1 - mu2
    with warnings.catch_warnings():  # scipy's "singular matrix" notes: the finiteness check below decides
        warnings.simplefilter("ignore")
        # pytorch-fid passes disp=False, which scipy 1.17 deprecates; the matrix is the same
        covmean = linalg.sqrtm(sigma1.dot(sigma2))
        if not np.isfinite(covmean).all():
            offset = np.eye(sigma1.shape[0]) * eps
            covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"FID: the matrix square root has an imaginary part of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_rows(x1: torch.Tensor, x2: torch.Tensor) -> float:
    """The Fréchet distance from the feature vectors themselves ([n1, d], [n2, d], float64): with
    A, B the centered vectors over sqrt(n - 1), S1 S2 = A^T (A B^T) B has the non-zero eigenvalues
    of (A B^T)(A B^T)^T, so tr sqrt(S1 S2) is the sum of the singular values of A B^T (n1 x n2)."""
    n1, n2 = x1.shape[0], x2.shape[0]
    if min(n1, n2) < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {min(n1, n2)}")
    mu1, mu2 = x1.mean(0), x2.mean(0)
    a = (x1 - mu1) / math.sqrt(n1 - 1)
    b = (x2 - mu2) / math.sqrt(n2 - 1)
    diff = mu1 - mu2
    nuclear = torch.linalg.svdvals(a @ b.T).sum()
    return float(diff.dot(diff) + a.square().sum() + b.square().sum() - 2 * nuclear)


def frechet_distance_eigh(a: FeatureStats, b: FeatureStats) -> float:
    """The same distance with tr sqrt(S1 S2) from two symmetric eigendecompositions, in float64 on
    the statistics' device: S1 S2 has the eigenvalues of the PSD matrix R S2 R (R = S1^1/2), so the
    trace of its square root is the sum of their square roots (tiny negative round-off clipped).
    scipy's sqrtm of the non-symmetric product is what pytorch-fid runs; at 2048 dimensions it
    took 2.5 minutes on this project's 2-core CPU, this 20-40 s there and well under a second on a
    GPU, and the two agree to ~1e-7 on the recorded fixtures (tests/test_metrics_fixture.py)."""
    mu1, s1 = _mean_cov_torch(a)
    mu2, s2 = _mean_cov_torch(b)
    w, v = torch.linalg.eigh(s1)
    root = (v * w.clamp(min=0).sqrt()) @ v.T
    m = root @ s2 @ root
    ev = torch.linalg.eigvalsh((m + m.T) / 2)
    diff = mu1 - mu2
    total = diff.dot(diff) + torch.trace(s1) + torch.trace(s2) - 2 * ev.clamp(min=0).sqrt().sum()
    return float(total)


def _mean_cov_torch(stats: FeatureStats) -> tuple[torch.Tensor, torch.Tensor]:
    n = float(stats.count)
    if n < 2:
        raise ValueError(f"FID needs at least 2 images per set, got {int(n)}")
    mu = stats.total / n
    cov = (stats.gram - n * torch.outer(mu, mu)) / (n - 1)
    return mu, (cov + cov.T) / 2


def fid_from_stats(a: FeatureStats, b: FeatureStats, method: str = "eigh") -> float:
    """FID between two sets' running statistics; ``method`` "eigh" (default) or "sqrtm" (pytorch-fid's)."""
    if method == "eigh":
        if a.rows is not None and b.rows is not None:
            return frechet_distance_rows(torch.cat(a.rows), torch.cat(b.rows))
        return frechet_distance_eigh(a, b)
    if method != "sqrtm":
        raise ValueError(f"unknown FID method {method!r}; expected 'eigh' or 'sqrtm'")
    mu1, s1 = a.mean_cov()
    mu2, s2 = b.mean_cov()
    return frechet_distance(mu1, s1, mu2, s2)


def spearman(x: "list[float] | np.ndarray", y: "list[float] | np.ndarray") -> float:
    """Spearman's rank correlation, ties at their mean rank; NaN for fewer than 2 points or a constant side."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    rx, ry = _ranks(x), _ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / math.sqrt((rx * rx).sum() * (ry * ry).sum()))


def _ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(values.size, dtype=np.float64)
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    if uniq.size != values.size:  # ties: each gets the mean of the ranks they span
        means = np.bincount(inverse, weights=ranks) / counts
        ranks = means[inverse]
    return ranks


@dataclass
class MetricSums:
    """Float64 sums of the per-image metrics of one row (a token count or a criterion)."""

    names: tuple[str, ...]
    device: torch.device | str = "cpu"
    # one slot per metric, plus: images, exact reconstructions (PSNR inf), tokens
    sums: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.sums = torch.zeros(len(self.names) + 3, dtype=torch.float64, device=self.device)

    def add(self, values: dict[str, torch.Tensor], count: int, tokens: torch.Tensor | None = None) -> None:
        """``values``: name -> per-image float64 [count]; ``tokens``: per-image counts [count]."""
        parts = []
        n = int(count)
        exact = None
        for name in self.names:
            v = values[name].double()
            if name == "psnr":
                finite = torch.isfinite(v)
                exact = (~finite).sum().double()
                v = torch.where(finite, v, torch.zeros_like(v))
            parts.append(v.sum())
        parts.append(torch.tensor(float(n), dtype=torch.float64, device=self.sums.device))
        parts.append(exact if exact is not None else torch.zeros((), dtype=torch.float64, device=self.sums.device))
        parts.append(tokens.double().sum() if tokens is not None else torch.zeros((), dtype=torch.float64, device=self.sums.device))
        self.sums += torch.stack(parts)

    def means(self) -> dict[str, float]:
        """Per-metric means over images (PSNR over images not reconstructed exactly)."""
        values = self.sums.tolist()
        images, exact, tokens = values[-3], values[-2], values[-1]
        out: dict[str, float] = {}
        for name, total in zip(self.names, values):
            if name == "psnr":
                finite = images - exact
                out[name] = total / finite if finite > 0 else math.inf
                out["psnr_exact_images"] = int(exact)
            else:
                out[name] = total / images if images > 0 else math.nan
        out["images"] = int(images)
        out["mean_tokens"] = tokens / images if images > 0 else math.nan
        return out
