"""``alit_fast.evaluate`` and ``alit-fast evaluate`` on the bundled demo model: the official
procedure's numbers (PNG round trip re-created), streaming equal to one shot, adaptive rows equal
to ``encode``'s choices, the report files, the CLI's one-line errors, and torchrun sharding.

FID runs through a cheap stand-in feature network where the Inception itself is not the point
(the FID code path is the same); one CLI test runs the real Inception on seeded weights."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import alit_fast
from alit_fast.cli import main as cli_main
from alit_fast.evaluation import FeatureStats, evaluate, fid_from_stats, write_report
from alit_fast.evaluation.weights import FID_WEIGHTS_FILE
from alit_fast.inference import pixels_from_logits
from alit_fast.models.inception import FIDInceptionV3
from alit_fast.training.data import SyntheticImages
from benchmarks.metric_fixtures import seeded
from tests._single_thread import one_thread  # noqa: F401

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model():
    return alit_fast.load_pretrained("demo")


@pytest.fixture(scope="module")
def images():
    data = SyntheticImages(32, length=10, seed=777_777)  # the demo's held-out seed: training never saw it
    return torch.stack([data[i]["image"] for i in range(len(data))])


class StandInFeatures(torch.nn.Module):
    """2048-d features from a fixed random projection: cheap, and FID's code path is the same."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.weight = torch.nn.Parameter(torch.randn(2048, 3 * 32 * 32, generator=g) / 40, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.flatten(1) @ self.weight.T)


def _official_l1_l2(model, images, iteration):
    """The official evaluation re-created: PNGs written by truncation, read back, paired, averaged."""
    records = model.rollout(images)
    recon = model.base_tokenizer.decode_latents(model.soft_code(records[iteration].logits))  # unclamped, as official
    l1s, l2s = [], []
    for gt, rec in zip(images, recon):
        files = []
        for img in (gt, rec):
            array = np.clip(img.permute(1, 2, 0).numpy() * 255, 0, 255).astype(np.uint8)  # truncation
            buffer = io.BytesIO()
            Image.fromarray(array).save(buffer, format="PNG")
            buffer.seek(0)
            files.append(torch.from_numpy(np.array(Image.open(buffer))).permute(2, 0, 1).float() / 255)
        d = (files[0].double() - files[1].double())
        l1s.append(float(d.abs().mean()))
        l2s.append(float(d.square().mean()))
    return np.mean(l1s), np.mean(l2s)


def test_l1_l2_equal_the_official_png_round_trip(model, images):
    images = images[:5]
    report = evaluate(model, images, tokens="all", metrics="l1,l2", halting="off", batch_size=3)
    assert [r.name for r in report.rows] == [f"tokens:{8 * (t + 1)}" for t in range(8)]
    for t in (0, 7):
        l1, l2 = _official_l1_l2(model, images, t)
        row = report.row(f"tokens:{8 * (t + 1)}")
        assert row.metrics["l1"] == pytest.approx(l1, abs=1e-12)
        assert row.metrics["l2"] == pytest.approx(l2, abs=1e-12)
        assert row.images == len(images)


def test_streaming_batches_equal_one_batch(model, images):
    fid = StandInFeatures()
    kwargs = dict(tokens="16,64", criteria=["code-acc:0.6"], metrics="l1,l2,psnr,ssim,fid", halting="off", fid_model=fid)
    images = images[:7]
    small = evaluate(model, images, batch_size=3, **kwargs)
    whole = evaluate(model, images, batch_size=len(images), **kwargs)
    for a, b in zip(small.rows, whole.rows):
        assert a.name == b.name and a.tokens == b.tokens and a.histogram == b.histogram
        for m in ("l1", "l2", "psnr", "ssim"):
            assert a.metrics[m] == pytest.approx(b.metrics[m], rel=1e-9, abs=1e-9), (a.name, m)
        # float32 features of other batch shapes differ in the last bits, which 10 images in
        # 2048 dimensions (a rank-9 covariance) amplify a little
        assert a.metrics["fid"] == pytest.approx(b.metrics["fid"], rel=1e-6), a.name


def test_fid_row_equals_a_one_shot_computation(model, images):
    fid = StandInFeatures()
    report = evaluate(model, images, tokens="24", metrics="fid", halting="off", fid_model=fid, batch_size=4)
    recon = pixels_from_logits(model, model.rollout(images)[2].logits)
    q = lambda x: (x * 255).clamp(0, 255).floor() / 255  # noqa: E731
    a, b = FeatureStats(2048), FeatureStats(2048)
    a.add(fid(q(recon)))
    b.add(fid(q(images)))
    assert report.row("tokens:24").metrics["fid"] == pytest.approx(fid_from_stats(a, b), rel=1e-6)


