import os

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("TQDM_DISABLE", "1")

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture
def digits():
    import ticketsmith as ts
    return ts.data.load("digits")
