"""Fault injection for the crash-safety tests.

With TICKETSMITH_FAULT="point:n" in the environment, the process kills itself with SIGKILL the
n-th time it reaches `point` (no cleanup, no atexit: like a power cut). Without the variable,
`reach()` costs one dictionary lookup. Points: "write" (an atomic write whose temporary file is
written but not yet renamed), "iteration", "epoch" (an epoch finished, not yet checkpointed),
"mask" (a round's mask decided, not yet saved), "round" (between rounds), "regroup" (before
each layer's partitioning inside `ts.regroup`).
"""
from __future__ import annotations

import os
import signal

_seen: dict[str, int] = {}


def reach(point: str) -> None:
    spec = os.environ.get("TICKETSMITH_FAULT")
    if not spec:
        return
    name, _, n = spec.partition(":")
    if name != point:
        return
    _seen[point] = _seen.get(point, 0) + 1
    if _seen[point] == int(n or 1):
        os.kill(os.getpid(), signal.SIGKILL)
