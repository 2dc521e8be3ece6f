import json
import subprocess
import sys

import pytest
import torch

import ticketsmith as ts
from ticketsmith.io import load_tensors
from ticketsmith.runs import Run, RunConfig

QUICK = dict(model="lenet5", dataset="digits", epochs=3, batch_size=64, rounds=2)


def test_rewinding_restores_every_tensor_exactly(tmp_path):
    cfg = RunConfig(**QUICK, rewind="0")
    Run(cfg, tmp_path, progress=False).execute()
    rewind, _ = load_tensors(tmp_path / "rewind.safetensors")
    torch.manual_seed(cfg.seed)
    init = ts.models.create("lenet5", 1, 10, (8, 8)).state_dict()
    assert rewind.keys() == init.keys()
    for k in init:
        assert torch.equal(rewind[k], init[k]), k
    # the ticket's starting point is the rewind state with the mask applied
    run = Run(cfg, tmp_path, progress=False)
    m = run.new_model()
    ts.runs.load_state(m, tmp_path / "rewind.safetensors")
    masks = ts.Masks.load(tmp_path / "round_01" / "masks.safetensors")
    for k, v in m.state_dict().items():
        assert torch.equal(v, init[k])
    trained = run.trained(tmp_path / "round_01")
    for k in masks.weight_names:  # pruned weights are still exactly zero after training
        assert (dict(trained.named_parameters())[k][~masks[k]] == 0).all()


def test_rewind_point_mid_training_saves_bn_statistics(tmp_path):
    cfg = RunConfig(model="resnet20", width=0.25, dataset="digits", epochs=2, rounds=1,
                    batch_size=64, rewind="30%")
    run = Run(cfg, tmp_path, progress=False)
    run.execute()
    rewind, meta = load_tensors(tmp_path / "rewind.safetensors")
    assert meta["iteration"] == run.rewind_iter > 0
    assert any("running_mean" in k for k in rewind)
    assert not torch.equal(rewind["bn1.running_mean"], torch.zeros_like(rewind["bn1.running_mean"]))
    info = json.loads((tmp_path / "round_01" / "round.json").read_text())
    assert info["start_iteration"] == run.rewind_iter


def test_resume_after_interruption_gives_the_same_summary(tmp_path, monkeypatch):
    cfg = RunConfig(**QUICK)
    ref = Run(cfg, tmp_path / "ref", progress=False).execute()

    calls = {"n": 0}
    real_epoch = ts.train.Trainer._epoch

    def flaky(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 6:  # round 1, second epoch
            raise KeyboardInterrupt
        return real_epoch(self, *a, **k)

    monkeypatch.setattr(ts.train.Trainer, "_epoch", flaky)
    with pytest.raises(KeyboardInterrupt):
        Run(cfg, tmp_path / "cut", progress=False).execute()
    assert (tmp_path / "cut" / "round_01" / "checkpoint.safetensors").exists()
    assert not (tmp_path / "cut" / "round_01" / "round.json").exists()
    monkeypatch.setattr(ts.train.Trainer, "_epoch", real_epoch)
    resumed = Run(cfg, tmp_path / "cut", progress=False).execute()

    def strip(s):  # timings differ between the two runs
        return [{k: v for k, v in r.items() if k not in ("train_seconds", "seconds_per_epoch")}
                for r in s["rounds"]]
    assert strip(resumed) == strip(ref)
    for r in range(3):
        a, _ = load_tensors(tmp_path / "ref" / f"round_{r:02d}" / "weights.safetensors")
        b, _ = load_tensors(tmp_path / "cut" / f"round_{r:02d}" / "weights.safetensors")
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_finished_rounds_are_skipped(tmp_path, monkeypatch):
    cfg = RunConfig(**QUICK)
    Run(cfg, tmp_path, progress=False).execute()

    def boom(*a, **k):
        raise AssertionError("a finished run must not train again")

    monkeypatch.setattr(ts.train.Trainer, "_epoch", boom)
    assert Run(cfg, tmp_path, progress=False).execute()["complete"]


def test_a_directory_made_by_another_config_is_refused(tmp_path):
    Run(RunConfig(**QUICK), tmp_path, progress=False).execute()
    before = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}
    with pytest.raises(ts.UsageError, match="different config.*lr"):
        Run(RunConfig(**{**QUICK, "lr": 0.05}), tmp_path, progress=False).execute()
    assert before == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*")}


def test_oneshot_sources_and_random_reinit(tmp_path):
    cfg = RunConfig(**{k: v for k, v in QUICK.items() if k != "rounds"}, method="oneshot", source="rp", sparsity=(0.5, 0.9),
                    reinit="random")
    s = Run(cfg, tmp_path, progress=False).execute()
    assert [r["round"] for r in s["rounds"]] == [0, 1, 2]
    assert s["rounds"][1]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert s["rounds"][2]["sparsity"] == pytest.approx(0.9, abs=0.01)


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "ticketsmith", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=120)


