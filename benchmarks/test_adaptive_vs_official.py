"""Smoke run of the end-to-end comparison script (its figures are quoted in RESULTS.md)."""
import json

from alit_fast.testing import tiny_config
from benchmarks.adaptive_vs_official import main


def test_adaptive_vs_official_script_reports_every_procedure(calibrated_tiny, tmp_path, capsys):
    cfg = tiny_config()
    path = calibrated_tiny
    out = tmp_path / "figures.json"
    rows = ["pixel-l1:0.07,best", "fast-pixel-l1:0.07,max", "fast-pixel-l1:0.07,best,8"]
    args = ["--checkpoint", str(path), "--per-level", "1", "--batch", "4", "--threads", "1", "--out", str(out), "--clock", "cpu"]
    assert main(args + [a for r in rows for a in ("--row", r)] + ["--code-criterion", "code-acc:0.6"]) == 0
    result = json.loads(out.read_text())
    official = {f"official procedure, {k} kernels, batch {b}" for k, b in (("official", 1), ("torch", 1), ("official", 4))}
    adaptive = {
        "alit_fast pixel-l1:0.07, fallback best, batch 4",
        "alit_fast fast-pixel-l1:0.07, fallback max, batch 4",
        "alit_fast fast-pixel-l1:0.07, fallback best, max 8 tokens, batch 4",
        "alit_fast code-acc:0.6, fallback max, batch 4",
        "alit_fast code-acc:0.6, fallback best, batch 4",
    }
    for name, table in result["sets"].items():
        assert set(table) == official | adaptive, name
        for r in table.values():
            assert r["images_per_s"] > 0 and all(cfg.tokens_per_iter <= t <= cfg.max_tokens for t in r["tokens"])
            assert all(0 < e < 1 for e in r["l1"])
    fast = [r for n, r in result["sets"]["all"].items() if "fast-pixel-l1" in n]
    assert all(0 <= r["agree"] <= r["same_quality"] <= 1 for r in fast)
    assert -1 <= result["score"]["spearman"] <= 1 and 0 <= result["score"]["first_under_agree"] <= 1
    printed = capsys.readouterr().out
    assert "vs official B1" in printed and "photo crops alone" in printed
