"""A synthetic, learnable image task: each class is a fixed random template, examples are the
template under random shifts plus noise. Deterministic; needs no files."""
from __future__ import annotations

import torch

from . import Dataset, Split, register, split_off_validation


def make(n: int, classes: int = 10, channels: int = 3, size: int = 16, seed: int = 0):
    # the class templates are the same for every split; `seed` draws the examples
    templates = torch.rand(classes, channels, size, size, generator=torch.Generator().manual_seed(12345))
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (n,), generator=g)
    shift = torch.randint(-2, 3, (n, 2), generator=g)
    x = templates[y]
    x = torch.stack([xi.roll(tuple(s.tolist()), dims=(1, 2)) for xi, s in zip(x, shift)])
    x = (0.6 * x + 0.4 * torch.rand(x.shape, generator=g)).mul(255).round().to(torch.uint8)
    return x, y


@register("synthetic")
def load_synthetic(root=None, val_size=None) -> Dataset:
    x, y = make(2400, seed=0)
    xt, yt = make(600, seed=1)
    train, val = split_off_validation(x, y, 300 if val_size is None else val_size)
    return Dataset("synthetic", train, val, Split(xt, yt), num_classes=10,
                   mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), augment="none")
