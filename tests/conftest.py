import os
import signal

import pytest
import torch

torch.set_num_threads(2)
os.environ.setdefault("TQDM_DISABLE", "1")
# a suite started in the background by a shell ignores SIGINT (POSIX shells do that to background
# jobs, and children inherit it): the interruption tests send Ctrl-C, to this process and others
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
needs_fmnist = pytest.mark.skipif(
    not os.path.exists(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models (`pytestmark =
    pytest.mark.usefixtures("one_thread")`): they are op-overhead bound, and on the shared
    2-core machine a second OpenMP thread only adds synchronisation, up to 10x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def load_script():
    """Import a script of the repository that is not part of the package (scripts/, results/)
    by its path relative to the repository root."""
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent

    def load(relpath: str):
        path = root / relpath
        spec = importlib.util.spec_from_file_location(path.stem, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    return load


@pytest.fixture
def digits():
    import ticketsmith as ts
    return ts.data.load("digits")


@pytest.fixture
def small_executors(monkeypatch):
    """Lift the layer-size limits under which the executors' rules keep layers dense (measured
    there: dense wins), so tests can exercise the executors on small, fast models."""
    import ticketsmith.compact.blocks as blocks
    import ticketsmith.compact.condensed as condensed
    monkeypatch.setattr(blocks, "BLOCK_CONV_MIN_CHANNELS", 1)
    monkeypatch.setattr(condensed, "CONDENSED_MIN_WEIGHTS", 1)
