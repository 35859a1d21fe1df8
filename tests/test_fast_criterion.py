"""fast-pixel-l1: the pixel criterion's threshold on a calibrated, decode-free estimate of the pixel
L1 (alit_fast.inference.calibration), for VQGAN and VAE models with quantized or continuous tokens,
its calibration in the model file, and the command that makes one."""
from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import alit_fast
from alit_fast import ALIT
from alit_fast.cli import main as cli_main
from alit_fast.inference import parse_criterion
from alit_fast.inference.criteria import PixelL1
from alit_fast.inference.calibration import (
    METADATA_KEY,
    PixelL1Calibration,
    cell_size,
    first_under,
    fit,
    image_detail,
    measure,
    rank_correlation,
)
from alit_fast.io.weights import FINGERPRINT_KEY, write_with_metadata
from alit_fast.testing import tiny_config, tiny_vae_config
from tests._single_thread import one_thread  # noqa: F401

VARIANTS = {
    "vqgan": lambda: tiny_config(),
    "vqgan-continuous": lambda: tiny_config(quantize_latent=False),
    "vae": lambda: tiny_vae_config(),
    "vae-continuous": lambda: tiny_vae_config(quantize_latent=False),
}


def varied_images(n: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """From flat to noisy, so that the estimate spreads over the threshold."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.rand(n, 3, 1, 1, generator=g).expand(n, 3, size, size)
    noise = torch.rand(n, 3, size, size, generator=g)
    mix = torch.linspace(0, 1, n).view(n, 1, 1, 1)
    return (1 - mix) * flat + mix * noise


def gap_threshold(values: torch.Tensor) -> float:
    """The middle of the widest gap between neighbouring values in their middle half: no value
    lies near it, so rounding differences between batch sizes cannot flip a decision."""
    v = values.flatten().sort().values
    lo, hi = len(v) // 4, 3 * len(v) // 4
    i = lo + int((v[lo + 1 : hi + 1] - v[lo:hi]).argmax())
    return float(v[i] + v[i + 1]) / 2


def calibrated(variant: str) -> ALIT:
    torch.manual_seed(0)
    model = ALIT(VARIANTS[variant]()).eval()
    if model.config.is_vae:
        model.set_latent_sampling(False)  # the posterior mean: encode and measure see the same latents
    model.pixel_l1_calibration = fit(measure(model, [varied_images(8, seed=1)]), cell_size(model))
    return model


@pytest.mark.parametrize("variant", sorted(VARIANTS))
@pytest.mark.parametrize("static_shapes", [False, True])
def test_encode_stops_each_image_where_the_estimate_first_falls_under_the_threshold(variant, static_shapes):
    model = calibrated(variant)
    images = varied_images(7, seed=2)
    measured = measure(model, [images])
    estimate = model.pixel_l1_calibration.predict(measured["detail"], measured["latent_error"])
    threshold = gap_threshold(estimate)  # some images stop early, some never
    first = first_under(estimate, threshold)
    expected = torch.where(first >= 0, first + 1, model.config.iterations) * model.config.tokens_per_iter
    tokens = model.encode(images, f"fast-pixel-l1:{threshold}", batch_size=3, static_shapes=static_shapes)
    assert tokens.lengths.tolist() == expected.tolist()
    assert 0 < (first >= 0).sum() < len(images)


def test_the_estimate_reads_as_pixel_l1_on_its_calibration_images():
    model = calibrated("vqgan")
    measured = measure(model, [varied_images(8, seed=1)])
    estimate = model.pixel_l1_calibration.predict(measured["detail"], measured["latent_error"])
    # least squares with an intercept: unbiased on the fit set
    assert float((estimate - measured["pixel"]).mean()) == pytest.approx(0.0, abs=1e-6)
    assert model.pixel_l1_calibration.spearman > 0.5


def test_image_detail_is_zero_for_images_flat_within_each_cell_and_grows_with_noise():
    cells = torch.rand(2, 3, 8, 8).repeat_interleave(4, -1).repeat_interleave(4, -2)
    assert torch.allclose(image_detail(cells, 4), torch.zeros(2), atol=1e-7)
    noisy = cells + 0.1 * torch.randn_like(cells)
    assert bool((image_detail(noisy, 4) > 0.05).all())


def test_rank_correlation_equals_scipys_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, 5, (40,), generator=g).double()
    y = x + torch.rand(40, generator=g, dtype=torch.float64) * 3
    assert rank_correlation(x, y) == pytest.approx(scipy_stats.spearmanr(x.numpy(), y.numpy()).statistic, abs=1e-12)


def test_a_model_without_calibration_is_refused_before_encoding():
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval()
    with pytest.raises(ValueError, match="alit-fast calibrate"):
        model.encode(varied_images(2), "fast-pixel-l1:0.07")


def test_parse_and_name_round_trip_and_bad_thresholds_are_refused():
    assert alit_fast.inference.criterion_name(parse_criterion("fast-pixel-l1:0.07")) == "fast-pixel-l1:0.07"
    for bad in ("fast-pixel-l1:0", "fast-pixel-l1:1.5", "fast-pixel-l1:nan"):
        with pytest.raises(ValueError, match="fast-pixel-l1"):
            parse_criterion(bad)


def test_calibration_is_saved_in_the_metadata_and_loaded_back(tmp_path):
    model = calibrated("vae")
    path = tmp_path / "m.safetensors"
    model.save(path)
    loaded = alit_fast.load(path)
    assert loaded.pixel_l1_calibration == model.pixel_l1_calibration
    with safe_open(str(path), "pt") as f:
        assert METADATA_KEY in f.metadata()


def test_adding_a_calibration_keeps_tensors_and_fingerprint(tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "plain.safetensors"
    ALIT(tiny_config()).save(source)
    out = tmp_path / "calibrated.safetensors"
    calibration = PixelL1Calibration(coef=(0.01, 0.5, 0.2, 1.0), cell=4, images=6, spearman=0.9, agreement={"0.07": 0.8})
    write_with_metadata(source, out, {METADATA_KEY: calibration.to_json()})
    with safe_open(str(source), "pt") as a, safe_open(str(out), "pt") as b:
        assert a.metadata()[FINGERPRINT_KEY] == b.metadata()[FINGERPRINT_KEY]
        for key in a.keys():
            assert torch.equal(a.get_tensor(key), b.get_tensor(key))
    assert alit_fast.load(out).pixel_l1_calibration == calibration  # the fingerprint still checks out


def test_a_damaged_calibration_is_named_at_load(tmp_path):
    torch.manual_seed(0)
    source = tmp_path / "plain.safetensors"
    ALIT(tiny_config()).save(source)
    write_with_metadata(source, source, {METADATA_KEY: '{"form": "something else"}'})
    with pytest.raises(ValueError, match=METADATA_KEY.replace(".", r"\.") + "|another form"):
        alit_fast.load(source)


@pytest.fixture()
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(varied_images(6, seed=4)):
        Image.fromarray((image.permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_calibrate_command_writes_a_calibrated_copy_that_encode_and_evaluate_accept(image_dir, tmp_path, capsys):
    torch.manual_seed(0)
    source = tmp_path / "tiny.safetensors"
    ALIT(tiny_config()).save(source)
    out = tmp_path / "calibrated.safetensors"
    assert cli_main(["calibrate", "--checkpoint", str(source), "--data", str(image_dir), "--out", str(out), "--batch-size", "4"]) == 0
    assert "Spearman" in capsys.readouterr().out
    assert alit_fast.load(source).pixel_l1_calibration is None  # the source file is left as it was
    assert alit_fast.load(out).pixel_l1_calibration is not None
    tokens = tmp_path / "tokens.safetensors"
    assert cli_main(["encode", str(image_dir), "--checkpoint", str(out), "--criterion", "fast-pixel-l1:0.2",
                     "--out", str(tokens), "--device", "cpu"]) == 0
    report = tmp_path / "report.json"
    assert cli_main(["evaluate", "--data", str(image_dir), "--checkpoint", str(out), "--criterion", "fast-pixel-l1:0.2",
                     "--tokens", "4", "--metrics", "l1", "--out", str(report), "--device", "cpu"]) == 0
    assert cli_main(["calibrate", "--checkpoint", str(source), "--data", str(image_dir), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err


def test_calibrate_refuses_a_folder_with_too_few_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    torch.manual_seed(0)
    ALIT(tiny_config()).save(tmp_path / "tiny.safetensors")
    rc = cli_main(["calibrate", "--checkpoint", str(tmp_path / "tiny.safetensors"), "--data", str(tmp_path / "empty"),
                   "--out", str(tmp_path / "out.safetensors")])
    assert rc == 2 and "at least 4" in capsys.readouterr().err


def test_bundled_demo_model_is_calibrated_on_validation_images_and_tracks_held_out_pixel_error():
    from alit_fast.cli.demo import HELD_OUT_SEED, demo_images

    model = alit_fast.load_pretrained("demo")
    calibration = model.pixel_l1_calibration
    assert calibration is not None and "seed 555555" in calibration.data
    images = torch.stack([it.image for it in demo_images(32, per_level=2, photos=False, seed=HELD_OUT_SEED)])
    measured = measure(model, [images])
    estimate = calibration.predict(measured["detail"], measured["latent_error"])
    assert rank_correlation(estimate.reshape(-1), measured["pixel"].reshape(-1)) >= 0.9


def test_pretokenize_accepts_fast_pixel_l1(image_dir, tmp_path):
    from alit_fast.io.pretrained import pretrained_path

    out = tmp_path / "shards"
    assert cli_main(["pretokenize", str(image_dir), "--checkpoint", str(pretrained_path("demo")), "--out", str(out),
                     "--criterion", "fast-pixel-l1:0.07", "--batch-size", "4"]) == 0
    assert (out / "index.json").exists()


def _split_by_detail():
    """A tiny model calibrated by hand so that the floor (the detail term) splits 7 varied images:
    (model, images, the estimate per iteration and image, a threshold in the widest gap, which
    images it rules out)."""
    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval()
    model.pixel_l1_calibration = calibration = PixelL1Calibration(coef=(0.0, 1.0, 0.01, 0.0), cell=4)
    images = varied_images(7, seed=2)
    measured = measure(model, [images])
    estimate = calibration.predict(measured["detail"], measured["latent_error"])
    threshold = gap_threshold(measured["detail"][0])
    never = parse_criterion(f"fast-pixel-l1:{threshold}").never_met(model, images)
    return model, images, estimate, threshold, never


def test_images_whose_detail_alone_rules_the_threshold_out_skip_the_decoder():
    model, images, estimate, threshold, never = _split_by_detail()
    criterion = parse_criterion(f"fast-pixel-l1:{threshold}")
    assert 0 < int(never.sum()) < len(images)
    assert bool((estimate[:, never] >= threshold).all())  # the floor is a true bound
    decoded = []
    real = model.decode_logits
    model.decode_logits = lambda z_q, *a: decoded.append(z_q.shape[0]) or real(z_q, *a)
    try:
        tokens = model.encode(images, criterion, batch_size=7)
    finally:
        del model.decode_logits
    first = first_under(estimate, threshold)
    expected = torch.where(first >= 0, first + 1, model.config.iterations) * model.config.tokens_per_iter
    assert tokens.lengths.tolist() == expected.tolist() and bool((first >= 0).any())
    # only the images the threshold is open for are decoded, from the first count on (a CPU reads
    # the out-of-reach flags at once; a GPU with the first stop decision, saving a sync)
    assert decoded and all(n <= 7 - int(never.sum()) for n in decoded)


@pytest.mark.parametrize("fallback", ["max", "best"])
def test_fast_encode_makes_one_sync_per_judged_iteration_plus_one(fallback):
    from alit_fast.testing import count_syncs

    torch.manual_seed(0)
    model = ALIT(tiny_config()).eval()
    model.pixel_l1_calibration = PixelL1Calibration(coef=(0.0, 1.0, 0.01, 0.0), cell=4)
    images = varied_images(6, seed=2)
    threshold = gap_threshold(image_detail(images, 4))  # some images are ruled out by their detail alone

    def encode():
        return model.encode(images, f"fast-pixel-l1:{threshold}", fallback=fallback)

    encode()
    with count_syncs() as counts:
        encode()
    assert counts.total <= model.config.iterations  # judged at counts 1 .. iterations-1, then the result


@pytest.mark.parametrize("static_shapes", [False, True])
def test_with_fallback_best_images_out_of_reach_take_the_last_count_and_the_rest_their_best(static_shapes):
    # static shapes decode every image (nothing is pruned): the rule must hold there too, or the
    # tokens would depend on the path
    model, images, estimate, threshold, never = _split_by_detail()
    first = first_under(estimate, threshold)
    best = estimate.argmin(0)
    expected = torch.where(first >= 0, first, torch.where(never, model.config.iterations - 1, best)) + 1
    assert bool((best[never & (first < 0)] != model.config.iterations - 1).any())  # the rule decides something
    tokens = model.encode(images, f"fast-pixel-l1:{threshold}", fallback="best", batch_size=4,
                          static_shapes=static_shapes)
    assert tokens.lengths.tolist() == (expected * model.config.tokens_per_iter).tolist()
    assert bool(never.any()) and bool((first >= 0).any())


class BothAtOnce(PixelL1):
    """Rounding's worst case: image 0 is out of reach by the bound, yet meets the criterion at the
    first judged count (as every image does)."""

    last_is_best_when_never_met = True

    def never_met(self, model, images):
        return torch.tensor([True, False])

    def __call__(self, view):
        return self.score(view) < 10.0


@pytest.mark.parametrize("read_first", [True, False], ids=["flags-read-first", "flags-read-with-first-stop"])
@pytest.mark.parametrize("stream", [False, True])
def test_an_image_flagged_out_of_reach_in_the_read_that_sees_it_stop_gets_the_last_count(stream, read_first, monkeypatch):
    """Rounding can put an image on both sides at once (its estimate under the threshold, its
    detail term at it): the bound wins, with fallback best as with max, whether the flags are read
    before the first step (a CPU) or with the first stop decision (a GPU), and its length never
    runs past its codes."""
    from alit_fast.inference.encode import encode
    from alit_fast.inference.stream import encode_stream

    for module in ("encode", "stream"):  # False: the GPU's way, on this CPU
        monkeypatch.setattr(sys.modules[f"alit_fast.inference.{module}"], "reads_are_free", lambda device: read_first)
    torch.manual_seed(0)
    model, images = ALIT(tiny_config()).eval(), torch.rand(2, 3, 32, 32)
    for fallback in ("max", "best"):
        if stream:
            tokens = next(iter(encode_stream(model, [images], BothAtOnce(0.5), fallback=fallback, batch_size=2)))
        else:
            tokens = encode(model, images, BothAtOnce(0.5), fallback=fallback)
        T, last = model.config.tokens_per_iter, model.config.max_tokens
        assert tokens.lengths.tolist() == [last, T], fallback
        assert all(int(c) >= 0 for c in tokens.padded(0)[0][:last]), fallback


@pytest.mark.parametrize("fallback", ["max", "best"])
@pytest.mark.parametrize("path", ["static-shapes", "halting-threshold"])
def test_paths_that_cannot_prune_still_give_an_out_of_reach_image_the_last_count(path, fallback):
    """Static shapes and halting masks decode every image, so nothing is skipped; the bound still
    decides: an out-of-reach image is never stopped (not by rounding either) and takes the last
    count with its codes, as on the pruning path."""
    torch.manual_seed(0)
    model, images = ALIT(tiny_config()).eval(), torch.rand(2, 3, 32, 32)
    options = dict(static_shapes=True) if path == "static-shapes" else dict(halting="threshold")
    tokens = model.encode(images, BothAtOnce(0.5), fallback=fallback, **options)
    T, last = model.config.tokens_per_iter, model.config.max_tokens
    assert tokens.lengths.tolist() == [last, T]
    reference = model.encode(images[:1], f"tokens:{last}", **options)  # image 0 run to the end
    assert torch.equal(tokens.padded(0)[0], reference.padded(0)[0])


def test_a_never_met_answer_of_the_wrong_shape_is_refused():
    class OneFlag(PixelL1):
        last_is_best_when_never_met = True

        def never_met(self, model, images):
            return torch.tensor([True])  # one flag for a batch of two: broadcasting would rule out both

    torch.manual_seed(0)
    model, images = ALIT(tiny_config()).eval(), torch.rand(2, 3, 32, 32)
    with pytest.raises(ValueError, match="one flag per image, 2 here; got shape \\[1\\]"):
        model.encode(images, OneFlag(0.5), fallback="best")
