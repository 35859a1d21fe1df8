"""LPIPS (VGG16, lpips v0.1 heads): the module against an independent float64 computation on
seeded random weights in torchvision's and lpips's file layouts, and the weight-file look-ups
(torch hub cache, the lpips package's data, explicit paths, one-line errors)."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from alit_fast.io.lpips_weights import (
    VGG16_FILE,
    LPIPSWeightsError,
    find_lpips_heads,
    find_vgg16,
    load_lpips,
)
from alit_fast.models.lpips import LPIPS
from tests._single_thread import one_thread  # noqa: F401

# torchvision's vgg16 features: (index, in, out) of each conv
CONVS = [(0, 3, 64), (2, 64, 64), (5, 64, 128), (7, 128, 128), (10, 128, 256), (12, 256, 256), (14, 256, 256),
         (17, 256, 512), (19, 512, 512), (21, 512, 512), (24, 512, 512), (26, 512, 512), (28, 512, 512)]
POOL_AFTER = {2, 7, 14, 21}  # conv indices followed (after their ReLU) by a max pool
TAP_AFTER = {2, 7, 14, 21, 28}  # conv indices whose ReLU LPIPS reads


def random_vgg16(seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision's vgg16 state-dict layout (features only: the classifier is 120M parameters
    LPIPS never reads), He-scaled so activations keep their size through 13 layers."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for i, cin, cout in CONVS:
        state[f"features.{i}.weight"] = torch.randn(cout, cin, 3, 3, generator=g) * math.sqrt(2.0 / (9 * cin))
        state[f"features.{i}.bias"] = torch.randn(cout, generator=g) * 0.05
    return state


def random_heads(seed: int = 1) -> dict[str, torch.Tensor]:
    """lpips's weights/v0.1/vgg.pth layout: non-negative 1x1 weights, no bias."""
    g = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, c, 1, 1, generator=g) for k, c in enumerate((64, 128, 256, 512, 512))}


def reference_lpips(vgg: dict, heads: dict, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """LPIPS in float64 written from the paper's definition, one image batch at a time."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)

    def taps(img):
        h = (img.double() - shift) / scale
        out = []
        for i, _, _ in CONVS:
            h = F.relu(F.conv2d(h, vgg[f"features.{i}.weight"].double(), vgg[f"features.{i}.bias"].double(), padding=1))
            if i in TAP_AFTER:
                out.append(h)
            if i in POOL_AFTER:
                h = F.max_pool2d(h, 2)
        return out

    total = torch.zeros(x.shape[0], dtype=torch.float64)
    for k, (a, b) in enumerate(zip(taps(x), taps(y))):
        a = a / (torch.linalg.vector_norm(a, dim=1, keepdim=True) + 1e-10)
        b = b / (torch.linalg.vector_norm(b, dim=1, keepdim=True) + 1e-10)
        w = heads[f"lin{k}.model.1.weight"].double().view(1, -1, 1, 1)
        total += ((a - b) ** 2 * w).sum(1).mean(dim=(1, 2))
    return total


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A torch hub dir holding random VGG16 weights, and an lpips heads file."""
    root = tmp_path_factory.mktemp("lpips")
    hub = root / "hub"
    (hub / "checkpoints").mkdir(parents=True)
    vgg, heads = random_vgg16(), random_heads()
    torch.save(vgg, hub / "checkpoints" / VGG16_FILE)
    torch.save(heads, root / "vgg.pth")
    return {"hub": hub, "heads_path": root / "vgg.pth", "vgg": vgg, "heads": heads, "root": root}


@pytest.fixture(scope="module")
def loaded(weights) -> LPIPS:
    return load_lpips(vgg_path=weights["hub"] / "checkpoints" / VGG16_FILE, heads_path=weights["heads_path"])


@pytest.fixture
def hub_cache(weights, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(weights["hub"]))
    return weights


def _images(seed: int, shape=(3, 3, 24, 20)) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_lpips_matches_float64_reference_on_random_weights(hub_cache):
    model = load_lpips(heads_path=hub_cache["heads_path"])
    x, y = _images(0), _images(1)
    got = model(x, y)
    want = reference_lpips(hub_cache["vgg"], hub_cache["heads"], x, y)
    assert got.shape == (3,) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-7)
    # a distance: zero on identical images, and the images' order does not matter
    assert model(x, x).abs().max() < 1e-6
    torch.testing.assert_close(model(y, x), got, rtol=1e-5, atol=1e-7)


