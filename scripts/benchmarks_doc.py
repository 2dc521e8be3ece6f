"""Regenerate the generated sections of docs/benchmarks.md from the records in
benchmarks/results/ (numbers in docs come from records, never typed by hand).

    .venv/bin/python scripts/benchmarks_doc.py

A generated section sits between `<!-- generated: NAME -->` and `<!-- end generated -->`;
NAME is a record in benchmarks/results/ (NAME.json); this script rewrites what is between.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS = ROOT / "benchmarks" / "results"


def channel_tickets_runtimes() -> str:
    rec = json.loads((RESULTS / "channel_tickets_runtimes.json").read_text())
    lines = [f"Command: `{rec['machine']['command']}` ({rec['machine']['cpu']}); the fastest-vs-fastest rows:", "",
             "| model | channel sparsity | batch | threads | dense runs in | compact runs in | ideal "
             "| speedup median (min-max) | realized / ideal | same-runtime speedup |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rec["runs"]:
        for row in r["results"]:
            if row["backend"] != "fastest":
                continue
            lines.append(f"| {r['model']} | {r['channel_sparsity']:.0%} | {row['batch_size']} | {row['threads']} "
                         f"| {row['dense_runtime']} | {row['compact_runtime']} | {r['ideal_speedup']:.2f}x "
                         f"| {row['speedup_median']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) "
                         f"| {row['realized_over_ideal']:.2f} | {row['same_runtime_speedup']:.2f}x |")
    return "\n".join(lines)


def dense_runtimes() -> str:
    rec = json.loads((RESULTS / "dense_runtimes.json").read_text())
    rts = rec["runtimes"]
    lines = [f"Command: `{rec['machine']['command']}` ({rec['machine']['cpu']}); median ms per call:", "",
             "| model | batch | threads | " + " | ".join(rts) + " | fastest | eager / fastest |",
             "|---|---|---|" + "---|" * len(rts) + "---|---|"]
    for r in rec["rows"]:
        cells = [f"{r['median_ms'][k]:.2f}" if k in r["median_ms"] else "failed" for k in rts]
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['threads']} | " + " | ".join(cells)
                     + f" | {r['fastest']} | {r['eager_over_fastest']:.2f}x |")
    return "\n".join(lines)


SECTIONS = {"channel_tickets_runtimes": channel_tickets_runtimes, "dense_runtimes": dense_runtimes}


def render(text: str) -> str:
    def sub(m):
        return f"{m.group(1)}\n{SECTIONS[m.group(2)]()}\n{m.group(3)}"
    return re.sub(r"(<!-- generated: (\w+) -->)\n(?:[^\n]*\n)*?(<!-- end generated -->)", sub, text, flags=re.S)


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
    print(f"written: {DOC}")
