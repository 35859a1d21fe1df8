"""The alit_fast model file: safetensors weights in the official key layout, the config in the
metadata. Written here, read by ``alit_fast.io.checkpoint.load``."""
from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping

import torch
from safetensors.torch import save_file

from ..files import write_atomic
from ..inference.calibration import METADATA_KEY as CALIBRATION_KEY

METADATA_CONFIG_KEY = "alit_fast_config"
# sha256 over the config JSON and every tensor (name, dtype, shape, bytes), written at save: some
# settings show in no tensor shape (heads, the halting threshold, the loss weights), so metadata
# edited after saving would otherwise load silently as a different model
FINGERPRINT_KEY = "alit_fast_sha256"
# the stopping criterion a model's authors recommend (a criterion string, e.g. "pixel-l1:0.12"):
# encode's default for that model; outside the fingerprint, as it changes no output of the model
RECOMMENDED_CRITERION_KEY = "alit_fast.recommended_criterion"


class CheckpointError(ValueError):
    """A checkpoint that does not fit the model; the message lists every problem at once."""


def fingerprint(config_json: str, tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256(config_json.encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def check_fingerprint(path: str, metadata: Mapping[str, str], tensors: Mapping[str, torch.Tensor]) -> None:
    """Raise a CheckpointError when a file's recorded fingerprint does not match its config and
    weights. Files written before fingerprints (and by other tools) carry none and pass."""
    recorded = metadata.get(FINGERPRINT_KEY)
    if recorded is not None and recorded != fingerprint(metadata.get(METADATA_CONFIG_KEY, ""), tensors):
        raise CheckpointError(
            f"{path}: its config metadata or its weights were edited after it was saved (the fingerprint "
            "recorded at save does not match): the config may contradict the weights. Re-save the model with "
            "ALIT.save, or load the weights alone with load_official(path, num_heads=...)")


def writable_file(path: str | os.PathLike, what: str = "the output") -> str:
    """``path`` as a string, after refusing a directory or a missing parent folder by name."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"cannot write {what} to {path}: it is a directory; give a file name")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise FileNotFoundError(f"cannot write {what} to {path}: the folder {parent} does not exist")
    return path


def save_model(model: torch.nn.Module, path: str | os.PathLike) -> None:
    """Weights and config to ``path``, through a temporary file: a kill leaves the old file or the new."""
    path = writable_file(path, "the model")
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    config_json = model.config.to_json()
    metadata = {METADATA_CONFIG_KEY: config_json, "format": "pt", FINGERPRINT_KEY: fingerprint(config_json, tensors)}
    if getattr(model, "recommended_criterion", None):
        metadata[RECOMMENDED_CRITERION_KEY] = model.recommended_criterion
    calibration = getattr(model, "pixel_l1_calibration", None)
    if calibration is not None:  # outside the fingerprint: a calibration says how to stop, not what the model is
        metadata[CALIBRATION_KEY] = calibration.to_json()
    write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def write_with_metadata(source: str | os.PathLike, out: str | os.PathLike, entries: Mapping[str, str]) -> None:
    """Copy a safetensors model file to ``out`` (which may be ``source``) with ``entries`` added to
    its metadata; the tensors, the config and the fingerprint are kept as they are."""
    tensors, metadata = read_safetensors(source, "cpu")
    metadata.update(entries)
    out = writable_file(out, "the model")
    write_atomic(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def check_device(device: str | torch.device, name: str = "device") -> torch.device:
    """``device`` as a torch.device; a malformed name or a GPU this machine lacks is a ValueError."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"{name} {device!r} is not a device name (cpu, cuda, cuda:1, ...)") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {device!r}: this machine has no CUDA GPU")
    return dev


# what DDP or torch.compile wrap around parameter names
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def strip_wrappers(key: str) -> str:
    """A parameter name without the DDP / torch.compile prefixes a checkpoint may carry."""
    for prefix in WRAPPER_PREFIXES:
        if key.startswith(prefix):
            key = key[len(prefix) :]
    return key


def check_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device) -> str:
    """``path`` as a str, once it is known to name a file and ``map_location`` a device here:
    otherwise the reader's error would blame the file for what is a wrong path or device."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"a checkpoint path must be a str or os.PathLike, got {type(path).__name__}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if os.path.isdir(path):
        raise CheckpointError(f"{path} is a directory, not a checkpoint file")
    check_device(map_location, "map_location")
    return path


def read_safetensors(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> tuple[dict, dict]:
    """(tensors, metadata) of a safetensors file; a missing, directory or unreadable file is named,
    and a recorded fingerprint is checked."""
    from safetensors import safe_open

    path = check_checkpoint_file(path, map_location)
    try:
        with safe_open(path, framework="pt", device=str(map_location)) as f:
            meta = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors' own error types for a truncated, garbled or foreign file
        raise CheckpointError(f"{path} cannot be read as a safetensors file ({exc})") from exc
    check_fingerprint(path, meta, tensors)
    return tensors, meta


def read_checkpoint_file(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> object:
    """What a checkpoint file holds: a safetensors file's tensors, else ``torch.load``'s object
    (weights only); a missing, directory or unreadable file is a CheckpointError naming it."""
    path = check_checkpoint_file(path, map_location)
    if path.endswith(".safetensors"):
        return read_safetensors(path, map_location)[0]
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        raise CheckpointError(torch_load_problem(path, exc)) from exc


def torch_load_problem(path: str, exc: Exception) -> str:
    """What ``torch.load(weights_only=True)`` failing on ``path`` means, without torch's advice to
    retry unsafely: a damaged or foreign file is named as such; only a real pickle holding Python
    objects beyond tensors gets the way out, for a file whose source is trusted."""
    text = str(exc)
    unsupported = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text)
    if unsupported:
        return (f"{path} holds Python objects besides tensors ({unsupported.group(1)}), which are not unpickled "
                "because that can run code; only if the file comes from a source you trust, load it with "
                "torch.load(path, weights_only=False) and pass the dict instead of the path")
    blocked = re.search(r"unsupported GLOBAL ([\w.]+) whose module \w+ is blocked", text)
    if blocked:  # os.system and the like: a file built to run code, never to be loaded unsafely
        return (f"{path} was not loaded: unpickling it would call {blocked.group(1)}, which can run code on this "
                "machine; it is not a checkpoint to trust")
    # random bytes also fail as "Weights only load failed ..., retry with weights_only=False": the
    # unpickler's own complaint is the part that describes the file
    unpickler = re.search(r"WeightsUnpickler error:\s*(.+)", text)
    first = unpickler.group(1).strip() if unpickler else (one_sentence(text) or type(exc).__name__)
    return f"{path} could not be read: it is damaged or not a checkpoint file (torch.load: {type(exc).__name__}: {first})"


def one_sentence(text: str) -> str:
    line = next((part.strip() for part in text.splitlines() if part.strip()), "")
    return line.split(". ")[0][:160]
