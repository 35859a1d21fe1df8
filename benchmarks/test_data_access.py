"""Smoke run of the data-reading benchmark (its figures are quoted in RESULTS.md)."""
from benchmarks.data_access import main


def test_data_access_script_reports_both_paths(capsys):
    assert main(["--photos", "4", "--workers", "2", "--members", "20", "--shards", "3", "--per-shard", "10"]) == 0
    out = capsys.readouterr().out
    assert "4 photos (500x375 JPEG) read at 256x256:" in out and "on 2 reading threads" in out
    assert "tar of 20 members:" in out and "token data set of 30 images in 3 shards:" in out