@pytest.mark.parametrize("halting", ["off", "threshold"])
@pytest.mark.parametrize("criterion,fallback", [("pixel-l1:0.1", "best"), ("fast-pixel-l1:0.1", "max"), ("fast-pixel-l1:0.08", "best")])
def test_adaptive_rows_take_encodes_counts_and_each_images_own_metrics(model, images, criterion, fallback, halting):
    images = images[:6]
    report = evaluate(model, images, tokens="all", criteria=[criterion], metrics="l1,ssim", halting=halting,
                      fallback=fallback, batch_size=4)
    lengths = model.encode(images, criterion, fallback=fallback, halting=halting).lengths.tolist()
    row = report.row(criterion)
    assert row.kind == "adaptive" and row.tokens == pytest.approx(np.mean(lengths))
    assert {k: v for k, v in row.histogram.items() if v} == dict(Counter(lengths))
    # each image's metrics at its own count: the mean of the fixed rows' per-image values, picked
    per_count = {}
    for n in set(lengths):
        idx = [i for i, m in enumerate(lengths) if m == n]
        sub = evaluate(model, images[idx], tokens=str(n), metrics="l1,ssim", halting=halting)
        per_count[n] = (len(idx), sub.rows[0].metrics)
    for m in ("l1", "ssim"):
        expected = sum(k * v[m] for k, v in per_count.values()) / len(images)
        assert row.metrics[m] == pytest.approx(expected, abs=1e-9)
    assert -1 <= row.spearman_png <= 1


def test_stochastic_halting_is_seeded_and_reported(model, images):
    a = evaluate(model, images[:4], tokens="64", metrics="l1", seed=3)
    b = evaluate(model, images[:4], tokens="64", metrics="l1", seed=3)
    off = evaluate(model, images[:4], tokens="64", metrics="l1", halting="off")
    assert a.rows[0].metrics == b.rows[0].metrics
    assert a.settings["halting"] == "official" and a.settings["seed"] == 3 and not a.settings["deterministic"]
    assert a.rows[0].metrics != evaluate(model, images[:4], tokens="64", metrics="l1", seed=4).rows[0].metrics
    assert off.settings["deterministic"]


