"""Block-sparse executors for regrouped layers (paper §3.3): a conv or linear layer whose weight
is nonzero only on a union of dense blocks (rows x columns), run as small dense products.

Every executor computes exactly the layer whose weight is restricted to the union of its blocks
(zero elsewhere), bias included. Several kernels ("candidates") compute that same function; which
one is fastest depends on the block shapes and the batch (see docs/BENCHMARKS.md), so a module
carries its current choice in `executor`, a default rule in `select(batch_size)` and a measured
choice in `autotune(example_input)`. Modules are saved without pickle through `to_config()` (JSON)
plus `tensors()` and rebuilt with `from_config(config, tensors)`.

Measured on the project's shared 2-core machine (conv 256->256, 3x3, 16x16, batch 64, 4 blocks of
64 rows x 64 whole input channels; benchmarks/results/block_conv.md): a channel gather plus one
small dense conv per block ran at 1.5-2.3x the best dense conv, the same blocks as one grouped
conv at 1.5-2.4x, the grouped conv alone (channel maps absorbed by the neighbouring layers, see
`BlockConv2d.grouped_form`) at 3.6x; anything built on im2col (`F.unfold`) lost to the dense conv.
"""
from __future__ import annotations

import statistics
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from ..errors import UsageError
from ..masks import Block

__all__ = ["BlockConv2d", "BlockLinear", "Executor"]


# Smallest layer (input and output channels) whose channel-granular blocks beat the dense conv:
# at batch 64, 16-32 channels ran 0.2-0.9x with 2-8 blocks, 64 channels 0.9-1.1x, 128 channels
# 1.5-1.7x with 4-8 blocks (benchmarks/results/block_conv_sizes.md).
BLOCK_CONV_MIN_CHANNELS = 128

_PACKED_CONV = (hasattr(torch.ops.mkldnn, "_convolution_pointwise")
                and hasattr(torch._C._nn, "mkldnn_reorder_conv2d_weight"))


def _mkldnn_ok(t: torch.Tensor) -> bool:
    return (t.device.type == "cpu" and t.dtype == torch.float32
            and torch.backends.mkldnn.is_available())


