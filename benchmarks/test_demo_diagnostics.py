"""Smoke run of the demo-model diagnostics script (its figures are quoted in the README)."""
import torch

from alit_fast import ALIT
from alit_fast.config import VQGANConfig
from alit_fast.testing import tiny_config
from benchmarks.demo_diagnostics import main


def test_demo_diagnostics_prints_every_figure(tmp_path, capsys):
    torch.manual_seed(0)
    cfg = tiny_config(vqgan=VQGANConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=1, z_channels=32, codebook_size=48))
    path = tmp_path / "tiny.safetensors"
    ALIT(cfg).save(str(path))
    assert main(["--checkpoint", str(path), "--threads", "1", "--compare-codes", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"grid codes the same as {path}'s VQGAN gives: 1.00" in out
    assert "VQGAN alone" in out and "first 4 codes unchanged" in out and "official procedure, batch 1" in out
    assert out.count(" tokens: all ") == cfg.iterations
