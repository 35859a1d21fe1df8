"""Smoke run of the criterion sweep that chose the demo model's criterion (README > Training)."""
import json
import math

import torch

from alit_fast import ALIT
from alit_fast.config import VQGANConfig
from alit_fast.testing import tiny_config
import benchmarks.demo_criterion_sweep as sweep_module
from alit_fast.cli.demo import HELD_OUT_SEED, ClaimFigures
from benchmarks.demo_criterion_sweep import VALIDATION_SEED, main


def test_sweep_script_reports_every_candidate_and_the_chosen_one_held_out(tmp_path, capsys):
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
    assert result["chosen"] in candidates[1:]
    assert result["held_out"]["num_images"] == 10
    assert f"held-out set (seed 777777), {result['chosen']}" in capsys.readouterr().out


def test_sweep_chooses_the_best_validation_spearman_then_fewer_tokens_and_runs_only_it_held_out(monkeypatch):
    table = {"a": (0.70, 30.0), "b": (0.90, 40.0), "c": (0.90, 20.0), "d": (math.nan, 8.0)}
    calls = []

    def figures(model, spec, per_level, seed):
        calls.append((spec, seed))
        spearman, tokens = table[spec]
        return ClaimFigures(spearman=spearman, tokens_per_level={0: tokens, 4: tokens}, error_per_tokens={8: 0.1},
                            num_images=2 * per_level)

    monkeypatch.setattr(sweep_module, "evaluate_claims", figures)
    result = sweep_module.sweep(None, list(table), per_level=1)
    assert result["chosen"] == "c"  # ties with b on Spearman, fewer tokens
    assert calls == [(s, VALIDATION_SEED) for s in table] + [("c", HELD_OUT_SEED)]
