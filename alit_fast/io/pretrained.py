"""Models that ship inside the package (alit_fast/io/pretrained_models/*.safetensors), models in
the Hugging Face Hub layout (a local directory, or ``hf-hub:OWNER/REPO[@REVISION]``), and one
resolver from a user's model spec (file, directory, Hub repo or bundled name) to a loaded model."""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load, load_official
from .model import ALIT
from .repo import CONFIG_NAME, LIBRARY_NAME, WEIGHTS_NAME, check_repo_id, require_hub

HUB_PREFIX = "hf-hub:"

PRETRAINED_DIR = Path(__file__).resolve().parent / "pretrained_models"
# name -> (file, what it is); the files are written by ALIT.save and hold the config
PRETRAINED: dict[str, tuple[str, str]] = {
    "demo": (
        "demo.safetensors",
        "the 'demo' preset (32x32 images, 8..64 tokens) with its own VQGAN, both trained on CPU by "
        "alit_fast.train_vqgan (synthetic images and scikit-image photo crops) and alit_fast.train "
        "(synthetic images)",
    ),
}


def pretrained_path(name: str = "demo") -> Path:
    if name not in PRETRAINED:
        raise ValueError(f"unknown pretrained model {name!r}; available: {sorted(PRETRAINED)}")
    path = PRETRAINED_DIR / PRETRAINED[name][0]
    if not path.exists():
        raise FileNotFoundError(f"the pretrained model file {path} is missing from this installation")
    return path


def load_pretrained(name: str = "demo", backend: str = "auto", map_location: str | torch.device = "cpu") -> ALIT:
    """A model ready for inference (eval mode, no gradients needed): a bundled name ("demo"), a
    directory written by ``save_pretrained``, or ``hf-hub:OWNER/REPO[@REVISION]`` (downloaded once
    into the Hugging Face cache; with ``HF_HUB_OFFLINE=1`` read from that cache only)."""
    if isinstance(name, str) and name.startswith(HUB_PREFIX):
        model = load_directory(hub_snapshot(name), map_location=map_location, backend=backend)
    elif name not in PRETRAINED and os.path.isdir(name):
        model = load_directory(name, map_location=map_location, backend=backend)
    else:
        model = load(pretrained_path(name), map_location=map_location, backend=backend)
    return model.eval().requires_grad_(False)


def parse_hub_spec(spec: str) -> tuple[str, str | None]:
    """``hf-hub:OWNER/REPO[@REVISION]`` -> (repo id, revision or None)."""
    body = spec[len(HUB_PREFIX):] if spec.startswith(HUB_PREFIX) else spec
    repo_id, _, revision = body.partition("@")
    if _ and not revision:
        raise ValueError(f"{spec!r}: empty revision after '@'")
    return check_repo_id(repo_id), (revision or None)


def hub_snapshot(spec: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The local directory of a Hub model's files (model.safetensors, config.json), fetched into
    the Hugging Face cache if needed and allowed."""
    repo_id, revision = parse_hub_spec(spec)
    hub = require_hub()
    from huggingface_hub import constants

    offline = bool(constants.HF_HUB_OFFLINE) or os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    where = os.fspath(cache_dir) if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        path = hub.snapshot_download(
            repo_id, revision=revision, cache_dir=cache_dir, allow_patterns=[WEIGHTS_NAME, CONFIG_NAME],
            local_files_only=offline, library_name=LIBRARY_NAME,
        )
    except Exception as exc:  # the library raises many kinds (offline, not found, auth, network)
        mode = "offline (HF_HUB_OFFLINE=1), not in the cache" if offline else type(exc).__name__
        rev = f" at revision {revision!r}" if revision else ""
        raise FileNotFoundError(f"cannot load Hub model {repo_id!r}{rev}: {mode}; looked in {where}") from exc
    return Path(path)


def load_directory(directory: str | os.PathLike, map_location: str | torch.device = "cpu", backend: str = "auto") -> ALIT:
    """A model directory in the Hub layout (``save_pretrained``); config.json must agree with the
    config recorded in model.safetensors, so an edited config.json is caught, not trusted."""
    root = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (root / name).is_file():
            raise FileNotFoundError(f"{root} is not an alit_fast model directory: {name} is missing")
    try:
        document = json.loads((root / CONFIG_NAME).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{root / CONFIG_NAME} is not valid JSON: {exc}") from None
    if not isinstance(document, dict) or document.get("library_name") != LIBRARY_NAME or "config" not in document:
        raise CheckpointError(f"{root / CONFIG_NAME} is not an alit_fast config (library_name {LIBRARY_NAME!r} expected)")
    model = load(root / WEIGHTS_NAME, map_location=map_location, backend=backend)
    if json.loads(model.config.to_json()) != document["config"]:
        raise CheckpointError(f"{root / CONFIG_NAME} disagrees with the config recorded in {root / WEIGHTS_NAME}")
    return model


def load_model(spec: str, backend: str = "auto", device: str | torch.device = "cpu") -> ALIT:
    """An ALIT from an alit_fast safetensors file, an official checkpoint, a model directory,
    ``hf-hub:OWNER/REPO[@REVISION]``, or a bundled name ("demo")."""
    if spec.startswith(HUB_PREFIX) or (os.path.isdir(spec) and spec not in PRETRAINED):
        model = load_pretrained(spec)
    elif not os.path.exists(spec):
        if os.sep in spec or spec.endswith((".safetensors", ".pth", ".pt", ".ckpt")):
            raise FileNotFoundError(f"checkpoint not found: {spec}")
        model = load_pretrained(spec)
    elif spec.endswith(".safetensors"):
        try:
            model = load(spec)
        except CheckpointError:  # a safetensors file without our metadata: official weights re-saved
            model = load_official(spec)
    else:
        model = load_official(spec)
    return model.to(device).set_backend(backend).eval()
