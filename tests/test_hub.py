"""Models as Hub-layout directories: save_pretrained / load_pretrained(DIR), hf-hub: specs read from
a pre-filled Hugging Face cache with HF_HUB_OFFLINE=1 (never the network), push_to_hub against a
stand-in API, and `alit-fast convert` of an official checkpoint."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import alit_fast
from alit_fast.cli import main as cli_main
from alit_fast.io import ALIT, CheckpointError, load_official
from alit_fast.io.pretrained import parse_hub_spec
from alit_fast.io.repo import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME, model_card
from alit_fast.testing import random_images, tiny_config, tiny_vae_config
from tests._single_thread import one_thread  # noqa: F401

hub = pytest.importorskip("huggingface_hub")
from huggingface_hub import constants as hub_constants  # noqa: E402

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _model(seed: int = 0, **changes) -> ALIT:
    torch.manual_seed(seed)
    return ALIT(tiny_config(**changes)).eval()


def _same_outputs(a: ALIT, b: ALIT) -> None:
    images = random_images(2, a.config.image_size, seed=3)
    ra, rb = a.rollout(images), b.rollout(images)
    for x, y in zip(ra, rb):
        assert torch.equal(x.indices, y.indices)
        assert torch.equal(x.logits, y.logits)


def _fill_cache(cache: Path, repo_id: str, source: Path, revision_name: str = "main") -> None:
    """The Hugging Face cache layout: models--OWNER--REPO/{refs/<name>, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / COMMIT
    snap.mkdir(parents=True)
    for name in (WEIGHTS_NAME, CONFIG_NAME, CARD_NAME):
        shutil.copy(source / name, snap / name)
    (repo / "refs").mkdir()
    (repo / "refs" / revision_name).write_text(COMMIT)


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_save_pretrained_round_trips_through_a_directory(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "m", repo_id="me/tiny", evaluation={"rows": [{"name": "tokens:8", "l1": 0.1}]})
    assert sorted(os.listdir(tmp_path / "m")) == sorted([WEIGHTS_NAME, CONFIG_NAME, CARD_NAME])
    doc = json.loads((tmp_path / "m" / CONFIG_NAME).read_text())
    assert doc["library_name"] == "alit_fast" and doc["config"] == json.loads(model.config.to_json())
    card = (tmp_path / "m" / CARD_NAME).read_text()
    assert 'alit_fast.load("hf-hub:me/tiny")' in card and "| tokens:8 | 0.1 |" in card
    loaded = alit_fast.load_pretrained(str(tmp_path / "m"))
    assert loaded.config == model.config and not loaded.training
    _same_outputs(model, loaded)
    _same_outputs(model, alit_fast.load(str(tmp_path / "m")))  # the CLI's --checkpoint resolver too


def test_save_pretrained_refuses_to_replace_a_model_without_overwrite(tmp_path):
    out = tmp_path / "m"
    _model(0).save_pretrained(out)
    (out / "notes.txt").write_text("mine")
    before = (out / WEIGHTS_NAME).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite=True"):
        _model(1).save_pretrained(out)
    assert (out / WEIGHTS_NAME).read_bytes() == before
    _model(1).save_pretrained(out, overwrite=True)
    assert (out / WEIGHTS_NAME).read_bytes() != before and (out / "notes.txt").read_text() == "mine"


def test_edited_config_json_is_refused(tmp_path):
    out = tmp_path / "m"
    _model().save_pretrained(out)
    doc = json.loads((out / CONFIG_NAME).read_text())
    doc["config"]["heads"] = 4  # what no tensor shape shows
    (out / CONFIG_NAME).write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="disagrees"):
        alit_fast.load_pretrained(str(out))


def test_directory_without_model_files_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        alit_fast.load_pretrained(str(tmp_path / "empty"))


@pytest.mark.parametrize("spec,expected", [
    ("hf-hub:me/tiny", ("me/tiny", None)),
    ("hf-hub:me/tiny@v1.0", ("me/tiny", "v1.0")),
])
def test_hub_spec_parses(spec, expected):
    assert parse_hub_spec(spec) == expected


@pytest.mark.parametrize("spec", ["hf-hub:tiny", "hf-hub:me/tiny/extra", "hf-hub:me/", "hf-hub:me/tiny@", "hf-hub:../x"])
def test_malformed_hub_spec_is_one_error(spec):
    with pytest.raises(ValueError, match="OWNER/REPO|empty revision"):
        alit_fast.load_pretrained(spec)


def test_hub_model_loads_from_the_offline_cache(tmp_path, offline_cache):
    model = _model()
    model.save_pretrained(tmp_path / "repo")
    _fill_cache(offline_cache, "me/tiny", tmp_path / "repo")
    loaded = alit_fast.load_pretrained("hf-hub:me/tiny")
    _same_outputs(model, loaded)
    _same_outputs(model, alit_fast.load_pretrained(f"hf-hub:me/tiny@{COMMIT}"))


