"""Where do block executors pay? One conv c->c, 3x3, channel-granular blocks (n_blocks diagonal
blocks of c/n_blocks output x c/n_blocks whole input channels: ideal speedup n_blocks), batch 64,
against the fastest dense conv, for small and large layers.

    PYTHONPATH=src python benchmarks/block_conv_sizes.py [--threads 1] [--pairs 10]

Writes benchmarks/results/block_conv_sizes.{json,md}. This is the measurement behind
`BLOCK_CONV_MIN_CHANNELS` in ticketsmith/compact/blocks.py.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # read when torch loads libgomp

import argparse  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from _common import calibrate, machine, paired  # noqa: E402
from ticketsmith.bench import fastest_format, to_format  # noqa: E402
from ticketsmith.compact.blocks import BlockConv2d  # noqa: E402
from ticketsmith.io import write_json  # noqa: E402
from ticketsmith.masks import Block  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS = ((16, 14), (32, 7), (64, 14), (128, 16), (256, 16))  # (channels, input side)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=10)
    p.add_argument("--batch", type=int, default=64)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    rows = []
    for c, hw in LAYERS:
        for nb in (2, 4, 8):
            torch.manual_seed(0)
            conv = nn.Conv2d(c, c, 3, padding=1, bias=False).eval()
            g = c // nb
            blocks = [Block(tuple(range(i * g, (i + 1) * g)),
                            tuple(j for ch in range(i * g, (i + 1) * g) for j in range(ch * 9, ch * 9 + 9)))
                      for i in range(nb)]
            ex = BlockConv2d.from_conv(conv, blocks).eval()
            x = torch.randn(a.batch, c, hw, hw)
            row = {"channels": c, "side": hw, "blocks": nb, "ideal": nb}
            with torch.inference_mode():
                cl, _ = fastest_format(conv, x)  # the dense conv in its faster memory format
                cd, xd = to_format(conv, x, cl)
                row["dense_format"] = "channels_last" if cl else "nchw"
                for kernel in ("per-block", "grouped"):
                    ex.use(kernel)
                    reps = max(calibrate(lambda: cd(xd), 0.01), calibrate(lambda: ex(x), 0.01))
                    r = paired(lambda: cd(xd), lambda: ex(x), pairs=a.pairs, reps=reps)
                    row[kernel] = r["ratio_median"]
            print(f"c={c} side={hw} blocks={nb}: per-block {row['per-block']:.2f}x, "
                  f"grouped {row['grouped']:.2f}x (ideal {nb}x)", flush=True)
            rows.append(row)
    m = machine()
    write_json(RESULTS / "block_conv_sizes.json", {"machine": m, "threads": a.threads,
                                                   "batch": a.batch, "rows": rows})
    lines = ["# Block executor vs dense conv, by layer size", "",
             f"Command: `PYTHONPATH=src python benchmarks/block_conv_sizes.py --threads {a.threads} "
             f"--pairs {a.pairs}`; batch {a.batch}, {a.threads} thread(s), "
             f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; {m.get('cpu', '')}.", "",
             "Conv c->c, 3x3, padding 1; n diagonal channel-granular blocks (ideal n x). "
             "Speedup = median of paired ratios, dense in its faster memory format.", "",
             "| channels | input side | blocks (ideal) | dense format | per-block | grouped |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['channels']} | {r['side']} | {r['blocks']} | {r['dense_format']} | "
                     f"{r['per-block']:.2f}x | {r['grouped']:.2f}x |")
    (RESULTS / "block_conv_sizes.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
