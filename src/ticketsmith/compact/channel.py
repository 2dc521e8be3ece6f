"""Channel surgery: physically remove the channels of a masked model that cannot affect its output.

The coupling of channels (a conv's output channels with its BatchNorm, the input channels of
every consumer, the other branches of a residual addition, the offsets of a concatenation, the
features a flatten hands to a linear layer) comes from torch-pruning's `DependencyGraph` (as
`ticketsmith.structure.graph` builds it: reshape and split sizes read from torch 2.x autograd,
index mappings bounded), which also performs the removal. What the graph does not know is
*which* channels may go without changing the function; that is decided here, per coupled group
and channel, from the weights:

- a channel is **dead** at a point of the graph when it is exactly zero for every input: a
  conv / linear row that is all zero with a zero (or absent) bias; a BatchNorm whose affine
  weight and bias are zero, or whose input is dead and which maps zero to zero (an unmasked
  BatchNorm maps a dead channel to a nonzero constant: that channel is *not* dead); a depthwise
  conv, PReLU, ReLU-like activation, pooling, flatten, addition (of dead channels only, or of
  a per-channel parameter that is zero there), product with a per-channel parameter (a layer
  scale) or concatenation of dead channels;
- a channel is **constant** when it holds one value at every position for every input: dead, or
  a dead channel after a per-channel shift (a bias, a BatchNorm, sigmoid(0), timm's StarReLU
  `s * relu(x) ** 2 + b` with learned scalars, a per-channel parameter added or multiplied),
  through operations that keep it one value
  (not a padded conv, an average pool or a sum over positions);
- a group's channel is **removable** when every consumer (conv / linear reading it) either reads
  it dead, has an all-zero weight column for it ("unread"), or reads it constant and can fold
  it into its bias (a linear layer or a conv without padding and groups: `foldable`; the value
  comes from a forward pass on the example, and a consumer without a bias gets one where the
  value is not zero), no model output shows it, and every operation it passes through is
  per-channel. Anything else (an unknown operation, a channel-mixing reduction, a transposed
  grouped conv, a norm over another axis, a constant added to the feature map, a reshape other than
  a flatten such as a channel shuffle or a window partition, ...) leaves the whole group
  untouched, recorded with the reason (per layer in `SurgeryReport.whole`, and in `describe` as
  `group_left_whole`). A parameter of no torch layer (torch-pruning's "unwrapped parameter":
  a layer scale `x * gamma.view(1, -1, 1, 1)`, a learned shift) is cut with the group where it
  holds one value per channel, along the channel axis of the add / sub / mul reading it
  (laid out by views only); the shape attribute a module views it to (timm's `Scale.shape`) is
  set to the new width (`SurgeryReport.split_sizes`), its shape recorded for `load`
  (`param_shapes`). A group may cross between
  layouts where its channel axis is followed from layer to layer through transposes, permutes
  and views that keep it whole (`_Group.channel_axes`): a linear layer on tokens, the tokens
  viewed as a map for a depthwise conv and flattened back (PVT-v2's and SegFormer's MLP), a
  conv stem whose map becomes the tokens, a roll of the positions (Swin's shifted windows; a
  roll of the channels keeps the group whole), a merge of trailing axes into the channels,
  kept fastest (timm's Swin patch merging: channel c is features c, c + C, ...; the graph's
  `interleaved`), or slices of the positions of a channels-last map concatenated along its
  channels (torchvision's: the graph's `position_slices`). A split along the channels goes through a cut where
  its sizes are a list a module holds and passes to torch.split (timm's MixNet `splits`,
  FocalNet's `input_split`: the graph's `split_attrs`): the list is set to the new chunk sizes
  (recorded as `split_sizes`, restored by `load`); a slice of such a split's chunk (FocalNet's
  gates) keeps every channel of that chunk. After each group's cut the model must still run on
  the example inputs; where it does not (a forward reshaping by a width the cut changed, as
  timm's LambdaLayer reshapes its output by its input width), the cut is undone and the group
  left whole with the error.

A grouped convolution (ResNeXt, RegNet) keeps its `groups`: its weight is out x in/groups, so
every group must keep as many input (and output) channels as the others. Where the removable
channels of a group fall unevenly, dead ones are kept back until the counts match (keeping a
dead channel changes nothing), and each row's kept inputs are taken from its own group
(`grouped_in_select`; torch-pruning 1.6 would take the first group's positions for all).

Removals repeat until nothing changes, since removing a dead input channel can leave a row of
the next layer all zero (dead in turn). At least one channel of every group is kept so that no
layer ends up with zero width.
"""
from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch_pruning as tp
from torch import nn

from ..errors import UsageError
from ..masks import copy_module
from ..models.norms import PrunableGRN, PrunableGroupNorm, PrunableLayerNorm
from ..structure.graph import _input_sizes  # (the sizes autograd saved of a node's input)
from ..structure.graph import (LAYOUT_ONLY, DependencyGraph, IndexMappingFailed, axis_through,
                               op_name, output_shape, saved_dim, unwrapped_parameter)

OPTYPE = tp.ops.OPTYPE

# Element-wise operations (autograd node names, lower case, without "backward" and the trailing
# digits) known to act on each channel independently. ZERO_PRESERVING ones map a zero channel to
# zero; PER_CHANNEL ones may map it to a nonzero value (the channel then stays unless unread).
# Exact names, plus a few families matched by prefix (pools, upsampling, copy-padding).
ZERO_PRESERVING = {"relu", "hardtanh", "leakyrelu", "gelu", "silu", "elu", "celu", "tanh",
                   "hardswish", "mish", "neg", "clone", "tocopy", "alias",
                   "roll"}  # (along the positions: a roll of the channel axis is refused)
ZERO_PRESERVING_FAMILIES = ("maxpool", "avgpool", "adaptiveavgpool", "adaptivemaxpool",
                            "fractionalmaxpool", "upsample", "reflectionpad", "replicationpad")
PER_CHANNEL = {"sigmoid", "hardsigmoid", "softplus", "exp", "logsigmoid",
               "constantpadnd"}  # the pad value is not in autograd (`F.pad` with zeros: the
# graph's `zero_adds`, zero-preserving)
# Operations that move the channel axis: allowed where `_Group.channel_axes` follows it.
LAYOUT_OPS = {"transpose", "permute"}


def _zero_preserving(op: str) -> bool:
    return op in ZERO_PRESERVING or op.startswith(ZERO_PRESERVING_FAMILIES)


TRACKED = (nn.modules.conv._ConvNd, nn.Linear, nn.modules.batchnorm._BatchNorm, nn.PReLU)
_LAYERS = (nn.modules.conv._ConvNd, nn.Linear)


def opaque_reason(module: nn.Module) -> str | None:
    """Why a conv / linear layer may not be rebuilt from its weight and constructor arguments,
    or None if it may.

    A subclass that overrides `forward` (timm's `Conv2dSame` pads from the input size,
    `StdConv2d` standardises the weight first) computes something other than the torch layer
    its weight and stride describe: a zero weight entry need not be a zero in what it applies,
    and a kernel rebuilt from `weight/stride/padding` computes another function. A weight held
    by a parametrization (`weight_norm`) is recomputed on every call from other tensors, so
    neither surgery nor an executor may replace it. Such layers keep their own module, but for
    those whose forward is one kernel on a weight computed from parameters alone: `compact`
    freezes them into the plain layer first (`freeze.freeze_computed_weights`)."""
    if not isinstance(module, _LAYERS):
        return None
    from torch.nn.utils import parametrize
    if parametrize.is_parametrized(module):
        return f"its weight is parametrized ({type(module).__name__})"
    base = next((c for c in type(module).__mro__ if c.__module__.startswith("torch.nn.modules")
                 and "forward" in c.__dict__), None)
    if base is not None and type(module).forward is not base.forward:
        return f"{type(module).__name__} overrides the forward of {base.__name__}"
    return None


def out_in_view(module: nn.Module, w: torch.Tensor) -> torch.Tensor:
    """A conv / linear weight (or its mask) with output channels in dim 0 and input channels in
    dim 1: a transposed convolution stores them the other way round."""
    if isinstance(module, nn.modules.conv._ConvNd) and module.transposed:
        return w.transpose(0, 1)
    return w


