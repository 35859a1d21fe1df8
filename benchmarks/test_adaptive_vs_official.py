"""Smoke run of the end-to-end comparison script (its figures are quoted in RESULTS.md)."""
import json

import torch

from alit_fast import ALIT
from alit_fast.config import VQGANConfig
from alit_fast.testing import tiny_config
from benchmarks.adaptive_vs_official import main


def test_adaptive_vs_official_script_reports_every_procedure(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = tiny_config(vqgan=VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=48))
    path = tmp_path / "tiny.safetensors"
    ALIT(cfg).save(str(path))
    out = tmp_path / "figures.json"
    args = ["--checkpoint", str(path), "--per-level", "1", "--batch", "4", "--threads", "1", "--out", str(out)]
    assert main(args + ["--code-criterion", "code-acc:0.6", "--code-criterion", "code-nll:2"]) == 0
    rows = json.loads(out.read_text())["rows"]
    official = {f"official procedure, {k} kernels, batch {b}" for k, b in (("official", 1), ("torch", 1), ("official", 4))}
    assert set(rows) == official | {
        f"alit_fast {c}, fallback {f}, batch 4"
        for c in ("code-acc:0.6", "code-nll:2", "pixel-l1:0.07")
        for f in ("max", "best")
    }
    assert all(r["images_per_s"] > 0 and cfg.tokens_per_iter <= r["mean_tokens"] <= cfg.max_tokens for r in rows.values())
    assert all(0 < r["mean_l1"] < 1 for r in rows.values())
    assert "vs official B1" in capsys.readouterr().out
