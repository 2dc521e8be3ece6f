"""scikit-learn's bundled 8x8 digits (1,797 images, no download): for fast smoke runs."""
from __future__ import annotations

import torch

from . import Dataset, Split, register, split_off_validation


@register("digits")
def load_digits(root=None, val_size=None) -> Dataset:
    from sklearn.datasets import load_digits as sk_digits
    d = sk_digits()
    x = torch.from_numpy((d.images * (255.0 / 16.0)).round()).to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(d.target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    test, rest = perm[:360].sort().values, perm[360:].sort().values
    train, val = split_off_validation(x[rest], y[rest], 180 if val_size is None else val_size)
    return Dataset("digits", train, val, Split(x[test], y[test]), num_classes=10,
                   mean=(0.3,), std=(0.37,), augment="none")
