"""Data parallelism under torchrun: 2 CPU processes with the gloo backend on 127.0.0.1."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import ticketsmith as ts
from ticketsmith.train import Dist

# Identical masks, identical sparsity; accuracy may differ: DDP averages two half-batch
# gradients, which equals the full-batch gradient only up to float rounding (seen: 1e-7 after
# 3 steps), and SGD at lr 0.1 amplifies that over a few hundred steps on 1,257 images.
ACC_TOL = 0.06


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, nproc, timeout=240):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
           "--nnodes", "1", "--master_addr", "127.0.0.1", "--master_port", str(free_port()),
           "-m", "ticketsmith", *args] if nproc > 1 else [sys.executable, "-m", "ticketsmith", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)  # never leave workers behind
        p.communicate()
        raise
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    return p.returncode, out, err


def test_torchrun_imp_two_processes_matches_single_process(tmp_path):
    common = ["run", "--model", "lenet5", "--dataset", "digits", "--rounds", "2", "--epochs", "3",
              "--batch-size", "64", "--no-progress"]
    rc, out, err = launch(common + ["--out", str(tmp_path / "ddp")], nproc=2)
    assert rc == 0, err[-3000:]
    assert out.count("run directory:") == 1, "only rank 0 prints and writes"
    rc1, _, err1 = launch(common + ["--out", str(tmp_path / "one")], nproc=1)
    assert rc1 == 0, err1[-2000:]
    ddp = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert ddp["complete"] and len(ddp["rounds"]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp", "one"]
    for a, b in zip(ddp["rounds"], one["rounds"]):
        assert a["sparsity"] == b["sparsity"]
        assert abs(a["test_acc"] - b["test_acc"]) <= ACC_TOL, (a, b)
    # the run checks a hash of every mask across ranks (it fails loudly otherwise): the masks
    # rank 0 wrote are the masks both ranks trained with; and resuming under torchrun is a no-op
    rc, out, err = launch(common + ["--out", str(tmp_path / "ddp")], nproc=2)
    assert rc == 0 and json.loads((tmp_path / "ddp" / "summary.json").read_text())["rounds"] == ddp["rounds"]


def _mismatch_worker(rank, port, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_RANK=str(rank))
    dist = Dist.from_env(device="cpu")
    masks = ts.Masks({"w": torch.tensor([[True, rank == 0]])})
    try:
        dist.check_same(masks.digest(), "the test mask")
        q.put((rank, "no error"))
    except RuntimeError as e:
        q.put((rank, str(e)))
    finally:
        torch.distributed.destroy_process_group()


def test_mask_mismatch_across_ranks_fails_loudly():
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_mismatch_worker, args=(r, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    try:
        results = dict(q.get(timeout=120) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    assert all("differs across ranks" in msg for msg in results.values()), results


def test_batch_must_split_evenly():
    ds = ts.data.load("digits")
    m = ts.models.create("lenet5", 1, 10, (8, 8))
    with pytest.raises(ts.UsageError, match="does not split evenly"):
        ts.Trainer(m, ds, ts.TrainConfig(batch_size=63), dist=Dist(rank=0, world_size=2))


def test_torchrun_srigl_two_processes_constant_fan_in_and_agreeing_masks(tmp_path):
    args = ["run", "--method", "srigl", "--sparsity", "0.8", "--model", "lenet5", "--dataset",
            "digits", "--epochs", "2", "--batch-size", "64", "--dst-delta-t", "4", "--no-progress"]
    rc, out, err = launch(args + ["--out", str(tmp_path / "ddp")], nproc=2)
    assert rc == 0, err[-3000:]  # every mask change compared a hash across ranks
    masks = ts.Masks.load(tmp_path / "ddp" / "round_00" / "masks.safetensors")
    for k in masks.weight_names:
        rows = masks[k].reshape(masks[k].shape[0], -1).sum(1)
        assert len(rows[rows > 0].unique()) == 1, k
    rc1, _, err1 = launch(args + ["--out", str(tmp_path / "one")], nproc=1)
    assert rc1 == 0, err1[-2000:]
    a = json.loads((tmp_path / "ddp" / "summary.json").read_text())["rounds"][0]
    b = json.loads((tmp_path / "one" / "summary.json").read_text())["rounds"][0]
    assert a["sparsity"] == b["sparsity"] and abs(a["test_acc"] - b["test_acc"]) <= ACC_TOL
