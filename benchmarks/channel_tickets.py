"""Channel tickets of VGG-16 and ResNet-18 (full width, CIFAR shapes 3x32x32, 10 classes) at 50%
and 75% channel sparsity, batch 1 and 64: the compact model (channel surgery) against the fastest
dense path, end to end and layer by layer.

    python benchmarks/channel_tickets.py [--models vgg16,resnet18] [--sparsities 0.5,0.75]
        [--batch-sizes 1,64] [--pairs 15] [--threads 2] [--width 1.0]

The channel masks are what Refill makes of a layer-wise uniform mask at sparsity s (random, seed 0;
refill then keeps the channels with the largest L1 of He-initialised weights, coupled=True), so
every prunable layer but the head keeps k = ceil((1 - s) * c_out) whole output channels and
residual-coupled channels are chosen together. Channel surgery then also drops the matching
input channels of the next layer: the ideal speedup is about 1 / (1 - s)^2.
Timing: `ticketsmith.bench.compare` (paired, interleaved A B A B; medians of per-pair ratios; the
dense side in its faster memory format). OMP_WAIT_POLICY defaults to PASSIVE (see
docs/benchmarks.md). Writes benchmarks/results/channel_tickets.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads libgomp

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import ticketsmith as ts  # noqa: E402
from _common import machine  # noqa: E402
from ticketsmith.bench import compare  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (3, 32, 32)


def channel_ticket(name: str, width: float, sparsity: float):
    torch.manual_seed(0)
    model = ts.models.create(name, in_channels=SHAPE[0], num_classes=10, image_size=SHAPE[1:],
                             width=width).eval()
    x = torch.randn(1, *SHAPE)
    masks = ts.refill(model, ts.prune.random_masks(model, sparsity), coupling="shared", example_inputs=x)
    return model, ts.compact(model, masks, x), masks


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vgg16,resnet18")
    p.add_argument("--sparsities", default="0.5,0.75")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--out", default=str(RESULTS / "channel_tickets"))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    batches = [int(b) for b in a.batch_sizes.split(",")]
    runs = []
    for name in a.models.split(","):
        for s in (float(v) for v in a.sparsities.split(",")):
            dense, small, masks = channel_ticket(name, a.width, s)
            print(f"{name} at {s:.0%} channel sparsity", flush=True)
            r = compare(dense, small, lambda b: torch.randn(b, *SHAPE), batch_sizes=batches,
                        pairs=a.pairs, progress=lambda msg: print("  " + msg, flush=True))
            r.update(model=name, width=a.width, channel_sparsity=s,
                     weight_sparsity=1 - r["compact"]["params"] / r["dense"]["params"])
            for row in r["results"]:
                print(f"  batch {row['batch_size']}: {row['speedup_median']:.2f}x "
                      f"(ideal {r['ideal_speedup']:.2f}x, realized/ideal "
                      f"{row['realized_over_ideal']:.2f})", flush=True)
            runs.append(r)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1))
    out.with_suffix(".md").write_text(render(runs))


def render(runs: list[dict]) -> str:
    m = runs[0]["machine"]
    lines = ["# Channel tickets: compact model vs the fastest dense path", "",
             f"Machine: {m['cpu']}, torch {m['torch']}, {m['threads']} threads, OMP_WAIT_POLICY="
             f"{m.get('omp_wait_policy')}. Command: `{m['command']}`", "",
             "Goal (issue 4): realized / ideal >= 0.85 at batch 64 and >= 0.7 at batch 1.", "",
             "| model | channel sparsity | parameters removed | batch | dense format | ideal | "
             "speedup median (min-max) | realized / ideal | time saving |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for row in r["results"]:
            lines.append(
                f"| {r['model']} | {r['channel_sparsity']:.0%} | {r['weight_sparsity']:.1%} | "
                f"{row['batch_size']} | {row['dense_format']} | {r['ideal_speedup']:.2f}x | "
                f"{row['speedup_median']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) | "
                f"{row['realized_over_ideal']:.2f} | {row['time_saving']:.1%} |")
    lines += ["", "## Layer-wise (paper Fig. 7, for VGG-16 and ResNet-18)", "",
              "| model | channel sparsity | layer | batch | ideal | speedup median (min-max) |",
              "|---|---|---|---|---|---|"]
    for r in runs:
        for row in r["layers"]:
            lines.append(f"| {r['model']} | {r['channel_sparsity']:.0%} | {row['layer']} | "
                         f"{row['batch_size']} | {row['ideal_speedup']:.2f}x | "
                         f"{row['speedup_median']:.2f}x ({row['speedup_min']:.2f}-"
                         f"{row['speedup_max']:.2f}) |")
    lines += ["", "Speedups are medians of paired, interleaved time ratios (dense / compact)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
