"""Host-device synchronisations of the public entry points, counted on the CPU with the demo model.

    python -m benchmarks.sync_counts

Each line is one call after a warm-up call (invariants such as the codebook's duplicate map are
computed once per weights). The same counts hold on a GPU, where each of them stalls the host until
the device's queue drains. tests/test_sync_budget.py asserts the budget; this prints the figures
RESULTS.md quotes.
"""
from __future__ import annotations

import argparse

import torch

import alit_fast
from alit_fast.testing import count_syncs


def measure(model, images: torch.Tensor, name: str, fn) -> tuple[str, int, dict]:
    fn()  # warm-up: per-weights invariants, lazy imports
    with count_syncs() as counts:
        fn()
    return name, counts.total, dict(counts)


def training_step(model, images: torch.Tensor, generator: torch.Generator):
    model.train()
    out = model(images, halting="stochastic", generator=generator)
    out.loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = alit_fast.load_pretrained("demo")
    size = model.config.image_size
    g = torch.Generator().manual_seed(0)
    images = {b: torch.rand(b, 3, size, size, generator=g) for b in (4, 16)}
    tokens = model.encode(images[4], criterion="code-acc:0.6")
    rows = [
        measure(model, images[4], "rollout B=4", lambda: model.rollout(images[4])),
        measure(model, images[4], "encode tokens:16 B=4", lambda: model.encode(images[4], criterion="tokens:16")),
        measure(model, images[16], "encode tokens:16 B=16", lambda: model.encode(images[16], criterion="tokens:16")),
        measure(model, images[4], "encode code-acc:0.6 B=4", lambda: model.encode(images[4], criterion="code-acc:0.6")),
        measure(model, images[16], "encode code-acc:0.6 B=16", lambda: model.encode(images[16], criterion="code-acc:0.6")),
        measure(model, images[4], "decode B=4", lambda: model.decode(tokens)),
    ]
    trainable = alit_fast.load_pretrained("demo").requires_grad_(True)
    trainable.base_tokenizer.requires_grad_(False)
    gen = torch.Generator().manual_seed(0)
    rows.append(measure(trainable, images[4], "loss forward+backward B=4", lambda: training_step(trainable, images[4], gen)))
    width = max(len(r[0]) for r in rows)
    for name, total, detail in rows:
        print(f"{name:<{width}}  {total:>3}  {detail}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
