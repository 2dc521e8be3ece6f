"""docs/benchmarks.md's generated sections equal what scripts/benchmarks_doc.py makes of the
records (numbers in docs come from records)."""
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_sections_are_current(load_script):
    mod = load_script("scripts/benchmarks_doc.py")
    text = mod.DOC.read_text()
    assert "<!-- generated: channel_tickets_runtimes -->" in text
    assert mod.render(text) == text, "run .venv/bin/python scripts/benchmarks_doc.py"
    assert "fastest" in mod.fastest_rows("channel_tickets_runtimes") and "| vgg16 |" in mod.dense_runtimes()


def test_gpu_script_without_cuda_says_so_and_measures_nothing(tmp_path):
    # the prepared GPU run (benchmarks/gpu_speed.py) must at least start and stop cleanly where
    # there is no CUDA device: a device window is too short to find a broken script in
    import os
    import subprocess
    import sys

    import pytest
    import torch
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is here: the script would measure")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_speed.py"), "--out",
                        str(tmp_path / "gpu_speed")], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert p.returncode == 0, p.stderr
    assert "no CUDA device: nothing measured" in p.stdout + p.stderr
    assert not list(tmp_path.iterdir())
