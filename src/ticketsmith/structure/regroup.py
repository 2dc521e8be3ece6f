"""Regroup (paper §3.3, Alg. 3): turn an unstructured mask into dense blocks.

Each prunable layer's mask is read as a `c_out x n` matrix (n = c_in*kh*kw in PyTorch's OIHW
order for a conv, in_features for a linear layer). Its rows are partitioned into groups of rows
that share nonzero columns (hypergraph partitioning, `partition.py`); in each group the columns
most used by the group form a dense block with the group's rows; this repeats on what is left
while a block can still be found. The new mask is the union of the blocks: pruned entries inside
a block grow back (refill), everything outside every block is dropped.

Hyper-parameters (names from the paper and the authors' code):
- `t1`: the paper's t1, the number of row groups per pass (authors: 8).
- `width_ratio` (float, 1.5): the authors' width rule (their code calls it t1; it is not the
  paper's t1). A group's columns are ordered by how many of the
  group's rows use them (ties: lower column first) and the block width w grows 1, 2, ... until
  every row of the group has w > width_ratio * (its nonzeros outside the top-w columns), i.e. the block
  holds most of every row. (Unlike the authors' code, each row's outside count is updated with
  the column that was actually added, in sorted order, and for every row.)
- `t2` (int or None): the paper's column threshold: only a column with at least t2 nonzeros
  (kept weights) among the group's rows can join a block, which caps w. For a channel column
  that counts the kept positions of the channel over the group's rows. Default None = per group
  max(2, ceil(min(d, 1/2) * group rows * kh*kw)) (kh*kw = 1 for element columns), d = the
  layer's density before regrouping: a block column must be at least as dense as the layer was
  (but a column half full always qualifies: it refills no more than it keeps, and without this
  cap a 95%-dense layer could only use full columns), and never hold a single weight only (the
  paper's Figure 2 example uses 2). With a fixed count instead, the later
  passes of the while loop turn scattered leftovers into sparse "blocks" (measured: 1% noise
  around 8 planted blocks of a 512 x 4608 mask gave 24 extra blocks at ~5% density with t2=2;
  with the default none), since the width_ratio rule alone can always be met by widening.
- `b1` (int, 16): minimum rows of a block (authors: 16).
- `b2` (int, 16): minimum width of a block in *element* columns (for both granularities).
  The authors have none; 16 fp32 = one 512-bit vector, the narrowest width that fills a SIMD
  register of the CPUs this project targets. Narrower leftovers are dropped.

Two additions to the authors' rule, both to keep a block exactly what the mask supports:
- once w stops, the block still takes every further candidate column that *every* row of the
  group uses (at element granularity such a column costs no refill): without it a fully dense
  group would be cut at w = 0.6 n (the width_ratio rule) and the rest fragmented over later passes;
- a group row that has no nonzero inside the block's columns is left out of the block (its block
  row would be pure refill); it stays available for the next pass.

Small layers: the authors' defaults target 64-512-channel layers; ours go down to 8 rows and 9
columns. With `t1=None` (the default) a layer with R non-empty rows gets
n = clamp(R // b1, 1, 8) groups, so groups hold about b1 rows or more; an explicit `t1` is
used as given (more groups than non-empty rows is an error). Then, per layer:
- b1' = min(b1, max(1, R // (2 n))): a block may lose up to half of an equal share of rows (to the
  partitioner's imbalance, and to rows with nothing in the block's columns) and still count
  (e.g. 4 for an 8-row layer, 16 from 256 rows up);
- b2' = min(b2, max(1, floor(k / 2))), k = the layer's average kept weights per row: a block
  need not be wider than half a typical row (e.g. 1 for an 8 x 9 first conv at 30% density,
  6 for a 6 x 25 LeNet conv at 50%; 16 for every VGG-16 conv but the first at 80% sparsity);
- an explicit t2 becomes min(t2, b1' * kh*kw); the auto t2 never asks more than a full column.
Later passes use min(n, remaining rows // b1') groups. `regroup_settings` returns these values.
A layer that ends with no block at all is an error that names the layer and what to lower; a
fully dense layer is one block covering it; an all-zero layer is an error.

`granularity="element"`: columns are single (c_in, kh, kw) positions (the paper).
`granularity="channel"`: columns are whole input channels (a channel is used by a row if any of
its kh*kw positions is nonzero: that is what the partition, the column order and the width_ratio rule
count; t2 counts kept positions, so block columns stay as dense as the layer in weights; a
selected channel brings all its kh*kw columns), which runs as a dense (grouped) convolution.
For linear layers both are the same.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence

import torch

from .. import faults
from ..errors import UsageError
from ..masks import Block, Masks
from .partition import PARTITIONERS, one_thread, partition_rows

DEFAULT_GROUPS = 8
GRANULARITIES = ("element", "channel")


class NoBlockError(UsageError):
    """Regroup found no dense block in a layer (the message names the layer and what to lower)."""


# -- checks and effective settings -------------------------------------------------------------
def _check_args(t1, partitioner, width_ratio, t2, b1, b2, granularity, imbalance, seed,
                max_passes) -> None:
    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    if t1 is not None and (not is_int(t1) or t1 < 1):
        raise UsageError(f"t1 (the number of groups) must be an integer >= 1 (or None), got {t1!r}")
    if partitioner not in PARTITIONERS:
        raise UsageError(f"unknown partitioner {partitioner!r}; choose one of: {', '.join(PARTITIONERS)}")
    if granularity not in GRANULARITIES:
        raise UsageError(f"unknown granularity {granularity!r}; choose one of: {', '.join(GRANULARITIES)}")
    if isinstance(width_ratio, bool) or not isinstance(width_ratio, (int, float)) or not (math.isfinite(width_ratio) and width_ratio > 0):
        raise UsageError(f"width_ratio must be a finite number > 0, got {width_ratio!r}")
    if t2 is not None and (not is_int(t2) or t2 < 1):
        raise UsageError(f"t2 (column threshold) must be an integer >= 1 (or None), got {t2!r}")
    for label, v in (("b1 (minimum block rows)", b1), ("b2 (minimum block columns)", b2)):
        if not is_int(v) or v < 1:
            raise UsageError(f"{label} must be an integer >= 1, got {v!r}")
    if isinstance(imbalance, bool) or not isinstance(imbalance, (int, float)) or not 0 < imbalance < 1:
        raise UsageError(f"imbalance must be in (0, 1), got {imbalance!r}")
    if not is_int(seed):
        raise UsageError(f"seed must be an integer, got {seed!r}")
    if max_passes is not None and (not is_int(max_passes) or max_passes < 1):
        raise UsageError(f"max_passes must be an integer >= 1 (or None), got {max_passes!r}")


def _units(mask: torch.Tensor, granularity: str, kernel_numel: int) -> tuple[torch.Tensor, int]:
    """The `c_out x units` float matrix regroup works on (kept weights per row and unit: 0/1 for
    elements, 0..kh*kw for channels) and how many element columns a unit is."""
    c_out = mask.shape[0]
    if mask.dim() > 2:
        kernel_numel = math.prod(mask.shape[2:])
    flat = mask.reshape(c_out, -1)
    if granularity == "element" or kernel_numel == 1:
        return flat.to(torch.float32), 1
    if flat.shape[1] % kernel_numel:
        raise UsageError(f"kernel_numel={kernel_numel} does not divide the {flat.shape[1]} columns")
    return flat.reshape(c_out, -1, kernel_numel).sum(dim=2, dtype=torch.float32), kernel_numel


def _plan(mask: torch.Tensor, name: str, granularity: str, kernel_numel: int,
          t1: int | None, t2: int | None, b1: int, b2: int
          ) -> tuple[torch.Tensor, int, dict]:
    """The unit matrix of a layer, the unit width, and the effective hyper-parameters."""
    mat, unit = _units(mask, granularity, kernel_numel)
    rows = int((mat.amax(dim=1) > 0).sum())
    if rows == 0:
        raise UsageError(f"layer {name!r}: the mask is all zeros; nothing to regroup")
    if t1 is None:
        n = max(1, min(DEFAULT_GROUPS, rows // b1))
    else:
        if t1 > rows:
            raise UsageError(f"layer {name!r}: t1={t1} is larger than its {rows} "
                             "non-empty rows; use t1 <= rows (or None to choose per layer)")
        n = t1
    b1e = min(b1, max(1, rows // (2 * n)))
    row_nnz = float(mask.sum()) / mask.shape[0]          # average kept weights per row
    eff = {"t1": n, "b1": b1e, "t2": None if t2 is None else min(t2, b1e * unit),
           "b2": min(b2, max(1, int(row_nnz / 2))), "rows": rows,
           "density": float(mask.sum()) / mask.numel()}
    return mat, unit, eff


def regroup_settings(masks: Masks, t1: int | None = None, *, t2: int | None = None,
                     b1: int = 16, b2: int = 16, granularity: str = "element",
                     layers: Sequence[str] | None = None) -> dict[str, dict]:
    """Per layer, the effective hyper-parameters `regroup` uses with these arguments:
    ``{"t1", "b1", "t2", "b2", "rows", "density"}``: rows = non-empty rows, density = the
    layer's density (kept weights / weights), t2 None = per group
    max(2, ceil(min(density, 1/2) * group rows * kh*kw))."""
    _check_args(t1, "metis", 1.0, t2, b1, b2, granularity, 0.1, 0, None)
    masks = _as_masks(masks)
    return {name: _plan(masks[name], name, granularity, 1, t1, t2, b1, b2)[2]
            for name in _layer_names(masks, layers)}


def _as_masks(masks) -> Masks:
    if isinstance(masks, Masks):
        return masks
    if isinstance(masks, Mapping):
        return Masks(masks)
    raise UsageError(f"regroup expects Masks, got {type(masks).__name__}")


def _layer_names(masks: Masks, layers: Sequence[str] | None) -> list[str]:
    if layers is None:
        return masks.weight_names
    if isinstance(layers, str):
        layers = [layers]
    names = list(layers)
    for n in names:
        if n not in masks:
            raise UsageError(f"layer {n!r} has no mask (masks hold: {', '.join(masks.weight_names)})")
        if masks[n].dim() < 2:
            raise UsageError(f"layer {n!r}: a 1-D mask has no rows and columns to regroup")
    return names


# -- the block search ----------------------------------------------------------------------------
def _block_in_group(remaining: torch.Tensor, earlier_rows: torch.Tensor,
                    earlier_cols: list[torch.Tensor], group: torch.Tensor, width_ratio: float,
                    t2: int | None, density: float, b1: int, b2: int, unit: int
                    ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The dense block of one row group, or None. `remaining` holds the kept weights per (row,
    unit column) that no block holds yet; `earlier_rows` (blocks x rows, bool) and
    `earlier_cols` are the blocks of earlier passes. Their columns are no candidates for a group
    that shares a row with them, so blocks never overlap."""
    sub = remaining[group]                                   # |G| x U
    used = sub if unit == 1 else (sub > 0).to(torch.float32)  # does the row use the column
    weights = sub.sum(dim=0)                                 # kept weights per column (exact)
    if earlier_cols:
        hit = torch.nonzero(earlier_rows[:, group].any(dim=1)).flatten().tolist()
        if hit:
            weights[torch.cat([earlier_cols[i] for i in hit])] = 0.0
    size = group.numel()
    area = size * unit                                       # weights in a full block column
    need = t2 if t2 is not None else min(area, max(2, math.ceil(min(density, 0.5) * area - 1e-9)))
    cand = torch.nonzero(weights >= need).flatten()
    if cand.numel() == 0:
        return None
    # candidates, most used first (ties: more kept weights, then lower column)
    users = used.sum(dim=0)[cand]
    key = users.to(torch.float64) * (area + 1) + weights[cand].to(torch.float64)   # exact
    perm = torch.sort(-key, stable=True).indices
    order, users = cand[perm], users[perm]
    # per row, used columns outside the top-w for w = 1..len(order), updated in sorted order for
    # every row; the rule holds at w when the row with the most left outside satisfies it
    outside = used.sum(dim=1, keepdim=True) - torch.cumsum(used[:, order], dim=1)
    width = torch.arange(1, order.numel() + 1, dtype=torch.float32)
    done = width > width_ratio * outside.amax(dim=0)
    w = int(torch.nonzero(done)[0]) + 1 if bool(done.any()) else order.numel()
    w = max(w, int((users == size).sum()))   # columns every row uses (elements: no refill)
    cols = order[:w]
    rows = group[used[:, cols].amax(dim=1) > 0]
    if rows.numel() < b1 or w * unit < b2:
        return None
    return rows, torch.sort(cols).values


