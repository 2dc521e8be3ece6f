"""Gather absorption: run a regrouped conv layer as one grouped convolution, without gathers.

A channel-granular `BlockConv2d` whose blocks share no output channel is, exactly,
`conv(x.index_select(1, in_index)).index_select(1, out_index)` with one grouped `nn.Conv2d`
(its grouped form, `BlockConv2d.grouped_form`). The two channel gathers cost the executor about
a third of its time (benchmarks/results/block_conv.md); they disappear when the neighbouring
layers take them over once, at compaction time:

- **input gather**: when the layer's input comes from a plain conv (through per-channel
  operations only: BatchNorm, ReLU-like activations, pooling, dropout) and nothing else reads
  that conv's output, the producer's output channels (and its BatchNorm's entries) are
  reordered to `in_index`, so that each block's input channels are contiguous; channels no
  block reads are dead there (this layer is their only reader) and are dropped;
- **output gather**: when the layer's output goes (through per-channel operations) to one plain
  conv, or through a flatten to one linear layer, and nothing else reads it, the output stays
  in block order and the consumer's input channels (and the BatchNorm between) are reordered to
  match; when the consumer is another such grouped layer, its input index is composed with this
  one (one gather left instead of two, none when the two layers' blocks agree).

Blocks of unequal sizes are padded to the largest one (zero weights) while that costs at most
`MAX_PADDED_WORK` times the blocks' own work; output channels in no block (they output their
bias: the dense remainder) take padded row slots; the producer computes a channel twice where
the grouped conv reads it twice (a padded block's filler channel), and the consumer gives the
padded rows' outputs zero weights. Where the graph does not allow it (a residual addition, a
concatenation or a second layer reads the channels, the producer is the model's input, blocks
share rows, the padding would cost too much, the model cannot be traced by torch.fx), the
gather stays and the reason is recorded per layer in `ts.compact.describe` (`gathers`). A layer
left with no gather becomes a plain `nn.Conv2d(groups=n_blocks)`; one with a gather left becomes
a `GroupedConv2d` (the grouped conv plus the remaining gather); one where nothing could be
absorbed keeps its block executor.

    small = ts.compact(model, masks, x, absorb=True)       # or, on a compact model:
    small = ts.compact.absorb_gathers(small, x)

Every rewrite reorders channels, removes dead ones, or adds channels that meet zero weights, so
the result computes the same function; it is checked against the model it came from as
`compact` checks its result (benchmarks/results/absorbed_conv.md: the 256->256 layer at 75% in
4 blocks ran 3.3-3.7x the fastest dense conv absorbed, 2.5x as the executor, 1 thread).
"""
from __future__ import annotations

import copy
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import fx, nn
from torch.nn import functional as F

from ..errors import TicketsmithError, UsageError
from ..masks import copy_module
from ..models.attention import QKVAttention, WindowAttention
from ..models.zoo_attention import SWAPPED
from .blocks import BlockConv2d, Executor, _check_config

__all__ = ["absorb_gathers", "GroupedConv2d"]


