"""Find a ticket inside your own training loop: SRigL (constant fan-in dynamic sparse training)
needs two lines in a plain PyTorch loop. The ticket compacts to condensed linear layers where
they pay (large layers: docs/benchmarks.md); these small layers stay dense, and `describe`
says why.

    python examples/ticket_in_your_loop.py [--epochs 3] [--sparsity 0.9]
"""
import argparse

import torch
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--sparsity", type=float, default=0.9)
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = ts.data.load("digits")
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(),
                          nn.Linear(256, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = args.epochs * -(-len(ds.train) // 64)
    sparse = ts.dst.SRigL(model, opt, sparsity=args.sparsity, total_steps=steps, delta_t=20)  # line 1
    for epoch in range(args.epochs):
        model.train()
        for x, y in ts.data.batches(ds, ds.train, 64, train=True, epoch=epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sparse.step()  # line 2: grows / prunes connections every delta_t steps
    masks = sparse.masks
    print(f"SRigL: sparsity {masks.sparsity():.0%}, test accuracy {ts.evaluate(model, ds, ds.test)[1]:.3f}")
    x = ds.normalize(ds.train.x[:8])
    small = ts.compact(model, masks, x)
    for row in ts.compact.describe(small):
        print(f"  {row['layer']}: {row['executor']} ({row['reason']})")
    model.eval()
    other = torch.randn(7, 1, 8, 8)
    with torch.no_grad():
        err = (small(other) - model(other)).abs().max().item()
    print(f"compact vs sparse model on new inputs: max difference {err:.2e}")
    assert err < 1e-4


if __name__ == "__main__":
    main()
