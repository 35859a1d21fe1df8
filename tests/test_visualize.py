"""Token visualisation: the recorded decoder attention equals nn.MultiheadAttention's own weights,
and `alit-fast visualize` draws those maps (and the images sorted by token count) into its PNG."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import alit_fast
from alit_fast.cli import main as cli_main
from alit_fast.inference.attention_maps import token_attention_maps
from alit_fast.io import ALIT
from alit_fast.io.images import find_images, load_image
from alit_fast.io.visualize import heat_overlay, token_sheet
from alit_fast.testing import random_images, tiny_config
from tests._single_thread import one_thread  # noqa: F401


def _reference_maps(model: ALIT, z_q: torch.Tensor, first: int) -> torch.Tensor:
    """Per decoder layer, nn.MultiheadAttention's head-averaged weights on that layer's input, in
    float64, then the mean over layers: [B, first, g, g]."""
    inputs: list[tuple] = []
    # a block's attention reads ln_1 of the block's input
    handles = [b.register_forward_hook(lambda m, a, o: inputs.append((m.attn, m.ln_1(a[0])))) for b in model.decoder.transformer]
    try:
        with torch.no_grad():
            model.decode_logits(z_q)
    finally:
        for h in handles:
            h.remove()
    layers = []
    for attn, x in inputs:
        xt = x.double().transpose(0, 1)
        _, weights = F.multi_head_attention_forward(
            xt, xt, xt, x.shape[-1], attn.heads, attn.in_proj_weight.double(), attn.in_proj_bias.double(),
            None, None, False, 0.0, attn.out_proj.weight.double(), attn.out_proj.bias.double(),
            training=False, need_weights=True, average_attn_weights=True,
        )
        layers.append(weights)
    probs = torch.stack(layers).mean(0)
    g = model.config.grid_size
    G2 = g * g
    return probs[:, 1 : G2 + 1, G2 + 1 : G2 + 1 + first].transpose(1, 2).reshape(z_q.shape[0], first, g, g)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.host_triton)])
def test_token_attention_maps_equal_multihead_attention_weights(backend):
    torch.manual_seed(0)
    model = ALIT(tiny_config(), backend=backend).eval()
    z_q = model.rollout(random_images(2, 32, seed=1))[-1].z_q
    maps = token_attention_maps(model, z_q, first=5)
    expected = _reference_maps(model, z_q, first=5)
    assert maps.shape == (2, 5, 8, 8)
    torch.testing.assert_close(maps.double(), expected, rtol=1e-5, atol=1e-7)
    # each grid cell's attention over all keys sums to 1, so the maps are probabilities
    assert float(maps.min()) >= 0 and float(maps.max()) <= 1


def test_one_layer_and_bad_layer_arguments():
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval()
    z_q = model.rollout(random_images(1, 32))[-1].z_q
    assert not torch.equal(token_attention_maps(model, z_q, 3, layers=0), token_attention_maps(model, z_q, 3, layers=1))
    with pytest.raises(ValueError, match="layer index"):
        token_attention_maps(model, z_q, 3, layers=5)
    with pytest.raises(ValueError, match="first must be"):
        token_attention_maps(model, z_q, first=z_q.shape[1] + 1)


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("imgs")
    from alit_fast.cli.demo import demo_images

    for item in demo_images(32, per_level=1, photos=False)[:4]:
        array = (item.image.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{item.name}.png")
    return folder


def test_visualize_png_panels_equal_recorded_attention(image_dir, tmp_path, capsys):
    out = tmp_path / "viz.png"
    argv = ["visualize", str(image_dir), "--out", str(out), "--sheets", "2", "--tokens-shown", "4", "--scale", "2"]
    assert cli_main(argv) == 0
    picture = np.array(Image.open(out).convert("RGB"))
    model = alit_fast.load_pretrained("demo")
    images = torch.stack([load_image(p, 32) for p in find_images([image_dir])])
    z_q = model.rollout(images[:2])[-1].z_q
    expected_maps = _reference_maps(model, z_q, first=4).float()
    layout = token_sheet(model, images[:2], first=4, scale=2)  # positions only
    for b in range(2):
        source = (images[b].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8).repeat(2, 0).repeat(2, 1)
        for j in range(4):
            x0, y0, x1, y1 = layout.boxes[("attention", b, j)]
            drawn = picture[y0:y1, x0:x1].astype(int)
            want = heat_overlay(source, expected_maps[b, j]).astype(int)
            assert np.abs(drawn - want).max() <= 1, (b, j)
        x0, y0, x1, y1 = layout.boxes[("input", b)]
        assert np.array_equal(picture[y0:y1, x0:x1], source)


def test_visualize_sorts_images_by_the_criterions_counts(image_dir, tmp_path, capsys):
    from alit_fast.cli.demo import DEMO_CRITERION
    from alit_fast.io.visualize import sorted_by_count

    out = tmp_path / "viz.png"
    assert cli_main(["visualize", str(image_dir), "--out", str(out), "--sheets", "0", "--scale", "1"]) == 0
    model = alit_fast.load_pretrained("demo")
    images = torch.stack([load_image(p, 32) for p in find_images([image_dir])])
    counts = [int(n) for n in model.encode(images, DEMO_CRITERION).lengths.tolist()]  # the default
    sheet = sorted_by_count(images, counts, scale=1)
    assert sheet.counts == sorted(counts)
    assert np.array_equal(np.array(Image.open(out).convert("RGB")), np.array(sheet.image))


@pytest.mark.parametrize("extra,needle", [
    (["--layer", "x"], "--layer must be"),
    (["--layer", "9"], "the decoder has"),
    (["--tokens-shown", "65"], "at most 64 tokens"),
    (["--tokens-shown", "0"], "--tokens-shown must be >= 1"),
    (["--criterion", "code-acc:2"], "--criterion"),
])
def test_visualize_bad_options_are_one_line(image_dir, tmp_path, capsys, extra, needle):
    assert cli_main(["visualize", str(image_dir), "--out", str(tmp_path / "v.png"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alit-fast visualize: ") and needle in err and "\n" not in err
    assert not (tmp_path / "v.png").exists()


def test_visualize_refuses_to_replace_a_file(image_dir, tmp_path, capsys):
    out = tmp_path / "v.png"
    out.write_bytes(b"mine")
    assert cli_main(["visualize", str(image_dir), "--out", str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == b"mine"


def test_visualize_keeps_an_existing_out_unless_overwrite(image_dir, tmp_path, capsys):
    out = tmp_path / "mine.png"
    out.write_bytes(b"the user's picture")
    args = ["visualize", str(image_dir), "--out", str(out), "--sheets", "1", "--scale", "1"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "left alone" in err and "--overwrite" in err and "\n" not in err.strip()
    assert out.read_bytes() == b"the user's picture"
    assert cli_main(args + ["--overwrite"]) == 0 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
