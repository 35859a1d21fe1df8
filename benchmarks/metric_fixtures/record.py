"""Record what pytorch-fid and lpips compute on seeded weights and fixed images, for the tests in
tests/test_metrics_fixture.py to compare alit_fast's own networks and FID with.

The libraries import torchvision, which does not import with the CPU torch build alit_fast's CI
uses, so this runs in a separate environment where they do:

    python3 -m venv /tmp/refenv
    /tmp/refenv/bin/pip install torch==2.14.1 torchvision==0.29.1 pytorch-fid lpips scipy
    /tmp/refenv/bin/python benchmarks/metric_fixtures/record.py   # writes benchmarks/metric_fixtures/fixture.npz

It stores the seeds, the images (uint8) and the outputs, never the weights: seeded.py draws the
weights again, the same under any torch version (their checksums are stored and checked).

What it records:
- pool3 features [N, 2048] of pytorch-fid's ``InceptionV3([3])`` (the FID Inception, resize and
  normalisation on) for two sets of images of an awkward size;
- FID between the two sets by ``calculate_frechet_distance`` on those features, and by
  ``python -m pytorch_fid A B`` run on PNG folders of the same images with the seeded weights in a
  temporary torch hub cache (the two must agree: this script asserts it);
- ``calculate_frechet_distance`` on seeded low-dimensional Gaussians (well and badly conditioned);
- LPIPS distances of ``lpips.LPIPS(net='vgg', version='0.1')`` on [-1, 1] inputs with the seeded
  VGG16, once with seeded heads and once with the package's real v0.1 heads.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("seeded", HERE / "seeded.py")
seeded = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(seeded)

IMAGE_SEED = 2718
FRECHET_SEED = 3141
SET_SIZE = 6
HEIGHT, WIDTH = 45, 38  # awkward: neither square nor a power of two
FID_WEIGHTS_FILE = "pt_inception-2015-12-05-6726825d.pth"


def fixture_images() -> np.ndarray:
    """[2 * SET_SIZE, H, W, 3] uint8: blocky colour fields plus noise (the second set noisier)."""
    g = torch.Generator().manual_seed(IMAGE_SEED)
    out = []
    for i in range(2 * SET_SIZE):
        coarse = torch.rand(3, 5, 4, generator=g)
        field = coarse.repeat_interleave(10, 1)[:, :HEIGHT].repeat_interleave(10, 2)[:, :, :WIDTH]
        noise = torch.rand(3, HEIGHT, WIDTH, generator=g) * (0.2 if i < SET_SIZE else 0.5)
        img = ((field * 0.8 + noise).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0)
        out.append(img.numpy())
    return np.stack(out)


def frechet_cases() -> list[tuple[np.ndarray, np.ndarray]]:
    """Feature matrices drawn the same way by the tests: (n1, n2, dim) well above and below rank."""
    g = torch.Generator().manual_seed(FRECHET_SEED)
    cases = []
    for n1, n2, dim in ((300, 200, 16), (40, 30, 64)):
        a = torch.randn(n1, dim, generator=g, dtype=torch.float64)
        b = 0.7 * torch.randn(n2, dim, generator=g, dtype=torch.float64) + 0.3
        cases.append((a.numpy(), b.numpy()))
    return cases


def main() -> None:
    import lpips
    from pytorch_fid.fid_score import calculate_frechet_distance
    from pytorch_fid.inception import InceptionV3

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    images = fixture_images()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    record: dict[str, np.ndarray] = {"images": images}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        # the seeded weights where pytorch-fid looks for its file (torch hub's cache): nothing downloads
        hub = tmp / "torch_home" / "hub" / "checkpoints"
        hub.mkdir(parents=True)
        # pytorch-fid's own network gives the names and shapes the seeded file must have
        import torchvision

        layout = torchvision.models.inception_v3(num_classes=1008, aux_logits=False, weights=None, init_weights=False)
        import pytorch_fid.inception as pfi

        layout.Mixed_5b = pfi.FIDInceptionA(192, pool_features=32)
        layout.Mixed_5c = pfi.FIDInceptionA(256, pool_features=64)
        layout.Mixed_5d = pfi.FIDInceptionA(288, pool_features=64)
        layout.Mixed_6b = pfi.FIDInceptionC(768, channels_7x7=128)
        layout.Mixed_6c = pfi.FIDInceptionC(768, channels_7x7=160)
        layout.Mixed_6d = pfi.FIDInceptionC(768, channels_7x7=160)
        layout.Mixed_6e = pfi.FIDInceptionC(768, channels_7x7=192)
        layout.Mixed_7b = pfi.FIDInceptionE_1(1280)
        layout.Mixed_7c = pfi.FIDInceptionE_2(2048)
        shapes = {k: tuple(v.shape) for k, v in layout.state_dict().items()}
        weights = seeded.seeded_state_dict(shapes, seeded.INCEPTION_SEED)
        torch.save(weights, hub / FID_WEIGHTS_FILE)
        os.environ["TORCH_HOME"] = str(tmp / "torch_home")
        torch.hub.set_dir(str(tmp / "torch_home" / "hub"))

        model = InceptionV3([3]).eval()
        with torch.no_grad():
            feats = model(x)[0].squeeze(-1).squeeze(-1).double().numpy()
        record["inception_features"] = feats.astype(np.float32)
        a, b = feats[:SET_SIZE].astype(np.float32), feats[SET_SIZE:].astype(np.float32)
        fid_api = calculate_frechet_distance(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))

        # the command line on PNG folders of the same images
        for name, part in (("A", images[:SET_SIZE]), ("B", images[SET_SIZE:])):
            (tmp / name).mkdir()
            for i, img in enumerate(part):
                Image.fromarray(img).save(tmp / name / f"{i:03d}.png")
        env = dict(os.environ, TORCH_HOME=str(tmp / "torch_home"))
        proc = subprocess.run(
            [sys.executable, "-m", "pytorch_fid", str(tmp / "A"), str(tmp / "B"), "--device", "cpu", "--num-workers", "0"],
            capture_output=True, text=True, env=env, check=True,
        )
        match = re.search(r"FID:\s*([-+0-9.eE]+)", proc.stdout)
        if match is None:
            raise SystemExit(f"no FID line in pytorch_fid's output:\n{proc.stdout}\n{proc.stderr}")
        fid_cli = float(match.group(1))
        assert abs(fid_cli - fid_api) < 1e-3, (fid_cli, fid_api)

    frechet = [
        calculate_frechet_distance(p.mean(0), np.cov(p, rowvar=False), q.mean(0), np.cov(q, rowvar=False))
        for p, q in frechet_cases()
    ]

    # LPIPS: the seeded VGG16 in lpips's own network (pnet_rand: no torchvision download)
    vgg = seeded.seeded_vgg16()
    slices = {1: range(0, 4), 2: range(4, 9), 3: range(9, 16), 4: range(16, 23), 5: range(23, 30)}
    lpips_values = {}
    xs = x * 2 - 1  # lpips's [-1, 1] convention
    pairs = (xs[:SET_SIZE], xs[SET_SIZE:])
    for variant in ("seeded_heads", "real_heads"):
        lp = lpips.LPIPS(net="vgg", version="0.1", pretrained=True, pnet_rand=True, verbose=False).eval()
        net_state = {}
        for s, idx in slices.items():
            for i in idx:
                for p in ("weight", "bias"):
                    if f"features.{i}.{p}" in vgg:
                        net_state[f"slice{s}.{i}.{p}"] = vgg[f"features.{i}.{p}"]
        lp.net.load_state_dict(net_state, strict=True)
        if variant == "seeded_heads":
            heads = seeded.seeded_lpips_heads()
            for k in range(5):
                lp.lins[k].model[1].weight.data.copy_(heads[f"lin{k}.model.1.weight"])
        else:
            record["real_heads_sum"] = np.array(sum(float(lp.lins[k].model[1].weight.double().sum()) for k in range(5)))
        with torch.no_grad():
            lpips_values[variant] = lp(pairs[0], pairs[1], normalize=False).flatten().double().numpy()

    record.update(
        fid_api=np.array(fid_api),
        fid_cli=np.array(fid_cli),
        frechet=np.array(frechet),
        lpips_seeded_heads=lpips_values["seeded_heads"],
        lpips_real_heads=lpips_values["real_heads"],
        set_size=np.array(SET_SIZE),
    )
    meta = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_fid": _version("pytorch-fid"),
        "lpips": _version("lpips"),
        "inception_seed": seeded.INCEPTION_SEED,
        "inception_checksum": seeded.checksum(weights),
        "vgg_checksum": seeded.checksum(vgg),
        "heads_checksum": seeded.checksum(seeded.seeded_lpips_heads()),
        "image_seed": IMAGE_SEED,
        "frechet_seed": FRECHET_SEED,
    }
    record["meta"] = np.array(json.dumps(meta))
    out = HERE / "fixture.npz"
    np.savez_compressed(out, **record)
    print(json.dumps(meta, indent=1))
    print(f"FID api {fid_api:.6f}  cli {fid_cli:.6f}; frechet {frechet}; lpips {lpips_values}")
    print(f"wrote {out} ({out.stat().st_size} bytes)")


def _version(name: str) -> str:
    import importlib.metadata

    return importlib.metadata.version(name)


if __name__ == "__main__":
    main()
