"""Seeded stand-ins for weights that cannot be downloaded here (pytorch-fid's Inception, torchvision's
VGG16, lpips's heads), drawn the same way under any torch version: one CPU ``torch.Generator``,
parameters in sorted name order, ``randn``/``rand`` only. Pure torch, so ``record.py`` (run in a
separate environment with the reference libraries) and the tests (run here) draw identical weights;
``checksum`` lets a test see it if a torch release ever changes the stream.

Scales keep a ReLU network's activations of order one (He-style convolutions, batch-norm
statistics near the identity), so the recorded features are neither all zero nor overflowing.
"""
from __future__ import annotations

import hashlib
import math

import torch

INCEPTION_SEED = 1505
VGG_SEED = 1616
HEADS_SEED = 1717
# torchvision's vgg16 ``features`` convolutions: index -> (in, out)
VGG16_CONVS = {
    0: (3, 64), 2: (64, 64), 5: (64, 128), 7: (128, 128), 10: (128, 256), 12: (256, 256), 14: (256, 256),
    17: (256, 512), 19: (512, 512), 21: (512, 512), 24: (512, 512), 26: (512, 512), 28: (512, 512),
}
HEAD_CHANNELS = (64, 128, 256, 512, 512)


def seeded_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Weights for the parameter and buffer names and shapes of ``shapes``."""
    g = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name in sorted(shapes):
        shape = tuple(shapes[name])
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=torch.int64)
        elif name.endswith("running_var"):
            state[name] = 0.5 + torch.rand(shape, generator=g)
        elif name.endswith("running_mean"):
            state[name] = 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("bn.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif len(shape) >= 2:
            fan_in = math.prod(shape[1:])
            state[name] = torch.randn(shape, generator=g) * math.sqrt(2.0 / fan_in)
        else:  # biases
            state[name] = 0.05 * torch.randn(shape, generator=g)
    return state


def vgg16_shapes() -> dict[str, tuple[int, ...]]:
    shapes = {}
    for i, (cin, cout) in VGG16_CONVS.items():
        shapes[f"features.{i}.weight"] = (cout, cin, 3, 3)
        shapes[f"features.{i}.bias"] = (cout,)
    return shapes


def seeded_vgg16() -> dict[str, torch.Tensor]:
    """torchvision ``vgg16`` file layout, ``features.*`` only (LPIPS uses nothing else)."""
    return seeded_state_dict(vgg16_shapes(), VGG_SEED)


def seeded_lpips_heads() -> dict[str, torch.Tensor]:
    """lpips's head file layout (``lin{k}.model.1.weight`` [1, C, 1, 1]); non-negative like the real ones."""
    g = torch.Generator().manual_seed(HEADS_SEED)
    return {f"lin{k}.model.1.weight": torch.rand((1, c, 1, 1), generator=g) / math.sqrt(c) for k, c in enumerate(HEAD_CHANNELS)}


def checksum(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names and float32 bytes, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        h.update(name.encode())
        h.update(state[name].detach().to(torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()


_CACHE: dict[tuple, dict[str, torch.Tensor]] = {}


def cached_state_dict(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """``seeded_state_dict``, drawn once per process (the Inception's 24M values take seconds on a
    CPU and several test modules need them). Callers must not modify the tensors."""
    key = (seed, tuple(sorted((k, tuple(v)) for k, v in shapes.items())))
    if key not in _CACHE:
        _CACHE[key] = seeded_state_dict(shapes, seed)
    return _CACHE[key]
