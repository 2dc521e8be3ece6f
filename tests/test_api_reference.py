"""docs/api.md is generated from the docstrings and never drifts from them."""
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_api_reference_is_current():
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "api_reference.py"), "--check"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr + " (regenerate: .venv/bin/python scripts/api_reference.py)"
