import gzip
import pickle
import struct

import numpy as np
import pytest
import torch

import ticketsmith as ts
from ticketsmith.errors import DataNotFoundError, UsageError

from conftest import needs_fmnist


@needs_fmnist
def test_fashion_mnist_from_debian_package():
    ds = ts.data.load("fashion-mnist")
    assert ds.train.x.shape == (55000, 1, 28, 28) and ds.train.x.dtype == torch.uint8
    assert len(ds.val) == 5000 and len(ds.test) == 10000
    assert ds.num_classes == 10 and set(ds.test.y.unique().tolist()) == set(range(10))
    # the validation split is the same for every load and disjoint from train
    assert torch.equal(ts.data.load("fashion-mnist").val.y, ds.val.y)


def _write_idx(path, arr):
    header = bytes([0, 0, 8, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_from_a_given_folder_and_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        ts.data.load("fashion-mnist", tmp_path)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 50), ("t10k", 20)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, (n,)))
    monkeypatch.setenv("TICKETSMITH_DATA", str(tmp_path))
    ds = ts.data.load("fashion-mnist", val_size=10)
    assert len(ds.train) == 40 and len(ds.val) == 10 and len(ds.test) == 20
    # a truncated file is refused with its name
    raw = gzip.decompress((tmp_path / "t10k-images-idx3-ubyte.gz").read_bytes())
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(UsageError, match="t10k-images.*truncated"):
        ts.data.load("fashion-mnist")


def _cifar_batch(path, n, label_key="labels", classes=10):
    rng = np.random.default_rng(n)
    obj = {b"data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
           label_key.encode(): rng.integers(0, classes, n).tolist(), b"batch_label": b"x"}
    with open(path, "wb") as f:
        pickle.dump(obj, f)


def test_cifar10_and_cifar100_from_python_batches(tmp_path):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for i in range(1, 6):
        _cifar_batch(d / f"data_batch_{i}", 20)
    _cifar_batch(d / "test_batch", 10)
    ds = ts.data.load("cifar10", tmp_path, val_size=10)
    assert ds.train.x.shape == (90, 3, 32, 32) and len(ds.test) == 10
    assert ds.augment == "crop+flip"
    d = tmp_path / "c100"
    d.mkdir()
    _cifar_batch(d / "train", 30, "fine_labels", 100)
    _cifar_batch(d / "test", 10, "fine_labels", 100)
    assert ts.data.load("cifar100", d, val_size=5).num_classes == 100
    with pytest.raises(DataNotFoundError):
        ts.data.load("cifar10", tmp_path / "nowhere")


def test_hostile_pickle_in_cifar_folder_executes_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            import os
            return (os.system, (f"touch {marker}",))

    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (d / name).write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(UsageError, match="refusing to load"):
        ts.data.load("cifar10", tmp_path)
    assert not marker.exists()


def test_unknown_dataset_lists_choices():
    with pytest.raises(UsageError, match="digits"):
        ts.data.load("imagenet")


def test_batches_shard_the_global_batch_across_ranks(digits):
    # the union of the ranks' batches is the single-process batch (same global order)
    one = [y for _, y in ts.data.batches(digits, digits.train, 64, train=True, epoch=2, seed=5)]
    two = [[y for _, y in ts.data.batches(digits, digits.train, 32, train=True, epoch=2, seed=5,
                                          rank=r, world_size=2)] for r in range(2)]
    assert sorted(torch.cat([two[0][0], two[1][0]]).tolist()) == sorted(one[0].tolist())


def test_augmentation_shapes_and_determinism():
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    x = torch.randint(0, 255, (8, 3, 32, 32), dtype=torch.uint8)
    a = ts.data.augment_batch(x, "crop+flip", 4, g1)
    assert a.shape == x.shape and torch.equal(a, ts.data.augment_batch(x, "crop+flip", 4, g2))
    assert not torch.equal(a, x)


@pytest.mark.parametrize("name", ts.models.names())
def test_every_zoo_model_runs_on_every_input_shape(name):
    for c, size in ((3, (32, 32)), (1, (28, 28)), (1, (8, 8))):
        m = ts.models.create(name, c, 7, size, width=0.25)
        assert m(torch.randn(2, c, *size)).shape == (2, 7)


def test_width_and_unknown_model():
    full = sum(p.numel() for p in ts.models.create("resnet20").parameters())
    half = sum(p.numel() for p in ts.models.create("resnet20", width=0.5).parameters())
    assert 0.2 < half / full < 0.3
    with pytest.raises(UsageError, match="resnet20"):
        ts.models.create("resnet21")