class Executor(nn.Module):
    """Common interface of the compact executors: a set of interchangeable kernels.

    Subclasses define `_kernels` (name -> bound method computing the output from a validated
    input), `_default(batch_size)`, `_export_forward(x)` (a formulation made of standard ops,
    used while `torch.onnx.is_in_onnx_export()`), `_check_input(x)`, `to_config`, `tensors` and
    `from_config`. Derived tensors (folded dense weight, CSR copies, packed weights) live in
    `_cache`, are built on first use and dropped when the module is moved or cast.
    """

    layer_name: str | None

    def __init__(self, name: str | None = None):
        super().__init__()
        self.layer_name = name
        self.executor = "dense"
        self.timings: dict[str, float] = {}
        self._cache: dict[Any, Any] = {}

    # -- interface ---------------------------------------------------------------------------
    def _kernels(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        raise NotImplementedError

    def _default(self, batch_size: int) -> str:
        raise NotImplementedError

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        raise NotImplementedError

    def _where(self) -> str:
        return f"{type(self).__name__}({self.layer_name})" if self.layer_name else type(self).__name__

    def candidates(self) -> list[str]:
        """Names of the kernels this module can run (all compute the same function)."""
        return list(self._kernels())

    def use(self, name: str) -> None:
        """Run kernel `name` from now on."""
        if name not in self._kernels():
            raise UsageError(f"{self._where()}: unknown executor {name!r}; "
                             f"candidates: {', '.join(self.candidates())}")
        self.executor = name

    def select(self, batch_size: int) -> str:
        """Switch to the kernel the measured default rule picks for `batch_size`; return it."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"{self._where()}: batch_size must be a positive integer, "
                             f"got {batch_size!r}")
        name = self._default(batch_size)
        self.use(name)
        return name

    @torch.inference_mode()
    def autotune(self, example_input: torch.Tensor, rounds: int = 5) -> str:
        """Time every candidate on `example_input` (interleaved rounds, median per kernel),
        switch to the fastest and return its name. The medians are kept in `timings` (s)."""
        self._check_input(example_input)
        kernels = self._kernels()
        names = list(kernels)
        for n in names:  # warm-up: builds caches, primes oneDNN's primitive cache
            kernels[n](example_input)
        times: dict[str, list[float]] = {n: [] for n in names}
        for r in range(max(1, rounds)):
            order = names[r % len(names):] + names[:r % len(names)]  # rotate: no fixed position
            for n in order:
                t0 = time.perf_counter()
                kernels[n](example_input)
                times[n].append(time.perf_counter() - t0)
        self.timings = {n: statistics.median(v) for n, v in times.items()}
        best = min(names, key=lambda n: self.timings[n])
        self.use(best)
        return best

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if torch.onnx.is_in_onnx_export():
            return self._export_forward(x)
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            if not x.requires_grad:  # only the bias asks for autograd: most likely a forgotten no_grad
                # one message for all layers, so Python shows it once, not once per layer
                warnings.warn("compact executors run their dense kernels while autograd is recording "
                              "(their biases require grad); for inference, call the model under "
                              "torch.inference_mode() or torch.no_grad()", stacklevel=2)
            return self._differentiable(x)
        fn = self._cache.get(("kernel", self.executor))
        if fn is None:
            fn = self._cache[("kernel", self.executor)] = self._kernels()[self.executor]
        return fn(x)

    def _differentiable(self, x: torch.Tensor) -> torch.Tensor:
        """Under autograd: the fast kernels write into preallocated outputs or call oneDNN ops
        without a backward (which would drop the gradient silently), so a gradient to the input
        goes through the "dense" kernel, the same function (its bias gets its gradient). The
        executor's weights are fixed (a compact model is for inference): their dense form is
        derived without a gradient, so asking for one is refused rather than silently ignored."""
        if any(p.requires_grad for n, p in self.named_parameters() if not n.startswith("bias")):
            raise UsageError(f"{self._where()}: a compact executor's weights are fixed; to train, "
                             "train the masked dense model (ts.Masks.hold) and compact it again")
        return self._kernels()["dense"](x)

    def extra_repr(self) -> str:
        return f"executor={self.executor!r}"

    def _apply(self, fn, recurse=True):  # .to() / .float(): derived tensors are stale
        self._cache.clear()
        return super()._apply(fn, recurse)

    def __getstate__(self):  # copy.deepcopy / pickle: derived tensors are rebuilt on use
        state = self.__dict__.copy()  # (oneDNN packed weights are opaque: they cannot be copied)
        state["_cache"] = {}
        return state

    def refresh(self) -> None:
        """Drop the derived tensors (folded, packed, CSR copies of the weights); call it after
        changing the module's own tensors in place."""
        self._cache.clear()

    def _cached(self, key: str, build: Callable[[], Any]) -> Any:
        v = self._cache.get(key)
        if v is None:
            v = self._cache[key] = build()
        return v

    # -- save / load -------------------------------------------------------------------------
    def to_config(self) -> dict:
        raise NotImplementedError

    def tensors(self) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    @classmethod
    def from_config(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "Executor":
        raise NotImplementedError


def _check_config(cls: type, config: dict, tensors: dict, needed: Sequence[str]) -> None:
    if not isinstance(config, dict) or config.get("kind") != cls.__name__:
        got = config.get("kind") if isinstance(config, dict) else type(config).__name__
        raise UsageError(f"{cls.__name__}.from_config: config is for {got!r}, not {cls.__name__}")
    missing = [k for k in needed if k not in tensors]
    if missing:
        raise UsageError(f"{cls.__name__}.from_config: missing tensors {missing}")


# ---------------------------------------------------------------------------------------------
# blocks: validation and the shared bookkeeping of rows
# ---------------------------------------------------------------------------------------------

def _index(where: str, what: str, t: Any, bound: int, sort: bool = True) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dim() != 1:
        raise UsageError(f"{where}: {what} must be a 1-D integer tensor, got {t.dtype} of shape "
                         f"{tuple(t.shape)}")
    t = t.detach().to(device="cpu", dtype=torch.int64)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= bound):
        raise UsageError(f"{where}: {what} out of range [0, {bound}) "
                         f"(min {int(t.min())}, max {int(t.max())})")
    if sort:
        t = t.sort().values
    elif t.numel() > 1 and bool((t[1:] < t[:-1]).any()):
        raise UsageError(f"{where}: {what} is not sorted")
    if t.numel() > 1 and bool((t[1:] == t[:-1]).any()):
        raise UsageError(f"{where}: {what} has repeated indices")
    return t


def _normalise_blocks(where: str, blocks: Any, n_rows: int, n_cols: int
                      ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if isinstance(blocks, (torch.Tensor, str)) or not isinstance(blocks, Sequence):
        raise UsageError(f"{where}: blocks must be a sequence of Block(rows, cols), "
                         f"got {type(blocks).__name__}")
    out = []
    for i, b in enumerate(blocks):
        try:
            rows, cols = (b.rows, b.cols) if isinstance(b, Block) else b
        except (TypeError, ValueError):
            raise UsageError(f"{where}: block {i} is not a (rows, cols) pair") from None
        rows = _index(where, f"block {i} rows", rows, n_rows)
        cols = _index(where, f"block {i} cols", cols, n_cols)
        if rows.numel() and cols.numel():  # an empty block contributes nothing
            out.append((rows, cols))
    return out


def _claim(n_rows: int, n_cols: int, blocks: list[tuple[torch.Tensor, torch.Tensor]]
           ) -> list[torch.Tensor]:
    """Per block, the [rows, cols] mask of entries it owns: an entry shared by two blocks is
    owned by the first, so that summing the blocks gives the union's weight exactly once."""
    claimed = torch.zeros(n_rows, n_cols, dtype=torch.bool)
    owned = []
    for rows, cols in blocks:
        sub = claimed[rows.unsqueeze(1), cols.unsqueeze(0)]
        owned.append(~sub)
        claimed[rows.unsqueeze(1), cols.unsqueeze(0)] = True
    return owned


class _RowPlan:
    """How block outputs are put together into the layer's output rows.

    partition: every row is covered by exactly one block -> each block's output (bias folded in)
    is copied into its rows. Otherwise the output starts from the bias (zeros for rows covered
    by no block) and the block outputs are added (rows shared by blocks with disjoint columns sum).
    For ONNX export, `gather[l]` picks, per output row, its l-th contribution from the
    concatenated block outputs (the last slot being a zero channel).
    """

    def __init__(self, n_rows: int, rows: list[torch.Tensor]):
        count = torch.zeros(n_rows, dtype=torch.int64)
        for r in rows:
            count[r] += 1
        self.partition = bool((count == 1).all()) and len(rows) > 0
        self.identity = self.partition and len(rows) == 1  # one block over all rows, in order
        slots = sum(int(r.numel()) for r in rows)
        depth = int(count.max()) if n_rows else 0
        gather = torch.full((max(depth, 1), n_rows), slots, dtype=torch.int64)
        filled = torch.zeros(n_rows, dtype=torch.int64)
        s = 0
        for r in rows:
            gather[filled[r], r] = torch.arange(s, s + r.numel())
            filled[r] += 1
            s += r.numel()
        self.gather = gather
        # partition: slot of each row in the concatenation of the block outputs
        self.slot_of_row = gather[0] if self.partition else None
        self.all_rows = torch.cat(rows) if rows else torch.zeros(0, dtype=torch.int64)


def _assemble(plan: _RowPlan, ys: list[torch.Tensor], rows: list[torch.Tensor],
              base: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Eager assembly along dim 1: copy (partition, biases already in ys) or add onto `base`."""
    if plan.identity:
        return ys[0]
    if plan.partition:
        y0 = ys[0]
        out = y0.new_empty((y0.shape[0], plan.gather.shape[1]) + tuple(y0.shape[2:]))
        for r, y in zip(rows, ys):
            out.index_copy_(1, r, y)
        return out
    out = base()
    for r, y in zip(rows, ys):
        out.index_add_(1, r, y)
    return out


def _assemble_export(plan: _RowPlan, ys: list[torch.Tensor], bias: torch.Tensor | None,
                     base: Callable[[], torch.Tensor]) -> torch.Tensor:
    """The same assembly with exportable ops only (Concat, Gather, Add); ys carry no bias."""
    if not ys:
        return base()
    zero = torch.zeros_like(ys[0].narrow(1, 0, 1))
    cat = torch.cat(list(ys) + [zero], 1)
    gather = plan.gather.to(cat.device)
    out = cat.index_select(1, gather[0])
    for level in range(1, gather.shape[0]):
        out = out + cat.index_select(1, gather[level])
    if bias is not None:
        shape = (1, -1) + (1,) * (out.dim() - 2)
        out = out + bias.view(shape)
    return out


def _base(bias: torch.Tensor | None, shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    if bias is None:
        return like.new_zeros(shape)
    view = (1, -1) + (1,) * (len(shape) - 2)
    # a copy, never a view of the bias itself: the block outputs are added into it
    return bias.view(view).expand(shape).clone(memory_format=torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# conv
# ---------------------------------------------------------------------------------------------

def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _explicit_padding(padding: Any, kernel: tuple[int, int], dilation: tuple[int, int]
                      ) -> tuple[int, int, int, int]:
    """(top, bottom, left, right) zero padding, resolving 'same' / 'valid'."""
    if padding == "valid":
        return (0, 0, 0, 0)
    if padding == "same":
        pads = []
        for k, d in zip(kernel, dilation):
            total = d * (k - 1)
            pads += [total // 2, total - total // 2]
        return tuple(pads)  # type: ignore[return-value]
    ph, pw = _pair(padding)
    return (ph, ph, pw, pw)


class BlockConv2d(Executor):
    """A Conv2d whose weight is nonzero only on a union of dense blocks.

    Block i spans output channels `rows_i` and the columns `cols_i` of the flattened
    `c_in * kh * kw` axis (OIHW order). Per block, the input channels it touches are gathered and
    a small dense conv runs with the block's weight (zeros at the touched channels' positions
    outside the block's columns; for blocks whose columns are whole input channels, the
    channel-granular case regroup should aim for, there are none), and the outputs are copied
    (or summed, for rows shared by blocks) into the output rows; rows covered by no block output
    the bias.

    Kernels: "per-block" (one dense conv per block), "grouped" (one grouped conv over the blocks
    padded to equal shape), "im2col" (unfold, then one GEMM per block over exactly its columns),
    "dense" (the conv with the blocks folded into a dense weight). Block paths return NCHW.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int], padding: tuple[int, int, int, int],
                 dilation: tuple[int, int], rows: list[torch.Tensor], cols: list[torch.Tensor],
                 weights: list[torch.Tensor], bias: torch.Tensor | None, name: str | None = None):
        super().__init__(name)
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = kernel_size, stride, dilation
        self.pad4 = padding
        kk = kernel_size[0] * kernel_size[1]
        self.n_blocks = len(rows)
        self._rows, self._cols = list(rows), list(cols)
        self._chans = [torch.unique(c // kk) for c in cols]
        for i, (r, c, ch, w) in enumerate(zip(rows, cols, self._chans, weights)):
            if tuple(w.shape) != (r.numel(), ch.numel()) + tuple(kernel_size):
                raise UsageError(f"{self._where()}: block {i} weight has shape {tuple(w.shape)}, "
                                 f"expected {(r.numel(), ch.numel()) + tuple(kernel_size)}")
            self.register_buffer(f"rows{i}", r, persistent=True)
            self.register_buffer(f"cols{i}", c, persistent=True)
            self.register_buffer(f"chans{i}", ch, persistent=False)
            self.register_parameter(f"weight{i}", nn.Parameter(w.detach().clone(), requires_grad=False))
        self.register_parameter("bias", None if bias is None else
                                nn.Parameter(bias.detach().clone(), requires_grad=False))
        self.channel_granular = all(c.numel() == ch.numel() * kk for c, ch in zip(cols, self._chans))
        self._sizes = [(int(r.numel()), int(ch.numel())) for r, ch in zip(rows, self._chans)]
        self._plan = _RowPlan(out_channels, self._rows)
        t, b, left, r = padding
        self._sym_pad = (t == b and left == r)
        self.executor = self._default(1)

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def from_conv(cls, conv: nn.Conv2d, blocks: Sequence[Block], name: str | None = None
                  ) -> "BlockConv2d":
        """The executor of `conv` with its weight restricted to the union of `blocks`."""
        where = f"BlockConv2d({name})" if name else "BlockConv2d"
        if not isinstance(conv, nn.Conv2d):
            raise UsageError(f"{where}: expected an nn.Conv2d, got {type(conv).__name__}")
        if conv.groups != 1:
            raise UsageError(f"{where}: grouped convolutions (groups={conv.groups}) are not supported")
        if conv.padding_mode != "zeros":
            raise UsageError(f"{where}: padding_mode {conv.padding_mode!r} is not supported "
                             "(zeros only)")
        w = conv.weight.detach().to("cpu")
        o, c, kh, kw = w.shape
        blocks_n = _normalise_blocks(where, blocks, o, c * kh * kw)
        owned = _claim(o, c * kh * kw, blocks_n)
        w2 = w.reshape(o, c * kh * kw)
        weights = []
        for (rows, cols), own in zip(blocks_n, owned):
            chans = torch.unique(cols // (kh * kw))
            # the block's weight over its touched channels, zero outside its own columns
            local = torch.zeros(rows.numel(), chans.numel() * kh * kw, dtype=w.dtype)
            pos = torch.searchsorted(chans, cols // (kh * kw)) * (kh * kw) + cols % (kh * kw)
            local[:, pos] = w2[rows.unsqueeze(1), cols.unsqueeze(0)] * own
            weights.append(local.reshape(rows.numel(), chans.numel(), kh, kw))
        k = (kh, kw)
        d = _pair(conv.dilation)
        mod = cls(c, o, k, _pair(conv.stride), _explicit_padding(conv.padding, k, d), d,
                  [r for r, _ in blocks_n], [cc for _, cc in blocks_n], weights,
                  None if conv.bias is None else conv.bias.detach().to("cpu"), name)
        return mod.to(conv.weight.device)

    # -- derived tensors ---------------------------------------------------------------------
    def _blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """(rows, chans, weight) per block, as the module's current tensors."""
        return [(getattr(self, f"rows{i}"), getattr(self, f"chans{i}"), getattr(self, f"weight{i}"))
                for i in range(self.n_blocks)]

    def _block_biases(self) -> list[torch.Tensor | None]:
        def build():
            if self.bias is None or not self._plan.partition:
                return [None] * self.n_blocks
            return [self.bias[r] for r, _, _ in self._blocks()]
        return self._cached("block_bias", build)

    def dense_weight(self) -> torch.Tensor:
        """The folded dense weight [c_out, c_in, kh, kw] (zero outside the blocks)."""
        def build():
            kh, kw = self.kernel_size
            w = torch.zeros(self.out_channels, self.in_channels, kh, kw,
                            dtype=self._dtype(), device=self._device())
            for rows, chans, wb in self._blocks():
                w[rows.unsqueeze(1), chans.unsqueeze(0)] += wb
            return w
        return self._cached("dense", build)

    def _dtype(self) -> torch.dtype:
        if self.n_blocks:
            return self.weight0.dtype
        return self.bias.dtype if self.bias is not None else torch.float32

    def _device(self) -> torch.device:
        if self.n_blocks:
            return self.weight0.device
        return self.bias.device if self.bias is not None else torch.device("cpu")

    def _conv_padding(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        t, b, left, r = self.pad4
        if self._sym_pad:
            return x, (t, left)
        return F.pad(x, (left, r, t, b)), (0, 0)

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        t, b, left, r = self.pad4
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        return ((h + t + b - dh * (kh - 1) - 1) // sh + 1, (w + left + r - dw * (kw - 1) - 1) // sw + 1)

    def _base_fn(self, x: torch.Tensor) -> Callable[[], torch.Tensor]:
        ho, wo = self._out_hw(x.shape[2], x.shape[3])
        return lambda: _base(self.bias, (x.shape[0], self.out_channels, ho, wo), x)

    # -- kernels -----------------------------------------------------------------------------
    def _kernels(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        if self.n_blocks == 0:
            return {"dense": self._dense}
        k = {"per-block": self._per_block, "grouped": self._grouped, "im2col": self._im2col,
             "dense": self._dense}
        if self.n_blocks < 2:
            del k["grouped"]  # the same computation as per-block
        return k

    def _default(self, batch_size: int) -> str:
        """Measured rule (benchmarks/results/block_conv.md): the block kernels pay when their
        work (MACs over the touched input channels) is at most half the dense conv's, otherwise
        "dense" (blocks over random single columns touch nearly every input channel: 0.5-0.8x).
        Then "per-block": 2.3x over the best dense conv at a quarter of the work, at 1 and 2
        threads; "grouped" (oneDNN's grouped kernel on NCHW input) ran 1.5-2.4x. (With OpenMP's
        default spinning wait on a loaded machine, any multi-call kernel degrades; "grouped",
        one call, degraded least: see the benchmark notes on OMP_WAIT_POLICY.) Below
        BLOCK_CONV_MIN_CHANNELS channels the per-call cost of the gathers and small convs wins:
        dense (benchmarks/results/block_conv_sizes.md)."""
        if self.n_blocks == 0 or min(self.in_channels, self.out_channels) < BLOCK_CONV_MIN_CHANNELS:
            return "dense"
        dense = self.out_channels * self.in_channels
        work = sum(r.numel() * ch.numel() for r, ch in zip(self._rows, self._chans))
        return "per-block" if work <= 0.5 * dense else "dense"

    def _conv(self, x: torch.Tensor, key: Any, weight: torch.Tensor, bias: torch.Tensor | None,
              pad: tuple[int, int], groups: int = 1) -> torch.Tensor:
        """F.conv2d, or oneDNN's convolution with a weight reordered once per input shape:
        F.conv2d reorders the plain weight into oneDNN's blocked layout on every call, which
        cost as much as the convolution itself at batch 8 here (256->256, 16x16)."""
        if not (_PACKED_CONV and _mkldnn_ok(x) and weight.dtype == x.dtype
                and not (torch.is_grad_enabled() and x.requires_grad)):
            return F.conv2d(x, weight, bias, self.stride, pad, self.dilation, groups)
        ck = ("packed", key, tuple(x.shape))
        packed = self._cache.get(ck)
        if packed is None:
            if len(self._cache) > 64:  # many input shapes: drop the old packed weights
                for k in [k for k in self._cache if isinstance(k, tuple) and k[0] == "packed"]:
                    del self._cache[k]
            packed = self._cache[ck] = torch._C._nn.mkldnn_reorder_conv2d_weight(
                weight.detach().to_mkldnn(), list(pad), list(self.stride), list(self.dilation),
                groups, list(x.shape))
        return torch.ops.mkldnn._convolution_pointwise(
            x, packed, None if bias is None else bias.detach(), list(pad), list(self.stride),
            list(self.dilation), groups, "none", [], "")

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        x, pad = self._conv_padding(x)
        if torch.onnx.is_in_onnx_export():
            return F.conv2d(x, self.dense_weight(), self.bias, self.stride, pad, self.dilation)
        return self._conv(x, "dense", self.dense_weight(), self.bias, pad)

    def _per_block(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()  # gathering channels out of channels_last is a strided, slow copy
        x, pad = self._conv_padding(x)
        ys = [self._conv(x.index_select(1, chans), i, wb, bb, pad)
              for i, ((_, chans, wb), bb) in enumerate(zip(self._blocks(), self._block_biases()))]
        return _assemble(self._plan, ys, self._rows_now(), self._base_fn_padded(x))

    def _rows_now(self) -> list[torch.Tensor]:
        return [r for r, _, _ in self._blocks()]

    def _base_fn_padded(self, xp: torch.Tensor) -> Callable[[], torch.Tensor]:
        # xp may already carry asymmetric padding: compute the output size from the conv itself
        t, b, left, r = self.pad4
        if self._sym_pad:
            return self._base_fn(xp)
        (kh, kw), (sh, sw), (dh, dw) = self.kernel_size, self.stride, self.dilation
        ho = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
        wo = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
        return lambda: _base(self.bias, (xp.shape[0], self.out_channels, ho, wo), xp)

    def _grouped_tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Blocks padded to equal rows and channels for one grouped conv: (input channel index,
        weight [G*R, Cmax, kh, kw], bias, index of each block row's slot in the conv output)."""
        def build():
            blocks = self._blocks()
            g = len(blocks)
            rmax = max(r.numel() for r, _, _ in blocks)
            cmax = max(ch.numel() for _, ch, _ in blocks)
            kh, kw = self.kernel_size
            idx = torch.zeros(g, cmax, dtype=torch.int64, device=self._device())
            w = torch.zeros(g, rmax, cmax, kh, kw, dtype=self._dtype(), device=self._device())
            bias = None
            biases = self._block_biases()
            if biases[0] is not None:
                bias = torch.zeros(g, rmax, dtype=self._dtype(), device=self._device())
            slots = []
            for i, ((rows, chans, wb), bb) in enumerate(zip(blocks, biases)):
                idx[i, :chans.numel()] = chans  # padding reads channel 0 with zero weight
                w[i, :rows.numel(), :chans.numel()] = wb
                if bias is not None:
                    bias[i, :rows.numel()] = bb
                slots.append(torch.arange(rows.numel(), device=idx.device) + i * rmax)
            return (idx.reshape(-1), w.reshape(g * rmax, cmax, kh, kw),
                    None if bias is None else bias.reshape(-1), torch.cat(slots))
        return self._cached("grouped", build)

    def _grouped(self, x: torch.Tensor) -> torch.Tensor:
        if self.n_blocks < 2:
            return self._per_block(x)
        idx, w, b, slots = self._grouped_tensors()
        x = x.contiguous()
        x, pad = self._conv_padding(x)
        y = self._conv(x.index_select(1, idx), "grouped", w, b, pad, self.n_blocks)
        if self._plan.partition:  # one gather puts every row in place
            def build():
                return slots[self._plan.slot_of_row.to(slots.device)]
            return y.index_select(1, self._cached("grouped_rows", build))
        out = self._base_fn_padded(x)()
        return out.index_add_(1, self._plan.all_rows.to(y.device), y.index_select(1, slots))

    def _im2col_weights(self) -> list[torch.Tensor]:
        def build():
            kk = self.kernel_size[0] * self.kernel_size[1]
            out = []
            for i, (rows, chans, wb) in enumerate(self._blocks()):
                cols = getattr(self, f"cols{i}")
                pos = torch.searchsorted(chans, cols // kk) * kk + cols % kk
                out.append(wb.reshape(rows.numel(), -1)[:, pos].contiguous())
            return out
        return self._cached("im2col", build)

    def _im2col(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        t, b, left, r = self.pad4
        ho, wo = self._out_hw(h, w)
        u = F.unfold(F.pad(x, (left, r, t, b)), self.kernel_size, self.dilation, 0, self.stride)
        ys = []
        for i, (wb, bb) in enumerate(zip(self._im2col_weights(), self._block_biases())):
            y = torch.matmul(wb, u.index_select(1, getattr(self, f"cols{i}")))
            ys.append(y if bb is None else y + bb.unsqueeze(1))
        base = lambda: _base(self.bias, (n, self.out_channels, ho * wo), x)  # noqa: E731
        return _assemble(self._plan, ys, self._rows_now(), base).reshape(n, self.out_channels, ho, wo)

    def equal_blocks(self) -> bool:
        """True if the blocks partition the output channels and all have the same numbers of
        rows and of touched input channels: the grouped form is then one grouped conv with no
        padded rows or channels."""
        if self.n_blocks < 1 or not self._plan.partition:
            return False
        return len(set(self._sizes)) == 1

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.executor == "dense" or self.n_blocks == 0:
            return self._dense(x)
        x, pad = self._conv_padding(x)
        if self.n_blocks > 1 and self.equal_blocks():
            # the grouped form: Gather, one grouped Conv (which a runtime fuses with its bias
            # and activation), Gather; nothing padded, so no work beyond the blocks' own. Built
            # with concatenations (not the cached padded tensors, written in place, which the
            # tracer would record as mutations of the weights)
            blocks = self._blocks()
            w = torch.cat([wb for _, _, wb in blocks], 0)
            b = None if self.bias is None else self.bias[torch.cat([r for r, _, _ in blocks])]
            y = F.conv2d(x.index_select(1, torch.cat([ch for _, ch, _ in blocks])), w, b,
                         self.stride, pad, self.dilation, self.n_blocks)
            return y.index_select(1, self._plan.slot_of_row.to(y.device))
        ys = [F.conv2d(x.index_select(1, chans), wb, None, self.stride, pad, self.dilation)
              for _, chans, wb in self._blocks()]
        return _assemble_export(self._plan, ys, self.bias, self._base_fn_padded(x))

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != self.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UsageError(f"{self._where()}: expected an input [N, {self.in_channels}, H, W], "
                             f"got {shape}")

    def grouped_form(self) -> tuple[torch.Tensor, nn.Conv2d, torch.Tensor]:
        """The layer as `(in_index, conv, out_index)` with a plain grouped nn.Conv2d:
        `layer(x) == conv(x.index_select(1, in_index)).index_select(1, out_index)`.

        For whole-model compaction: where `in_index` is a permutation of the input channels and
        the neighbouring layers can absorb both index maps (reorder the previous layer's output
        channels, the next layer's input channels), the layer runs as the grouped conv alone,
        without the two channel gathers that cost this executor a third of its time. Needs every
        output row in exactly one block (rows shared by blocks or in none: UsageError)."""
        if self.n_blocks < 1 or not self._plan.partition:
            raise UsageError(f"{self._where()}: a grouped form needs every output channel in "
                             "exactly one block")
        if not self._sym_pad:
            raise UsageError(f"{self._where()}: asymmetric padding has no nn.Conv2d form")
        idx, w, b, slots = self._grouped_tensors()
        g = self.n_blocks
        conv = nn.Conv2d(idx.numel(), w.shape[0], self.kernel_size, self.stride,
                         (self.pad4[0], self.pad4[2]), self.dilation, groups=g, bias=b is not None)
        with torch.no_grad():
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
        out_index = slots[self._plan.slot_of_row.to(slots.device)]
        return idx.clone(), conv.to(w.device), out_index.clone()

    # -- accounting --------------------------------------------------------------------------
    def macs_per_position(self) -> int:
        """Multiply-adds per output pixel of the blocks (their own columns only)."""
        return sum(r.numel() * c.numel() for r, c in zip(self._rows, self._cols))

    # -- save / load -------------------------------------------------------------------------
    def to_config(self) -> dict:
        """JSON-able description; with `tensors()` it rebuilds the module (`from_config`)."""
        return {"kind": "BlockConv2d", "in_channels": self.in_channels,
                "out_channels": self.out_channels, "kernel_size": list(self.kernel_size),
                "stride": list(self.stride), "padding": list(self.pad4),
                "dilation": list(self.dilation), "blocks": self.n_blocks,
                "bias": self.bias is not None, "executor": self.executor,
                "name": self.layer_name}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's own tensors (block rows, columns and weights, bias), by name."""
        t: dict[str, torch.Tensor] = {}
        for i in range(self.n_blocks):
            for k in ("rows", "cols", "weight"):
                t[f"{k}{i}"] = getattr(self, f"{k}{i}").detach()
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        return t

    @classmethod
    def from_config(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "BlockConv2d":
        """Rebuild a module saved with `to_config()` and `tensors()`."""
        n = int(config.get("blocks", 0)) if isinstance(config, dict) else 0
        need = [f"{k}{i}" for i in range(n) for k in ("rows", "cols", "weight")]
        _check_config(cls, config, tensors, need + (["bias"] if config.get("bias") else []))
        try:
            kh, kw = config["kernel_size"]
            where = "BlockConv2d.from_config"
            mod = cls(int(config["in_channels"]), int(config["out_channels"]),
                      tuple(config["kernel_size"]), tuple(config["stride"]), tuple(config["padding"]),
                      tuple(config["dilation"]),
                      [_index(where, f"rows{i}", tensors[f"rows{i}"], int(config["out_channels"]), False)
                       for i in range(n)],
                      [_index(where, f"cols{i}", tensors[f"cols{i}"],
                              int(config["in_channels"]) * kh * kw, False) for i in range(n)],
                      [tensors[f"weight{i}"] for i in range(n)],
                      tensors.get("bias") if config.get("bias") else None, config.get("name"))
        except KeyError as e:
            raise UsageError(f"BlockConv2d.from_config: config lacks {e}") from None
        mod.use(config.get("executor", mod.executor))
        return mod


# ---------------------------------------------------------------------------------------------
# linear
# ---------------------------------------------------------------------------------------------

class BlockLinear(Executor):
    """A Linear layer whose weight is nonzero only on a union of dense blocks (rows x cols).

    Kernels: "per-block" (gather the block's input columns, one small GEMM per block, copy or add
    into the output rows), "dense" (F.linear with the folded weight) and, on CPU with float32,
    "dense-mkldnn" (oneDNN's linear, faster than MKL's at large batch here).
    """

    def __init__(self, in_features: int, out_features: int, rows: list[torch.Tensor],
                 cols: list[torch.Tensor], weights: list[torch.Tensor], bias: torch.Tensor | None,
                 name: str | None = None):
        super().__init__(name)
        self.in_features, self.out_features = in_features, out_features
        self.n_blocks = len(rows)
        for i, (r, c, w) in enumerate(zip(rows, cols, weights)):
            if tuple(w.shape) != (r.numel(), c.numel()):
                raise UsageError(f"{self._where()}: block {i} weight has shape {tuple(w.shape)}, "
                                 f"expected {(r.numel(), c.numel())}")
            self.register_buffer(f"rows{i}", r)
            self.register_buffer(f"cols{i}", c)
            self.register_parameter(f"weight{i}", nn.Parameter(w.detach().clone(), requires_grad=False))
        self.register_parameter("bias", None if bias is None else
                                nn.Parameter(bias.detach().clone(), requires_grad=False))
        self._sizes = [(int(r.numel()), int(c.numel())) for r, c in zip(rows, cols)]
        self._plan = _RowPlan(out_features, list(rows))
        self.executor = self._default(1)

    @classmethod
    def from_linear(cls, linear: nn.Linear, blocks: Sequence[Block], name: str | None = None
                    ) -> "BlockLinear":
        """The executor of `linear` with its weight restricted to the union of `blocks`."""
        where = f"BlockLinear({name})" if name else "BlockLinear"
        if not isinstance(linear, nn.Linear):
            raise UsageError(f"{where}: expected an nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach().to("cpu")
        o, i = w.shape
        blocks_n = _normalise_blocks(where, blocks, o, i)
        owned = _claim(o, i, blocks_n)
        weights = [w[r.unsqueeze(1), c.unsqueeze(0)] * own for (r, c), own in zip(blocks_n, owned)]
        mod = cls(i, o, [r for r, _ in blocks_n], [c for _, c in blocks_n], weights,
                  None if linear.bias is None else linear.bias.detach().to("cpu"), name)
        return mod.to(linear.weight.device)

    def _blocks(self) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        return [(getattr(self, f"rows{i}"), getattr(self, f"cols{i}"), getattr(self, f"weight{i}"))
                for i in range(self.n_blocks)]

    def dense_weight(self) -> torch.Tensor:
        """The folded dense weight [out_features, in_features] (zero outside the blocks)."""
        def build():
            dev = self.weight0.device if self.n_blocks else torch.device("cpu")
            dt = self.weight0.dtype if self.n_blocks else torch.float32
            w = torch.zeros(self.out_features, self.in_features, dtype=dt, device=dev)
            for rows, cols, wb in self._blocks():
                w[rows.unsqueeze(1), cols.unsqueeze(0)] += wb
            return w
        return self._cached("dense", build)

    def _kernels(self) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
        if self.n_blocks == 0:
            return {"dense": self._flat(self._dense)}
        k = {"per-block": self._flat(self._per_block), "dense": self._flat(self._dense)}
        if _mkldnn_ok(self.weight0):
            k["dense-mkldnn"] = self._flat(self._dense_mkldnn)
        return k

    def _default(self, batch_size: int) -> str:
        """Per-block GEMMs when the blocks hold at most 30% of the dense weight (at 25%, 4
        blocks of 1024x1024: 1.2x at batch 1, 1.35x at batch 256 over oneDNN), else dense."""
        if self.n_blocks == 0:
            return "dense"
        work = sum(r * c for r, c in self._sizes)
        if work <= 0.3 * self.out_features * self.in_features:
            return "per-block"
        return "dense-mkldnn" if batch_size >= 32 and "dense-mkldnn" in self._kernels() else "dense"

    def _flat(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        def run(x: torch.Tensor) -> torch.Tensor:
            lead = x.shape[:-1]
            y = fn(x.reshape(-1, self.in_features))
            return y.reshape(lead + (self.out_features,))
        return run

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dense_weight(), self.bias)

    def _dense_mkldnn(self, x: torch.Tensor) -> torch.Tensor:
        w = self._cached("mkldnn", lambda: self.dense_weight().to_mkldnn())
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), w, self.bias, "none", [], "")

    def _block_biases(self) -> list[torch.Tensor | None]:
        def build():
            if self.bias is None or not self._plan.partition:
                return [None] * self.n_blocks
            return [self.bias[r] for r, _, _ in self._blocks()]
        return self._cached("block_bias", build)

    def _per_block(self, x: torch.Tensor) -> torch.Tensor:
        ys = [F.linear(x.index_select(1, cols), wb, bb)
              for (_, cols, wb), bb in zip(self._blocks(), self._block_biases())]
        base = lambda: _base(self.bias, (x.shape[0], self.out_features), x)  # noqa: E731
        return _assemble(self._plan, ys, [r for r, _, _ in self._blocks()], base)

    def _export_forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.executor.startswith("dense") or self.n_blocks == 0:
            y = self._dense(x)
        else:
            ys = [F.linear(x.index_select(1, cols), wb) for _, cols, wb in self._blocks()]
            y = _assemble_export(self._plan, ys, self.bias,
                                 lambda: _base(self.bias, (x.shape[0], self.out_features), x))
        return y.reshape(lead + (self.out_features,))

    def _check_input(self, x: torch.Tensor) -> None:
        if not isinstance(x, torch.Tensor) or x.dim() < 1 or x.shape[-1] != self.in_features:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise UsageError(f"{self._where()}: expected an input [..., {self.in_features}], got {shape}")

    def macs_per_sample(self) -> int:
        """Multiply-adds per input row of the blocks."""
        return sum(r * c for r, c in self._sizes)

    def to_config(self) -> dict:
        """JSON-able description; with `tensors()` it rebuilds the module (`from_config`)."""
        return {"kind": "BlockLinear", "in_features": self.in_features,
                "out_features": self.out_features, "blocks": self.n_blocks,
                "bias": self.bias is not None, "executor": self.executor, "name": self.layer_name}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The module's own tensors (block rows, columns and weights, bias), by name."""
        t: dict[str, torch.Tensor] = {}
        for i in range(self.n_blocks):
            for k in ("rows", "cols", "weight"):
                t[f"{k}{i}"] = getattr(self, f"{k}{i}").detach()
        if self.bias is not None:
            t["bias"] = self.bias.detach()
        return t

    @classmethod
    def from_config(cls, config: dict, tensors: dict[str, torch.Tensor]) -> "BlockLinear":
        """Rebuild a module saved with `to_config()` and `tensors()`."""
        n = int(config.get("blocks", 0)) if isinstance(config, dict) else 0
        need = [f"{k}{i}" for i in range(n) for k in ("rows", "cols", "weight")]
        _check_config(cls, config, tensors, need + (["bias"] if config.get("bias") else []))
        try:
            where = "BlockLinear.from_config"
            mod = cls(int(config["in_features"]), int(config["out_features"]),
                      [_index(where, f"rows{i}", tensors[f"rows{i}"], int(config["out_features"]), False)
                       for i in range(n)],
                      [_index(where, f"cols{i}", tensors[f"cols{i}"], int(config["in_features"]), False)
                       for i in range(n)],
                      [tensors[f"weight{i}"] for i in range(n)],
                      tensors.get("bias") if config.get("bias") else None, config.get("name"))
        except KeyError as e:
            raise UsageError(f"BlockLinear.from_config: config lacks {e}") from None
        mod.use(config.get("executor", mod.executor))
        return mod
