"""Channel couplings, found from the model's graph (torch-pruning's `DependencyGraph`, as
`graph` builds it).

Two layers are *coupled* when their output channels are tied by index: their outputs meet at a
residual addition (or any elementwise op), or one is a depthwise conv whose channels follow its
producer's. A channel of a coupled group can only be removed physically if it is removed from
every member. Concatenation is not a tie: `cat([a(x), b(x)])` puts a's and b's channels side by
side, so a and b stay in separate groups (unless something else ties them), and the
BatchNorm after the concatenation serves both, each on its own slice.

`channel_groups` describes every conv/linear layer's group; `channel_companions` adds the 1-D
masks (conv/linear bias, the per-channel norm's affine weight and bias that follow) that make a
channel whose weight rows are all zero output exactly zero, and the masks of a ViT's position
embedding and class token (a value per token and channel, added to the channels or put
beside them along the tokens: zeroed on a dead channel as a bias is; `Masks.companions`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch
from torch import nn
from torch_pruning import ops as tpops
from torch_pruning._helpers import _HybridIndex

from ..errors import UsageError
from ..masks import PRUNABLE_TYPES, Masks
from ..models.norms import PrunableGroupNorm, PrunableLayerNorm
from .graph import (DependencyGraph, IndexMappingFailed, axis_through, op_name, output_shape,
                    unwrapped_parameter)

# Norms with a per-channel affine: zeroing a channel's affine weight and bias makes their
# output exactly zero on that channel, whatever its input. A GroupNorm's or LayerNorm's
# statistics mix the channels; a dead channel stays in them as zeros (compaction cuts it with a
# `models.norms.PrunableGroupNorm` / `PrunableLayerNorm`, which keeps counting it). A LayerNorm
# normalises the last axis (timm's LayerNorm2d permutes an NCHW map to it first): it is a
# companion where the channels followed from the layer are in that axis (`_walk_forward`).
CHANNEL_NORMS = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                 nn.GroupNorm, PrunableGroupNorm, nn.LayerNorm, PrunableLayerNorm)

# Layers whose output channels form groups: the prunable conv / linear layers and transposed
# convolutions (UNet decoders), whose weight stores output channels in dim 1.
LAYER_TYPES = PRUNABLE_TYPES + (nn.modules.conv._ConvTransposeNd,)

# Graph nodes without parameters that carry channel indices through (possibly remapped by
# torch-pruning's index mapping): the forward walk from a layer to its norms passes them.
_PASS = {tpops.OPTYPE.ELEMENTWISE, tpops.OPTYPE.CONCAT, tpops.OPTYPE.SPLIT, tpops.OPTYPE.RESHAPE,
         tpops.OPTYPE.SLICE, tpops.OPTYPE.EXPAND, tpops.OPTYPE.UNBIND}

# Input sizes tried, smallest first (tracing runs a forward), when no example input is given:
# the zoo's datasets (digits, Fashion-MNIST, CIFAR, Tiny-ImageNet, ImageNet). Any size that runs
# gives the same graph: a flatten into a fixed-size linear layer only runs at its own size.
_TRIAL_SIZES = (8, 16, 28, 32, 64, 224)


@dataclass(frozen=True, eq=False)
class ChannelGroup:
    """Conv/linear layers whose output channels are tied by the graph, and what hangs on them.

    `index[name]` is an int64 tensor over the parameter's channel axis giving, for each entry,
    the group channel (0 .. channels-1) it belongs to, or -1 if it is not in this group:
      - for each of `layers` (weight names): over the output rows; every row is in the group;
      - for each of `companions` (1-D parameter names: the layers' biases and the affine weight
        and bias of the per-channel norms they feed): over the entries; a norm after a
        concatenation serves several groups, each on its own slice (-1 elsewhere);
      - for each of `consumers` (weight names of the layers reading the group's channels):
        over their *input* channels (`in_channels`, or `in_features` where a flatten spreads a
        channel over several features); a layer of the group that also reads its channels is
        listed among the layers only.
    In a plain residual stage every layer's index is `arange(channels)`.
    `output` is True when the channels are the model's outputs (the classifier head): they
    cannot be dropped.
    `conv_groups` (int64 over the group channels, or None) is set where a grouped conv (ResNeXt,
    RegNet; not depthwise) writes or reads the channels: the conv group each channel falls in
    (ids over all such convs together; -1 for channels none of them touches). Such a conv keeps
    its `groups`, so channels can only go evenly from each of its groups.
    """
    layers: tuple[str, ...]
    channels: int
    companions: tuple[str, ...] = ()
    consumers: tuple[str, ...] = ()
    index: Mapping[str, torch.Tensor] = field(default_factory=dict)
    output: bool = False
    conv_groups: torch.Tensor | None = None

    def __repr__(self) -> str:
        return (f"ChannelGroup(layers={list(self.layers)}, channels={self.channels}, "
                f"companions={list(self.companions)}, consumers={list(self.consumers)}"
                + (", output=True" if self.output else "") + ")")


@dataclass
class Feed:
    """Entries `positions` of a companion are fed by output rows `rows` of `layer`."""
    layer: str
    positions: torch.Tensor
    rows: torch.Tensor


@dataclass
class Coupling:
    """The analysis behind `channel_groups` and `channel_companions` (computed once, reused)."""
    groups: list[ChannelGroup]
    group_of: dict[str, int]            # layer weight name -> position in `groups`
    feeds: dict[str, list[Feed]]        # companion name -> the layer rows feeding its entries
    external: set[str]                  # companions that also see a non-layer input: never zeroed
    sizes: dict[str, int]               # companion name -> number of entries
    transposed: frozenset = frozenset()  # weights stored in x out x k (transposed convs)
    # companion of more than one dimension (a position embedding, a class token) -> (the axis
    # of its channels, its shape): its mask repeats the channels' entries along the others
    layout: Mapping[str, tuple[int, tuple[int, ...]]] = field(default_factory=dict)

    def companion_masks(self, masks: Masks) -> dict[str, torch.Tensor]:
        """For every companion fed by a masked layer: True where some feeding row survives."""
        alive_rows = {}
        for n in masks.weight_names:
            m = masks[n].transpose(0, 1) if n in self.transposed else masks[n]
            alive_rows[n] = m.reshape(m.shape[0], -1).any(dim=1)
        out = {}
        for comp, feeds in self.feeds.items():
            if not any(f.layer in alive_rows for f in feeds) and comp not in masks:
                continue
            size = self.sizes[comp]
            fed = torch.zeros(size, dtype=torch.bool)
            alive = torch.zeros(size, dtype=torch.bool)
            for f in feeds:
                rows = alive_rows.get(f.layer)
                # a layer without a mask is dense: its rows are all alive
                a = rows[f.rows].cpu() if rows is not None else torch.ones(len(f.rows), dtype=torch.bool)
                fed[f.positions] = True
                alive[f.positions] |= a
            keep = alive | ~fed
            if comp in self.external:
                keep[:] = True
            if comp in self.layout:
                axis, shape = self.layout[comp]
                keep = keep.view([-1 if d == axis else 1 for d in range(len(shape))]).expand(shape)
            out[comp] = keep
        return out

    def with_companions(self, masks: Masks) -> Masks:
        """`masks` with its companions' masks (`companion_masks`) set."""
        new = self.companion_masks(masks)
        return masks.updated(new, companions=[c for c in new if c in self.layout])


def example_inputs_for(model: nn.Module) -> torch.Tensor:
    """One random input the model accepts (a batch of 1), guessed from its first layer.

    Linear first layers take `(1, in_features)`; 2-D convs are tried at the zoo's image sizes.
    Raises UsageError when no guess runs: pass `example_inputs` explicitly then."""
    first = next((m for m in model.modules() if isinstance(m, PRUNABLE_TYPES)), None)
    p = next(model.parameters(), None)
    device = p.device if p is not None else torch.device("cpu")
    if isinstance(first, nn.Linear):
        candidates = [(1, first.in_features)]
    elif isinstance(first, nn.Conv2d):
        candidates = [(1, first.in_channels, s, s) for s in _TRIAL_SIZES]
    elif isinstance(first, nn.Conv1d):
        candidates = [(1, first.in_channels, s) for s in (16, 32, 64, 128, 256)]
    else:
        candidates = []
    with _eval_mode(model), torch.no_grad():
        for shape in candidates:
            x = torch.randn(shape, device=device)
            try:
                model(x)
                return x
            except (RuntimeError, ValueError):
                continue
    raise UsageError(f"cannot guess an input shape for {type(model).__name__}: "
                     "pass example_inputs (a batch the model accepts)")


class _eval_mode:
    """Eval mode inside the block, each module's own training flag restored after."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc):
        for m, t in self.flags:
            m.training = t
        return False


class _UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, a):
        self.parent.setdefault(a, a)
        root = a
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[a] != root:  # path compression
            self.parent[a], a = root, self.parent[a]
        return root

    def union(self, a, b) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra


def analyse(model: nn.Module, example_inputs=None) -> Coupling:
    """Trace the model once and compute its channel groups, companions and feeds.

    The model is traced in eval mode (BatchNorm statistics do not move); each module's training
    flag is restored afterwards. Nothing else about the model changes."""
    if example_inputs is None:
        example_inputs = example_inputs_for(model)
    p = next(model.parameters(), None)
    example_inputs = _as_leaves(example_inputs, p.device if p is not None else torch.device("cpu"))
    names = {m: n for n, m in model.named_modules()}
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LAYER_TYPES)]
    if not layers:
        raise UsageError(f"{type(model).__name__} has no conv or linear layer")
    wname = {m: (f"{n}.weight" if n else "weight") for n, m in layers}

    with _eval_mode(model), torch.enable_grad():
        # a tensor is one input (torch-pruning would first try `model(*x)`, i.e. unbatched rows)
        forward = (lambda mod, inputs: mod(inputs)) if isinstance(example_inputs, torch.Tensor) else None
        try:
            dg = DependencyGraph().build_dependency(model, example_inputs, forward_fn=forward,
                                                    verbose=False)
        except UsageError:
            raise
        except Exception as e:  # the tracer's own failures are of many kinds
            msg = str(e).splitlines()[0][:200] if str(e) else ""
            raise UsageError(f"the graph tracer cannot follow {type(model).__name__}: "
                             f"{type(e).__name__}: {msg}; check that example_inputs is a batch "
                             "the model accepts") from None

    # -- ties between output rows (union-find over (layer, row)) and consumers ---------------
    rows_uf, layers_uf = _UnionFind(), _UnionFind()
    consumed: list[tuple[str, list[int], str, list[int]]] = []  # (consumer, in_idxs, layer, rows)
    for n, m in layers:
        layers_uf.find(wname[m])
        if m not in dg.module2node:  # not used in forward: a group of its own
            continue
        pruner = dg.get_pruner_of_module(m)
        c_out = _out_channels(m)
        try:
            group = dg.get_pruning_group(m, pruner.prune_out_channels, list(range(c_out)))
        except IndexMappingFailed:
            continue  # the graph cannot say what its channels tie to: a group of its own
        for item in group:
            t = item.dep.target.module
            if t not in wname:
                continue
            tp_pruner = dg.get_pruner_of_module(t)
            if item.dep.handler == tp_pruner.prune_out_channels:  # depthwise: in == out
                for i, r in zip(item.idxs, item.root_idxs):
                    rows_uf.union((wname[m], r), (wname[t], i))
                layers_uf.union(wname[m], wname[t])
            elif item.dep.handler == tp_pruner.prune_in_channels:
                consumed.append((wname[t], list(item.idxs), wname[m], list(item.root_idxs)))

    # -- groups, with channel ids in order of first appearance (module order, row order) ------
    members: dict = {}
    for n, m in layers:
        members.setdefault(layers_uf.find(wname[m]), []).append(m)
    groups_raw = []
    group_of: dict[str, int] = {}
    for gi, mods in enumerate(members.values()):
        ids: dict = {}
        index = {}
        for m in mods:
            w = wname[m]
            idx = [ids.setdefault(rows_uf.find((w, r)), len(ids)) for r in range(_out_channels(m))]
            index[w] = torch.tensor(idx, dtype=torch.int64)
            group_of[w] = gi
        groups_raw.append(([wname[m] for m in mods], len(ids), index))

    # -- feeds: forward walk from each layer to the per-channel norms it reaches -------------
    feeds: dict[str, list[Feed]] = {}
    reaches_output: set[str] = set()
    norms_seen = set()
    blind_norms = set()
    unmapped_layers = set()  # layers whose channels could not be followed
    unknown: set[str] = set()  # norm parameters fed through a node without index mapping
    params = dict(model.named_parameters())
    pname = {id(p): n for n, p in params.items()}
    layout: dict = {}  # companions of several dimensions -> (channel axis, shape)
    for n, m in layers:
        w = wname[m]
        if getattr(m, "bias", None) is not None:
            r = torch.arange(_out_channels(m))
            feeds.setdefault(f"{n}.bias" if n else "bias", []).append(Feed(w, r, r))
        if m not in dg.module2node:
            continue
        try:
            hits, out, reached, embedded = _walk_forward(dg, dg.module2node[m], _out_channels(m))
        except IndexMappingFailed:
            # where its channels go is not known: no norm it feeds is zeroed (see
            # `_has_external_source`), and its channels count as shown by the model's output
            reaches_output.add(w)
            unmapped_layers.add(m)
            continue
        if out:
            reaches_output.add(w)
        for node in reached:  # which of its channels a norm there sees is not known
            blind_norms.add(node)
            nn_name = names[node.module]
            unknown.update(f"{nn_name}.{pn}" if nn_name else pn for pn in ("weight", "bias"))
        for src, p_axis, pos, rows in embedded:
            full = pname[id(src.module)]
            layout[full] = (p_axis, tuple(src.module.shape))
            feeds.setdefault(full, []).append(
                Feed(w, torch.tensor(pos, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64)))
        for node, pos, rows in hits:
            norms_seen.add(node)
            nn_name = names[node.module]
            for pn in ("weight", "bias"):
                full = f"{nn_name}.{pn}" if nn_name else pn
                if full in params:
                    feeds.setdefault(full, []).append(
                        Feed(w, torch.tensor(pos, dtype=torch.int64), torch.tensor(rows, dtype=torch.int64)))

    external = {c for c in unknown if c in feeds}
    zeroable = {n for n in norms_seen if n not in blind_norms
                and getattr(n.module, "weight", None) is not None}
    # (a parameter zeroed with the rows that reach it is no source of the norms after it)
    embeddings = frozenset(id(params[c]) for c in layout)
    for node in norms_seen:
        if _has_external_source(node, zeroable, unmapped_layers, embeddings):
            nn_name = names[node.module]
            external.update(f"{nn_name}.{pn}" if nn_name else pn for pn in ("weight", "bias"))

    # -- assemble the public groups ----------------------------------------------------------
    groups = []
    for gi, (lnames, channels, index) in enumerate(groups_raw):
        index = dict(index)
        comps = []
        for comp, fs in feeds.items():
            mine = [f for f in fs if group_of[f.layer] == gi]
            if not mine:
                continue
            size = params[comp].shape[layout[comp][0] if comp in layout else 0]
            idx = torch.full((size,), -1, dtype=torch.int64)
            for f in mine:
                idx[f.positions] = index[f.layer][f.rows]
            index[comp] = idx
            comps.append(comp)
        cons = []
        for consumer, in_idxs, layer, rows in consumed:
            if group_of[layer] != gi:
                continue
            if max(in_idxs, default=-1) >= _in_channels(model, consumer):
                # the graph maps the channels past the consumer's inputs: it reads them along
                # another axis (a linear layer over the transposed token axis of an MLP-Mixer),
                # so it is no channel consumer of this group
                continue
            if consumer in lnames:
                # it reads channels of the group it writes (NeXt-ViT: a concatenation with the
                # stream, projected back onto it): its index is over its output rows, which its
                # inputs must not overwrite; compaction checks what it cuts anyway
                continue
            if consumer not in index:
                index[consumer] = torch.full((_in_channels(model, consumer),), -1,
                                             dtype=torch.int64)
                cons.append(consumer)
            index[consumer][torch.tensor(in_idxs)] = index[layer][torch.tensor(rows)]
        groups.append(ChannelGroup(layers=tuple(lnames), channels=channels,
                                   companions=tuple(comps), consumers=tuple(cons),
                                   index=MappingProxyType(index),
                                   output=any(w in reaches_output for w in lnames),
                                   conv_groups=_conv_groups(model, channels, index, lnames, cons)))
    transposed = frozenset(wname[m] for _, m in layers
                           if isinstance(m, nn.modules.conv._ConvNd) and m.transposed)
    return Coupling(groups, group_of, feeds, external,
                    {c: int(params[c].shape[layout[c][0] if c in layout else 0]) for c in feeds},
                    transposed, MappingProxyType(layout))


def _conv_groups(model: nn.Module, channels: int, index: dict, layers, consumers
                 ) -> torch.Tensor | None:
    """See `ChannelGroup.conv_groups`: per group channel, its group in the grouped convs that
    write (`layers`) or read (`consumers`) it; several such convs: their groups intersected."""
    split = []
    for name, side in [(n, "out") for n in layers] + [(n, "in") for n in consumers]:
        mod = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        if not isinstance(mod, nn.modules.conv._ConvNd) or mod.groups == 1 or mod.transposed \
                or mod.groups == mod.out_channels:  # (depthwise: its channels follow one by one)
            continue
        width = mod.out_channels if side == "out" else mod.in_channels
        ids = torch.full((channels,), -1, dtype=torch.int64)
        where = index[name] >= 0
        ids[index[name][where]] = torch.arange(width)[where] // (width // mod.groups)
        split.append(ids)
    if not split:
        return None
    stacked = torch.stack(split, dim=1)  # channels x convs
    touched = (stacked >= 0).any(dim=1)
    out = torch.full((channels,), -1, dtype=torch.int64)
    if bool(touched.any()):
        out[touched] = torch.unique(stacked[touched], dim=0, return_inverse=True)[1]
    return out


def _out_channels(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _in_channels(model: nn.Module, name: str) -> int:
    mod = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels


def _forward_deps(node):
    outs = set(map(id, node.outputs))
    return [d for d in node.dependencies if d.source is node and id(d.target) in outs]


def _moved(node, axis: int | None, rank: int) -> int | None:
    """Where a view / transpose puts the channel axis `axis` of its rank-`rank` input (None:
    not known, or not kept whole)."""
    return axis_through(node, axis, rank) if axis is not None and rank else None


def _reads_last_axis(module: nn.Module) -> bool:
    """A LayerNorm, normalising the last axis of what reaches it (timm's LayerNorm2d: of its
    map permuted to NHWC, as the graph shows it)."""
    if isinstance(module, PrunableLayerNorm):
        return module.channels_last
    return isinstance(module, nn.LayerNorm)


def _walk_forward(dg, root, c_out: int):
    """From a layer's node, follow its channels forward through parameter-free ops (mapping
    indices through concat/split/flatten as torch-pruning does) to the per-channel norms they
    reach. Returns ([(norm node, positions, rows)], reaches the model's output, norms reached
    past a node without index mapping). Past such a node (a channel shuffle, see `graph`) the
    channels' positions are not known: the walk goes on only to learn whether the model's
    output or a norm is reached (whose channels are then never zeroed), unless the node is a
    view that keeps the channel axis whole (LeViT's linear layer on tokens, flattened into the
    batch for its BatchNorm1d): the channel axis is followed from the layer (a linear layer's
    last, a conv's 1) through such views and transposes, and a norm reached that way counts
    where it reads the channels in axis 1."""
    start = [_HybridIndex(idx=i, root_idx=i) for i in range(c_out)]
    shape = output_shape(root)
    axis = None if shape is None else (len(shape) - 1 if isinstance(root.module, nn.Linear) else 1)
    # (node, indices, channel axis of its output or None, passed a node without mapping)
    stack, seen, hits, out = [(root, start, axis, False)], set(), [], False
    embedded: list = []
    blind: list = []
    while stack:
        node, idxs, axis, viewed = stack.pop()
        deps = _forward_deps(node)
        if not deps:
            out = True  # nothing consumes it: a model output
        rank = len(output_shape(node) or ())
        for dep in deps:
            new = idxs
            for mapping in dep.index_mapping:
                if mapping is not None:
                    new = mapping(new)
            if not new:
                continue
            t = dep.target
            if t.type == tpops.OPTYPE.OUTPUT:
                out = True
            elif isinstance(t.module, CHANNEL_NORMS):
                if _reads_last_axis(t.module):
                    if axis is None or axis != rank - 1 or \
                            len(getattr(t.module, "normalized_shape", (0,))) != 1:
                        blind.append(t)  # normalises another axis than the channels
                        continue
                elif viewed and axis != 1:
                    blind.append(t)  # reads another axis than the one followed
                    continue
                hits.append((t, [i.idx for i in new], [i.root_idx for i in new]))
                # on past it: a norm zeroed with these rows outputs zero, and a norm further
                # on (PoolFormer's norm2 after its token mixer on norm1) is fed by them too
                key = (id(t), tuple(new))
                if key not in seen:
                    seen.add(key)
                    turned = op_name(t) in ("transpose", "permute")  # (LayerNorm2d's way back)
                    stack.append((t, new, _moved(t, axis, rank) if turned else axis, viewed))
            elif t in dg.unmapped:
                moved = _moved(t, axis, rank) if t.type == tpops.OPTYPE.RESHAPE else None
                if moved is not None:
                    key = (id(t), tuple(new), moved)
                    if key not in seen:
                        seen.add(key)
                        stack.append((t, new, moved, True))
                else:
                    blind.append(t)
            elif t in dg.interleaved:  # trailing axes merged into the last, the channels
                key = (id(t), tuple(new))
                if key not in seen:
                    seen.add(key)
                    merged = len(output_shape(t) or ()) - 1 if axis == rank - 1 else None
                    stack.append((t, new, merged, viewed))
            elif t.type in _PASS:
                key = (id(t), tuple(new))
                if key not in seen:
                    seen.add(key)
                    for src, p_axis in _embeddings(dg, t, axis):
                        embedded.append((src, p_axis, [i.idx for i in new],
                                         [i.root_idx for i in new]))
                    turned = op_name(t) in ("transpose", "permute", "select", "mean", "sum")
                    stack.append((t, new, _moved(t, axis, rank) if turned else axis, viewed))
            # any other node (a layer, a channel-mixing norm, attention, ...) ends the walk
    reached, seen_blind = set(), set()
    while blind:
        node = blind.pop()
        if id(node) in seen_blind:
            continue
        seen_blind.add(id(node))
        deps = _forward_deps(node)
        if not deps:
            out = True
        for dep in deps:
            t = dep.target
            if t.type == tpops.OPTYPE.OUTPUT:
                out = True
            elif isinstance(t.module, CHANNEL_NORMS):
                reached.add(t)
            elif t.type in _PASS or t in dg.unmapped:
                blind.append(t)
    return hits, out, reached, embedded


def _embeddings(dg, node, axis: int | None) -> list:
    """[(parameter node, its channel axis)] for the parameters of no torch layer that an
    addition adds to the channels reaching `node`, holding a value per channel and position
    (ViT's position embedding), or that a concatenation along the positions puts beside them
    (its class token, expanded over the batch): refill zeroes their entries of a dead channel,
    as a bias's. Only parameters used as laid out (or expanded) qualify."""
    out = output_shape(node)
    if axis is None or out is None:
        return []
    joins = node in dg.position_concats
    if not joins and op_name(node) not in ("add", "sub"):
        return []
    found = []
    for i in node.inputs:
        src = i
        while src.type != tpops.OPTYPE.PARAMETER and op_name(src) == "expand" \
                and len(src.inputs) == 1:
            src = src.inputs[0]
        if src.type != tpops.OPTYPE.PARAMETER:
            continue
        p = src.module
        p_axis = axis - (len(out) - p.dim())
        if p_axis < 0 or p.shape[p_axis] != out[axis] or (
                not joins and sum(size > 1 for size in p.shape) < 2):
            continue
        found.append((src, p_axis))
    return found


def _as_leaves(inputs, device):
    """The example inputs on the model's device, floating tensors as leaves requiring grad: the
    graph is then traced even with frozen parameters, and the model input shows up in autograd
    as a leaf (AccumulateGrad), told apart from constants (no autograd node at all)."""
    if isinstance(inputs, torch.Tensor):
        t = inputs.detach().to(device)
        return t.clone().requires_grad_(True) if t.is_floating_point() else t
    if isinstance(inputs, (list, tuple)):
        return type(inputs)(_as_leaves(v, device) for v in inputs)
    if isinstance(inputs, dict):
        return {k: _as_leaves(v, device) for k, v in inputs.items()}
    return inputs


def _leaf_operand(grad_fn, own: frozenset = frozenset()) -> bool:
    """An autograd input that is a leaf requiring grad: the model input (see `_as_leaves`) or a
    tensor used as is. Constants (scalars, buffers) have no node (None) and are harmless: an
    all-zero channel plus a constant is a constant, which the masked norm turns into zero.
    The norm's own parameters (ids in `own`) are no source: a norm-act layer (timm's
    BatchNormAct2d) applies its affine inside its forward, where the graph sees it as an
    operand of an element-wise node before the module's own node."""
    return (grad_fn is not None and hasattr(grad_fn, "variable")  # AccumulateGrad
            and id(grad_fn.variable) not in own)


def _has_external_source(norm_node, zeroable: set = frozenset(), unmapped: set = frozenset(),
                         embeddings: frozenset = frozenset(), _seen: set | None = None) -> bool:
    """Whether the norm's input depends on something other than conv/linear layers (and
    constants) through parameter-free ops: the model input, a parameter added to it, another
    norm that has such a source. Such a norm channel carries information even when every
    feeding layer row is zero, so it is never zeroed. A parameter multiplying the channels (a
    layer scale) keeps a zero channel zero: no source. Another norm on the way is none either
    where refill zeroes it with the same rows (one of `zeroable`: reached by the forward walks
    with its channels known, with an affine weight) and it has no such source itself: the
    forward walk from a layer goes on past a norm, so its rows feed this norm too, and with
    them zero it outputs zero. A layer among `unmapped` (whose channels the forward walk
    could not follow: its rows feed no norm) is a source too: its live rows would go unseen.
    A parameter among `embeddings` (ids: a position embedding, a class token; `_embeddings`)
    is none: refill zeroes it with the rows that reach it, which reach this norm too."""
    seen = _seen if _seen is not None else set()
    stack = list(norm_node.inputs)
    own = frozenset(id(p) for p in norm_node.module.parameters(recurse=False)) | embeddings
    if any(_leaf_operand(f[0], own) for f in getattr(norm_node.grad_fn, "next_functions", ())[:1]):
        return True
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node.module, LAYER_TYPES):
            if node.module in unmapped:
                return True
            continue
        if isinstance(node.module, CHANNEL_NORMS):
            if node not in zeroable or _has_external_source(node, zeroable, unmapped, embeddings,
                                                            seen):
                return True
            continue
        if node.type not in _PASS:
            return True
        ins = node.inputs
        fns = getattr(node.grad_fn, "next_functions", ())
        if op_name(node) == "mul":  # times a parameter (a layer scale): zero stays zero
            ins = [i for i in ins if unwrapped_parameter(i) is None]
            fns = [f for f in fns if not isinstance(getattr(f[0], "variable", None), nn.Parameter)]
        ins = [i for i in ins if unwrapped_parameter(i) is None
               or id(unwrapped_parameter(i).module) not in embeddings]
        if any(_leaf_operand(f[0], own) for f in fns):
            return True  # an operand that is no layer's output: the model input, a constant
        if not ins:
            return True
        stack.extend(ins)
    return False


def channel_groups(model: nn.Module, example_inputs=None) -> list[ChannelGroup]:
    """The channel groups of every conv and linear layer of the model, in module order.

    Each layer (by weight name, `<module>.weight`) is in exactly one group; a layer whose
    outputs are tied to nobody is a group of its own. `example_inputs` is a batch the model
    accepts (guessed from the first layer if omitted). See `ChannelGroup`."""
    return analyse(model, example_inputs).groups


def channel_companions(model: nn.Module, masks: Masks, example_inputs=None,
                       coupling: Coupling | None = None) -> Masks:
    """`masks` plus companion masks, so that a channel whose weight rows are all zero
    outputs exactly zero (in train and eval mode).

    For every bias and per-channel norm affine weight/bias fed by a masked layer, an entry is
    False exactly when every layer row feeding it (through parameter-free ops, e.g. the convs
    of a residual addition before a post-addition BatchNorm) is entirely zero in `masks`; a
    layer without a mask counts as dense. A norm that also sees the model input or another
    non-layer source is never zeroed. A parameter of no layer holding a value per channel and
    position that an addition adds to the channels (a position embedding), or that a
    concatenation along the tokens puts beside them (a class token), is zeroed likewise along
    its channel axis (listed in the result's `companions`: no weight); the norms after it then
    see no other source. Existing companion masks for these parameters are replaced;
    everything else (weight masks, blocks) is kept. `masks` is not modified."""
    masks.check(model)
    coupling = coupling if coupling is not None else analyse(model, example_inputs)
    return coupling.with_companions(masks)


__all__ = ["ChannelGroup", "Coupling", "Feed", "analyse", "channel_groups", "channel_companions",
           "example_inputs_for", "CHANNEL_NORMS"]
