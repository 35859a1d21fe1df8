"""Per-image metrics against scikit-image / numpy / scipy float64 references, the streaming sums
against one-shot computations, and the constructed cases (identical sets, exact reconstructions)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image

from alit_fast.evaluation.data import center_crop_box, official_center_crop
from alit_fast.evaluation.metrics import (
    FeatureStats,
    MetricSums,
    fid_from_stats,
    frechet_distance,
    frechet_distance_eigh,
    frechet_distance_rows,
    l1_l2,
    psnr_from_mse,
    quantize_uint8,
    spearman,
    ssim,
)
from tests._single_thread import one_thread  # noqa: F401

skimage_metrics = pytest.importorskip("skimage.metrics")


def _pair(seed: int, shape=(3, 3, 37, 29), noise=0.1, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    y = (x + noise * torch.randn(shape, generator=g, dtype=torch.float64)).clamp(0, 1)
    return x.to(dtype), y.to(dtype)


@pytest.mark.parametrize("shape,noise", [((3, 3, 37, 29), 0.1), ((2, 3, 11, 16), 0.3), ((1, 3, 64, 48), 0.02)])
def test_ssim_equals_scikit_image_gaussian_window(shape, noise):
    x, y = _pair(1, shape, noise)
    ref = [
        skimage_metrics.structural_similarity(
            a.numpy(), b.numpy(), data_range=1, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, channel_axis=0
        )
        for a, b in zip(x, y)
    ]
    torch.testing.assert_close(ssim(x, y), torch.tensor(ref, dtype=torch.float64), atol=1e-12, rtol=0)
    # the float32 path (what a GPU run may use) stays well inside the 1e-4 the issue asks for
    torch.testing.assert_close(ssim(x.float(), y.float(), dtype=torch.float32), torch.tensor(ref, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_ssim_refuses_images_smaller_than_its_window():
    x, y = _pair(2, (1, 3, 10, 40))
    with pytest.raises(ValueError, match="11x11 window"):
        ssim(x, y)


def test_psnr_l1_l2_equal_float64_references():
    x, y = _pair(3, (4, 3, 23, 31), 0.2)
    l1, l2 = l1_l2(x.float(), y.float())
    torch.testing.assert_close(l1, (x - y).abs().mean((1, 2, 3)), atol=1e-7, rtol=0)
    torch.testing.assert_close(l2, (x - y).square().mean((1, 2, 3)), atol=1e-8, rtol=0)
    ref = [skimage_metrics.peak_signal_noise_ratio(a.float().double().numpy(), b.float().double().numpy(), data_range=1)
           for a, b in zip(x, y)]
    torch.testing.assert_close(psnr_from_mse(l2), torch.tensor(ref, dtype=torch.float64), atol=1e-4, rtol=0)


def test_quantize_truncates_like_the_official_png_round_trip():
    # the official code clips x*255 to [0, 255] and casts to uint8, which truncates
    x = torch.tensor([0.0, 1 / 255, 0.99999, 1.0, 1.7, -0.2, 100.6 / 255, 37 / 255])
    expected = torch.tensor([0, 1, 254, 255, 255, 0, 100, 37], dtype=torch.float32) / 255
    assert torch.equal(quantize_uint8(x), expected)
    k = torch.arange(256, dtype=torch.float32) / 255  # ToTensor's values survive unchanged
    assert torch.equal(quantize_uint8(k), k)


def test_psnr_of_exact_reconstructions_is_counted_apart_not_averaged():
    sums = MetricSums(("l2", "psnr"))
    mse = torch.tensor([0.0, 0.01, 0.001], dtype=torch.float64)
    sums.add({"l2": mse, "psnr": psnr_from_mse(mse)}, 3)
    means = sums.means()
    assert means["psnr_exact_images"] == 1
    assert means["psnr"] == pytest.approx((20.0 + 30.0) / 2)
    assert means["l2"] == pytest.approx(0.011 / 3)
    only_exact = MetricSums(("psnr",))
    only_exact.add({"psnr": psnr_from_mse(torch.zeros(2, dtype=torch.float64))}, 2)
    assert math.isinf(only_exact.means()["psnr"]) and only_exact.means()["psnr_exact_images"] == 2


def test_feature_stats_streamed_in_batches_equal_one_shot_numpy_cov():
    g = torch.Generator().manual_seed(4)
    feats = torch.rand(37, 24, generator=g, dtype=torch.float64) * 3 + 0.5
    streamed = FeatureStats(24)
    for lo in range(0, 37, 5):
        streamed.add(feats[lo : lo + 5].float())
    once = FeatureStats(24)
    once.add(feats.float())
    mu, cov = streamed.mean_cov()
    f32 = feats.float().double().numpy()
    np.testing.assert_allclose(mu, f32.mean(0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(cov, np.cov(f32, rowvar=False), rtol=0, atol=1e-12)
    # both the kept vectors and the Gram path give the same distance for both accumulations
    assert fid_from_stats(streamed, once) == pytest.approx(0.0, abs=1e-9)
    streamed.drop_rows()
    assert frechet_distance_eigh(streamed, once) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("n1,n2,dim", [(300, 200, 16), (40, 30, 64)])
def test_fid_paths_agree_with_the_pytorch_fid_formula(n1, n2, dim):
    """sqrtm (pytorch-fid's), eigh (Gram statistics) and rows (kept vectors) are the same distance,
    with enough and with too few images for a full-rank covariance."""
    g = torch.Generator().manual_seed(5)
    a_rows = torch.randn(n1, dim, generator=g, dtype=torch.float64)
    b_rows = 0.7 * torch.randn(n2, dim, generator=g, dtype=torch.float64) + 0.3
    a, b = FeatureStats(dim), FeatureStats(dim)
    a.add(a_rows)
    b.add(b_rows)
    ref = frechet_distance(a_rows.mean(0).numpy(), np.cov(a_rows.numpy(), rowvar=False),
                           b_rows.mean(0).numpy(), np.cov(b_rows.numpy(), rowvar=False))
    assert fid_from_stats(a, b, "sqrtm") == pytest.approx(ref, abs=1e-6)
    assert frechet_distance_rows(a_rows, b_rows) == pytest.approx(ref, abs=1e-6)
    assert frechet_distance_eigh(a, b) == pytest.approx(ref, abs=1e-6)


def test_fid_of_identical_sets_is_zero_and_of_shifted_sets_the_squared_shift():
    g = torch.Generator().manual_seed(6)
    rows = torch.rand(50, 32, generator=g, dtype=torch.float64)
    a, b, c = FeatureStats(32), FeatureStats(32), FeatureStats(32)
    a.add(rows)
    b.add(rows.flip(0))  # same set, other order
    c.add(rows + 0.25)  # same covariance, mean moved by 0.25 in every dimension
    for method in ("eigh", "sqrtm"):
        assert fid_from_stats(a, b, method) == pytest.approx(0.0, abs=1e-8)
        assert fid_from_stats(a, c, method) == pytest.approx(32 * 0.25**2, abs=1e-8)
    one = FeatureStats(32)
    one.add(rows[:1])
    with pytest.raises(ValueError, match="at least 2 images"):
        fid_from_stats(one, a)


def test_spearman_equals_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    g = np.random.default_rng(7)
    x = g.integers(0, 5, 40).astype(float)
    y = x * 0.5 + g.random(40)
    y[:5] = y[5]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    # the demo's token counts against complexity levels: many ties on both sides
    x, y = [32, 32, 64, 96, 96, 128, 64, 32], [0, 1, 1, 2, 3, 4, 2, 0]
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y).statistic)


@pytest.mark.parametrize("h,w", [(40, 40), (41, 43), (35, 36), (20, 30), (31, 12), (33, 70)])
def test_center_crop_follows_torchvision_rounding_and_padding(h, w):
    """torchvision's CenterCrop: offsets round((dim - size) / 2) with Python's half-to-even round;
    a side smaller than the crop is zero-padded, the odd pixel going right / bottom. (Checked
    against torchvision 0.29.1 itself when this test was written.)"""
    rng = np.random.default_rng(h * 100 + w)
    array = rng.integers(1, 256, (h, w, 3), dtype=np.uint8)
    out = official_center_crop(Image.fromarray(array), 32)
    assert out.shape == (32, 32, 3)
    if h >= 32 and w >= 32:
        left, top = center_crop_box(w, h, 32)
        assert (left, top) == (int(round((w - 32) / 2)), int(round((h - 32) / 2)))
        assert np.array_equal(out, array[top : top + 32, left : left + 32])
    else:
        padded = np.pad(array, ((max(0, (32 - h) // 2), max(0, (32 - h + 1) // 2)),
                                (max(0, (32 - w) // 2), max(0, (32 - w + 1) // 2)), (0, 0)))
        left, top = center_crop_box(padded.shape[1], padded.shape[0], 32)
        assert np.array_equal(out, padded[top : top + 32, left : left + 32])
        assert (out == 0).any()
    assert center_crop_box(33, 35, 32) == (0, 2)  # round(0.5) = 0, round(1.5) = 2


def test_resize_crop_is_the_custom_images_transform_and_bad_files_are_named(tmp_path):
    from alit_fast.evaluation.data import read_image

    rng = np.random.default_rng(9)
    array = rng.integers(0, 256, (40, 64, 3), dtype=np.uint8)
    Image.fromarray(array).save(tmp_path / "wide.png")
    got = read_image(tmp_path / "wide.png", 32, "resize")
    resized = np.array(Image.fromarray(array).resize((51, 32), Image.BICUBIC))  # shorter side 40 -> 32
    left = int(round((51 - 32) / 2))
    assert torch.equal(got, torch.from_numpy(resized[:, left : left + 32]).permute(2, 0, 1))
    (tmp_path / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        read_image(tmp_path / "broken.png", 32)
