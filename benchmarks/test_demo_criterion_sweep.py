"""Smoke run of the criterion sweep that chose the demo model's criterion (README > Training)."""
import json
import math

import torch

from alit_fast import ALIT
from alit_fast.config import VQGANConfig
from alit_fast.testing import tiny_config
from benchmarks.demo_criterion_sweep import main


def test_sweep_picks_the_best_validation_criterion_and_reports_it_held_out(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = tiny_config(vqgan=VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=48))
    path = tmp_path / "tiny.safetensors"
    ALIT(cfg).save(str(path))
    out = tmp_path / "sweep.json"
    candidates = [f"tokens:{cfg.max_tokens}", "pixel-l1:0.2", "code-acc:0.1"]
    args = ["--checkpoint", str(path), "--per-level", "2", "--threads", "1", "--out", str(out)]
    assert main(args + sum((["--criterion", c] for c in candidates), [])) == 0
    result = json.loads(out.read_text())
    rows = result["validation"]
    assert list(rows) == candidates
    # a fixed count gives every image the same count: no correlation, so never chosen over a finite one
    assert math.isnan(rows[candidates[0]]["spearman"])
    finite = [s for s in candidates if not math.isnan(rows[s]["spearman"])]
    if finite:
        best = max(rows[s]["spearman"] for s in finite)
        assert result["chosen"] in finite and rows[result["chosen"]]["spearman"] == best
    assert result["held_out"]["num_images"] == 10
    assert f"held-out set (seed 777777), {result['chosen']}" in capsys.readouterr().out
