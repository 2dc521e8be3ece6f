"""torch-pruning's `DependencyGraph`, with the guards that real models (Swin, ShuffleNet) need.

torch-pruning reads the input sizes of a reshape and of a split / chunk from
`grad_fn._saved_self_sizes`, which the autograd nodes of torch 2.x call `_saved_self_sym_sizes`.
It then falls back to channel counts inferred from the neighbouring layers, right or wrong:

- its guard "only 2-D / 4-D reshapes" never fires, and every reshape whose inferred channel
  counts before and after differ gets a flatten (stride) mapping. A channel shuffle
  (ShuffleNet-v2: view to [N, g, C/g, H, W], transpose, view back) has counts inferred through
  the concatenation around it that can come out as zero: the stride `in // out` raises
  ZeroDivisionError and the graph cannot be built at all. The relative position bias of a Swin
  window attention (`table[index].view(N, N, -1)`) gets a stride-32 mapping inside a cycle of
  the attention graph (q, k, v, bias and softmax meet at element-wise nodes): every turn of
  the cycle multiplies the index list by 32 (768, 24576, 786432, ...) until memory runs out
  (> 8 GiB, ~40 MB/s);
- a `chunk` / `split` into equal parts gets chunk sizes inferred from its consumers (a
  concatenation reports its whole width) and offsets shorter than its outputs (IndexError in
  ShuffleNet-v2 once the reshapes are fixed); and it takes its i-th consumer edge to carry the
  i-th chunk, which holds only when the graph was traced in that order.

`DependencyGraph` here:
- keeps torch-pruning's mapping for the reshapes it was written for, a flatten of the channels
  ([N, C, *rest] into C * prod(rest) features, C being what the layers before it produce: a
  stride mapping describes it), maps a merge of trailing axes into the channels of a
  channels-last tensor ([..., a, b, C] into a * b * C features, the channels fastest: Swin's
  patch merging) with channel c -> features c, c + C, ... (`interleaved`; torch-pruning's
  stride mapping would take features c * a * b ..., the channels slowest), and leaves every
  other reshape without a mapping while
  torch-pruning computes its mappings, as its guard meant to: indices pass unchanged, the
  reshape stays in the groups it touches, and channel surgery keeps those groups whole unless
  the reshape keeps the features of the last dimension (a linear layer on a >2-D tensor).
  They are listed in `unmapped`, and the forward walk to a layer's norms does not map indices
  through them;
- leaves the slices and concatenations along the positions (tokens) of a channels-last tensor
  without a mapping (`position_slices`, `position_concats`): torch-pruning takes a slice or
  concatenation of dimension 1 for one of the channels, and would offset a ViT's patch tokens'
  channels by its class token's one "channel";
- gives a split along the channels its chunk sizes from its autograd node, and each consumer
  edge the chunk autograd says it carries (`output_nr`); a channel split whose edges cannot be
  told apart gets no mapping (and is listed in `unmapped`);
- computes the index mappings once per model state (parameter shapes) instead of once per
  group: torch-pruning recomputes all of them for every group, a second or more on a
  transformer; and looks up what a group holds in a dict, not by a scan of every item
  (`_IndexedGroup`: quadratic in the group's size otherwise);
- records which module attribute holds the sizes of each split along the channels, where the
  forward passes a module's own list to torch.split (`split_attrs`: channel surgery sets it to
  the new sizes), and which holds the shape each view / reshape of a parameter is given
  (`view_attrs`: timm's MetaFormer `Scale` views its layer scale to `self.shape`), and which
  int attribute of the module reshaping data sizes an axis of the shape it is given
  (`reshape_attrs`: torchvision's ViT reshapes its patches to `self.hidden_dim` channels);
- records the additions and subtractions whose other operand is a constant zero (`zero_adds`:
  their autograd nodes): timm's MobileOne adds a Python 0 where a block has no skip branch,
  which autograd shows as any constant operand would, and adding zero keeps a removed channel
  zero;
- lets an element-wise operand of one channel, broadcast over the channels of the other
  (FocalNet's gates), share no channel with it (`broadcasts`): torch-pruning ties channel i of
  every operand, and through FocalNet's slices of its gates the walk of a group shifted the
  indices by one each turn of a cycle, never repeating, until memory ran out;
- bounds every index mapping: none may produce more indices than `max_indices` (a few times
  the widest layer of the model: a list longer than any tensor dimension is no channel list),
  nor may the walk of a group gather more than that for one operation (a cycle whose mappings
  never repeat). Past it `IndexMappingTooLarge` is raised, naming where, before the list grows
  into gigabytes; a mapping that raises (torch-pruning's arithmetic on shapes it misread) or
  returns indices without their root channel raises `IndexMappingFailed` (the base class)
  likewise; its callers leave the group it belongs to whole.
"""
from __future__ import annotations

import warnings
from collections import Counter
from contextlib import contextmanager

import torch
import torch_pruning as tp
from torch import nn
from torch.overrides import TorchFunctionMode
from torch_pruning import _helpers
from torch_pruning.dependency import graph as tp_graph
from torch_pruning.dependency import index_mapping, shape_infer

from ..errors import UsageError
from ..models.norms import PrunableGRN, PrunableGroupNorm, PrunableLayerNorm
from ..models.norms import tracing as norm_tracing

OPTYPE = tp.ops.OPTYPE
_U64 = 1 << 64

# no mapping of a graph may produce more indices than this many times the widest layer, and at
# least MIN_INDICES (a list of (index, root) pairs costs ~100 bytes an entry: 1M is ~100 MB)
INDEX_FACTOR = 4
MIN_INDICES = 1 << 16

