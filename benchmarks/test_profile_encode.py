"""Smoke run of the encode profiler (its shares are quoted in RESULTS.md)."""
import torch

from alit_fast import ALIT
from alit_fast.config import VQGANConfig
from alit_fast.testing import tiny_config
from benchmarks.profile_encode import main


def test_profile_encode_prints_the_heaviest_ops_and_the_split(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = tiny_config(vqgan=VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=48))
    path = tmp_path / "tiny.safetensors"
    ALIT(cfg).save(str(path))
    args = ["--checkpoint", str(path), "--per-level", "1", "--batch", "4", "--top", "5"]
    assert main(args + ["--criterion", "pixel-l1:0.07", "--fallback", "best"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("pixel-l1:0.07, fallback best, 9 images, batch 4")
    assert len(lines) == 7 and all("%" in line and "calls" in line for line in lines[1:6])
    parts = dict(p.rsplit(" ", 1) for p in lines[6].split(": ", 1)[1].split(", "))
    assert set(parts) == {"base tokenizer encoder", "ALIT encoder iterations", "ALIT decoder", "pixel decodes",
                          "criterion", "bookkeeping"}
    assert float(parts["pixel decodes"].rstrip("%")) > 0  # pixel-l1 decodes; the timers were in place


def test_profile_encode_runs_a_seeded_model_of_a_named_config(capsys):
    assert main(["--checkpoint", "seeded:demo", "--per-level", "1", "--batch", "2", "--top", "3",
                 "--criterion", "fast-pixel-l1:0.07"]) == 0
    assert "split of one encode" in capsys.readouterr().out
