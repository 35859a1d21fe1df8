"""The newcomer's path (issue 25): one loader, errors a person can act on, defaults that work."""
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import alit_fast
from alit_fast.cli import main as cli_main
from alit_fast.testing import random_images, tiny_config
from alit_fast.errors import run_command
from _single_thread import one_thread  # noqa: F401 (an autouse fixture)


@pytest.fixture(scope="module")
def demo():
    return alit_fast.load("demo")


@pytest.fixture
def no_gpu_no_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def image_dir(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(4):
        level = i / 3  # flat to noisy
        array = (128 + level * 127 * rng.uniform(-1, 1, (32, 32, 3))).astype(np.uint8)
        Image.fromarray(array).save(folder / f"{i}.png")
    return folder


def _same_outputs(a, b) -> None:
    images = random_images(2, 32, seed=3)
    with torch.no_grad():
        for x, y in zip(a.rollout(images), b.rollout(images)):
            assert torch.equal(x.indices, y.indices)


# ---------------------------------------------------------------------- one way in
def test_load_reads_every_layout_into_an_eval_model_without_gradients(demo, tmp_path):
    model = alit_fast.ALIT(tiny_config()).eval()
    model.save(tmp_path / "model.safetensors")
    model.save_pretrained(tmp_path / "dir")
    torch.save({"ema": model.state_dict()}, tmp_path / "official.pth")
    for spec in (tmp_path / "model.safetensors", str(tmp_path / "dir"), str(tmp_path / "official.pth")):
        loaded = alit_fast.load(spec)
        assert not loaded.training and not any(p.requires_grad for p in loaded.parameters()), spec
        assert loaded.backend == "auto"  # resolved per op call: torch on a CPU (alit_fast.ops.auto)
        _same_outputs(model, loaded)
    assert not demo.training and demo.config.image_size == 32


def test_load_names_an_unknown_model_and_a_missing_file():
    with pytest.raises(ValueError, match="available: \\['demo'\\]"):
        alit_fast.load("no-such-model")
    with pytest.raises(FileNotFoundError, match="nowhere/model.safetensors"):
        alit_fast.load("nowhere/model.safetensors")


# ---------------------------------------------------------------------- 1: triton on a CPU
def test_triton_backend_on_a_cpu_without_the_interpreter_is_refused_at_set_backend(no_gpu_no_interpreter):
    model = alit_fast.ALIT(tiny_config())
    with pytest.raises(ValueError, match="needs a CUDA GPU .*TRITON_INTERPRET=1"):
        model.set_backend("triton")
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        alit_fast.load("demo", backend="triton")


@pytest.mark.parametrize("command", ["train", "encode"])
def test_backend_triton_flag_on_a_cpu_is_one_line_before_any_work(no_gpu_no_interpreter, command, tmp_path, capsys):
    out = tmp_path / "run"
    argv = {"train": ["train", "--steps", "1", "--out", str(out)],
            "encode": ["encode", str(tmp_path), "--out", str(out) + ".safetensors"]}[command]
    with pytest.raises(SystemExit) as stopped:  # argparse's way out of a bad flag
        cli_main(argv + ["--backend", "triton"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--backend triton" in err and "CUDA GPU" in err
    assert not os.path.exists(out) and not os.path.exists(str(out) + ".safetensors")  # a rerun is not blocked


# ---------------------------------------------------------------------- 6: Ctrl-C
@pytest.mark.parametrize("prog,hint", [("alit-fast train", "--resume"), ("alit-fast pretokenize", "finished shards are kept"),
                                       ("alit-fast decode", "rerun the command with --overwrite"),
                                       ("alit-fast encode", "marked partial"),
                                       ("alit-fast evaluate", "continue from the progress saved"),
                                       ("python -m alit_fast.train_vqgan", "--resume")])
def test_ctrl_c_ends_a_command_with_one_line_saying_how_to_resume(prog, hint, capsys):
    def body(argv):
        raise KeyboardInterrupt

    assert run_command(prog, body, []) == 130
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith(f"{prog}: interrupted") and hint in err


def test_a_user_error_raised_in_a_data_loader_worker_is_its_own_one_line(capsys):
    from torch._utils import ExceptionWrapper

    from alit_fast.training.data import UnreadableImage

    try:  # what torch's DataLoader hands the main process: the worker's traceback as the message
        raise UnreadableImage("image x.png cannot be read (OSError: image file is truncated); remove or replace it")
    except UnreadableImage:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")

    def body(argv):
        wrapped.reraise()

    assert run_command("alit-fast train", body, []) == 2
    assert capsys.readouterr().err == ("alit-fast train: image x.png cannot be read (OSError: image file is truncated); "
                                       "remove or replace it\n")


def test_an_io_error_met_reading_is_not_called_a_write_error(capsys, tmp_path):
    import errno

    from alit_fast.files import write_atomic

    def reads(argv):  # what a failing disk gives a reader
        raise OSError(errno.EIO, "Input/output error", "/data/img_0001.png")

    assert run_command("alit-fast encode", reads, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot write" not in err and "input/output error on /data/img_0001.png" in err

    def unnamed(argv):
        raise OSError(errno.EIO, "Input/output error")

    assert run_command("alit-fast encode", unnamed, []) == 2
    err = capsys.readouterr().err
    assert err.startswith("alit-fast encode: input/output error (no file named): Input/output error"), err

    def writes(argv):  # the same errno from a writer stays a write error
        def fail(tmp):
            raise OSError(errno.EIO, "Input/output error")

        write_atomic(tmp_path / "out.safetensors", fail)

    assert run_command("alit-fast encode", writes, []) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot write {tmp_path / 'out.safetensors'}" in err, err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------------- 2, 7: training
def _train(tmp_path, *extra) -> int:
    return cli_main(["train", "--data", "synthetic", "--data-length", "4", "--batch-size", "2", "--steps", "1",
                     "--halting", "off", "--ema", "0.9", "--workers", "0", "--no-progress", "--out", str(tmp_path / "run"),
                     *extra])


def test_init_takes_the_bundled_model_name_like_checkpoint(tmp_path, capsys, demo):
    assert _train(tmp_path, "--init", "demo") == 0
    out = capsys.readouterr()
    assert "from demo" in out.out and "random" not in out.err
    assert alit_fast.load(tmp_path / "run" / "model.safetensors").config == demo.config


def test_finished_training_says_where_the_model_was_written(tmp_path, capsys, demo):
    assert _train(tmp_path, "--init-vqgan", "demo") == 0
    out = capsys.readouterr()
    ema = tmp_path / "run" / "ema.safetensors"
    assert f"--checkpoint {ema}" in out.out.splitlines()[-1]
    trained = alit_fast.load(ema)
    assert torch.equal(trained.base_tokenizer.codebook, demo.base_tokenizer.codebook)  # the bundled VQGAN


def test_training_with_a_random_vqgan_warns(tmp_path, capsys):
    config = tmp_path / "tiny.json"
    config.write_text(tiny_config().to_json())
    assert _train(tmp_path, "--config", str(config)) == 0
    err = capsys.readouterr().err
    assert "VQGAN is random" in err and "--init-vqgan demo" in err


# ---------------------------------------------------------------------- 4: open_dataset
def test_open_dataset_item_is_what_the_docs_say(tmp_path, image_dir, capsys):
    assert cli_main(["pretokenize", str(image_dir), "--checkpoint", "demo", "--shard-size", "2",
                     "--criterion", "tokens:8", "--out", str(tmp_path / "tok")]) == 0
    from alit_fast.tokens import open_dataset

    item = open_dataset(tmp_path / "tok" / "index.json")[0]
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    line = next(l for l in readme.splitlines() if "open_dataset(" in l and "->" in l)
    assert type(item).__name__ in line
    for field in ("codes", "length", "path"):
        assert f"{field}" in line and hasattr(item, field)
    assert item.length == 8 and item.codes.shape[0] == 8 and item.path.endswith("0.png")


# ---------------------------------------------------------------------- 5: evaluate
def test_evaluate_defaults_need_no_download_and_say_how_to_add_fid_and_lpips(tmp_path, image_dir, capsys, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "empty-hub"))
    assert cli_main(["evaluate", "--data", str(image_dir), "--checkpoint", "demo", "--tokens", "8", "--halting", "off",
                     "--workers", "0", "--quiet", "--out", str(tmp_path / "ev")]) == 0
    err = capsys.readouterr().err
    assert "--metrics l1,l2,psnr,ssim,lpips,fid adds them" in err
    row = json.loads((tmp_path / "ev" / "metrics.json").read_text())["rows"][0]
    assert row["l1"] > 0 and row.get("fid") is None


def test_evaluate_names_a_given_missing_weights_file_without_offering_its_flag(tmp_path, image_dir, capsys):
    code = cli_main(["evaluate", "--data", str(image_dir), "--checkpoint", "demo", "--metrics", "fid",
                     "--fid-weights", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "nope.pth" in err and "does not exist" in err and "pass --fid-weights" not in err


def test_evaluate_skips_an_unreadable_image_with_one_named_line(tmp_path, image_dir, capsys):
    (image_dir / "broken.png").write_bytes(b"not an image")
    assert cli_main(["evaluate", "--data", str(image_dir), "--checkpoint", "demo", "--tokens", "8", "--halting", "off",
                     "--workers", "2", "--quiet", "--out", str(tmp_path / "ev")]) == 0
    err = capsys.readouterr().err
    assert "skipped 1 unreadable file(s)" in err and "broken.png" in err and "Traceback" not in err
    assert json.loads((tmp_path / "ev" / "metrics.json").read_text())["rows"][0]["images"] == 4


def test_evaluate_names_an_image_damaged_past_its_header_in_one_line(tmp_path, image_dir, capsys):
    # read in this process here (a worker process costs seconds to start); read in a worker, the same
    # line reaches the user through run_command (test_a_user_error_raised_in_a_data_loader_worker_...)
    whole = (image_dir / "1.png").read_bytes()
    (image_dir / "1.png").write_bytes(whole[: len(whole) // 2])  # the header reads; the pixels do not
    assert cli_main(["evaluate", "--data", str(image_dir), "--checkpoint", "demo", "--tokens", "8", "--halting", "off",
                     "--workers", "0", "--quiet", "--out", str(tmp_path / "ev")]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ": note: " not in ln and "LPIPS" not in ln]
    assert err == [f"alit-fast evaluate: cannot read the image {image_dir / '1.png'}: OSError: image file is truncated"]


# ---------------------------------------------------------------------- 8: the Hub unreachable
def test_an_unreachable_hub_is_one_line_naming_the_network(tmp_path, monkeypatch, capsys):
    pytest.importorskip("huggingface_hub")
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="cannot be reached .*check the network"):
        alit_fast.load("hf-hub:me/absent")

    import huggingface_hub

    class Unreachable:
        def __init__(self, token=None):
            pass

        def create_repo(self, *args, **kwargs):
            raise RuntimeError("upload failed") from ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(huggingface_hub, "HfApi", Unreachable)
    with pytest.raises(ConnectionError, match="cannot upload to 'me/x'.*check the network"):
        alit_fast.ALIT(tiny_config()).push_to_hub("me/x")


# ---------------------------------------------------------------------- 9: the criterion
def test_the_bundled_model_recommends_its_criterion_and_encode_uses_it(demo, tmp_path):
    assert demo.recommended_criterion == "pixel-l1:0.12"
    tokens = demo.encode(random_images(2, 32, seed=1))
    assert tokens.extra["criterion"] == "pixel-l1:0.12"
    demo.save(tmp_path / "again.safetensors")  # the key survives a save, and the fingerprint still checks
    assert alit_fast.load(tmp_path / "again.safetensors").recommended_criterion == "pixel-l1:0.12"
    assert alit_fast.ALIT(tiny_config()).default_criterion == alit_fast.inference.DEFAULT_CRITERION


def test_encode_reports_how_many_images_never_met_the_criterion(tmp_path, image_dir, capsys):
    assert cli_main(["encode", str(image_dir), "--criterion", "pixel-l1:0.0001", "--quiet",
                     "--out", str(tmp_path / "t.safetensors")]) == 0
    assert "4 of 4 images did not meet pixel-l1:0.0001 below the maximum and got 64 tokens" in capsys.readouterr().out


def test_pretokenize_reports_how_many_images_never_met_the_criterion(tmp_path, image_dir, capsys):
    assert cli_main(["pretokenize", str(image_dir), "--criterion", "pixel-l1:0.0001", "--shard-size", "2",
                     "--out", str(tmp_path / "ds")]) == 0
    assert "4 of 4 images did not meet pixel-l1:0.0001 below the maximum and got 64 tokens" in capsys.readouterr().out


# ---------------------------------------------------------------------- 3: one preprocessing rule
@pytest.fixture
def photo(tmp_path):
    """A 90x60 photo: three vertical bands, so a crop and a resize see different pixels."""
    array = np.zeros((60, 90, 3), np.uint8)
    array[:, :30], array[:, 30:60], array[:, 60:] = 250, 120, 10
    folder = tmp_path / "photo"
    folder.mkdir()
    Image.fromarray(array + np.random.default_rng(0).integers(0, 5, array.shape, dtype=np.uint8)).save(folder / "p.png")
    return folder / "p.png"


def test_every_image_reader_sees_the_same_pixels_of_a_photo(photo):
    from alit_fast.evaluation.data import read_image
    from alit_fast.io.images import load_image  # encode, visualize
    from alit_fast.io.token_dataset import read_source  # pretokenize
    from alit_fast.training.data import ImageFolder

    encode = load_image(photo, 32)
    assert torch.equal(read_source(str(photo), 32), encode)
    assert torch.equal(ImageFolder(photo.parent, 32, augment=False)[0]["image"], encode)
    assert (read_image(photo, 32, "resize").float() / 255 - encode).abs().max() <= 1 / 255  # evaluate --crop resize
    assert encode[:, :, :8].mean() > 0.9 and encode[:, :, -8:].mean() < 0.1  # all three bands are in it


def test_evaluate_says_when_its_centre_crop_takes_pixels_at_native_size(tmp_path, photo, capsys):
    argv = ["evaluate", "--data", str(photo.parent), "--checkpoint", "demo", "--tokens", "8", "--halting", "off",
            "--metrics", "l1", "--workers", "0", "--quiet"]
    assert cli_main(argv + ["--out", str(tmp_path / "centre")]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert len(notes) == 1 and "1 image(s) were not 32x32: --crop center took their central 32x32 pixels" in notes[0]
    assert cli_main(argv + ["--out", str(tmp_path / "resize"), "--crop", "resize"]) == 0
    notes = [ln for ln in capsys.readouterr().err.splitlines() if "note:" in ln]
    assert len(notes) == 1 and "1 image(s) were not 32x32: shorter side resized to 32, then centre-cropped" in notes[0]


# ---------------------------------------------------------------------- 10: the picture, decode advice
def test_demo_picture_labels_its_rows_and_columns(demo):
    from alit_fast.cli.demo import GRID_ROWS, demo_images, make_grid

    items = demo_images(32, 1, photos=False)[:2]
    images = torch.stack([it.image for it in items])
    grid = np.asarray(make_grid(items, images.flip(-1), [8, 64], side=64).convert("L"))
    assert GRID_ROWS == ("input", "reconstruction", "error, 4|x - x'|", "tokens chosen")
    margin = grid[:, :100]
    assert (margin < 128).any(axis=1).sum() >= 4 * 5  # text in the label column at every row
    assert (grid[:14, 100:] < 250).any()  # the column headings


def test_decode_config_mismatch_advice_fits_where_it_is_read(tmp_path, capsys, demo):
    other = alit_fast.ALIT(tiny_config())
    tokens = other.encode(random_images(2, 32), "tokens:8")
    with pytest.raises(ValueError) as python_error:
        demo.decode(tokens)
    assert "check_config=False" in str(python_error.value) and "--" not in str(python_error.value)
    tokens.checkpoint = "demo"
    tokens.save(tmp_path / "t.safetensors")
    assert cli_main(["decode", str(tmp_path / "t.safetensors"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "--ignore-config" in err and "check_config" not in err
