"""A 4-layer MLP of condensed constant fan-in layers (SRigL) against the dense MLP in every
runtime and against unstructured-sparse products, at batch 1 and 256.

The MLP: 768 -> 3072 -> 768 -> 3072 -> 768 with ReLU between (two ViT-B/16 MLP blocks without
the residual; every layer 2.36M weights, the size of the SRigL paper's 3072 -> 768 layer), 90%
sparse with the same fan-in in every row (random masks). Every variant computes the masked dense
MLP and is checked against it (relative error < 1e-4) before it is timed:

- dense: `ts.deploy` of the masked MLP in each runtime (torch eager = F.linear / MKL,
  torch.compile, onnxruntime, openvino), and eager oneDNN linear with packed weights and the
  ReLU fused (`torch.ops.mkldnn._linear_pointwise`);
- condensed: `ts.compact(..., batch_size=B)` run eagerly (its kernels: int32 CSR at batch 1,
  embedding_bag at 256, where each 64-column tile of x^T goes through all four layers before
  the next: `CondensedSequential`), its layers one by one in a plain nn.Sequential (each hands
  its output to the next transposed), the same with that hand-off switched off too (each layer
  transposes in and out, as before issue 15), `ts.deploy(..., runtime="torch.compile")` of the
  compact model, and the gather form `(values * x[..., indices]).sum(-1)` of all four layers
  compiled as one inductor graph with int16 indices (the route of the SRigL authors);
- unstructured sparse: torch sparse CSR (int32 indices, MKL) and scipy.sparse CSR, one product
  per layer (scipy runs single-threaded).

Speedup = median over rounds of time(fastest dense variant) / time(variant), rounds interleaved
by `ts.deploy.interleaved_times` (each a burst of about 20 ms), [min, max]; ideal = dense MACs /
condensed MACs. `--profile` adds torch.profiler's op breakdown of the condensed variants.

    PYTHONPATH=src python benchmarks/condensed_mlp.py [--pairs 15] [--threads 1,2] [--batches 1,256] [--profile]

(OMP_WAIT_POLICY defaults to PASSIVE here, as in condensed_linear.py.) Writes
benchmarks/results/condensed_mlp.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see condensed_linear.py

import argparse  # noqa: E402
import copy
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import ticketsmith as ts
from _common import machine
from condensed_linear import constant_fan_in_mask
from ticketsmith.compact.condensed import CondensedLinear
from ticketsmith.deploy import RuntimeUnavailable, available, interleaved_times
from ticketsmith.io import write_json

RESULTS = Path(__file__).resolve().parent / "results"
TOLERANCE = 1e-4


def build_mlp(dims: list[int], sparsity: float, seed: int) -> tuple[nn.Sequential, dict, nn.Sequential]:
    """(the MLP, its constant fan-in masks, the masked MLP: the function every variant computes)."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    mods: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(dims, dims[1:])):
        mods += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(dims) - 2 else [])
    model = nn.Sequential(*mods).eval()
    masks = {f"{i}.weight": constant_fan_in_mask(m.out_features, m.in_features, 1 - sparsity, g)
             for i, m in enumerate(model) if isinstance(m, nn.Linear)}
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for key, mk in masks.items():
            masked.get_submodule(key.split(".")[0]).weight.mul_(mk)
    return model, masks, masked


def linears(model: nn.Module) -> list[nn.Module]:
    return [m for m in model if isinstance(m, (nn.Linear, CondensedLinear))]


# -- variants written here ----------------------------------------------------------------------
def onednn_packed(masked: nn.Sequential):
    layers = linears(masked)
    packed = [(m.weight.detach().to_mkldnn(), m.bias.detach()) for m in layers]
    last = len(packed) - 1

    def run(x):
        for i, (w, b) in enumerate(packed):
            x = torch.ops.mkldnn._linear_pointwise(x, w, b, "relu" if i < last else "none", [], "")
        return x
    return run


def compiled_gather(small: nn.Sequential):
    """All layers' gather form as one inductor graph, int16 indices (widened inside the graph:
    indexing takes int32 / int64 only); returns (run, compile seconds after the first call)."""
    params = [(m.values.detach(), m.indices.to(torch.int16), m.bias.detach()) for m in linears(small)]
    assert all(m._all_rows for m in linears(small)) and max(m.in_features for m in linears(small)) < 2 ** 15
    last = len(params) - 1

    def mlp(x, params):
        for i, (v, idx, b) in enumerate(params):
            x = (v * x[..., idx.int()]).sum(-1) + b
            if i < last:
                x = torch.relu(x)
        return x
    fn = torch.compile(mlp, dynamic=False)
    return lambda x: fn(x, params)