def grouped_in_select(w: torch.Tensor, groups: int, keep_in: torch.Tensor) -> torch.Tensor:
    """A grouped conv's weight (or mask), out x in/groups x k..., with each row restricted to
    the kept inputs of its own group. `keep_in` holds ascending indices into all
    groups * in/groups inputs, the same number in every group (rows of group g are the g-th
    block of out/groups rows, as torch lays them out)."""
    per_in, out = w.shape[1], w.shape[0]
    group_of = keep_in // per_in
    counts = torch.bincount(group_of, minlength=groups)
    if len(counts) != groups or bool((counts != counts[0]).any()) or out % groups:
        raise AssertionError(f"uneven inputs kept per group of a grouped conv: {counts.tolist()}")
    local = (keep_in - group_of * per_in).view(groups, -1)
    idx = local.repeat_interleave(out // groups, dim=0).to(w.device)
    idx = idx.view(out, -1, *([1] * (w.dim() - 2))).expand(out, local.shape[1], *w.shape[2:])
    return w.gather(1, idx)


@dataclasses.dataclass
class ChannelMap:
    """Which original output / input channels of a layer survive surgery (int64, ascending)."""
    out: torch.Tensor
    inp: torch.Tensor


@dataclasses.dataclass
class SurgeryReport:
    """What channel surgery did: surviving channels per tracked layer, channels removed per
    group (named by the group's root layer), groups left whole with the reason, and per conv /
    linear layer whose output channels are in a group left whole, that reason (`whole`)."""
    kept: dict[str, ChannelMap]
    removed: dict[str, int]
    skipped: dict[str, str]
    whole: dict[str, str] = dataclasses.field(default_factory=dict)
    # module name -> {attribute: the sizes it now holds}: the chunk sizes of the splits resized,
    # the shapes of the parameter views resized, the widths data is reshaped to (an int)
    split_sizes: dict[str, dict[str, list[int] | int]] = dataclasses.field(default_factory=dict)
    # parameter of no torch layer (a layer scale) whose channels were cut -> its shape now
    param_shapes: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def as_inputs(example_inputs: Any) -> tuple:
    """Example inputs as the tuple of positional arguments of `model(*inputs)`."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)) and all(isinstance(t, torch.Tensor)
                                                         for t in example_inputs):
        return tuple(example_inputs)
    raise UsageError("example_inputs must be a tensor or a tuple of tensors (the positional "
                     f"arguments of the model), got {type(example_inputs).__name__}")


def flat_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors of a (possibly nested) model output."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in flat_tensors(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in flat_tensors(o)]
    return []


def _channels(module: nn.Module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.out_channels, module.in_channels
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module.num_features, module.num_features
    return module.num_parameters, module.num_parameters  # PReLU


def trace(model: nn.Module, inputs: tuple) -> tuple[tp.DependencyGraph, set]:
    """Build the dependency graph of `model` (in place) and find the nodes the outputs show."""
    outputs: list = []

    def forward(m, x):
        out = m(*x)
        outputs.append(out)
        return out

    for p in model.parameters():
        p.requires_grad_(True)
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            graph = DependencyGraph().build_dependency(model, example_inputs=inputs,
                                                       forward_fn=forward, verbose=False)
    except UsageError:
        raise
    except Exception as e:  # the tracer's own failures are of many kinds
        raise UsageError(f"the graph tracer cannot follow {type(model).__name__}: "
                         f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
                         ) from None
    out_fns = {t.grad_fn for t in flat_tensors(outputs[-1]) if t.grad_fn is not None}
    if not out_fns:
        raise UsageError(f"the graph tracer cannot follow {type(model).__name__}: no output "
                         "tensor depends on its parameters through autograd")
    out_nodes = {n for n in graph.module2node.values()
                 if n.type == OPTYPE.OUTPUT or n.grad_fn in out_fns}
    return graph, out_nodes


def _is_param_leaf(node) -> bool:
    """An op on parameters only (the weight transpose inside F.linear, the weight
    standardisation inside a StdConv2d's forward), or a parameter of no torch layer itself
    (`unwrapped_parameter`): no data flows in. (Cached on the node.)"""
    if node.type == OPTYPE.PARAMETER:
        return True
    if node.type not in (OPTYPE.ELEMENTWISE, OPTYPE.RESHAPE, OPTYPE.EXPAND) or node.grad_fn is None:
        return False
    cached = getattr(node, "_ts_param_leaf", None)
    if cached is None:
        cached = node._ts_param_leaf = _params_only(node.grad_fn)
    return cached


def _params_only(fn) -> bool:
    """True if every autograd leaf under `fn` is a parameter (AccumulateGrad): the traced
    input does not require grad and shows as a missing (None) operand. Iterative: a data
    node's walk goes back through the whole network (thousands of nodes deep in an
    EfficientNet-V2), past Python's recursion limit."""
    stack, seen = [fn], set()
    while stack:
        f = stack.pop()
        if id(f) in seen:
            continue
        seen.add(id(f))
        if "accumulategrad" in f.name().lower():
            continue
        nexts = getattr(f, "next_functions", ())
        if not nexts or any(g is None for g, _ in nexts):
            return False
        stack.extend(g for g, _ in nexts)
    return True


def _pruning_dim(node) -> int | None:
    """The axis along which torch-pruning cuts a parameter of no torch layer (>= 0)."""
    d = getattr(node, "pruning_dim", None)
    return None if d is None else d % node.module.dim()


def _untraced_operand(node) -> bool:
    g = node.grad_fn
    return any(f is None for f, _ in getattr(g, "next_functions", ()))


def _reduced_dims(node) -> tuple[list[int], int] | None:
    """The dimensions a mean / sum node reduces (of its input, >= 0) and that input's rank;
    None where not known (a reduction of everything)."""
    g = node.grad_fn
    dims = getattr(g, "_saved_dim", None)
    sizes = getattr(g, "_saved_self_sym_sizes", None)
    if dims is None or sizes is None:
        return None
    dims = [saved_dim(d) for d in (dims if isinstance(dims, tuple) else (dims,))]
    nd = len(sizes)
    if nd < 2 or not dims:
        return None
    return sorted({d % nd for d in dims}), nd


def _reduces_channels(node, last: bool = False) -> bool:
    """True if a mean / sum node reduces over the channel dimension (dim 1; the last one for
    `last`: features in the last dimension, as a Linear on tokens has them)."""
    found = _reduced_dims(node)
    if found is None:
        return True
    dims, nd = found
    return (nd - 1 if last else 1) in dims


def _reshape_ok(graph, node) -> bool:
    """A view / reshape the DependencyGraph maps right: the flatten of [N, C, H, W] (or of
    [N, C, L], [N, F]) whole into the features of what follows."""
    if node in graph.unmapped:
        return False  # channels pass it without index mapping (see structure.graph)
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None or len(sizes) not in (2, 3, 4):
        return False
    features = 1
    for s in sizes[1:]:
        features *= int(s)
    for out in node.outputs:
        n = graph.in_channels(out)
        if n is not None and n != features:
            return False
    return True


def _flattens_channels_only(node) -> bool:
    """A flatten of [N, C, 1, ...] (after a global pooling): feature c is channel c."""
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    return sizes is not None and len(sizes) > 2 and all(int(s) == 1 for s in sizes[2:])


def _keeps_last_dim(graph, node) -> bool:
    """A view / reshape that merges or splits leading dimensions only: the features in the last
    dimension reach what follows unchanged (F.linear on a >2-D tensor flattens its batch dims)."""
    sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
    if sizes is None or len(sizes) < 2 or not node.outputs:
        return False
    for out in node.outputs:
        n = graph.in_channels(out)
        if n is None or n != int(sizes[-1]):
            return False
    return True


def _feeds_linear(node) -> bool:
    """An addmm / mm node that is the product of the linear layers it feeds (torch-pruning sees
    F.linear on a >2-D tensor as view -> addmm -> view, the module node being the last view; on
    a non-contiguous one as mm -> view -> add of the bias, the module node being the add)."""
    return bool(node.outputs) and all(
        o.type == OPTYPE.LINEAR or (o.type == OPTYPE.RESHAPE and _feeds_linear(o))
        for o in node.outputs)


# The normalisation op inside a norm-act layer (a BatchNorm subclass whose forward calls
# F.batch_norm and then an activation, like timm's BatchNormAct2d): the graph sees it as an
# element-wise op feeding the module's own node (whose output is the activation's).
NORM_INSIDE = {"nativebatchnorm", "cudnnbatchnorm", "miopenbatchnorm"}


def _feeds_norm(node) -> bool:
    return bool(node.outputs) and all(o.type == OPTYPE.BN for o in node.outputs)


def _pow_positive(node) -> bool:
    """A power by a positive number (StarReLU's relu(x) ** 2): maps zero to zero, per element."""
    e = getattr(node.grad_fn, "_saved_exponent", None)
    return isinstance(e, (int, float)) and not isinstance(e, bool) and e > 0


def _param_operands(node) -> list[torch.Tensor]:
    """The parameters an element-wise node reads directly that the graph has no node for: those
    of one element (StarReLU's learned scale and bias), which torch-pruning does not take for
    channel parameters (a parameter with a channel dimension is a node, and refused)."""
    return [f.variable for f, _ in getattr(node.grad_fn, "next_functions", ())
            if f is not None and hasattr(f, "variable")]


# Operations that map a channel holding one value everywhere to one value everywhere (for a
# channel that does not depend on the input: `_Group.const`). Not a pad by a constant or an
# average pool (the border differs), nor a sum or norm over positions (it scales with the size).
CONST_KEEPING = ZERO_PRESERVING | (PER_CHANNEL - {"constantpadnd"}) | {
    "pow", "add", "sub", "mul", "transpose", "permute", "mean",
    "unsqueeze", "squeeze"}  # (groups holding them keep the channel axis: `_keeps_channel_axis`)
CONST_KEEPING_FAMILIES = ("maxpool", "adaptiveavgpool", "adaptivemaxpool", "upsample",
                          "reflectionpad", "replicationpad")


def foldable(module: nn.Module) -> bool:
    """A consumer into whose bias an input channel holding one value everywhere folds exactly:
    a linear layer, or a conv without padding (a padded border reads zeros there instead) and
    without groups; not a layer whose forward is its own (`opaque_reason`)."""
    if opaque_reason(module) is not None:
        return False
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.modules.conv._ConvNd) and not module.transposed and \
        module.groups == 1 and not isinstance(module.padding, str) and \
        all(p == 0 for p in module.padding)