# torch-pruning's mapping class for the outputs of a split (private: absent, nothing is fixed)
_SPLIT_MAPPING = getattr(index_mapping, "_SplitIndexMapping", ())

# the node types whose index mappings torch-pruning (re)computes in `update_index_mapping`
_MAPPED_TYPES = (OPTYPE.CONCAT, OPTYPE.SPLIT, OPTYPE.RESHAPE, OPTYPE.UNBIND, OPTYPE.EXPAND,
                 OPTYPE.SLICE)


class IndexMappingFailed(UsageError):
    """An index mapping of torch-pruning's graph gave no channel list: its callers leave the
    group it belongs to whole."""


class IndexMappingTooLarge(IndexMappingFailed):
    """An index mapping of torch-pruning's graph produced more indices than any layer has."""


def widest(model: nn.Module) -> int:
    """The largest channel / feature count of the model's layers (1-D parameters included)."""
    best = 1
    for m in model.modules():
        for attr in ("in_channels", "out_channels", "in_features", "out_features",
                     "num_features", "num_parameters"):
            v = getattr(m, attr, None)
            if isinstance(v, int):
                best = max(best, v)
    for p in model.parameters():
        if p.dim() >= 1:
            best = max(best, max(int(s) for s in p.shape))
    return best


class _Bounded:
    """An index mapping that refuses to return more than `limit` indices."""

    def __init__(self, fn, limit: int, dep):
        self.fn, self.limit, self.dep = fn, limit, dep

    def __call__(self, idxs):
        stride = getattr(self.fn, "_stride", None)
        if stride is not None and not getattr(self.fn, "reverse", True) \
                and len(idxs) * stride > self.limit:
            self._fail(len(idxs) * stride)  # a flatten mapping: its size is known before
        try:
            out = self.fn(idxs)
        except (ArithmeticError, IndexError) as e:  # (its grouped-query mapping divides by a
            # head width it read as 0 from timm's GCViT / Hiera: no channel list either)
            raise IndexMappingFailed(
                f"torch-pruning's index mapping from {self.dep.source.name} to "
                f"{self.dep.target.name} failed ({type(e).__name__}: {e}): the graph maps "
                "channels through an operation it does not understand") from None
        if len(out) > self.limit:
            self._fail(len(out))
        if any(getattr(i, "root_idx", 0) is None for i in out):
            # (its grouped-query mapping of an expand drops them: HaloNet's, where the head
            # width it reads is not 0) no group can say which root channel an index is
            raise IndexMappingFailed(
                f"torch-pruning's index mapping from {self.dep.source.name} to "
                f"{self.dep.target.name} loses the channels' root indices: the graph maps "
                "channels through an operation it does not understand")
        return out

    def _fail(self, n: int):
        raise IndexMappingTooLarge(
            f"torch-pruning's index mapping from {self.dep.source.name} to {self.dep.target.name} "
            f"would hold {n} channel indices, more than {self.limit} (a few times the widest "
            "layer): the graph maps channels through an operation it does not understand")


class _InterleaveMapping:
    """Channel c of a channels-last tensor whose trailing axes are merged into `copies` * C
    features, the channels fastest (`DependencyGraph.interleaved`): features c + j * C, for
    j < copies; back (`reverse`): feature f -> channel f % C."""

    def __init__(self, channels: int, copies: int, reverse: bool = False):
        self.channels, self.copies, self.reverse = channels, copies, reverse

    def __call__(self, idxs):
        H, c = _helpers._HybridIndex, self.channels
        if self.reverse:
            return list(dict.fromkeys(H(idx=i.idx % c, root_idx=i.root_idx) for i in idxs))
        return [H(idx=i.idx + j * c, root_idx=i.root_idx) for j in range(self.copies)
                for i in idxs]


class _Mappings(list):
    """A dependency's `index_mapping` list: every mapping torch-pruning sets is bounded, and
    a split's offsets are those of the chunk the edge carries."""

    def __init__(self, items, graph: DependencyGraph, dep):
        super().__init__(items)
        self.graph, self.dep = graph, dep

    def __setitem__(self, i, fn):
        if isinstance(fn, _SPLIT_MAPPING):
            where = self.graph._chunk_of.get(id(self.dep))
            if where is not None:
                node, chunk = where
                # kept current by torch-pruning's SplitPruner; inside torch-pruning's own
                # build they are its inferred ones (maybe None), and set again after it
                sizes = node.module.split_sizes
                if sizes is not None and chunk < len(sizes) and all(
                        isinstance(v, int) for v in sizes[:chunk + 1]):
                    start = sum(sizes[:chunk])
                    fn.offset = [start, start + sizes[chunk]]
        if fn is not None and not isinstance(fn, _Bounded):
            fn = _Bounded(fn, self.graph.max_indices, self.dep)
        super().__setitem__(i, fn)


def saved_dim(d) -> int:
    """A dimension autograd saved (a negative one reads as an unsigned 64-bit number)."""
    d = int(d)
    return d - _U64 if d >= 1 << 63 else d


def _input_sizes(node):
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None:
        sizes = getattr(node.grad_fn, "_saved_self_sizes", None)
    return None if sizes is None else [int(s) for s in sizes]


