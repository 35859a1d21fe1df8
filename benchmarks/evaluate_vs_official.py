"""Evaluation throughput: ``alit_fast.evaluate`` against the official ``evaluate_rfid.py``
procedure re-created on the same model and images.

    python -m benchmarks.evaluate_vs_official [--data sets/heldout] [--images 100] [--fid] [--repeats 2]

The official procedure, re-created: batch 1, fp32, the official kernels (nn.MultiheadAttention
math, the full VQ distance matrix), one rollout per image with every iteration decoded; the ground
truth and each iteration's reconstruction written as PNGs (clipped, truncated to uint8); then per
token count the PNGs read back and paired by sorted name for L1/L2, and with ``--fid`` the
pytorch-fid command's work per token count: Inception features of both folders (batch 50, the
ground truth's again for every count, as each subprocess call recomputes them) and its scipy sqrtm
Fréchet distance. (The subprocess start-up itself is not counted: a point in the official's favour.)

alit_fast: ``evaluate`` with the same metrics, batch ``--batch``, alit_fast's torch kernels, nothing
written. Both use ``halting="off"`` so that their L1 columns must agree (the script checks it to
1e-6; the official's stochastic halting would make both random). FID uses seeded Inception weights
(the real file cannot be downloaded here); throughput does not depend on the weights' values.
Prints one table; RESULTS.md quotes it.
"""
from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from alit_fast.evaluation import evaluate, frechet_distance
from alit_fast.evaluation.data import ImageFiles
from alit_fast.io import load
from alit_fast.models.inception import FIDInceptionV3
from benchmarks.metric_fixtures import seeded


def _png(image: torch.Tensor, path: Path) -> None:
    array = np.clip(image.permute(1, 2, 0).numpy() * 255, 0, 255).astype(np.uint8)  # truncation, as official
    Image.fromarray(array).save(path)


def _read(path: Path) -> torch.Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255


def official(model, images: torch.Tensor, fid_net, workdir: Path) -> dict:
    """The official evaluation's steps, timed end to end."""
    iters = model.config.iterations
    T = model.config.tokens_per_iter
    gt_dir = workdir / "gt"
    dirs = [workdir / f"reconstructed_imgs_{t}" for t in range(iters)]
    for d in (gt_dir, *dirs):
        d.mkdir(parents=True)
    model.set_backend("official")
    start = time.perf_counter()
    with torch.no_grad():
        for i in range(images.shape[0]):
            x = images[i : i + 1]
            records = model.rollout(x, halting="off")
            _png(x[0], gt_dir / f"{i:05d}.png")
            for t, rec in enumerate(records):
                pixels = model.base_tokenizer.decode_latents(model.soft_code(rec.logits))  # unclamped, as official
                _png(pixels[0], dirs[t] / f"{i:05d}.png")
    rows = {}
    gt_files = sorted(gt_dir.glob("*.png"))
    for t, d in enumerate(dirs):
        files = sorted(d.glob("*.png"))
        l1s, l2s = [], []
        for a, b in zip(gt_files, files):
            diff = _read(a) - _read(b)
            l1s.append(float(diff.abs().mean()))
            l2s.append(float(diff.square().mean()))
        row = {"l1": float(np.mean(l1s)), "l2": float(np.mean(l2s))}
        if fid_net is not None:
            stats = []
            for folder in (d, gt_dir):  # one pytorch-fid call per count: both folders each time
                fs = sorted(folder.glob("*.png"))
                feats = []
                with torch.no_grad():
                    for lo in range(0, len(fs), 50):
                        feats.append(fid_net(torch.stack([_read(f) for f in fs[lo : lo + 50]])).double().numpy())
                act = np.concatenate(feats).astype(np.float32)
                stats.append((act.mean(0), np.cov(act, rowvar=False)))
            row["fid"] = frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
        rows[f"tokens:{(t + 1) * T}"] = row
    seconds = time.perf_counter() - start
    model.set_backend("torch")
    return {"seconds": seconds, "rows": rows}


def ours(model, images: torch.Tensor, fid_net, batch: int) -> dict:
    metrics = "l1,l2,fid" if fid_net is not None else "l1,l2"
    start = time.perf_counter()
    report = evaluate(model, images, tokens="all", metrics=metrics, halting="off", batch_size=batch, fid_model=fid_net)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "rows": {r.name: dict(r.metrics) for r in report.rows}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", default="demo")
    p.add_argument("--data", default=None, help="an image folder (default: the demo's held-out synthetic images)")
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--fid", action="store_true", help="also FID (seeded Inception; slow on a CPU)")
    p.add_argument("--repeats", type=int, default=2, help="alternating runs of each; the fastest counts")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--out", default=None, help="also write the figures as JSON here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load(args.checkpoint, backend="torch")
    size = model.config.image_size
    if args.data:
        files = ImageFiles(args.data, size)
        images = torch.stack([files[i] for i in range(min(args.images, len(files)))]).float() / 255
    else:
        from alit_fast.cli.demo import HELD_OUT_SEED
        from alit_fast.training.data import SyntheticImages

        data = SyntheticImages(size, length=args.images, seed=HELD_OUT_SEED)
        images = torch.stack([data[i]["image"] for i in range(len(data))])
        images = (images * 255).round() / 255  # what reading the PNGs back gives
    fid_net = None
    if args.fid:
        with torch.device("meta"):
            fid_net = FIDInceptionV3()
        shapes = {k: tuple(v.shape) for k, v in fid_net.state_dict().items()}
        fid_net.load_state_dict(seeded.seeded_state_dict(shapes, seeded.INCEPTION_SEED), assign=True)
        fid_net.eval()
    ours(model, images[:2], None, args.batch)  # warm-up: first-call costs of both kernel sets
    runs = {"official": [], "alit_fast": []}
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            runs["official"].append(official(model, images, fid_net, Path(tmp)))
        runs["alit_fast"].append(ours(model, images, fid_net, args.batch))
    best = {k: min(v, key=lambda r: r["seconds"]) for k, v in runs.items()}
    n = images.shape[0]
    for name, row in best["official"]["rows"].items():
        mine = best["alit_fast"]["rows"][name]
        assert abs(row["l1"] - mine["l1"]) < 1e-6, (name, row["l1"], mine["l1"])
    result = {
        "images": n, "threads": args.threads, "fid": args.fid, "torch": torch.__version__,
        "machine": platform.processor() or platform.machine(),
        "seconds": {k: [r["seconds"] for r in v] for k, v in runs.items()},
        "rows": {k: v["rows"] for k, v in best.items()},
    }
    o, a = best["official"]["seconds"], best["alit_fast"]["seconds"]
    print(f"{n} images, {args.threads} threads, metrics l1,l2{',fid' if args.fid else ''}, torch {torch.__version__}")
    print(f"official procedure re-created (batch 1, PNGs): {o:8.2f} s  {n / o:7.2f} images/s   runs {runs_s(runs['official'])}")
    print(f"alit_fast evaluate (batch {args.batch}, nothing written): {a:8.2f} s  {n / a:7.2f} images/s   "
          f"runs {runs_s(runs['alit_fast'])}")
    print(f"ratio: {o / a:.1f}x; L1 at every count equal to 1e-6 (checked)")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


def runs_s(runs: list[dict]) -> str:
    return ", ".join(f"{r['seconds']:.1f}" for r in runs)


if __name__ == "__main__":
    raise SystemExit(main())
