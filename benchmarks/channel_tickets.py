"""Channel tickets of VGG-16 and ResNet-18 (full width, CIFAR shapes 3x32x32, 10 classes) at 50%
and 75% channel sparsity, batch 1 and 64: the compact model (channel surgery) against the fastest
dense path, end to end and layer by layer.

    python benchmarks/channel_tickets.py [--models vgg16,resnet18,vit_s,resnext] [--sparsities 0.5,0.75]
        [--batch-sizes 1,64] [--pairs 15] [--threads 1,2] [--width 1.0] [--image-size 32]
        [--runtimes all|torch,torch.compile,onnxruntime,openvino] [--no-layerwise] [--out PATH]

`--models vit_s`: a ViT-S (torch.nn, 12 blocks of width 384, 6 heads, 4x4 patches); its ticket
keeps whole heads (k = ceil((1 - s) * 6) per block) and MLP hidden units; the residual stream
stays whole (LayerNorm). Its dense baseline runs torch's own nn.MultiheadAttention.
`--models resnext`: a ResNeXt-20 (32x4d, see `resnext`); its grouped convs keep their 32 groups
with fewer channels in each (refill keeps them evenly over the groups).
`--models torchvision:resnet50,timm:...`: a real torchvision / timm model, built as `ticketsmith
run --model` builds it (10 classes, random weights: the speed depends on the shapes only), on
images of `--image-size` (224 for these); torchvision needs the venv of
benchmarks/zoo_models.py. Its dense candidates include the model as its library builds it
(before the prunable swaps of its attention): the user's own modules are a baseline too. Where
compaction freezes layers that compute their weight (NFNet's weight-standardised convs), the
dense model is frozen the same way (`ts.compact` keeping every weight) and the library's own
model is the `original` candidate.

The channel masks are what Refill makes of a layer-wise uniform mask at sparsity s (random, seed 0;
refill then keeps the channels with the largest L1 of He-initialised weights, coupled=True), so
every prunable layer but the head keeps k = ceil((1 - s) * c_out) whole output channels and
residual-coupled channels are chosen together. Channel surgery then also drops the matching
input channels of the next layer: the ideal speedup is about 1 / (1 - s)^2.
Timing: `ticketsmith.bench.compare` (paired, interleaved A B A B; medians of per-pair ratios):
both models deployed in every runtime of --runtimes (BatchNorm folded; eager in its faster memory
format), each runtime's same-runtime ratio, and the fastest dense of any runtime against the
fastest compact of any runtime. OMP_WAIT_POLICY defaults to PASSIVE (see docs/benchmarks.md).
Writes benchmarks/results/channel_tickets.{json,md} (or --out).
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


def vit_s(width: float) -> torch.nn.Module:
    """ViT-S on 32x32 images (4x4 patches: 64 tokens), built from torch.nn (compact_big_graph's
    blocks: LayerNorm, nn.MultiheadAttention of 6 heads, GELU MLP 1536; `width` scales the
    MLP), with its attention swapped for QKVAttention as `ticketsmith run --model` does."""
    from compact_big_graph import ViT
    model = ViT(blocks=12, dim=384, heads=6, mlp=max(1, round(1536 * width)), patch=4, classes=10)
    ts.models.prunable_attention(model)
    return model


class _Bottleneck(torch.nn.Module):
    """ResNeXt's bottleneck (torchvision's): 1x1, grouped 3x3 (cardinality groups), 1x1, residual."""

    def __init__(self, cin: int, cout: int, width: int, groups: int, stride: int):
        super().__init__()
        nn = torch.nn

        def cbn(i, o, k=1, s=1, g=1):
            return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=False), nn.BatchNorm2d(o))
        self.conv1, self.conv2 = cbn(cin, width), cbn(width, width, 3, stride, groups)
        self.conv3 = cbn(width, cout)
        self.down = cbn(cin, cout, 1, stride) if stride != 1 or cin != cout else nn.Identity()

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.conv1(x))))
        return torch.relu(self.conv3(y) + self.down(x))


def resnext(width: float) -> torch.nn.Module:
    """ResNeXt-20 (32x4d) for 32x32 images: a 64-channel stem, three stages of two bottlenecks
    (outputs 256, 512, 1024; grouped 3x3 convs of 128, 256, 512 channels in 32 groups; strides
    1, 2, 2), mean pool, linear head. `width` scales every width (the groups stay 32)."""
    nn = torch.nn
    w = [max(32, round(c * width)) for c in (64, 128, 256, 512, 256, 512, 1024)]
    stem, (w1, w2, w3), (o1, o2, o3) = w[0], w[1:4], w[4:]
    blocks, cin = [], stem
    for wid, out, stride in ((w1, o1, 1), (w2, o2, 2), (w3, o3, 2)):
        blocks += [_Bottleneck(cin, out, wid, 32, stride), _Bottleneck(out, out, wid, 32, 1)]
        cin = out
    return nn.Sequential(nn.Conv2d(3, stem, 3, 1, 1, bias=False), nn.BatchNorm2d(stem), nn.ReLU(),
                         *blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, 10))


def channel_ticket(name: str, width: float, sparsity: float, shape: tuple = SHAPE):
    torch.manual_seed(0)
    if ":" in name:  # a torchvision / timm model
        model = ts.models.build(name, num_classes=10).eval()
    elif name == "vit_s":
        model = vit_s(width).eval()
    elif name == "resnext":
        model = resnext(width).eval()
    else:
        model = ts.models.create(name, in_channels=shape[0], num_classes=10, image_size=shape[1:],
                                 width=width).eval()
    x = torch.randn(1, *shape)
    masks = ts.refill(model, ts.prune.random_masks(model, sparsity), coupling="shared", example_inputs=x)
    small = ts.compact(model, masks, x)
    unfrozen = None
    if small.ticketsmith_compact["frozen"]:
        # layers that compute their weight on every call (NFNet's ScaledStdConv2d) are frozen
        # in the compact model; the dense baseline gets the same (a user could freeze it too:
        # compact with every weight kept), so the speedup is the ticket's, not the freezing's
        unfrozen, model = model, ts.compact(model, ts.Masks.ones(model), x)
    return model, small, masks, unfrozen


def original(name: str) -> torch.nn.Module | None:
    """A torchvision / timm model as its library builds it, before the prunable swaps: a dense
    baseline the user could pick too (`compare`'s `original`); None where nothing is swapped."""
    model = ts.models.original(name, num_classes=10) if ":" in name else None
    return model.eval() if model is not None else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="vgg16,resnet18")
    p.add_argument("--sparsities", default="0.5,0.75")
    p.add_argument("--batch-sizes", default="1,64")
    p.add_argument("--pairs", type=int, default=15)
    p.add_argument("--threads", default="2", help="comma-separated thread counts")
    p.add_argument("--runtimes", default="all", help="comma-separated, or all (every one installed)")
    p.add_argument("--layerwise", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--image-size", type=int, default=SHAPE[1], help="square images of this side")
    p.add_argument("--out", default=str(RESULTS / "channel_tickets"))
    a = p.parse_args()
    shape = (3, a.image_size, a.image_size)
    threads = [int(t) for t in a.threads.split(",")]
    runtimes = None if a.runtimes == "all" else a.runtimes.split(",")
    batches = [int(b) for b in a.batch_sizes.split(",")]
    runs = []
    for name in a.models.split(","):
        for s in (float(v) for v in a.sparsities.split(",")):
            dense, small, masks, unfrozen = channel_ticket(name, a.width, s, shape)
            print(f"{name} at {s:.0%} channel sparsity", flush=True)
            r = compare(dense, small, lambda b: torch.randn(b, *shape), batch_sizes=batches,
                        threads=threads, pairs=a.pairs, layerwise=a.layerwise, runtimes=runtimes,
                        original=original(name) or unfrozen, progress=lambda msg: print("  " + msg, flush=True))
            r.update(model=name, width=a.width, channel_sparsity=s, image_size=a.image_size,
                     weight_sparsity=1 - r["compact"]["params"] / r["dense"]["params"])
            for row in r["results"]:
                print(f"  {row['backend']} batch {row['batch_size']} threads {row['threads']}: "
                      f"{row['speedup_median']:.2f}x "
                      f"(ideal {r['ideal_speedup']:.2f}x, realized/ideal "
                      f"{row['realized_over_ideal']:.2f})", flush=True)
            runs.append(r)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"machine": machine(), "runs": runs}, indent=1))
    out.with_suffix(".md").write_text(render(runs))


