"""Why 75% channel tickets at batch 1 realize less of the ideal at 2 threads than at 1: an
onnxruntime profile of the dense and the compact model (the channel tickets of
channel_tickets.py) at 1 and 2 intra-op threads, per operator kind.

For each model and thread count, onnxruntime's own profiler (`enable_profiling`) records every
node's duration over `--runs` calls after a warm-up; the table gives, per op kind, the number of
nodes, the mean microseconds per node per call, and the total per call, and the 1 -> 2 thread
scaling of each. OMP_WAIT_POLICY=PASSIVE, so onnxruntime's pool does not spin
(`ticketsmith.compact.onnx_export.session_options`).

    PYTHONPATH=src python benchmarks/thread_scaling_profile.py [--models vgg16,resnet18] [--sparsity 0.75]

Writes benchmarks/results/thread_scaling_profile.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as channel_tickets.py

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
from collections import defaultdict  # noqa: E402
from pathlib import Path  # noqa: E402

import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

from _common import machine  # noqa: E402
from channel_tickets import SHAPE, channel_ticket  # noqa: E402
from ticketsmith import compact as C  # noqa: E402
from ticketsmith.compact.onnx_export import session_options  # noqa: E402
from ticketsmith.io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def profile(path: Path, threads: int, x, runs: int, tmp: Path) -> dict:
    """Per op kind: nodes, microseconds per call (all nodes of that kind), from onnxruntime's
    profiler over `runs` calls (after as many unprofiled warm-up calls)."""
    opts = session_options(threads)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.enable_profiling = True
    opts.profile_file_prefix = str(tmp / f"{path.stem}-{threads}t")
    sess = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x}
    for _ in range(runs):  # warm-up (profiled too; dropped below by taking the last runs)
        sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    events = json.loads(Path(sess.end_profiling()).read_text())
    model_runs = [e for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    last = model_runs[-runs:]
    start = last[0]["ts"]
    per_kind = defaultdict(lambda: {"nodes": set(), "us": 0.0})
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= start:
            k = per_kind[e["args"]["op_name"]]
            k["nodes"].add(e["name"])
            k["us"] += e["dur"]
    return {"run_us": sum(e["dur"] for e in last) / runs,
            "ops": {op: {"nodes": len(v["nodes"]), "us_per_call": v["us"] / runs}
                    for op, v in sorted(per_kind.items(), key=lambda kv: -kv[1]["us"])}}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vgg16,resnet18")
    p.add_argument("--sparsity", type=float, default=0.75)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--out", default=str(RESULTS / "thread_scaling_profile"))
    args = p.parse_args()
    rec = {"machine": machine(), "sparsity": args.sparsity, "batch": args.batch, "runs": args.runs,
           "models": {}}
    x = torch.randn(args.batch, *SHAPE)
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        for name in args.models.split(","):
            model, small, masks, _ = channel_ticket(name, 1.0, args.sparsity)  # traces: autograd on
            masks.apply(model)
            out = {}
            for kind, m in (("dense", model), ("compact", small)):
                path = C.export_onnx(m, x, tmp / f"{name}-{kind}.onnx")
                out[kind] = {str(t): profile(path, t, x.numpy(), args.runs, tmp) for t in (1, 2)}
                print(name, kind, {t: round(v["run_us"]) for t, v in out[kind].items()}, flush=True)
            rec["models"][name] = out
    write_json(Path(args.out).with_suffix(".json"), rec)
    Path(args.out).with_suffix(".md").write_text(render(rec))
    print(f"wrote {args.out}.json and {args.out}.md")


def render(rec: dict) -> str:
    lines = [f"# Thread scaling of channel tickets at batch {rec['batch']}: onnxruntime profile",
             "", f"Command: `{rec['machine']['command']}`  ",
             f"CPU: {rec['machine']['cpu']}, {rec['runs']} profiled calls per figure, "
             f"OMP_WAIT_POLICY=PASSIVE (onnxruntime's pool does not spin). Channel tickets as "
             f"in channel_tickets.py ({rec['sparsity']:.0%} of the channels), full width, CIFAR shapes.", ""]
    for name, out in rec["models"].items():
        lines += [f"## {name}", "",
                  "| model | us per call, 1 thread | 2 threads | scaling 1 -> 2 |", "|---|---|---|---|"]
        for kind in ("dense", "compact"):
            a, b = out[kind]["1"]["run_us"], out[kind]["2"]["run_us"]
            lines.append(f"| {kind} | {a:.0f} | {b:.0f} | {a / b:.2f}x |")
        lines += ["", "| model | op | nodes | us per call, 1 thread | 2 threads | us per node, 1 thread "
                      "| 2 threads | scaling 1 -> 2 |", "|---|---|---|---|---|---|---|---|"]
        for kind in ("dense", "compact"):
            one, two = out[kind]["1"]["ops"], out[kind]["2"]["ops"]
            for op, v in list(one.items())[:6]:
                w = two.get(op, {"us_per_call": float("nan")})
                n = max(1, v["nodes"])
                lines.append(f"| {kind} | {op} | {v['nodes']} | {v['us_per_call']:.0f} | "
                             f"{w['us_per_call']:.0f} | {v['us_per_call'] / n:.1f} | "
                             f"{w['us_per_call'] / n:.1f} | {v['us_per_call'] / w['us_per_call']:.2f}x |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
