"""Fault injection for the crash-safety tests.

With TICKETSMITH_FAULT="point:n" in the environment, the process kills itself with SIGKILL the
n-th time it reaches `point` (no cleanup, no atexit: like a power cut); "point:n:INT" or
"point:n:TERM" sends SIGINT (Ctrl-C) or SIGTERM (a scheduler stopping the job) instead, which
unwind through the code's own clean-up. Without the variable, `reach()` costs one dictionary
lookup. Points: "write" (an atomic write whose temporary file is written but not yet renamed),
"iteration", "epoch" (an epoch finished, not yet checkpointed), "mask" (a round's mask decided,
not yet saved), "round" (between rounds), "regroup" (before each layer's partitioning inside
`ts.regroup`), "refill" (before each layer's channel choice inside `ts.refill`).
"""
from __future__ import annotations

import os
import signal

SIGNALS = {"KILL": signal.SIGKILL, "INT": signal.SIGINT, "TERM": signal.SIGTERM}
_seen: dict[str, int] = {}  # per process; in-process tests clear it between runs


def reach(point: str) -> None:
    spec = os.environ.get("TICKETSMITH_FAULT")
    if not spec:
        return
    name, n, sig = (spec.split(":") + ["", ""])[:3]
    if name != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == int(n or 1):
        os.kill(os.getpid(), SIGNALS[sig or "KILL"])