def _concat_sizes(node, last: bool = False) -> list[int] | None:
    """The channel counts of a concatenation's inputs along dimension 1 (`last`: along the last
    dimension), read from autograd (what produced each input recorded its shape), or None if
    that is not known there. torch-pruning infers them from the layers around, which fails
    past a slice (DPN's dual paths: its own code then adds None)."""
    g = node.grad_fn
    dim = getattr(g, "_saved_dim", None)
    if g is None or dim is None:
        return None
    sizes = []
    try:
        for f, nr in g.next_functions:
            if f is None:
                return None  # an input without autograd history: not one of the graph's nodes
            shape = f._input_metadata[nr].shape
            axis = len(shape) - 1 if last else 1
            if saved_dim(dim) % len(shape) != axis:
                return None
            sizes.append(int(shape[axis]))
    except (AttributeError, IndexError, TypeError, RuntimeError, ZeroDivisionError):
        return None
    return sizes if len(sizes) == len(node.inputs) else None


def _from_linear(node, rank: int) -> bool:
    """What reaches `node` comes from a linear layer (channels last), through element-wise
    operations keeping its rank only (a residual addition, a pad, a slice)."""
    seen, stack = set(), list(node.inputs)
    while stack:
        n = stack.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        if n.type == OPTYPE.LINEAR:
            return True
        shape = output_shape(n)
        if n.type not in (OPTYPE.ELEMENTWISE, OPTYPE.SLICE) or shape is None or len(shape) != rank:
            return False
        stack.extend(n.inputs)
    return False


def _split_dim(node) -> int | None:
    sizes, dim = _input_sizes(node), getattr(node.grad_fn, "_saved_dim", None)
    if sizes is None or dim is None or not sizes:
        return None
    return saved_dim(dim) % len(sizes)


def _chunk_sizes(node) -> list[int] | None:
    """The sizes of a split's chunks along its dimension, from its autograd node."""
    g, sizes, dim = node.grad_fn, _input_sizes(node), _split_dim(node)
    if dim is None:
        return None
    if hasattr(g, "_saved_split_sizes"):
        return [int(s) for s in g._saved_split_sizes]
    step, total = int(getattr(g, "_saved_split_size", 0)), sizes[dim]
    if step <= 0:
        return None
    return [min(step, total - o) for o in range(0, total, step)]


def _edge_chunks(node) -> list[int] | None:
    """For each entry of a split node's `outputs` (one per consumer edge, in the order the
    tracer added them), the chunk that edge carries: autograd's `output_nr` in the consumer's
    `next_functions`, taken in the order the tracer walked them. None if they do not match."""
    seen: Counter = Counter()
    out = []
    for c in node.outputs:
        nrs = [nr for f, nr in getattr(c.grad_fn, "next_functions", ()) if f is node.grad_fn]
        k = seen[c]
        seen[c] += 1
        if k >= len(nrs):
            return None
        out.append(int(nrs[k]))
    for c, n in seen.items():
        if n != sum(1 for f, _ in getattr(c.grad_fn, "next_functions", ()) if f is node.grad_fn):
            return None
    return out


class _IndexedGroup(tp_graph.Group):
    """torch-pruning's Group, answering the two lookups its graph walk makes (is this
    operation on these indices in the group already? where is this layer's operation?) from a
    dict instead of a scan of every item. The walk asks once per dependency it follows, so the
    scans cost n^2 for a group of n items: a MobileViT-v2 spent 160 of its 185 s of refill and
    compaction in them. Same items, same order, same answers."""

    limit: int | None = None  # most indices one operation may gather over its index lists

    def __init__(self):
        super().__init__()
        self._ops: dict = {}  # (target node, handler) -> set of index tuples added
        self._count: Counter = Counter()  # (target node, handler) -> indices over its lists
        self._first: dict = {}  # (target node, handler) -> position of its first item
        self._merged: dict = {}  # position -> (its merged index list, the indices in it)

    def add_dep(self, dep, idxs):
        super().add_dep(dep, idxs)
        key = (dep.target, dep.handler)
        self._ops.setdefault(key, set()).add(tuple(idxs))
        self._count[key] += len(idxs)
        if self.limit is not None and self._count[key] > self.limit:
            # the walk ends when every (operation, index list) repeats: a cycle of mappings
            # that shifts the indices each turn never repeats, and the group grows without end
            raise IndexMappingTooLarge(
                f"torch-pruning's walk of a channel group reached {dep.target.name} with more "
                f"than {self.limit} channel indices (a few times the widest layer): the graph "
                "maps channels through an operation it does not understand")
        self._first.setdefault(key, len(self._group) - 1)

    def has_pruning_op(self, dep, idxs) -> bool:
        return tuple(idxs) in self._ops.get((dep.target, dep.handler), ())

    def add_and_merge(self, dep, idxs):
        """The indices of an operation already in the group join its item (first occurrence of
        each index kept, in order); a new one is added."""
        i = self._first.get((dep.target, dep.handler))
        if i is None:
            self.add_dep(dep, idxs)
            return
        if i not in self._merged:  # a list of its own (the item's may be another group's)
            merged, seen = [], set()
            for index in self._group[i].idxs:
                if index.idx not in seen:
                    merged.append(index)
                    seen.add(index.idx)
            self._merged[i] = (merged, seen)
            self._group[i] = _helpers.GroupItem(dep=self._group[i].dep, idxs=merged)
        merged, seen = self._merged[i]
        for index in idxs:  # grown in place: one pass over the new indices only
            if index.idx not in seen:
                merged.append(index)
                seen.add(index.idx)