def csr_layers(masked: nn.Sequential):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        ws = [(m.weight.detach().to_sparse_csr(), m.bias.detach()) for m in linears(masked)]
        ws = [(torch.sparse_csr_tensor(w.crow_indices().int(), w.col_indices().int(), w.values(), w.shape), b)
              for w, b in ws]
    last = len(ws) - 1

    def run(x):
        for i, (w, b) in enumerate(ws):
            x = torch.mv(w, x[0]).unsqueeze(0) if x.shape[0] == 1 else (w @ x.t()).t()
            x = x + b
            if i < last:
                x = torch.relu(x)
        return x
    return run


def scipy_layers(masked: nn.Sequential):
    import numpy as np
    from scipy import sparse
    ws = [(sparse.csr_matrix(m.weight.detach().numpy()), m.bias.detach().numpy()) for m in linears(masked)]
    last = len(ws) - 1

    def run(x):
        h = x.numpy().T  # [in, N]: one product per layer, W @ x^T
        for i, (w, b) in enumerate(ws):
            h = w @ h + b[:, None]
            if i < last:
                np.maximum(h, 0, out=h)
        return torch.from_numpy(np.ascontiguousarray(h.T))
    return run


# -- the measurement --------------------------------------------------------------------------------
def variants(args, model, masks, masked, batch: int, threads: int, setup: dict) -> dict:
    """name -> (kind, callable taking x); what could not be built is recorded in `setup`."""
    x = torch.randn(batch, args.dims[0])
    out: dict = {}

    def deployed(kind, name, m, runtime):
        reason = available(runtime)
        if reason:
            setup[name] = {"unavailable": reason}
            return
        t0 = time.perf_counter()
        try:
            d = ts.deploy(m, x, runtime=runtime, threads=threads, batch_size=batch)
        except RuntimeUnavailable as e:
            setup[name] = {"unavailable": str(e)}
            return
        setup[name] = {"build_s": time.perf_counter() - t0}
        out[name] = (kind, d)

    for rt in ("torch", "torch.compile", "onnxruntime", "openvino"):
        deployed("dense", f"dense {rt}" + (" (F.linear)" if rt == "torch" else ""), masked, rt)
    out["dense oneDNN packed, ReLU fused"] = ("dense", onednn_packed(masked))

    t0 = time.perf_counter()
    small = ts.compact(model, masks, x, batch_size=batch)
    setup["condensed ts.compact"] = {"build_s": time.perf_counter() - t0,
                                     "executors": dict(small.ticketsmith_executors),
                                     "handed_over": [m.transposed_out for m in linears(small)],
                                     "chained_runs": getattr(small, "runs", None)}
    out["condensed ts.compact"] = ("condensed", small)
    out["condensed, layers one by one"] = ("condensed", nn.Sequential(*small))  # no tiled chain
    plain = copy.deepcopy(small)
    for m in linears(plain):
        m.transposed_out = False
    CondensedLinear.chain(plain)  # no run left: a plain nn.Sequential again
    out["condensed, no hand-off"] = ("condensed", plain)
    deployed("condensed", "condensed ts.deploy torch.compile", small, "torch.compile")
    if batch <= args.gather_max_batch:
        t0 = time.perf_counter()
        fn = compiled_gather(small)
        with torch.inference_mode():
            fn(x)
        setup["condensed gather form, inductor, int16"] = {"build_s": time.perf_counter() - t0}
        out["condensed gather form, inductor, int16"] = ("condensed", fn)

    out["torch sparse CSR int32 per layer"] = ("unstructured sparse", csr_layers(masked))
    out["scipy.sparse CSR per layer (1 thread)"] = ("unstructured sparse", scipy_layers(masked))
    return out


def measure(args, threads: int, batch: int, model, masks, masked) -> dict:
    torch.set_num_threads(threads)
    setup: dict = {}
    calls = variants(args, model, masks, masked, batch, threads, setup)
    x = torch.randn(batch, args.dims[0])
    entry = {"threads": threads, "batch": batch, "loadavg_before": os.getloadavg(), "setup": setup,
             "variants": {}}
    with torch.inference_mode():
        ref = masked(x)
        for name, (kind, fn) in calls.items():
            y = fn(x)
            err = float((y - ref).abs().max() / ref.abs().max())
            assert err < TOLERANCE, (name, batch, err)
            entry["variants"][name] = {"kind": kind, "rel_err": err}
        times = interleaved_times({n: (lambda f=f: f(x)) for n, (_, f) in calls.items()}, rounds=args.pairs)
    med = {n: statistics.median(t) for n, t in times.items()}
    base = min((n for n in calls if calls[n][0] == "dense"), key=med.get)
    entry["baseline"] = base
    for name, t in times.items():
        ratios = [b / v for b, v in zip(times[base], t)]
        v = entry["variants"][name]
        v.update(median_ms=1e3 * med[name], speedup=statistics.median(ratios),
                 speedup_min=min(ratios), speedup_max=max(ratios))
        v["realized_over_ideal"] = v["speedup"] / args.ideal
        print(f"{threads}T batch {batch:4d} {name:42s} {v['median_ms']:8.3f} ms  {v['speedup']:5.2f}x "
              f"[{v['speedup_min']:.2f}, {v['speedup_max']:.2f}] vs {base}", flush=True)
    if args.profile:
        entry["profile"] = {n: profile_ops(calls[n][1], x) for n in calls
                            if n in ("condensed ts.compact", "condensed, layers one by one",
                                     "condensed, no hand-off")}
    entry["loadavg_after"] = os.getloadavg()
    return entry


