"""Interruption by any signal resumes bit-identically, on every method: a run stopped several
times, by Ctrl-C (SIGINT), by SIGTERM and by SIGKILL, at random points (iterations, epoch ends,
atomic writes, mask decisions, between refill / regroup layers, between rounds), then resumed
with the same command, ends with the summary, masks, weights and per-epoch metrics of the run
that was never interrupted. Only the fields named in `runs.WALL_CLOCK_FIELDS` may differ.

SIGINT and SIGTERM are sent in-process (the CLI turns both into a clean stop); SIGKILL needs a
child process, once per method."""
import json
import os
import random
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from ticketsmith import faults
from ticketsmith.cli import main
from ticketsmith.io import load_tensors
from ticketsmith.runs import WALL_CLOCK_FIELDS

BASE = ["run", "--model", "lenet5", "--dataset", "digits", "--epochs", "2", "--batch-size", "64",
        "--rewind", "10%", "--no-progress", "--threads", "1"]
IMP = ["--rounds", "2"]
METHODS = {
    "imp": IMP,
    "imp-refill": [*IMP, "--structure", "refill"],
    "imp-refill+": [*IMP, "--structure", "refill+"],
    "imp-regroup": [*IMP, "--structure", "regroup"],
    "imp-refill-every-round": [*IMP, "--structure", "refill", "--structure-every-round"],
    **{f"oneshot-{s}": ["--method", "oneshot", "--source", s, "--sparsity", "0.5,0.8",
                        *(["--synflow-iterations", "5"] if s == "synflow" else []),
                        *(["--admm-epochs", "1"] if s == "admm" else [])]
       for s in ("omp", "rp", "snip", "grasp", "synflow", "admm")},
    "oneshot-refill": ["--method", "oneshot", "--sparsity", "0.8", "--structure", "refill"],
    **{m: ["--method", m, "--sparsity", "0.8", "--dst-delta-t", "5"] for m in ("srigl", "rigl", "set")},
}


def in_process(args, out, fault, monkeypatch, capsys, reached=None) -> int:
    """`main` in this process; `reached` (a Counter) counts the fault points the run passes."""
    monkeypatch.setattr(faults, "_seen", {})
    if reached is not None:
        inner = faults.reach

        def counting(point: str) -> None:
            reached[point] += 1
            inner(point)
        monkeypatch.setattr(faults, "reach", counting)
    if fault:
        monkeypatch.setenv("TICKETSMITH_FAULT", fault)
    else:
        monkeypatch.delenv("TICKETSMITH_FAULT", raising=False)
    threads = torch.get_num_threads()
    try:
        return main([*BASE, *args, "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
        capsys.readouterr()


def in_child(args, out, fault) -> int:
    env = {**os.environ, "TICKETSMITH_FAULT": fault, "OMP_WAIT_POLICY": "PASSIVE"}
    p = subprocess.run([sys.executable, "-m", "ticketsmith", *BASE, *args, "--out", str(out)],
                       env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode in (0, -signal.SIGKILL), p.stderr[-2000:]
    return p.returncode


def without_wall_clock(obj):
    if isinstance(obj, dict):
        return {k: without_wall_clock(v) for k, v in obj.items() if k not in WALL_CLOCK_FIELDS}
    if isinstance(obj, list):
        return [without_wall_clock(v) for v in obj]
    return obj


def snapshot(out: Path):
    summary = json.loads((out / "summary.json").read_text())
    summary.pop("run")
    metrics = {str(f.relative_to(out)): [json.loads(line) for line in f.read_text().splitlines()]
               for f in sorted(out.rglob("metrics.jsonl"))}
    tensors = {str(f.relative_to(out)): load_tensors(f)[0] for f in sorted(out.rglob("*.safetensors"))}
    return without_wall_clock(summary), without_wall_clock(metrics), tensors


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_interrupted_by_any_signal_resumes_bit_identically(method, tmp_path, monkeypatch, capsys):
    args = METHODS[method]
    reached = Counter()
    assert in_process(args, tmp_path / "ref", None, monkeypatch, capsys, reached) == 0
    monkeypatch.undo()  # the counting reach
    ref = snapshot(tmp_path / "ref")

    out = tmp_path / "cut"
    rng = random.Random(method)
    # every point this method passes, and how often in a whole run (but the end of its last round)
    points = sorted(p for p in reached if not (p == "round" and reached[p] == 1))

    def random_fault(sig: str) -> str:  # early enough that what is left of the run reaches it
        point = rng.choice(points)
        return f"{point}:{rng.randint(1, max(1, reached[point] // 3))}:{sig}"

    stopped = []
    for sig in ("INT", "TERM", "INT", "TERM"):
        fault = random_fault(sig)
        rc = in_process(args, out, fault, monkeypatch, capsys)
        assert rc in (0, 128 + getattr(signal, f"SIG{sig}")), (fault, rc)
        if rc:
            stopped.append(fault)
    if in_child(args, out, random_fault("KILL")):
        stopped.append("KILL")
    assert len(stopped) >= 2, f"too few interruptions landed ({stopped}): the test would prove nothing"
    assert in_process(args, out, None, monkeypatch, capsys) == 0
    summary, metrics, tensors = snapshot(out)
    assert summary == ref[0]
    assert metrics == ref[1]
    assert tensors.keys() == ref[2].keys()
    for name, ts in tensors.items():
        assert ts.keys() == ref[2][name].keys(), name
        for k in ts:
            assert torch.equal(ts[k], ref[2][name][k]), (name, k)
    assert not list(out.rglob(".*.ts-tmp"))