@contextmanager
def _indexed_groups(limit: int | None):
    """Inside the block, torch-pruning's graph builds its groups as `_IndexedGroup`s, none of
    whose operations gathers more than `limit` indices."""
    plain = tp_graph.Group
    tp_graph.Group = type("_IndexedGroup", (_IndexedGroup,), {"limit": limit})
    try:
        yield
    finally:
        tp_graph.Group = plain


class _AsElementwise:
    """Inside the block, the given nodes have type ELEMENTWISE (torch-pruning computes no index
    mapping for them); their own types are restored after."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def __enter__(self):
        self.types = [n.type for n in self.nodes]
        for n in self.nodes:
            n.type = OPTYPE.ELEMENTWISE

    def __exit__(self, *exc):
        for n, t in zip(self.nodes, self.types):
            n.type = t
        return False


@contextmanager
def _quiet():
    """torch-pruning's channel inference warns each time it gives up on a long path (it then
    infers nothing, which is handled): on a transformer that is hundreds of warnings a build,
    none of them the user's to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Maximum recursive depth reached")
        yield


_ADDS = {"add", "add_", "sub", "sub_", "__add__", "__radd__", "__iadd__", "__sub__", "__isub__"}


def _holders(model: nn.Module) -> dict:
    """id(a list or tuple a module holds as a public attribute) -> [(module, attribute name)]."""
    holders: dict = {}
    for m in model.modules():
        for k, v in vars(m).items():
            if isinstance(v, (list, tuple)) and not k.startswith("_"):
                holders.setdefault(id(v), []).append((m, k))
    return holders


def _split_attrs(model: nn.Module, graph, sizes: dict) -> dict:
    """Split node along the channels -> (module, attribute name) whose value is the very list
    of sizes the split was called with (`_SplitSizes`); splits given another list are left out."""
    holders = _holders(model)
    out = {}
    for node in graph.module2node.values():
        if node.type != OPTYPE.SPLIT or _split_dim(node) != 1 or node.grad_fn not in sizes:
            continue
        found = holders.get(id(sizes[node.grad_fn]), [])
        if len(found) == 1:
            out[node] = found[0]
    return out


def _operand_shapes(node) -> dict:
    """id(input node) -> the shape of what it gave the node, read from autograd."""
    shapes = {}
    by_fn = {id(i.grad_fn): i for i in node.inputs if i.grad_fn is not None}
    for f, nr in getattr(node.grad_fn, "next_functions", ()):
        i = by_fn.get(id(f))
        if i is None:
            continue
        try:
            shapes[id(i)] = tuple(int(d) for d in f._input_metadata[nr].shape)
        except (AttributeError, IndexError, RuntimeError, TypeError):
            pass
    return shapes


def _no_channels(idxs):
    """The index mapping of a broadcast operand (`DependencyGraph._cut_broadcasts`)."""
    return []


def _is_zero(a) -> bool:
    if isinstance(a, torch.Tensor):
        return not a.requires_grad and a.numel() > 0 and not bool(a.count_nonzero())
    return isinstance(a, (int, float)) and not isinstance(a, bool) and a == 0


class _ZeroOperands(TorchFunctionMode):
    """Collects the autograd nodes of additions / subtractions of a constant zero (a number or
    a tensor without gradient, all zeros) to a traced tensor, and of constant paddings with
    zeros (`F.pad`'s default: TF-"same" padding convs pad so), during the traced forward."""

    def __init__(self):
        super().__init__()
        self.nodes: set = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in _ADDS and isinstance(out, torch.Tensor) \
                and out.grad_fn is not None:
            operands = list(args[:2]) + ([kwargs["other"]] if kwargs and "other" in kwargs else [])
            untraced = [a for a in operands if not (isinstance(a, torch.Tensor) and a.requires_grad)]
            if untraced and all(_is_zero(a) for a in untraced):
                self.nodes.add(out.grad_fn)
        elif getattr(func, "__name__", "") == "pad" and isinstance(out, torch.Tensor) \
                and out.grad_fn is not None:
            kw = kwargs or {}
            mode = args[2] if len(args) > 2 else kw.get("mode", "constant")
            value = args[3] if len(args) > 3 else kw.get("value", None)
            if mode == "constant" and (value is None or value == 0):
                self.nodes.add(out.grad_fn)
        return out


class _SplitSizes(TorchFunctionMode):
    """Records, during the traced forward, the list of sizes each split along given sizes was
    called with (the object itself: a module's attribute, as timm's MixNet and FocalNet pass
    `self.splits`), by the autograd node of its outputs."""

    def __init__(self):
        super().__init__()
        self.sizes: dict = {}  # autograd node -> the sizes object

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") in ("split", "split_with_sizes") and \
                isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) \
                and out[0].grad_fn is not None:
            kw = kwargs or {}
            sizes = args[1] if len(args) > 1 else kw.get(
                "split_size_or_sections", kw.get("split_size", kw.get("split_sizes")))
            if isinstance(sizes, (list, tuple)):
                self.sizes.setdefault(out[0].grad_fn, sizes)
        return out


