"""Find a channel ticket inside your own training loop: IMP with rewinding and Refill, round by
round, with `ts.TicketSearch`; the loop is killed after round 1 and resumes from the directory;
the best ticket is compacted into a physically smaller network.

    python examples/search_in_your_loop.py [--epochs 5] [--rounds 3] [--out search]

Uses the bundled 8x8 digits dataset, so it runs anywhere in well under a minute.
"""
import argparse
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts


class MyNet(nn.Module):  # any network of conv / linear layers
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        return self.head(self.features(x).flatten(1))


def my_train(model, optimizer, ds, epochs):
    """Your training loop, unchanged: ticketsmith holds the masks through optimizer hooks."""
    model.train()
    for epoch in range(epochs):
        for x, y in ts.data.batches(ds, ds.train, 64, train=True, epoch=epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(x), y).backward()
            optimizer.step()


def search_for(ds, out, rounds, epochs):
    torch.manual_seed(0)
    model = MyNet()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    steps = epochs * -(-len(ds.train) // 64)  # the optimizer steps of one round
    x = ds.normalize(ds.train.x[:8])
    return ts.TicketSearch(model, optimizer, out=out, structure="refill", rounds=rounds,
                           prune_fraction=0.3, rewind="10%", steps_per_round=steps, example_inputs=x)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", help="the search directory (default: a temporary one)")
    args = ap.parse_args()
    ds = ts.data.load("digits")
    out = Path(args.out or tempfile.mkdtemp(prefix="search-"))

    search = search_for(ds, out, args.rounds, args.epochs)
    for rnd in search:                      # round 0 dense; then rewound and masked each round
        my_train(search.model, search.optimizer, ds, args.epochs)
        rnd.finish(val_acc=ts.evaluate(search.model, ds, ds.val)[1])
        print(f"round {rnd.index}: sparsity {rnd.record['sparsity']:.1%}, "
              f"val {rnd.record['metrics']['val_acc']:.3f}")
        if rnd.index == 1:
            break                           # the loop dies here ...
    search.close()

    search = search_for(ds, out, args.rounds, args.epochs)  # ... and is started again
    print(f"resuming at round {search.next_round()}")
    for rnd in search:
        my_train(search.model, search.optimizer, ds, args.epochs)
        rnd.finish(val_acc=ts.evaluate(search.model, ds, ds.val)[1])
        print(f"round {rnd.index}: sparsity {rnd.record['sparsity']:.1%}, "
              f"val {rnd.record['metrics']['val_acc']:.3f}")

    ticket = search.best()                  # the sparse round of best val_acc (within=: matching)
    model = ticket.load_into(MyNet()).eval()
    print(f"ticket: round {ticket.round}, sparsity {ticket.masks.sparsity():.1%}, channels kept "
          f"{ticket.record['channels_kept']}")
    x = ds.normalize(ds.train.x[:8])
    small = ts.compact(model, ticket.masks, x)
    other = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        err = (small(other) - model(other)).abs().max().item()
    params = sum(p.numel() for p in model.parameters()), sum(p.numel() for p in small.parameters())
    print(f"compact ticket: {params[1]:,} of {params[0]:,} parameters; compact vs ticket on new "
          f"inputs: max difference {err:.2e}")
    assert err < 1e-4
    if not args.out:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
