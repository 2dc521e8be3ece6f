"""Goes through docs/bad_inputs.md: every row's situation gets its one-line message and status,
no traceback, no existing file changed, nothing half-written (and nothing at all for usage
errors)."""
import errno
import gzip
import hashlib
import importlib.util
import pickle
import re
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ticketsmith as ts
from ticketsmith.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad_inputs.md"
ROWS = [r for r in re.findall(r"^\| ([a-z0-9-]+) \| (.+?) \| (.+?) \| (\d) \|$", DOC.read_text(), re.M)]
QUICK = ["--model", "lenet5", "--dataset", "digits", "--epochs", "1", "--batch-size", "128", "--no-progress"]
FMNIST = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
          "t10k-labels-idx1-ubyte.gz"]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 1-round IMP run on digits (LeNet-5, 1 epoch)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert main(["run", *QUICK, "--rounds", "1", "--out", str(out)]) == 0
    return out


def fake_fmnist(folder: Path, files=FMNIST):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in files:
        n = 30 if name.startswith("train") else 10
        if "images" in name:
            body = bytes([0, 0, 8, 3]) + np.array([n, 28, 28], ">u4").tobytes() + rng.integers(0, 255, n * 784, dtype=np.uint8).tobytes()
        else:
            body = bytes([0, 0, 8, 1]) + np.array([n], ">u4").tobytes() + rng.integers(0, 10, n, dtype=np.uint8).tobytes()
        (folder / name).write_bytes(gzip.compress(body))
    return folder


def copy_run(finished, tmp):
    dst = tmp / "run"
    shutil.copytree(finished, dst)
    return dst


