"""A/B CPU timing of this tree against another checkout of alit_fast, interleaved in one process.

    python -m benchmarks.ab_speed --baseline PATH [--rounds 15] [--threads 1]

PATH is the root of another checkout (e.g. ``git worktree add /tmp/base <commit>``). Its
``alit_fast`` package is copied to a temporary folder as ``alit_fast_baseline`` (imports and
custom-op names rewritten so both load side by side), and every round times each case once on
each tree, alternating which goes first. On a shared machine the speed drifts by 10-30% from one
minute to the next; alternating call by call puts both trees under the same drift, so the ratio
of their medians is far steadier than two separate runs. Cases (demo model, batch 16, the public
API only): encode with a fixed count, encode with a scored criterion, a rollout, and a training
step (forward with stochastic halting over all iterations, backward, AdamW).
Prints one JSON object: per case the median ms of each tree and new/baseline, and (``--profile``)
the torch.profiler count of op calls and self CPU time of one call on each tree, which moves
far less with the machine's load than wall time does.
"""
from __future__ import annotations

import argparse
import importlib
import json
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def import_baseline(root: Path, workdir: Path):
    """The other tree's package, importable as ``alit_fast_baseline``."""
    target = workdir / "alit_fast_baseline"
    shutil.copytree(root / "alit_fast", target)
    kernels = root / "kernels"
    if kernels.is_dir() and not (target / "kernels").exists():
        shutil.copytree(kernels, target / "kernels")  # installed as alit_fast.kernels by setup.py
    for path in target.rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\balit_fast(?=[.:\s])", "alit_fast_baseline", text)
        path.write_text(text)
    sys.path.insert(0, str(workdir))
    return importlib.import_module("alit_fast_baseline")


def cases(package, batch: int) -> dict:
    model = package.load_pretrained("demo")
    size = model.config.image_size
    images = torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    trainable = package.load_pretrained("demo").requires_grad_(True)
    trainable.base_tokenizer.requires_grad_(False)
    trainable.train()
    opt = torch.optim.AdamW([p for p in trainable.parameters() if p.requires_grad], lr=1e-5)
    gen = torch.Generator().manual_seed(0)

    def train_step():
        out = trainable(images, halting="stochastic", generator=gen)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        opt.step()

    def rollout():
        with torch.no_grad():
            model.rollout(images)

    return {
        "encode tokens:32": lambda: model.encode(images, criterion="tokens:32"),
        "encode code-acc:0.6": lambda: model.encode(images, criterion="code-acc:0.6"),
        "rollout": rollout,
        "training step": train_step,
    }


def _profile(fn) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = prof.key_averages()
    return {"op_calls": sum(e.count for e in events), "self_cpu_ms": round(sum(e.self_cpu_time_total for e in events) / 1e3, 1)}


def _ms(fn) -> float:
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--baseline", required=True, type=Path, help="root of the other checkout")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--profile", action="store_true", help="also count ops and self CPU time per call")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import alit_fast

    with tempfile.TemporaryDirectory() as tmp:
        baseline = import_baseline(args.baseline.resolve(), Path(tmp))
        trees = {"new": cases(alit_fast, args.batch), "baseline": cases(baseline, args.batch)}
        times: dict[str, dict[str, list[float]]] = {t: {c: [] for c in trees[t]} for t in trees}
        for tree in trees.values():  # warm-up
            for fn in tree.values():
                fn()
        for r in range(args.rounds):
            for case in trees["new"]:
                order = ("new", "baseline") if r % 2 == 0 else ("baseline", "new")
                for tree in order:
                    times[tree][case].append(_ms(trees[tree][case]))
        profiles = {t: {c: _profile(fn) for c, fn in trees[t].items()} for t in trees} if args.profile else None
    report = {"threads": args.threads, "batch": args.batch, "rounds": args.rounds, "cases": {}}
    for case in times["new"]:
        new, base = statistics.median(times["new"][case]), statistics.median(times["baseline"][case])
        report["cases"][case] = {"new_ms": round(new, 1), "baseline_ms": round(base, 1), "new/baseline": round(new / base, 3)}
        if profiles is not None:
            report["cases"][case]["profile"] = {t: profiles[t][case] for t in profiles}
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
