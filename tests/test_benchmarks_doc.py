"""docs/benchmarks.md's generated sections equal what scripts/benchmarks_doc.py makes of the
records (numbers in docs come from records)."""
import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_generated_sections_are_current():
    spec = importlib.util.spec_from_file_location("benchmarks_doc", ROOT / "scripts" / "benchmarks_doc.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    text = mod.DOC.read_text()
    assert "<!-- generated: channel_tickets_runtimes -->" in text
    assert mod.render(text) == text, "run .venv/bin/python scripts/benchmarks_doc.py"
    assert "fastest" in mod.channel_tickets_runtimes() and "| vgg16 |" in mod.dense_runtimes()
