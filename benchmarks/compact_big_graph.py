"""Compaction time and peak memory on a ViT-B/16-sized graph (issue 18, item 3).

torchvision does not import beside the CPU torch wheel used here, so the model is a ViT-B/16 of
the same shape built from torch.nn (16x16 patches of a 224x224 image, width 768, 12 blocks of
LayerNorm + nn.MultiheadAttention(12 heads) + GELU MLP 3072, class from the mean token):
86M parameters, 17.6 GMACs. A refill channel ticket of a 50% global magnitude mask (MLP hidden
units are what refill can remove in a ViT; attention stays dense) is compacted on one 224x224
example. Peak memory is the process's maximum resident set (ru_maxrss), so the script measures
one model per process.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/compact_big_graph.py [--blocks 12]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

import ticketsmith as ts
from _common import machine

OUT = Path(__file__).resolve().parent / "results" / "compact_big_graph"


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, mlp)
        self.fc2 = nn.Linear(mlp, dim)

    def forward(self, x):
        y = self.norm1(x)
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x))))


class ViT(nn.Module):
    def __init__(self, blocks: int = 12, dim: int = 768, heads: int = 12, mlp: int = 3072,
                 patch: int = 16, classes: int = 1000):
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, stride=patch)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp) for _ in range(blocks)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        return self.head(self.norm(self.blocks(x)).mean(1))


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--blocks", type=int, default=12)
    ap.add_argument("--sparsity", type=float, default=0.5)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = ViT(args.blocks).eval()
    x = torch.randn(1, 3, 224, 224)
    base_mb = peak_mb()
    t0 = time.perf_counter()
    masks = ts.refill(model, ts.prune.omp(model, args.sparsity), example_inputs=x)
    t_refill = time.perf_counter() - t0
    refill_mb = peak_mb()
    t0 = time.perf_counter()
    small = ts.compact(model, masks, x)
    t_compact = time.perf_counter() - t0
    params = sum(p.numel() for p in model.parameters())
    params_after = sum(p.numel() for p in small.parameters())
    rows = ts.compact.describe(small)
    rec = {"machine": {**machine(), "command": "OMP_NUM_THREADS=1 PYTHONPATH=src python "
                       "benchmarks/compact_big_graph.py " + " ".join(sys.argv[1:])},
           "model": f"ViT-B/16-shaped ({args.blocks} blocks, 224x224)", "mask_sparsity": masks.sparsity(),
           "params_before": params, "params_after": params_after,
           "refill_seconds": t_refill, "compact_seconds": t_compact,
           "peak_rss_mb": {"model built": base_mb, "after refill": refill_mb, "after compact": peak_mb()},
           "layers_dense_with_reason": sum(1 for r in rows if "kept dense" in r["reason"])}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.with_suffix(".json").write_text(json.dumps(rec, indent=1))
    md = [f"# Compaction of a {rec['model']}", "", f"Command: `{rec['machine']['command']}`  ",
          f"CPU: {rec['machine'].get('cpu')}, torch {rec['machine'].get('torch')}, 1 thread, beside "
          "two training lanes (times are upper bounds).", "",
          "| mask sparsity | params before | params after | refill s | compact s | peak RSS MB (built / refill / compact) | layers kept dense |",
          "|---|---|---|---|---|---|---|",
          f"| {rec['mask_sparsity']:.1%} | {params:,} | {params_after:,} | {t_refill:.1f} | {t_compact:.1f} "
          f"| {base_mb:.0f} / {refill_mb:.0f} / {rec['peak_rss_mb']['after compact']:.0f} "
          f"| {rec['layers_dense_with_reason']} |"]
    OUT.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
