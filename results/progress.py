"""How far the pre-registered protocol is (results/PROTOCOL.md, "Arms"): per arm and seed, the
rounds finished out of those registered, and the training left, from the run directories in
results/protocol/runs/. Writes results/protocol/progress.md; regenerate it with

    .venv/bin/python results/progress.py          (results/protocol.sh report runs it)

Epochs left count every registered round not finished (a round in progress by the epochs its
metrics.jsonl holds); time left uses the median seconds per epoch the finished rounds of that
network recorded (round.json, one thread a lane). A last table gives, per network, the seconds
per epoch and the training time its finished rounds recorded.
"""
from __future__ import annotations

import json
import statistics
from pathlib import Path

ROOT = Path(__file__).resolve().parent
RUNS = ROOT / "protocol" / "runs"
OUT = ROOT / "protocol" / "progress.md"
EPOCHS = {"vgg": 30, "resnet": 30, "mlp": 30}  # the budgets (PROTOCOL.md; results/protocol.sh)

# arm, network, run directory ("{s}": the seed), seeds, registered rounds (inclusive); a chained
# arm adopts round 0 from its IMP chain, so its first trained round is 1
ARMS = [
    ("V-IMP", "vgg", "vgg-e30-imp-s{s}", (0, 1, 2), (0, 5)),
    ("V-Refill", "vgg", "vgg-e30-refill-s{s}", (0, 1, 2), (1, 2)),
    ("V-Regroup", "vgg", "vgg-e30-regroup-s{s}", (0, 1, 2), (1, 5)),
    ("V-Refill-reinit", "vgg", "vgg-e30-refill-reinit-s{s}", (0, 1), (1, 2)),
    ("V-Regroup-reinit", "vgg", "vgg-e30-regroup-reinit-s{s}", (0, 1), (1, 5)),
    ("V-Regroup-null", "vgg", "vgg-e30-regroup-null-s{s}", (0, 1), (1, 5)),
    ("V-GAIMP", "vgg", "vgg-e30-gaimp-s{s}", (0, 1), (0, 5)),
    ("R-IMP", "resnet", "resnet-e30-imp-s{s}", (0, 1), (0, 3)),
    *[(f"R-Refill-{c}", "resnet", f"resnet-e30-refill-{c}-s{{s}}", (0, 1), (1, 3))
      for c in ("none", "shared", "union")],
    *[(f"M {m}", "mlp", f"mlp-{m}-s{{s}}", (0, 1, 2), (0, 0))  # shown as one row: M
      for m in ["dense"] + [f"{k}-{p}" for p in ("0.9", "0.95", "0.98", "0.99")
                            for k in ("rigl", "srigl", "srigl-noabl")]],
]


def state(run: Path, first: int, last: int, epochs: int) -> tuple[list[int], int]:
    """Finished rounds among first..last, and the epochs left to train."""
    done, left = [], 0
    for r in range(first, last + 1):
        d = run / f"round_{r:02d}"
        if (d / "round.json").exists():
            done.append(r)
            continue
        m = d / "metrics.jsonl"
        trained = len(m.read_text().splitlines()) if m.exists() else 0
        left += max(epochs - trained, 0)
    return done, left


def speeds(net: str) -> list[dict]:
    """The round.json of every finished round of `net`, each trained round once: a chained arm's
    round 0 is a byte-identical copy of its chain's, counted once (as the report's dense runs)."""
    seen, out = set(), []
    for f in sorted(RUNS.glob(f"{net}-*/round_*/round.json")):
        raw = f.read_bytes()
        if raw not in seen:
            seen.add(raw)
            out.append(json.loads(raw))
    return [r for r in out if r.get("seconds_per_epoch")]


def speed_table(recorded: dict[str, list[dict]]) -> list[str]:
    """Seconds per epoch and training time recorded, per network, over its trained rounds."""
    rows = ["## Seconds per epoch (from each finished round's round.json)", "",
            "| network | trained rounds | s / epoch, median (min - max) | threads | CPU | training recorded |",
            "|---|---|---|---|---|---|"]
    for net, rs in recorded.items():
        if not rs:
            continue
        spe = [r["seconds_per_epoch"] for r in rs]
        threads = sorted({str(r.get("machine", {}).get("threads", "?")) for r in rs})
        cpus = sorted({r.get("machine", {}).get("cpu", "?") for r in rs})
        hours = sum(r.get("train_seconds") or 0 for r in rs) / 3600
        rows.append(f"| {net} | {len(rs)} | {statistics.median(spe):.1f} ({min(spe):.1f} - {max(spe):.1f}) "
                    f"| {', '.join(threads)} | {', '.join(cpus)} | {hours:.1f} lane-hours |")
    return rows + ["", "Most epochs ran beside a second lane (two one-thread lanes on two cores), "
                   "some beside a test run; that load, not the model, makes most of the spread.", ""]


def main() -> None:
    rows, total, mlp = [], {}, [0, 0, 0]
    chains = 0  # unfinished (arm, seed) runs: a run's rounds are sequential, so one lane each
    for arm, net, pattern, seeds, (first, last) in ARMS:
        per_seed, left = [], 0
        for s in seeds:
            done, e = state(RUNS / pattern.format(s=s), first, last, EPOCHS[net])
            left += e
            chains += e > 0
            per_seed.append(f"s{s}: {len(done)}/{last - first + 1}")
            if net == "mlp":
                mlp[0] += len(done)
                mlp[1] += last - first + 1
        total[net] = total.get(net, 0) + left
        if net == "mlp":
            mlp[2] += left
            continue
        status = "done" if left == 0 else f"{left} epochs left"
        rows.append(f"| {arm} | {', '.join(per_seed)} | {status} |")
    rows.append(f"| M (dense, RigL, SRigL, SRigL without ablation; 3 seeds) | {mlp[0]}/{mlp[1]} runs "
                f"| {'done' if mlp[2] == 0 else f'{mlp[2]} epochs left'} |")
    lines = ["# How far the protocol is", "",
             "Generated by `results/progress.py` from `results/protocol/runs/`; never edit by hand. "
             "Rounds finished out of those registered (PROTOCOL.md, \"Arms\"), per seed. The "
             "full-width GPU arm (`results/protocol.sh gpu`) needs a lent GPU and is not counted.",
             "", "| arm | rounds finished per seed | left |", "|---|---|---|", *rows, ""]
    hours = 0.0
    recorded = {net: speeds(net) for net in EPOCHS}  # read once: time left and the speed table
    for net, left in total.items():
        if left == 0:
            continue
        if not recorded[net]:
            lines.append(f"- {net}: {left} epochs left (no finished round records its speed yet)")
            continue
        spe = statistics.median(r["seconds_per_epoch"] for r in recorded[net])
        h = left * spe / 3600
        hours += h
        lines.append(f"- {net}: {left} epochs left x {spe:.0f} s per epoch (median of its "
                     f"finished rounds) = {h:.1f} lane-hours")
    lanes = min(2, chains)
    if lanes:
        lines += [f"- in all: about {hours:.1f} lane-hours, so about {hours / lanes:.1f} hours of wall "
                  f"time with {lanes} lane{'s' * (lanes > 1)} ({chains} unfinished run"
                  f"{'s' * (chains > 1)}; a run's rounds follow each other; most recorded epochs "
                  "ran beside another lane: about 105-115 s for VGG, against about 71 s alone)", ""]
    lines += speed_table(recorded)
    OUT.write_text("\n".join(lines))
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
