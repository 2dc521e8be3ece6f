"""Datasets, held in memory as uint8 NCHW tensors, and a batch iterator.

`load(name, root=None)` returns a `Dataset` with train / val / test splits; the validation split
is held out of the official training set with a fixed seed (the paper reports test accuracy at
the epoch of best validation accuracy). `batches(...)` shuffles with torch's DistributedSampler
(one process is simply world size 1), so data-parallel training reuses the same code path.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler

from ..errors import UsageError

ENV_DATA_DIR = "TICKETSMITH_DATA"


@dataclass
class Split:
    x: torch.Tensor  # uint8, N x C x H x W
    y: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class Dataset:
    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str = "none"  # "none" | "flip" | "crop+flip"
    crop_padding: int = 0

    @property
    def in_channels(self) -> int:
        return self.train.x.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.train.x.shape[2:])  # type: ignore[return-value]

    def digest(self) -> str:
        """SHA-256 of every split's pixels and labels: which data a run was trained on, whatever
        folder it was read from."""
        import hashlib
        h = hashlib.sha256(self.name.encode())
        for split in (self.train, self.val, self.test):
            for t in (split.x, split.y):
                t = t.contiguous()
                h.update(str((t.dtype, tuple(t.shape))).encode())
                h.update(t.numpy().tobytes())
        return h.hexdigest()

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        return (x.float().div_(255.0) - mean) / std


_REGISTRY: dict[str, Callable[..., Dataset]] = {}


def register(name: str):
    def deco(fn):
        _REGISTRY[name] = fn
        return fn
    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def load(name: str, root: str | os.PathLike | None = None, val_size: int | None = None) -> Dataset:
    """Load a dataset by name. `root` (or the TICKETSMITH_DATA environment variable) points at
    the folder holding its files; `val_size` overrides the held-out validation size."""
    if name not in _REGISTRY:
        raise UsageError(f"unknown dataset {name!r}; choose one of: {', '.join(names())}")
    root = root or os.environ.get(ENV_DATA_DIR) or None
    return _REGISTRY[name](root=root, val_size=val_size)


def split_off_validation(x: torch.Tensor, y: torch.Tensor, val_size: int) -> tuple[Split, Split]:
    """Hold out `val_size` examples of a training set, the same ones for every run."""
    if not 0 <= val_size < len(y):
        raise UsageError(f"validation size {val_size} must be in [0, {len(y)})")
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    tr, va = perm[val_size:].sort().values, perm[:val_size].sort().values
    return Split(x[tr], y[tr]), Split(x[va], y[va])


def augment_batch(x: torch.Tensor, kind: str, padding: int, g: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding) and horizontal flip of a uint8/float batch, per example."""
    if kind == "none" or len(x) == 0:
        return x
    b, c, h, w = x.shape
    if "crop" in kind and padding > 0:
        xp = torch.nn.functional.pad(x, (padding,) * 4)
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=g)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=g)
        rows = (oy[:, None] + torch.arange(h))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w))[:, None, None, :]
        x = xp[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]
    if "flip" in kind:
        flip = torch.rand(b, generator=g) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(3), x)
    return x


def batches(ds: Dataset, split: Split, batch_size: int, *, train: bool, epoch: int = 0,
            seed: int = 0, rank: int = 0, world_size: int = 1, skip: int = 0,
            channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield normalized (x, y) batches of this process's share of `split`.

    For training, the order is a DistributedSampler shuffle seeded by (seed, epoch), padded to
    a multiple of the world size, and `batch_size` is per process; augmentation draws from a
    generator seeded by (seed, epoch, rank). Evaluation walks the split in order. `skip` drops
    the first batches (used to start mid-epoch at a rewind point) without computing them.
    """
    if train:
        sampler = DistributedSampler(range(len(split)), num_replicas=world_size, rank=rank,
                                     shuffle=True, seed=seed, drop_last=False)
        sampler.set_epoch(epoch)
        idx = torch.tensor(list(sampler), dtype=torch.long)
        g = torch.Generator().manual_seed((seed * 1_000_003 + epoch) * 1009 + rank)
    else:
        idx = torch.arange(rank, len(split), world_size)
        g = None
    for start in range(skip * batch_size, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        x = split.x[sel]
        if train and ds.augment != "none":
            x = augment_batch(x, ds.augment, ds.crop_padding, g)
        x = ds.normalize(x)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        yield x, split.y[sel]


def num_batches(n: int, batch_size: int, world_size: int = 1) -> int:
    """Training batches per epoch for each process (the sampler pads to the world size)."""
    per_rank = -(-n // world_size)
    return -(-per_rank // batch_size)


from . import cifar, digits, fashion_mnist, synthetic  # noqa: E402,F401  (register datasets)