def _keeps_channel_axis(node) -> bool:
    """An unsqueeze / squeeze of dimensions after the channel axis (1) only: the channels stay
    in axis 1, each one's values where they were (a 1-d pooling runs as unsqueeze -> 2-d
    pooling -> squeeze). Not one of the batch or channel axis, nor a squeeze of every size-1
    dimension whose example had a batch or channel axis of size 1."""
    g, op = node.grad_fn, op_name(node)
    sizes = getattr(g, "_saved_self_sym_sizes", None)
    out = output_shape(node)
    if op == "unsqueeze":
        dim = getattr(g, "_saved_dim", None)
        return dim is not None and out is not None and int(dim) % len(out) >= 2
    if op == "squeeze" and sizes is not None:
        rank = len(sizes)
        if hasattr(g, "_saved_dims"):
            dims = [int(d) for d in g._saved_dims]
        elif hasattr(g, "_saved_dim"):
            dims = [int(g._saved_dim)]
        else:  # every dimension of size 1
            dims = [d for d, size in enumerate(sizes) if int(size) == 1]
        return rank >= 2 and all(d % rank >= 2 for d in dims)
    return False


_NORMS = (PrunableGRN, PrunableGroupNorm, PrunableLayerNorm)


def _is_norm(node) -> bool:
    """A PrunableGRN (ConvNeXt-V2's Global Response Normalization), PrunableGroupNorm or
    PrunableLayerNorm (`models.norms`): one node, per channel but for the statistics over
    channels it divides by counts fixed as built."""
    return node.type == OPTYPE.CUSTOMIZED and isinstance(node.module, _NORMS)


def _channels_last(node) -> bool:
    return isinstance(node.module, (PrunableGRN, PrunableLayerNorm)) and node.module.channels_last


def _dead_out(module) -> torch.Tensor:
    """Per channel of a norm of `_is_norm` whose input is dead: its output is dead (zero)."""
    if isinstance(module, PrunableGRN):  # outputs its bias
        return module.bias.detach() == 0
    if isinstance(module, PrunableLayerNorm):  # -mean / std times its weight, plus its bias
        if module.weight is None:
            return torch.zeros(module.num_features, dtype=torch.bool)
        bias0 = module.bias.detach() == 0 if module.bias is not None else True
        return (module.weight.detach() == 0) & bias0
    if module.weight is None:  # GroupNorm without affine: -mean / std, not one value
        return torch.zeros(module.num_channels, dtype=torch.bool)
    with torch.no_grad():  # its activation (timm's GroupNormAct) must keep a zero
        zero = module.weight.new_zeros(1, module.num_channels)
        act_keeps_zero = module.act(module.drop(zero))[0] == 0
    return (module.weight.detach() == 0) & (module.bias.detach() == 0) & act_keeps_zero


def _const_out(module) -> torch.Tensor:
    """Per channel of a norm of `_is_norm` whose input is dead: its output holds one value (the
    bias; a GroupNorm's normalised zero, -mean / std, times a zero affine weight, then its
    activation)."""
    if isinstance(module, PrunableGRN):
        return torch.ones(module.num_features, dtype=torch.bool)
    if module.weight is None:
        return torch.zeros(_norm_width(module), dtype=torch.bool)
    return module.weight.detach() == 0


def _norm_width(module) -> int:
    return module.num_channels if isinstance(module, PrunableGroupNorm) else module.num_features


def _mul_scalar_ok(node) -> bool:
    g = node.grad_fn
    for attr in ("_saved_other", "_saved_self"):
        try:
            t = getattr(g, attr)
        except Exception:
            continue
        if isinstance(t, torch.Tensor) and t.numel() == 1:
            return True
    return False


