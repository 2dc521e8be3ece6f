"""int8 on top of structure, on a real ticket: accuracy and speed of a compact IMP ticket in fp32
and int8 (static quantization, QDQ, per-channel int8 weights, calibrated on real training
images), against the fastest dense fp32 model of any runtime.

    python benchmarks/int8_ticket.py [--run results/protocol/runs/vgg-e30-imp-s0] [--rounds 1,5]
        [--batch-sizes 1,64] [--calibration-size 256] [--rounds-timed 15] [--out PATH]

For each round: `ts.compact` the ticket (effective sparsity from `ts.compact.effective`), deploy it
in ONNX Runtime fp32 and int8 and in OpenVINO int8 (the same QDQ model), measure the top-1
accuracy of each on the dataset's whole test split, and time them, with the dense (round 0)
model in eager PyTorch, ONNX Runtime and OpenVINO (fp32; the fastest of those is the baseline),
all at 1 thread, round-robin (A B C ... A B C ...); a speedup is the median over rounds of the
per-round ratio of times (paired: the two calls ran moments apart). Writes
benchmarks/results/int8_ticket.{json,md} (or --out).
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads libgomp

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

import ticketsmith as ts  # noqa: E402
from ticketsmith.deploy import interleaved_times  # noqa: E402
from _common import machine  # noqa: E402
from ticketsmith.masks import Masks  # noqa: E402
from ticketsmith.runs import Run, RunConfig, round_dir  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DENSE_RUNTIMES = ("torch", "onnxruntime", "openvino")  # torch.compile: a compile per shape, never fastest here


def interleaved(calls: dict, rounds: int, burst_s: float = 0.05) -> dict[str, list[float]]:
    """Seconds per call of each candidate in each round-robin round (the project's timing)."""
    return interleaved_times(calls, rounds, burst_s)


def ratio(times: dict[str, list[float]], slow: str, fast: str) -> dict:
    """time(slow) / time(fast) per round: median, min, max (> 1: `fast` is faster)."""
    r = [a / b for a, b in zip(times[slow], times[fast])]
    return {"median": statistics.median(r), "min": min(r), "max": max(r)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", default="results/protocol/runs/vgg-e30-imp-s0")
    p.add_argument("--rounds", default="1,5", help="IMP rounds of the run (comma-separated)")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--calibration-size", type=int, default=256)
    p.add_argument("--rounds-timed", type=int, default=15, help="round-robin timing rounds")
    p.add_argument("--out", default=str(RESULTS / "int8_ticket"))
    a = p.parse_args()
    torch.set_num_threads(1)
    threads = 1
    run_dir = Path(a.run)
    run = Run(RunConfig.read(run_dir), run_dir, progress=False)
    ds = run.ds
    example = run.structure_batch(2)[0]
    calibration = ts.deploy.calibration_images(ds, a.calibration_size)
    test_x = ds.normalize(ds.test.x)
    dense = run.trained(round_dir(run_dir, 0)).eval()
    batch_sizes = [int(b) for b in a.batch_sizes.split(",")]
    dense_deps = {rt: ts.deploy(dense, example, rt, threads=threads, batch_size=max(batch_sizes))
                  for rt in DENSE_RUNTIMES if ts.deploy.available(rt) is None}
    rows = []
    for r in (int(v) for v in a.rounds.split(",")):
        d = round_dir(run_dir, r)
        masks = Masks.load(d / "masks.safetensors")
        ticket = run.trained(d).eval()
        eff = ts.compact.effective(ticket, masks, example)
        small = ts.compact.compact(ticket, masks, example).eval()
        deps = {"fp32 onnxruntime": ts.deploy(small, example, "onnxruntime", threads=threads),
                "int8 onnxruntime": ts.deploy(small, example, "onnxruntime", threads=threads,
                                              precision="int8", calibration=calibration)}
        if ts.deploy.available("openvino") is None:
            deps["int8 openvino"] = ts.deploy(small, example, "openvino", threads=threads,
                                              precision="int8", calibration=calibration)
        acc = {k: ts.deploy.accuracy(dep, ds) for k, dep in deps.items()}
        row = {"round": r, "mask_sparsity": eff["sparsity"], "effective_sparsity": eff["effective_sparsity"],
               "params": eff["params"], "compact_params": eff["compact_params"],
               "accuracy": acc, "drop_points": {k: 100 * (acc["fp32 onnxruntime"] - v) for k, v in acc.items()},
               "check": {k: {"rel_err": dep.check_rel_err, "argmax_agreement": dep.details.get("check_argmax_agreement")}
                         for k, dep in deps.items()},
               "int8": deps["int8 onnxruntime"].details["int8"], "speed": []}
        row["int8"].pop("onnx", None)
        print(f"round {r}: sparsity {eff['sparsity']:.1%} (effective {eff['effective_sparsity']:.1%}); "
              + ", ".join(f"{k} {100 * v:.2f}%" for k, v in acc.items()), flush=True)
        for b in batch_sizes:
            x = test_x[torch.arange(b) % len(test_x)]  # real inputs
            calls = {f"dense {rt}": (lambda dep=dep: dep.run(x)) for rt, dep in dense_deps.items()}
            calls.update({k: (lambda dep=dep: dep.run(x)) for k, dep in deps.items()})
            times = interleaved(calls, a.rounds_timed)
            med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
            fastest_dense = min((k for k in med if k.startswith("dense ")), key=med.get)
            s = {"batch_size": b, "threads": threads, "median_ms": med, "fastest_dense": fastest_dense[6:],
                 "int8_vs_fp32": {k: ratio(times, "fp32 onnxruntime", k) for k in deps if k.startswith("int8")},
                 "vs_fastest_dense": {k: ratio(times, fastest_dense, k) for k in deps}}
            row["speed"].append(s)
            print(f"  batch {b}: " + ", ".join(f"{k} {v:.3f} ms" for k, v in med.items()), flush=True)
        rows.append(row)
    record = {"machine": machine(), "run": str(run_dir), "model": f"{run.cfg.model} x{run.cfg.width}",
              "dataset": ds.name, "test_examples": len(ds.test), "calibration_size": a.calibration_size,
              "rounds_timed": a.rounds_timed, "rows": rows}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text(render(record))
    print(render(record))


def table(record: dict) -> str:
    """The Markdown table of a record (pasted as is into docs/benchmarks.md)."""
    lines = ["| round | mask sparsity | effective | batch | fp32 ORT: acc, ms | int8 ORT: acc (change), ms, speedup vs fp32 ORT "
             "| int8 OpenVINO: acc (change), ms, speedup vs fp32 ORT | fastest dense fp32: runtime, ms "
             "| best int8 vs fastest dense |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(row, s, k):
        if k not in s["median_ms"]:
            return "-"
        rr = s["int8_vs_fp32"][k]
        return (f"{100 * row['accuracy'][k]:.2f}% ({-row['drop_points'][k]:+.2f}), {s['median_ms'][k]:.2f}, "
                f"{rr['median']:.2f}x ({rr['min']:.2f}-{rr['max']:.2f})")
    for row in record["rows"]:
        for s in row["speed"]:
            int8s = [k for k in s["int8_vs_fp32"]]
            best = min(int8s, key=lambda k: s["median_ms"][k])
            vd = s["vs_fastest_dense"][best]
            lines.append(f"| {row['round']} | {row['mask_sparsity']:.1%} | {row['effective_sparsity']:.1%} | "
                         f"{s['batch_size']} | {100 * row['accuracy']['fp32 onnxruntime']:.2f}%, "
                         f"{s['median_ms']['fp32 onnxruntime']:.2f} | {cell(row, s, 'int8 onnxruntime')} | "
                         f"{cell(row, s, 'int8 openvino')} | {s['fastest_dense']}, "
                         f"{s['median_ms']['dense ' + s['fastest_dense']]:.2f} | "
                         f"{vd['median']:.2f}x ({best.split()[1]}) |")
    return "\n".join(lines)


def render(record: dict) -> str:
    m = record["machine"]
    return "\n".join([
        "# int8 on top of structure: a real ticket's accuracy and speed", "",
        f"Machine: {m['cpu']}, torch {m['torch']}, OMP_WAIT_POLICY={m.get('omp_wait_policy')}, 1 thread; "
        "shared with a running training job (`ticketsmith run`, 1-2 cores busy), so absolute times are "
        "noisy; the ratios are paired per round. "
        f"Command: `{m['command']}`", "",
        f"Ticket: {record['model']} on {record['dataset']} ({record['run']}); int8 = ONNX Runtime "
        "`quantize_static`, QDQ, int8 weights per channel, uint8 activations, MinMax ranges from "
        f"{record['calibration_size']} training images; accuracy on all {record['test_examples']} test "
        "images (change in points against the fp32 compact model); ms = median per call over "
        f"{record['rounds_timed']} round-robin rounds; speedup = median (min-max) of the per-round "
        "time ratios. The fp32 compact model in ONNX Runtime equals the masked ticket to 1e-4.", "",
        table(record), ""])


if __name__ == "__main__":
    main()
