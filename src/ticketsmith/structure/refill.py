"""Refill and Refill+ (paper §3.2, Alg. 2): turn an unstructured mask into whole output channels.

Per layer (or per coupled group) with unstructured sparsity s, score every output channel, keep
the k = ceil((1 - s) * c_out) best channels fully dense (their pruned weights grow back) and
drop the others whole: their weight rows, their bias and the affine weight and bias of the
per-channel norm they feed are all masked, so a dropped channel outputs exactly zero while the
ticket retrains and can later be removed without changing the network's function.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .. import faults
from ..errors import UsageError
from ..masks import Masks, copy_module
from .coupling import ChannelGroup, analyse
from .heads import AttentionHeads, attention_heads

CRITERIA = ("l1", "count", "feature-l1", "feature-l2", "saliency")
# How refill treats layers whose output channels meet at a residual addition (a coupled group):
#   none   each layer on its own, exactly the paper's Alg. 2 (and the authors' code);
#   shared one channel set for the group, from the summed scores and the combined sparsity;
#   union  each layer chooses as in `none`, then a channel stays in every layer of the group
#          if any of them keeps it (the residual stream is never narrower than its widest member).
COUPLINGS = ("none", "shared", "union")
DATA_CRITERIA = ("feature-l1", "feature-l2", "saliency")


def refill(model: nn.Module, masks: Masks, criterion: str = "l1", extra: float = 0.0,
           coupling: str = "none", data: Sequence[torch.Tensor] | torch.Tensor | None = None,
           example_inputs=None, layers: Sequence[str] | None = None) -> Masks:
    """Channel-wise structured masks from unstructured `masks` (Refill; Refill+ if `extra` > 0).

    - `criterion` scores each output channel (row) of a masked conv/linear layer, from the
      unstructured ticket (weights times mask): `l1` sum of |m*W| over the row (the paper's
      default), `count` surviving weights in the row, `feature-l1` / `feature-l2` the L1 / L2
      norm of the channel's output on the batch `data`, `saliency` the first-order Taylor
      estimate of the loss change when the channel is removed (Molchanov et al.): per sample
      |sum over positions of activation * gradient of the cross-entropy|, summed over the batch.
      The data criteria need `data = (x, y)` (`y` only for saliency; x normalised as for
      training); the model runs in eval mode, on a copy with the masks applied.
    - Each layer keeps k = ceil((1 - s_l) * c_out) whole channels, s_l its sparsity in `masks`;
      Refill+ keeps k + round(extra * (c_out - k)) (round half up), `extra` in [0, 1].
      Kept rows become fully dense, dropped rows fully zero. Ties go to the lower row index
      (coupled: the lower group channel id, which is the row index in a residual stage).
    - Channels a grouped conv (ResNeXt, RegNet; not depthwise) writes or reads are kept evenly
      over its groups: ceil(k / groups) from each (see `ChannelGroup.conv_groups`), since the
      conv keeps its `groups` and compaction can only cut as many channels from every group.
    - `coupling` (see `COUPLINGS`) decides what happens in a coupled group (see
      `channel_groups`: outputs added together, depthwise convs). `none`: every layer keeps its
      own k best rows, as the paper's Alg. 2; a channel one layer drops but a coupled partner
      keeps is zero in that layer's output yet still carried by the residual stream, so
      compaction cannot remove it there. `shared`: the group's masked layers keep one channel
      set, chosen from their summed scores (each layer's scores first divided by their sum, so
      that every layer has the same say), k from the group's combined sparsity (kept / total
      weights over its masked layers) counted over the group channels they cover; layers of the
      group without a mask are left alone (and count as dense, so the channels they write are
      not removable). `union`: each layer chooses as in `none`, then every masked layer of the
      group keeps the union of those sets; where the layers cover the same channels (a
      residual stage) this is at least the widest layer's k, hence never fewer than `shared`.
    - Attention (a timm-style module: `num_heads`, a fused qkv Linear and an output projection,
      see `structure.heads`) is refilled by whole heads, its structured unit: each head is
      scored by the sum of its q, k and v rows' scores (same criterion), the qkv layer keeps
      k = ceil((1 - s) * num_heads) heads (Refill+: plus round(extra * the rest)), their rows
      fully dense, and the other heads' q, k and v rows (and bias) are dropped, as are their
      columns of the projection where it is masked. A dropped head outputs exactly zero (its
      v is zero; zero q and k alone would leave a uniform softmax) and compaction removes it.
    - Layers whose outputs are the model's outputs (the classifier head, if masked) keep their
      mask unchanged: dropping a class is not a structure. Layers not in `masks` are untouched.
    - The result also holds the companions of the dropped channels (see `channel_companions`);
      blocks are dropped (a refilled layer is one block: its kept rows by all columns).
    - `layers`: the weight names to refill (default: every weight mask); the other masks pass
      through unchanged. With `layers=None` a layer whose mask is all zeros (global magnitude
      pruning can empty a depthwise layer) is skipped with a warning: its mask already drops
      every channel. Naming such a layer in `layers` is an error.
    `example_inputs`: a batch for tracing the graph (default: `data`'s inputs, else guessed).
    Neither `masks` nor the model (weights, BatchNorm statistics, training flags) changes.
    """
    if criterion not in CRITERIA:
        raise UsageError(f"unknown refill criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    if isinstance(extra, bool) or not isinstance(extra, (int, float)) or not 0.0 <= extra <= 1.0:
        raise UsageError(f"refill extra (the Refill+ rate) must be a number in [0, 1], got {extra!r}")
    if coupling not in COUPLINGS:
        raise UsageError(f"unknown refill coupling {coupling!r}; choose one of: {', '.join(COUPLINGS)}")
    x, y = _unpack(data, criterion)
    masks.check(model)
    if layers is None:
        chosen = [n for n in masks.weight_names if bool(masks[n].any())]
        empty = [n for n in masks.weight_names if n not in chosen]
        if empty:
            warnings.warn(f"refill: {len(empty)} layer(s) with an all-zero mask left as they are "
                          f"(every channel dropped): {', '.join(empty)}", stacklevel=2)
    else:
        chosen = [layers] if isinstance(layers, str) else list(layers)
        for name in chosen:
            if name not in masks.weight_names:
                raise UsageError(f"refill layers: {name!r} has no weight mask (masks hold: "
                                 f"{', '.join(masks.weight_names)})")
            if not bool(masks[name].any()):
                raise UsageError(f"mask {name!r} is all zeros: refill needs surviving weights "
                                 "to choose that layer's channels; leave it out of layers=")
    if example_inputs is None and x is not None:
        example_inputs = x[:1]  # the graph does not depend on the batch size
    graph = analyse(model, example_inputs)
    unknown = [n for n in masks.weight_names if n not in graph.group_of]
    if unknown:
        raise UsageError(f"refill handles conv and linear weights; {unknown[0]!r} is not one")

    # the layers to score and refill, output channels in dim 0 (a transposed conv stores them
    # in dim 1: it is refilled in that view and turned back below)
    transposed = _transposed(model)
    work = Masks({n: _out_major(masks[n], n in transposed) for n in chosen})
    scores = channel_scores(model, masks, criterion, x, y, layers=chosen)
    new = {}
    attention = [a for a in attention_heads(model)
                 if all(f"{n}.weight" in work and not graph.groups[graph.group_of[f"{n}.weight"]].output
                        for n, _ in a.inputs())]
    dropped_cols = {}  # projection weight name -> columns of the dropped heads
    for a in attention:
        rows, dropped_cols[f"{a.proj}.weight"] = _refill_heads(a, work, scores, extra)
        new.update(rows)
    by_heads = {f"{n}.weight" for a in attention for n, _ in a.inputs()}
    for group in graph.groups:
        names = [n for n in group.layers if n in work and n not in by_heads]
        if not names or group.output:
            continue
        faults.reach("refill")  # crash tests: an interruption between two groups' choices
        if coupling == "shared":
            new.update(_refill_unit(group, names, work, scores, extra))
            continue
        own = {}
        for n in names:
            own.update(_refill_unit(group, [n], work, scores, extra))
        if coupling == "union" and len(names) > 1:
            own = _union(group, own)
        new.update(own)
    for key, cols in dropped_cols.items():
        if key in work and cols.numel():  # they read exact zeros: the ticket does not keep them
            m = (new[key] if key in new else masks[key]).clone()
            m[:, cols.to(m.device)] = False
            new[key] = m
    new = {n: _out_major(m, n in transposed) for n, m in new.items()}
    result = masks.updated(new, drop_blocks=True)
    return graph.with_companions(result)


def _transposed(model: nn.Module) -> set[str]:
    """Weight names of the transposed convolutions (weight layout in x out x k...)."""
    return {f"{n}.weight" if n else "weight" for n, m in model.named_modules()
            if isinstance(m, nn.modules.conv._ConvNd) and m.transposed}


def _out_major(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.transpose(0, 1) if transposed else t


def refill_counts(c: int, kept: int, total: int, extra: float = 0.0) -> int:
    """Channels Refill (+) keeps out of `c` for `kept` of `total` weights surviving:
    k = ceil(kept / total * c), exactly (integer arithmetic), plus round(extra * (c - k))."""
    k = -(-kept * c // total)
    return k + int(math.floor(extra * (c - k) + 0.5))


def _refill_unit(group: ChannelGroup, unit: list[str], masks: Masks,
                 scores: dict[str, torch.Tensor], extra: float) -> dict[str, torch.Tensor]:
    """One shared channel set for the layers of `unit` (a single layer: its own k rows).

    A single layer chooses among its own rows; several layers choose among the group channels
    they cover (ids in module order, then row order: in a residual stage, the row index)."""
    if len(unit) == 1:
        rows = masks[unit[0]].shape[0]
        index = {unit[0]: torch.arange(rows)}
        channels = rows
    else:
        index, channels = group.index, group.channels
    covered = torch.zeros(channels, dtype=torch.bool)
    channel_score = torch.zeros(channels, dtype=torch.float64)
    kept = total = 0
    for n in unit:
        covered[index[n]] = True
        s = scores[n]
        norm = float(s.sum())
        # normalised so that layers of different fan-in (or feature scale) weigh the same
        channel_score.index_add_(0, index[n], s / norm if len(unit) > 1 and norm > 0 else s)
        kept += int(masks[n].sum())
        total += masks[n].numel()
    cand = torch.nonzero(covered).flatten()  # ascending channel ids
    keep_n = refill_counts(len(cand), kept, total, extra)
    keep_ch = torch.zeros(channels, dtype=torch.bool)
    conv_groups = group.conv_groups
    if conv_groups is not None and len(unit) == 1:
        conv_groups = conv_groups[group.index[unit[0]]]  # over the layer's own rows
    if conv_groups is None or bool((conv_groups[cand] < 0).any()):
        classes = [cand]
    else:
        # a grouped conv writes or reads these channels: the same number from each of its
        # groups (rounded up), as only that can be removed (it keeps its `groups`)
        classes = [cand[conv_groups[cand] == j] for j in conv_groups[cand].unique()]
        keep_n = -(-keep_n // len(classes))
    for cls in classes:
        # stable sort: equal scores keep ascending channel order, so ties go to the lower index
        order = torch.sort(channel_score[cls], descending=True, stable=True).indices
        keep_ch[cls[order[:keep_n]]] = True
    out = {}
    for n in unit:
        rows = keep_ch[index[n]]
        m = masks[n]
        out[n] = rows.to(m.device).view(-1, *([1] * (m.dim() - 1))).expand_as(m).clone()
    return out


def _refill_heads(att: AttentionHeads, masks: Masks, scores: dict[str, torch.Tensor],
                  extra: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The masks of the q, k, v Linears (`att.inputs()`) keeping whole heads (as many as their
    joint density warrants, the best by the summed scores of their q, k and v rows) and the
    projection columns of the dropped ones."""
    keys = [(f"{n}.weight", parts) for n, parts in att.inputs()]
    head_score = sum(att.part(scores[k], held, p).flatten(1).sum(dim=1) for k, held in keys for p in held)
    keep_n = refill_counts(att.num_heads, sum(int(masks[k].sum()) for k, _ in keys),
                           sum(masks[k].numel() for k, _ in keys), extra)
    # stable sort: equal scores keep ascending head order, so ties go to the lower index
    order = torch.sort(head_score, descending=True, stable=True).indices
    kept, dropped = order[:keep_n], order[keep_n:]
    new = {}
    for name, rows_kept in att.input_rows(kept).items():
        mask = masks[f"{name}.weight"]
        rows = torch.zeros(mask.shape[0], dtype=torch.bool)
        rows[rows_kept] = True
        new[f"{name}.weight"] = rows.to(mask.device).view(-1, *[1] * (mask.dim() - 1)).expand_as(mask).clone()
    return new, att.proj_cols(dropped)


def _union(group: ChannelGroup, rows: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Every layer of the group keeps each group channel that any of its layers keeps."""
    keep = torch.zeros(group.channels, dtype=torch.bool)
    for n, m in rows.items():
        keep[group.index[n][m.reshape(m.shape[0], -1).any(dim=1)]] = True
    return {n: keep[group.index[n]].to(m.device).view(-1, *([1] * (m.dim() - 1))).expand_as(m).clone()
            for n, m in rows.items()}


def _unpack(data, criterion: str):
    if criterion not in DATA_CRITERIA:
        return None, None
    if data is None:
        raise UsageError(f"refill criterion {criterion!r} needs data: pass a batch (x, y)")
    if isinstance(data, torch.Tensor):
        x, y = data, None
    elif isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
    else:
        raise UsageError("refill data must be a batch (x, y) of tensors")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or len(x) == 0:
        raise UsageError("refill data: x must be a non-empty floating-point tensor "
                         "(normalise the batch as for training)")
    if criterion == "saliency":
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or len(y) != len(x):
            raise UsageError("refill criterion 'saliency' needs labels: data = (x, y) with y "
                             "int64 class indices, one per input")
    return x, y


def channel_scores(model: nn.Module, masks: Masks, criterion: str = "l1",
                   x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                   layers: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
    """Per masked layer (or those in `layers`), a float64 CPU score for each output channel
    (higher = more important), computed on the unstructured ticket (weights times mask). See
    `refill` for the criteria."""
    params = dict(model.named_parameters())
    names = masks.weight_names if layers is None else list(layers)
    tr = _transposed(model)
    if criterion == "l1":
        return {n: _out_major((params[n].detach() * masks[n].to(params[n].device)).abs(), n in tr)
                .reshape(_out_major(masks[n], n in tr).shape[0], -1).sum(dim=1).double().cpu()
                for n in names}
    if criterion == "count":
        return {n: (lambda m: m.reshape(m.shape[0], -1).sum(dim=1).double().cpu())(
            _out_major(masks[n], n in tr)) for n in names}
    if criterion not in DATA_CRITERIA:
        raise UsageError(f"unknown refill criterion {criterion!r}; choose one of: {', '.join(CRITERIA)}")
    if x is None:
        raise UsageError(f"refill criterion {criterion!r} needs data: pass a batch (x, y)")

    # A copy carries the ticket: the caller's weights, statistics and gradients stay untouched.
    ticket = copy_module(model)
    masks.apply(ticket)
    ticket.eval()
    device = next(ticket.parameters()).device
    x = x.to(device)
    modules = {n: ticket.get_submodule(n.rsplit(".", 1)[0]) if "." in n else ticket for n in names}
    acc = {n: torch.zeros(_out_major(masks[n], n in tr).shape[0], dtype=torch.float64)
           for n in names}

    def per_channel(n, t: torch.Tensor) -> torch.Tensor:
        # (batch, channels, positions): channels are dim 1 for convs, the last dim for linear
        if isinstance(modules[n], nn.Linear) and t.dim() > 2:
            t = t.movedim(-1, 1)
        return t.reshape(t.shape[0], t.shape[1], -1).double()

    def hook(n):
        def record(module, inputs, output):
            if criterion == "feature-l1":
                acc[n] += per_channel(n, output.detach()).abs().sum(dim=(0, 2)).cpu()
            elif criterion == "feature-l2":
                acc[n] += per_channel(n, output.detach()).pow(2).sum(dim=(0, 2)).cpu()
            else:
                # the value now and the gradient of this very value (a tensor hook registered
                # before any in-place op downstream receives the gradient of the old value)
                a = per_channel(n, output.detach().clone())  # in-place ops may follow

                def taylor(g: torch.Tensor) -> None:
                    acc[n].add_((a * per_channel(n, g)).sum(dim=2).abs().sum(dim=0).cpu())
                output.register_hook(taylor)
        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        if criterion == "saliency":
            for p in ticket.parameters():
                p.requires_grad_(False)  # only activation gradients are needed
            with torch.enable_grad():
                logits = ticket(x.detach().requires_grad_(True))
                F.cross_entropy(logits, y.to(device)).backward()
        else:
            with torch.no_grad():
                ticket(x)
    finally:
        for h in handles:
            h.remove()
    if criterion == "feature-l2":
        acc = {n: v.sqrt() for n, v in acc.items()}
    return acc


__all__ = ["refill", "refill_counts", "channel_scores", "CRITERIA", "DATA_CRITERIA", "COUPLINGS"]
