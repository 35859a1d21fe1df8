"""The FID Inception's weights file: found in torch hub's cache or at a path, read unchanged, and
one-line errors for a missing or wrong file. Nothing downloads."""
from __future__ import annotations

import pytest
import torch

from alit_fast.evaluation.weights import FID_WEIGHTS_FILE, FIDWeightsError, find_fid_weights, load_fid_inception
from alit_fast.models.inception import FIDInceptionV3
from benchmarks.metric_fixtures import seeded


@pytest.fixture(scope="module")
def weights():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    return seeded.cached_state_dict(shapes, seeded.INCEPTION_SEED)


@pytest.fixture()
def hub(tmp_path, monkeypatch):
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(before)


def test_weights_are_read_from_torch_hubs_cache_under_pytorch_fids_file_name(hub, weights):
    (hub / "checkpoints").mkdir(parents=True)
    torch.save(weights, hub / "checkpoints" / FID_WEIGHTS_FILE)
    model = load_fid_inception()
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    torch.testing.assert_close(model.Mixed_7c.branch_pool.conv.weight, weights["Mixed_7c.branch_pool.conv.weight"])


def test_missing_weights_is_one_line_naming_the_file_and_where_it_goes(hub):
    with pytest.raises(FIDWeightsError) as info:
        find_fid_weights()
    message = str(info.value)
    assert "\n" not in message and FID_WEIGHTS_FILE in message
    assert str(hub / "checkpoints") in message and "--fid-weights" in message
    with pytest.raises(FIDWeightsError, match="nowhere.pth, does not exist"):
        find_fid_weights("/nowhere.pth")


def test_a_file_of_another_network_is_refused_by_name(tmp_path, weights):
    path = tmp_path / "other.pth"
    torch.save({k: v for k, v in weights.items() if not k.startswith("Mixed_6b.")}, path)
    with pytest.raises(FIDWeightsError, match="has no Mixed_6b"):
        load_fid_inception(path)
    torch.save({**weights, "Conv2d_1a_3x3.conv.weight": torch.zeros(8, 3, 3, 3)}, path)
    with pytest.raises(FIDWeightsError, match=r"shape \[8, 3, 3, 3\]"):
        load_fid_inception(path)
    path.write_text("not a checkpoint")
    with pytest.raises(FIDWeightsError, match="could not be read"):
        load_fid_inception(path)


def test_a_file_without_batch_norm_counters_loads(tmp_path, weights):
    path = tmp_path / "old.pth"
    torch.save({k: v for k, v in weights.items() if not k.endswith("num_batches_tracked")}, path)
    model = load_fid_inception(path)
    torch.testing.assert_close(model.fc.weight, weights["fc.weight"])


class _Stop(Exception):
    pass


def test_inputs_already_299_are_not_resampled_and_others_are_resized_bilinearly():
    with torch.device("meta"):
        model = FIDInceptionV3()
    seen = []

    def grab(module, args):  # what the first convolution gets; the rest of the network is not needed
        seen.append(args[0])
        raise _Stop

    model.Conv2d_1a_3x3.register_forward_pre_hook(grab)
    x = torch.rand(1, 3, 299, 299, generator=torch.Generator().manual_seed(0))
    for images in (x, x[..., :40, :33]):
        with pytest.raises(_Stop):
            model(images)
    torch.testing.assert_close(seen[0], 2 * x - 1)
    ref = torch.nn.functional.interpolate(x[..., :40, :33], size=(299, 299), mode="bilinear", align_corners=False)
    torch.testing.assert_close(seen[1], 2 * ref - 1)