def render(runs: list[dict]) -> str:
    m = runs[0]["machine"]
    lines = ["# Channel tickets: compact model vs the fastest dense model of any runtime", "",
             f"Machine: {m['cpu']}, torch {m['torch']}, OMP_WAIT_POLICY="
             f"{m.get('omp_wait_policy')}. Command: `{m['command']}`. Runtimes: "
             f"{', '.join(runs[0].get('runtimes', ['torch']))}.", "",
             "Goal (issue 15): realized / ideal against the fastest dense of any runtime >= 0.85 at "
             "batch 1 and >= 0.75 at batch 64.", "",
             "| model | channel sparsity | parameters removed | batch | threads | row | dense runs in "
             "| compact runs in | dense ms | compact ms | ideal | speedup median (min-max) | realized / ideal "
             "| same-runtime speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        for row in r["results"]:
            fastest = row["backend"] == "fastest"
            same = row.get("same_runtime_speedup")
            lines.append(
                f"| {r['model']} | {r['channel_sparsity']:.0%} | {r['weight_sparsity']:.1%} | "
                f"{row['batch_size']} | {row['threads']} | {'**fastest vs fastest**' if fastest else row['backend']} "
                f"| {row['dense_runtime'] if fastest else row.get('dense_format', '-')} "
                f"| {row['compact_runtime'] if fastest else row.get('compact_format', '-')} "
                f"| {row['dense_ms']:.3f} | {row['compact_ms']:.3f} | {r['ideal_speedup']:.2f}x | "
                f"{row['speedup_median']:.2f}x ({row['speedup_min']:.2f}-{row['speedup_max']:.2f}) | "
                f"{row['realized_over_ideal']:.2f} | {f'{same:.2f}x' if same else '-'} |")
    gone = {k: v for r in runs for row in r["results"] for k, v in row.get("unavailable", {}).items()}
    lines += [f"- not timed: {k}: {v}" for k, v in sorted(gone.items())]
    if not any(r["layers"] for r in runs):
        return "\n".join(lines + ["", "Speedups are medians of paired, interleaved time ratios (dense / compact)."]) + "\n"
    lines += ["", "## Layer-wise (paper Fig. 7, for VGG-16 and ResNet-18; eager)", "",
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
