"""Fashion-MNIST from the standard IDX .gz files (Debian: package dataset-fashion-mnist)."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from ..errors import ArtifactError, DataNotFoundError, UsageError
from ..io import read_regular
from . import Dataset, Split, register, split_off_validation

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
         "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


# the real files: 26 MB compressed, 47 MB inflated (the training images); a file or its
# inflated content beyond this is not Fashion-MNIST (a gzip bomb, /dev/zero) and is refused
MAX_IDX_BYTES = 256 << 20


def read_idx(path: Path) -> np.ndarray:
    """Read one IDX file (gzipped or not) into a numpy array, checking its header. Only a
    regular file of bounded size is read, and it inflates to a bounded size."""
    try:
        data = read_regular(path, MAX_IDX_BYTES)
    except ArtifactError as e:
        raise UsageError(str(e)) from None
    if path.suffix == ".gz":
        inflate = zlib.decompressobj(wbits=31)  # gzip framing
        try:
            data = inflate.decompress(data, MAX_IDX_BYTES + 1)
        except zlib.error as e:
            raise UsageError(f"{path}: cannot read IDX file (not gzip data: {e})") from None
        if len(data) > MAX_IDX_BYTES:
            raise UsageError(f"{path}: inflates to more than {MAX_IDX_BYTES:,} bytes; not an IDX file")
        if not inflate.eof:
            raise UsageError(f"{path}: cannot read IDX file (the gzip data is truncated)")
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise UsageError(f"{path}: not an IDX file of unsigned bytes (bad magic number)")
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UsageError(f"{path}: truncated or corrupt IDX file ({body.size} bytes of data, "
                         f"header says {int(np.prod(dims))})")
    return body.reshape(dims)


def find_files(root: str | None) -> Path:
    folder = Path(root) if root else Path(DEFAULT_DIR)
    missing = [n for pair in FILES.values() for n in pair if not (folder / n).exists()]
    if missing:
        raise DataNotFoundError(
            f"fashion-mnist: {', '.join(missing)} not found in {folder}; install them with "
            f"'sudo apt-get install dataset-fashion-mnist' or point --data-dir (or "
            f"$TICKETSMITH_DATA) at a folder holding the four IDX .gz files")
    return folder


@register("fashion-mnist")
def load_fashion_mnist(root: str | None = None, val_size: int | None = None) -> Dataset:
    folder = find_files(root)
    splits = {}
    for part, (img, lab) in FILES.items():
        x = read_idx(folder / img)
        y = read_idx(folder / lab)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise UsageError(f"fashion-mnist: {img} and {lab} do not match "
                             f"({x.shape} images, {y.shape} labels)")
        splits[part] = (torch.from_numpy(x.copy()).unsqueeze(1), torch.from_numpy(y.astype(np.int64)))
    train, val = split_off_validation(*splits["train"], 5000 if val_size is None else val_size)
    return Dataset("fashion-mnist", train, val, Split(*splits["test"]), num_classes=10,
                   mean=(0.2860,), std=(0.3530,), augment="crop+flip", crop_padding=2)
