"""A regrouped conv layer after gather absorption (`ts.compact(..., absorb=True)`): conv 256->256,
3x3, 16x16 input, batch 64, 75% sparse as 4 channel-granular blocks (64 output channels x 64
input channels each), between a plain conv producer and a plain 1x1 conv consumer (BatchNorm and
ReLU between), so that both channel gathers are absorbed and the layer is one
`nn.Conv2d(groups=4)`.

Timed, paired and interleaved (`_common.paired`), against the fastest dense conv of the masked
layer (oneDNN / F.conv2d in NCHW or channels_last, ONNX Runtime, OpenVINO, torch.compile:
whichever is fastest here):
- the layer: the absorbed grouped conv as eager `nn.Conv2d` (NCHW, channels_last), with oneDNN's
  weight packed once, and under ONNX Runtime; the block executor it replaced (its best kernel);
- the three-layer neighbourhood: the masked dense model, the compact model with the executor and
  the absorbed compact model, eager (faster memory format), ONNX Runtime, OpenVINO and
  torch.compile.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/absorbed_conv.py [--pairs 20] [--threads 1]

Writes benchmarks/results/absorbed_conv.{json,md}.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see block_conv.py: read when torch loads

import argparse  # noqa: E402
import copy  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import ticketsmith as ts  # noqa: E402
from _common import machine, paired  # noqa: E402
from block_conv import burst_reps, dense_paths, fastest, make_blocks  # noqa: E402
from ticketsmith import compact as C  # noqa: E402
from ticketsmith.compact.blocks import BlockConv2d  # noqa: E402
from ticketsmith.io import write_json  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class Neighbourhood(nn.Module):
    """producer conv -> BN -> ReLU -> regrouped conv -> BN -> ReLU -> 1x1 consumer conv."""

    def __init__(self, c: int):
        super().__init__()
        self.prev, self.bn1 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.conv, self.bn2 = nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c)
        self.next = nn.Conv2d(c, c, 1)

    def forward(self, x):
        x = F.relu(self.bn1(self.prev(x)))
        return self.next(F.relu(self.bn2(self.conv(x))))


def ort_fn(model: nn.Module, x: torch.Tensor, threads: int, tmp: Path, name: str):
    """model under ONNX Runtime (threads, CPU), as a zero-argument callable on x."""
    path = C.export_onnx(model, x, tmp / f"{name}.onnx")
    sess = C.onnx_session(path, threads=threads)
    feed = {sess.get_inputs()[0].name: x.numpy()}
    return lambda: sess.run(None, feed), path


REFUSED: dict[str, str] = {}  # "what under which runtime" -> why ts.deploy refused it


def deployed(model: nn.Module, x: torch.Tensor, threads: int, label: str) -> dict:
    """model under the other runtimes a user could pick (`ts.deploy`: OpenVINO, torch.compile),
    each a zero-argument callable on x, by runtime name; runtimes not installed are left out,
    and a deployment `ts.deploy` refuses (it checks every one against the model) is left out
    with the reason in REFUSED."""
    out = {}
    for rt in ("openvino", "torch.compile"):
        if ts.deploy.available(rt) is None:
            try:
                d = ts.deploy(model, x, runtime=rt, threads=threads)
            except ts.TicketsmithError as e:
                REFUSED[f"{label}, {rt}"] = str(e)
                continue
            out[rt] = lambda d=d: d(x)
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


def measure(args, threads: int, tmp: Path) -> dict:
    torch.set_num_threads(threads)
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    c, n, hw = args.channels, args.batch, args.size
    model = Neighbourhood(c).eval()
    with torch.no_grad():
        for bn in (model.bn1, model.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 1.5)
    blocks = make_blocks("channel", c, c, 9, args.blocks, g)
    union = torch.zeros(c, c * 9, dtype=torch.bool)
    for b in blocks:
        union[b.rows.unsqueeze(1), b.cols.unsqueeze(0)] = True
    masks = ts.Masks({"conv.weight": union.view(c, c, 3, 3)}, {"conv.weight": blocks})
    x = torch.randn(n, c, hw, hw)
    executor = C.compact(model, masks, x[:2], batch_size=n)
    absorbed = C.compact(model, masks, x[:2], batch_size=n, absorb=True)
    layer = absorbed.conv
    if type(layer) is not nn.Conv2d or layer.groups != args.blocks:
        raise SystemExit(f"absorption did not give one grouped conv: {layer} "
                         f"({C.describe(absorbed)[1].get('gathers')})")
    masked = copy.deepcopy(model)
    masks.apply(masked)
    run = {"threads": threads, "loadavg_before": os.getloadavg(),
           "gathers": {r["layer"]: r.get("gathers") for r in C.describe(absorbed)}}
    with torch.inference_mode():
        # -- the layer -----------------------------------------------------------------------
        w, b = masked.conv.weight.detach(), masked.conv.bias.detach()
        x_cl = x.contiguous(memory_format=torch.channels_last)
        dense = dense_paths(w, b, x, x_cl)
        f_ort, _ = ort_fn(masked.conv, x, threads, tmp, "dense_layer")
        dense["ONNX Runtime"] = f_ort
        for rt, f in deployed(masked.conv, x, threads, "dense layer").items():
            dense[rt] = f
        base_name, probe = fastest(dense)
        base = dense[base_name]
        reps = burst_reps(base)
        # the absorbed layer reads its input channels in block order: the same input, permuted
        # by the (absorbed) producer; exactness is checked on the whole model below
        lay_cl = copy.deepcopy(layer).to(memory_format=torch.channels_last)
        packed = torch._C._nn.mkldnn_reorder_conv2d_weight(
            layer.weight.detach().to_mkldnn(), [1, 1], [1, 1], [1, 1], layer.groups, list(x.shape))
        lb = layer.bias.detach()
        ex: BlockConv2d = executor.conv
        ex_kernel = ex.autotune(x)
        f_ort_g, onnx_path = ort_fn(layer, x, threads, tmp, "grouped_layer")
        import onnx
        convs = [nd for nd in onnx.load(str(onnx_path)).graph.node if nd.op_type == "Conv"]
        cands = {
            "absorbed: nn.Conv2d(groups=4), NCHW": lambda: layer(x),
            "absorbed: nn.Conv2d(groups=4), channels_last": lambda: lay_cl(x_cl),
            "absorbed: oneDNN packed weight, channels_last": lambda: torch.ops.mkldnn._convolution_pointwise(
                x_cl, packed, lb, [1, 1], [1, 1], [1, 1], layer.groups, "none", [], ""),
            "absorbed: ONNX Runtime (one grouped Conv)": f_ort_g,
            f"executor BlockConv2d ({ex_kernel}, autotuned), NCHW": lambda: ex(x),
        }
        for rt, f in deployed(layer, x, threads, "absorbed layer").items():
            cands[f"absorbed: {rt}"] = f
        dense_macs = n * hw * hw * c * c * 9
        ideal = dense_macs / (n * hw * hw * ex.macs_per_position())
        layer_rows = {}
        for label, fn in cands.items():
            r = paired(base, fn, pairs=args.pairs, reps=reps)
            r["realized_over_ideal"] = r["ratio_median"] / ideal
            layer_rows[label] = r
            print(f"{threads}T layer {label:55s} {r['ratio_median']:.2f}x "
                  f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] vs {base_name}", flush=True)
        run["layer"] = {"baseline": base_name, "baseline_probe_s": probe, "ideal": ideal,
                        "reps": reps, "onnx_convs": len(convs),
                        "onnx_groups": [next((a.i for a in nd.attribute if a.name == "group"), 1)
                                        for nd in convs],
                        "kernels": layer_rows}
        # -- the neighbourhood ---------------------------------------------------------------
        ref = masked(x)
        errs = {"executor": rel(executor(x), ref), "absorbed": rel(absorbed(x), ref)}
        if max(errs.values()) >= 1e-4:
            raise SystemExit(f"compact models deviate from the masked model: {errs}")
        models = {}
        for label, m in (("masked dense", masked), ("compact, executor", executor),
                         ("compact, absorbed", absorbed)):
            m_cl = copy.deepcopy(m).to(memory_format=torch.channels_last)
            fmts = {"NCHW": (lambda m=m: m(x)), "channels_last": (lambda m=m_cl: m(x_cl))}
            fmt, _ = fastest(fmts, rounds=5)
            models[f"{label}, eager {fmt}"] = fmts[fmt]
            models[f"{label}, ONNX Runtime"] = ort_fn(m, x, threads, tmp, label.replace(", ", "_")
                                                      .replace(" ", "_"))[0]
            for rt, f in deployed(m, x, threads, label).items():
                models[f"{label}, {rt}"] = f
        dense_models = {k: v for k, v in models.items() if k.startswith("masked dense")}
        mbase_name, mprobe = fastest(dense_models)
        mbase = dense_models[mbase_name]
        mreps = burst_reps(mbase)
        model_rows = {}
        for label, fn in models.items():
            if label == mbase_name:
                continue
            r = paired(mbase, fn, pairs=args.pairs, reps=mreps)
            model_rows[label] = r
            print(f"{threads}T model {label:55s} {r['ratio_median']:.2f}x "
                  f"[{r['ratio_min']:.2f}, {r['ratio_max']:.2f}] vs {mbase_name}", flush=True)
        per_pixel = c * c * 9 + c * c  # the producer's and the consumer's MACs per position
        run["model"] = {"baseline": mbase_name, "baseline_probe_s": mprobe, "rel_err": errs,
                        "reps": mreps, "models": model_rows,
                        "ideal": (per_pixel + c * c * 9) / (per_pixel + ex.macs_per_position())}
    run["refused"] = dict(REFUSED)
    REFUSED.clear()
    run["loadavg_after"] = os.getloadavg()
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=256)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--threads", default="1", help="thread counts, comma separated")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(RESULTS / "absorbed_conv"))
    args = ap.parse_args()
    c, hw = args.channels, args.size
    report = {**machine(), "layer": f"conv {c}->{c}, 3x3, pad 1, {hw}x{hw}", "batch": args.batch,
              "blocks": args.blocks, "pairs": args.pairs, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for t in map(int, args.threads.split(",")):
            report["runs"][str(t)] = measure(args, t, Path(tmp))
    out = Path(args.out)
    write_json(out.with_suffix(".json"), report)
    out.with_suffix(".md").write_text(markdown(report))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')}")


def markdown(r: dict) -> str:
    lines = [f"# Absorbed regrouped conv: {r['layer']}, batch {r['batch']}, {r['blocks']} "
             "channel-granular blocks, 75% sparse", "",
             f"Command (repository root, `PYTHONPATH=src`): `{r['command']}`  ",
             f"CPU: {r['cpu']}, torch {r['torch']}, OMP_WAIT_POLICY={r.get('omp_wait_policy')}, "
             f"{r['pairs']} paired, interleaved bursts per figure, inference_mode, warm-up first.",
             "", "Taken on the project's shared 2-core machine next to a training run (`ticketsmith "
             "run`) and other jobs (load averages per run below; above 2 means more runnable "
             "threads than cores): absolute times drift and run several times those of "
             "block_conv.md; the paired ratios are the figures to read.", "",
             "Speedup = median over pairs of time(baseline) / time(variant), [min, max]. The "
             "baseline is the fastest dense variant found here (probed first, interleaved).", ""]
    for t, run in r["runs"].items():
        lay, mod = run["layer"], run["model"]
        lines += [f"## {t} thread{'s' if t != '1' else ''} (load average before "
                  f"{tuple(round(v, 1) for v in run['loadavg_before'])}, after "
                  f"{tuple(round(v, 1) for v in run['loadavg_after'])})", "",
                  f"Gathers after `ts.compact(..., absorb=True)`: {run['gathers'].get('conv')}.",
                  "", f"### The layer (ideal {lay['ideal']:.2f}x)", "",
                  f"Baseline: {lay['baseline']} (probe medians: "
                  + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in lay["baseline_probe_s"].items())
                  + f"). The exported absorbed layer has {lay['onnx_convs']} Conv node(s), groups "
                  f"{lay['onnx_groups']}.", "",
                  "| variant | speedup (median) | min | max | realized/ideal | baseline ms | variant ms |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in lay["kernels"].items():
            lines.append(f"| {k} | {v['ratio_median']:.2f}x | {v['ratio_min']:.2f} | "
                         f"{v['ratio_max']:.2f} | {v['realized_over_ideal']:.2f} | "
                         f"{1e3 * v['a_median_s']:.1f} | {1e3 * v['b_median_s']:.1f} |")
        lines += ["", "### The neighbourhood: producer conv, regrouped conv, 1x1 consumer conv "
                  f"(ideal {mod['ideal']:.2f}x)", "",
                  f"Baseline: {mod['baseline']} (probe medians: "
                  + ", ".join(f"{k} {1e3 * v:.1f} ms" for k, v in mod["baseline_probe_s"].items())
                  + "). Relative error against the masked model: "
                  + ", ".join(f"{k} {v:.1e}" for k, v in mod["rel_err"].items()) + ".", "",
                  "| model | speedup (median) | min | max | baseline ms | model ms |",
                  "|---|---|---|---|---|---|"]
        for k, v in mod["models"].items():
            lines.append(f"| {k} | {v['ratio_median']:.2f}x | {v['ratio_min']:.2f} | "
                         f"{v['ratio_max']:.2f} | {1e3 * v['a_median_s']:.1f} | "
                         f"{1e3 * v['b_median_s']:.1f} |")
        for k, why in run.get("refused", {}).items():
            lines.append(f"\nNot timed: {k}: `ts.deploy` refused it: {why}")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
