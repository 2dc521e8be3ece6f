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


def fastest_rows(name: str) -> str:
    """The fastest-vs-fastest rows of a benchmarks/channel_tickets.py record."""
    rec = json.loads((RESULTS / f"{name}.json").read_text())
    m = rec["machine"]
    lines = [f"Command: `{m['command']}` ({m['cpu']}, torch {m['torch']}); the fastest-vs-fastest rows:", "",
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


def int8_ticket() -> str:
    """The table benchmarks/int8_ticket.py writes (its own `table`, one rendering)."""
    import importlib.util
    import sys
    if str(ROOT / "benchmarks") not in sys.path:  # the script imports its neighbour _common
        sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("int8_ticket", ROOT / "benchmarks" / "int8_ticket.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    rec = json.loads((RESULTS / "int8_ticket.json").read_text())
    return f"Command: `{rec['machine']['command']}` ({rec['machine']['cpu']}):\n\n" + script.table(rec)


def absorbed_conv() -> str:
    rec = json.loads((RESULTS / "absorbed_conv.json").read_text())
    lines = [f"Command: `{rec['command']}` ({rec['cpu']}); {rec['layer']}, batch {rec['batch']}, "
             f"{rec['blocks']} blocks, against the fastest dense conv of the candidates probed:", "",
             "| threads | baseline (fastest dense) | variant | speedup median (min-max) | realized / ideal |",
             "|---|---|---|---|---|"]
    for threads, run in sorted(rec["runs"].items()):
        layer = run["layer"]
        for name, k in layer["kernels"].items():
            lines.append(f"| {threads} | {layer['baseline']} | {name} | {k['ratio_median']:.2f}x "
                         f"({k['ratio_min']:.2f}-{k['ratio_max']:.2f}) | {k['realized_over_ideal']:.2f} |")
    return "\n".join(lines)


def condensed_mlp() -> str:
    rec = json.loads((RESULTS / "condensed_mlp.json").read_text())
    dims = " -> ".join(map(str, rec["dims"]))
    lines = [f"Command: `{rec['command']}` ({rec['cpu']}); MLP {dims}, {rec['sparsity']:.0%} constant "
             f"fan-in, ideal {rec['ideal_speedup']:.1f}x; per batch and threads the fastest dense "
             "(the baseline), the fastest unstructured-sparse product and the condensed variants:", "",
             "| threads | batch | baseline (fastest dense) | variant | ms | speedup median (min-max) "
             "| realized / ideal |",
             "|---|---|---|---|---|---|---|"]
    for run in rec["runs"]:
        v = run["variants"]
        sparse = [k for k in v if v[k]["kind"] == "unstructured sparse"]
        best_sparse = min(sparse, key=lambda k: v[k]["median_ms"]) if sparse else None
        shown = [k for k in v if v[k]["kind"] == "condensed" or k == best_sparse]
        for k in sorted(shown, key=lambda k: v[k]["median_ms"]):
            lines.append(f"| {run['threads']} | {run['batch']} | {run['baseline']} "
                         f"({v[run['baseline']]['median_ms']:.2f} ms) | {k} | {v[k]['median_ms']:.2f} "
                         f"| {v[k]['speedup']:.2f}x ({v[k]['speedup_min']:.2f}-{v[k]['speedup_max']:.2f}) "
                         f"| {v[k]['realized_over_ideal']:.2f} |")
    return "\n".join(lines)


SECTIONS = {"channel_tickets_runtimes": lambda: fastest_rows("channel_tickets_runtimes"),
            "vit_heads": lambda: fastest_rows("vit_heads"),
            "grouped_tickets": lambda: fastest_rows("grouped_tickets"),
            "zoo_tickets": lambda: fastest_rows("zoo_tickets"),
            "zoo_transformer_tickets": lambda: fastest_rows("zoo_transformer_tickets"),
            "zoo_levit_tickets": lambda: fastest_rows("zoo_levit_tickets"),
            "zoo_split_tickets": lambda: fastest_rows("zoo_split_tickets"),
            "zoo_constant_tickets": lambda: fastest_rows("zoo_constant_tickets"),
            "zoo_frozen_tickets": lambda: fastest_rows("zoo_frozen_tickets"),
            "zoo_group_norm_tickets": lambda: fastest_rows("zoo_group_norm_tickets"),
            "zoo_stream_tickets": lambda: fastest_rows("zoo_stream_tickets"),
            "zoo_swin_stream_tickets": lambda: fastest_rows("zoo_swin_stream_tickets"),
            "zoo_vit_stream_tickets": lambda: fastest_rows("zoo_vit_stream_tickets"),
            "dense_runtimes": dense_runtimes,
            "int8_ticket": int8_ticket, "absorbed_conv": absorbed_conv, "condensed_mlp": condensed_mlp}


def render(text: str) -> str:
    def sub(m):
        return f"{m.group(1)}\n{SECTIONS[m.group(2)]()}\n{m.group(3)}"
    return re.sub(r"(<!-- generated: (\w+) -->)\n(?:[^\n]*\n)*?(<!-- end generated -->)", sub, text, flags=re.S)


if __name__ == "__main__":
    DOC.write_text(render(DOC.read_text()))
    print(f"written: {DOC}")
