"""``alit_fast.load``, the one way in: a user's model spec (bundled name, file, directory or Hub
repo) to a model ready for inference. Behind it, one reader per layout: models that ship inside the
package (alit_fast/io/pretrained_models/*.safetensors), alit_fast files (``load_file``), official
checkpoints (``load_official``), and the Hugging Face Hub layout (a local directory, or
``hf-hub:OWNER/REPO[@REVISION]``)."""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_file, load_official, model_from_safetensors
from ..ops import check_backend_here
from .model import ALIT
from .weights import FINGERPRINT_KEY, METADATA_CONFIG_KEY, check_device, read_safetensors
from .repo import CONFIG_NAME, LIBRARY_NAME, WEIGHTS_NAME, check_repo_id, hub_endpoint, require_hub, unreachable_hub

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
    """A bundled name ("demo"), a directory written by ``save_pretrained``, or
    ``hf-hub:OWNER/REPO[@REVISION]``, in eval mode without gradients: ``alit_fast.load`` restricted
    to the layouts that record their config."""
    if isinstance(name, str) and name.startswith(HUB_PREFIX):
        model = load_directory(hub_snapshot(name), map_location=map_location, backend=backend)
    elif name not in PRETRAINED and os.path.isdir(name):
        model = load_directory(name, map_location=map_location, backend=backend)
    else:
        model = load_file(pretrained_path(name), map_location=map_location, backend=backend)
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
        network = None if offline else unreachable_hub(exc)
        if offline:
            mode = "offline (HF_HUB_OFFLINE=1), not in the cache"
        elif network:
            mode = f"the Hugging Face Hub ({hub_endpoint()}) cannot be reached and it is not in the cache; check the network ({network})"
        else:
            mode = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
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
    model = load_file(root / WEIGHTS_NAME, map_location=map_location, backend=backend)
    if json.loads(model.config.to_json()) != document["config"]:
        raise CheckpointError(f"{root / CONFIG_NAME} disagrees with the config recorded in {root / WEIGHTS_NAME}")
    return model


CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt")


def read_model(spec: str | os.PathLike, device: torch.device) -> ALIT:
    """The model ``spec`` names, on ``device``, with the torch backend: the layout decides the reader."""
    spec = os.fspath(spec)
    if spec.startswith(HUB_PREFIX):
        return load_directory(hub_snapshot(spec), map_location=device)
    if os.path.isdir(spec) and spec not in PRETRAINED:
        return load_directory(spec, map_location=device)
    if not os.path.exists(spec):
        if spec in PRETRAINED or not (os.sep in spec or "/" in spec or spec.endswith(CHECKPOINT_SUFFIXES)):
            return load_file(pretrained_path(spec), map_location=device)  # an unknown name lists the known ones
        raise FileNotFoundError(f"checkpoint not found: {spec}")
    if spec.endswith(".safetensors"):
        state, meta = read_safetensors(spec, device)  # read once; checks the fingerprint
        # a file with our metadata that fails (an edited config, a broken fingerprint) is refused:
        # inferring sizes from the shapes would load another model
        if METADATA_CONFIG_KEY in meta or FINGERPRINT_KEY in meta:
            return model_from_safetensors(spec, state, meta, device, "torch")
        warnings.warn(f"{spec} has no alit_fast config: reading it as official-layout weights, sizes inferred "
                      "from the tensor shapes (heads = layers)", stacklevel=3)
        return load_official(state, map_location=device)  # official weights re-saved as safetensors
    return load_official(spec, map_location=device)


def load(spec: str | os.PathLike, *, device: str | torch.device | None = None, backend: str = "auto") -> ALIT:
    """The model ``spec`` names, in eval mode without gradients, ready for ``encode``/``decode``.

    ``spec``: a bundled name ("demo"), a file (written by ``ALIT.save``, or an official checkpoint:
    ``.pth`` with ``model``/``ema`` entries, ``ema`` preferred), a directory written by
    ``save_pretrained``, or ``hf-hub:OWNER/REPO[@REVISION]`` (fetched once into the Hugging Face
    cache; with ``HF_HUB_OFFLINE=1`` read from it only). ``device``: where the weights go (default
    the CPU). ``backend``: "auto" (on a GPU, per shape the fastest of the Triton kernels and torch's,
    measured once: alit_fast.ops.auto; torch on a CPU), "torch", "triton" or "official". To train it, ``model.train().requires_grad_(True)``; the base tokenizer of a
    stage-1 model stays frozen in training as the trainers set it.
    """
    dev = check_device("cpu" if device is None else device)
    check_backend_here(backend, dev)  # before the weights are read: a wrong backend costs nothing
    model = read_model(spec, dev)
    return model.set_backend(backend).eval().requires_grad_(False)
