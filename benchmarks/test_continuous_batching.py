"""Smoke run of the continuous-batching comparison (its figures are quoted in RESULTS.md)."""
import json

from benchmarks.continuous_batching import compacting_occupancy, main


def test_continuous_batching_script_reports_both_encoders_and_the_decode(tmp_path, capsys):
    out = tmp_path / "figures.json"
    main(["--per-level", "1", "--batch", "4", "--repeats", "1", "--criteria", "fast-pixel-l1:0.07,max",
          "--photo-crops", "5", "--out", str(out)])
    result = json.loads(out.read_text())
    row = result["encode"]["fast-pixel-l1:0.07,max"]
    assert row["same_counts"] and set(row["rows"]) == {"compacting", "continuous"}
    for figures in row["rows"].values():
        assert figures["images_per_s"] > 0 and figures["ops_per_image"] > 0 and figures["steps"] >= 1
    assert result["decode"]["speedup"] > 0 and "mixed-length decode" in capsys.readouterr().out
    photos = result["photos"]["fast-pixel-l1:0.07,max"]  # scikit-image comes with the demo extra (CI installs it)
    assert photos["images"] == 5 and photos["same_counts"]


def test_compacting_occupancy_counts_each_chunk_to_its_longest_image():
    # chunks of 2: (8, 24) runs 3 steps for 4 image-iterations, (16,) 2 for 2; T = 8
    assert compacting_occupancy([8, 24, 16], batch=2, T=8) == (5, 6)
