"""Smoke test: the A/B timer loads another tree beside this one and reports every case."""
import json
from pathlib import Path

from benchmarks.ab_speed import main


def test_ab_speed_against_this_tree_reports_every_case(capsys):
    root = Path(__file__).resolve().parents[1]
    assert main(["--baseline", str(root), "--rounds", "1", "--batch", "2", "--profile"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report["cases"]) == {"encode tokens:32", "encode code-acc:0.6", "rollout", "training step"}
    assert all(c["new/baseline"] > 0 for c in report["cases"].values())
    # the same tree on both sides makes the same ops
    assert all(c["profile"]["new"]["op_calls"] == c["profile"]["baseline"]["op_calls"] for c in report["cases"].values())
