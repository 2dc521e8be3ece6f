"""results/progress.py: how far the protocol is, counted from the run directories."""
import json

import pytest


@pytest.fixture
def progress(tmp_path, monkeypatch, load_script):
    """The script, reading run directories under tmp_path/runs and writing tmp_path/progress.md."""
    mod = load_script("results/progress.py")
    monkeypatch.setattr(mod, "RUNS", tmp_path / "runs")
    monkeypatch.setattr(mod, "OUT", tmp_path / "progress.md")
    return mod


def finish_round(run_dir, r, seconds_per_epoch, train_seconds=None):
    d = run_dir / f"round_{r:02d}"
    d.mkdir(parents=True)
    (d / "round.json").write_text(json.dumps({
        "seconds_per_epoch": seconds_per_epoch, "train_seconds": train_seconds,
        "machine": {"cpu": "AMD EPYC", "threads": 1}}))


def test_counts_finished_rounds_and_the_epochs_left(tmp_path, progress):
    run = tmp_path / "runs" / "vgg-e30-imp-s0"
    for r in (0, 1):  # V-IMP seed 0: rounds 0 and 1 finished, round 2 ten epochs in
        finish_round(run, r, 100.0)
    (run / "round_02").mkdir()
    (run / "round_02" / "metrics.jsonl").write_text("{}\n" * 10)
    progress.main()
    text = (tmp_path / "progress.md").read_text()
    # seed 0: 2 of 6 rounds, 20 + 3 x 30 epochs left; seeds 1 and 2: 6 x 30 each
    assert "| V-IMP | s0: 2/6, s1: 0/6, s2: 0/6 | 470 epochs left |" in text
    assert "| V-Refill | s0: 0/2, s1: 0/2, s2: 0/2 | 180 epochs left |" in text
    assert "| M (dense, RigL, SRigL, SRigL without ablation; 3 seeds) | 0/39 runs | 1170 epochs left |" in text
    assert "x 100 s per epoch" in text  # VGG's speed from its finished rounds
    assert "resnet: 780 epochs left (no finished round records its speed yet)" in text


def test_one_unfinished_run_gets_one_lane(tmp_path, monkeypatch, progress):
    """A run's rounds follow each other: one unfinished run cannot use a second lane."""
    monkeypatch.setattr(progress, "ARMS", [a for a in progress.ARMS if a[0] == "R-IMP"])
    for s in (0, 1):  # seed 0 finished (rounds 0-3), seed 1 has round 3 left
        for r in range(4 if s == 0 else 3):
            finish_round(tmp_path / "runs" / f"resnet-e30-imp-s{s}", r, 60.0)
    progress.main()
    text = (tmp_path / "progress.md").read_text()
    assert "| R-IMP | s0: 4/4, s1: 3/4 | 30 epochs left |" in text
    assert "about 0.5 lane-hours, so about 0.5 hours of wall time with 1 lane (1 unfinished run" in text


def test_speed_table_counts_an_adopted_round_once(tmp_path, progress):
    """A chained arm's round 0 is a copy of its chain's: one trained round, not two."""
    runs = tmp_path / "runs"
    finish_round(runs / "resnet-e30-imp-s0", 0, 60.0, 1800.0)
    finish_round(runs / "resnet-e30-imp-s0", 1, 70.0, 2100.0)
    finish_round(runs / "resnet-e30-refill-none-s0", 0, 60.0, 1800.0)  # adopted from the chain
    finish_round(runs / "resnet-e30-refill-none-s0", 1, 80.0, 3300.0)
    progress.main()
    text = (tmp_path / "progress.md").read_text()
    assert "| resnet | 3 | 70.0 (60.0 - 80.0) | 1 | AMD EPYC | 2.0 lane-hours |" in text
    assert "| vgg |" not in text  # no finished VGG round: no row