def _regroup_units(mat: torch.Tensor, name: str, eff: dict, width_ratio: float, unit: int, partitioner: str,
                   seed: int, imbalance: float, max_passes: int | None
                   ) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], int]:
    """Blocks (rows, unit columns) of a `rows x units` matrix of kept weights, and the number
    of passes that found one."""
    remaining = mat.clone()    # written below; never the caller's mask
    found: list[tuple[torch.Tensor, torch.Tensor]] = []
    passes = 0
    b1 = eff["b1"]
    while max_passes is None or passes < max_passes:
        live = int((remaining.amax(dim=1) > 0).sum())
        if live < b1:
            break
        k = min(eff["t1"], max(1, live // b1))
        parts = partition_rows(remaining, k, partitioner, seed=seed, imbalance=imbalance)
        groups = [torch.nonzero(parts == p).flatten() for p in range(k)]
        groups = sorted((g for g in groups if g.numel() >= b1),
                        key=lambda g: (-g.numel(), int(g[0])))          # largest first
        # blocks of this pass cannot conflict with each other: the groups are row-disjoint
        earlier_rows = torch.zeros(len(found), mat.shape[0], dtype=torch.bool)
        for i, (rows, _) in enumerate(found):
            earlier_rows[i, rows] = True
        earlier_cols = [cols for _, cols in found]
        new = []
        for g in groups:
            blk = _block_in_group(remaining, earlier_rows, earlier_cols, g, width_ratio, eff["t2"],
                                  eff["density"], b1, eff["b2"], unit)
            if blk is None:
                continue
            rows, cols = blk
            remaining[rows[:, None], cols[None, :]] = 0.0
            new.append(blk)
        if not new:
            break
        found.extend(new)
        passes += 1
        if not remaining.any():
            break
    return found, passes


def _regroup_one(mask: torch.Tensor, name: str, t1, partitioner, width_ratio, t2, b1, b2, granularity,
                 seed, imbalance, max_passes, kernel_numel=1) -> tuple[list[Block], dict]:
    mask = mask.detach().to("cpu") != 0
    if mask.dim() < 2:
        raise UsageError(f"layer {name!r}: a 1-D mask has no rows and columns to regroup")
    mat, unit, eff = _plan(mask, name, granularity, kernel_numel, t1, t2, b1, b2)
    n_elem = mat.shape[1] * unit
    rows = eff["rows"]
    if bool(mask.all()):   # nothing pruned: the layer is one block
        everything = torch.arange(mask.shape[0], dtype=torch.int64)
        return [Block(everything, torch.arange(n_elem, dtype=torch.int64))], {**eff, "passes": 0}
    found, passes = _regroup_units(mat, name, eff, width_ratio, unit, partitioner, seed, imbalance, max_passes)
    if not found:
        raise NoBlockError(
            f"layer {name!r}: regroup found no dense block (rows={rows}, kept weights="
            f"{int(mask.sum())} of {mask.numel()}, effective t1="
            f"{eff['t1']}, b1={eff['b1']}, b2={eff['b2']}, t2={eff['t2'] or 'auto'}); lower b1, b2, "
            "t2 or t1, or leave this layer out (layers=...)")
    blocks = []
    for r, c in found:
        if unit > 1:   # channel units -> their kh*kw element columns
            c = (c[:, None] * unit + torch.arange(unit)[None, :]).flatten()
        blocks.append(Block(r.to(torch.int64).contiguous(), c.to(torch.int64).contiguous()))
    return blocks, {**eff, "passes": passes}


# -- public API ----------------------------------------------------------------------------------
def regroup_layer(mask: torch.Tensor, t1: int | None = None, partitioner: str = "metis", *,
                  width_ratio: float = 1.5, t2: int | None = None, b1: int = 16, b2: int = 16,
                  granularity: str = "element", seed: int = 0, imbalance: float = 0.1,
                  max_passes: int | None = None, kernel_numel: int = 1,
                  name: str = "layer") -> list[Block]:
    """The dense blocks regroup finds in one layer's mask (see the module docstring).

    `mask`: the layer's weight mask (c_out x c_in x kh x kw, or c_out x n). For a 2-D mask of a
    conv, `kernel_numel` = kh*kw tells `granularity="channel"` how wide a channel is. Blocks are
    disjoint; rows are sorted int64 row indices, cols sorted int64 indices into the flattened n
    axis (element indices for both granularities). `name` is used in error messages.
    """
    _check_args(t1, partitioner, width_ratio, t2, b1, b2, granularity, imbalance, seed, max_passes)
    if isinstance(kernel_numel, bool) or not isinstance(kernel_numel, int) or kernel_numel < 1:
        raise UsageError(f"kernel_numel must be an integer >= 1, got {kernel_numel!r}")
    if not isinstance(mask, torch.Tensor):
        raise UsageError(f"layer {name!r}: expected a mask tensor, got {type(mask).__name__}")
    mask = Masks({name: mask})[name]   # same binary check as every other mask
    with one_thread():
        return _regroup_one(mask, name, t1, partitioner, width_ratio, t2, b1, b2, granularity, seed,
                            imbalance, max_passes, kernel_numel)[0]


def regroup(masks: Masks, t1: int | None = None, partitioner: str = "metis", *,
            width_ratio: float = 1.5, t2: int | None = None, b1: int = 16, b2: int = 16,
            granularity: str = "element", seed: int = 0, layers: Sequence[str] | None = None,
            imbalance: float = 0.1, max_passes: int | None = None) -> Masks:
    """Regroup every weight mask (or those named in `layers`) into dense blocks.

    With `layers=None` a layer whose mask is all zeros (global magnitude pruning can empty a
    depthwise layer), or in which no dense block is found, is passed through unchanged (no
    blocks) with a warning instead of refusing the whole model; naming it in `layers` is an
    error.

    Returns new Masks: each regrouped layer's mask is the union of its blocks (refilled inside,
    empty outside) and ``result.blocks[layer]`` lists the blocks. Other entries (1-D companion
    masks, layers not named) are passed through unchanged. Deterministic for a fixed `seed`;
    the input is never modified. `t1=None` picks min(8, rows // b1) groups per layer
    (at least 1); `max_passes=None` repeats until no block is found. The (small) tensor ops run
    on one thread; the caller's `torch.get_num_threads()` is restored afterwards. Defaults and the
    small-layer policy are described in the module docstring; `regroup_settings` reports the
    effective values per layer and `regroup_stats` the outcome.
    """
    _check_args(t1, partitioner, width_ratio, t2, b1, b2, granularity, imbalance, seed, max_passes)
    masks = _as_masks(masks)
    new_masks, new_blocks = {}, {}
    names = _layer_names(masks, layers)
    if layers is None:
        empty = [n for n in names if masks[n].dim() >= 2 and not bool(masks[n].any())]
        if empty:
            warnings.warn(f"regroup: {len(empty)} layer(s) with an all-zero mask left as they "
                          f"are: {', '.join(empty)}", stacklevel=2)
            names = [n for n in names if n not in empty]
    unblocked: list[str] = []
    with one_thread():
        for name in names:
            faults.reach("regroup")  # crash tests: a kill between two layers' partitions
            m = masks[name]
            try:
                blocks, _ = _regroup_one(m, name, t1, partitioner, width_ratio, t2, b1, b2,
                                         granularity, seed, imbalance, max_passes)
            except NoBlockError:
                if layers is not None:
                    raise
                unblocked.append(name)  # its mask passes through: it compacts as a dense layer
                continue
            out = torch.zeros(m.shape[0], m[0].numel(), dtype=torch.bool)
            for blk in blocks:
                out[blk.rows[:, None], blk.cols[None, :]] = True
            new_masks[name] = out.view(m.shape)
            new_blocks[name] = blocks
    if unblocked:
        warnings.warn(f"regroup found no dense block in {len(unblocked)} layer(s), left "
                      f"unstructured (lower b1, b2, t2 or t1 to find some): {', '.join(unblocked)}",
                      stacklevel=2)
    return masks.updated(new_masks, blocks=new_blocks)


def regroup_stats(result: Masks, source: Masks | None = None) -> dict[str, dict]:
    """Per regrouped layer of `result`: number of blocks, their shapes (rows, element columns),
    rows covered, kept weights and sparsity; with the `source` masks regroup started from, also
    the density of the blocks before refill (source nonzeros inside the blocks / block area),
    the fraction of the source's nonzeros the blocks retain, and the refilled count."""
    out = {}
    for name, blocks in result.blocks.items():
        m = result[name]
        flat = m.reshape(m.shape[0], -1)
        area = sum(b.rows.numel() * b.cols.numel() for b in blocks)
        covered = torch.unique(torch.cat([b.rows for b in blocks])) if blocks else torch.empty(0)
        kept = int(flat.sum())
        st = {"blocks": len(blocks),
              "shapes": [(int(b.rows.numel()), int(b.cols.numel())) for b in blocks],
              "rows_covered": int(covered.numel()), "rows": int(flat.shape[0]),
              "kept": kept, "numel": flat.numel(), "sparsity": 1.0 - kept / flat.numel()}
        if source is not None and name in source:
            src = source[name].reshape(flat.shape[0], -1)
            inside = sum(int(src[b.rows[:, None], b.cols[None, :]].sum()) for b in blocks)
            total = int(src.sum())
            st.update({"source_kept": total, "source_sparsity": 1.0 - total / flat.numel(),
                       "block_density": inside / area if area else 0.0,
                       "retained": inside / total if total else 0.0,
                       "refilled": area - inside})
        out[name] = st
    return out


__all__ = ["NoBlockError", "regroup", "regroup_layer", "regroup_settings", "regroup_stats", "GRANULARITIES",
           "DEFAULT_GROUPS"]