class _Group:
    """One coupled group, analysed in the space of its root channels."""

    def __init__(self, graph: tp.DependencyGraph, group, out_nodes: set):
        self.graph, self.group, self.out_nodes = graph, group, out_nodes
        self.n_roots = len(group[0].idxs)
        # node -> list of (handler, local idxs, root idxs)
        self.items: dict[Any, list] = {}
        self._root_of: dict[tuple, dict[int, int]] = {}  # (node, handler) -> local -> root
        for it in group:
            loc = torch.as_tensor(list(it.idxs), dtype=torch.long)
            roots = torch.as_tensor(list(it.root_idxs), dtype=torch.long)
            self.items.setdefault(it.dep.target, []).append((it.dep.handler, loc, roots))
            self._root_of.setdefault((it.dep.target, it.dep.handler), {}).update(
                zip(loc.tolist(), roots.tolist()))
        self._zero: dict[Any, torch.Tensor] = {}
        self._const: dict[Any, torch.Tensor] = {}
        # per root: removable only with its value folded into a consumer's bias (`removable`)
        self.folds = torch.zeros(self.n_roots, dtype=torch.bool)

    def covers(self, node) -> torch.Tensor:
        c = torch.zeros(self.n_roots, dtype=torch.bool)
        for _, _, roots in self.items.get(node, ()):
            c[roots] = True
        return c

    def _locals(self, node):
        """(local, root) index pairs of a node, over all its items."""
        locs = torch.cat([loc for _, loc, _ in self.items[node]])
        roots = torch.cat([r for _, _, r in self.items[node]])
        return locs, roots

    def _all_by_root(self, locs, roots, local_true: torch.Tensor) -> torch.Tensor:
        """Per root: True iff every local index mapped to it is True."""
        bad = torch.zeros(self.n_roots).index_add_(0, roots, (~local_true[locs]).float())
        return bad == 0

    def axes_followed(self) -> bool:
        """The group's channel axis is followed from member to member (`channel_axes`).
        (Cached.)"""
        return self.axes() is not None

    def axes(self) -> dict | None:
        """`channel_axes`, computed once."""
        if not hasattr(self, "_axes"):
            self._axes = self.channel_axes()
        return self._axes

    def channel_axes(self) -> dict | None:
        """Per member: the axis of its output that holds this group's channels, where each
        member puts them where its consumers in the group read them (a linear layer: the last
        axis; a conv, depthwise conv, BatchNorm: axis 1), followed through transposes, permutes
        and views that keep the channel axis whole. None where that cannot be shown. This lets
        a group cross between layouts: a linear layer on tokens, a view of the tokens as a map
        and a depthwise conv on it, a flatten back to tokens, a linear layer (PVT-v2's and
        SegFormer's MLP). Indices pass such reshapes unchanged, which is right exactly then."""
        axes: dict = {}
        members = [n for n in self.items if not _is_param_leaf(n)]
        for _ in range(len(members) + 1):
            progress = False
            for node in members:
                if node in axes:
                    continue
                ins = [i for i in self.data_inputs(node) if i in self.items]
                out = output_shape(node)
                if out is None:
                    return None
                t, op = node.type, op_name(node) if node.type == OPTYPE.ELEMENTWISE else ""
                if t in (OPTYPE.CONV, OPTYPE.DEPTHWISE_CONV, OPTYPE.BN):
                    axes[node] = 1
                elif _is_norm(node):
                    axes[node] = len(out) - 1 if _channels_last(node) else 1
                elif t == OPTYPE.LINEAR or op in ("addmm", "mm"):
                    axes[node] = len(out) - 1
                elif any(i not in axes for i in ins):
                    continue
                elif not ins:
                    return None
                else:
                    found = set()
                    for i in ins:
                        shape = output_shape(i)
                        if shape is None:
                            return None
                        if node in self.graph.interleaved:  # (trailing axes merged into
                            # the channels, the last axis: Swin's patch merging)
                            found.add(len(out) - 1 if axes[i] == len(shape) - 1 else None)
                        elif t == OPTYPE.RESHAPE or op in LAYOUT_OPS or op == "select":
                            # (select: of a token, ViT's class-token readout)
                            found.add(axis_through(node, axes[i], len(shape)))
                        elif t == OPTYPE.ELEMENTWISE and len(shape) == len(out):
                            found.add(axes[i])
                        elif t in (OPTYPE.SLICE, OPTYPE.CONCAT) and len(shape) == len(out):
                            dim = saved_dim(getattr(node.grad_fn, "_saved_dim", 1)) % len(out)
                            if t == OPTYPE.CONCAT and dim != axes[i] and \
                                    node not in self.graph.position_concats:
                                return None  # (joined along another axis: the tokens)
                            found.add(axes[i])
                        elif op in ("mean", "sum") and _reduced_dims(node) is not None:
                            dims = _reduced_dims(node)[0]  # (keepdim=False: the axes go)
                            if axes[i] in dims or len(out) != len(shape) - len(dims):
                                return None
                            found.add(axes[i] - sum(1 for d in dims if d < axes[i]))
                        else:
                            return None
                    if len(found) != 1 or None in found:
                        return None
                    axes[node] = found.pop()
                progress = True
            if not progress:
                break
        if len(axes) != len(members):
            return None
        for node in members:  # each reads the channels where it computes on them
            want = {OPTYPE.CONV: 1, OPTYPE.DEPTHWISE_CONV: 1, OPTYPE.BN: 1}.get(node.type)
            if node.type == OPTYPE.LINEAR or op_name(node) in ("addmm", "mm") or (
                    _is_norm(node) and _channels_last(node)):
                want = -1
            elif _is_norm(node):
                want = 1
            if want is None:
                continue
            for i in self.data_inputs(node):
                if i in axes:
                    rank = len(output_shape(i))
                    if axes[i] != want % rank:
                        return None
        return axes

    def unsupported(self) -> str | None:
        types = {n.type for n in self.items}
        for node in self.items:
            if node.type in (OPTYPE.CONV, OPTYPE.LINEAR, OPTYPE.DEPTHWISE_CONV):
                from torch.nn.utils import parametrize
                if parametrize.is_parametrized(node.module):
                    # the weight is recomputed from the parametrization's own tensors on
                    # every call: there is no weight tensor to cut
                    return f"{node.name}: {opaque_reason(node.module)}"
        last_dim = [n for n in self.items if n.type == OPTYPE.LINEAR and not _is_param_leaf(n)
                    and op_name(n) not in ("addmm", "mm")]
        # (a reshape without index mapping is refused below, with its own reason)
        flatten = any(n.type == OPTYPE.RESHAPE and n not in self.graph.unmapped
                      and not _flattens_channels_only(n) for n in self.items)
        if OPTYPE.CONCAT in types and flatten:
            # torch-pruning 1.6 ties channel i of every concatenated branch together on the way
            # back from a flatten, and drops the features of only one of them (found by the
            # property tests): such groups stay whole, but for a flatten of [N, C, 1, ...] after
            # a global pooling (DenseNet, GoogLeNet, Inception), whose features are the channels
            return "a concatenation followed by a flatten (torch-pruning maps it wrongly)"
        for node in self.items:
            t = node.type
            if t == OPTYPE.PARAMETER:
                why = self._param_unsupported(node, last_dim)
                if why is not None:
                    return why
                continue
            if _is_param_leaf(node):
                continue
            m = node.module
            if t in (OPTYPE.CONV, OPTYPE.LINEAR):
                if isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1 and m.transposed:
                    return f"{node.name}: transposed grouped convolution"
                continue
            if t == OPTYPE.EXPAND:
                # expand can only broadcast dimensions of size 1: with more than one channel in
                # dimension 1 it repeats the channels' values over other axes (SE's expand_as)
                sizes = getattr(node.grad_fn, "_saved_self_sym_sizes", None)
                if sizes is None or len(sizes) < 2 or len(sizes) == 5 or int(sizes[1]) < 2:
                    return f"{node.name}: an expand over the channel dimension"
                continue
            if t in (OPTYPE.DEPTHWISE_CONV, OPTYPE.BN, OPTYPE.PRELU, OPTYPE.CONCAT,
                     OPTYPE.RESHAPE, OPTYPE.OUTPUT):
                if t == OPTYPE.DEPTHWISE_CONV and (m.in_channels != m.out_channels or m.transposed):
                    return (f"{node.name}: depthwise convolution with a channel multiplier"
                            + (" (a grouped conv cut to one output channel per group)"
                               if m.in_channels > m.out_channels else ""))
                if t == OPTYPE.BN and node.grad_fn is None:
                    return f"{node.name}: batch norm not traced"
                if t == OPTYPE.RESHAPE and not (_reshape_ok(self.graph, node) or (
                        last_dim and (_keeps_last_dim(self.graph, node) or self.axes_followed()))):
                    return (f"{node.name}: a reshape other than a flatten into the next layer"
                            + (f", coupled with {last_dim[0].name}, a linear layer on a tensor "
                               "of more than 2 dimensions" if last_dim else ""))
                continue
            if t == OPTYPE.ELEMENTWISE:
                op = op_name(node)
                if node in self.graph.unmapped:  # (a pad adding channels)
                    return f"{node.name}: {self.graph.unmapped[node]}"
                if op in ("add", "sub"):
                    if _untraced_operand(node) and node.grad_fn not in self.graph.zero_adds:
                        return f"operation {op} with a constant operand"
                elif op == "mul":
                    if _untraced_operand(node) and not _mul_scalar_ok(node):
                        return f"operation {op} with a constant tensor operand"
                elif op in ("mean", "sum"):
                    if self._reduces_channels(node, bool(last_dim)):
                        return f"operation {op} over the channel dimension"
                elif op == "pow":
                    if not _pow_positive(node):
                        return "operation pow by a non-positive or tensor exponent"
                elif op == "roll":
                    if self._rolls_channels(node, bool(last_dim)):
                        return "operation roll along the channel dimension"
                elif op == "select":
                    dim, sizes = getattr(node.grad_fn, "_saved_dim", None), _input_sizes(node)
                    if dim is None or sizes is None or \
                            self._in_axis(node, bool(last_dim)) == saved_dim(dim) % len(sizes):
                        return "operation select of the channel dimension"
                elif op in ("addmm", "mm") and last_dim and _feeds_linear(node):
                    pass  # the product of a linear layer on a >2-D tensor (checked above)
                elif op in NORM_INSIDE and _feeds_norm(node):
                    pass  # the normalisation inside a norm-act layer's forward: per channel
                elif op in LAYOUT_OPS and last_dim and self.axes_followed():
                    pass  # moves the channel axis where the next member reads it
                elif op in ("unsqueeze", "squeeze") and not last_dim:
                    if not _keeps_channel_axis(node):
                        return f"operation {op} of the batch or channel axis"
                elif not (_zero_preserving(op) or op in PER_CHANNEL):
                    return f"operation {op or 'unknown'} not known to be per-channel"
                continue
            if _is_norm(node):
                # one node (`models.norms`): per channel but for its sums (`removable`). One
                # over the last axis must read the channels there: without a linear layer on
                # >2-D tensors the group has them in axis 1 (the checks below see to the rest)
                shape = output_shape(node)
                if _channels_last(node) and not last_dim and (shape is None or len(shape) != 2):
                    return f"{node.name}: a norm over another axis than the channels"
                continue
            if t == OPTYPE.SLICE and node in self.graph.position_slices:
                continue  # of the positions (torchvision's Swin patch merging)
            if t == OPTYPE.SLICE and all(i.type == OPTYPE.SPLIT and i in self.graph.split_attrs
                                         for i in self.data_inputs(node)):
                # a slice of a split's chunk (FocalNet's gates): the channels of that chunk stay
                # (`removable`). torch-pruning's index mapping through other slices can be wrong
                # (timm's DPN: indices past the layers'), and their groups stay whole
                continue
            if t == OPTYPE.SPLIT and node in self.graph.split_attrs \
                    and node not in self.graph.unmapped:
                continue  # its sizes are a module's attribute: set again after the cut
            return f"{node.name}: {t.name.lower()} is not supported by channel surgery"
        if last_dim:
            # features in the last dimension of a >2-D tensor (a transformer's MLP; F.linear
            # runs there as view -> addmm -> view): exact as long as every other member is a
            # linear layer, its addmm, a reshape keeping the last dimension, or a per-feature
            # element-wise op (the flatten / concatenation mappings and the BatchNorm / conv /
            # channel-reduction checks assume channels in dimension 1)
            # (or, where the channel axis is followed from member to member, a transpose, a
            # view, a conv, depthwise conv or BatchNorm reading the channels in axis 1)
            followed = self.axes_followed()
            for node in self.items:
                if _is_param_leaf(node) or node.type in (OPTYPE.LINEAR, OPTYPE.RESHAPE):
                    continue
                op = op_name(node) if node.type == OPTYPE.ELEMENTWISE else ""
                if op in ("addmm", "mm") and _feeds_linear(node):
                    continue
                if followed and (op in LAYOUT_OPS or _is_norm(node) or node.type in (
                        OPTYPE.CONV, OPTYPE.DEPTHWISE_CONV, OPTYPE.BN, OPTYPE.CONCAT)):
                    continue
                if node in self.graph.position_slices:
                    continue
                if _is_norm(node) and _channels_last(node):
                    continue  # its channels in the last dimension
                if op in ("mean", "sum") and not self._reduces_channels(node, True):
                    continue  # over the tokens, or positions: the features stay whole
                if op == "select":
                    continue  # of a token (checked above)
                if node.type != OPTYPE.ELEMENTWISE or op in ("mean", "sum") or not (
                        _zero_preserving(op) or op in PER_CHANNEL or op in ("add", "sub", "mul")
                        or (op == "pow" and _pow_positive(node))):
                    return (f"{last_dim[0].name}: linear layer on a tensor of more than 2 "
                            f"dimensions, coupled with {node.name}")
        return None

    def _in_axis(self, node, last_dim: bool) -> int | None:
        """The axis of a one-input node's input holding the group's channels: the one followed
        there (`channel_axes`), else the last (`last_dim`) or 1."""
        ins = [i for i in self.data_inputs(node) if i in self.items]
        if self.axes_followed() and len(ins) == 1:
            return self.axes()[ins[0]]
        sizes = _input_sizes(node) or output_shape(node)
        return None if sizes is None else len(sizes) - 1 if last_dim else 1

    def _rolls_channels(self, node, last_dim: bool) -> bool:
        """A torch.roll moving values along the axis holding the group's channels (or along
        the flattened tensor: no dims). Swin's shifted windows roll the positions only."""
        dims = [int(d) for d in getattr(node.grad_fn, "_saved_dims", ())]
        out = output_shape(node)
        if not dims or out is None:
            return True
        return self._in_axis(node, last_dim) in {d % len(out) for d in dims}

    def _reduces_channels(self, node, last_dim: bool) -> bool:
        """A mean / sum node reduces over the axis holding the group's channels: the one
        followed there (`channel_axes`), else the last (`last_dim`) or 1."""
        if self.axes_followed():
            found = _reduced_dims(node)
            ins = [i for i in self.data_inputs(node) if i in self.items]
            return found is None or len(ins) != 1 or self.axes()[ins[0]] in found[0]
        return _reduces_channels(node, last=last_dim)

    def data_inputs(self, node) -> list:
        return [i for i in node.inputs if not _is_param_leaf(i)]

    def zero_in(self, node) -> torch.Tensor:
        """Per root: the node's input is dead (every data input in the group carrying that root
        is dead, and at least one carries it)."""
        ins = [i for i in self.data_inputs(node) if i in self.items]
        if not ins:
            return torch.zeros(self.n_roots, dtype=torch.bool)
        z = torch.ones(self.n_roots, dtype=torch.bool)
        any_cover = torch.zeros(self.n_roots, dtype=torch.bool)
        strict = node.type != OPTYPE.CONCAT
        for i in ins:
            c = self.covers(i)
            zi = self.zero(i)
            z &= zi | ~c
            any_cover |= c
        if strict:
            # every data input of a non-concatenation must carry the root
            for i in self.data_inputs(node):
                if i not in self.items:
                    return torch.zeros(self.n_roots, dtype=torch.bool)
                any_cover &= self.covers(i)
        return z & any_cover

    def zero(self, node) -> torch.Tensor:
        """Per root: the node's output is dead (exactly zero for every input)."""
        if node in self._zero:
            return self._zero[node]
        self._zero[node] = torch.zeros(self.n_roots, dtype=torch.bool)  # cycle guard
        t, m = node.type, node.module
        n = self.n_roots
        if t in (OPTYPE.CONV, OPTYPE.LINEAR):
            z = torch.zeros(n, dtype=torch.bool)
            is_out = [(h, loc, r) for h, loc, r in self.items[node]
                      if h.__name__ == "prune_out_channels"]
            if is_out:
                w = out_in_view(m, m.weight.detach())
                dead = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
                if m.bias is not None:
                    dead &= m.bias.detach() == 0
                locs = torch.cat([loc for _, loc, _ in is_out])
                roots = torch.cat([r for _, _, r in is_out])
                z = self._all_by_root(locs, roots, dead) & self.covers_out(is_out)
        elif t == OPTYPE.DEPTHWISE_CONV:
            w = m.weight.detach()
            row0 = (w.reshape(w.shape[0], -1) == 0).all(dim=1)
            bias0 = (m.bias.detach() == 0) if m.bias is not None else torch.ones_like(row0)
            locs, roots = self._locals(node)
            zin = self.zero_in(node)
            z = (self._all_by_root(locs, roots, row0) | zin) & self._all_by_root(locs, roots, bias0)
            z &= self.covers(node)
        elif t == OPTYPE.BN:
            with torch.no_grad():
                c = m.num_features
                nd = 2 if isinstance(m, nn.BatchNorm1d) else 5 if isinstance(m, nn.BatchNorm3d) else 4
                probe = torch.zeros((2, c) + (1,) * (nd - 2), device=m.weight.device
                                    if m.weight is not None else None)
                maps_zero = (m(probe) == 0).reshape(2, c).all(dim=0)
                if m.affine:
                    kills = (m.weight.detach() == 0) & (m.bias.detach() == 0)
                else:
                    kills = torch.zeros(c, dtype=torch.bool)
            locs, roots = self._locals(node)
            zin = self.zero_in(node)
            # a zero affine makes the normalised value zero; a norm-act layer (timm's
            # BatchNormAct2d) then applies its activation, which must map zero to zero too
            z = self._all_by_root(locs, roots, kills & maps_zero) | (
                zin & self._all_by_root(locs, roots, maps_zero))
            z &= self.covers(node)
        elif node in self.graph.position_concats:
            # joined to a parameter's tokens (ViT's class token): dead where that is zero too
            z = self.zero_in(node) & self._params_zero(node)
        elif t in (OPTYPE.PRELU, OPTYPE.RESHAPE, OPTYPE.CONCAT, OPTYPE.EXPAND, OPTYPE.SPLIT) \
                or node in self.graph.position_slices:
            z = self.zero_in(node)
        elif _is_norm(node):  # a dead input channel outputs its bias (GroupNorm: zero weight)
            locs, roots = self._locals(node)
            z = self.zero_in(node) & self._all_by_root(locs, roots, _dead_out(m))
            z &= self.covers(node)
        elif t == OPTYPE.ELEMENTWISE:
            op = op_name(node)
            if op == "constantpadnd" and node.grad_fn in self.graph.zero_adds:
                z = self.zero_in(node)  # padded with zeros: a dead channel stays dead
            elif _is_param_leaf(node) or op in PER_CHANNEL or op in NORM_INSIDE:
                # (a norm-act layer's inner normalisation maps zero to its affine bias: the
                # BatchNorm node after it decides whether the channel is dead)
                z = torch.zeros(n, dtype=torch.bool)
            elif op in ("add", "sub"):
                # a dead channel plus a parameter holds that parameter (StarReLU's learned
                # bias, a per-channel shift): dead only where the parameter is zero
                # (or a value per channel and position: ViT's position embedding)
                z = self.zero_in(node) & self._params_zero(node)
            elif op == "mul":
                z = torch.zeros(n, dtype=torch.bool)
                for i in self.data_inputs(node):
                    if i in self.items:
                        z |= self.zero(i) & self.covers(i)
                z &= self.covers(node)
            else:
                z = self.zero_in(node)
        else:
            z = torch.zeros(n, dtype=torch.bool)
        self._zero[node] = z
        return z

    def const_in(self, node) -> torch.Tensor:
        """Per root: every data input of the node carrying the root holds one value for every
        input and position (at least one carries it; all do, but for a concatenation)."""
        ins = [i for i in self.data_inputs(node) if i in self.items]
        if not ins or (node.type != OPTYPE.CONCAT and len(ins) != len(self.data_inputs(node))):
            return torch.zeros(self.n_roots, dtype=torch.bool)
        c = torch.ones(self.n_roots, dtype=torch.bool)
        any_cover = torch.zeros(self.n_roots, dtype=torch.bool)
        for i in ins:
            cov = self.covers(i)
            c &= self.const(i) | ~cov
            any_cover |= cov
            if node.type != OPTYPE.CONCAT:
                c &= cov
        return c & any_cover

    def const(self, node) -> torch.Tensor:
        """Per root: the node's output holds one value (per channel) for every input and at
        every position: dead, or made of a dead channel and constants (a bias, StarReLU's
        learned scale and bias, a BatchNorm's shift). A consumer that folds such a channel into
        its bias (`foldable`) need not read it."""
        if node in self._const:
            return self._const[node]
        self._const[node] = torch.zeros(self.n_roots, dtype=torch.bool)  # cycle guard
        t, m = node.type, node.module
        c = torch.zeros(self.n_roots, dtype=torch.bool)
        if t in (OPTYPE.CONV, OPTYPE.LINEAR):
            outs = [(h, loc, r) for h, loc, r in self.items[node]
                    if h.__name__ == "prune_out_channels"]
            if outs and opaque_reason(m) is None:
                w = out_in_view(m, m.weight.detach())
                row0 = (w.reshape(w.shape[0], -1) == 0).all(dim=1)  # outputs its bias
                c = self._all_by_root(torch.cat([loc for _, loc, _ in outs]),
                                      torch.cat([r for _, _, r in outs]), row0) \
                    & self.covers_out(outs)
        elif t == OPTYPE.DEPTHWISE_CONV and opaque_reason(m) is None:
            w = m.weight.detach()
            locs, roots = self._locals(node)
            c = (self._all_by_root(locs, roots, (w.reshape(w.shape[0], -1) == 0).all(dim=1))
                 | self.zero_in(node)) & self.covers(node)
        elif t == OPTYPE.BN:
            c = self.const_in(node)  # (eval mode: running statistics, per channel)
        elif node in self.graph.position_concats:
            pass  # (a parameter's tokens beside the others': one value only where dead)
        elif t in (OPTYPE.PRELU, OPTYPE.RESHAPE, OPTYPE.CONCAT, OPTYPE.EXPAND, OPTYPE.SPLIT) \
                or node in self.graph.position_slices:
            c = self.const_in(node)
        elif _is_norm(node):  # dead in: its bias out (a live constant input is scaled by x_n)
            locs, roots = self._locals(node)
            c = self.zero_in(node) & self._all_by_root(locs, roots, _const_out(m))
            c &= self.covers(node)
        elif t == OPTYPE.ELEMENTWISE and not _is_param_leaf(node):
            op = op_name(node)
            if (op in ("addmm", "mm") and _feeds_linear(node)) or op in NORM_INSIDE:
                c = self.const_in(node)  # (their parameters are per channel, not per position)
            elif (op in CONST_KEEPING or op.startswith(CONST_KEEPING_FAMILIES)) and \
                    self._shifts(node) is not None:
                c = self.const_in(node)  # (its parameters are scalars or per channel)
        c = c | self.zero(node)
        self._const[node] = c
        return c

    def _shifts(self, node, positions: bool = False) -> list | None:
        """The per-channel parameters of no torch layer (their nodes in this group) that an
        element-wise node reads (`positions`: or per channel and position, as a position
        embedding); None where it reads any other parameter but scalars (not one value per
        channel, or computed from a parameter)."""
        srcs = []
        for i in node.inputs:
            if not _is_param_leaf(i):
                continue
            src = unwrapped_parameter(i)
            if src is None or src not in self.items or (
                    not positions and sum(size > 1 for size in src.module.shape) != 1):
                return None  # (`_param_unsupported` refuses the group then)
            srcs.append(src)
        mine = {id(src.module) for src in srcs}
        for p in _param_operands(node):  # read directly (AccumulateGrad), no node of their own
            if id(p) not in mine and p.numel() != 1:
                return None
        return srcs

    def _param_zero(self, src) -> torch.Tensor:
        """Per root: the parameter (a PARAMETER member, one value per channel or per channel
        and position) is zero on it, at every position."""
        locs, roots = self._locals(src)
        p = src.module.detach()
        zero = (p.movedim(_pruning_dim(src), 0).reshape(p.shape[_pruning_dim(src)], -1) == 0).all(1)
        return self._all_by_root(locs, roots, zero) & self.covers(src)

    def _params_zero(self, node) -> torch.Tensor:
        """Per root: every parameter operand of an element-wise node or a concatenation (a
        learned shift, a position embedding, a class token) is zero on it."""
        srcs = self._shifts(node, positions=True)
        mine = {id(src.module) for src in srcs or ()}
        if srcs is None or any(bool((p != 0).any()) for p in _param_operands(node)
                               if id(p) not in mine):
            return torch.zeros(self.n_roots, dtype=torch.bool)
        z = torch.ones(self.n_roots, dtype=torch.bool)
        for src in srcs:
            z &= self._param_zero(src)
        return z

    def _param_unsupported(self, node, last_dim) -> str | None:
        """Why a parameter of no torch layer (a PARAMETER member) stops the group's cut, or None:
        it must hold one value per channel, along the axis where every element-wise add, sub or
        mul that reads it (directly or laid out by a view / unsqueeze) has the group's channels."""
        p = node.module
        big = [d for d, size in enumerate(p.shape) if size > 1]
        dim = _pruning_dim(node)
        if dim not in big:
            return f"{node.name}: a parameter holding more than one value per channel"
        uses, stack = [], [(o, node) for o in node.outputs]
        while stack:
            o, operand = stack.pop()
            if _is_param_leaf(o):
                if op_name(o) not in LAYOUT_ONLY:
                    return f"{node.name}: a parameter computed on ({op_name(o)}) before it is used"
                # (an expand repeats the values along the batch: its input is the layout)
                stack.extend((oo, operand if op_name(o) == "expand" else o) for oo in o.outputs)
            else:
                uses.append((o, operand))
        for use, operand in uses:
            op = op_name(use) if use.type == OPTYPE.ELEMENTWISE else ""
            if use not in self.items or (op not in ("add", "sub", "mul")
                                         and use not in self.graph.position_concats):
                return f"{node.name}: a parameter read by {op or use.type.name.lower()}"
            out = output_shape(use)
            shape = tuple(p.shape) if operand is node else output_shape(operand)
            if out is None or shape is None or len(shape) > len(out):
                return f"{node.name}: a parameter whose layout is not known"
            if self.axes_followed():
                axis = self.axes().get(use)
            else:
                axis = len(out) - 1 if last_dim else 1
            if len(big) > 1:
                # a value per channel and position (ViT's position embedding, class token):
                # read as it is laid out, its channels on the group's channel axis
                if operand is not node or len(out) - len(shape) + dim != axis:
                    return f"{node.name}: a parameter along another axis than the channels"
                continue
            big_op = [d for d, size in enumerate(shape) if size > 1]
            if len(big_op) != 1 or len(out) - len(shape) + big_op[0] != axis:
                return f"{node.name}: a parameter along another axis than the channels"
        return None

    def covers_out(self, items) -> torch.Tensor:
        c = torch.zeros(self.n_roots, dtype=torch.bool)
        for _, _, roots in items:
            c[roots] = True
        return c

    def removable(self) -> torch.Tensor:
        """Per root channel: True if removing it from every member leaves the function as is."""
        ok = torch.ones(self.n_roots, dtype=torch.bool)
        for node in self.items:
            if node in self.out_nodes or node.type == OPTYPE.OUTPUT:
                # a model output shows the channel (a linear head only shows its output side)
                shown = self.items[node] if node.type not in (OPTYPE.CONV, OPTYPE.LINEAR) else [
                    (h, loc, r) for h, loc, r in self.items[node]
                    if h.__name__ == "prune_out_channels"]
                ok &= ~self.covers_out(shown)
            if node.type == OPTYPE.SLICE and node not in self.graph.position_slices:
                # a slice picks channels by position: every channel of what it reads stays
                ok &= ~self._read_by_slice(node)
            if _is_norm(node):
                # every channel is in the statistics that scale the others: only a channel
                # dead on the way in (adding zero to them) may go, also where nothing reads it
                ok &= self.zero_in(node) | ~self.covers(node)
            if node.type == OPTYPE.DEPTHWISE_CONV:
                # its input channels go too: they must come from inside the group
                ins = [i for i in self.data_inputs(node) if i in self.items]
                carried = torch.zeros(self.n_roots, dtype=torch.bool)
                for i in ins:
                    carried |= self.covers(i)
                ok &= carried | ~self.covers(node)
            if node.type in (OPTYPE.CONV, OPTYPE.LINEAR):
                cons = [(h, loc, r) for h, loc, r in self.items[node]
                        if h.__name__ == "prune_in_channels"]
                if not cons:
                    continue
                m = node.module
                w = out_in_view(m, m.weight.detach())
                if isinstance(m, nn.modules.conv._ConvNd) and m.groups > 1:
                    # input c is column c % (in/groups) of the rows of group c // (in/groups)
                    col0 = (w == 0).reshape(m.groups, w.shape[0] // m.groups, w.shape[1], -1) \
                        .all(dim=3).all(dim=1).reshape(-1)
                else:
                    col0 = (w == 0).all(dim=0).reshape(w.shape[1], -1).all(dim=1) if w.dim() > 2 \
                        else (w == 0).all(dim=0)
                locs = torch.cat([loc for _, loc, _ in cons])
                roots = torch.cat([r for _, _, r in cons])
                zin = self.zero_in(node)
                read = ~self._all_by_root(locs, roots, col0)
                if foldable(m):  # a constant input folds into the bias (`_fold_constants`)
                    const = self.const_in(node) & ~zin
                    self.folds |= const & read
                    zin = zin | const
                ok &= ~read | zin
        return ok

    def _read_by_slice(self, node) -> torch.Tensor:
        """Per root: carried by the split chunk a slice node reads (FocalNet's gates; all the
        split's roots where the chunk is not known)."""
        read = torch.zeros(self.n_roots, dtype=torch.bool)
        for i in self.data_inputs(node):
            if i not in self.items:
                continue
            chunk = next((self.graph._chunk_of.get(id(d)) for d in i.dependencies
                          if d.source is i and d.target is node), None)
            if chunk is None or i not in self.graph.split_attrs:
                read |= self.covers(i)
                continue
            m, attr = self.graph.split_attrs[i]
            sizes = getattr(m, attr)
            start = sum(sizes[:chunk[1]])
            for _, loc, roots in self.items[i]:
                read[roots[(loc >= start) & (loc < start + sizes[chunk[1]])]] = True
        return read

    def _cut_roots(self, pruning) -> set[int]:
        """The roots (of this full group) of the items that a pruning group cuts."""
        out = set()
        for it in pruning:
            lookup = self._root_of.get((it.dep.target, it.dep.handler))
            if lookup is not None:
                out.update(lookup[i] for i in (int(j) for j in it.idxs) if i in lookup)
        return out

    def closed(self, ok: torch.Tensor, pruning, closure_of) -> torch.Tensor | None:
        """None if `pruning` (the group of the roots in `ok`) cuts nothing of any other root;
        else `ok` without the roots whose own pruning group (`closure_of(root)`) cuts an item
        of a root that must stay. Two roots can share an item: in a ghost module a channel and
        its depthwise copy are concatenated side by side, and a depthwise conv on the result
        has both as roots, while the first conv's row feeds them both."""
        keep = ~ok
        if not any(bool(keep[r]) for r in self._cut_roots(pruning)):
            return None
        narrowed = ok.clone()
        for r in torch.nonzero(ok).flatten().tolist():
            if any(bool(keep[c]) for c in self._cut_roots(closure_of(r))):
                narrowed[r] = False
        return narrowed

    def balanced(self, drop: torch.Tensor) -> torch.Tensor:
        """`drop` (per root) with dead channels kept back until every grouped conv of the group
        keeps the same number of channels, at least one (outputs: two where each group has
        several inputs), in each of its groups (the lowest channels of a short group first);
        `drop` itself is not changed."""
        drop = drop.clone()
        convs = {}  # (node, side) -> (locals, roots) over all of the node's items on that side
        for node, items in self.items.items():
            m = node.module
            if node.type != OPTYPE.CONV or m.groups == 1:
                continue
            for h, loc, roots in items:
                side = "out" if h.__name__ == "prune_out_channels" else "in"
                prev = convs.get((node, side), (loc[:0], roots[:0]))
                convs[node, side] = (torch.cat([prev[0], loc]), torch.cat([prev[1], roots]))
        changed = bool(convs)
        while changed:
            changed = False
            for (node, side), (loc, roots) in convs.items():
                m = node.module
                per = (m.out_channels if side == "out" else m.in_channels) // m.groups
                cls = loc // per
                gone = drop[roots]
                keeps = per - torch.bincount(cls[gone], minlength=m.groups)
                # one output per group with several inputs each would make the graph take it
                # for a depthwise conv (groups == out_channels) and tie its inputs to its
                # outputs one to one: two are kept there (one dead) instead
                least = 2 if side == "out" and per >= 2 and m.in_channels > m.groups else 1
                target = max(int(keeps.max()), least)
                for j in torch.nonzero(keeps < target).flatten().tolist():
                    short = target - int(keeps[j])
                    back = roots[(cls == j) & gone].unique()[:short]
                    drop[back] = False
                    changed = True
        return drop


def remove_dead_channels(model: nn.Module, example_inputs: Sequence[torch.Tensor] | torch.Tensor,
                         max_passes: int = 8) -> SurgeryReport:
    """Remove, in place, every channel of `model` that cannot affect its output (see the module
    docstring), with torch-pruning's DependencyGraph. Returns what was kept and removed."""
    inputs = as_inputs(example_inputs)
    model.eval()
    graph, out_nodes = trace(model, inputs)
    names = {m: n for n, m in model.named_modules()}
    kept = {}
    for name, m in model.named_modules():
        if isinstance(m, TRACKED):
            o, i = _channels(m)
            kept[name] = ChannelMap(torch.arange(o), torch.arange(i))
    removed: dict[str, int] = {}
    skipped: dict[str, str] = {}
    members: dict[str, list[str]] = {}  # root of a group left whole -> its layers (out side)
    split_sizes: dict[str, dict[str, list[int] | int]] = {}
    param_shapes: dict[str, list[int]] = {}
    # reshape nodes of pruned groups: the sizes their autograd nodes saved (which the checks
    # of a flatten read) are stale; the graph is traced again before a group holding one is
    # looked at, and at the start of a pass (not after every group: a trace of a transformer
    # costs a second or more)
    stale: set = set()
    for _ in range(max_passes):
        changed = False
        if stale:
            graph, out_nodes = trace(model, inputs)
            stale = set()
        roots = _group_roots(graph, names, skipped)
        for module, handler, group in roots:
            root_name = names.get(module, str(module))
            n_out = graph.get_out_channels(module)
            if not n_out:
                continue
            try:
                if changed:  # channels went since the groups were listed: offsets may differ
                    group = graph.get_pruning_group(module, handler, list(range(n_out)))
                if stale and any(it.dep.target in stale for it in group):
                    graph, out_nodes = trace(model, inputs)
                    stale = set()
                    group = graph.get_pruning_group(module, handler, list(range(n_out)))
                g = _Group(graph, group, out_nodes)
            except IndexMappingFailed as e:
                skipped[root_name] = str(e)
                continue
            reason = g.unsupported()
            if reason is not None:
                skipped[root_name] = reason
                members[root_name] = _out_members(g, names)
                continue
            ok = g.removable()
            if bool(ok.all()):
                ok[0] = False  # keep one channel: no layer may end with zero width
            while True:
                ok = g.balanced(ok)
                idxs = [int(r) for r in torch.nonzero(ok).flatten()]
                if not idxs:
                    break
                # root local index == root index for the full group built above
                pruning = graph.get_pruning_group(module, handler, idxs)
                narrowed = g.closed(ok, pruning,
                                    lambda r: graph.get_pruning_group(module, handler, [r]))
                if narrowed is None:
                    break
                ok = narrowed
            if not idxs:
                continue
            why = _opaque_members_commute(pruning, names)
            if why is not None:
                skipped[root_name] = why
                members[root_name] = _out_members(g, names)
                continue
            before_cut = _Snapshot(pruning, kept, graph)
            why = _fold_constants(model, inputs, pruning) if bool(g.folds[idxs].any()) else None
            if why is not None:
                before_cut.restore(kept)
                skipped[root_name] = why
                members[root_name] = _out_members(g, names)
                continue
            for it in pruning:
                target = it.dep.target.module
                name = names.get(target)
                if name is None or name not in kept:
                    continue
                drop = torch.as_tensor(sorted(set(int(i) for i in it.idxs)), dtype=torch.long)
                cm = kept[name]
                fn = it.dep.handler.__name__
                # (the node's type as traced: a grouped conv cut to one output channel per
                # group looks depthwise now, but its inputs go with its producer's group)
                both = isinstance(target, (nn.modules.batchnorm._BatchNorm, nn.PReLU)) or \
                    it.dep.target.type == OPTYPE.DEPTHWISE_CONV
                if both or fn == "prune_out_channels":
                    cm.out = _delete(cm.out, drop)
                if both or fn == "prune_in_channels":
                    cm.inp = _delete(cm.inp, drop)
            # torch-pruning cuts a grouped conv's inputs at the first group's positions in
            # every group: its weight is cut here instead, from the weight before
            grouped_in_cuts = [(it.dep.target.module, it.dep.target.module.weight.detach().clone(),
                           sorted(set(int(i) for i in it.idxs))) for it in pruning
                          if it.dep.handler.__name__ == "prune_in_channels"
                          and it.dep.target.type == OPTYPE.CONV
                          and it.dep.target.module.groups > 1]
            pruning.prune(record_history=False)
            for conv, before, cut in grouped_in_cuts:
                keep = torch.ones(before.shape[1] * conv.groups, dtype=torch.bool)
                keep[cut] = False
                conv.weight = nn.Parameter(grouped_in_select(before, conv.groups,
                                                             torch.nonzero(keep).flatten()),
                                           requires_grad=conv.weight.requires_grad)
            resized = _resize_splits(graph, pruning)
            viewed = _resize_views(graph, pruning)
            reshaped = _resize_reshapes(graph, g, pruning)
            why = _breaks_forward(model, inputs)
            if why is not None:  # (timm's LambdaLayer reshapes its output by its input width)
                before_cut.restore(kept)
                skipped[root_name] = f"cutting its channels breaks the model's forward ({why})"
                members[root_name] = _out_members(g, names)
                continue
            # (autograd nodes saved the sizes before; torch-pruning replaced the parameters
            # of no layer, which their autograd nodes still hold)
            stale.update(n for n in g.items if n.type in (OPTYPE.RESHAPE, OPTYPE.PARAMETER))
            stale.update(resized)
            for node in resized:
                m, attr = graph.split_attrs[node]
                split_sizes.setdefault(names[m], {})[attr] = [int(v) for v in getattr(m, attr)]
            for node in viewed:
                m, attr = graph.view_attrs[node]
                split_sizes.setdefault(names[m], {})[attr] = [int(v) for v in getattr(m, attr)]
            for m, attr in reshaped:
                split_sizes.setdefault(names[m], {})[attr] = int(getattr(m, attr))
            for it in pruning:
                if it.dep.target.type == OPTYPE.PARAMETER:
                    name = graph._param_to_name[it.dep.target.module]
                    param_shapes[name] = list(it.dep.target.module.shape)
            # a grouped conv cut to one channel per group is depthwise now: traced again, the
            # graph ties its inputs to its outputs, so that whole dead groups can go
            stale.update(n for n in g.items if n.type == OPTYPE.CONV and n.module.groups > 1
                         and n.module.groups == n.module.out_channels == n.module.in_channels)
            removed[root_name] = removed.get(root_name, 0) + len(idxs)
            skipped.pop(root_name, None)
            changed = True
        if not changed:
            break
    for name, m in model.named_modules():
        if name in kept:
            o, i = _channels(m)
            cm = kept[name]
            if len(cm.out) != o or len(cm.inp) != i:
                raise AssertionError(f"channel bookkeeping of {name} is off: "
                                     f"{len(cm.out)}/{o}, {len(cm.inp)}/{i}")
    whole: dict[str, str] = {}
    for root, why in skipped.items():
        for name in members.get(root, [root]):
            whole.setdefault(name, why)
    return SurgeryReport(kept, removed, skipped, whole, split_sizes, param_shapes)


class _Snapshot:
    """The modules a cut touches (their attributes, parameters and buffers as they are; the
    parameters of no torch layer, which torch-pruning replaces on their owner; the attributes
    holding the sizes of its splits and the shapes of its parameter views) and the channel
    bookkeeping, to put back where the cut model no longer runs."""

    def __init__(self, pruning, kept: dict, graph):
        self.graph = graph
        self.modules = []
        self.params = []  # (node, owner module, attribute, the parameter)
        self.sizes = []
        for it in pruning:
            node = it.dep.target
            t = node.module
            if node.type == OPTYPE.PARAMETER:
                owner, attr = _owner(graph, t)
                self.params.append((node, owner, attr, t))
            elif isinstance(t, nn.Module):
                self.modules.append((t, dict(t.__dict__), dict(t._parameters), dict(t._buffers)))
            for attrs in (graph.split_attrs, graph.view_attrs):
                if node in attrs:
                    m, attr = attrs[node]
                    self.sizes.append((m, attr, getattr(m, attr)))
            if node in graph.reshape_attrs:
                m, by_axis = graph.reshape_attrs[node]
                self.sizes.extend((m, attr, getattr(m, attr)) for attr in by_axis.values())
        self.books = {n: (cm.out, cm.inp) for n, cm in kept.items()}

    def restore(self, kept: dict) -> None:
        for m, attrs, params, buffers in self.modules:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            m._parameters, m._buffers = params, buffers
        g = self.graph
        for node, owner, attr, old in self.params:
            new = node.module
            setattr(owner, attr, old)
            if new is not old:  # torch-pruning's records of the parameter, as they were
                g._param_to_name[old] = g._param_to_name.pop(new)
                g.module2node[old] = g.module2node.pop(new)
                node.module = old
        for m, attr, sizes in self.sizes:
            setattr(m, attr, sizes)
        for n, (out, inp) in self.books.items():
            kept[n].out, kept[n].inp = out, inp


def _owner(graph, param: nn.Parameter) -> tuple[nn.Module, str]:
    """The module holding a parameter of no torch layer, and its attribute name."""
    path, _, attr = graph._param_to_name[param].rpartition(".")
    return (graph.model.get_submodule(path) if path else graph.model), attr


def _resize_views(graph, pruning) -> set:
    """Set the shape attribute of every view of a cut parameter of no torch layer
    (`view_attrs`: timm's `Scale` views its layer scale to `self.shape`): the channel axis gets
    the parameter's new width. Returns the view nodes whose shape was set."""
    done = set()
    for it in pruning:
        node = it.dep.target
        if node.type != OPTYPE.PARAMETER:
            continue
        stack = list(node.outputs)
        while stack:
            view = stack.pop()
            if not _is_param_leaf(view):
                continue
            stack.extend(view.outputs)
            if view not in graph.view_attrs:
                continue
            m, attr = graph.view_attrs[view]
            shape = list(getattr(m, attr))
            big = [d for d, size in enumerate(shape) if size != 1]
            if len(big) == 1 and shape[big[0]] != -1:
                shape[big[0]] = node.module.numel()
                setattr(m, attr, type(getattr(m, attr))(shape))
                done.add(view)
    return done


def _resize_reshapes(graph, g: _Group, pruning) -> list:
    """Lower the int attribute a module reshapes data by (`reshape_attrs`: torchvision's ViT
    reshapes its patches to `self.hidden_dim` channels) by the channels cut, where it sizes
    the axis holding them (`channel_axes`). Returns the (module, attribute) pairs set."""
    axes = g.axes() or {}
    done, seen = [], set()
    for it in pruning:
        node = it.dep.target
        if node not in graph.reshape_attrs or node in seen:
            continue
        seen.add(node)
        m, by_axis = graph.reshape_attrs[node]
        attr = by_axis.get(axes.get(node))
        if attr is not None:
            setattr(m, attr, getattr(m, attr) - len({int(i) for i in it.idxs}))
            done.append((m, attr))
    return done


def first_calls(model: nn.Module, inputs: tuple, modules) -> dict:
    """{module: the positional arguments of its first call} in one forward of `model` on
    `inputs` (without autograd), for each of `modules` that was called."""
    seen: dict = {}
    hooks = [m.register_forward_pre_hook(lambda mod, args: seen.setdefault(mod, args))
             for m in modules]
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _fold_constants(model: nn.Module, inputs: tuple, pruning) -> str | None:
    """Fold into each consumer's bias what it reads from the input channels the cut takes away
    where its weight column is not zero: such a channel holds one value everywhere
    (`_Group.const`), read here from a forward pass on the example (at any position). A
    consumer without a bias gets one. Returns why not, where a consumer's forward never ran."""
    cuts = []
    for it in pruning:
        m = it.dep.target.module
        if it.dep.handler.__name__ != "prune_in_channels" or not isinstance(m, _LAYERS) \
                or it.dep.target.type not in (OPTYPE.CONV, OPTYPE.LINEAR) or not foldable(m):
            continue  # (elsewhere only unread or dead channels are cut: nothing to fold)
        idx = sorted(set(int(i) for i in it.idxs))
        cols = out_in_view(m, m.weight.detach())[:, idx]
        if bool((cols != 0).any()):
            cuts.append((m, idx, cols))
    if not cuts:
        return None
    seen = first_calls(model, inputs, [m for m, _, _ in cuts])
    for m, idx, cols in cuts:
        if m not in seen:
            return f"a constant channel it reads cannot be folded: {type(m).__name__}'s forward never ran"
        x = seen[m][0].detach()
        v = x.reshape(-1, x.shape[-1])[0, idx] if isinstance(m, nn.Linear) else \
            x[0, idx].reshape(len(idx), -1)[:, 0]
        # no padding: every output position reads the channel's value under the whole kernel
        folded = (cols.reshape(cols.shape[0], len(idx), -1).sum(dim=2) * v).sum(dim=1)
        if not bool(folded.any()):
            continue  # dead channels (zero everywhere): nothing to fold, no bias to add
        bias = m.bias.detach() if m.bias is not None else torch.zeros_like(folded)
        # a new parameter, not an in-place change: the snapshot of the cut keeps the old one
        m.bias = nn.Parameter(bias + folded, requires_grad=m.weight.requires_grad)
    return None


def _resize_splits(graph, pruning) -> set:
    """Set the sizes attribute of every split the cut went through (`split_attrs`): each chunk
    loses the channels cut from it. torch-pruning updates only its own record of the sizes,
    which the model's forward never reads. Returns the split nodes resized."""
    cut: dict = {}
    for it in pruning:
        if it.dep.target in graph.split_attrs:
            cut.setdefault(it.dep.target, set()).update(int(i) for i in it.idxs)
    for node, idxs in cut.items():
        m, attr = graph.split_attrs[node]
        sizes = getattr(m, attr)
        new, start = [], 0
        for size in sizes:  # indices are the split's input channels (before the cut)
            new.append(size - sum(1 for i in idxs if start <= i < start + size))
            start += size
        setattr(m, attr, type(sizes)(new))
    return set(cut)


def _breaks_forward(model: nn.Module, inputs: tuple) -> str | None:
    """Why the model no longer runs on the example inputs (None if it does): a forward that
    reshapes by a width the cut changed."""
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:  # noqa: BLE001 - any failure of the user's forward
        return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    return None


def _out_members(g: _Group, names: dict) -> list[str]:
    """The conv / linear layers whose output channels are in the group."""
    out = []
    for node, items in g.items.items():
        if isinstance(node.module, _LAYERS) and names.get(node.module) is not None and any(
                h.__name__ in ("prune_out_channels", "prune_depthwise_conv_out_channels")
                for h, _, _ in items):
            out.append(names[node.module])
    return out


def _group_roots(graph, names: dict, skipped: dict) -> list:
    """(root module, handler, full group) of every coupled group, found as torch-pruning's
    `get_all_groups` finds them (each conv / linear layer whose output channels no earlier
    group holds). A root whose group the graph cannot map (`IndexMappingFailed`) is left
    whole, the reason in `skipped`, and the other groups go on."""
    held: set = set()
    out = []
    for m in list(graph.module2node):
        if not isinstance(m, _LAYERS) or m in held:
            continue
        pruner = graph.get_pruner_of_module(m)
        n_out = pruner.get_out_channels(m) if pruner is not None else None
        if n_out is None:
            continue
        try:
            group = graph.get_pruning_group(m, pruner.prune_out_channels, list(range(n_out)))
        except IndexMappingFailed as e:
            skipped[names.get(m, str(m))] = str(e)
            held.add(m)
            continue
        for it in group:
            if graph.is_out_channel_pruning_fn(it.dep.handler):
                held.add(it.dep.target.module)
        out.append((m, group[0].dep.handler, group))
    return out


def _opaque_members_commute(pruning, names: dict) -> str | None:
    """None if every member of `pruning` whose class overrides forward (see `opaque_reason`)
    computes, with its channels cut by the group's handler, exactly the kept channels of what
    it computed before; else why not. Checked on a copy with random inputs of two odd sizes:
    a TF-"same" padding conv passes (padding depends on the spatial size only), a
    weight-standardised conv fails (cutting input channels changes each row's statistics)."""
    for it in pruning:
        m = it.dep.target.module
        if not isinstance(m, _LAYERS) or opaque_reason(m) is None:
            continue
        idxs = sorted(set(int(i) for i in it.idxs))
        if not _commutes(m, it.dep.handler, idxs, it.dep.target.type == OPTYPE.DEPTHWISE_CONV):
            return (f"{names.get(m, type(m).__name__)}: {opaque_reason(m)}, and its output "
                    "changes when these channels are cut")
    return None


def _commutes(module: nn.Module, handler, idxs: list[int], depthwise: bool) -> bool:
    fn = handler.__name__
    conv = isinstance(module, nn.modules.conv._ConvNd)
    both = depthwise  # input channel c makes output channel c
    c_in = module.in_channels if conv else module.in_features
    c_out = module.out_channels if conv else module.out_features
    g = torch.Generator().manual_seed(0)
    try:
        cut = copy_module(module)
        handler(cut, idxs)
        with torch.no_grad():
            for extra in (0, 3):
                if conv:
                    size = [(k - 1) * d + 2 * st + 5 + extra for k, d, st in
                            zip(module.kernel_size, module.dilation, module.stride)]
                    x = torch.randn([2, c_in] + size, generator=g)
                else:
                    x = torch.randn(2 + extra, c_in, generator=g)
                x = x.to(module.weight)
                keep_in = torch.tensor([i for i in range(c_in) if i not in set(idxs)])
                keep_out = torch.tensor([i for i in range(c_out) if i not in set(idxs)])
                if both or fn == "prune_out_channels":
                    ref = module(x).index_select(1, keep_out)
                    got = cut(x.index_select(1, keep_in) if both else x)
                else:  # the cut inputs are dead (zero) where the layer reads them
                    dead = torch.zeros(c_in, dtype=torch.bool)
                    dead[idxs] = True
                    x = x.masked_fill(dead.view(1, -1, *([1] * (x.dim() - 2))).to(x.device), 0)
                    ref, got = module(x), cut(x.index_select(1, keep_in))
                scale = float(ref.abs().max()) if ref.numel() else 0.0
                if ref.shape != got.shape or float((ref - got).abs().max()) > 1e-5 * max(scale, 1e-12):
                    return False
    except Exception:  # the cut layer does not even run: it does not commute
        return False
    return True


def _delete(ids: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
    keep = torch.ones(len(ids), dtype=torch.bool)
    keep[local] = False
    return ids[keep]
