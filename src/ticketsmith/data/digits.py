"""scikit-learn's bundled 8x8 digits (1,797 images, no download): for fast smoke runs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import torch

from . import Dataset, Split, register, split_off_validation


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The bundled digits.csv.gz as scikit-learn's `load_digits` reads it (images 0-16, labels),
    read straight from the package: importing scikit-learn costs seconds per process."""
    spec = importlib.util.find_spec("sklearn")
    f = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz" if spec else None
    if f is None or not f.is_file():  # another layout: let scikit-learn find it
        from sklearn.datasets import load_digits as sk_digits
        d = sk_digits()
        return d.images, d.target
    data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


@register("digits")
def load_digits(root=None, val_size=None) -> Dataset:
    images, target = _sklearn_digits()
    x = torch.from_numpy((images * (255.0 / 16.0)).round()).to(torch.uint8).unsqueeze(1)
    y = torch.from_numpy(target).long()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(1))
    test, rest = perm[:360].sort().values, perm[360:].sort().values
    train, val = split_off_validation(x[rest], y[rest], 180 if val_size is None else val_size)
    return Dataset("digits", train, val, Split(x[test], y[test]), num_classes=10,
                   mean=(0.3,), std=(0.37,), augment="none")
