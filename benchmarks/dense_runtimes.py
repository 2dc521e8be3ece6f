"""The fastest dense model of any runtime: dense VGG-16 and ResNet-18 (full width, CIFAR shapes
3x32x32, 10 classes) deployed in every runtime (`ts.deploy`: eager in its faster memory format,
torch.compile / inductor, ONNX Runtime, OpenVINO; BatchNorm folded), timed round-robin
(`ts.deploy.time_interleaved`: A B C D A B C D ..., medians), per batch size and thread count.

    python benchmarks/dense_runtimes.py [--models vgg16,resnet18] [--batch-sizes 1,64]
        [--threads 1,2] [--rounds 9] [--runtimes all] [--out PATH]

It says which runtime a user who wants the fastest dense model would pick; `bench` compares a
ticket against that one. Writes benchmarks/results/dense_runtimes.{json,md} (or --out).
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

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = (3, 32, 32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vgg16,resnet18")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--runtimes", default="all")
    p.add_argument("--out", default=str(RESULTS / "dense_runtimes"))
    a = p.parse_args()
    runtimes = ts.deploy.available_runtimes() if a.runtimes == "all" else a.runtimes.split(",")
    rows = []
    for name in a.models.split(","):
        torch.manual_seed(0)
        model = ts.models.create(name, in_channels=SHAPE[0], num_classes=10, image_size=SHAPE[1:]).eval()
        for t in (int(v) for v in a.threads.split(",")):
            torch.set_num_threads(t)
            for b in (int(v) for v in a.batch_sizes.split(",")):
                x = torch.randn(b, *SHAPE)
                deps, failed = {}, {}
                for rt in runtimes:
                    try:
                        deps[rt] = ts.deploy(model, x[:2], rt, threads=t, batch_size=b)
                    except ts.TicketsmithError as e:
                        failed[rt] = str(e)
                med = ts.deploy.time_interleaved({rt: (lambda d=d: d.run(x)) for rt, d in deps.items()},
                                                 rounds=a.rounds)
                best = min(med, key=med.get)
                eager = med.get("torch")
                rows.append({"model": name, "batch_size": b, "threads": t, "fastest": best,
                             "median_ms": {k: v * 1e3 for k, v in med.items()}, "failed": failed,
                             "eager_over_fastest": eager / med[best] if eager else None})
                print(f"{name} batch {b} threads {t}: " + ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in med.items())
                      + f" -> {best}", flush=True)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "runtimes": runtimes, "rows": rows}, indent=1))
    out.with_suffix(".md").write_text(render(machine(), runtimes, rows))


def render(m: dict, runtimes: list[str], rows: list[dict]) -> str:
    lines = ["# The fastest dense model of any runtime", "",
             f"Machine: {m['cpu']}, torch {m['torch']}, OMP_WAIT_POLICY={m.get('omp_wait_policy')}. "
             f"Command: `{m['command']}`", "",
             "Median ms per call, the runtimes timed round-robin; eager / fastest = how much faster "
             "the fastest runtime is than eager PyTorch (in its faster memory format, BatchNorm folded).", "",
             "| model | batch | threads | " + " | ".join(f"{r} ms" for r in runtimes) + " | fastest | eager / fastest |",
             "|---|---|---|" + "---|" * len(runtimes) + "---|---|"]
    for r in rows:
        cells = [f"{r['median_ms'][rt]:.3f}" if rt in r["median_ms"] else "failed" for rt in runtimes]
        ratio = f"{r['eager_over_fastest']:.2f}x" if r["eager_over_fastest"] else "-"
        lines.append(f"| {r['model']} | {r['batch_size']} | {r['threads']} | " + " | ".join(cells)
                     + f" | {r['fastest']} | {ratio} |")
    fails = {(r["model"], k): v for r in rows for k, v in r["failed"].items()}
    lines += [f"- {m_} {k}: {v}" for (m_, k), v in sorted(fails.items())]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
