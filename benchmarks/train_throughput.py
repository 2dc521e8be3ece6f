"""Training throughput of dense vs masked training (MaskHold: gradient hooks + re-zeroing
after each step), ResNet-20, batch 128, forward + backward + SGD step.

    python benchmarks/train_throughput.py [--shape 1,28,28] [--sparsity 0.8] [--pairs 20]

Prints images/s of both and the median paired ratio (masked time / dense time).

With two thread counts (`--threads 1,2`) it times the masked model's training step at each,
alternating in one process, instead: how much a second intra-op thread gives one lane of the
protocol (against a second lane beside it), e.g.

    python benchmarks/train_throughput.py --model vgg16 --width 0.25 --channels-last --threads 1,2
"""
from __future__ import annotations

import argparse
import json

import torch
from torch.nn import functional as F

import ticketsmith as ts
from _common import machine, paired


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--shape", default="1,28,28")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--sparsity", type=float, default=0.8)
    ap.add_argument("--steps", type=int, default=5, help="training steps per timed burst")
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--threads", default="2", help="one count, or two to compare (masked model)")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--channels-last", action="store_true")
    args = ap.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    torch.set_num_threads(threads[0])
    c, h, w = map(int, args.shape.split(","))
    x = torch.randn(args.batch, c, h, w)
    y = torch.randint(0, 10, (args.batch,))
    if args.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    def setup(masked: bool):
        torch.manual_seed(0)
        model = ts.models.create(args.model, c, 10, (h, w), width=args.width)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
        if masked:
            ts.prune.random_masks(model, args.sparsity, seed=0).hold(model, opt)

        def burst():
            for _ in range(args.steps):
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
        return burst

    if len(threads) == 2:
        step = setup(True)

        def at(n):
            def burst():
                torch.set_num_threads(n)
                step()
            return burst
        at(threads[0])()  # warm-up at both counts
        at(threads[1])()
        r = paired(at(threads[0]), at(threads[1]), pairs=args.pairs)
        imgs = args.batch * args.steps
        print(json.dumps({**machine(), "model": args.model, "width": args.width, "shape": args.shape,
                          "batch": args.batch, "sparsity": args.sparsity,
                          "channels_last": args.channels_last, "threads": threads,
                          "images_per_s": [imgs / r["a_median_s"], imgs / r["b_median_s"]],
                          "speedup_median": r["ratio_median"], "speedup_min": r["ratio_min"],
                          "speedup_max": r["ratio_max"], "pairs": args.pairs}, indent=2))
        return
    dense, masked = setup(False), setup(True)
    dense()  # warm-up
    masked()
    r = paired(dense, masked, pairs=args.pairs)
    imgs = args.batch * args.steps
    out = {**machine(), "model": args.model, "shape": args.shape, "batch": args.batch,
           "sparsity": args.sparsity, "channels_last": args.channels_last,
           "dense_images_per_s": imgs / r["a_median_s"], "masked_images_per_s": imgs / r["b_median_s"],
           "masked_over_dense_time_median": 1 / r["ratio_median"],
           "masked_over_dense_time_min": 1 / r["ratio_max"],
           "masked_over_dense_time_max": 1 / r["ratio_min"], "pairs": args.pairs}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