class _Reshapes(TorchFunctionMode):
    """Records, during the traced forward, by the autograd node of its output, the shape each
    view / reshape was given: of a parameter, the shape object itself (`params`: a module's
    attribute, as timm's MetaFormer `Scale` passes `self.shape`); of data, the shape with the
    module whose forward ran it (`data`: torchvision's ViT reshapes to `self.hidden_dim`)."""

    def __init__(self):
        super().__init__()
        self.params: dict = {}  # autograd node -> the shape object
        self.data: dict = {}  # autograd node -> (module, the shape as given)
        self.stack: list = []  # the modules whose forward runs, innermost last

    def __enter__(self):
        from torch.nn.modules.module import (register_module_forward_hook,
                                             register_module_forward_pre_hook)
        self.handles = [register_module_forward_pre_hook(lambda m, i: self.stack.append(m)),
                        register_module_forward_hook(lambda m, i, o: self._pop(m))]
        return super().__enter__()

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()
        return super().__exit__(*exc)

    def _pop(self, m):
        if self.stack and self.stack[-1] is m:
            self.stack.pop()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if getattr(func, "__name__", "") not in ("view", "reshape") or len(args) < 2 \
                or not isinstance(args[0], torch.Tensor) \
                or not isinstance(out, torch.Tensor) or out.grad_fn is None:
            return out
        if isinstance(args[0], nn.Parameter):
            if len(args) == 2 and isinstance(args[1], (list, tuple)):
                self.params.setdefault(out.grad_fn, args[1])
        elif self.stack:
            shape = args[1] if len(args) == 2 and isinstance(args[1], (list, tuple)) else args[1:]
            self.data.setdefault(out.grad_fn, (self.stack[-1], tuple(shape)))
        return out


def _reshape_attrs(graph, shapes: dict) -> dict:
    """Reshape node of data -> (module, {axis: attribute name}): the axes of the shape given
    (`_Reshapes.data`) whose size is the value of exactly one int attribute of the module that
    ran the reshape."""
    out = {}
    for node in graph.module2node.values():
        found = shapes.get(node.grad_fn)
        if node.type != OPTYPE.RESHAPE or found is None:
            continue
        m, shape = found
        ints = [(k, v) for k, v in vars(m).items() if type(v) is int and not k.startswith("_")]
        axes = {}
        for axis, size in enumerate(shape):
            if type(size) is not int or size < 2:
                continue
            names = [k for k, v in ints if v == size]
            if len(names) == 1:
                axes[axis] = names[0]
        if axes:
            out[node] = (m, axes)
    return out


def _view_attrs(model: nn.Module, graph, shapes: dict) -> dict:
    """View node of a parameter -> (module, attribute name) whose value is the very shape the
    view was called with (`_Reshapes.params`); views given another shape object are left out."""
    holders = _holders(model)
    out = {}
    for node in graph.module2node.values():
        found = holders.get(id(shapes.get(node.grad_fn)), [])
        if len(found) == 1:
            out[node] = found[0]
    return out


class _NormPruner(tp.pruner.function.BasePruningFunc):
    """The channels of a PrunableGRN / PrunableGroupNorm / PrunableLayerNorm (`models.norms`),
    in and out coupled (like a BatchNorm's): its per-channel parameters (and a GroupNorm's `assign` rows) lose the
    cut channels; the counts its statistics divide by stay."""
    TARGET_MODULES = (PrunableGRN, PrunableGroupNorm, PrunableLayerNorm)

    @staticmethod
    def _width(layer) -> str:
        return "num_channels" if isinstance(layer, PrunableGroupNorm) else "num_features"

    def prune_out_channels(self, layer: nn.Module, idxs) -> nn.Module:
        drop = set(int(i) for i in idxs)
        keep = [i for i in range(getattr(layer, self._width(layer))) if i not in drop]
        setattr(layer, self._width(layer), len(keep))
        if layer.weight is not None:
            layer.weight = self._prune_parameter_and_grad(layer.weight, keep, 0)
        if layer.bias is not None:
            layer.bias = self._prune_parameter_and_grad(layer.bias, keep, 0)
        if isinstance(layer, PrunableGroupNorm):
            layer.assign = layer.assign[keep]
        return layer

    prune_in_channels = prune_out_channels

    def get_out_channels(self, layer: nn.Module) -> int:
        return getattr(layer, self._width(layer))

    get_in_channels = get_out_channels