def profile_ops(fn, x, calls: int = 20, top: int = 8) -> list[dict]:
    """Self CPU time per op (ms per forward), the largest first."""
    from torch.profiler import ProfilerActivity, profile
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        with profile(activities=[ProfilerActivity.CPU]) as p:
            for _ in range(calls):
                fn(x)
    rows = sorted(p.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1
    return [{"op": e.key, "ms_per_forward": e.self_cpu_time_total / 1e3 / calls,
             "share": e.self_cpu_time_total / total, "calls_per_forward": e.count / calls}
            for e in rows[:top]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dims", default="768,3072,768,3072,768", help="layer widths, comma separated")
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batches", default="1,256")
    ap.add_argument("--threads", default="1,2", help="thread counts, comma separated")
    ap.add_argument("--pairs", type=int, default=15, help="interleaved rounds per figure")
    ap.add_argument("--gather-max-batch", type=int, default=16,
                    help="largest batch for the compiled gather form (a scalar loop per output "
                         "element: ~100x slower than embedding_bag at batch 256)")
    ap.add_argument("--profile", action="store_true", help="op breakdown of the condensed variants")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "condensed_mlp"))
    args = ap.parse_args()
    args.dims = [int(d) for d in args.dims.split(",")]
    model, masks, masked = build_mlp(args.dims, args.sparsity, args.seed)
    dense_macs = sum(m.in_features * m.out_features for m in linears(model))
    kept = sum(int(mk.sum()) for mk in masks.values())
    args.ideal = dense_macs / kept
    report = {**machine(), "dims": args.dims, "sparsity": args.sparsity, "pairs": args.pairs,
              "dense_macs_per_sample": dense_macs, "condensed_macs_per_sample": kept,
              "ideal_speedup": args.ideal, "runs": []}
    for t in map(int, args.threads.split(",")):
        for b in map(int, args.batches.split(",")):
            report["runs"].append(measure(args, t, b, model, masks, masked))
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def markdown(r: dict) -> str:
    dims = " -> ".join(map(str, r["dims"]))
    lines = [f"# A 4-layer condensed MLP ({dims}, {r['sparsity']:.0%} sparse, constant fan-in)", "",
             f"Command (repository root, `PYTHONPATH=src`): `{r['command']}`  ",
             f"CPU: {r['cpu']}, torch {r['torch']}, OMP_WAIT_POLICY={r.get('omp_wait_policy')}, "
             f"{r['pairs']} interleaved rounds per figure (each a burst of about 20 ms), "
             "inference_mode, every variant checked against the masked dense MLP (relative error "
             f"< {TOLERANCE:g}). Ideal speedup (dense / condensed MACs): {r['ideal_speedup']:.1f}x.", "",
             "Speedup = median over rounds of time(fastest dense variant) / time(variant), "
             "[min, max]; the variants are described in benchmarks/condensed_mlp.py.", ""]
    for e in r["runs"]:
        lines += [f"## {e['threads']} thread{'s' if e['threads'] != 1 else ''}, batch {e['batch']} "
                  f"(baseline: {e['baseline']}; load average before "
                  f"{tuple(round(v, 1) for v in e['loadavg_before'])}, after "
                  f"{tuple(round(v, 1) for v in e['loadavg_after'])})", "",
                  "| variant | kind | ms | speedup | min | max | realized/ideal | rel. error |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, v in sorted(e["variants"].items(), key=lambda kv: kv[1]["median_ms"]):
            lines.append(f"| {name} | {v['kind']} | {v['median_ms']:.3f} | {v['speedup']:.2f}x | "
                         f"{v['speedup_min']:.2f} | {v['speedup_max']:.2f} | "
                         f"{v['realized_over_ideal']:.2f} | {v['rel_err']:.1e} |")
        builds = [f"{n} {s['build_s']:.1f} s" for n, s in e["setup"].items() if "build_s" in s]
        missing = [f"{n}: {s['unavailable']}" for n, s in e["setup"].items() if "unavailable" in s]
        lines += ["", "Build / compile time: " + ", ".join(builds) + "."]
        if missing:
            lines += ["", "Not available: " + "; ".join(missing) + "."]
        for name, ops in e.get("profile", {}).items():
            lines += ["", f"Profile of {name} (self CPU time per forward): "
                      + ", ".join(f"{o['op']} {o['ms_per_forward']:.3f} ms ({o['share']:.0%}, "
                                  f"{o['calls_per_forward']:g} calls)" for o in ops) + "."]
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
