"""Smoke test: the sync-count report runs and shows the budget RESULTS.md quotes."""
from benchmarks.sync_counts import main


def test_sync_counts_prints_the_budget(capsys):
    assert main([]) == 0
    rows = {line[:26].strip(): int(line[26:].split()[0]) for line in capsys.readouterr().out.splitlines()}
    assert rows["rollout B=4"] == 0 and rows["loss forward+backward B=4"] == 0
    assert rows["encode tokens:16 B=4"] == rows["encode tokens:16 B=16"] == 1
    assert rows["decode B=4"] == 1