class DependencyGraph(tp.DependencyGraph):
    """torch-pruning's graph with the fixes and bounds of the module docstring."""

    def __init__(self, max_indices: int | None = None):
        super().__init__()
        for norm in _NormPruner.TARGET_MODULES:
            self.register_customized_layer(norm, _NormPruner())
        self.max_indices = max_indices
        # node -> why torch-pruning's index mapping is not used for it (indices pass unchanged)
        self.unmapped: dict = {}
        self._chunk_of: dict = {}  # id(dependency) -> (split node, chunk its edge carries)
        self._mapped_state = None
        self.zero_adds: set = set()  # autograd nodes adding a constant zero (module docstring)
        self.broadcasts: set = set()  # (operand, element-wise node) broadcast over the channels
        # split node along the channels -> (module, attribute) holding the sizes it was given
        self.split_attrs: dict = {}
        # view node of a parameter -> (module, attribute) holding the shape it was given
        self.view_attrs: dict = {}
        # reshape node of data -> (module, {axis of its output: attribute}): the module that
        # reshaped it, and its int attributes the shape was given (torchvision's ViT reshapes
        # its patches to `self.hidden_dim` channels)
        self.reshape_attrs: dict = {}
        # reshape merging trailing axes into the channels, fastest -> (channels, copies)
        self.interleaved: dict = {}
        # slices along the positions of a channels-last map (torch-pruning would take a slice of
        # its dimension 1 for one of the channels): indices pass them unchanged
        self.position_slices: set = set()
        # concatenations along the positions (tokens) of a channels-last tensor (ViT's class
        # token before its patch tokens): every input holds every channel, indices unchanged
        self.position_concats: set = set()
        # nodes torch-pruning must not map (their types while it does) -> their own types
        self._hidden: dict = {}

    def _state(self) -> tuple:
        """What the index mappings depend on that can change after tracing: the channel counts
        of the layers, i.e. the parameter shapes (pruning a group changes them)."""
        return tuple(tuple(p.shape) for p in self.model.parameters())

    def _hidden_reshapes(self) -> list:
        """The nodes torch-pruning must not map: the reshapes without a mapping, those with one
        of ours (`interleaved`), and the slices and concatenations of positions
        (`position_slices`, `position_concats`)."""
        return list(self._hidden)

    def build_dependency(self, model, example_inputs, *args, **kwargs):
        if self.max_indices is None:
            self.max_indices = max(MIN_INDICES, int(INDEX_FACTOR * widest(model)))
        try:
            # (`_build_dependency` fills `unmapped` and hides the reshapes in it for the rest
            # of the build; they are reshapes again below)
            with _quiet(), _ZeroOperands() as zeros, _SplitSizes() as splits, \
                    _Reshapes() as reshapes, norm_tracing():
                super().build_dependency(model, example_inputs, *args, **kwargs)
            self.zero_adds = zeros.nodes
            self.split_attrs = _split_attrs(model, self, splits.sizes)
            self.view_attrs = _view_attrs(model, self, reshapes.params)
        finally:
            for node, t in self._hidden.items():
                node.type = t
        self.reshape_attrs = _reshape_attrs(self, reshapes.data)
        # torch-pruning's shape pass set every split's sizes again, from its consumers, and the
        # concatenations reading a split took their sizes from those: set again, mapped again
        self._fix_splits()
        for node in self.module2node.values():
            if node.type == OPTYPE.CONCAT:
                node.module.concat_sizes = self._concat_sizes(node)
        with _AsElementwise(self._hidden_reshapes()), _quiet():
            index_mapping.update_index_mapping(self)
        for node, (channels, copies) in self.interleaved.items():
            for inp in node.inputs:
                for a, b, reverse in ((inp, node, False), (node, inp, True)):
                    for dep in a.dependencies:
                        if dep.target is b:
                            dep.index_mapping[0] = _InterleaveMapping(channels, copies, reverse)
        self._mapped_state = self._state()
        return self

    def get_pruning_group(self, module, pruning_fn, idxs):
        # torch-pruning recomputes every index mapping of the graph first: on a transformer
        # that is a second or more per group, for mappings that only change when a group is
        # pruned. Unchanged, every mapped node is hidden from that recomputation.
        state = self._state()
        if state == self._mapped_state:
            hidden = [n for n in self.module2node.values() if n.type in _MAPPED_TYPES]
        else:
            hidden = self._hidden_reshapes()
        with _AsElementwise(hidden), _quiet(), _indexed_groups(self.max_indices):
            group = super().get_pruning_group(module, pruning_fn, idxs)
        self._mapped_state = state
        return group

    def in_channels(self, node) -> int | None:
        """The channels flowing into `node`, inferred from the layers after it (or None)."""
        with _quiet():
            return shape_infer.infer_in_channels_recursively(self, node, [0])

    def _build_dependency(self, module2node):
        """(torch-pruning's step between tracing and index mapping.)"""
        super()._build_dependency(module2node)
        for node in module2node.values():
            for dep in node.dependencies:
                dep.index_mapping = _Mappings(dep.index_mapping, self, dep)
        shape_infer.init_shape_information(self)  # the channel inference below reads splits
        self._fix_splits()
        for node in module2node.values():
            if node.type == OPTYPE.CONCAT and node.module.concat_sizes is None:
                node.module.concat_sizes = self._concat_sizes(node)
        self._cut_broadcasts(module2node)
        for node in module2node.values():
            if node.type == OPTYPE.RESHAPE and not self._flattens_channels(node):
                merged = self._interleaves_channels(node)
                if merged is not None:
                    self.interleaved[node] = merged
                else:
                    self.unmapped[node] = (f"a reshape of {_input_sizes(node)} other than a "
                                          "flatten into the next layer")
                self._hidden[node] = node.type
                node.type = OPTYPE.ELEMENTWISE  # until build_dependency returns
            elif node.type == OPTYPE.SLICE and self._slices_positions(node):
                self.position_slices.add(node)
                self._hidden[node] = node.type
                node.type = OPTYPE.ELEMENTWISE
            elif node.type == OPTYPE.CONCAT and self._joins_positions(node):
                # (torch-pruning takes a concatenation along dimension 1 for one of channels:
                # it would offset the patch tokens' channels by the class token's one "channel")
                self.position_concats.add(node)
                self._hidden[node] = node.type
                node.type = OPTYPE.ELEMENTWISE
            elif node.type == OPTYPE.ELEMENTWISE and op_name(node) == "constantpadnd" \
                    and self._pads_channels(node):
                # (torch-pruning ties channel i of its input and output: the ResNet "option A"
                # shortcut, zeros padded around the channels, is offset by the padding)
                self.unmapped[node] = "a pad along the channels (its output has more)"

    def _cut_broadcasts(self, module2node) -> None:
        """An element-wise operand with one channel, broadcast over the channels of the other
        (FocalNet's gates: `ctx * gates[:, l:l + 1]`), shares no channel with it: its two
        dependencies map every index list to none. torch-pruning couples channel i of each
        operand; through FocalNet's slices of the gates the indices then shift by one a turn
        around the graph's cycles and never repeat, and the walk of a group grows until
        memory runs out (more than 8 GiB)."""
        for node in module2node.values():
            if node.type != OPTYPE.ELEMENTWISE or len(node.inputs) < 2:
                continue
            out = output_shape(node)
            if out is None or len(out) < 2:
                continue
            axis = self._channel_axis(node, out)
            if axis is None:
                continue
            shapes = _operand_shapes(node)
            for inp in node.inputs:
                shape = shapes.get(id(inp))
                if shape is None:
                    continue
                k = axis - (len(out) - len(shape))  # aligned from the right, as broadcasting
                if k >= 0 and shape[k] == 1 and out[axis] > 1:
                    self.broadcasts.add((inp, node))
                    for a, b in ((node, inp), (inp, node)):
                        for dep in a.dependencies:
                            if dep.target is b:
                                list.append(dep.index_mapping, _no_channels)

    def _channel_axis(self, node, out) -> int | None:
        """The axis of `out` (the node's output shape) holding its channels: 1 or the last,
        whichever alone has as many entries as the layers after it read (None if not known)."""
        with _quiet():
            width = shape_infer.infer_in_channels_recursively(self, node, [0])
        axes = {a for a in (1, len(out) - 1) if out[a] == width}
        return axes.pop() if len(axes) == 1 else None

    def _fix_splits(self) -> None:
        """Chunk sizes and per-edge chunks of every split along the channels (dimension 1)."""
        for node in self.module2node.values():
            if node.type != OPTYPE.SPLIT or _split_dim(node) != 1:
                continue
            sizes, chunks = _chunk_sizes(node), _edge_chunks(node)
            if sizes is None or chunks is None or max(chunks, default=0) >= len(sizes):
                node.enable_index_mapping = False
                self.unmapped[node] = "a split whose consumers' chunks are not known"
                continue
            node.module.split_sizes = list(sizes)
            node.module.offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            # its dependencies: to its inputs first, then one per entry of `outputs`
            forward = node.dependencies[len(node.inputs):]
            backward = {c: [d for d in c.dependencies if d.target is node]
                        for c in set(node.outputs)}
            taken: Counter = Counter()
            for dep, c, chunk in zip(forward, node.outputs, chunks):
                self._chunk_of[id(dep)] = (node, chunk)
                if taken[c] < len(backward[c]):
                    self._chunk_of[id(backward[c][taken[c]])] = (node, chunk)
                taken[c] += 1

    def _flattens_channels(self, node) -> bool:
        """A reshape whose index mapping is right: [N, C, *rest] into C * prod(rest) features
        of what follows, C being what the layers before it produce (torch-pruning's stride
        mapping, channel c -> features c*s .. c*s + s - 1; none where prod(rest) is 1, as after
        a global pooling)."""
        ins, outs = self._channels_around(node)
        sizes = _input_sizes(node)
        if ins is None or outs is None or sizes is None or len(sizes) < 2 or sizes[1] != ins:
            return False
        features = 1
        for s in sizes[1:]:
            features *= s
        return outs == features

    def _concat_sizes(self, node) -> list[int] | None:
        """`_concat_sizes` along dimension 1, or along the last of channels-last maps (each input
        as wide there as the layers before it produce: torchvision's Swin patch merging
        concatenates its four neighbours' channels)."""
        sizes = _concat_sizes(node)
        if sizes is None:
            sizes = _concat_sizes(node, last=True)
            if sizes is None or len(output_shape(node) or ()) < 3 or any(
                    shape_infer.infer_out_channels_recursively(self, i, [0]) != n
                    for i, n in zip(node.inputs, sizes)):
                return None
        return sizes

    def _slices_positions(self, node) -> bool:
        """A slice of a channels-last map along another axis than its last (torchvision's Swin
        patch merging takes `x[..., 0::2, 0::2, :]` of [B, H, W, C]): the last axis is as wide
        as the layers before produce, and axis 1, which torch-pruning would take for the
        channels, is not (as wide, the two cannot be told apart: left to torch-pruning)."""
        sizes, dim = _input_sizes(node), getattr(node.grad_fn, "_saved_dim", None)
        if sizes is None or dim is None or len(sizes) < 3:
            return False
        dim = saved_dim(dim) % len(sizes)
        ins, _ = self._channels_around(node)
        if dim == len(sizes) - 1 or sizes[-1] != ins:
            return False
        return sizes[1] != ins or _from_linear(node, len(sizes))

    def _joins_positions(self, node) -> bool:
        """A concatenation of channels-last tensors along another axis than their last (ViT's
        `cat([cls_token, patch_tokens], dim=1)` of [B, T, C] tokens), the last as wide as the
        layers after it read and axis 1 not (or the input coming from a linear layer)."""
        out, dim = output_shape(node), getattr(node.grad_fn, "_saved_dim", None)
        if out is None or dim is None or len(out) < 3:
            return False
        _, outs = self._channels_around(node)
        if saved_dim(dim) % len(out) == len(out) - 1 or out[-1] != outs:
            return False
        return out[1] != outs or _from_linear(node, len(out))

    def _channels_around(self, node) -> tuple[int | None, int | None]:
        """The channels reaching `node` and those its consumers read, as torch-pruning infers
        them from the layers before and after it (None where it cannot)."""
        ins = outs = None
        for n in node.inputs:
            ins = shape_infer.infer_out_channels_recursively(self, n, [0])
            if ins is not None:
                break
        for n in node.outputs:
            outs = shape_infer.infer_in_channels_recursively(self, n, [0])
            if outs is not None:
                break
        return ins, outs

    def _pads_channels(self, node) -> bool:
        """A pad adding entries to the axis holding the channels: axis 1 or the last, as wide
        before it as the layers before it produce (a ResNet "option A" shortcut pads axis 1;
        Swin's pad of the positions of a [B, H, W, C] map adds none to its channels)."""
        pad, out = getattr(node.grad_fn, "_saved_pad", None), output_shape(node)
        if pad is None or out is None or len(out) < 2:
            return False
        ins, outs = self._channels_around(node)
        rank = len(out)
        added = [0] * rank
        for k in range(min(len(pad) // 2, rank)):
            added[rank - 1 - k] = int(pad[2 * k]) + int(pad[2 * k + 1])
        # the axes as wide as the channels before it (and after it, where that tells one:
        # an NCHW map may be as wide as its channels)
        axes = {a for a in (1, rank - 1) if out[a] - added[a] == ins}
        after = {a for a in axes if out[a] == outs}
        axes = after or axes
        return bool(axes) and all(added[a] for a in axes)

    def _interleaves_channels(self, node) -> tuple[int, int] | None:
        """(C, copies) for a reshape merging the trailing axes of a channels-last tensor into
        its channels, kept fastest: [..., a, b, C] into [..., a * b * C], C being what the layers
        before it produce and a * b * C what the layers after it read (Swin's patch merging,
        after a permute putting its 2 x 2 neighbours before the channels); None otherwise."""
        sizes, out = _input_sizes(node), output_shape(node)
        if sizes is None or out is None or len(out) < 2 or len(sizes) <= len(out):
            return None
        k = len(out) - 1  # the axes sizes[k:] merge into the last
        merged = 1
        for s in sizes[k:]:
            merged *= s
        if list(sizes[:k]) != list(out[:k]) or merged != out[-1] or merged == sizes[-1]:
            return None
        ins, outs = self._channels_around(node)
        if ins != sizes[-1] or outs != merged:
            return None
        return sizes[-1], merged // sizes[-1]


# Operations on a parameter that only lay its values out for broadcasting (a layer scale's
# `gamma.view(1, -1, 1, 1)`, ViT's `cls_token.expand(B, -1, -1)`): its values reach the
# consumer unchanged.
LAYOUT_ONLY = {"view", "reshape", "unsqueeze", "squeeze", "alias", "expand"}


def unwrapped_parameter(node):
    """The node of a parameter of no torch layer (torch-pruning's "unwrapped parameter", a node
    of its own: a layer scale, a learned shift) that `node` is, or lays out for broadcasting
    (`LAYOUT_ONLY`); None for anything else (data, or values computed from a parameter)."""
    while node.type != OPTYPE.PARAMETER:
        if op_name(node) not in LAYOUT_ONLY or len(node.inputs) != 1:
            return None
        node = node.inputs[0]
    return node


def op_name(node) -> str:
    """The operation a traced node ran: its autograd node's name in lower case, without
    "backward" and the trailing digits ("transpose", "addmm", "view"); "" for none."""
    g = node.grad_fn
    name = g.name() if g is not None and hasattr(g, "name") else ""
    return name.lower().replace("backward", "").rstrip("0123456789")


def output_shape(node) -> tuple[int, ...] | None:
    """The shape of what a traced node computed (its autograd node's record of its output)."""
    g = node.grad_fn
    try:
        return tuple(int(d) for d in g._input_metadata[0].shape)
    except (AttributeError, IndexError, RuntimeError, TypeError):
        return None


def axis_through(node, axis: int, rank: int) -> int | None:
    """Where the axis `axis` (of a rank-`rank` input) of a transpose / permute / select / view /
    mean or sum lands in the node's output, or None if the node merges it with others, splits
    it, selects from it or reduces it."""
    g, op = node.grad_fn, op_name(node)
    out = output_shape(node)
    if out is None:
        return None
    if op == "transpose":
        d0, d1 = (int(getattr(g, a)) % rank for a in ("_saved_dim0", "_saved_dim1"))
        return d1 if axis == d0 else d0 if axis == d1 else axis
    if op == "permute":
        dims = [int(d) % rank for d in g._saved_dims]
        return dims.index(axis)
    if op == "select":  # (a token, ViT's class-token readout: the axes after it move up one)
        dim = saved_dim(g._saved_dim) % rank
        return None if dim == axis else axis - (dim < axis)
    if op in ("mean", "sum"):  # (over the tokens: an average pooling of a ViT's patch tokens)
        dims = getattr(g, "_saved_dim", None)
        if dims is None:
            return None
        dims = {saved_dim(d) % rank for d in (dims if isinstance(dims, (tuple, list)) else (dims,))}
        if axis in dims:
            return None
        return axis - sum(d < axis for d in dims) if len(out) < rank else axis
    sizes = getattr(g, "_saved_self_sym_sizes", None)
    if sizes is None:
        return None
    sizes = [int(d) for d in sizes]
    before = 1
    for d in sizes[:axis]:
        before *= d
    seen = 1
    for b, d in enumerate(out):  # the output axis with the same elements before it, same size
        if seen == before and d == sizes[axis]:
            return b
        seen *= d
    return None


def build(model: nn.Module, example_inputs, forward_fn=None) -> DependencyGraph:
    """The dependency graph of `model` traced on `example_inputs` (gradients must be enabled)."""
    with torch.enable_grad():
        return DependencyGraph().build_dependency(model, example_inputs, forward_fn=forward_fn,
                                                  verbose=False)


__all__ = ["DependencyGraph", "IndexMappingFailed", "IndexMappingTooLarge", "axis_through", "build",
           "op_name", "output_shape", "widest"]
