"""Write docs/api.md, the API reference, from the docstrings (never edited by hand).

    .venv/bin/python scripts/api_reference.py          # rewrite docs/api.md
    .venv/bin/python scripts/api_reference.py --check  # exit 1 if docs/api.md is out of date
"""
from __future__ import annotations

import importlib
import inspect
import sys
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "docs" / "api.md"
# the flow, in order: sources -> structure -> compact -> deploy -> bench -> report
MODULES = ["ticketsmith", "ticketsmith.data", "ticketsmith.models", "ticketsmith.models.attention",
           "ticketsmith.models.zoo_attention", "ticketsmith.models.glu", "ticketsmith.models.norms", "ticketsmith.masks",
           "ticketsmith.train", "ticketsmith.prune", "ticketsmith.structure", "ticketsmith.dst",
           "ticketsmith.compact", "ticketsmith.deploy", "ticketsmith.bench", "ticketsmith.runs", "ticketsmith.search", "ticketsmith.report",
           "ticketsmith.report.evidence", "ticketsmith.sweep", "ticketsmith.io", "ticketsmith.records"]


def public(mod) -> list[tuple[str, object]]:
    names = getattr(mod, "__all__", None)
    if names is None:
        names = [n for n, v in vars(mod).items() if not n.startswith("_")
                 and (inspect.isfunction(v) or inspect.isclass(v)) and getattr(v, "__module__", "") == mod.__name__]
    return [(n, getattr(mod, n)) for n in sorted(names) if hasattr(mod, n)]


def signature(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def render() -> str:
    lines = ["# API reference", "",
             "Generated from the docstrings by `scripts/api_reference.py`; do not edit by hand.", ""]
    for name in MODULES:
        mod = importlib.import_module(name)
        lines += [f"## `{name}`", ""]
        doc = inspect.getdoc(mod)
        if doc:
            lines += [doc.split("\n\n")[0], ""]
        for n, obj in public(mod):
            if inspect.ismodule(obj):
                continue
            kind = "class" if inspect.isclass(obj) else "function" if callable(obj) else "value"
            sig = signature(obj) if kind != "value" else ""
            lines += [f"### `{name}.{n}{sig}`" if kind != "value" else f"### `{name}.{n}`", ""]
            doc = inspect.getdoc(obj) if kind != "value" else None
            lines += [doc if doc else f"({kind})", ""]
    return "\n".join(lines).rstrip() + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run scripts/api_reference.py", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