def setup(case: str, tmp: Path, finished: Path, monkeypatch) -> list[str]:
    out = ["--out", str(tmp / "out")]
    if case == "cuda-without-gpu":  # also on a machine that has one
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if case == "kahypar-missing":  # also where the optional extra is installed
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "kahypar" else real(name, *a))
    simple = {
        "unknown-model": ["run", *QUICK, "--model", "resnet21"],
        "model-not-a-classifier": ["run", *QUICK, "--model", "torch.nn:Identity"],
        "unknown-dataset": ["run", *QUICK, "--dataset", "mnist3d"],
        "unknown-method": ["run", *QUICK, "--method", "magic"],
        "unknown-structure": ["run", *QUICK, "--structure", "blocks"],
        "sparsity-one": ["run", *QUICK, "--method", "oneshot", "--sparsity", "1.0"],
        "sparsity-negative": ["run", *QUICK, "--method", "oneshot", "--sparsity", "-0.1"],
        "sparsity-not-a-number": ["run", *QUICK, "--sparsity", "abc"],
        "dst-two-sparsities": ["run", *QUICK, "--method", "srigl", "--sparsity", "0.8,0.9"],
        "dst-zero-sparsity": ["run", *QUICK, "--method", "srigl", "--sparsity", "0"],
        "rounds-negative": ["run", *QUICK, "--rounds", "-1"],
        "oneshot-rounds-zero": ["run", *QUICK, "--method", "dense", "--rounds", "0"],
        "null-mask-no-structure": ["run", *QUICK, "--null-mask"],
        "dense-with-structure": ["run", *QUICK, "--method", "dense", "--structure", "refill"],
        "imp-with-sparsity": ["run", *QUICK, "--sparsity", "0.5"],
        "cuda-without-gpu": ["run", *QUICK, "--device", "cuda"],
        "threads-zero": ["run", *QUICK, "--threads", "0"],
        "sweep-threads-zero": ["sweep", str(finished), "--round", "1", "--threads", "0",
                               "--out", str(tmp / "sw")],
        "kahypar-missing": ["run", *QUICK, "--structure", "regroup", "--regroup-partitioner", "kahypar"],
        "unknown-coupling": ["run", *QUICK, "--structure", "refill", "--refill-coupling", "tied"],
        "gaimp-chain-no-reinit": ["run", *QUICK, "--structure", "regroup", "--structure-every-round",
                                  "--chain", "elsewhere"],
        "epochs-zero": ["run", *QUICK, "--epochs", "0"],
        "batch-zero": ["run", *QUICK, "--batch-size", "0"],
        "lr-negative": ["run", *QUICK, "--lr", "-0.1"],
        "lr-not-a-number": ["run", *QUICK, "--lr", "fast"],
        "width-zero": ["run", *QUICK, "--width", "0"],
        "rewind-garbage": ["run", *QUICK, "--rewind", "soon"],
        "rewind-past-end": ["run", *QUICK, "--rewind", "100000"],
        "prune-fraction": ["run", *QUICK, "--prune-fraction", "1.5"],
        "refill-extra": ["run", *QUICK, "--structure", "refill+", "--refill-extra", "2"],
        "regroup-settings": ["run", *QUICK, "--structure", "regroup", "--regroup-b1", "0"],
        "regroup-partitioner": ["run", *QUICK, "--structure", "regroup", "--regroup-partitioner", "hmetis"],
        "every-round-alone": ["run", *QUICK, "--structure-every-round"],
        "chain-not-a-run": ["run", *QUICK, "--structure", "refill", "--chain", str(tmp / "nowhere")],
        "data-dir-missing": ["run", *QUICK, "--dataset", "fashion-mnist", "--data-dir", "/nonexistent"],
        "nan-loss": ["run", *QUICK, "--lr", "1e12"],
        "bench-no-run": ["bench", str(tmp)],
        "bench-no-masks-file": ["bench", "--model", "lenet5", "--masks", str(tmp / "missing.safetensors"),
                                "--input-shape", "1,28,28"],
        "report-not-a-run": ["report", str(tmp), "--out", str(tmp / "rep")],
        "summary-not-a-run": ["summary", str(tmp)],
    }
    if case in simple:
        argv = simple[case]
        return argv + out if argv[0] == "run" else argv
    fm = ["run", *QUICK, "--dataset", "fashion-mnist", "--model", "mlp-300-100"]
    if case == "data-dir-partial":
        return fm + ["--data-dir", str(fake_fmnist(tmp / "fm", FMNIST[:2]))] + out
    if case in ("data-file-truncated", "data-file-wrong", "data-file-not-gzip"):
        folder = fake_fmnist(tmp / "fm")
        f = folder / "t10k-images-idx3-ubyte.gz"
        body = gzip.decompress(f.read_bytes())
        f.write_bytes({"data-file-truncated": gzip.compress(body[: len(body) // 2]),
                       "data-file-wrong": gzip.compress(b"hello, these are not images\n" * 50),
                       "data-file-not-gzip": b"plain text, not gzip\n"}[case])
        return fm + ["--data-dir", str(folder)] + out
    if case in ("data-file-gzip-bomb", "data-file-fifo"):
        import os
        import zlib
        folder = fake_fmnist(tmp / "fm")
        f = folder / "t10k-images-idx3-ubyte.gz"
        f.unlink()
        if case == "data-file-fifo":
            os.mkfifo(f)
        else:
            z = zlib.compressobj(9, zlib.DEFLATED, 31)
            chunk = bytes(1 << 20)
            f.write_bytes(b"".join([z.compress(chunk) for _ in range(300)] + [z.flush()]))
        return fm + ["--data-dir", str(folder)] + out
    if case == "cifar-hostile-pickle":
        import os

        class Evil:
            def __reduce__(self):
                return (os.system, (f"touch {tmp / 'pwned'}",))
        d = tmp / "cifar" / "cifar-10-batches-py"
        d.mkdir(parents=True)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            (d / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
        return ["run", *QUICK, "--dataset", "cifar10", "--data-dir", str(tmp / "cifar")] + out
    if case == "out-other-config":
        return ["run", *QUICK, "--rounds", "1", "--lr", "0.05", "--out", str(copy_run(finished, tmp))]
    if case == "out-is-a-file":
        (tmp / "out").write_text("mine")
        return ["run", *QUICK] + out
    if case == "out-not-a-run":
        (tmp / "out").mkdir()
        (tmp / "out" / "notes.txt").write_text("mine")
        return ["run", *QUICK] + out
    run_args = ["run", *QUICK, "--rounds", "1"]
    if case == "config-unknown-keys":
        d = copy_run(finished, tmp)
        (d / "config.json").write_text((d / "config.json").read_text().replace('{', '{"colour": 1, ', 1))
        return run_args + ["--out", str(d)]
    if case == "config-not-json":
        d = copy_run(finished, tmp)
        (d / "config.json").write_text("{ half a config")
        return run_args + ["--out", str(d)]
    if case == "masks-corrupt":
        d = copy_run(finished, tmp)
        (d / "round_01" / "round.json").unlink()  # round 1 unfinished: its mask is read back
        f = d / "round_01" / "masks.safetensors"
        data = bytearray(f.read_bytes())
        data[-3] ^= 0x01
        f.write_bytes(bytes(data))
        return run_args + ["--out", str(d)]
    if case == "checkpoint-truncated":
        d = copy_run(finished, tmp)
        (d / "round_01" / "round.json").unlink()
        f = d / "round_01" / "checkpoint.safetensors"
        shutil.copyfile(d / "round_01" / "weights.safetensors", f)
        f.write_bytes(f.read_bytes()[:-100])
        return run_args + ["--out", str(d)]
    if case == "weights-foreign":
        from safetensors.torch import save_file
        d = copy_run(finished, tmp)
        shutil.rmtree(d / "round_01")  # round 1 not started: it prunes round 0's weights
        save_file({"conv1.weight": torch.zeros(6, 1, 5, 5)}, str(d / "round_00" / "weights.safetensors"))
        return run_args + ["--out", str(d)]
    if case == "run-in-use":  # another process works in the run directory (holds its lock)
        import fcntl
        d = copy_run(finished, tmp)
        held = open(d / ".lock", "a")
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        monkeypatch.setattr(sys.modules[__name__], "_HELD", held, raising=False)  # kept open
        return ["run", *QUICK, "--rounds", "1", "--out", str(d)]
    if case == "disk-full":
        def no_space(fd):
            raise OSError(errno.ENOSPC, "No space left on device")
        monkeypatch.setattr(ts.io.os, "fsync", no_space)
        return ["run", *QUICK] + out
    if case == "bench-masks-mismatch":
        torch.manual_seed(0)
        ts.Masks.ones(ts.models.create("lenet5", 1, 10, (28, 28))).save(tmp / "lenet.safetensors")
        return ["bench", "--model", "resnet20", "--masks", str(tmp / "lenet.safetensors"),
                "--input-shape", "1,28,28"]
    if case == "bench-batch-zero":
        return ["bench", str(copy_run(finished, tmp)), "--batch-sizes", "0"]
    if case in ("export-runtime-missing", "bench-runtime-missing"):
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
        if case == "bench-runtime-missing":
            return ["bench", str(copy_run(finished, tmp)), "--runtimes", "torch,openvino"]
        return ["export", str(copy_run(finished, tmp)), "--round", "1", "--runtime", "openvino"] + out
    if case == "bench-unknown-runtime":
        return ["bench", str(copy_run(finished, tmp)), "--runtimes", "torch,tensorrt"]
    if case == "export-unfinished-round":
        return ["export", str(copy_run(finished, tmp)), "--round", "5", "--runtime", "ort"] + out
    if case == "report-unknown-layer":
        return ["report", str(copy_run(finished, tmp)), "--out", str(tmp / "rep"), "--layers", "nope"]
    # -- issue 16: tampered records (validated on load, file and field named) ----------------
    def tamper(rel: str, change) -> Path:
        d = copy_run(finished, tmp)
        f = d / rel
        if callable(change):
            import json
            change = json.dumps(change(json.loads(f.read_text())) if f.exists() else change(None))
        f.write_text(change)
        return d

    def drop(key):
        return lambda obj: {k: v for k, v in obj.items() if k != key}

    records = {  # case: (file, change, command)
        "config-a-list": ("config.json", "[1, 2]", "run"),
        "config-missing-model": ("config.json", drop("model"), "run"),
        "config-string-for-number": ("config.json", lambda c: {**c, "epochs": "many"}, "run"),
        "config-nesting-bomb": ("config.json", "[" * 100_000 + "]" * 100_000, "summary"),
        "config-tampered-summary": ("config.json", lambda c: {**c, "seed": "zero"}, "summary"),
        "config-tampered-report": ("config.json", lambda c: {**c, "channels_last": "yes"}, "report"),
        "round-a-list": ("round_01/round.json", "[1, 2]", "run"),
        "round-missing-key": ("round_01/round.json", drop("test_acc"), "run"),
        "round-string-for-number": ("round_01/round.json", lambda r: {**r, "best_val_acc": "high"}, "run"),
        "data-record-no-digest": ("data.json", drop("digest"), "run"),
        "data-record-a-list": ("data.json", "[]", "run"),
        "history-not-a-list": ("history.json", '{"event": 1}', "extend"),
    }
    if case in records:
        rel, change, command = records[case]
        d = tamper(rel, change)
        return {"run": run_args + ["--out", str(d)], "summary": ["summary", str(d)],
                "report": ["report", str(d), "--out", str(tmp / "rep")],
                "extend": ["run", *QUICK, "--rounds", "2", "--out", str(d)]}[command]
    if case == "round-fifo":
        import os
        d = copy_run(finished, tmp)
        (d / "round_01" / "round.json").unlink()
        os.mkfifo(d / "round_01" / "round.json")
        return run_args + ["--out", str(d)]
    if case in ("round-links-outside", "summary-links-outside"):
        d = copy_run(finished, tmp)
        rel = "round_01/round.json" if case == "round-links-outside" else "round_00/weights.safetensors"
        (tmp / "elsewhere").write_bytes((d / rel).read_bytes())  # a file of the reader's
        (d / rel).unlink()
        (d / rel).symlink_to(tmp / "elsewhere")
        return run_args + ["--out", str(d)] if case == "round-links-outside" else ["summary", str(d)]
    if case == "weights-dev-zero":
        d = copy_run(finished, tmp)
        shutil.rmtree(d / "round_01")  # round 1 not started: it reads round 0's weights
        (d / "round_00" / "weights.safetensors").unlink()
        (d / "round_00" / "weights.safetensors").symlink_to("/dev/zero")
        return run_args + ["--out", str(d)]
    more = {
        "momentum-negative": ["run", *QUICK, "--momentum", "-0.5"],
        "momentum-one": ["run", *QUICK, "--momentum", "1"],
        "weight-decay-negative": ["run", *QUICK, "--weight-decay", "-1"],
        "seed-beyond-64-bits": ["run", *QUICK, "--seed", "99999999999999999999999"],
        "seed-negative": ["run", *QUICK, "--seed", "-1"],
        "dst-delta-t-zero": ["run", *QUICK, "--method", "srigl", "--dst-delta-t", "0"],
        "export-batch-zero": ["export", str(copy_run(finished, tmp)), "--round", "1", "--runtime", "torch",
                              "--batch-size", "0"],
    }
    if case in more:
        return more[case] + (out if more[case][0] in ("run", "export") else [])
    sweep = ["sweep", str(finished), "--round", "1", "--vary", "t1=2", "--out", str(tmp / "sw")]
    if case == "sweep-batch-zero":
        return sweep + ["--batch-size", "0"]
    if case in ("sweep-other-settings", "sweep-row-tampered"):
        (tmp / "sw").mkdir()
        (tmp / "sw" / "setting_default.json").write_text(
            '{"setting": "default", "param": "default", "settings": {"batch_size": 32}}'
            if case == "sweep-other-settings" else "[]")
        return sweep
    if case.startswith("bench-") and case in ("bench-input-rank", "bench-zero-classes", "bench-input-too-small"):
        torch.manual_seed(0)
        ts.Masks.ones(ts.models.create("lenet5", 1, 10, (28, 28))).save(tmp / "m.safetensors")
        tail = {"bench-input-rank": ["--input-shape", "28,28"],
                "bench-zero-classes": ["--input-shape", "1,28,28", "--num-classes", "0"],
                "bench-input-too-small": ["--input-shape", "1,4,4"]}[case]
        return ["bench", "--model", "lenet5", "--masks", str(tmp / "m.safetensors"), *tail]
    if case.startswith("cifar-"):
        import os
        d = tmp / "cifar" / "cifar-10-batches-py"
        d.mkdir(parents=True)
        rng = np.random.default_rng(0)
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
            labels = [12] * 20 if (case == "cifar-labels-out-of-range" and name == "test_batch") else \
                [int(v) for v in rng.integers(0, 10, 20)]
            data = "not pixels" if case == "cifar-text-pixels" else rng.integers(0, 255, (20, 3072), dtype=np.uint8)
            (d / name).write_bytes(pickle.dumps({b"data": data, b"labels": labels}))
        if case == "cifar-huge-length":  # BINBYTES8 with a length of 2^60, then nothing
            (d / "data_batch_1").write_bytes(b"\x80\x04\x8e" + (1 << 60).to_bytes(8, "little") + b"x")
        if case == "cifar-fifo":
            (d / "data_batch_1").unlink()
            os.mkfifo(d / "data_batch_1")
        return ["run", *QUICK, "--dataset", "cifar10", "--data-dir", str(tmp / "cifar")] + out
    raise AssertionError(f"docs/bad_inputs.md row {case!r} has no setup in this test")


def files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


def test_the_catalogue_is_big_enough_and_parsed():
    assert len(ROWS) >= 25
    assert len({r[0] for r in ROWS}) == len(ROWS)


@pytest.mark.parametrize("case,what,message,status", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input(case, what, message, status, tmp_path, finished, monkeypatch, capsys):
    argv = setup(case, tmp_path, finished, monkeypatch)
    before = files(tmp_path)
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    assert rc == int(status), err
    lines = [x for x in err.strip().splitlines() if x.strip()]
    assert lines and "Traceback" not in err
    assert len(lines) == 1, err
    for quoted in re.findall(r'"([^"]+)"', message):
        assert quoted in err, (quoted, err)
    after = files(tmp_path)
    changed = [p for p in before if p in after and before[p] != after[p]]
    assert not changed, f"existing files changed: {changed}"
    assert not [p for p in after if p.endswith((".tmp", ".ts-tmp"))], "a temporary file was left behind"
    if rc == 2 or case == "disk-full":
        assert set(after) == set(before), f"files written: {sorted(set(after) - set(before))}"
    assert not (tmp_path / "pwned").exists()