def test_hub_model_missing_offline_names_repo_and_cache(offline_cache):
    with pytest.raises(FileNotFoundError) as info:
        alit_fast.load_pretrained("hf-hub:me/absent")
    message = str(info.value)
    assert "'me/absent'" in message and "offline" in message and str(offline_cache) in message
    assert "\n" not in message


def test_push_to_hub_uploads_the_saved_directory(monkeypatch):
    uploaded: dict = {}

    class FakeApi:
        def __init__(self, token=None):
            uploaded["token"] = token

        def create_repo(self, repo_id, private=False, exist_ok=False):
            uploaded["created"] = (repo_id, private, exist_ok)

        def upload_folder(self, folder_path, repo_id, revision=None, commit_message=""):
            uploaded["files"] = {n: Path(folder_path, n).read_bytes() for n in os.listdir(folder_path)}
            return "https://example.invalid/commit/1"

    monkeypatch.setattr(hub, "HfApi", FakeApi)
    model = _model()
    assert model.push_to_hub("me/tiny", token="t") == "https://example.invalid/commit/1"
    assert uploaded["created"] == ("me/tiny", False, True) and uploaded["token"] == "t"
    assert sorted(uploaded["files"]) == sorted([WEIGHTS_NAME, CONFIG_NAME, CARD_NAME])
    with pytest.raises(ValueError, match="OWNER/REPO"):
        model.push_to_hub("no-owner")


def _official_checkpoint(path: Path) -> tuple[dict, dict]:
    torch.manual_seed(5)
    ema = {k: v.clone() for k, v in ALIT(tiny_config()).state_dict().items()}
    torch.manual_seed(6)
    raw = {k: v.clone() for k, v in ALIT(tiny_config()).state_dict().items()}
    # an official file: module. prefixes, stage-2 discriminator keys the inference model ignores
    torch.save({"model": {f"module.{k}": v for k, v in raw.items()} | {"gan_losses.x": torch.ones(1)},
                "ema": ema}, path)
    return ema, raw


@pytest.mark.parametrize("entry", [None, "ema", "model"])
def test_convert_gives_the_same_model_as_load_official(tmp_path, capsys, entry):
    ckpt = tmp_path / "official.pth"
    ema, raw = _official_checkpoint(ckpt)
    # the tiny preset's heads are not what shape inference picks, so pass them as a user would
    heads = ["--num-heads", str(tiny_config().heads)]
    argv = [str(ckpt), str(tmp_path / "out"), *heads] + (["--entry", entry] if entry else [])
    assert cli_main(["convert", *argv]) == 0
    converted = alit_fast.load_pretrained(str(tmp_path / "out"))
    expected = load_official(raw if entry == "model" else ema, num_heads=tiny_config().heads).eval()
    _same_outputs(expected, converted)


def test_convert_refuses_an_existing_model_directory(tmp_path, capsys):
    ckpt = tmp_path / "official.pth"
    _official_checkpoint(ckpt)
    out = tmp_path / "out"
    assert cli_main(["convert", str(ckpt), str(out), "--num-heads", "2"]) == 0
    before = (out / WEIGHTS_NAME).read_bytes()
    capsys.readouterr()
    assert cli_main(["convert", str(ckpt), str(out), "--entry", "model", "--num-heads", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alit-fast convert: ") and "--overwrite" in err and "\n" not in err
    assert (out / WEIGHTS_NAME).read_bytes() == before


def _garbage(d: Path) -> str:
    (d / "garbage.pth").write_bytes(b"not a checkpoint")
    return str(d / "garbage.pth")


@pytest.mark.parametrize("make,needle,extra", [
    (lambda d: str(d / "missing.pth"), "no such file", []),
    (lambda d: str(d), "is a directory", []),
    (_garbage, "could not be read", []),
    (_garbage, "could not be read", ["--entry", "ema"]),  # the entry is read before load_official
])
def test_convert_bad_checkpoint_is_one_line(tmp_path, capsys, make, needle, extra):
    assert cli_main(["convert", make(tmp_path), str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alit-fast convert: ") and needle in err and "\n" not in err


def test_convert_missing_entry_is_named(tmp_path, capsys):
    ckpt = tmp_path / "raw.pth"
    torch.save(ALIT(tiny_config()).state_dict(), ckpt)
    assert cli_main(["convert", str(ckpt), str(tmp_path / "o"), "--entry", "ema"]) == 2
    assert "no 'ema' entry" in capsys.readouterr().err


@pytest.mark.parametrize("make_config", [tiny_config, tiny_vae_config], ids=["vqgan", "vae"])
def test_model_card_example_runs_on_the_model_it_describes(make_config):
    torch.manual_seed(0)
    model = ALIT(make_config()).eval()
    card = model_card(model, repo_id="me/tiny")
    example = next(line for line in card.splitlines() if "model.encode(" in line)
    criterion = example.split('criterion="', 1)[1].split('"', 1)[0]
    tokens = model.encode(torch.rand(2, 3, 32, 32), criterion=criterion)
    assert tokens.lengths.shape == (2,)