def test_report_files(model, images, tmp_path):
    report = evaluate(model, images[:4], tokens="8,64", criteria=["code-acc:0.6"], metrics="l1,psnr", halting="off")
    paths = write_report(report, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert [r["name"] for r in data["rows"]] == ["tokens:8", "tokens:64", "code-acc:0.6"]
    assert {"tokens", "l1", "psnr", "images", "seconds"} <= set(data["rows"][0])
    assert "histogram" in data["rows"][2] and "spearman_tokens_png_size" in data["rows"][2]
    assert "| tokens:64 | 64 |" in paths["md"].read_text()
    with Image.open(paths["png"]) as png:
        assert png.size[0] > 300


def test_the_module_stays_callable_once_imported(model, images):
    import alit_fast.evaluate as module  # binds alit_fast.evaluate to the module

    report = alit_fast.evaluate(model, images[:2], tokens="8", metrics="l1", halting="off")
    assert module is alit_fast.evaluate and report.rows[0].images == 2


def test_bad_arguments_are_refused_by_name(model, images):
    with pytest.raises(ValueError, match="multiples of 8"):
        evaluate(model, images, tokens="12")
    with pytest.raises(ValueError, match="unknown metric"):
        evaluate(model, images, metrics="l1,psnrr")
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        evaluate(model, torch.rand(2, 3, 40, 40), tokens="8", metrics="l1")


# ---------------------------------------------------------------------- the command line
@pytest.fixture(scope="module")
def image_dir(tmp_path_factory, images):
    folder = tmp_path_factory.mktemp("heldout")
    for i, img in enumerate(images[:4]):
        array = (img.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i:02d}.png")
    # a larger photo-sized image: the official crop takes its centre at native resolution
    big = np.zeros((40, 47, 3), dtype=np.uint8)
    big[4:36, 7:39] = (images[4].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(big).save(folder / "big.png")
    return folder


@pytest.fixture()
def hub(tmp_path):
    before = torch.hub.get_dir()
    torch.hub.set_dir(str(tmp_path / "hub"))
    yield tmp_path / "hub"
    torch.hub.set_dir(before)


def test_cli_end_to_end_with_seeded_fid_and_lpips_weights(image_dir, hub, tmp_path, capsys):
    pytest.importorskip("alit_fast.io.lpips_weights")
    (hub / "checkpoints").mkdir(parents=True)
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in FIDInceptionV3().state_dict().items()}
    torch.save(seeded.cached_state_dict(shapes, seeded.INCEPTION_SEED), hub / "checkpoints" / FID_WEIGHTS_FILE)
    torch.save(seeded.seeded_vgg16(), hub / "checkpoints" / "vgg16-397923af.pth")
    torch.save(seeded.seeded_lpips_heads(), tmp_path / "heads.pth")
    out = tmp_path / "report"
    code = cli_main(["evaluate", "--data", str(image_dir), "--checkpoint", "demo", "--tokens", "64", "--halting", "off",
                     "--metrics", "l1,l2,psnr,ssim,lpips,fid", "--lpips-heads", str(tmp_path / "heads.pth"), "--out", str(out), "--workers", "0", "--quiet"])
    assert code == 0
    data = json.loads((out / "metrics.json").read_text())
    row = data["rows"][0]
    assert row["images"] == 5 and row["tokens"] == 64
    for m in ("l1", "l2", "psnr", "ssim", "lpips", "fid"):
        assert isinstance(row[m], float) and np.isfinite(row[m]), m
    assert (out / "curves.png").exists() and "| tokens:64 |" in capsys.readouterr().out
    # the same folder again is refused unless --overwrite
    code = cli_main(["evaluate", "--data", str(image_dir), "--checkpoint", "demo", "--metrics", "l1", "--out", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--metrics", "l1,fid", "--tokens", "8"], FID_WEIGHTS_FILE),
        (["--tokens", "12"], "multiples of 8"),
        (["--metrics", "psnr,blur"], "unknown metric"),
        (["--criterion", "code-acc:2"], "code-acc"),
        (["--batch-size", "0"], "--batch-size"),
        (["--metrics", "l1,lpips", "--tokens", "8"], "vgg16-397923af.pth"),
    ],
)
def test_cli_errors_are_one_line(image_dir, hub, tmp_path, capsys, args, message):
    code = cli_main(["evaluate", "--data", str(image_dir), "--checkpoint", "demo", "--out", str(tmp_path / "o"),
                     "--quiet", "--workers", "0", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and "\n" not in err and err.startswith("alit-fast evaluate: ")


def test_cli_an_image_broken_past_its_header_is_a_one_line_error(image_dir, tmp_path, capsys):
    # (a file whose header is unreadable is skipped by name up front: test_newcomer)
    import shutil

    data = tmp_path / "data"
    shutil.copytree(image_dir, data)
    whole = sorted(data.glob("*.png"))[0].read_bytes()
    (data / "zz-broken.png").write_bytes(whole[: len(whole) // 2])  # a good header, half the pixels
    code = cli_main(["evaluate", "--data", str(data), "--checkpoint", "demo", "--tokens", "64", "--metrics", "l1",
                     "--halting", "off", "--out", str(tmp_path / "o"), "--quiet", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot read the image" in err and "zz-broken.png" in err and "\n" not in err


def test_cli_a_bug_in_the_run_keeps_its_traceback(image_dir, tmp_path, monkeypatch):
    # a ValueError from inside the pass is not the user's doing: it must not become a one-line "user error"
    import alit_fast.cli.evaluate as evaluate_cli

    def broken(*args, **kwargs):
        raise ValueError("an internal inconsistency")

    monkeypatch.setattr(evaluate_cli, "evaluate", broken)
    with pytest.raises(ValueError, match="an internal inconsistency"):
        cli_main(["evaluate", "--data", str(image_dir), "--checkpoint", "demo", "--tokens", "64", "--metrics", "l1",
                  "--out", str(tmp_path / "o"), "--quiet", "--workers", "0"])


def test_cli_refuses_a_data_path_that_is_not_a_folder(tmp_path, capsys):
    code = cli_main(["evaluate", "--data", str(tmp_path / "none"), "--checkpoint", "demo"])
    assert code == 2 and "is not a folder" in capsys.readouterr().err


def test_torchrun_two_processes_equal_one(image_dir, tmp_path):
    """``python -m alit_fast.evaluate`` under torchrun (2 CPU processes, gloo): the same report as
    one process, to float64 round-off (each image runs in the batch it has in one process; the
    ranks' sums are added in another order)."""
    common = ["--data", str(image_dir), "--checkpoint", "demo", "--tokens", "8,64", "--criterion", "code-acc:0.6",
              "--metrics", "l1,l2,psnr,ssim", "--halting", "off", "--workers", "0", "--quiet", "--batch-size", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    one = subprocess.run([sys.executable, "-m", "alit_fast.evaluate", *common, "--out", str(tmp_path / "one")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "alit_fast.evaluate", *common, "--out", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr
    a = json.loads((tmp_path / "one" / "metrics.json").read_text())
    b = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert b["settings"]["world_size"] == 2 and a["settings"]["world_size"] == 1
    for ra, rb in zip(a["rows"], b["rows"]):
        assert ra["name"] == rb["name"] and ra["images"] == rb["images"] == 5
        assert ra.get("histogram") == rb.get("histogram")
        for m in ("tokens", "l1", "l2", "psnr", "ssim"):
            assert rb[m] == pytest.approx(ra[m], rel=1e-12, abs=1e-15), (ra["name"], m)
        assert rb.get("spearman_tokens_png_size") == pytest.approx(ra.get("spearman_tokens_png_size"), abs=1e-12)
