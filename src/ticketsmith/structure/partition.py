"""Partition the rows of a sparse mask into balanced groups of similar rows (regroup's step 2).

The mask is read as a hypergraph: every non-empty row is a vertex, every column is a hyperedge
joining the rows that have a nonzero in it. Two partitioners:

- ``"metis"`` (default; PyPI ``pymetis``, MIT/Apache-2.0). METIS partitions graphs, not
  hypergraphs, so the hypergraph is turned into a row-similarity graph: rows i and j are joined
  with weight = their Jaccard similarity (shared nonzero columns / columns used by either; the
  similarity the paper names), scaled to integers. Each row keeps its `METIS_NEIGHBOURS` most
  similar rows (union-symmetrised), so the graph stays small on wide layers. METIS then cuts
  as little similarity as possible into `n_parts` balanced parts.
- ``"kahypar"`` (optional extra ``pip install ticketsmith[kahypar]``, GPLv3+): a true hypergraph
  partition minimising the connectivity metric (km1), with the preset shipped next to this
  file. KaHyPar runs in a child Python process: its library ends the process on a bad
  configuration (status 255), so any failure there reaches the caller as `PartitionerError`
  while the caller's process lives on. There is never a silent fallback to METIS.
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..errors import TicketsmithError, UsageError

PARTITIONERS = ("metis", "kahypar")
KAHYPAR_PRESET = Path(__file__).with_name("kahypar_km1_direct.ini")
METIS_NEIGHBOURS = 64     # similarity-graph degree per row before symmetrising
_SIM_SCALE = 1000         # METIS wants positive integer edge weights
_MARK = "TICKETSMITH-PARTITION "


class PartitionerError(TicketsmithError, RuntimeError):
    """The partitioner itself failed (crashed, exited, or returned something unusable)."""


@contextmanager
def one_thread():
    """Run torch ops on one intra-op thread, then restore the caller's setting. Regroup's tensors
    are small (a few MB); with two threads on the shared 2-vCPU machine, OpenMP synchronisation
    made whole-model regroup 7-8x slower in wall time (and in CPU time) than one thread."""
    before = torch.get_num_threads()
    if before == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def partition_rows(mask2d: torch.Tensor, n_parts: int, partitioner: str = "metis", seed: int = 0,
                   imbalance: float = 0.1, *, kahypar_preset: str | os.PathLike | None = None,
                   timeout_s: float = 900.0) -> torch.Tensor:
    """Split the non-empty rows of a `rows x cols` mask into `n_parts` balanced groups of rows
    that share nonzero columns.

    Returns an int64 tensor with one part id in ``[0, n_parts)`` per row, and -1 for rows that
    have no nonzero (they are not vertices of the hypergraph and belong to no group). Parts hold
    at most about ``(1 + imbalance) * rows / n_parts`` rows. Deterministic for a fixed `seed`.
    `kahypar_preset` replaces the shipped KaHyPar preset (an .ini file of KaHyPar options);
    `timeout_s` bounds the KaHyPar child process.
    """
    with one_thread():
        return _partition_rows(mask2d, n_parts, partitioner, seed, imbalance, kahypar_preset,
                               timeout_s)


def _partition_rows(mask2d, n_parts, partitioner, seed, imbalance, kahypar_preset, timeout_s):
    if not isinstance(mask2d, torch.Tensor) or mask2d.dim() != 2:
        raise UsageError("partition_rows expects a 2-D mask tensor (rows x columns)")
    if partitioner not in PARTITIONERS:
        raise UsageError(f"unknown partitioner {partitioner!r}; choose one of: {', '.join(PARTITIONERS)}")
    if isinstance(n_parts, bool) or not isinstance(n_parts, int) or n_parts < 1:
        raise UsageError(f"n_parts must be an integer >= 1, got {n_parts!r}")
    if not (isinstance(imbalance, (int, float)) and 0 < imbalance < 1):
        raise UsageError(f"imbalance must be in (0, 1), got {imbalance!r}")
    m = (mask2d.detach().to("cpu") != 0).to(torch.float32)   # any nonzero counts as kept
    live = torch.nonzero(m.amax(dim=1) > 0).flatten()
    parts = torch.full((m.shape[0],), -1, dtype=torch.int64)
    n = live.numel()
    if n_parts > n:
        raise UsageError(f"cannot split {n} non-empty rows into {n_parts} parts")
    sub = m[live] != 0 if partitioner == "kahypar" else m[live]
    if n_parts == 1:
        found = np.zeros(n, dtype=np.int64)
    elif n_parts == n:
        found = np.arange(n, dtype=np.int64)  # one row per part: nothing to choose
    elif partitioner == "metis":
        found = _metis(sub, n_parts, seed, imbalance)
    else:
        found = _kahypar(sub, n_parts, seed, imbalance, kahypar_preset, timeout_s)
    if found.shape != (n,) or found.min() < 0 or found.max() >= n_parts:
        raise PartitionerError(f"{partitioner} returned an invalid partition")
    parts[live] = torch.from_numpy(found.astype(np.int64))
    return parts


# -- METIS on the row-similarity graph ---------------------------------------------------------
def similarity_graph(sub: torch.Tensor, neighbours: int = METIS_NEIGHBOURS
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """CSR (xadj, adjncy, integer weights) of the Jaccard row-similarity graph of a 0/1
    `rows x cols` matrix (bool or float) whose rows are all non-empty; each row keeps its
    `neighbours` most similar rows (ties: lower row index), then the graph is made symmetric."""
    n = sub.shape[0]
    f = sub if sub.dtype == torch.float32 else sub.to(torch.float32)
    inter = f @ f.T  # exact: counts stay far below 2**24
    deg = inter.diagonal().clone()
    jac = inter / (deg[:, None] + deg[None, :] - inter)
    jac.fill_diagonal_(0.0)
    w = torch.clamp(torch.round(jac * _SIM_SCALE), min=1.0) * (jac > 0)
    k = min(neighbours, n - 1)
    if k < n - 1:
        # top-k by weight; equal weights resolve by lower index (integer weights: the key
        # weight * n - index is exact in float64 and never ties, so the graph is deterministic)
        key = w.to(torch.float64) * n - torch.arange(n, dtype=torch.float64)[None, :]
        order = torch.topk(key, k, dim=1).indices
        keep = torch.zeros_like(w, dtype=torch.bool)
        keep.scatter_(1, order, True)
        keep &= w > 0
        keep |= keep.T.clone()
        w = w * keep
    adj = w > 0
    xadj = np.zeros(n + 1, dtype=np.int64)
    xadj[1:] = np.cumsum(adj.sum(dim=1).numpy())
    rows, cols = torch.nonzero(adj, as_tuple=True)  # row-major order: CSR as is
    return xadj, cols.numpy().astype(np.int64), w[rows, cols].numpy().astype(np.int64)


def _metis(sub: torch.Tensor, n_parts: int, seed: int, imbalance: float) -> np.ndarray:
    import pymetis

    xadj, adjncy, eweights = similarity_graph(sub)
    opts = pymetis.Options(seed=int(seed), ufactor=max(1, int(round(imbalance * 1000))))
    if hasattr(pymetis, "CSRAdjacency"):    # pymetis >= 2025.2
        graph = {"adjacency": pymetis.CSRAdjacency(xadj.tolist(), adjncy.tolist())}
    else:
        graph = {"xadj": xadj.tolist(), "adjncy": adjncy.tolist()}
    try:
        _, membership = pymetis.part_graph(n_parts, **graph, eweights=eweights.tolist() or None,
                                           options=opts, recursive=False)
    except Exception as e:  # pymetis raises plain RuntimeErrors from the C library
        raise PartitionerError(f"METIS failed: {e}") from e
    return np.asarray(membership, dtype=np.int64)


# -- KaHyPar in a child process ----------------------------------------------------------------
# Runs with `python -c`, so it imports neither torch nor ticketsmith (fast start). Reads one JSON
# request on stdin, prints the block ids on one marked line. KaHyPar may print or exit(255) on
# its own; the parent sees that as the exit status and the captured output.
_WORKER = r"""
import json, sys
import kahypar
req = json.loads(sys.stdin.read())
h = kahypar.Hypergraph(req["n"], len(req["index"]) - 1, req["index"], req["pins"], req["k"])
ctx = kahypar.Context()
ctx.loadINIconfiguration(req["preset"])
ctx.setK(req["k"])
ctx.setEpsilon(req["epsilon"])
ctx.setSeed(req["seed"])
ctx.suppressOutput(True)
kahypar.partition(h, ctx)
sys.stdout.flush()
print(MARK + json.dumps([h.blockID(i) for i in range(req["n"])]), flush=True)
""".replace("MARK", repr(_MARK))


def kahypar_available() -> bool:
    """Whether the optional KaHyPar partitioner is installed."""
    return importlib.util.find_spec("kahypar") is not None


def _kahypar(sub: torch.Tensor, n_parts: int, seed: int, imbalance: float,
             preset: str | os.PathLike | None, timeout_s: float) -> np.ndarray:
    if not kahypar_available():
        raise UsageError("partitioner 'kahypar' needs the optional KaHyPar package (GPLv3+): "
                         "pip install ticketsmith[kahypar]")
    preset = Path(preset) if preset is not None else KAHYPAR_PRESET
    if not preset.is_file():
        raise UsageError(f"KaHyPar preset {str(preset)!r} does not exist")
    n = sub.shape[0]
    # hyperedges = columns joining two or more rows (a single-pin column never adds to km1)
    colsize = sub.sum(dim=0)
    edges = sub[:, colsize >= 2].T.contiguous()  # one row per hyperedge
    if edges.shape[0] == 0:
        # nothing ties any two rows together: every balanced split is optimal
        return np.arange(n, dtype=np.int64) % n_parts
    pins = torch.nonzero(edges, as_tuple=True)[1]
    index = np.zeros(edges.shape[0] + 1, dtype=np.int64)
    index[1:] = np.cumsum(edges.sum(dim=1).numpy())
    request = json.dumps({"n": n, "k": n_parts, "epsilon": float(imbalance), "seed": int(seed),
                          "preset": str(preset.resolve()), "index": index.tolist(),
                          "pins": pins.tolist()})
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSTARTUP"}
    try:
        proc = subprocess.run([sys.executable, "-c", _WORKER], input=request, capture_output=True,
                              text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired as e:
        raise PartitionerError(f"KaHyPar did not finish within {timeout_s:g} s") from e
    except OSError as e:
        raise PartitionerError(f"could not start the KaHyPar child process: {e}") from e
    result = [line for line in proc.stdout.splitlines() if line.startswith(_MARK)]
    if proc.returncode != 0 or not result:
        tail = " | ".join((proc.stdout + proc.stderr).strip().splitlines()[-4:])
        raise PartitionerError(f"KaHyPar failed with exit status {proc.returncode} "
                               f"(preset {preset}): {tail or 'no output'}")
    found = np.asarray(json.loads(result[-1][len(_MARK):]), dtype=np.int64)
    if found.shape != (n,):
        raise PartitionerError(f"KaHyPar returned {found.shape[0]} block ids for {n} rows")
    return found


def connectivity(mask2d: torch.Tensor, parts: torch.Tensor) -> int:
    """The km1 metric of a row partition: over the columns, (number of parts a column's nonzero
    rows fall in) - 1, summed. Rows with part -1 are ignored. Lower = fewer columns shared
    across groups."""
    m = mask2d.detach().to("cpu") != 0
    keep = parts >= 0
    m, p = m[keep], parts[keep]
    if p.numel() == 0:
        return 0
    k = int(p.max()) + 1
    hit = torch.zeros(k, m.shape[1], dtype=torch.bool)
    for b in range(k):
        hit[b] = m[p == b].any(dim=0)
    per_col = hit.sum(dim=0)
    return int(torch.clamp(per_col - 1, min=0).sum())


__all__ = ["partition_rows", "PartitionerError", "one_thread", "PARTITIONERS", "KAHYPAR_PRESET",
           "kahypar_available", "connectivity", "similarity_graph"]
