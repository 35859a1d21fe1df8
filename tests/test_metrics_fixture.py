"""alit_fast's FID Inception, FID and LPIPS against what pytorch-fid and lpips computed on the same
seeded weights and images (recorded by benchmarks/metric_fixtures/record.py in an environment
where those libraries import; see its docstring)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alit_fast.evaluation.metrics import FeatureStats, fid_from_stats, frechet_distance, frechet_distance_eigh
from alit_fast.models.inception import FIDInceptionV3
from benchmarks.metric_fixtures import record, seeded

FIXTURE = Path(record.__file__).resolve().parent / "fixture.npz"


@pytest.fixture(scope="module")
def fixture():
    data = np.load(FIXTURE)
    return {k: data[k] for k in data.files} | {"meta": json.loads(str(data["meta"]))}


@pytest.fixture(scope="module")
def inception_weights():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    return seeded.cached_state_dict(shapes, seeded.INCEPTION_SEED)


@pytest.fixture(scope="module")
def features(fixture, inception_weights):
    with torch.device("meta"):
        model = FIDInceptionV3()
    model.load_state_dict(inception_weights, assign=True)
    x = torch.from_numpy(fixture["images"]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        return model.eval()(x)


def test_seeded_weights_and_images_are_the_recorded_ones(fixture, inception_weights):
    """The same generator stream under this torch as under the one that recorded the fixture
    (and pytorch-fid's parameter names and shapes are ours: the checksum covers the names)."""
    meta = fixture["meta"]
    assert seeded.checksum(inception_weights) == meta["inception_checksum"]
    assert seeded.checksum(seeded.seeded_vgg16()) == meta["vgg_checksum"]
    assert seeded.checksum(seeded.seeded_lpips_heads()) == meta["heads_checksum"]
    assert np.array_equal(record.fixture_images(), fixture["images"])


def test_inception_features_equal_pytorch_fid(fixture, features):
    ref = torch.from_numpy(fixture["inception_features"])
    assert ref.abs().max() > 1 and ref.std() > 0.1  # the seeded network is not degenerate
    torch.testing.assert_close(features, ref, atol=1e-5, rtol=1e-5)


def test_fid_equals_pytorch_fid_command_line(fixture, features):
    """FID of set A vs set B from our features, streamed: equal to pytorch-fid's in-process value
    and to ``python -m pytorch_fid A B`` on PNG folders of the same images."""
    n = int(fixture["set_size"])
    a, b = FeatureStats(2048), FeatureStats(2048)
    for lo in range(0, n, 4):
        a.add(features[lo : min(lo + 4, n)])
    b.add(features[n:])
    assert abs(float(fixture["fid_cli"]) - float(fixture["fid_api"])) < 1e-3  # the recording's own check
    assert fid_from_stats(a, b) == pytest.approx(float(fixture["fid_cli"]), abs=1e-3)


def test_frechet_distance_equals_pytorch_fid_on_seeded_gaussians(fixture):
    for (p, q), ref in zip(record.frechet_cases(), fixture["frechet"]):
        # the same scipy sqrtm pytorch-fid calls; scipy releases differ in its last digits (1.17's
        # gives 51.94141637926 for the recorded 51.94141636094), so the bound is relative
        assert frechet_distance(p.mean(0), np.cov(p, rowvar=False), q.mean(0), np.cov(q, rowvar=False)) == pytest.approx(
            float(ref), rel=1e-9, abs=1e-9)
        a, b = FeatureStats(p.shape[1]), FeatureStats(p.shape[1])
        a.add(torch.from_numpy(p))
        b.add(torch.from_numpy(q))
        assert fid_from_stats(a, b) == pytest.approx(float(ref), abs=1e-6)
        assert frechet_distance_eigh(a, b) == pytest.approx(float(ref), abs=1e-6)


def _lpips_model(tmp_path, heads):
    lpips_weights = pytest.importorskip("alit_fast.io.lpips_weights")
    torch.save(seeded.seeded_vgg16(), tmp_path / "vgg16.pth")
    torch.save(heads, tmp_path / "heads.pth")
    return lpips_weights.load_lpips(tmp_path / "vgg16.pth", tmp_path / "heads.pth")


def test_lpips_equals_the_lpips_package_with_seeded_heads(fixture, tmp_path):
    model = _lpips_model(tmp_path, seeded.seeded_lpips_heads())
    x = torch.from_numpy(fixture["images"]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    n = int(fixture["set_size"])
    with torch.no_grad():
        d = model(x[:n], x[n:]).double()
    torch.testing.assert_close(d, torch.from_numpy(fixture["lpips_seeded_heads"]), atol=1e-5, rtol=0)


def test_lpips_equals_the_lpips_package_with_its_real_heads(fixture, tmp_path):
    lpips_weights = pytest.importorskip("alit_fast.io.lpips_weights")
    try:
        heads_file = lpips_weights.find_lpips_heads()
    except FileNotFoundError:
        pytest.skip("the lpips package (its v0.1 heads) is not installed here")
    heads = torch.load(heads_file, map_location="cpu", weights_only=True)
    model = _lpips_model(tmp_path, heads)
    x = torch.from_numpy(fixture["images"]).permute(0, 3, 1, 2).float() / 255 * 2 - 1
    n = int(fixture["set_size"])
    with torch.no_grad():
        d = model(x[:n], x[n:]).double()
    torch.testing.assert_close(d, torch.from_numpy(fixture["lpips_real_heads"]), atol=1e-5, rtol=0)


def test_fixture_stays_small():
    assert FIXTURE.stat().st_size < 1_000_000
