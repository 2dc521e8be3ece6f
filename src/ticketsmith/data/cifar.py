"""CIFAR-10 / CIFAR-100 from a local folder in the standard python batch format.

Those batches are pickles. They are read with a restricted unpickler that can build only
dicts, lists, strings, bytes, numbers and numpy arrays: a file that asks for anything else
(the way a hostile pickle runs code) is refused before anything is executed.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError, DataNotFoundError, UsageError
from ..io import read_regular
from . import Dataset, Split, register, split_off_validation

_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


# the largest real batch (CIFAR-100's train) is about 155 MB
MAX_BATCH_BYTES = 256 << 20


def read_batch(path: Path) -> dict:
    import io
    try:  # a regular file of bounded size (no FIFO, no /dev/zero), read before unpickling
        data = read_regular(path, MAX_BATCH_BYTES)
    except ArtifactError as e:
        raise UsageError(str(e)) from None
    try:
        obj = _SafeUnpickler(io.BytesIO(data), encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, MemoryError, OverflowError,
            AttributeError, IndexError, KeyError) as e:  # a huge declared length, a foreign opcode
        raise UsageError(f"{path}: not a CIFAR python batch ({str(e)[:120]})") from None
    if not isinstance(obj, dict):
        raise UsageError(f"{path}: not a CIFAR python batch (top level is {type(obj).__name__})")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _arrays(batch: dict, label_key: str, path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    if "data" not in batch or label_key not in batch:
        raise UsageError(f"{path}: missing 'data' or '{label_key}'")
    data, labels = batch["data"], batch[label_key]
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8):
        raise UsageError(f"{path}: 'data' must be a uint8 array of pixels, got "
                         f"{getattr(data, 'dtype', type(data).__name__)}")
    try:
        y = np.asarray(labels, dtype=np.int64)
    except (ValueError, TypeError, OverflowError):
        raise UsageError(f"{path}: '{label_key}' must be integer labels") from None
    x = data
    if x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or y.ndim != 1 or len(x) != len(y):
        raise UsageError(f"{path}: expected N x 3072 uint8 data and N labels, got {x.shape}, {y.shape}")
    return torch.from_numpy(x.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(y)


def _folder(root: str | None, name: str, sub: str, probe: str) -> Path:
    if not root:
        raise DataNotFoundError(f"{name}: no data folder given; pass --data-dir DIR (or set "
                                f"$TICKETSMITH_DATA) pointing at '{sub}' or its parent "
                                "(nothing is downloaded)")
    for cand in (Path(root), Path(root) / sub):
        if (cand / probe).exists():
            return cand
    raise DataNotFoundError(f"{name}: '{probe}' not found in {root} or {Path(root) / sub}")


def _load(name, root, val_size, sub, train_files, test_file, label_key, classes, mean, std):
    folder = _folder(root, name, sub, test_file)
    missing = [f for f in train_files if not (folder / f).exists()]
    if missing:
        raise DataNotFoundError(f"{name}: {', '.join(missing)} not found in {folder}")
    parts = [_arrays(read_batch(folder / f), label_key, folder / f) for f in train_files]
    x = torch.cat([p[0] for p in parts])
    y = torch.cat([p[1] for p in parts])
    if int(y.max()) >= classes or int(y.min()) < 0:
        raise UsageError(f"{name}: labels outside [0, {classes})")
    train, val = split_off_validation(x, y, min(5000, len(y) // 10) if val_size is None else val_size)
    test = Split(*_arrays(read_batch(folder / test_file), label_key, folder / test_file))
    if len(test.y) and (int(test.y.max()) >= classes or int(test.y.min()) < 0):
        raise UsageError(f"{name}: {folder / test_file}: labels outside [0, {classes})")
    return Dataset(name, train, val, test, num_classes=classes, mean=mean, std=std,
                   augment="crop+flip", crop_padding=4)


@register("cifar10")
def load_cifar10(root=None, val_size=None) -> Dataset:
    files = [f"data_batch_{i}" for i in range(1, 6)]
    return _load("cifar10", root, val_size, "cifar-10-batches-py", files, "test_batch", "labels",
                 10, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@register("cifar100")
def load_cifar100(root=None, val_size=None) -> Dataset:
    return _load("cifar100", root, val_size, "cifar-100-python", ["train"], "test", "fine_labels",
                 100, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
