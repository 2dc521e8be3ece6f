"""Crash safety: SIGKILL a run at many points, restart it with the same command each time,
and get bit-for-bit the result of an uninterrupted run (IMP-Regroup, so kills also land between
two layers' partitions). No file is ever half written."""
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ticketsmith.io import load_tensors, read_json

ARGS = ["run", "--model", "lenet5", "--dataset", "digits", "--rounds", "2", "--epochs", "2",
        "--batch-size", "64", "--rewind", "10%", "--structure", "regroup", "--no-progress"]


def run(out, fault=None, kill_after=None):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    env.pop("TICKETSMITH_FAULT", None)
    if fault:
        env["TICKETSMITH_FAULT"] = fault
    p = subprocess.Popen([sys.executable, "-m", "ticketsmith", *ARGS, "--out", str(out)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if kill_after is not None:
        try:
            p.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            p.send_signal(signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def check_every_file(out: Path):
    """Whatever the moment of the kill, every artifact on disk is whole and verifiable."""
    for f in out.rglob("*"):
        if f.name.endswith(".ts-tmp") or f.is_dir():
            continue
        if f.suffix == ".safetensors":
            load_tensors(f)  # raises on a truncated / corrupt file
        elif f.suffix == ".json":
            read_json(f)
        elif f.suffix == ".jsonl":
            for line in f.read_text().splitlines():
                json.loads(line)


def snapshot(out: Path):
    summary = json.loads((out / "summary.json").read_text())
    for r in summary["rounds"]:
        r.pop("train_seconds", None)
        r.pop("seconds_per_epoch", None)  # wall time, like train_seconds
    summary.pop("run")
    tensors = {}
    for f in sorted(out.rglob("*.safetensors")):
        t, _ = load_tensors(f)
        tensors[str(f.relative_to(out))] = t
    return summary, tensors


@pytest.mark.slow
def test_sigkill_anywhere_then_restart_gives_the_uninterrupted_result(tmp_path):
    rc, err = run(tmp_path / "ref")
    assert rc == 0, err[-2000:]
    ref_summary, ref_tensors = snapshot(tmp_path / "ref")

    out = tmp_path / "cut"
    # in order: each kill moves the run a little further (round 0 training, round 1's regroup,
    # ..., between rounds, round 2's regroup)
    faults = ["iteration:5", "write:2", "epoch:2", "regroup:3", "mask:1", "write:4", "round:1",
              "regroup:2", "iteration:30"]
    rng = random.Random(1234)
    killed = []
    for fault in faults:
        rc, err = run(out, fault=fault)
        if rc == -signal.SIGKILL:
            killed.append(fault)
        else:
            assert rc == 0, err[-2000:]
        check_every_file(out)
    for _ in range(2):  # and at random moments
        rc, err = run(out, kill_after=rng.uniform(2.0, 6.0))
        assert rc in (0, -signal.SIGKILL), err[-2000:]
        check_every_file(out)
    assert len(killed) >= 6 and {"regroup:3", "regroup:2"} <= set(killed), \
        f"the fault points were not reached (killed: {killed}): the test would prove nothing"
    rc, err = run(out)
    assert rc == 0, err[-2000:]
    summary, tensors = snapshot(out)
    assert summary == ref_summary
    assert tensors.keys() == ref_tensors.keys()
    for name in tensors:
        for k in ref_tensors[name]:
            assert torch.equal(tensors[name][k], ref_tensors[name][k]), (name, k)
    assert not list(out.rglob(".*.ts-tmp"))


def test_a_hostile_pickle_where_a_checkpoint_should_be_executes_nothing(tmp_path):
    """Checkpoints are safetensors, never unpickled: a planted pickle is refused cleanly."""
    import pickle
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    out = tmp_path / "run"
    rc, err = run(out, fault="epoch:2")  # killed in round 0: a checkpoint will be read on restart
    assert rc == -signal.SIGKILL
    ckpt = out / "round_00" / "checkpoint.safetensors"
    assert ckpt.exists()
    ckpt.write_bytes(pickle.dumps(Evil()))
    rc, err = run(out)
    assert rc == 1 and "not a valid safetensors file" in err and "Traceback" not in err
    assert not marker.exists()
    # and torch.load of a .pt file is only ever weights_only: the same payload is refused
    pt = tmp_path / "evil.pt"
    pt.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(Exception):
        torch.load(pt, weights_only=True)
    assert not marker.exists()
