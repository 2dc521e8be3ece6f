"""Prune your own model: a few rounds of IMP on a network ticketsmith has never seen, refill the
last mask into whole channels, and compact the ticket into a physically smaller model.

    python examples/prune_your_model.py [--epochs 2] [--rounds 2]

Uses the bundled 8x8 digits dataset, so it runs anywhere in well under a minute.
"""
import argparse

import torch
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts


class MyNet(nn.Module):  # anything built from conv / linear layers works
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def train(model, ds, masks, epochs):
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    hold = masks.hold(model, opt)  # pruned weights stay exactly zero while training
    for epoch in range(epochs):
        model.train()
        for x, y in ts.data.batches(ds, ds.train, 64, train=True, epoch=epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            hold.enforce()
    hold.remove()
    return ts.evaluate(model, ds, ds.test)[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    torch.manual_seed(0)
    ds = ts.data.load("digits")
    model = MyNet()
    rewind = {k: v.clone() for k, v in model.state_dict().items()}  # rewind to the init
    masks = ts.Masks.ones(model)  # the head is left dense, as in the paper
    print(f"dense: test accuracy {train(model, ds, masks, args.epochs):.3f}")
    for r in range(1, args.rounds + 1):  # IMP: prune 20% of what is left, rewind, retrain
        masks = ts.prune.magnitude(model, masks, 0.2)
        model.load_state_dict(rewind)
        print(f"round {r}: sparsity {masks.sparsity():.0%}, test accuracy "
              f"{train(model, ds, masks, args.epochs):.3f}")
    x = ds.normalize(ds.train.x[:64])
    ticket = ts.refill(model, masks, example_inputs=x[:1])  # whole channels (paper Alg. 2)
    small = ts.compact(model, ticket, x[:8])
    eff = ts.compact.effective(model, ticket, x[:2])
    print(f"refilled ticket: mask sparsity {eff['sparsity']:.0%}, effective {eff['effective_sparsity']:.0%}, "
          f"{eff['compact_params']:,} of {eff['params']:,} parameters")
    # the compact model computes what the masked model computes, on inputs it was not built from
    masked = MyNet()
    masked.load_state_dict(model.state_dict())
    ticket.apply(masked)
    masked.eval()
    other = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        err = (small(other) - masked(other)).abs().max().item()
    print(f"compact vs masked model on new inputs: max difference {err:.2e}")
    assert err < 1e-4


if __name__ == "__main__":
    main()
