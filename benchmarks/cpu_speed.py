"""CPU wall time of ``encode`` and of a training step with the demo model, through the public API
only, so that the same command times two source trees (before and after a change):

    PYTHONPATH=TREE python -m benchmarks.cpu_speed [--repeats 7] [--threads 1]

Prints the median and min wall time and the median CPU time of each case in milliseconds, as one
JSON line. The training step is
what ``alit_fast.train`` runs per step (forward with stochastic halting over all iterations,
backward, AdamW); RESULTS.md quotes ratios of two trees measured alternately in one session.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import alit_fast


def _time(fn, repeats: int) -> dict[str, float]:
    fn()  # warm-up
    wall, cpu = [], []
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        wall.append(1e3 * (time.perf_counter() - start))
        cpu.append(1e3 * (time.process_time() - start_cpu))
    # CPU time of this process too: on a shared machine it moves less than wall time
    return {"median_ms": round(statistics.median(wall), 2), "min_ms": round(min(wall), 2),
            "cpu_median_ms": round(statistics.median(cpu), 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = alit_fast.load_pretrained("demo")
    size = model.config.image_size
    images = torch.rand(args.batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    results = {
        "encode tokens:32": _time(lambda: model.encode(images, criterion="tokens:32"), args.repeats),
        "encode code-acc:0.6": _time(lambda: model.encode(images, criterion="code-acc:0.6"), args.repeats),
        "rollout": _time(lambda: torch.no_grad()(model.rollout)(images), args.repeats),
    }
    trainable = alit_fast.load_pretrained("demo").requires_grad_(True)
    trainable.base_tokenizer.requires_grad_(False)
    trainable.train()
    opt = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(0)

    def step():
        out = trainable(images, halting="stochastic", generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    results["training step"] = _time(step, args.repeats)
    print(json.dumps({"tree": alit_fast.__file__, "batch": args.batch, "threads": args.threads, **results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
