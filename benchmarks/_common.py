"""Shared by the benchmark scripts: the machine description and paired, interleaved timing."""
from __future__ import annotations

import platform
import statistics
import sys
import time

import torch


def machine() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "command": " ".join([sys.executable.split("/")[-1]] + sys.argv)}


def paired(fa, fb, pairs: int = 20, reps: int = 1) -> dict:
    """Run A and B alternately; per pair, ratio = time(A) / time(B) (>1: B is faster)."""
    ta, tb = [], []
    for _ in range(pairs):
        t0 = time.perf_counter()
        for _ in range(reps):
            fa()
        t1 = time.perf_counter()
        for _ in range(reps):
            fb()
        t2 = time.perf_counter()
        ta.append((t1 - t0) / reps)
        tb.append((t2 - t1) / reps)
    ratios = [a / b for a, b in zip(ta, tb)]
    return {"ratio_median": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "a_median_s": statistics.median(ta),
            "b_median_s": statistics.median(tb), "pairs": pairs}