class GroupedConv2d(Executor):
    """A regrouped conv layer in its grouped form with the channel gathers that the neighbouring
    layers could not absorb: `y = conv(x[:, in_index], groups)[:, out_index]`, each index
    optional (None: no gather on that side)."""

    def __init__(self, in_channels: int, weight: torch.Tensor, bias: torch.Tensor | None,
                 stride: tuple[int, int], padding: tuple[int, int], dilation: tuple[int, int],
                 groups: int, in_index: torch.Tensor | None, out_index: torch.Tensor | None,
                 name: str | None = None):
        super().__init__(name)
        self.in_channels = int(in_channels)
        self.stride, self.padding, self.dilation = tuple(stride), tuple(padding), tuple(dilation)
        self.groups = int(groups)
        conv_in = weight.shape[1] * self.groups
        where = self._where()
        if weight.dim() != 4 or weight.shape[0] % self.groups:
            raise UsageError(f"{where}: weight of shape {tuple(weight.shape)} does not fit "
                             f"{self.groups} groups")
        if in_index is not None:
            in_index = _checked(where, "in_index", in_index, self.in_channels)
            if in_index.numel() != conv_in:
                raise UsageError(f"{where}: in_index has {in_index.numel()} entries, the grouped "
                                 f"conv takes {conv_in} channels")
        elif conv_in != self.in_channels:
            raise UsageError(f"{where}: without in_index the grouped conv must take all "
                             f"{self.in_channels} input channels, it takes {conv_in}")
        if out_index is not None:
            out_index = _checked(where, "out_index", out_index, weight.shape[0])
        self.out_channels = int(out_index.numel() if out_index is not None else weight.shape[0])
        self.register_parameter("weight", nn.Parameter(weight.detach().clone(),
                                                       requires_grad=False))
        self.register_parameter("bias", None if bias is None else
                                nn.Parameter(bias.detach().clone(), requires_grad=False))
        self.register_buffer("in_index", in_index)
        self.register_buffer("out_index", out_index)
        self.executor = "grouped"

    def to_conv(self) -> nn.Conv2d:
        """The plain grouped nn.Conv2d (valid as the whole layer only without gathers)."""
        w = self.weight
        conv = nn.Conv2d(w.shape[1] * self.groups, w.shape[0], tuple(w.shape[2:]), self.stride,
                         self.padding, self.dilation, self.groups, bias=self.bias is not None)
        with torch.no_grad():
            conv.weight.copy_(w)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        conv.weight.requires_grad_(False)
        if conv.bias is not None:
            conv.bias.requires_grad_(False)
        return conv.to(w.device)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_index is not None:
            x = x.index_select(1, self.in_index)
        y = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation,
                     self.groups)
        return y if self.out_index is None else y.index_select(1, self.out_index)

    def _kernels(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        return {"grouped": self._run}

    def _default(self, batch_size: int) -> str:
        return "grouped"

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._run(x)  # Gather (where left), one grouped Conv, Gather (where left)

    def _differentiable(self, x: torch.Tensor) -> torch.Tensor:
        if any(p.requires_grad for n, p in self.named_parameters() if n != "bias"):
            return super()._differentiable(x)  # refuses, with the reason
        return self._run(x)  # every op here has a backward (the bias gets its gradient)

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UsageError(f"{self._where()}: expected an input [N, {self.in_channels}, H, W], "
                             f"got {shape}")

    def extra_repr(self) -> str:
        left = [s for s, t in (("input", self.in_index), ("output", self.out_index))
                if t is not None]
        return (f"{self.in_channels}, {self.out_channels}, groups={self.groups}, "
                f"gathers={'+'.join(left) or 'none'}")

    def to_config(self) -> dict:
        """JSON-able description; with `tensors()` it rebuilds the module (`from_config`)."""
        return {"kind": "GroupedConv2d", "in_channels": self.in_channels,
                "stride": list(self.stride), "padding": list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups,
                "bias": self.bias is not None, "in_index": self.in_index is not None,
                "out_index": self.out_index is not None, "executor": self.executor,
                "name": self.layer_name}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's own tensors (weight, bias, gather indices), by name."""
        t = {"weight": self.weight.detach()}
        for k in ("bias", "in_index", "out_index"):
            v = getattr(self, k)
            if v is not None:
                t[k] = v.detach()
        return t

    @classmethod
    def from_config(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "GroupedConv2d":
        """Rebuild a module saved with `to_config()` and `tensors()`."""
        need = ["weight"] + [k for k in ("bias", "in_index", "out_index")
                             if isinstance(config, dict) and config.get(k)]
        _check_config(cls, config, tensors, need)
        try:
            mod = cls(int(config["in_channels"]), tensors["weight"],
                      tensors["bias"] if config["bias"] else None, tuple(config["stride"]),
                      tuple(config["padding"]), tuple(config["dilation"]), int(config["groups"]),
                      tensors["in_index"] if config["in_index"] else None,
                      tensors["out_index"] if config["out_index"] else None, config.get("name"))
        except KeyError as e:
            raise UsageError(f"GroupedConv2d.from_config: config lacks {e}") from None
        mod.use(config.get("executor", mod.executor))
        return mod


def _checked(where: str, what: str, t: Any, bound: int) -> torch.Tensor:
    """A 1-D int64 index into [0, bound) (repeats allowed: the padding of unequal blocks)."""
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise UsageError(f"{where}: {what} must be a 1-D integer tensor, got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    t = t.detach().to(torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
        raise UsageError(f"{where}: {what} out of range [0, {bound})")
    return t.clone()


# ---------------------------------------------------------------------------------------------
# the graph: which operations carry channels one to one
# ---------------------------------------------------------------------------------------------

# Modules acting on each channel independently without parameters of their own (eval mode).
_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.Hardtanh, nn.GELU, nn.SiLU, nn.ELU, nn.CELU,
                nn.SELU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.Softplus,
                nn.Identity, nn.Dropout, nn.Dropout2d, nn.AlphaDropout)
_POOLS = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.Upsample)
_FUNCTIONS = {F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.leaky_relu, F.hardtanh,
              F.gelu, F.silu, F.elu, F.celu, F.selu, F.mish, F.hardswish, F.hardsigmoid,
              torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, F.softplus, F.dropout, F.dropout2d,
              F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d}
_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone"}


class _Tracer(fx.Tracer):
    """Executors and the attention modules of `ticketsmith.models` (their forwards branch on
    their inputs' shapes, which torch.fx cannot trace: opaque, as nn.MultiheadAttention is) and
    every torch.nn layer stay single call_module nodes."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (Executor, QKVAttention, WindowAttention, *SWAPPED)) \
            or super().is_leaf_module(m, qualname)


def _only_first_is_node(node: fx.Node) -> bool:
    """The node's first argument is a tensor of the graph and no other argument is one."""
    rest = list(node.args[1:]) + list(node.kwargs.values())
    found: list[bool] = []
    fx.node.map_arg(rest, lambda n: found.append(True))
    return bool(node.args) and isinstance(node.args[0], fx.Node) and not found


class _Graph:
    def __init__(self, model: nn.Module):
        self.model = model
        self.graph = _Tracer().trace(model)
        self.modules = dict(model.named_modules())
        self.calls: dict[str, int] = {}
        for n in self.graph.nodes:
            if n.op == "call_module":
                self.calls[n.target] = self.calls.get(n.target, 0) + 1

    def module(self, node: fx.Node) -> nn.Module | None:
        return self.modules.get(node.target) if node.op == "call_module" else None

    def what(self, node: fx.Node) -> str:
        """A short name of an operation, for the recorded reasons."""
        if node.op == "call_module":
            return f"{type(self.module(node)).__name__} {node.target!r}"
        if node.op in ("call_function", "call_method"):
            name = getattr(node.target, "__name__", str(node.target))
            if node.target in (operator.add, torch.add, operator.iadd):
                return "an addition (residual)"
            if node.target in (torch.cat, torch.concat):
                return "a concatenation"
            return f"{name}()"
        if node.op == "placeholder":
            return "the model's input"
        if node.op == "output":
            return "the model's output"
        return node.op

    def per_channel(self, node: fx.Node) -> tuple[bool, str | None]:
        """(carries channels one to one, why not if it has per-channel tensors shared
        elsewhere); BatchNorm / PReLU count only when called once (their entries move)."""
        m = self.module(node)
        if m is not None:
            if type(m) in (nn.BatchNorm2d, nn.PReLU):
                if self.calls[node.target] != 1:
                    return False, f"{self.what(node)} is called more than once"
                return _only_first_is_node(node), None
            # exact types: a subclass may override forward with anything
            return type(m) in _ELEMENTWISE + _POOLS and _only_first_is_node(node), None
        if node.op == "call_function":
            return node.target in _FUNCTIONS and _only_first_is_node(node), None
        if node.op == "call_method":
            return node.target in _METHODS and _only_first_is_node(node), None
        return False, None


def _elementwise(g: _Graph, node: fx.Node) -> bool:
    """An operation acting on every entry alone (no pooling, no per-channel parameters)."""
    m = g.module(node)
    if m is not None:
        return type(m) in _ELEMENTWISE
    if node.op == "call_function":
        return node.target in _FUNCTIONS and "pool" not in getattr(node.target, "__name__", "pool")
    return node.op == "call_method" and node.target in _METHODS


def _is_flatten(g: _Graph, node: fx.Node) -> bool:
    m = g.module(node)
    if m is not None:
        return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1
    if (node.op == "call_function" and node.target is torch.flatten) or \
            (node.op == "call_method" and node.target == "flatten"):
        start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
        end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
        return start == 1 and end == -1 and _only_first_is_node(node)
    return False


def _plain_conv(m: nn.Module | None) -> bool:
    return type(m) is nn.Conv2d and m.groups == 1


def _producer(g: _Graph, node: fx.Node) -> tuple[fx.Node | None, list[fx.Node], str]:
    """Walk back from a grouped layer's node to the layer producing its input: (producer node,
    per-channel nodes between, in order), or (None, [], why not)."""
    chain: list[fx.Node] = []
    cur = node.args[0] if node.args else None
    if not isinstance(cur, fx.Node):
        return None, [], "its input is not a tensor of the traced graph"
    while True:
        others = [u for u in cur.users if u is not (chain[0] if chain else node)]
        if others:
            return None, [], (f"the channels it reads are also read by {g.what(others[0])}"
                              + (f" (after {g.what(cur)})" if cur.op != "placeholder" else ""))
        m = g.module(cur)
        if _plain_conv(m) or isinstance(m, GroupedConv2d):
            if g.calls[cur.target] != 1:
                return None, [], f"its producer {g.what(cur)} is called more than once"
            return cur, chain, ""
        ok, why = g.per_channel(cur)
        if not ok:
            return None, [], why or (f"its input comes from {g.what(cur)}, not from a conv "
                                     "through per-channel operations")
        chain.insert(0, cur)
        cur = cur.args[0]


def _consumer(g: _Graph, node: fx.Node
              ) -> tuple[fx.Node | None, list[fx.Node], fx.Node | None, str]:
    """Walk forward from a grouped layer's node to the layer consuming its output: (consumer,
    per-channel nodes between, the flatten node if the consumer is a linear layer behind a
    flatten), or (None, [], None, why not)."""
    chain: list[fx.Node] = []
    flat: fx.Node | None = None
    cur = node
    while True:
        users = list(cur.users)
        if len(users) != 1:
            what = ", ".join(sorted({g.what(u) for u in users})) or "nothing"
            return None, [], None, (f"its output channels are read by {len(users)} operations "
                                    f"({what})")
        u = users[0]
        m = g.module(u)
        if flat is None and (_plain_conv(m) or isinstance(m, GroupedConv2d)) or \
                flat is not None and type(m) is nn.Linear:
            if g.calls[u.target] != 1:
                return None, [], None, f"its consumer {g.what(u)} is called more than once"
            if not _only_first_is_node(u) or u.args[0] is not cur:
                return None, [], None, f"{g.what(u)} takes it in an unusual way"
            return u, chain, flat, ""
        if flat is None and _is_flatten(g, u):
            flat = u
            cur = u
            continue
        ok, why = g.per_channel(u)
        if flat is not None and ok and not _elementwise(g, u):
            ok = False  # after a flatten, entries are features: only elementwise ops keep them
        if not ok:
            return None, [], None, why or (f"its output goes to {g.what(u)}, which does not "
                                           "carry channels one to one into a conv")
        chain.append(u)
        cur = u


# ---------------------------------------------------------------------------------------------
# reordering layers
# ---------------------------------------------------------------------------------------------

def _take(p: nn.Parameter | torch.Tensor | None, idx: torch.Tensor, dim: int = 0):
    if p is None:
        return None
    t = p.detach().index_select(dim, idx.to(p.device)).clone()
    return nn.Parameter(t, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else t


def _reorder_channels(g: _Graph, chain: list[fx.Node], idx: torch.Tensor) -> None:
    """New channel k of the per-channel modules in `chain` = their old channel idx[k]
    (repeats allowed: a channel computed twice)."""
    for node in chain:
        m = g.module(node)
        if type(m) is nn.BatchNorm2d:
            m.weight, m.bias = _take(m.weight, idx), _take(m.bias, idx)
            if m.running_mean is not None:
                m.running_mean = _take(m.running_mean, idx)
                m.running_var = _take(m.running_var, idx)
            m.num_features = int(idx.numel())
        elif type(m) is nn.PReLU and m.num_parameters > 1:
            m.weight = _take(m.weight, idx)
            m.num_parameters = int(idx.numel())


def _spread(p: nn.Parameter | torch.Tensor | None, o: torch.Tensor, n: int, fill: float,
            dim: int = 0):
    """A tensor with `n` entries along `dim`: entry o[j] = p's entry j, the others `fill`."""
    if p is None:
        return None
    shape = list(p.shape)
    shape[dim] = n
    t = torch.full(shape, fill, dtype=p.dtype, device=p.device)
    t.index_copy_(dim, o.to(p.device), p.detach())
    return nn.Parameter(t, requires_grad=p.requires_grad) if isinstance(p, nn.Parameter) else t


def _spread_channels(g: _Graph, chain: list[fx.Node], o: torch.Tensor, n: int) -> None:
    """Per-channel modules in `chain` move their channel j to o[j] of `n` channels; the
    channels o does not reach (the zero outputs of padded block rows) get a finite identity
    (BatchNorm: mean 0, var 1, weight 1, bias 0): whatever they carry meets zero weights."""
    for node in chain:
        m = g.module(node)
        if type(m) is nn.BatchNorm2d:
            m.weight, m.bias = _spread(m.weight, o, n, 1.0), _spread(m.bias, o, n, 0.0)
            if m.running_mean is not None:
                m.running_mean = _spread(m.running_mean, o, n, 0.0)
                m.running_var = _spread(m.running_var, o, n, 1.0)
            m.num_features = n
        elif type(m) is nn.PReLU and m.num_parameters > 1:
            m.weight = _spread(m.weight, o, n, 0.0)
            m.num_parameters = n


def _select_out(m: nn.Conv2d, idx: torch.Tensor) -> None:
    """The conv's new output channel k = its old output channel idx[k]."""
    m.weight, m.bias = _take(m.weight, idx), _take(m.bias, idx)
    m.out_channels = int(idx.numel())


def _spread_in(m: nn.Module, flat: bool, o: torch.Tensor, n: int) -> None:
    """The consumer's old input channel j becomes channel o[j] of `n`; the others get zero
    weights (they carry the padded rows of a grouped conv)."""
    if not flat:
        m.weight = _spread(m.weight, o, n, 0.0, 1)
        m.in_channels = n
        return
    c = int(o.numel())  # a flatten of [N, C, H, W] lays features out channel by channel
    hw = m.in_features // c
    w = _spread(m.weight.detach().reshape(m.out_features, c, hw), o, n, 0.0, 1)
    m.weight = nn.Parameter(w.reshape(m.out_features, n * hw), requires_grad=m.weight.requires_grad)
    m.in_features = n * hw


# The grouped form of unequal blocks pads every block to the largest rows x channels. It is
# used while the padded conv does at most this multiple of the blocks' own work: the grouped
# conv alone ran 2.7-3.7x over the dense conv where the executor ran 2.1x (256->256, 75%, 4
# blocks; docs/benchmarks.md), so 25% more work, if time follows work, still leaves it ahead.
# A guard from that measurement, not a measured optimum.
MAX_PADDED_WORK = 1.25


def _grouped_parts(ex: BlockConv2d) -> GroupedConv2d | str:
    """The executor as a GroupedConv2d with both gathers, or why it has no grouped form worth
    running. Blocks are padded to the largest rows x channels (zero weights; the padding reads
    the block's first channel); output channels in no block (they output their bias) take
    padded row slots, filling the smallest blocks first. See MAX_PADDED_WORK."""
    if not ex.channel_granular:
        return "element-granular blocks (a block reads part of a channel's kernel)"
    if not ex._sym_pad:
        return "asymmetric padding has no nn.Conv2d form"
    blocks = ex._blocks()
    if not blocks:
        return "no blocks"
    count = torch.zeros(ex.out_channels, dtype=torch.int64)
    for r, _, _ in blocks:
        count[r.cpu()] += 1
    if bool((count > 1).any()):
        return "rows shared by blocks (their outputs are summed)"
    extra: list[list[int]] = [[] for _ in blocks]
    sizes = [int(r.numel()) for r, _, _ in blocks]
    for row in torch.nonzero(count == 0).flatten().tolist():  # the dense remainder: bias only
        i = min(range(len(blocks)), key=lambda j: sizes[j])
        extra[i].append(row)
        sizes[i] += 1
    g = len(blocks)
    rmax, cmax = max(sizes), max(int(ch.numel()) for _, ch, _ in blocks)
    work = sum(int(r.numel()) * int(ch.numel()) for r, ch, _ in blocks)
    if g * rmax * cmax > MAX_PADDED_WORK * work:
        remainder = sum(len(e) for e in extra)
        return ("blocks of unequal sizes"
                + (f" ({remainder} rows in no block)" if remainder else "")
                + f": padded to equal ones they would do {g * rmax * cmax / work:.2f}x their "
                f"work (> {MAX_PADDED_WORK})")
    kh, kw = ex.kernel_size
    dev, dt = ex._device(), ex._dtype()
    idx = torch.zeros(g, cmax, dtype=torch.int64, device=dev)
    w = torch.zeros(g, rmax, cmax, kh, kw, dtype=dt, device=dev)
    b = None if ex.bias is None else torch.zeros(g, rmax, dtype=dt, device=dev)
    out_index = torch.empty(ex.out_channels, dtype=torch.int64, device=dev)
    for i, ((rows, chans, wb), more) in enumerate(zip(blocks, extra)):
        all_rows = torch.cat([rows, torch.tensor(more, dtype=torch.int64, device=rows.device)])
        idx[i, :chans.numel()] = chans
        w[i, :rows.numel(), :chans.numel()] = wb.detach()
        if b is not None:
            b[i, :all_rows.numel()] = ex.bias.detach()[all_rows]
        out_index[all_rows] = i * rmax + torch.arange(all_rows.numel(), device=dev)
    return GroupedConv2d(ex.in_channels, w.reshape(g * rmax, cmax, kh, kw),
                         None if b is None else b.reshape(-1), ex.stride,
                         (ex.pad4[0], ex.pad4[2]), ex.dilation, g, idx.reshape(-1), out_index,
                         ex.layer_name)


def _padding_note(mod: GroupedConv2d, n_rows: int) -> str:
    pad_rows = mod.weight.shape[0] - n_rows
    return f", {pad_rows} padded rows" if pad_rows else ""


# ---------------------------------------------------------------------------------------------
# the pass
# ---------------------------------------------------------------------------------------------

def _absorb(model: nn.Module) -> dict[str, dict]:
    """Rewrite `model` in place; returns per regrouped layer {"input": ..., "output": ...,
    "result": ...} saying what happened to each gather."""
    from . import _set_module

    report: dict[str, dict] = {}
    originals: dict[str, BlockConv2d] = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, BlockConv2d) and m.executor != "dense":
            grouped = _grouped_parts(m)
            if isinstance(grouped, str):
                report[name] = {"input": f"kept: {grouped}", "output": f"kept: {grouped}",
                                "result": "block executor kept"}
                continue
            originals[name] = m
            _set_module(model, name, grouped)
            report[name] = {"input": "kept", "output": "kept"}
    if not originals:
        return report
    try:
        g = _Graph(model)
    except Exception as e:  # noqa: BLE001 - any tracing failure: the gathers stay, with the reason
        msg = f"kept: the model cannot be traced by torch.fx ({type(e).__name__}: " \
              f"{str(e).splitlines()[0][:120] if str(e) else ''})"
        for name, ex in originals.items():
            _set_module(model, name, ex)
            report[name].update(input=msg, output=msg, result="block executor kept")
        return report

    changed: set[str] = set()
    composed: set[str] = set()  # input gathers already merged with their producer's output gather
    nodes = [n for n in g.graph.nodes if n.op == "call_module" and n.target in originals]
    for node in nodes:
        name = node.target
        mod: GroupedConv2d = g.module(node)
        if g.calls[name] != 1:
            report[name].update(input="kept: the layer is called more than once",
                                output="kept: the layer is called more than once")
            continue
        # input side: a plain conv producer takes the gather (a grouped one took it already)
        if mod.in_index is not None and name not in composed:
            prod, chain, why = _producer(g, node)
            idx = mod.in_index
            if prod is None:
                report[name]["input"] = f"kept: {why}"
            elif isinstance(g.module(prod), GroupedConv2d):
                report[name]["input"] = (f"kept: its producer {prod.target!r} is a regrouped layer "
                                         "whose output gather could not be absorbed")
            else:
                # the producer computes exactly the channels the grouped conv reads, in its
                # order: a channel no block reads is dead (this layer is its only reader), one
                # read twice (the padding of a smaller block, which meets zero weights) is
                # computed twice
                pm = g.module(prod)
                unique = int(torch.unique(idx).numel())
                notes = [f"{pm.out_channels - unique} unread dropped"
                         if unique < pm.out_channels else "",
                         f"{idx.numel() - unique} computed twice" if unique < idx.numel() else ""]
                _select_out(pm, idx)
                _reorder_channels(g, chain, idx)
                mod.in_index = None
                mod.in_channels = int(idx.numel())
                changed.add(name)
                notes = [n for n in notes if n]
                report[name]["input"] = (f"absorbed: output channels of {prod.target!r} reordered"
                                         + (f" ({', '.join(notes)})" if notes else ""))
        # output side: the consumer reads the grouped conv's channels in block order
        if mod.out_index is not None:
            cons, chain, flat, why = _consumer(g, node)
            o = mod.out_index
            n_raw = mod.weight.shape[0]
            if cons is None:
                report[name]["output"] = f"kept: {why}"
                continue
            cm = g.module(cons)
            if flat is not None and cm.in_features % o.numel():
                report[name]["output"] = (f"kept: {cons.target!r} takes {cm.in_features} "
                                          f"features, not a multiple of {o.numel()} channels")
                continue
            note = _padding_note(mod, int(o.numel()))
            _spread_channels(g, chain, o, n_raw)
            if isinstance(cm, GroupedConv2d):
                new = o[cm.in_index] if cm.in_index is not None else o
                cm.in_index = None if torch.equal(new, torch.arange(n_raw)) else new
                cm.in_channels = n_raw
                changed.add(cons.target)
                composed.add(cons.target)
                where = f"composed with the input gather of regrouped layer {cons.target!r}"
                report[cons.target]["input"] = (
                    f"absorbed: composed with the output gather of {name!r}" if cm.in_index is None
                    else f"kept, composed with the output gather of {name!r}: the two layers' "
                         "blocks order the channels differently")
            else:
                _spread_in(cm, flat is not None, o, n_raw)
                where = f"input channels of {cons.target!r} reordered{note}"
            mod.out_index = None
            mod.out_channels = n_raw
            changed.add(name)
            report[name]["output"] = f"absorbed: {where}"

    traced = {n.target for n in nodes}
    for name, ex in originals.items():
        mod = model.get_submodule(name)
        if name not in traced:
            report[name].update(input="kept: the layer is not called in the traced forward",
                                output="kept: the layer is not called in the traced forward")
        if name not in changed:  # nothing absorbed: the executor's own kernels are faster
            _set_module(model, name, ex)
            report[name]["result"] = "block executor kept (no gather could be absorbed)"
            continue
        pad = ("" if ex.equal_blocks() else
               ", blocks padded to equal sizes" if ex._plan.partition else
               f", {ex.out_channels - sum(r for r, _ in ex._sizes)} bias-only rows in padded "
               "slots")
        if mod.in_index is None and mod.out_index is None:
            _set_module(model, name, mod.to_conv())
            report[name]["result"] = f"one grouped nn.Conv2d ({mod.groups} groups{pad}), no gather"
        else:
            left = [s for s, t in (("input", mod.in_index), ("output", mod.out_index))
                    if t is not None]
            report[name]["result"] = (f"GroupedConv2d ({mod.groups} groups{pad}), "
                                      f"{' and '.join(left)} gather kept")
    return report


def absorb_gathers(model: nn.Module, example_inputs: Any) -> nn.Module:
    """A copy of the compact model `model` (from `ts.compact`) in which each channel-granular
    block executor whose blocks share no rows runs as one grouped conv, its channel gathers
    absorbed into the neighbouring layers where the graph allows it (see the module doc); what
    happened to each gather is recorded in `ts.compact.describe` (`gathers`). The copy is checked
    against `model` on `example_inputs`, on another batch size and another spatial size
    (relative error <= VERIFY_TOLERANCE); a deviation raises TicketsmithError."""
    from . import _check_inputs, run_model
    from .channel import as_inputs, flat_tensors

    if getattr(model, "ticketsmith_compact", None) is None:
        raise UsageError("absorb_gathers() takes a model returned by ticketsmith.compact.compact()")
    inputs = as_inputs(example_inputs)
    model.eval()
    checks = [("the example inputs", inputs, flat_tensors(run_model(model, inputs)))]
    return absorb_checked(model, checks + _check_inputs(model, inputs))


def absorb_checked(model: nn.Module, checks: list) -> nn.Module:
    """`absorb_gathers` checked against given outputs (`compact` passes the masked model's):
    `checks` is a list of (what, inputs, expected outputs)."""
    from . import _verify

    work = copy_module(model)
    work.eval()
    report = _absorb(work)
    err, failure = _verify(work, checks)
    if failure is not None:
        raise TicketsmithError(f"absorb_gathers: {failure}")
    info = work.ticketsmith_compact = copy.deepcopy(work.ticketsmith_compact)
    executors = dict(getattr(work, "ticketsmith_executors", {}))
    for row in info["layers"]:
        rep = report.get(row["layer"])
        if rep is None:
            continue
        row["gathers"] = dict(rep)
        m = work.get_submodule(row["layer"])
        if not isinstance(m, BlockConv2d):
            row["module"] = type(m).__name__
            row["executor"] = executors[row["layer"]] = "grouped"
            row["params_after"] = sum(t.numel() for t in m.state_dict().values()
                                      if t.is_floating_point())
    work.ticketsmith_executors = executors
    info["verified_rel_err"] = max(float(info.get("verified_rel_err", 0.0)), err)
    info["absorbed"] = True
    return work
