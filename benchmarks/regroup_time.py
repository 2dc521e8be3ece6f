"""Time to regroup every prunable layer of VGG-16 and ResNet-18 (CIFAR shapes) at 80% sparsity,
with each partitioner, and what the blocks look like (density before refill, sparsity after).

    python benchmarks/regroup_time.py [--models vgg16,resnet18] [--sparsity 0.8] [--repeats 3]
        [--runs init:metis:element,init:metis:channel,init:kahypar:element,planted:metis:element,
                planted:kahypar:element] [--threads 2] [--render-only]

Mask sources:
- `init`: layer-wise magnitude pruning of the He-initialised zoo model (seed 0). Initial weights
  are i.i.d., so this is an unstructured random mask: the hard case for regroup (no blocks to
  find, most passes of the while loop) and the one the timing goal is about.
- `planted`: per layer, the same sparsity made of clamp(rows // 16, 1, 8) dense row groups on
  random column sets plus 1% noise: the case regroup is built for (blocks should come back
  exactly, block density 1.0).
Writes benchmarks/results/regroup_time.{json,md}.
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

import ticketsmith as ts
from _common import machine
from ticketsmith.masks import Masks, prunable_names
from ticketsmith.structure.partition import kahypar_available
from ticketsmith.structure.regroup import regroup, regroup_settings, regroup_stats

RESULTS = Path(__file__).resolve().parent / "results"


def init_masks(model: torch.nn.Module, sparsity: float) -> Masks:
    params = dict(model.named_parameters())
    out = {}
    for n in prunable_names(model):
        w = params[n].detach().abs().flatten()
        keep = int(math.floor((1 - sparsity) * w.numel() + 0.5))
        flat = torch.zeros(w.numel(), dtype=torch.bool)
        flat[torch.topk(w, keep).indices] = True
        out[n] = flat.view_as(params[n])
    return Masks(out)


def planted_masks(model: torch.nn.Module, sparsity: float, noise: float = 0.01) -> Masks:
    g = torch.Generator().manual_seed(0)
    params = dict(model.named_parameters())
    out = {}
    for n in prunable_names(model):
        shape = params[n].shape
        rows, cols = shape[0], params[n][0].numel()
        groups = max(1, min(8, rows // 16))
        width = max(1, round((1 - sparsity - noise) * cols))
        m = torch.rand(rows, cols, generator=g) < noise
        order = torch.randperm(rows, generator=g)
        for k in range(groups):
            r = order[k * rows // groups:(k + 1) * rows // groups]
            c = torch.randperm(cols, generator=g)[:width]
            m[r[:, None], c[None, :]] = True
        out[n] = m.view(shape)
    return Masks(out)


def run_one(masks: Masks, partitioner: str, granularity: str) -> tuple[Masks, dict]:
    """Regroup layer by layer (the same work as one regroup() call) to time each layer."""
    results, per_layer = {}, {}
    for name in masks.weight_names:
        t0 = time.perf_counter()
        r = regroup(masks, partitioner=partitioner, granularity=granularity, layers=[name])
        per_layer[name] = time.perf_counter() - t0
        results[name] = (r[name], r.blocks[name])
    out = masks.updated({k: v[0] for k, v in results.items()},
                        blocks={k: v[1] for k, v in results.items()})
    return out, per_layer


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="vgg16,resnet18")
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats of each metis run")
    ap.add_argument("--runs", default="init:metis:element,init:metis:channel,init:kahypar:element,"
                                      "planted:metis:element,planted:kahypar:element")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--render-only", action="store_true",
                    help="rewrite the .md from the existing .json (no measurement)")
    args = ap.parse_args()
    if args.render_only:
        data = json.loads((RESULTS / "regroup_time.json").read_text())
        write_md(data["machine"], data["runs"])
        return
    torch.set_num_threads(args.threads)
    runs = [tuple(r.split(":")) for r in args.runs.split(",")]
    records = []
    for model_name in args.models.split(","):
        torch.manual_seed(0)
        model = ts.models.create(model_name, 3, 10, (32, 32))
        sources = {"init": init_masks(model, args.sparsity),
                   "planted": planted_masks(model, args.sparsity)}
        for source, partitioner, granularity in runs:
            if partitioner == "kahypar" and not kahypar_available():
                print(f"skip {model_name} {source} kahypar: not installed", file=sys.stderr)
                continue
            masks = sources[source]
            repeats = args.repeats if partitioner == "metis" else 1
            totals, out, per_layer = [], None, None
            for _ in range(repeats):
                out, per_layer = run_one(masks, partitioner, granularity)
                totals.append(sum(per_layer.values()))
            stats = regroup_stats(out, masks)
            settings = regroup_settings(masks, granularity=granularity)
            area = sum(sum(r * c for r, c in s["shapes"]) for s in stats.values())
            inside = sum(s["source_kept"] * s["retained"] for s in stats.values())
            rec = {"model": model_name, "source": source, "partitioner": partitioner,
                   "granularity": granularity, "layers": len(stats),
                   "time_s_min": min(totals), "time_s_median": statistics.median(totals),
                   "time_s_all": totals, "blocks": sum(s["blocks"] for s in stats.values()),
                   "sparsity_in": masks.sparsity(), "sparsity_out": out.sparsity(),
                   "block_density": inside / area, "retained": inside / masks.nonzeros(),
                   "per_layer": {n: {"time_s": per_layer[n], **{k: v for k, v in stats[n].items()
                                                                if k != "shapes"},
                                     "shapes": stats[n]["shapes"], "settings": settings[n]}
                                 for n in stats}}
            records.append(rec)
            print(f"{model_name:9s} {source:8s} {partitioner:8s} {granularity:8s} "
                  f"time {rec['time_s_median']:7.2f}s (min {rec['time_s_min']:.2f})  "
                  f"blocks {rec['blocks']:4d}  sparsity {rec['sparsity_in']:.3f} -> "
                  f"{rec['sparsity_out']:.3f}  block density {rec['block_density']:.3f}  "
                  f"retained {rec['retained']:.3f}", flush=True)
    info = {**machine(), "load_average_at_end": open("/proc/loadavg").read().split()[:3]}
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "regroup_time.json").write_text(json.dumps({"machine": info, "args": vars(args),
                                                           "runs": records}, indent=1))
    write_md(info, records)


def write_md(info: dict, records: list[dict]) -> None:
    lines = ["# regroup_time: time to regroup every prunable layer", "",
             f"Command: `{info['command']}`  ", f"CPU: {info['cpu']}, torch {info['torch']}, "
             f"{info['threads']} threads; load average at the end: "
             f"{' '.join(info['load_average_at_end'])}.  ",
             "Taken on a shared, loaded machine (2 vCPUs, other jobs running): absolute times "
             "drift 30-50% or more; compare within one table only.", "",
             "Masks at the stated sparsity: `init` = layer-wise magnitude of the He-initialised "
             "model (i.i.d. weights: an unstructured random mask, the hard case); `planted` = "
             "dense row groups on random columns + 1% noise (the structured case). Block density "
             "= source nonzeros inside the blocks / block area (before refill); retained = "
             "fraction of the source nonzeros inside blocks. Defaults: t1=None (<= 8), "
             "width_ratio=1.5, t2 auto, b1=16, b2=16.", "",
             "| model | mask | partitioner | granularity | time (s), median [min] | blocks | "
             "sparsity in -> out | block density | retained |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        lines.append(f"| {r['model']} | {r['source']} | {r['partitioner']} | {r['granularity']} | "
                     f"{r['time_s_median']:.2f} [{r['time_s_min']:.2f}] | {r['blocks']} | "
                     f"{r['sparsity_in']:.3f} -> {r['sparsity_out']:.3f} | "
                     f"{r['block_density']:.3f} | {r['retained']:.3f} |")
    goal = [r for r in records if (r["model"], r["source"], r["partitioner"], r["granularity"])
            == ("vgg16", "init", "metis", "element")]
    if goal:
        t = goal[0]["time_s_median"]
        lines += ["", f"Goal (whole VGG-16 regrouped with metis on 2 cores in under 30 s): "
                      f"{'met' if t < 30 else 'NOT met'}, {t:.1f} s median on the random-like "
                      "`init` masks (regroup's tensor ops run on one thread; see partition.one_thread)."]
    lines += ["", "Per-layer times, blocks, shapes and the effective settings are in "
                  "regroup_time.json."]
    (RESULTS / "regroup_time.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