def test_cli_end_to_end_on_digits(tmp_path):
    p = cli("run", "--model", "lenet5", "--dataset", "digits", "--rounds", "2", "--epochs", "2",
            "--out", str(tmp_path / "run"), "--no-progress")
    assert p.returncode == 0, p.stderr
    assert "36.00%" in p.stdout  # round 2 of IMP: 1 - 0.8^2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["complete"] and len(summary["rounds"]) == 3
    for r in summary["rounds"]:
        assert 0 <= r["test_acc"] <= 1 and 0 <= r["best_val_acc"] <= 1
    s = cli("summary", str(tmp_path / "run"))
    assert s.returncode == 0 and "round" in s.stdout


# through the installed console script, one case per kind of check (a name, a setting, the
# data); every bad input and its message is in docs/bad_inputs.md (tests/test_bad_inputs.py)
@pytest.mark.parametrize("args, needle", [
    (["--model", "resnet21"], "resnet21"),
    (["--rounds", "-1"], "rounds must be at least 0"),
    (["--dataset", "fashion-mnist", "--data-dir", "/nonexistent"], "not found"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, needle):
    out = tmp_path / "out"
    p = cli("run", "--model", "lenet5", "--dataset", "digits", *args, "--out", str(out), "--no-progress")
    assert p.returncode == 2, p.stderr
    assert needle in p.stderr
    assert "Traceback" not in p.stderr
    assert len(p.stderr.strip().splitlines()) <= 2  # argparse adds a usage line
    assert not out.exists()


def test_divergence_stops_keeps_checkpoint_and_resumes_with_lower_lr(tmp_path, monkeypatch):
    cfg = RunConfig(**QUICK, lr=0.1)
    real_ce = ts.train.F.cross_entropy
    calls = {"n": 0}

    def poisoned(*a, **k):  # a NaN training loss in round 1's second epoch (20 steps an epoch)
        loss = real_ce(*a, **k)
        if not torch.is_grad_enabled():  # evaluation
            return loss
        calls["n"] += 1
        return loss * float("nan") if calls["n"] == 3 * 20 + 25 else loss

    monkeypatch.setattr(ts.train.F, "cross_entropy", poisoned)
    with pytest.raises(ts.DivergenceError, match="lower --lr"):
        Run(cfg, tmp_path, progress=False).execute()
    monkeypatch.setattr(ts.train.F, "cross_entropy", real_ce)
    assert (tmp_path / "round_01" / "checkpoint.safetensors").exists()
    assert json.loads((tmp_path / "diverged.json").read_text())["round"] == "round_01"
    with pytest.raises(ts.UsageError, match="different config"):  # a higher lr is refused
        Run(RunConfig(**{**QUICK, "lr": 0.2}), tmp_path, progress=False).execute()
    s = Run(RunConfig(**{**QUICK, "lr": 0.05}), tmp_path, progress=False).execute()
    assert s["complete"] and not (tmp_path / "diverged.json").exists()
    history = json.loads((tmp_path / "history.json").read_text())
    assert history[0]["from"] == 0.1 and history[0]["to"] == 0.05
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.05
    metrics = [json.loads(line) for line in (tmp_path / "round_01" / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2, 3]  # epoch 1 kept, 2-3 retrained


def test_cli_divergence_is_a_clean_message(tmp_path):
    p = cli("run", "--model", "lenet5", "--dataset", "digits", "--rounds", "1", "--epochs", "1",
            "--lr", "1e12", "--out", str(tmp_path / "r"), "--no-progress")
    assert p.returncode == 1 and "diverged" in p.stderr and "Traceback" not in p.stderr


def test_a_run_directory_in_use_is_refused_and_freed_after(tmp_path):
    cfg = RunConfig(model="mlp-300-100", width=0.25, dataset="digits", epochs=1, rounds=1)
    first = Run(cfg, tmp_path / "r", progress=False)
    first.prepare()  # holds the directory as a running process would
    with pytest.raises(ts.UsageError, match="in use by another ticketsmith process"):
        Run(cfg, tmp_path / "r", progress=False).execute()
    # from another process too (the CLI: one line, exit 2), and nothing written by it
    cmd = [sys.executable, "-m", "ticketsmith", "run", "--model", "mlp-300-100", "--width", "0.25",
           "--dataset", "digits", "--epochs", "1", "--rounds", "1", "--out", str(tmp_path / "r"),
           "--no-progress"]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and "in use" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "r" / "round_00").exists()
    first.release()
    summary = Run(cfg, tmp_path / "r", progress=False).execute()  # free again: it runs
    assert summary["rounds"][-1]["status"] == "done"
