"""The untimed sweep of stopping configurations (its figures are quoted in RESULTS.md)."""
import torch

from benchmarks.fast_choice_sweep import choose, main


def test_choose_takes_the_first_count_under_else_the_fallback_and_out_of_reach_images_the_last():
    scores = torch.tensor([[0.3, 0.1, 0.05, 0.2], [0.3, 0.2, 0.25, 0.28], [0.3, 0.2, 0.25, 0.28]], dtype=torch.float64)
    assert choose(scores, 0.15, 3, "max").tolist() == [1, 3, 3]
    assert choose(scores, 0.15, 3, "best").tolist() == [1, 1, 1]
    assert choose(scores, 0.15, 2, "best", never=torch.tensor([False, False, True])).tolist() == [1, 1, 2]
    assert choose(scores, 0.08, 1, "best").tolist() == [1, 1, 1]  # the cap hides the count under 0.08


def test_the_sweep_reproduces_encode_and_scores_every_configuration(calibrated_tiny, capsys):
    assert main(["--checkpoint", str(calibrated_tiny), "--per-level", "1", "--batch", "4"]) == 0
    printed = capsys.readouterr().out.splitlines()
    checks = [line for line in printed if "choose as encode on" in line]
    assert len(checks) == 4 and all(line.split(" on ")[1].split("/")[0] == line.split("/")[1].split()[0] for line in checks)
    assert len([line for line in printed if "against itself" in line]) == 3
    assert any(line.startswith("of the ") and "rises from" in line for line in printed)
    assert any("differs from the exact rule on" in line for line in printed)
    assert printed[-1].startswith("configurations meeting the quality bars:")


def test_the_sweep_refuses_to_speak_when_its_rules_no_longer_choose_as_encode(calibrated_tiny, monkeypatch, capsys):
    import benchmarks.fast_choice_sweep as sweep

    real = sweep.choose
    monkeypatch.setattr(sweep, "choose", lambda scores, threshold, last, *a, **k: real(scores, threshold, last, *a, **k) * 0)
    assert sweep.main(["--checkpoint", str(calibrated_tiny), "--per-level", "1", "--batch", "4"]) == 1
    assert "no longer choose as encode" in capsys.readouterr().out
