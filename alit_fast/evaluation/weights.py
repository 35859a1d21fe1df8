"""The FID Inception's weights: pytorch-fid's file, read unchanged from where torch hub caches it
(or a path). Nothing downloads; a missing file is a one-line error naming it and where it goes."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..io.hub_cache import find_weights_file, hub_checkpoint_path, read_state_file
from ..models.inception import FIDInceptionV3

FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + FID_WEIGHTS_FILE


class FIDWeightsError(FileNotFoundError):
    """The Inception weights file is missing or is not pytorch-fid's (one-line message)."""


def default_fid_weights_path() -> Path:
    return hub_checkpoint_path(FID_WEIGHTS_FILE)  # where pytorch-fid itself keeps it


def find_fid_weights(path: str | os.PathLike | None = None) -> Path:
    return find_weights_file(path, FID_WEIGHTS_FILE, FID_WEIGHTS_URL, "FID (pytorch-fid's Inception)", FIDWeightsError,
                             "--fid-weights PATH")


def load_fid_inception(path: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> FIDInceptionV3:
    """pytorch-fid's FID Inception-v3 with its weights, frozen, in eval mode (batch-norm statistics)."""
    file = find_fid_weights(path)
    state = read_state_file(file, FIDWeightsError)
    with torch.device("meta"):  # no random init of 24M parameters that the file replaces
        model = FIDInceptionV3()
    expected = model.state_dict()
    for key, ref in expected.items():
        if key not in state:
            if key.endswith("num_batches_tracked"):  # a counter older files may lack; unused in eval
                state[key] = torch.zeros((), dtype=torch.int64)
                continue
            raise FIDWeightsError(f"{file} has no {key}; is it pytorch-fid's {FID_WEIGHTS_FILE}?")
        if tuple(state[key].shape) != tuple(ref.shape):
            raise FIDWeightsError(f"{file}: {key} has shape {list(state[key].shape)}, expected {list(ref.shape)}")
    extra = sorted(set(state) - set(expected))
    if extra:
        raise FIDWeightsError(f"{file} has entries the FID Inception does not ({extra[0]}, ...); is it the right file?")
    model.load_state_dict(state, strict=True, assign=True)
    return model.requires_grad_(False).eval().to(device)
