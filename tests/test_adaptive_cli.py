import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from alit_fast import ALIT
from alit_fast.cli.decode import main as decode_main
from alit_fast.cli.encode import histogram
from alit_fast.cli.encode import main as encode_main
from alit_fast.cli.demo import evaluate_claims
from alit_fast.cli.demo import main as demo_main
from alit_fast.io.images import load_image
from alit_fast.testing import tiny_config
from alit_fast.inference import TokenBatch
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    ALIT(tiny_config()).save(str(path))
    return str(path)


@pytest.fixture()
def image_dir(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    (folder / "nested").mkdir(parents=True)
    Image.fromarray(np.full((40, 48, 3), 200, np.uint8)).save(folder / "flat.png")
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(folder / "noise.png")
    Image.fromarray(rng.integers(0, 256, (50, 30), dtype=np.uint8)).convert("L").save(folder / "nested" / "gray.jpg")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    (folder / "notes.txt").write_text("not an image suffix: never picked up from a directory")
    return folder


def test_load_image_resizes_the_shorter_side_and_center_crops(tmp_path):
    array = np.zeros((20, 60, 3), np.uint8)
    array[:, 25:35] = 255  # the central 20x20 square is black, white, black in its quarters
    Image.fromarray(array).save(tmp_path / "wide.png")
    image = load_image(tmp_path / "wide.png", 32)
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert float(image[:, :, 11:21].min()) > 0.9  # the centre is the white band
    assert float(image[:, :, :2].max()) < 0.1 and float(image[:, :, -2:].max()) < 0.1


def test_encode_and_decode_end_to_end(checkpoint, image_dir, tmp_path, capsys):
    out = tmp_path / "tokens.safetensors"
    rc = encode_main(
        [str(image_dir), "--checkpoint", checkpoint, "--criterion", "code-acc:1.0", "--out", str(out), "--batch-size", "2"]
    )
    captured = capsys.readouterr()
    assert rc == 0
    assert "skipped" in captured.err and "corrupt.png" in captured.err
    assert "images/s" in captured.out and "12 tokens" in captured.out
    tokens = TokenBatch.load(out)
    assert len(tokens) == 3 and tokens.lengths.tolist() == [12, 12, 12]  # never met -> max_tokens
    assert [os.path.basename(n) for n in tokens.names] == ["flat.png", "gray.jpg", "noise.png"]
    assert tokens.checkpoint == os.path.abspath(checkpoint)
    assert tokens.extra["criterion"] == "code-acc:1.0"

    decoded = tmp_path / "decoded"
    assert decode_main([str(out), "--out", str(decoded)]) == 0  # the checkpoint comes from the metadata
    files = sorted(os.listdir(decoded))
    assert files == ["flat.png", "gray.png", "noise.png"]
    with Image.open(decoded / "flat.png") as image:
        assert image.size == (32, 32) and image.mode == "RGB"


def test_encode_cli_in_a_subprocess(checkpoint, image_dir, tmp_path):
    out = tmp_path / "tokens.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    files = [str(image_dir / "flat.png"), str(image_dir / "corrupt.png"), str(image_dir / "noise.png")]
    proc = subprocess.run(
        [sys.executable, "-m", "alit_fast.cli", "encode", *files, "--checkpoint", checkpoint,
         "--criterion", "tokens:8", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "corrupt.png" in proc.stderr
    assert TokenBatch.load(out).lengths.tolist() == [8, 8]


def test_encode_reports_when_nothing_can_be_read(checkpoint, image_dir, tmp_path, capsys):
    rc = encode_main([str(image_dir / "corrupt.png"), "--checkpoint", checkpoint, "--out", str(tmp_path / "t.safetensors")])
    assert rc == 2 and "none of the 1 files" in capsys.readouterr().err  # a user error: exit status 2
    assert not (tmp_path / "t.safetensors").exists()
    assert encode_main([str(tmp_path), "--checkpoint", checkpoint, "--criterion", "bogus"]) == 2
    missing = str(tmp_path / "missing.safetensors")
    assert encode_main([str(image_dir), "--checkpoint", missing]) == 2
    assert "cannot load the model" in capsys.readouterr().err


def test_decode_needs_a_checkpoint(tmp_path, capsys):
    path = tmp_path / "t.safetensors"
    TokenBatch.from_sequences([torch.tensor([1, 2, 3, 4])], codebook_size=64).save(path)
    assert decode_main([str(path), "--out", str(tmp_path / "out")]) == 2
    assert "--checkpoint" in capsys.readouterr().err


def test_histogram_has_a_bar_per_token_count():
    text = histogram([4, 4, 12], tokens_per_iter=4, max_tokens=12, width=10)
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("########## 2") and lines[1].endswith(" 0") and lines[2].endswith("##### 1")


def test_demo_writes_a_grid_and_prints_token_counts(checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert demo_main(["--checkpoint", checkpoint, "--out", str(out), "--per-level", "1"]) == 0
    text = capsys.readouterr().out
    for name in ("flat-0", "few_shapes-0", "many_shapes-0", "texture-0", "noise-0"):
        assert name in text
    with Image.open(out) as grid:
        assert grid.width > 5 * 128 and grid.height > 2 * 128


def test_demo_replaces_its_own_picture_but_not_a_users_file(checkpoint, tmp_path, capsys):
    out = tmp_path / "grid.png"
    args = ["--checkpoint", checkpoint, "--out", str(out), "--per-level", "1", "--no-photos"]
    assert demo_main(args) == 0 and demo_main(args) == 0  # the README's command, run twice
    mine = tmp_path / "mine.png"
    Image.new("RGB", (4, 4), "red").save(mine)
    before = mine.read_bytes()
    capsys.readouterr()
    assert demo_main(args[:3] + [str(mine)] + args[4:]) == 2
    err = capsys.readouterr().err
    assert "left alone" in err and "--overwrite" in err and mine.read_bytes() == before
    assert demo_main(args[:3] + [str(mine)] + args[4:] + ["--overwrite"]) == 0 and mine.read_bytes() != before


def test_evaluate_claims_reports_both_figures(checkpoint):
    from alit_fast.io import load

    model = load(checkpoint).eval()
    figures = evaluate_claims(model, "tokens:8", per_level=2, batch_size=4)
    assert figures.num_images == 10
    assert figures.tokens_per_level == {level: 8.0 for level in range(5)}
    assert np.isnan(figures.spearman)  # a constant token count has no rank correlation
    assert list(figures.error_per_tokens) == [4, 8, 12]
    assert "Spearman" in figures.report()


def test_encode_cli_best_fallback(checkpoint, image_dir, tmp_path, capsys):
    out = tmp_path / "tokens.safetensors"
    # code-nll can never reach -1, so every image gets its lowest-NLL count and the file says so
    args = [str(image_dir), "--checkpoint", checkpoint, "--criterion", "code-nll:0", "--out", str(out)]
    assert encode_main(args + ["--fallback", "best"]) == 0
    tokens = TokenBatch.load(out)
    assert tokens.extra["fallback"] == "best" and len(tokens) == 3
    assert all(n in (4, 8, 12) for n in tokens.lengths.tolist())
    assert encode_main(args + ["--fallback", "best", "--criterion", "tokens:8"]) == 2
    assert "needs a criterion with a score" in capsys.readouterr().err


def test_decode_cli_reports_bad_token_files_in_one_line(tmp_path, capsys):
    for bad in (tmp_path / "missing.safetensors", tmp_path):
        assert decode_main([str(bad), "--out", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("alit-fast decode: ")


@pytest.mark.parametrize("extra,message", [
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--criterion", "code-acc:1.5"], "code-acc:1.5"),
    (["--criterion", "tokens:7"], "multiples of 4"),
    (["--device", "cuda:0"], "no CUDA GPU"),
    (["--device", "toaster"], "not a device name"),
])
def test_encode_cli_refuses_bad_arguments_before_any_work(image_dir, checkpoint, tmp_path, capsys, extra, message):
    if "cuda" in extra[-1] and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    out = tmp_path / "t.safetensors"
    assert encode_main([str(image_dir), "--checkpoint", checkpoint, "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("alit-fast encode: ") and message in err[0]
    assert not out.exists()


@pytest.mark.parametrize("where", ["directory", "missing folder"])
def test_encode_cli_checks_the_output_path_before_encoding(image_dir, checkpoint, tmp_path, capsys, where):
    out = tmp_path if where == "directory" else tmp_path / "nowhere" / "t.safetensors"
    assert encode_main([str(image_dir), "--checkpoint", checkpoint, "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.tmp"))


def test_encode_cli_takes_the_official_halting_mode(image_dir, tmp_path, capsys):
    # 'official' is the one mode both variants take (stochastic for a VQGAN model, the official
    # no-op for a VAE model), so the CLI must offer it
    from alit_fast.testing import tiny_vae_config

    torch.manual_seed(0)
    vae_model = tmp_path / "vae.safetensors"
    ALIT(tiny_vae_config()).save(str(vae_model))
    out = tmp_path / "tokens.safetensors"
    assert encode_main([str(image_dir), "--checkpoint", str(vae_model), "--criterion", "tokens:8",
                        "--halting", "official", "--out", str(out)]) == 0
    assert TokenBatch.load(out).lengths.tolist() == [8, 8, 8]