def test_load_lpips_is_frozen_eval_and_dropout_acts_only_in_train_mode(loaded):
    model = loaded
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    x, y = _images(2, (2, 3, 32, 32)), _images(3, (2, 3, 32, 32))
    torch.testing.assert_close(model(x, y), model(x, y), rtol=0, atol=0)
    torch.manual_seed(0)
    noisy = model.train()(x, y)  # the official stage-2 quirk: lpips's heads' dropout on
    model.eval()
    assert not torch.allclose(noisy, model(x, y))


def test_gradient_flows_to_the_images(loaded):
    model = loaded
    x = _images(4, (2, 3, 32, 32)).requires_grad_()
    model(x, _images(5, (2, 3, 32, 32))).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_vgg16_is_found_in_the_torch_hub_cache(hub_cache):
    assert find_vgg16() == hub_cache["hub"] / "checkpoints" / VGG16_FILE


def test_missing_vgg16_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(LPIPSWeightsError) as info:
        find_vgg16()
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "checkpoints" / VGG16_FILE) in message
    with pytest.raises(LPIPSWeightsError, match="nowhere.pth"):
        load_lpips(vgg_path=tmp_path / "nowhere.pth", heads_path=tmp_path / "x.pth")


def test_heads_are_found_in_the_lpips_package_without_importing_it(weights, monkeypatch):
    import sys

    site = weights["root"] / "site"
    data = site / "lpips" / "weights" / "v0.1"
    data.mkdir(parents=True)
    (site / "lpips" / "__init__.py").write_text("raise ImportError('importing lpips is not allowed here')\n")
    (data / "vgg.pth").write_bytes(weights["heads_path"].read_bytes())
    monkeypatch.syspath_prepend(str(site))
    assert find_lpips_heads() == data / "vgg.pth"
    assert "lpips" not in sys.modules


def test_missing_heads_and_wrong_files_are_named(hub_cache, tmp_path):
    with pytest.raises(LPIPSWeightsError, match="missing.pth"):
        find_lpips_heads(tmp_path / "missing.pth")
    bad = dict(hub_cache["heads"])
    bad["lin2.model.1.weight"] = torch.rand(1, 7, 1, 1)
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(LPIPSWeightsError, match=r"lins\.2\.1\.weight has shape \[1, 7, 1, 1\]"):
        load_lpips(heads_path=tmp_path / "bad.pth")
    torch.save({"lin0.model.1.weight": bad["lin0.model.1.weight"]}, tmp_path / "short.pth")
    with pytest.raises(LPIPSWeightsError, match="has no lin1.model.1.weight"):
        load_lpips(heads_path=tmp_path / "short.pth")


def test_lpips_refuses_mismatched_batches():
    with pytest.raises(ValueError, match="same shape"):
        LPIPS()(torch.zeros(1, 3, 32, 32), torch.zeros(2, 3, 32, 32))


def official_lpips_keys(vgg: dict, heads: dict, copies: int = 2) -> dict[str, torch.Tensor]:
    """How an official ALIT stage-2 checkpoint stores its LPIPS: one copy per iteration, VGG16 in
    lpips's slices (torchvision's indices kept), the scaling layer, the heads."""
    slices = {1: (0, 2), 2: (5, 7), 3: (10, 12, 14), 4: (17, 19, 21), 5: (24, 26, 28)}
    out = {}
    for i in range(copies):
        p = f"gan_losses.{i}.perceptual_loss."
        out[p + "scaling_layer.shift"] = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
        out[p + "scaling_layer.scale"] = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
        for s, idx in slices.items():
            for j in idx:
                for w in ("weight", "bias"):
                    out[f"{p}net.slice{s}.{j}.{w}"] = vgg[f"features.{j}.{w}"]
        out.update({p + k: v for k, v in heads.items()})
    return out


def test_lpips_loads_from_an_official_stage2_checkpoint(weights, loaded, tmp_path):
    path = tmp_path / "official.pth"
    torch.save({"model": official_lpips_keys(weights["vgg"], weights["heads"]), "epoch": 3}, path)
    from_checkpoint = load_lpips(checkpoint=path)
    x, y = _images(6, (2, 3, 16, 16)), _images(7, (2, 3, 16, 16))
    torch.testing.assert_close(from_checkpoint(x, y), loaded(x, y), rtol=0, atol=0)
    torch.save({"model": {"encoder_positional_embedding": torch.zeros(1)}}, tmp_path / "stage1.pth")
    with pytest.raises(LPIPSWeightsError, match="no gan_losses.0.perceptual_loss"):
        load_lpips(checkpoint=tmp_path / "stage1.pth")
